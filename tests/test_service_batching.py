"""GroupCommit (service/batching.py): what arrives while a batch is written goes into the next."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import GroupCommit


def test_items_that_arrive_during_a_write_share_the_next_batch():
    started, release = threading.Event(), threading.Event()
    batches = []

    def write(items):
        batches.append(list(items))
        if len(batches) == 1:  # hold the first batch until the others have queued
            started.set()
            release.wait(10)
        return [item * 10 for item in items]

    commit = GroupCommit(write)

    async def main():
        first = asyncio.create_task(commit(1))
        await asyncio.to_thread(started.wait, 10)
        # Scheduled now, so they queue before the writer can wake up from the first batch.
        rest = [asyncio.create_task(commit(i)) for i in (2, 3, 4)]
        release.set()
        return await first, await asyncio.gather(*rest)

    assert asyncio.run(main()) == (10, [20, 30, 40])
    assert batches == [[1], [2, 3, 4]]


def test_a_failed_write_is_the_answer_of_every_item_in_its_batch():
    def write(items):
        raise RuntimeError(f"disk full for {len(items)}")

    commit = GroupCommit(write)

    async def main():
        return await asyncio.gather(commit(1), commit(2), return_exceptions=True)

    results = asyncio.run(main())
    assert [str(r) for r in results] == ["disk full for 2", "disk full for 2"]
    with pytest.raises(RuntimeError):
        asyncio.run(commit(3))  # a new event loop gets a writer of its own
