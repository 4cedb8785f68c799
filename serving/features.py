"""Requests to model inputs with the ETL's own compiled transform (core.transform): lookups
joined from the lake, the contract's derived columns, each model's own feature statistics.

Lookup tables (the contract's joins) are read from the lake's raw tables at start and again
when a table has a newer version (``Lookups.refresh``). A record may carry a joined column
itself; a non-null value it sends wins over the lookup's.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.contract import DatasetContract
from core.features import FeatureStats, IndexedLookup, index_lookups, prepare_lookups
from core.lake import Lake
from core.transform import Z_LIMIT, encode_records

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


def inputs(records: list[dict[str, Any]], snapshot: LookupSnapshot, contract: DatasetContract,
           stats: FeatureStats) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Validated records to model inputs with the ETL's compiled transform
    (``core.transform.encode_records``): categorical codes (int64), standardized numerics
    (float32) and, per record, the joined tables that had no row for its keys."""
    categorical, numeric, missing = encode_records(records, snapshot.tables, contract, stats)
    tables = list(missing)
    absent = [[t for t in tables if missing[t][i]] for i in range(len(records))]
    return categorical, numeric, absent


__all__ = ["Lookups", "LookupSnapshot", "Z_LIMIT", "inputs"]
