"""Adaptive batching of model calls: while one batch is being scored, requests queue; the next
batch takes everything queued (up to ``max_batch_size``). Under light load a request is scored
at once (no fixed wait); under heavy load batches grow with the queue, so the model is called
fewer times for the same rows. Records are validated before they are queued, so one bad record
never fails another client's request in the same batch.
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


class Batcher:
    """``await batcher.submit(key, rows)`` -> the results for ``rows`` from one call of
    ``score(key, all_rows)`` shared with whatever else was queued under the same key."""

    def __init__(self, score: Callable[[Any, list[Any]], list[Any]], max_batch_size: int = 256,
                 on_batch: Callable[[Any, int], None] | None = None):
        self.score, self.max_batch_size, self.on_batch = score, max_batch_size, on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None

    def _ensure(self) -> asyncio.Queue[_Item]:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(self._queue))
        return self._queue

    async def submit(self, key: Any, rows: list[Any]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        self._ensure().put_nowait(_Item(key, rows, future))
        return await future

    async def _run(self, queue: asyncio.Queue[_Item]) -> None:
        waiting: deque[_Item] = deque()  # taken from the queue, not yet batched (oldest first)
        while True:
            if not waiting:
                waiting.append(await queue.get())
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
