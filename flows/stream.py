"""``python -m flows.stream``: consume a stream-fed table's live log into its raw Delta table,
through the same gate as batch ingest, exactly once (``core/stream.py`` says how).

    python -m flows.stream --dataset flights_live                 # runs until stopped
    python -m flows.stream --dataset flights_live --until-idle-s 5  # drain, then stop

It runs as one long flow run (the ``stream`` deployment): a consumer that stops for a new
flow run every minute would leave messages waiting seconds for the next process to start, and
the latency goal is one second. Its work shows as one task run per window (``--window-s``)
with the window's counts; progress and lag go to the log every 10 s, and to the Pushgateway
(``monitor.pushgateway``) as metrics: messages by outcome, micro-batches, lag, end-to-end
latency (XADD to readable in Delta), committed position.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.settings import get_settings
from flows._runtime import lake_for, main, run_started


class StreamParams(BaseModel):
    """Consume a stream into its raw Delta table through the validation gate, exactly once."""

    dataset: str = Field("flights_live", description="Dataset contract with a stream-fed table.")
    table: str | None = Field(None, description="The stream-fed table (default: the contract's only one).")
    consumer: str = Field("flywheel", description="Consumer name in the group (keep it stable across restarts: "
                          "a restarted consumer finishes its own pending messages).")
    until_idle_s: float | None = Field(None, gt=0, description="Stop after this long with no message (default: "
                                       "run until stopped).")
    max_runtime_s: float | None = Field(None, gt=0, description="Stop after this long in all.")
    window_s: float = Field(60.0, gt=0, description="Seconds of consuming per task run.")


class StreamResult(BaseModel):
    table: str
    messages: int
    accepted: int
    quarantined: int
    poison: int
    already_held: int
    batches: int
    rejected_batches: int
    committed_position: str
    latency_p50_s: float | None
    latency_p99_s: float | None


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
            get_run_logger().warning("could not push stream metrics to %s: %s", self.pushgateway, exc)
        self.pushed_at = time.monotonic()


def _settle(writer: Any, log: Any, metrics: Metrics, totals: Totals, batch: Any) -> None:
    outcome = writer.write(batch)
    log.ack(batch.ids)
    totals.add(outcome)
    totals.last_message_at = time.monotonic()
    metrics.record(outcome)


def _consume(writer: Any, log: Any, reader: Any, metrics: Metrics, totals: Totals, seconds: float,
             deadline: float | None, until_idle_s: float | None) -> dict[str, Any]:
    """Micro-batches for ``seconds``; returns the window's counts and whether to stop."""
    from core.stream import percentile

    logger = get_run_logger()
    started = time.monotonic()
    before = (totals.messages, totals.accepted, totals.quarantined)
    reported = started
    stop = False
    while time.monotonic() - started < seconds:
        batch = reader.next()
        now = time.monotonic()
        if batch is not None:
            _settle(writer, log, metrics, totals, batch)
        lag = None
        if now - reported >= 10:
            lag = log.lag()
            recent = totals.latencies[-20000:]
            logger.info("%s messages in all (%.0f/s this window), %s quarantined, lag %s, latency p50 %.2f s "
                        "p99 %.2f s", f"{totals.messages:,}", (totals.messages - before[0]) / max(now - started, 1e-9),
                        f"{totals.quarantined:,}", lag, percentile(recent, 50), percentile(recent, 99))
            reported = now
        metrics.push(lag)
        if until_idle_s is not None and now - totals.last_message_at >= until_idle_s:
            stop = True
            break
        if deadline is not None and now >= deadline:
            stop = True
            break
    return {"messages": totals.messages - before[0], "accepted": totals.accepted - before[1],
            "quarantined": totals.quarantined - before[2], "stop": stop}


consume_task = task(name="consume", cache_policy=NO_CACHE, task_run_name="consume {seconds:.0f} s")(_consume)


@flow(name="stream", log_prints=True)
def stream(params: StreamParams = StreamParams()) -> StreamResult:
    """Recover pending messages, then consume micro-batches window by window."""
    from prefect.runtime import flow_run

    from core.stream import ReadAhead, RedisStream, StreamWriter, id_of, percentile

    run_started()
    logger = get_run_logger()
    settings = get_settings()
    contract = load_contract(params.dataset)
    streamed = [t for t, spec in contract.tables.items() if spec.source.kind == "stream"]
    if not streamed:
        raise ValueError(f"dataset {contract.name!r} has no stream-fed table (source kind: stream)")
    table = params.table or streamed[0]
    if params.table is None and len(streamed) > 1:
        raise ValueError(f"dataset {contract.name!r} has several stream-fed tables {streamed}: name one with --table")
    writer = StreamWriter(lake_for(settings), contract, table, settings.shared, str(flow_run.get_id() or ""))
    log = writer.log = RedisStream(writer.source, params.consumer)
    log.ensure_group()
    metrics = Metrics(table, settings.monitor.pushgateway)
    totals = Totals()
    writer.warm()

    # A restarted consumer first settles what it had been given and not acknowledged.
    committed = writer.committed()
    while pending := log.pending(writer.source.batch_rows):
        from core.stream import position_of

        held = [mid for mid, _ in pending if position_of(mid) <= committed]
        rest = [m for m in pending if position_of(m[0]) > committed]
        if held:
            log.ack(held)
            logger.info("acknowledged %d pending messages the lake already holds (up to %s)", len(held), held[-1])
        if rest:
            outcome = writer.write(rest, log.deliveries([mid for mid, _ in rest]))
            log.ack([mid for mid, _ in rest])
            totals.add(outcome)
            metrics.record(outcome)
            logger.info("recovered %d pending messages: %d accepted, %d quarantined", len(rest), outcome.accepted,
                        outcome.quarantined)
        committed = writer.committed()
    logger.info("consuming %s (group %s) into %s from position %s", writer.source.stream, writer.source.group,
                writer.raw_uri, id_of(committed))

    # New messages are read and decoded by a second process while this one gates and commits.
    reader = ReadAhead(writer.source, params.consumer, writer.spec).start()
    totals.last_message_at = time.monotonic()  # the idle clock starts with the reader
    deadline = time.monotonic() + params.max_runtime_s if params.max_runtime_s else None
    try:
        while True:
            window = consume_task(writer, log, reader, metrics, totals, params.window_s, deadline,
                                  params.until_idle_s)
            if window["stop"]:
                break
    except BaseException:
        reader.close()  # what it read stays pending for the next run
        raise
    for batch in reader.close():  # read before the stop: write them rather than leave them pending
        _settle(writer, log, metrics, totals, batch)
    metrics.push(log.lag(), force=True)
    return StreamResult(table=table, messages=totals.messages, accepted=totals.accepted,
                        quarantined=totals.quarantined, poison=totals.poison, already_held=totals.already_held,
                        batches=totals.batches, rejected_batches=totals.rejected,
                        committed_position=id_of(writer.committed()),
                        latency_p50_s=percentile(totals.latencies, 50) if totals.latencies else None,
                        latency_p99_s=percentile(totals.latencies, 99) if totals.latencies else None)


def report(result: StreamResult) -> None:
    print(f"{result.table}: {result.messages:,} messages in {result.batches} micro-batches: {result.accepted:,} "
          f"accepted, {result.quarantined:,} quarantined ({result.poison} poison), {result.already_held} already "
          f"in the lake; {result.rejected_batches} batches rejected; committed up to {result.committed_position}")
    if result.latency_p50_s is not None:
        print(f"latency XADD -> Delta: p50 {result.latency_p50_s:.2f} s, p99 {result.latency_p99_s:.2f} s")


if __name__ == "__main__":
    sys.exit(main(stream, StreamParams, sys.argv[1:], "python -m flows.stream", report))
