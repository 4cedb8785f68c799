"""Ingestion: read a batch, write what the gate accepted and quarantined, keep rejects.

Writes are exactly once, whatever runs twice, at once or is killed half way:
- A table with a primary key is written by key: new keys are inserted, unchanged rows skipped,
  rows whose key exists with other values are updated or quarantined as conflicts (the
  contract's ``on_key_conflict``). A source that grew is appended only its new rows.
- A table without a key is appended whole once: its commit records the batch's content hash,
  and a batch already in the table is skipped.
- Quarantined rows carry a content hash; a row already quarantined is not written again, so a
  rerun after a kill between the quarantine and the raw commit duplicates nothing.
- Each write plans against a snapshot and commits on it with the ingest application
  transaction (``core.lake``): a concurrent ingest that committed first makes the commit fail
  before anything is written, and the write is planned again on the new snapshot.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from core.contract import DatasetContract, TableSpec
from core.lake import (
    INGEST_APP_ID,
    ConcurrentWriteError,
    Lake,
    LakeError,
    arrow_schema,
    canonical,
    nullable_types,
    read_arrow,
    to_arrow,
)
from core.sources import SourceError, make_source
from core.validation import REASON_COLUMN, ValidationResult

log = logging.getLogger(__name__)

BATCH_HASH = "flywheel.batch_sha256"
ROW_HASH = "_flywheel_row_hash"
BATCH_ID = "_flywheel_batch_id"
QUARANTINED_AT = "_flywheel_quarantined_at"
MAX_WRITE_ATTEMPTS = 20


@dataclass
class TableIngest:
    """What happened to one table's batch: rows_in == accepted + quarantined, and
    accepted == inserted + updated + unchanged."""

    table: str
    source: str
    rows_in: int
    inserted: int
    updated: int
    unchanged: int
    quarantined: int
    batch_sha256: str
    conflicts: int = 0
    raw_version: int | None = None
    quarantine_version: int | None = None
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return self.inserted + self.updated + self.unchanged

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["accepted"] = self.accepted
        row["warnings"] = "; ".join(self.warnings)
        row["batch_sha256"] = self.batch_sha256[:12]
        return row


@dataclass
class WritePlan:
    """What a batch changes in its raw table, decided against one snapshot."""

    insert: pd.DataFrame
    update: pd.DataFrame
    conflicts: pd.DataFrame
    unchanged: int
    warnings: list[str] = field(default_factory=list)


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


def row_hashes(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """A 64-bit content hash per row over ``columns``."""
    return pd.util.hash_pandas_object(frame[columns], index=False)


def row_ids(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """A stored row identity: the content hash in hex, and the n-th copy of an identical row
    gets its own id, so identical rows of one batch are all kept."""
    hashed = row_hashes(frame, columns)
    text = hashed.map("{:016x}".format) + "-" + hashed.groupby(hashed).cumcount().astype(str).to_numpy()
    return text.set_axis(frame.index)


def plan_keyed(existing: pd.DataFrame, batch: pd.DataFrame, keys: list[str], columns: list[str],
               on_conflict: str, version: int) -> WritePlan:
    """Compare a batch with the table's rows by key. Both frames are ``canonical``."""
    warnings: list[str] = []
    empty = batch.iloc[0:0]
    if existing.empty:
        return WritePlan(batch, empty, empty, 0)
    current = existing[keys].assign(_position=np.arange(len(existing)))
    duplicated = current.duplicated(keys, keep="last")
    if duplicated.any():
        warnings.append(f"the raw table holds {int(duplicated.sum())} rows whose key repeats "
                        "(written before keyed ingestion); they are compared by their last copy")
        current = current[~duplicated]
    # The current keys are unique, so the left join keeps the batch's rows and their order.
    position = batch[keys].merge(current, on=keys, how="left")["_position"].to_numpy()
    is_new = np.isnan(position)
    held = row_hashes(existing, columns).to_numpy()
    same = np.zeros(len(batch), dtype=bool)
    same[~is_new] = held[position[~is_new].astype(np.int64)] == row_hashes(batch, columns).to_numpy()[~is_new]
    changed = ~is_new & ~same
    update, conflicts = empty, empty
    if on_conflict == "update":
        update = batch[changed]
    else:
        conflicts = batch[changed].assign(**{REASON_COLUMN: (
            f"key_conflict({','.join(keys)}): the raw table (version {version}) holds this key "
            "with other values")})
    return WritePlan(batch[is_new], update, conflicts, int(same.sum()), warnings)


def version_holding(snapshot: Any, batch_sha256: str) -> int | None:
    """The version of the table (as of ``snapshot``) whose commit appended this exact batch."""
    for entry in snapshot.history():
        if entry.get(BATCH_HASH) == batch_sha256:
            return int(entry["version"])
    return None


def _quarantine_schema(spec: TableSpec) -> Any:
    import pyarrow as pa

    return arrow_schema(spec, {REASON_COLUMN: pa.string(), BATCH_ID: pa.string(),
                               QUARANTINED_AT: pa.timestamp("us", tz="UTC"), ROW_HASH: pa.string()})


def _write_quarantine(lake: Lake, uri: str, spec: TableSpec, rows: pd.DataFrame, batch_id: str,
                      metadata: dict[str, Any]) -> tuple[int | None, int]:
    """Append the rows not already quarantined; returns (version written or None, rows new)."""
    schema = _quarantine_schema(spec)
    snapshot = lake.open_or_create(uri, schema)
    columns = [*spec.columns, REASON_COLUMN]
    rows = canonical(rows.assign(**{BATCH_ID: batch_id, QUARANTINED_AT: datetime.now(UTC),
                                    ROW_HASH: ""}), schema)
    rows[ROW_HASH] = row_ids(rows, columns)
    if ROW_HASH in [f.name for f in snapshot.schema().fields] and snapshot.version() > 0:
        held = set(read_arrow(snapshot, [ROW_HASH]).column(0).to_pylist())
        rows = rows[~rows[ROW_HASH].isin(held)]
    if rows.empty:
        return None, 0
    version = lake.commit(snapshot, to_arrow(rows, schema), metadata, app_id=INGEST_APP_ID)
    return version, len(rows)


def _write_once(lake: Lake, contract: DatasetContract, result: ValidationResult, source: str,
                batch_sha256: str, flow_run_id: str | None) -> TableIngest:
    spec = contract.tables[result.table]
    schema = arrow_schema(spec)
    columns = list(spec.columns)
    raw_uri = lake.uri("raw", contract.name, result.table)
    raw = lake.open_or_create(raw_uri, schema)
    accepted = canonical(result.accepted, schema)
    if spec.primary_key:
        existing = read_arrow(raw, columns).to_pandas(types_mapper=nullable_types)
        plan = plan_keyed(existing, accepted, spec.primary_key, columns, spec.on_key_conflict,
                          raw.version())
    elif version_holding(raw, batch_sha256) is not None:
        plan = WritePlan(accepted.iloc[0:0], accepted.iloc[0:0], accepted.iloc[0:0], len(accepted))
    else:
        plan = WritePlan(accepted, accepted.iloc[0:0], accepted.iloc[0:0], 0)

    quarantine = result.quarantined
    if len(plan.conflicts):
        quarantine = pd.concat([canonical(quarantine, schema).assign(
            **{REASON_COLUMN: quarantine[REASON_COLUMN].to_numpy()}), plan.conflicts],
            ignore_index=True)
    outcome = TableIngest(
        result.table, source, result.rows_in, inserted=len(plan.insert), updated=len(plan.update),
        unchanged=plan.unchanged, quarantined=len(quarantine), conflicts=len(plan.conflicts),
        batch_sha256=batch_sha256, warnings=[*result.warnings, *plan.warnings])
    if outcome.rows_in != outcome.accepted + outcome.quarantined:
        raise RuntimeError(f"{result.table}: rows in ({outcome.rows_in}) != inserted + updated + "
                           f"unchanged + quarantined ({outcome.accepted} + {outcome.quarantined})")
    batch_id = str(uuid.uuid4())
    metadata = {
        BATCH_HASH: batch_sha256,
        "flywheel.batch_id": batch_id,
        "flywheel.source": source,
        "flywheel.contract_sha256": contract.fingerprint(),
        "flywheel.rows_in": outcome.rows_in,
        "flywheel.rows_inserted": outcome.inserted,
        "flywheel.rows_updated": outcome.updated,
        "flywheel.rows_unchanged": outcome.unchanged,
        "flywheel.rows_quarantined": outcome.quarantined,
        "flywheel.rows_key_conflicts": outcome.conflicts,
        "flywheel.flow_run_id": flow_run_id or "",
    }
    # Quarantine first, then raw: each write is idempotent on its own (row hashes; keys or the
    # batch hash), so a kill between them leaves a state the rerun completes without duplicates.
    if len(quarantine):
        outcome.quarantine_version, new = _write_quarantine(
            lake, lake.uri("quarantine", contract.name, result.table), spec, quarantine, batch_id,
            metadata)
        if new < len(quarantine):
            log.info("%s: %d of %d quarantined rows were already in quarantine", result.table,
                     len(quarantine) - new, len(quarantine))
    if len(plan.insert) or len(plan.update):
        rows = pd.concat([plan.insert, plan.update], ignore_index=True)
        outcome.raw_version = lake.commit(
            raw, to_arrow(rows, schema), metadata, app_id=INGEST_APP_ID,
            keys=spec.primary_key if len(plan.update) else None)
        log.info("%s: %s inserted, %s updated, %s unchanged, %s quarantined -> %s version %d",
                 result.table, f"{outcome.inserted:,}", f"{outcome.updated:,}",
                 f"{outcome.unchanged:,}", f"{outcome.quarantined:,}", raw_uri, outcome.raw_version)
    else:
        outcome.raw_version, outcome.skipped = raw.version(), True
        log.info("%s: nothing new (%s rows unchanged, %s quarantined); %s stays at version %d",
                 result.table, f"{outcome.unchanged:,}", f"{outcome.quarantined:,}", raw_uri,
                 outcome.raw_version)
    return outcome


def write_batch(lake: Lake, contract: DatasetContract, result: ValidationResult, source: str,
                batch_sha256: str, flow_run_id: str | None = None) -> TableIngest:
    """Write a validated batch: accepted rows to the raw table, quarantined rows (and key
    conflicts) to the quarantine table, exactly once (see the module docstring)."""
    if result.rejected:
        raise ValueError(f"{result.table}: a rejected batch must not be written to the lake")
    for attempt in range(1, MAX_WRITE_ATTEMPTS + 1):
        try:
            return _write_once(lake, contract, result, source, batch_sha256, flow_run_id)
        except ConcurrentWriteError as exc:
            delay = random.uniform(0.05, 0.2) * min(attempt, 5)
            log.info("%s: %s; planning again (attempt %d/%d)", result.table, exc, attempt,
                     MAX_WRITE_ATTEMPTS)
            time.sleep(delay)
    raise LakeError(f"{result.table}: gave up after {MAX_WRITE_ATTEMPTS} concurrent write conflicts")


def store_rejected(root: str, dataset: str, batch: pd.DataFrame, result: ValidationResult) -> str:
    """Keep a rejected batch, as read, beside the lake (never in it) so nothing is lost: under
    ``<root>/rejected/`` (the shared root: a folder or an object store)."""
    import io

    from core import storage

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    uri = storage.join(root, "rejected", dataset, result.table, f"{stamp}-{uuid.uuid4().hex[:8]}.parquet")
    # Object columns of mixed types cannot go to Parquet as they are; text keeps every value.
    safe = batch.copy()
    for column in safe.columns:
        if safe[column].dtype == object:
            safe[column] = safe[column].map(lambda v: None if v is None or v != v else str(v))
    safe.columns = [str(c) for c in safe.columns]
    buffer = io.BytesIO()
    safe.to_parquet(buffer, index=False)
    storage.write_bytes(uri, buffer.getvalue())
    storage.write_bytes(uri.removesuffix(".parquet") + ".txt", (
        f"table: {result.table}\nrows: {result.rows_in}\nfailed:\n  "
        + "\n  ".join(str(f) for f in result.failures) + "\n").encode())
    return uri


__all__ = ["SourceError", "TableIngest", "WritePlan", "batch_fingerprint", "plan_keyed",
           "read_batch", "row_hashes", "row_ids", "store_rejected", "version_holding", "write_batch"]


def tables_to_ingest(contract: DatasetContract, asked: list[str] | None) -> tuple[list[str], list[str]]:
    """The tables a run ingests: those asked, else every table not fed by a stream (``flows.stream``
    consumes those). Returns them and the stream-fed ones left out. An unknown name is an error."""
    from core.errors import FlywheelError

    streamed = [t for t, spec in contract.tables.items() if spec.source.kind == "stream"]
    tables = asked or [t for t in contract.tables if t not in streamed]
    unknown = sorted(set(tables) - set(contract.tables))
    if unknown:
        raise FlywheelError(f"unknown table(s) {unknown} for dataset {contract.name!r}; "
                            f"the contract has {sorted(contract.tables)}")
    return tables, ([] if asked else streamed)


def sample_every(contract: DatasetContract, table: str, smoke_test: bool) -> int:
    """Every n-th row of the base table in a smoke test; small lookup tables whole, so joins
    still find their rows."""
    return SMOKE_SAMPLE_EVERY if smoke_test and table == contract.base_table else 1


SMOKE_SAMPLE_EVERY = 50
