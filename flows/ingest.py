"""Ingest: sources -> validation gate -> raw Delta tables (+ quarantine).

``python -m flows.ingest`` reads every table of the dataset contract, validates each batch
with Great Expectations, and only if no batch is rejected appends the accepted rows to the raw
tables and the quarantined rows (with reasons) to the quarantine tables. A rejected batch is
kept beside the lake, its Data Docs linked as an artifact, and the flow fails naming the
failed expectations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from core import storage
from core.contract import load_contract
from core.settings import get_settings
from flows._runtime import artifact_key, lake_for, main, run_started


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


SMOKE_SAMPLE_EVERY = 50


@flow(name="ingest", log_prints=True)
def ingest(params: IngestParams = IngestParams()) -> IngestResult:
    # Imported here so `--help` costs no pandas or Great Expectations import.
    from tasks.errors import FlywheelError
    from tasks.ingest import (
        batch_fingerprint,
        read_batch_task,
        store_rejected_task,
        validate_task,
        write_batch_task,
    )
    from tasks.validation import ValidationError

    run_started()
    logger = get_run_logger()
    settings = get_settings()
    contract = load_contract(params.dataset)
    lake = lake_for(settings, params.smoke_test)
    streamed = [t for t, spec in contract.tables.items() if spec.source.kind == "stream"]
    if streamed and not params.tables:
        logger.info("%s fed by a stream (python -m flows.stream): not batch-ingested", ", ".join(streamed))
    tables = params.tables or [t for t in contract.tables if t not in streamed]
    unknown = sorted(set(tables) - set(contract.tables))
    if unknown:
        raise FlywheelError(f"unknown table(s) {unknown} for dataset {contract.name!r}; "
                            f"the contract has {sorted(contract.tables)}")
    sample = SMOKE_SAMPLE_EVERY if params.smoke_test else 1

    batches, sources, results = {}, {}, {}
    # Great Expectations writes Data Docs to a local folder: the shared root when that is a
    # folder, else a local cache, copied up to the shared root after (below).
    docs_root = settings.home / "cache" if storage.is_remote(settings.shared) else Path(settings.shared)
    for table in tables:
        spec = contract.tables[table]
        # Small lookup tables are not sampled, so joins still find their rows.
        every = sample if table == contract.base_table else 1
        batches[table], sources[table] = read_batch_task(table, spec, every)
        results[table] = validate_task(batches[table], table, spec, docs_root if params.data_docs else None,
                                         f"{contract.name}.", sources[table])
        logger.info("validated %s: %s", table, results[table].summary_row())

    rejected = [r for r in results.values() if r.rejected]
    if rejected:
        for result in rejected:
            kept = store_rejected_task(settings.shared, contract.name, batches[result.table], result)
            logger.error("%s rejected: %s (batch kept at %s)", result.table,
                         result.describe_failures(), kept)
            if result.data_docs:
                docs = result.data_docs.as_uri()
                if storage.is_remote(settings.shared):
                    site = storage.join(settings.shared, "data_docs", contract.name)
                    storage.upload_tree(result.data_docs.parent, site)
                    docs = storage.join(site, result.data_docs.name)
                create_link_artifact(docs, link_text=f"Data Docs: {result.table}",
                                     key=artifact_key("data-docs", contract.name, result.table))
        create_table_artifact([r.summary_row() for r in results.values()],
                              key=artifact_key("ingest", contract.name),
                              description="Validation gate: **rejected**. Nothing was written.")
        emit_event("flywheel.data.rejected", resource=_resource(contract.name),
                   payload={"tables": {r.table: r.describe_failures() for r in rejected}})
        raise ValidationError(rejected)

    outcomes = []
    for table in tables:
        outcomes.append(write_batch_task(lake, contract, results[table], sources[table],
                                     batch_fingerprint(batches[table]), str(flow_run.id or "")))
    rows = [o.as_row() for o in outcomes]
    create_table_artifact(rows, key=artifact_key("ingest", contract.name),
                          description=f"Ingested **{contract.name}** into `{lake.root}`: "
                                      "keyed tables merged by key (inserted / updated / "
                                      "unchanged), others appended once per batch; quarantined "
                                      "rows (with reasons) to quarantine tables.")
    raw_versions = {o.table: o.raw_version for o in outcomes}
    emit_event("flywheel.data.validated", resource=_resource(contract.name),
               payload={"raw_versions": raw_versions,
                        "quarantined": {o.table: o.quarantined for o in outcomes}})
    return IngestResult(dataset=contract.name, lake_root=lake.root, raw_versions=raw_versions, tables=rows)



def _resource(dataset: str) -> dict[str, str]:
    return {"prefect.resource.id": f"flywheel.dataset.{dataset}", "prefect.resource.name": dataset}


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
