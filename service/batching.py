"""Group commit: calls that arrive while a batch is being written go into the next batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Awaitable single calls of a batch function `write(items) -> results` (one result per
    item, in order), which runs on a thread of its own. The items that arrive while it
    writes go into its next call together: for a store, one transaction, one thread hop
    and one turn of its lock for a whole burst. (SQLite takes one writer at a time anyway,
    and this hop costs a third of one through FastAPI's shared thread pool.)

    Each event loop has its own queue and writer task (a TestClient may run one per
    request). An exception of `write` is the answer of every item of its batch."""

    def __init__(self, write: Callable[[list[Item]], list[Result]], name: str = "commit"):
        self._write_batch = write
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}  # loop -> [(item, future)]
        self._writers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.setdefault(loop, []).append((item, future))
        if loop not in self._writers:
            self._writers[loop] = loop.create_task(self._write(loop))
        return await future

    async def _write(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while batch := self._pending.pop(loop, None):
                items = [item for item, _ in batch]
                try:
                    results = await loop.run_in_executor(self._thread, self._write_batch, items)
                except Exception as err:
                    results = [err] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the caller went away; its item is written all the same
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            del self._writers[loop]
