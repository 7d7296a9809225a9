"""Wake-ups from writer threads (dispatcher, trainers, API) to SSE streams on the event loop."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager, suppress


class ChangeFeed:
    """`notify()` from any thread sets the event of every open subscription.

    It carries no data: a woken stream re-reads the store, so a stream served by one
    process also sees jobs run by another (it then relies on its poll timeout).
    """

    def __init__(self) -> None:
        self._subs: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            subs = list(self._subs)
        for loop, event in subs:
            with suppress(RuntimeError):  # a closed loop: its subscription is going away
                loop.call_soon_threadsafe(event.set)

    @contextmanager
    def subscribe(self):
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._subs.add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._subs.discard(entry)
