"""Wake-ups from writer threads (dispatcher, trainers, API) to SSE streams on the event loop."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager


class ChangeFeed:
    """`notify()` from any thread sets the event of every open subscription.

    It carries no data: a woken stream re-reads the store, so a stream served by one
    process also sees jobs run by another (it then relies on its poll timeout).

    Writes can come much faster than streams read (every submission, every training step):
    each event loop has at most one wake-up in flight, which sets all its subscriptions'
    events, however many writes happened before it ran.
    """

    def __init__(self) -> None:
        self._subs: dict[asyncio.AbstractEventLoop, set[asyncio.Event]] = {}
        self._pending: set[asyncio.AbstractEventLoop] = set()
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            loops = [loop for loop in self._subs if loop not in self._pending]
            self._pending.update(loops)
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._wake, loop)
            except RuntimeError:  # a closed loop: its subscriptions are going away
                with self._lock:
                    self._pending.discard(loop)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._pending.discard(loop)
            events = list(self._subs.get(loop, ()))
        for event in events:
            event.set()

    @contextmanager
    def subscribe(self):
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            self._subs.setdefault(loop, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._subs.get(loop)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._subs[loop]
