"""The data half of the loop, end to end: ingest (validation gate) then ETL.

``python -m flows.pipeline`` is what ``make train`` runs until the training flow lands.
"""

from __future__ import annotations

import sys

from prefect import flow
from pydantic import BaseModel, Field

from flows._runtime import main, run_started
from flows.etl import EtlParams, EtlResult, etl
from flows.ingest import IngestParams, IngestResult, ingest


class PipelineParams(BaseModel):
    """Sources -> validation gate -> raw Delta tables -> Dask features, as subflows."""

    dataset: str = Field("flights", description="Dataset contract name (config/datasets/<name>.yaml).")
    smoke_test: bool = Field(False, description="A sample in a separate smoke lake: seconds.")


class PipelineResult(BaseModel):
    ingest: IngestResult
    etl: EtlResult


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> PipelineResult:
    run_started()
    from core.contract import load_contract

    needed = load_contract(params.dataset).feature_tables()
    ingested = ingest(IngestParams(dataset=params.dataset, smoke_test=params.smoke_test))
    built = etl(EtlParams(dataset=params.dataset, smoke_test=params.smoke_test,
                          raw_versions={t: v for t, v in ingested.raw_versions.items() if t in needed}))
    return PipelineResult(ingest=ingested, etl=built)



def report(result: PipelineResult) -> None:
    from flows.etl import report as etl_report
    from flows.ingest import report as ingest_report

    ingest_report(result.ingest)
    etl_report(result.etl)


if __name__ == "__main__":
    sys.exit(main(pipeline, PipelineParams, sys.argv[1:], "python -m flows.pipeline", report))
