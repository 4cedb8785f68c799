"""Streaming ingest work: micro-batches from a message log, through the same gate as batch
ingest, appended to the raw Delta table exactly once.

Exactly once, whatever is killed when:
- Each message's position (its Redis id, ``<ms>-<seq>``, as ``ms << 20 | seq``) only grows.
  A micro-batch's last position is committed *with* its rows, in the same Delta commit, as the
  application transaction ``flywheel.stream.<stream>.<group>`` (``Lake.commit_at``); Delta
  does not check that the recorded position grows, so ``commit_at`` does.
- Messages are acknowledged only after that commit. A restarted consumer first reads its
  pending (delivered, unacknowledged) messages: those at or below the committed position are
  in the lake already and are only acknowledged; the rest are processed again.
- Quarantined rows are written before the raw commit and carry their message id; a message id
  already in quarantine is not written again, so a kill between the two duplicates nothing.
- A message that cannot be a row (unknown or no fields, a value that does not parse as its
  column's type) is poison: quarantined with its message id and the reason, never retried,
  never holding up the messages behind it. A message delivered ``max_deliveries`` times
  without a commit (it crashed the consumer each time) is quarantined as poison too.
- A micro-batch the gate rejects as a whole is parked under ``<home>/rejected/`` (named by its
  positions, so parking it twice writes one file) and its position is committed with no rows:
  the consumer goes on.

One consumer per stream and group writes a table (the positions of two would interleave);
the stream deployment runs one flow run at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from core.contract import DatasetContract, StreamSource, TableSpec, expand
from core.errors import FlywheelError
from core.lake import (
    ConcurrentWriteError,
    Lake,
    StalePositionError,
    arrow_schema,
    read_arrow,
    to_arrow,
)

log = logging.getLogger(__name__)

STREAM_ID = "_flywheel_stream_id"
SEQ_BITS = 20
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
MAX_COMMIT_ATTEMPTS = 20
# Test-only fault injection (the kill tests): "<point>:<batch>" SIGKILLs this process at that
# point of that micro-batch; points: before_commit, after_commit (before the acknowledgement).
FAULT_ENV = "FLYWHEEL_STREAM_FAULT"


class StreamError(FlywheelError):
    """The stream cannot be read or written as asked."""


def position_of(message_id: str) -> int:
    """A Redis stream id ``<ms>-<seq>`` as one integer that orders like the id."""
    ms, _, seq = message_id.partition("-")
    number = int(seq or 0)
    if number >= 1 << SEQ_BITS:
        raise StreamError(f"message id {message_id}: sequence {number} is too large to record as a position")
    return (int(ms) << SEQ_BITS) | number


def id_of(position: int) -> str:
    return f"{position >> SEQ_BITS}-{position & ((1 << SEQ_BITS) - 1)}"


def app_id_for(source: StreamSource) -> str:
    return f"flywheel.stream.{source.stream}.{source.group}"


Message = tuple[str, dict[str, str] | None]


class MessageLog(Protocol):
    """What the consumer needs of a log (Redis Streams here; Kafka or Kinesis could follow)."""

    def ensure_group(self) -> None: ...
    def pending(self, count: int) -> list[Message]: ...
    def new(self, count: int, block_ms: int) -> list[Message]: ...
    def ack(self, ids: list[str]) -> int: ...
    def deliveries(self, ids: list[str]) -> dict[str, int]: ...
    def lag(self) -> int | None: ...
    def range(self, first: str, last: str) -> list[Message]: ...


class RedisStream:
    """A Redis stream read through a consumer group."""

    def __init__(self, source: StreamSource, consumer: str):
        import redis

        self.source, self.consumer = source, consumer
        self.client = redis.Redis.from_url(expand(source.url), decode_responses=True, socket_timeout=30,
                                           health_check_interval=30)

    def ensure_group(self) -> None:
        import redis

        try:
            self.client.xgroup_create(self.source.stream, self.source.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str, count: int, block_ms: int | None) -> list[Message]:
        answer: Any = self.client.xreadgroup(self.source.group, self.consumer, {self.source.stream: start},
                                             count=count, block=block_ms)
        if not answer:
            return []
        return [(mid, fields or None) for mid, fields in answer[0][1]]

    def pending(self, count: int) -> list[Message]:
        """This consumer's delivered, unacknowledged messages (after a restart), oldest first."""
        return self._read("0", count, None)

    def new(self, count: int, block_ms: int) -> list[Message]:
        return self._read(">", count, block_ms)

    def ack(self, ids: list[str]) -> int:
        return int(self.client.xack(self.source.stream, self.source.group, *ids)) if ids else 0

    def deliveries(self, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        entries: Any = self.client.xpending_range(self.source.stream, self.source.group, min=ids[0], max=ids[-1],
                                             count=len(ids) + 100, consumername=self.consumer)
        return {e["message_id"]: int(e["times_delivered"]) for e in entries}

    def range(self, first: str, last: str) -> list[Message]:
        """The messages from ``first`` to ``last`` as stored (to park a rejected batch as sent)."""
        answer: Any = self.client.xrange(self.source.stream, min=first, max=last)
        return [(mid, fields or None) for mid, fields in answer]

    def lag(self) -> int | None:
        groups: Any = self.client.xinfo_groups(self.source.stream)
        for group in groups:
            if group.get("name") == self.source.group:
                lag = group.get("lag")
                return int(lag) if lag is not None else None
        return None


def _fault(point: str, batch: int) -> None:
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted and wanted == f"{point}:{batch}":
        log.warning("fault injection: SIGKILL at %s of micro-batch %d", point, batch)
        os.kill(os.getpid(), signal.SIGKILL)


def decode(messages: list[Message], spec: TableSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Messages -> (rows typed as the contract says, with their message id; poison rows with
    the reason). A message is poison when it has no fields or fields the table does not have,
    or when a value does not parse as its column's type (an empty value is a missing value)."""
    columns = list(spec.columns)
    ids = [mid for mid, _ in messages]
    reasons: dict[int, list[str]] = {}
    records: list[dict[str, str]] = []
    for index, (_, fields) in enumerate(messages):
        if not fields:
            reasons[index] = ["the message has no fields (deleted or empty)"]
            records.append({})
            continue
        unknown = sorted(set(fields) - set(columns))
        if unknown:
            reasons.setdefault(index, []).append(f"fields the table does not have: {unknown[:5]}")
        records.append(fields)
    raw = pd.DataFrame.from_records(records, columns=columns).astype(object)
    raw = raw.where(raw.notna() & (raw != ""), None)
    typed = {}
    for name, column in spec.columns.items():
        values = raw[name]
        present = values.notna().to_numpy()
        if column.type in ("int", "float"):
            parsed = pd.to_numeric(values, errors="coerce")
            bad = present & parsed.isna().to_numpy()
            if column.type == "int":
                whole = parsed.notna().to_numpy() & (np.mod(parsed.fillna(0).to_numpy(float), 1) != 0)
                bad |= whole
                parsed = parsed.where(~whole)
                typed[name] = parsed.astype("Int64") if parsed.isna().any() else parsed.astype("int64")
            else:
                typed[name] = parsed.astype(float)
        elif column.type == "datetime":
            parsed = pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601")
            bad = present & parsed.isna().to_numpy()
            typed[name] = parsed
        elif column.type == "bool":
            parsed = values.map(lambda v: None if v is None else BOOLEANS.get(str(v).strip().lower()))
            bad = present & parsed.isna().to_numpy()
            typed[name] = parsed.astype("boolean")
        else:
            typed[name] = values.astype("string")
            bad = np.zeros(len(values), dtype=bool)
        for at in np.flatnonzero(bad):
            reasons.setdefault(int(at), []).append(f"{name}: {raw[name].iat[at]!r} is not of type {column.type}")
    frame = pd.DataFrame(typed, index=raw.index)
    frame[STREAM_ID] = ids
    poison_at = sorted(reasons)
    poison = raw.iloc[poison_at].copy()
    poison[STREAM_ID] = [ids[i] for i in poison_at]
    poison["reason"] = ["poison message: " + "; ".join(reasons[i]) for i in poison_at]
    good = frame.drop(index=poison_at).reset_index(drop=True)
    return good, poison.reset_index(drop=True)


@dataclass
class Decoded:
    """A micro-batch read and decoded (by the read-ahead process): its message ids in stream
    order, the typed rows and the poison rows, each with its message id."""

    ids: list[str]
    good: pd.DataFrame
    poison: pd.DataFrame

    @classmethod
    def of(cls, messages: list[Message], spec: TableSpec) -> Decoded:
        good, poison = decode(messages, spec)
        return cls([mid for mid, _ in messages], good, poison)

    def only(self, ids: list[str]) -> Decoded:
        """The same batch without the messages not in ``ids`` (decoding is per message)."""
        if len(ids) == len(self.ids):
            return self
        keep = set(ids)
        return Decoded(ids, self.good[self.good[STREAM_ID].isin(keep)].reset_index(drop=True),
                       self.poison[self.poison[STREAM_ID].isin(keep)].reset_index(drop=True))


@dataclass
class BatchOutcome:
    """One micro-batch: messages == accepted + quarantined (poison included) + already held."""

    messages: int
    accepted: int = 0
    quarantined: int = 0
    poison: int = 0
    already_held: int = 0
    rejected: str | None = None
    raw_version: int | None = None
    position: int = 0
    latencies: list[float] = field(default_factory=list)


class StreamWriter:
    """Writes micro-batches of one stream-fed table (see the module docstring)."""

    def __init__(self, lake: Lake, contract: DatasetContract, table: str, shared: str | Path, flow_run_id: str = "",
                 log: MessageLog | None = None):
        import pyarrow as pa

        from core.validation import REASON_COLUMN

        self.lake, self.contract, self.table, self.shared = lake, contract, table, str(shared)
        self.spec = contract.tables[table]
        if not isinstance(self.spec.source, StreamSource):
            raise StreamError(f"table {table!r} of {contract.name!r} is not fed by a stream (its source is "
                              f"{self.spec.source.kind})")
        self.source: StreamSource = self.spec.source
        self.app_id = app_id_for(self.source)
        self.schema = arrow_schema(self.spec, {STREAM_ID: pa.string()})
        self.quarantine_schema = arrow_schema(self.spec, {STREAM_ID: pa.string(), REASON_COLUMN: pa.string(),
                                                          "_flywheel_quarantined_at": pa.timestamp("us", tz="UTC")})
        self.raw_uri = lake.uri("raw", contract.name, table)
        self.quarantine_uri = lake.uri("quarantine", contract.name, table)
        self.flow_run_id = flow_run_id
        self.log = log
        self.batches = 0

    def warm(self) -> None:
        """Import Great Expectations and build its context before the first message is read, so
        the first micro-batch does not wait seconds for it (the gate stays warm after)."""
        from core.validation import validate

        good, _ = decode([], self.spec)
        validate(good.drop(columns=[STREAM_ID]), self.table, self.spec, suite_prefix=f"{self.contract.name}.")

    def committed(self) -> int:
        """The last stream position the raw table holds (0: none)."""
        if not self.lake.exists(self.raw_uri):
            return 0
        return int(self.lake.table(self.raw_uri).transaction_version(self.app_id) or 0)

    def write(self, batch: list[Message] | Decoded, deliveries: dict[str, int] | None = None) -> BatchOutcome:
        """Gate and commit one micro-batch (messages in stream order, or the read-ahead
        process's decoded batch); the caller acknowledges every message of it afterwards."""
        from core.validation import REASON_COLUMN, validate

        self.batches += 1
        messages = batch if isinstance(batch, list) else None
        decoded = batch if isinstance(batch, Decoded) else Decoded.of(batch, self.spec)
        last = position_of(decoded.ids[-1])
        outcome = BatchOutcome(len(decoded.ids), position=last)
        for attempt in range(1, MAX_COMMIT_ATTEMPTS + 1):
            snapshot = self.lake.open_or_create(self.raw_uri, self.schema)
            held = int(snapshot.transaction_version(self.app_id) or 0)
            fresh_ids = [mid for mid in decoded.ids if position_of(mid) > held]
            outcome.already_held = len(decoded.ids) - len(fresh_ids)
            if not fresh_ids:
                return outcome
            fresh = decoded.only(fresh_ids)
            good, poison = fresh.good, fresh.poison
            crashing = [mid for mid, count in (deliveries or {}).items()
                        if count >= self.source.max_deliveries and mid in set(good[STREAM_ID])]
            if crashing:
                moved = good[good[STREAM_ID].isin(crashing)]
                poison = pd.concat([poison, moved.assign(reason=f"poison message: delivered "
                                                         f"{self.source.max_deliveries}+ times without a commit")],
                                   ignore_index=True)
                good = good[~good[STREAM_ID].isin(crashing)].reset_index(drop=True)
            ids = good[STREAM_ID].to_numpy()
            if good.empty:  # every message was poison: nothing for the gate, the position still moves
                from core.validation import ValidationResult

                result = ValidationResult(self.table, 0, good.drop(columns=[STREAM_ID]),
                                          good.drop(columns=[STREAM_ID]).assign(**{REASON_COLUMN: ""}), False)
            else:
                result = validate(good.drop(columns=[STREAM_ID]), self.table, self.spec,
                                  suite_prefix=f"{self.contract.name}.", source=f"stream {self.source.stream}")
            metadata = {"flywheel.source": f"stream {self.source.stream}", "flywheel.stream_group": self.source.group,
                        "flywheel.stream_first_id": fresh_ids[0], "flywheel.stream_last_id": decoded.ids[-1],
                        "flywheel.rows_in": len(fresh_ids), "flywheel.contract_sha256": self.contract.fingerprint(),
                        "flywheel.flow_run_id": self.flow_run_id}
            if result.rejected:
                outcome.rejected = self._park(fresh_ids, messages, result.describe_failures())
                rows = good.iloc[0:0]
                quarantine = poison.rename(columns={"reason": REASON_COLUMN})
            else:
                accepted_at = result.accepted.index.to_numpy()
                rows = result.accepted.assign(**{STREAM_ID: ids[accepted_at]})
                held_back = result.quarantined.assign(**{STREAM_ID: ids[result.quarantined.index.to_numpy()]})
                quarantine = pd.concat([held_back, poison.rename(columns={"reason": REASON_COLUMN})],
                                       ignore_index=True)
            outcome.poison = len(poison)
            outcome.quarantined = len(quarantine)
            outcome.accepted = len(rows)
            if not result.rejected and outcome.accepted + outcome.quarantined != len(fresh_ids):
                raise StreamError(f"{self.table}: {len(fresh_ids)} messages in, {outcome.accepted} accepted + "
                                  f"{outcome.quarantined} quarantined")
            if len(quarantine):
                self._quarantine(quarantine, metadata)
            _fault("before_commit", self.batches)
            try:
                from core.lake import canonical

                data = to_arrow(canonical(rows, self.schema), self.schema)
                metadata.update({"flywheel.rows_accepted": outcome.accepted,
                                 "flywheel.rows_quarantined": outcome.quarantined})
                outcome.raw_version = self.lake.commit_at(snapshot, data, metadata, self.app_id, last)
            except (ConcurrentWriteError, StalePositionError) as exc:
                log.info("%s: %s; reading the table again (attempt %d)", self.table, exc, attempt)
                continue
            _fault("after_commit", self.batches)
            now = time.time()
            sent_ms = np.fromiter((int(mid.partition("-")[0]) for mid in fresh_ids), dtype=np.float64,
                                  count=len(fresh_ids))
            outcome.latencies = (now - sent_ms / 1000).tolist()
            return outcome
        raise StreamError(f"{self.table}: gave up after {MAX_COMMIT_ATTEMPTS} concurrent commits")

    def _quarantine(self, rows: pd.DataFrame, metadata: dict[str, Any]) -> None:
        """Append the quarantined rows whose message id is not in quarantine yet."""
        from core.lake import canonical
        from core.validation import REASON_COLUMN

        snapshot = self.lake.open_or_create(self.quarantine_uri, self.quarantine_schema)
        if snapshot.version() > 0:
            held = set(read_arrow(snapshot, [STREAM_ID]).column(0).to_pylist())
            rows = rows[~rows[STREAM_ID].isin(held)]
        if rows.empty:
            return
        typed = rows.copy()
        for name, column in self.spec.columns.items():
            if column.type == "datetime":  # poison rows hold the text as sent
                typed[name] = pd.to_datetime(typed[name], utc=True, errors="coerce")
            elif column.type in ("int", "float"):
                typed[name] = pd.to_numeric(typed[name], errors="coerce")
        typed["_flywheel_quarantined_at"] = datetime.now(UTC)
        table = to_arrow(canonical(typed, self.quarantine_schema), self.quarantine_schema)
        self.lake.commit(snapshot, table, metadata)
        log.info("%s: %d rows quarantined (%s)", self.table, len(rows), "; ".join(
            sorted(set(rows[REASON_COLUMN].astype(str).str.slice(0, 80)))[:3]))

    def _park(self, ids: list[str], messages: list[Message] | None, why: str) -> str:
        """Write the batch's messages as sent under ``<shared root>/rejected/`` (read again from
        the log when the batch came decoded from the read-ahead process). Named by its first and
        last message ids, so parking it twice writes one file."""
        from core import storage

        uri = storage.join(self.shared, "rejected", self.contract.name, self.table, f"stream-{ids[0]}-{ids[-1]}.jsonl")
        if not storage.exists(uri):
            if messages is None:
                if self.log is None:
                    raise StreamError(f"{self.table}: cannot park a decoded batch without its message log")
                messages = self.log.range(ids[0], ids[-1])
            wanted = set(ids)
            lines = [json.dumps({"rejected": why})]
            lines += [json.dumps({"id": mid, "fields": fields}) for mid, fields in messages if mid in wanted]
            storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
        log.error("%s: micro-batch %s..%s rejected by the gate (%s); parked at %s", self.table, ids[0], ids[-1],
                  why, uri)
        return uri


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so a consumer killed
    mid-batch leaves no reader taking messages from its successor."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _read_ahead(source: StreamSource, consumer: str, spec: TableSpec, out: Any, stop: Any, wanted: Any,
                ready: Any, parent: int) -> None:
    """The read-ahead process: read new messages into a micro-batch and hand it over, decoded,
    as soon as the consumer asks for one (``wanted``) or it has ``batch_rows`` messages. While
    the consumer is busy the batch grows, so a message waits for the consumer, not for a timer,
    and under a backlog full batches are read ahead. A string in ``out`` is an error."""
    _die_with_parent(parent)
    import queue as queue_module

    def hand_over(item: Decoded) -> bool:
        while True:  # a full queue: the consumer is busy; messages read stay pending for it
            try:
                out.put(item, timeout=0.5)
                return True
            except queue_module.Full:
                if os.getppid() != parent:
                    return False

    try:
        stream = RedisStream(source, consumer)
        stream.client.ping()
        ready.set()
        batch: list[Message] = []
        while not stop.is_set():
            if len(batch) < source.batch_rows:
                # Block for the first message; after it, only look for what else is there.
                block_ms = source.max_wait_ms if not batch else 5
                batch.extend(stream.new(source.batch_rows - len(batch), block_ms))
            if not batch or not (wanted.is_set() or len(batch) >= source.batch_rows):
                continue
            if not hand_over(Decoded.of(batch, spec)):
                return
            batch = []
        if batch:  # stopping: what it read goes to the consumer, not back to waiting
            hand_over(Decoded.of(batch, spec))
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        import traceback

        out.put(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


class ReadAhead:
    """Reads and decodes the next micro-batch in another process while this one gates and
    commits the last: on 2 cores the two halves take about as long each, and Python's GIL
    would serialise them in one process.

    The reader takes messages with XREADGROUP under the consumer's own name, so a message it
    read is pending for the consumer like any other: if either process dies, the restarted
    consumer finds it among its pending messages. At most one decoded batch waits.
    """

    def __init__(self, source: StreamSource, consumer: str, spec: TableSpec):
        import multiprocessing

        # spawn: the flow's process has threads (Prefect's), and fork would copy their locks
        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue(maxsize=1)
        self.stop_event = context.Event()
        self.wanted = context.Event()
        self.ready = context.Event()
        self.process = context.Process(target=_read_ahead, name="flywheel-stream-reader", daemon=True,
                                       args=(source, consumer, spec, self.queue, self.stop_event, self.wanted,
                                             self.ready, os.getpid()))
        self.wait_s = max(source.max_wait_ms / 1000, 0.05)

    def start(self, timeout_s: float = 120.0) -> ReadAhead:
        """Start the reader and wait until it is connected (a new process imports for seconds)."""
        self.process.start()
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if not self.process.is_alive() or time.monotonic() > deadline:
                problem = self.next_error()
                self.close()
                raise StreamError(f"the stream reader process did not start{': ' + problem if problem else ''}")
        return self

    def next_error(self) -> str | None:
        import queue as queue_module

        try:
            item = self.queue.get(timeout=0.5)
        except queue_module.Empty:
            return None
        return item if isinstance(item, str) else None

    def next(self) -> Decoded | None:
        """The next decoded batch, or None when nothing came within ``max_wait_ms``."""
        import queue as queue_module

        self.wanted.set()
        try:
            item = self.queue.get(timeout=self.wait_s + 0.05)
        except queue_module.Empty:
            if not self.process.is_alive():
                raise StreamError(f"the stream reader process stopped (exit code {self.process.exitcode})") from None
            return None
        finally:
            self.wanted.clear()
        if isinstance(item, str):
            raise StreamError(f"the stream reader failed: {item}")
        return item

    def close(self) -> list[Decoded]:
        """Stop reading; returns the batches read but not yet taken (write them, or leave them
        pending for the next run)."""
        import queue as queue_module

        self.wanted.set()  # hand over what it holds
        self.stop_event.set()
        left: list[Decoded] = []
        deadline = time.monotonic() + max(5.0, self.wait_s * 4)
        while self.process.is_alive() and time.monotonic() < deadline:
            try:
                item = self.queue.get(timeout=0.2)
            except queue_module.Empty:
                continue
            if isinstance(item, Decoded):
                left.append(item)
        while True:
            try:
                item = self.queue.get_nowait()
            except queue_module.Empty:
                break
            if isinstance(item, Decoded):
                left.append(item)
        self.process.join(timeout=1)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return left


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values), q))


def publish(url: str, stream: str, rows: pd.DataFrame, chunk: int = 2000) -> list[str]:
    """XADD each row as one message (its fields as text; a missing value as an empty field),
    pipelined by ``chunk``; returns the message ids in order."""
    import redis

    client = redis.Redis.from_url(expand(url), decode_responses=True)
    text = rows.astype(object).where(rows.notna(), "")
    for name in text.columns:
        if pd.api.types.is_datetime64_any_dtype(rows[name]):
            text[name] = [v.isoformat() if v != "" else "" for v in text[name]]
    records = text.astype(str).to_dict("records")
    ids: list[str] = []
    for start in range(0, len(records), chunk):
        pipe = client.pipeline(transaction=False)
        for record in records[start:start + chunk]:
            pipe.xadd(stream, record)
        ids.extend(pipe.execute())
    return ids


def stream_table(contract: DatasetContract, asked: str | None) -> str:
    """The stream-fed table a consumer reads: the one asked, else the contract's only one."""
    streamed = [t for t, spec in contract.tables.items() if spec.source.kind == "stream"]
    if not streamed:
        raise ValueError(f"dataset {contract.name!r} has no stream-fed table (source kind: stream)")
    if asked is None and len(streamed) > 1:
        raise ValueError(f"dataset {contract.name!r} has several stream-fed tables {streamed}: name one with --table")
    return asked or streamed[0]


@dataclass
class Totals:
    messages: int = 0
    accepted: int = 0
    quarantined: int = 0
    poison: int = 0
    already_held: int = 0
    batches: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)
    last_message_at: float = field(default_factory=time.monotonic)

    def add(self, outcome: Any) -> None:
        self.messages += outcome.messages
        self.accepted += outcome.accepted
        self.quarantined += outcome.quarantined
        self.poison += outcome.poison
        self.already_held += outcome.already_held
        self.batches += 1
        self.rejected += bool(outcome.rejected)
        self.latencies.extend(outcome.latencies)


class Metrics:
    """The consumer's Prometheus metrics, pushed to the Pushgateway when one is configured."""

    def __init__(self, table: str, pushgateway: str | None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.table, self.pushgateway, self.pushed_at = table, pushgateway, 0.0
        self.messages = Counter("flywheel_stream_messages", "Stream messages by outcome", ["table", "outcome"],
                                registry=self.registry)
        self.batches = Counter("flywheel_stream_batches", "Micro-batches committed", ["table", "result"],
                               registry=self.registry)
        self.lag = Gauge("flywheel_stream_lag_messages", "Messages in the stream not yet delivered to the group",
                         ["table"], registry=self.registry)
        self.position = Gauge("flywheel_stream_committed_position_ms", "Committed position (message time, ms)",
                              ["table"], registry=self.registry)
        self.latency = Histogram("flywheel_stream_latency_seconds", "XADD to readable in the Delta table",
                                 ["table"], buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60), registry=self.registry)

    def record(self, outcome: Any) -> None:
        table = self.table
        self.messages.labels(table, "accepted").inc(outcome.accepted)
        self.messages.labels(table, "quarantined").inc(outcome.quarantined - outcome.poison)
        self.messages.labels(table, "poison").inc(outcome.poison)
        self.messages.labels(table, "already_held").inc(outcome.already_held)
        self.batches.labels(table, "rejected" if outcome.rejected else "committed").inc()
        self.position.labels(table).set(outcome.position >> 20)
        for seconds in outcome.latencies:
            self.latency.labels(table).observe(seconds)

    def push(self, lag: int | None, force: bool = False) -> None:
        if lag is not None:
            self.lag.labels(self.table).set(lag)
        if not self.pushgateway or (not force and time.monotonic() - self.pushed_at < 5):
            return
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(self.pushgateway, job="flywheel_stream", registry=self.registry,
                            grouping_key={"table": self.table})
        except Exception as exc:  # noqa: BLE001 - monitoring must not stop the consumer
            log.warning("could not push stream metrics to %s: %s", self.pushgateway, exc)
        self.pushed_at = time.monotonic()
