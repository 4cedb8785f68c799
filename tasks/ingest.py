"""Ingestion work: read a batch, write what the gate accepted and quarantined, keep rejects.

Every raw commit records the batch's content hash, so the same batch is never appended twice:
re-running ingestion on unchanged sources reports the version that already holds it.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from core.contract import DatasetContract, TableSpec
from core.lake import Lake, arrow_schema, to_arrow
from tasks.sources import SourceError, make_source
from tasks.validation import REASON_COLUMN, ValidationResult

log = logging.getLogger(__name__)

BATCH_HASH = "flywheel.batch_sha256"


@dataclass
class TableIngest:
    """What happened to one table's batch."""

    table: str
    source: str
    rows_in: int
    accepted: int
    quarantined: int
    batch_sha256: str
    raw_version: int | None = None
    quarantine_version: int | None = None
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["warnings"] = "; ".join(self.warnings)
        row["batch_sha256"] = self.batch_sha256[:12]
        return row


def read_batch(table: str, spec: TableSpec, sample_every: int = 1) -> tuple[pd.DataFrame, str]:
    """Read one batch from the table's source; ``sample_every`` > 1 keeps every n-th row."""
    source = make_source(table, spec)
    started = time.perf_counter()
    batch = source.read()
    if sample_every > 1:
        batch = batch.iloc[::sample_every].reset_index(drop=True)
    log.info("read %s rows of %s from %s in %.1fs", f"{len(batch):,}", table, source.describe(),
             time.perf_counter() - started)
    return batch, source.describe()


def batch_fingerprint(batch: pd.DataFrame) -> str:
    """sha256 over the batch's column names and row contents."""
    digest = hashlib.sha256("\x1f".join(map(str, batch.columns)).encode())
    if len(batch):
        digest.update(pd.util.hash_pandas_object(batch, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def version_holding(lake: Lake, uri: str, batch_sha256: str) -> int | None:
    """The raw table version whose commit appended this exact batch, if any."""
    for entry in lake.history(uri):
        if entry.get(BATCH_HASH) == batch_sha256:
            return int(entry["version"])
    return None


def write_batch(lake: Lake, contract: DatasetContract, result: ValidationResult, source: str,
                batch_sha256: str, flow_run_id: str | None = None) -> TableIngest:
    """Append accepted rows to the raw table and quarantined rows to the quarantine table."""
    if result.rejected:
        raise ValueError(f"{result.table}: a rejected batch must not be written to the lake")
    spec = contract.tables[result.table]
    raw_uri = lake.uri("raw", contract.name, result.table)
    outcome = TableIngest(result.table, source, result.rows_in, len(result.accepted),
                          len(result.quarantined), batch_sha256, warnings=list(result.warnings))
    existing = version_holding(lake, raw_uri, batch_sha256)
    if existing is not None:
        outcome.raw_version, outcome.skipped = existing, True
        log.info("%s: this batch is already in %s at version %d; nothing appended",
                 result.table, raw_uri, existing)
        return outcome
    batch_id = str(uuid.uuid4())
    metadata = {
        BATCH_HASH: batch_sha256,
        "flywheel.batch_id": batch_id,
        "flywheel.source": source,
        "flywheel.contract_sha256": contract.fingerprint(),
        "flywheel.rows_in": result.rows_in,
        "flywheel.rows_accepted": len(result.accepted),
        "flywheel.rows_quarantined": len(result.quarantined),
        "flywheel.flow_run_id": flow_run_id or "",
    }
    # Quarantine first: if that write fails, the raw table is untouched and a rerun retries
    # both; if the raw write then fails, the quarantine commit names a batch id never seen raw.
    if len(result.quarantined):
        quarantine = result.quarantined.assign(
            _flywheel_batch_id=batch_id, _flywheel_quarantined_at=datetime.now(UTC))
        import pyarrow as pa

        schema = arrow_schema(spec, {REASON_COLUMN: pa.string(), "_flywheel_batch_id": pa.string(),
                                     "_flywheel_quarantined_at": pa.timestamp("us", tz="UTC")})
        outcome.quarantine_version = lake.append(
            lake.uri("quarantine", contract.name, result.table), to_arrow(quarantine, schema),
            metadata, schema_mode="merge")
    outcome.raw_version = lake.append(raw_uri, to_arrow(result.accepted, arrow_schema(spec)), metadata)
    log.info("%s: appended %s rows as %s version %d (%s quarantined)", result.table,
             f"{len(result.accepted):,}", raw_uri, outcome.raw_version, f"{len(result.quarantined):,}")
    return outcome


def store_rejected(home: Path, dataset: str, batch: pd.DataFrame, result: ValidationResult) -> Path:
    """Keep a rejected batch, as read, beside the lake (never in it) so nothing is lost."""
    folder = home / "rejected" / dataset / result.table
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = folder / f"{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    # Object columns of mixed types cannot go to Parquet as they are; text keeps every value.
    safe = batch.copy()
    for column in safe.columns:
        if safe[column].dtype == object:
            safe[column] = safe[column].map(lambda v: None if v is None or v != v else str(v))
    safe.columns = [str(c) for c in safe.columns]
    safe.to_parquet(path, index=False)
    (path.with_suffix(".txt")).write_text(
        f"table: {result.table}\nrows: {result.rows_in}\nfailed:\n  "
        + "\n  ".join(str(f) for f in result.failures) + "\n")
    return path


__all__ = ["SourceError", "TableIngest", "batch_fingerprint", "read_batch", "store_rejected",
           "version_holding", "write_batch"]


# Prefect tasks: thin wrappers that add retries and names. DataFrames are not hashed for
# caching (NO_CACHE): ingestion is made idempotent by the batch hash in the lake instead.
def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: connection trouble, not a corrupt file."""
    from tasks.sources import TransientSourceError

    try:
        state.result()
    except TransientSourceError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


def _prefect_tasks() -> dict[str, Any]:
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from tasks.validation import validate

    return {
        "read": task(read_batch, name="read batch", retries=2, retry_delay_seconds=[2, 10],
                     retry_condition_fn=_transient, cache_policy=NO_CACHE,
                     task_run_name="read {table}"),
        "validate": task(validate, name="validate batch", cache_policy=NO_CACHE,
                         task_run_name="validate {table}"),
        "write": task(write_batch, name="write batch", retries=1, retry_delay_seconds=2,
                      task_run_name="write {result.table}",
                      cache_policy=NO_CACHE),
        "reject": task(store_rejected, name="store rejected batch", cache_policy=NO_CACHE),
    }
