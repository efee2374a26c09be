"""Per-node wake-ups: the ingest notifies when a verified quote attests new batches of a node, and a waiter
(the verdict engine) sleeps until then instead of polling.

A waiter reads :meth:`Wakeups.generation` *before* it looks at the evidence and passes it to
:meth:`Wakeups.wait`, which returns at once when a notification came in between (none is lost).
:meth:`Wakeups.notify` may be called from any thread (the ingest's checks run in worker threads, and
another daemon's notifications arrive on the store's listening thread).
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["Wakeups"]


class Wakeups:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def generation(self, node: str) -> int:
        """How many notifications ``node`` has had (a token for :meth:`wait`)."""
        with self._lock:
            return self._generation.get(node, 0)

    def notify(self, node: str) -> None:
        """Wake every waiter on ``node``."""
        with self._lock:
            self._generation[node] = self._generation.get(node, 0) + 1
            waiters = self._waiters.pop(node, [])
        for loop, event in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def notify_all(self) -> None:
        """Wake every waiter on every node (notifications may have been lost: everyone looks again)."""
        with self._lock:
            for node in self._waiters:
                self._generation[node] = self._generation.get(node, 0) + 1
            waiting, self._waiters = self._waiters, {}
        for waiters in waiting.values():
            for loop, event in waiters:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(event.set)

    async def wait(self, node: str, since: int, timeout_s: float) -> bool:
        """Until ``node`` is notified after generation ``since`` (True) or ``timeout_s`` passes (False)."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._generation.get(node, 0) != since:
                return True
            self._waiters.setdefault(node, []).append(entry)
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                waiting = self._waiters.get(node, [])
                if entry in waiting:
                    waiting.remove(entry)
                if not waiting:
                    self._waiters.pop(node, None)
