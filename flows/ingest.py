"""Ingest: sources -> validation gate -> raw Delta tables (+ quarantine).

``python -m flows.ingest`` reads every table of the dataset contract, validates each batch
with Great Expectations, and only if no batch is rejected appends the accepted rows to the raw
tables and the quarantined rows (with reasons) to the quarantine tables. A rejected batch is
kept beside the lake, its Data Docs linked as an artifact, and the flow fails naming the
failed expectations.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.settings import get_settings
from flows._runtime import lake_for, main, run_started


class IngestParams(BaseModel):
    """Ingest a dataset's sources through the validation gate into raw Delta tables."""

    dataset: str = Field("flights", description="Dataset contract name (config/datasets/<name>.yaml).")
    tables: list[str] | None = Field(None, description="Tables to ingest (default: all in the contract).")
    smoke_test: bool = Field(False, description="Every 50th row, into a separate smoke lake: seconds.")
    data_docs: bool = Field(True, description="Write Great Expectations Data Docs for failed batches.")


class IngestResult(BaseModel):
    dataset: str
    lake_root: str
    raw_versions: dict[str, int]
    tables: list[dict]


@flow(name="ingest", log_prints=True)
def ingest(params: IngestParams = IngestParams()) -> IngestResult:
    """Wires: the tables to ingest -> each one read and validated -> all rejected (nothing
    written) if one is, else each written exactly once -> an artifact and an event."""
    # Imported here so `--help` costs no pandas or Great Expectations import.
    from tasks import ingest as t

    run_started()
    logger, settings = get_run_logger(), get_settings()
    contract = load_contract(params.dataset)
    lake = lake_for(settings, params.smoke_test)
    tables, streamed = t.tables_to_ingest(contract, params.tables)
    if streamed:
        logger.info("%s fed by a stream (python -m flows.stream): not batch-ingested", ", ".join(streamed))
    batches, sources, results = {}, {}, {}
    for table in tables:
        spec = contract.tables[table]
        batches[table], sources[table] = t.read_batch_task(table, spec, t.sample_every(contract, table, params.smoke_test))
        results[table] = t.validate_task(batches[table], table, spec,
                                         t.data_docs_root(settings) if params.data_docs else None,
                                         f"{contract.name}.", sources[table])
        logger.info("validated %s: %s", table, results[table].summary_row())
    if any(r.rejected for r in results.values()):
        t.reject_task(settings, contract, batches, results)  # raises, naming every failed expectation
    outcomes = [t.write_batch_task(lake, contract, results[table], sources[table],
                                   t.batch_fingerprint(batches[table]), str(flow_run.id or "")) for table in tables]
    raw_versions = t.publish_task(lake, contract, outcomes)
    return IngestResult(dataset=contract.name, lake_root=lake.root, raw_versions=raw_versions,
                        tables=[o.as_row() for o in outcomes])


def report(result: IngestResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingested {result.dataset} into {result.lake_root}")
    columns = ("table", "rows_in", "inserted", "updated", "unchanged", "quarantined", "raw_version")
    for column in columns:
        table.add_column(column)
    for row in result.tables:
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main(ingest, IngestParams, sys.argv[1:], "python -m flows.ingest", report))
