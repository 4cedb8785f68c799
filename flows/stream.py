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

from prefect import flow
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


@flow(name="stream", log_prints=True)
def stream(params: StreamParams = StreamParams()) -> StreamResult:
    """Wires: the consumer -> the pending messages a restarted one had (settled first) -> one
    task run per window of micro-batches until stopped or idle -> what was read, written."""
    from prefect.runtime import flow_run

    from core.stream import ReadAhead
    from tasks import stream as t

    run_started()
    settings = get_settings()
    contract = load_contract(params.dataset)
    table = t.stream_table(contract, params.table)
    consumer = t.open_task(lake_for(settings), contract, table, settings.shared, params.consumer,
                           str(flow_run.get_id() or ""), settings.monitor.pushgateway)
    t.recover_task(consumer)
    # New messages are read and decoded by a second process while this one gates and commits.
    reader = ReadAhead(consumer.writer.source, params.consumer, consumer.writer.spec).start()
    consumer.totals.last_message_at = time.monotonic()  # the idle clock starts with the reader
    deadline = time.monotonic() + params.max_runtime_s if params.max_runtime_s else None
    try:
        while not t.consume_task(consumer, reader, params.window_s, deadline, params.until_idle_s)["stop"]:
            pass
    except BaseException:
        reader.close()  # what it read stays pending for the next run
        raise
    t.finish_task(consumer, reader)
    return StreamResult(table=table, **consumer.result())


def report(result: StreamResult) -> None:
    print(f"{result.table}: {result.messages:,} messages in {result.batches} micro-batches: {result.accepted:,} "
          f"accepted, {result.quarantined:,} quarantined ({result.poison} poison), {result.already_held} already "
          f"in the lake; {result.rejected_batches} batches rejected; committed up to {result.committed_position}")
    if result.latency_p50_s is not None:
        print(f"latency XADD -> Delta: p50 {result.latency_p50_s:.2f} s, p99 {result.latency_p99_s:.2f} s")


if __name__ == "__main__":
    sys.exit(main(stream, StreamParams, sys.argv[1:], "python -m flows.stream", report))
