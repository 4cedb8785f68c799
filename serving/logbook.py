"""The prediction and feedback log: Delta tables written by a background thread.

``LogBook.add`` only appends to an in-memory buffer, so a request never waits for the lake.
A writer thread commits the buffer every ``flush_s`` seconds (or ``flush_rows`` rows) as one
Delta append per table. When a commit fails (the lake is read-only, full, unreachable) the rows
stay in the buffer and are tried again with a growing pause; the failure is counted and logged.
``close`` flushes everything left (graceful shutdown). Nothing is dropped while the process
lives; ``backlog`` says how many rows wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from core.lake import Lake

log = logging.getLogger(__name__)

PREDICTIONS_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("ts", pa.timestamp("us", tz="UTC")),
    ("routing_key", pa.string()),
    ("variant", pa.string()),
    ("served", pa.bool_()),  # False: a shadow score, never returned
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("feature_version", pa.string()),
    ("inputs", pa.string()),  # the record as sent, JSON
    ("score", pa.float64()),
    ("decision", pa.bool_()),
    ("missing_lookups", pa.string()),
    ("latency_s", pa.float64()),
])
FEEDBACK_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("ts", pa.timestamp("us", tz="UTC")),
    ("actual", pa.float64()),
])


@dataclass
class _Buffer:
    uri: str
    schema: pa.Schema
    rows: list[dict[str, Any]] = field(default_factory=list)


class LogBook:
    """Buffered, retried appends of prediction and feedback rows to the lake."""

    def __init__(self, lake: Lake, dataset: str, flush_rows: int = 2000, flush_s: float = 1.0,
                 on_failure: Callable[[str, Exception], None] | None = None,
                 on_backlog: Callable[[int], None] | None = None):
        self.lake = lake
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.buffers = {
            "predictions": _Buffer(lake.uri("serving", dataset, "predictions"), PREDICTIONS_SCHEMA),
            "feedback": _Buffer(lake.uri("serving", dataset, "feedback"), FEEDBACK_SCHEMA),
        }
        self.on_failure, self.on_backlog = on_failure, on_backlog
        self.failures = 0
        self.written = {name: 0 for name in self.buffers}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flywheel-logbook", daemon=True)
        self._thread.start()

    def uri(self, table: str) -> str:
        return self.buffers[table].uri

    def add(self, table: str, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            buffer = self.buffers[table]
            buffer.rows.extend(rows)
            full = len(buffer.rows) >= self.flush_rows
        if full:
            self._wake.set()

    def buffered(self, table: str, column: str) -> set[Any]:
        """The values of ``column`` among the rows of ``table`` not yet committed."""
        with self._lock:
            return {row[column] for row in self.buffers[table].rows}

    @property
    def backlog(self) -> int:
        with self._lock:
            return sum(len(b.rows) for b in self.buffers.values())

    def flush(self) -> bool:
        """Commit what is buffered now; False if a table's commit failed (its rows kept)."""
        ok = True
        for name, buffer in self.buffers.items():
            with self._lock:
                rows = buffer.rows[: self.flush_rows * 10]
            if not rows:
                continue
            try:
                table = pa.Table.from_pylist(rows, schema=buffer.schema)
                self.lake.append(buffer.uri, table, {"flywheel.writer": "serving"})
            except Exception as exc:  # noqa: BLE001 - any lake failure: keep the rows, count, retry
                ok = False
                self.failures += 1
                log.warning("prediction log: writing %d %s rows to %s failed (kept for a retry): %s",
                            len(rows), name, buffer.uri, exc)
                if self.on_failure:
                    self.on_failure(name, exc)
                continue
            with self._lock:
                del buffer.rows[: len(rows)]
            self.written[name] += len(rows)
        return ok

    def _run(self) -> None:
        pause = self.flush_s
        while not self._stop.is_set():
            self._wake.wait(pause)
            self._wake.clear()
            if self._stop.is_set():
                break
            ok = self.flush()
            if self.on_backlog:
                self.on_backlog(self.backlog)
            pause = self.flush_s if ok else min(30.0, max(pause * 2, self.flush_s))

    def close(self, timeout_s: float = 30.0) -> int:
        """Stop the thread and flush what is left, retrying until ``timeout_s``; returns the
        rows that could not be written (0 normally; logged as an error otherwise)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = self.backlog
        if left:
            log.error("prediction log: %d rows could not be written before shutdown", left)
        return left
