"""Adaptive batching of model calls: while one batch is being scored, requests queue; the next
batch takes everything queued (up to ``max_batch_size``). Under light load a request is scored
at once (no fixed wait); under heavy load batches grow with the queue, so the model is called
fewer times for the same rows. Records are validated before they are queued, so one bad record
never fails another client's request in the same batch.

Each key (a model version) has its own lane, a queue and a loop: a slow or failing challenger
never holds up the champion's batches, so a rollout's analysis sees each model's own latency.
A lane left idle by a reload is closed when a new key arrives.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Item:
    key: Any  # what may be scored together (e.g. the model version)
    rows: list[Any]
    future: asyncio.Future


@dataclass
class _Lane:
    key: Any  # held, so its id is not reused while the lane lives
    queue: asyncio.Queue[_Item]
    worker: asyncio.Task | None = None
    busy: bool = False


class Batcher:
    """``await batcher.submit(key, rows)`` -> the results for ``rows`` from one call of
    ``score(key, all_rows)`` shared with whatever else was queued under the same key."""

    MAX_IDLE_LANES = 4

    def __init__(self, score: Callable[[Any, list[Any]], list[Any]], max_batch_size: int = 256,
                 on_batch: Callable[[Any, int], None] | None = None):
        self.score, self.max_batch_size, self.on_batch = score, max_batch_size, on_batch
        self._lanes: dict[int, _Lane] = {}

    def _ensure(self, key: Any) -> asyncio.Queue[_Item]:
        lane = self._lanes.get(id(key))
        if lane is None or lane.worker is None or lane.worker.done():
            if len(self._lanes) >= self.MAX_IDLE_LANES:  # a reload left lanes of models no longer served
                for stale_id, stale in list(self._lanes.items()):
                    if stale.key is not key and not stale.busy and stale.queue.empty():
                        if stale.worker is not None:
                            stale.worker.cancel()
                        del self._lanes[stale_id]
            lane = _Lane(key, asyncio.Queue())
            lane.worker = asyncio.get_running_loop().create_task(self._run(lane))
            self._lanes[id(key)] = lane
        return lane.queue

    async def submit(self, key: Any, rows: list[Any]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        self._ensure(key).put_nowait(_Item(key, rows, future))
        return await future

    async def _run(self, lane: _Lane) -> None:
        queue = lane.queue
        waiting: deque[_Item] = deque()  # taken from the queue, not yet batched (oldest first)
        while True:
            lane.busy = bool(waiting)
            if not waiting:
                waiting.append(await queue.get())
            lane.busy = True
            while not queue.empty():
                waiting.append(queue.get_nowait())
            # The oldest request's key decides; take every waiting item of that key, in order,
            # up to the batch size. Items of other keys stay first in line for the next batch.
            key = waiting[0].key
            items: list[_Item] = []
            size = 0
            for item in list(waiting):
                if item.key == key and (not items or size + len(item.rows) <= self.max_batch_size):
                    items.append(item)
                    size += len(item.rows)
                    waiting.remove(item)
                if size >= self.max_batch_size:
                    break
            rows = [row for item in items for row in item.rows]
            try:
                results = await asyncio.to_thread(self.score, key, rows)
            except Exception as exc:  # noqa: BLE001 - handed to the request(s) that caused it
                if len(items) == 1:
                    if not items[0].future.done():
                        items[0].future.set_exception(exc)
                    continue
                # Something in the batch failed the model call: score each request alone, so
                # only the one that fails gets the error.
                for item in items:
                    try:
                        alone = await asyncio.to_thread(self.score, key, item.rows)
                    except Exception as single:  # noqa: BLE001
                        if not item.future.done():
                            item.future.set_exception(single)
                    else:
                        if not item.future.done():
                            item.future.set_result(alone)
                continue
            if self.on_batch:
                self.on_batch(key, len(rows))
            start = 0
            for item in items:
                if not item.future.done():
                    item.future.set_result(results[start:start + len(item.rows)])
                start += len(item.rows)
