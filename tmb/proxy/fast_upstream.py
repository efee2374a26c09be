"""The fast engine's side towards the workers: keep-alive connections, one exchange at a time each.

A :class:`FastUpstream` is an ``asyncio.Protocol`` on one TCP connection to a worker. While it serves an
exchange, its ``owner`` (the client connection, :class:`tmb.proxy.fast.FastConnection`) receives every
event: response bytes (fed to an ``httptools`` response parser whose callbacks are the owner's), the loss
of the connection, and write back-pressure (which pauses reading from the client). Between exchanges it
waits in its worker's ``idle`` list (most recently used last); bytes arriving on an idle connection, or
its loss, simply close and drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tmb.proxy.upstream import Worker


class Owner(Protocol):
    """What an upstream connection reports to while it serves an exchange."""

    def pause_client(self, pause: bool) -> None: ...

    def up_data(self, data: bytes) -> None: ...

    def up_lost(self, conn: FastUpstream, exc: Exception | None) -> None: ...


class FastUpstream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a worker."""

    __slots__ = ("closed", "owner", "reused", "transport", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.owner: Owner | None = None
        self.reused = False  # served an exchange before (a stale keep-alive may die on reuse)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # nothing was asked: a worker talking out of turn is not reused
            self.close()
            return
        owner.up_data(data)

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.up_lost(self, exc)
        else:
            with contextlib.suppress(ValueError):
                self.worker.idle.remove(self)

    def pause_writing(self) -> None:  # the worker reads the request body slower than the client sends it
        if self.owner is not None:
            self.owner.pause_client(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_client(False)

    def release(self, keep_alive: bool) -> None:
        """The exchange is over: back to the worker's idle list, or closed."""
        self.owner = None
        if keep_alive and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.reused = True
            self.transport.resume_reading()
            self.worker.idle.append(self)
        else:
            self.close()

    def close(self) -> None:
        self.owner = None
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (the worker sees its request cancelled)."""
        self.owner = None
        if self.transport is not None and not self.closed:
            self.transport.abort()


def take_idle(worker: Worker) -> FastUpstream | None:
    """The most recently used idle connection to ``worker`` still open, or None."""
    idle = worker.idle
    while idle:
        conn = idle.pop()
        if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
            return conn
    return None


async def connect(worker: Worker, timeout_s: float) -> FastUpstream:
    """A new connection to ``worker`` (raises ``OSError`` or ``TimeoutError``)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, conn = await loop.create_connection(lambda: FastUpstream(worker), worker.host, worker.port)
    return conn
