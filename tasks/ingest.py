"""Prefect tasks of the ingest flow, around ``core.ingest`` (reading, writing exactly once,
keeping rejects) and ``core.validation`` (the gate)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from core import storage
from core.artifacts import artifact_key
from core.contract import DatasetContract
from core.events import DATA_REJECTED, DATA_VALIDATED, dataset_resource
from core.ingest import (
    TableIngest,
    batch_fingerprint,
    read_batch,
    sample_every,
    store_rejected,
    tables_to_ingest,
    write_batch,
)
from core.lake import Lake
from core.settings import Settings
from core.validation import ValidationError, ValidationResult, validate

# The flow takes these from here (flows import tasks and core only).
__all__ = ["batch_fingerprint", "sample_every", "tables_to_ingest"]

log = logging.getLogger(__name__)


def data_docs_root(settings: Settings) -> Path:
    """Great Expectations writes Data Docs to a local folder: the shared root when that is a
    folder, else a local cache, copied up to the shared root when a batch is rejected."""
    return settings.home / "cache" if storage.is_remote(settings.shared) else Path(settings.shared)


def reject(settings: Settings, contract: DatasetContract, batches: dict[str, pd.DataFrame],
           results: dict[str, ValidationResult]) -> None:
    """A rejected batch writes nothing: each rejected batch is kept under the shared root, its
    Data Docs linked from an artifact, the gate's table published, ``flywheel.data.rejected``
    emitted; then ``ValidationError`` names every failed expectation."""
    from prefect.artifacts import create_link_artifact, create_table_artifact
    from prefect.events import emit_event

    rejected = [r for r in results.values() if r.rejected]
    for result in rejected:
        kept = store_rejected(settings.shared, contract.name, batches[result.table], result)
        log.error("%s rejected: %s (batch kept at %s)", result.table, result.describe_failures(), kept)
        if result.data_docs:
            docs = result.data_docs.as_uri()
            if storage.is_remote(settings.shared):
                site = storage.join(settings.shared, "data_docs", contract.name)
                storage.upload_tree(result.data_docs.parent, site)
                docs = storage.join(site, result.data_docs.name)
            create_link_artifact(docs, link_text=f"Data Docs: {result.table}",
                                 key=artifact_key("data-docs", contract.name, result.table))
    create_table_artifact([r.summary_row() for r in results.values()], key=artifact_key("ingest", contract.name),
                          description="Validation gate: **rejected**. Nothing was written.")
    emit_event(DATA_REJECTED, resource=dataset_resource(contract.name),
               payload={"tables": {r.table: r.describe_failures() for r in rejected}})
    raise ValidationError(rejected)


def publish(lake: Lake, contract: DatasetContract, outcomes: list[TableIngest]) -> dict[str, int | None]:
    """The written tables as an artifact and the event ``flywheel.data.validated``; returns the
    raw table versions."""
    from prefect.artifacts import create_table_artifact
    from prefect.events import emit_event

    create_table_artifact([o.as_row() for o in outcomes], key=artifact_key("ingest", contract.name),
                          description=f"Ingested **{contract.name}** into `{lake.root}`: keyed tables merged by "
                                      "key (inserted / updated / unchanged), others appended once per batch; "
                                      "quarantined rows (with reasons) to quarantine tables.")
    raw_versions = {o.table: o.raw_version for o in outcomes}
    emit_event(DATA_VALIDATED, resource=dataset_resource(contract.name),
               payload={"raw_versions": raw_versions, "quarantined": {o.table: o.quarantined for o in outcomes}})
    return raw_versions


# Thin wrappers that add retries and names. DataFrames are not hashed for
# caching (NO_CACHE): writes are made idempotent in the lake instead (keys, row and batch hashes).
def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: connection trouble, not a corrupt file."""
    from core.sources import TransientSourceError

    try:
        state.result()
    except TransientSourceError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


read_batch_task = task(name="read batch", retries=2, retry_delay_seconds=[2, 10],
                       retry_condition_fn=_transient, cache_policy=NO_CACHE,
                       task_run_name="read {table}")(read_batch)
validate_task = task(name="validate batch", cache_policy=NO_CACHE, task_run_name="validate {table}")(validate)
# Retried once: a write is idempotent (keys, row hashes, batch hash), so a retry after a failure
# part way through completes it without duplicates.
write_batch_task = task(name="write batch", retries=1, retry_delay_seconds=2,
                        task_run_name="write {result.table}", cache_policy=NO_CACHE)(write_batch)
store_rejected_task = task(name="store rejected batch", cache_policy=NO_CACHE)(store_rejected)
reject_task = task(name="reject batches", cache_policy=NO_CACHE)(reject)
publish_task = task(name="publish ingest", cache_policy=NO_CACHE)(publish)
