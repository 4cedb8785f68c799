"""Requests to model inputs with the ETL's own functions: lookups joined from the lake, the
contract's derived columns, each model's own feature statistics.

Lookup tables (the contract's joins) are read from the lake's raw tables at start and again
when a table has a newer version (``Lookups.refresh``). A record may carry a joined column
itself; a non-null value it sends wins over the lookup's.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.contract import DatasetContract
from core.features import (
    FeatureStats,
    IndexedLookup,
    encode_joined,
    frame_from_records,
    index_lookups,
    join_indexed,
    prepare_lookups,
)
from core.lake import Lake

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LookupSnapshot:
    tables: dict[str, IndexedLookup]  # prepared (keys renamed, columns suffixed), indexed by key
    versions: dict[str, int]


class Lookups:
    """The contract's joined tables, current as of the last refresh (thread-safe swap)."""

    def __init__(self, lake: Lake, contract: DatasetContract):
        self.lake, self.contract = lake, contract
        self._snapshot = LookupSnapshot({}, {})
        self._lock = threading.Lock()

    @property
    def snapshot(self) -> LookupSnapshot:
        return self._snapshot

    def versions_in_lake(self) -> dict[str, int]:
        out = {}
        for join in self.contract.joins:
            version = self.lake.latest_version(self.lake.uri("raw", self.contract.name, join.table))
            if version is None:
                raise FileNotFoundError(f"lookup table {join.table!r} of {self.contract.name!r} is not in the lake "
                                        f"at {self.lake.root}: run `python -m flows.ingest` first")
            out[join.table] = version
        return out

    def refresh(self) -> bool:
        """Reload the tables whose lake version changed; True if anything was reloaded."""
        with self._lock:
            wanted = self.versions_in_lake()
            current = self._snapshot
            if wanted == current.versions:
                return False
            raw = {}
            for join in self.contract.joins:
                uri = self.lake.uri("raw", self.contract.name, join.table)
                raw[join.table] = self.lake.read_pandas(uri, wanted[join.table])
            prepared = prepare_lookups(raw, self.contract)
            self._snapshot = LookupSnapshot(index_lookups(prepared, self.contract), wanted)
            log.info("lookup tables loaded: %s", {t: f"v{v} ({len(prepared[t]):,} rows)" for t, v in wanted.items()})
            return True


def join(frame: pd.DataFrame, snapshot: LookupSnapshot, contract: DatasetContract) -> tuple[pd.DataFrame, list[list[str]]]:
    """Left-join the lookups; values the request sent win. Returns the joined frame and, per
    row, the joined tables that had no row for its keys."""
    sent = {}
    for join_spec in contract.joins:
        for column in contract.join_columns(join_spec):
            name = f"{column}{join_spec.suffix}"
            if name in frame.columns:
                sent[name] = frame.pop(name)
    joined, missing_cols = join_indexed(frame, snapshot.tables, contract)
    for name, values in sent.items():
        values = values.reindex(joined.index)
        joined[name] = values.where(values.notna(), joined[name]) if name in joined else values
    for join_spec in contract.joins:
        # A lookup the request filled in itself (every column of that join sent) is not missing.
        names = [f"{c}{join_spec.suffix}" for c in contract.join_columns(join_spec)]
        if all(n in sent for n in names):
            complete = np.logical_and.reduce([sent[n].reindex(joined.index).notna().to_numpy() for n in names])
            missing_cols[join_spec.table] = missing_cols[join_spec.table] & ~complete
    tables = list(missing_cols)
    missing = [[t for t in tables if missing_cols[t][i]] for i in range(len(joined))]
    return joined, missing


Z_LIMIT = 1e4


def model_inputs(joined: pd.DataFrame, contract: DatasetContract, stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """Categorical codes and standardized numerics, exactly as the ETL encodes them."""
    encoded = encode_joined(joined, contract, stats)
    # A value the schema allows but the model never saw the like of (1e308 in float32 is inf)
    # is held to 10,000 standard deviations, so it still gets a finite score: no training row
    # comes near that, so nothing a model learnt changes (the skew test holds).
    numerics = np.clip(encoded[contract.features.numeric].to_numpy(np.float64), -Z_LIMIT, Z_LIMIT)
    return encoded[contract.features.categorical].to_numpy(np.int64), numerics.astype(np.float32)


__all__ = ["Lookups", "LookupSnapshot", "frame_from_records", "join", "model_inputs"]
