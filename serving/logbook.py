"""The prediction and feedback log: a journal on local disk, then Delta tables.

``LogBook.add`` appends the rows to a journal segment on local disk (one ``write`` of whole
JSON lines; with ``fsync`` also flushed to the device) and to an in-memory buffer, so an
answered prediction is on disk before its response goes out, and a request never waits for
the lake. A writer thread commits the buffer every ``flush_s`` seconds (or ``flush_rows``
rows) as one Delta append per table, then deletes the journal segments whose rows are all
committed. When a commit fails (the lake is read-only, full, unreachable) the rows stay in the
buffer and are tried again with a growing pause; the failure is counted and logged.

Each process writes its own segments and holds an exclusive ``flock`` on each while it lives.
A process killed with SIGKILL (or an out-of-memory kill) leaves its segments unlocked: the next
``LogBook`` on the same journal directory (the restarted worker, or a sibling worker's timer,
every ``recover_s``) claims them, drops the rows the lake already has (a commit that landed
before the kill; by request id), and commits the rest. So a kill loses no answered prediction
and writes none twice. ``close`` flushes everything left (graceful shutdown).

Without ``fsync`` a segment survives any process kill but not a machine crash (up to
``flush_s`` of rows may be only in the page cache, as with any buffered writer); ``fsync``
makes each request wait for the device instead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.lake import Lake, read_arrow

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


# What identifies a row of each table (a shadow score shares its request id with the served one).
KEYS = {"predictions": ("request_id", "served"), "feedback": ("request_id", "ts")}
SUFFIX = ".wal"


@dataclass
class _Buffer:
    uri: str
    schema: pa.Schema
    rows: list[dict[str, Any]] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # the journal segment each row is in ("" if none)


@dataclass
class _Segment:
    """A journal file this process holds the lock of; deleted once its rows are in the lake."""

    path: Path
    fd: int
    pending: int = 0  # rows in it not yet committed
    sealed: bool = False  # no more rows go in


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _decode(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    for f in schema:
        if pa.types.is_timestamp(f.type) and isinstance(row.get(f.name), str):
            row[f.name] = datetime.fromisoformat(row[f.name])
    return row


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class LogBook:
    """Journaled, buffered, retried appends of prediction and feedback rows to the lake."""

    def __init__(self, lake: Lake, dataset: str, flush_rows: int = 2000, flush_s: float = 1.0,
                 journal: Path | None = None, fsync: bool = False, recover_s: float = 30.0,
                 on_failure: Callable[[str, Exception], None] | None = None,
                 on_backlog: Callable[[int], None] | None = None):
        self.lake = lake
        self.flush_rows, self.flush_s, self.recover_s = flush_rows, flush_s, recover_s
        self.buffers = {
            "predictions": _Buffer(lake.uri("serving", dataset, "predictions"), PREDICTIONS_SCHEMA),
            "feedback": _Buffer(lake.uri("serving", dataset, "feedback"), FEEDBACK_SCHEMA),
        }
        self.on_failure, self.on_backlog = on_failure, on_backlog
        self.failures = 0
        self.recovered = 0  # rows of killed writers' segments committed by this one
        self.written = {name: 0 for name in self.buffers}
        self.journal, self.fsync = journal, fsync
        self._segments: dict[str, _Segment] = {}
        self._current: _Segment | None = None
        self._lock = threading.Lock()  # the buffers and segments
        self._writing = threading.Lock()  # one flush or recovery at a time
        if journal is not None:
            journal.mkdir(parents=True, exist_ok=True)
            self._current = self._open_segment()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flywheel-logbook", daemon=True)
        self._thread.start()

    def uri(self, table: str) -> str:
        return self.buffers[table].uri

    def add(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Journal ``rows`` (on disk when this returns) and buffer them for the lake."""
        if not rows:
            return
        with self._lock:
            origin = ""
            segment = self._current
            if segment is not None:
                data = b"".join(json.dumps({"t": table, "r": _encode(row)}, separators=(",", ":")).encode() + b"\n"
                                for row in rows)
                _write_all(segment.fd, data)
                if self.fsync:
                    os.fsync(segment.fd)
                segment.pending += len(rows)
                origin = segment.path.name
            buffer = self.buffers[table]
            buffer.rows.extend(rows)
            buffer.origins.extend([origin] * len(rows))
            full = len(buffer.rows) >= self.flush_rows
        if full:
            self._wake.set()

    def buffered(self, table: str, column: str) -> set[Any]:
        """The values of ``column`` among the rows of ``table`` not yet committed."""
        with self._lock:
            return {row[column] for row in self.buffers[table].rows}

    def journaled(self, table: str, column: str, wanted: set[Any]) -> set[Any]:
        """Of ``wanted``, the values of ``column`` in ``table``'s rows of any journal segment
        in the directory, sibling workers' included (rows answered, not yet committed)."""
        if self.journal is None or not wanted:
            return set()
        found: set[Any] = set()
        for path in self.journal.glob(f"*{SUFFIX}"):
            try:
                lines = path.read_bytes().split(b"\n")
            except FileNotFoundError:  # committed and deleted meanwhile: in the lake now
                continue
            for line in lines:
                try:
                    entry = json.loads(line) if line else None
                except ValueError:
                    continue  # a line being written
                if entry and entry.get("t") == table and entry["r"].get(column) in wanted:
                    found.add(entry["r"][column])
        return found

    @property
    def backlog(self) -> int:
        with self._lock:
            return sum(len(b.rows) for b in self.buffers.values())

    @property
    def segments(self) -> int:
        """Journal segments this process holds (its current one included)."""
        with self._lock:
            return len(self._segments)

    def flush(self) -> bool:
        """Commit what is buffered now; False if a table's commit failed (its rows kept)."""
        with self._writing:
            return self._flush()

    def _flush(self) -> bool:
        ok = True
        with self._lock:
            self._rotate()
        for name, buffer in self.buffers.items():
            with self._lock:
                rows = buffer.rows[: self.flush_rows * 10]
                origins = buffer.origins[: len(rows)]
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
                del buffer.origins[: len(rows)]
                for origin, count in Counter(origins).items():
                    if origin:
                        self._segments[origin].pending -= count
                self._release()
            self.written[name] += len(rows)
        return ok

    # ------------------------------------------------------------------ the journal
    def _open_segment(self) -> _Segment:
        """A new segment, locked before it gets its name (no other process can take it for a
        dead writer's)."""
        assert self.journal is not None
        name = f"{os.getpid()}-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        temporary = self.journal / f"{name}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = temporary.with_suffix(SUFFIX)
        os.rename(temporary, path)
        segment = _Segment(path, fd)
        self._segments[path.name] = segment
        return segment

    def _rotate(self) -> None:
        """Seal the current segment if it has rows and start a new one (under the lock), so
        committed segments can go."""
        current = self._current
        if current is None or current.pending == 0:
            return
        if not self.fsync:
            os.fsync(current.fd)  # group commit: on the device at least every flush_s
        current.sealed = True
        self._current = self._open_segment()

    def _release(self) -> None:
        """Delete the sealed segments whose rows are all in the lake (under the lock)."""
        for name, segment in list(self._segments.items()):
            if segment.sealed and segment.pending <= 0:
                segment.path.unlink(missing_ok=True)
                os.close(segment.fd)
                del self._segments[name]

    def recover(self) -> int:
        """Claim the segments of writers that died (their lock is free), drop the rows the lake
        already has and buffer the rest for the next commit; returns the rows buffered."""
        if self.journal is None:
            return 0
        with self._writing:
            return self._recover()

    def _recover(self) -> int:
        assert self.journal is not None
        for stale in self.journal.glob("*.tmp"):  # killed between creating and naming a segment
            self._claim(stale, remove=True)
        total = 0
        for path in sorted(self.journal.glob(f"*{SUFFIX}")):
            with self._lock:
                if path.name in self._segments:
                    continue
            fd = self._claim(path)
            if fd is None:
                continue
            try:
                rows = self._read_segment(path)
                fresh = {table: self._not_in_lake(table, found) for table, found in rows.items()}
            except Exception:
                os.close(fd)  # unlocked again: the next attempt tries it anew
                raise
            count = sum(len(r) for r in fresh.values())
            with self._lock:
                self._segments[path.name] = _Segment(path, fd, pending=count, sealed=True)
                for table, found in fresh.items():
                    self.buffers[table].rows.extend(found)
                    self.buffers[table].origins.extend([path.name] * len(found))
                self._release()
            if count or any(rows.values()):
                log.warning("prediction log: %s of a stopped writer: %d rows to commit, %d already in the lake",
                            path.name, count, sum(len(r) for r in rows.values()) - count)
            total += count
        self.recovered += total
        return total

    @staticmethod
    def _claim(path: Path, remove: bool = False) -> int | None:
        """The locked descriptor of ``path`` if no live process holds it (None otherwise)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # another process committed and deleted it meanwhile
            os.close(fd)
            return None
        if remove:
            path.unlink(missing_ok=True)
            os.close(fd)
            return None
        return fd

    def _read_segment(self, path: Path) -> dict[str, list[dict[str, Any]]]:
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.buffers}
        lines = path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                entry = json.loads(line)
                rows[entry["t"]].append(_decode(entry["r"], self.buffers[entry["t"]].schema))
            except (ValueError, KeyError, TypeError):
                torn = number >= len(lines) - 1  # the writer was killed in the middle of its last write
                (log.info if torn else log.error)("prediction log: %s line %d %s", path.name, number,
                                                  "was cut short by the kill" if torn else "is not a journal entry")
        return rows

    def _not_in_lake(self, table: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        uri, keys = self.buffers[table].uri, KEYS[table]
        if not rows or not self.lake.exists(uri):
            return rows
        wanted = {row["request_id"] for row in rows}
        logged = read_arrow(self.lake.table(uri), list(keys)).to_pylist()
        have = {tuple(r[k] for k in keys) for r in logged if r["request_id"] in wanted}
        return [row for row in rows if tuple(row[k] for k in keys) not in have]

    def _run(self) -> None:
        pause = self.flush_s
        next_recovery = 0.0
        while not self._stop.is_set():
            if self.journal is not None and time.monotonic() >= next_recovery:
                next_recovery = time.monotonic() + self.recover_s
                try:
                    self.recover()
                except Exception as exc:  # noqa: BLE001 - the lake may be down: try again later
                    log.warning("prediction log: recovering stopped writers' segments failed: %s", exc)
            self._wake.wait(pause)
            self._wake.clear()
            if self._stop.is_set():
                break  # close() flushes
            ok = self.flush()
            if self.on_backlog:
                self.on_backlog(self.backlog)
            pause = self.flush_s if ok else min(30.0, max(pause * 2, self.flush_s))

    def close(self, timeout_s: float = 30.0) -> int:
        """Stop the thread and flush what is left, retrying until ``timeout_s``; returns the
        rows that could not be written (0 normally; logged as an error otherwise, and still in
        the journal for the next start)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = self.backlog
        if left:
            log.error("prediction log: %d rows could not be written before shutdown (kept in %s)", left,
                      self.journal)
            return left
        with self._lock:
            if self._current is not None:
                self._current.sealed = True
                self._current = None
            self._release()
        return left
