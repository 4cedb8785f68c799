"""Prefect tasks of the stream flow, around ``core.stream`` (the exactly-once consumer): open
the consumer, settle what a restarted one had been given, consume window by window."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.contract import DatasetContract
from core.lake import Lake
from core.stream import (
    Metrics,
    RedisStream,
    StreamWriter,
    Totals,
    id_of,
    percentile,
    position_of,
    stream_table,
)

# The flow takes these from here (flows import tasks and core only).
__all__ = ["stream_table"]


@dataclass
class Consumer:
    """One consumer of a stream-fed table: its writer (gate and lake), its group's log, its
    metrics and running totals."""

    writer: StreamWriter
    log: RedisStream
    metrics: Metrics
    totals: Totals

    def result(self) -> dict[str, Any]:
        t = self.totals
        return {"messages": t.messages, "accepted": t.accepted, "quarantined": t.quarantined, "poison": t.poison,
                "already_held": t.already_held, "batches": t.batches, "rejected_batches": t.rejected,
                "committed_position": id_of(self.writer.committed()),
                "latency_p50_s": percentile(t.latencies, 50) if t.latencies else None,
                "latency_p99_s": percentile(t.latencies, 99) if t.latencies else None}


def open_consumer(lake: Lake, contract: DatasetContract, table: str, shared: str, consumer: str, run_id: str,
                  pushgateway: str | None) -> Consumer:
    writer = StreamWriter(lake, contract, table, shared, run_id)
    log = writer.log = RedisStream(writer.source, consumer)
    log.ensure_group()
    writer.warm()
    return Consumer(writer, log, Metrics(table, pushgateway), Totals())


def recover(c: Consumer) -> str:
    """A restarted consumer first settles what it had been given and not acknowledged: what
    the lake already holds is acknowledged, the rest written. Returns the position it goes on from."""
    logger = logging.getLogger(__name__)
    writer, log = c.writer, c.log
    committed = writer.committed()
    while pending := log.pending(writer.source.batch_rows):
        held = [mid for mid, _ in pending if position_of(mid) <= committed]
        rest = [m for m in pending if position_of(m[0]) > committed]
        if held:
            log.ack(held)
            logger.info("acknowledged %d pending messages the lake already holds (up to %s)", len(held), held[-1])
        if rest:
            outcome = writer.write(rest, log.deliveries([mid for mid, _ in rest]))
            log.ack([mid for mid, _ in rest])
            c.totals.add(outcome)
            c.metrics.record(outcome)
            logger.info("recovered %d pending messages: %d accepted, %d quarantined", len(rest), outcome.accepted,
                        outcome.quarantined)
        committed = writer.committed()
    logger.info("consuming %s (group %s) into %s from position %s", writer.source.stream, writer.source.group,
                writer.raw_uri, id_of(committed))
    return id_of(committed)


def settle(c: Consumer, batch: Any) -> None:
    """Write one micro-batch through the gate, then acknowledge it."""
    outcome = c.writer.write(batch)
    c.log.ack(batch.ids)
    c.totals.add(outcome)
    c.totals.last_message_at = time.monotonic()
    c.metrics.record(outcome)


def consume(c: Consumer, reader: Any, seconds: float, deadline: float | None,
            until_idle_s: float | None) -> dict[str, Any]:
    """Micro-batches for ``seconds``; returns the window's counts and whether to stop."""
    log, metrics, totals = c.log, c.metrics, c.totals
    logger = logging.getLogger(__name__)
    started = time.monotonic()
    before = (totals.messages, totals.accepted, totals.quarantined)
    reported = started
    stop = False
    while time.monotonic() - started < seconds:
        batch = reader.next()
        now = time.monotonic()
        if batch is not None:
            settle(c, batch)
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




def finish(c: Consumer, reader: Any) -> None:
    """What the reader read before the stop is written rather than left pending; the final
    metrics are pushed."""
    for batch in reader.close():
        settle(c, batch)
    c.metrics.push(c.log.lag(), force=True)


open_task = task(name="open consumer", cache_policy=NO_CACHE)(open_consumer)
recover_task = task(name="recover pending", cache_policy=NO_CACHE)(recover)
consume_task = task(name="consume", cache_policy=NO_CACHE, task_run_name="consume {seconds:.0f} s")(consume)
finish_task = task(name="finish", cache_policy=NO_CACHE)(finish)
