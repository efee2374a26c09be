"""The fast engine (``[proxy] engine = "fast"``): an HTTP/1.1 relay written as asyncio protocols.

Same contract as :mod:`tmb.proxy.app` (request ids, hop-by-hop headers, spans, failover, 413/502/503/504,
store ack), at a fraction of the CPU: no task, coroutine, request or response object per request; request
heads are parsed by hand, response heads and bodies by ``httptools`` (llhttp); body bytes are relayed as
they arrive; workers are reached over keep-alive connections (:mod:`tmb.proxy.fast_upstream`).

:func:`install` puts a dispatcher in front of the daemon's aiohttp server: every client connection starts
in a :class:`FastConnection`. A request it does not handle itself is handed, with the connection and the
bytes read so far, to aiohttp's own protocol, which then keeps the connection (daemon routes, so the API
and metrics behave exactly as before, and whatever the fast path leaves to aiohttp: HTTP/1.0, ``HEAD``,
``Transfer-Encoding`` (chunked uploads), ``Expect``, ``Upgrade``, bodies over ``max_body_bytes`` (413),
percent-encoded paths, unusual or malformed heads, https workers).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from time import time_ns
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tmb.proxy.exchange import Exchange

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import AbstractResource

    from tmb.proxy.app import Proxy

log = logging.getLogger("tmb.proxy")

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELDS_RE = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_REQUEST_LINE_RE = re.compile(rb"(GET|POST|PUT|DELETE|PATCH|OPTIONS) (/[!-$&-~]*) HTTP/1\.1")
_MAX_HEAD = 8190  # aiohttp's own line limit: longer heads go to aiohttp (which answers 400/431)
_PIPELINE_PAUSE = 1 << 20  # bytes read ahead of the current exchange before reading pauses


class FastPath:
    """Shared state of the fast engine: the proxy, aiohttp's server (for hand-offs), open connections."""

    def __init__(self, proxy: Proxy, inner: web.Server, app: web.Application, own: AbstractResource) -> None:
        self.proxy = proxy
        self.pool = proxy.pool
        self.config = proxy.config
        self.inner = inner
        self.app = app
        self.own = own  # the proxy's catch-all resource
        self.conns: set[FastConnection] = set()
        self.loop = asyncio.get_running_loop()
        self._routes: dict[bytes, bool] = {}

    def proxied(self, path: bytes) -> bool:
        """Whether ``path`` (no query, no percent escapes) reaches the proxy rather than a daemon route."""
        hit = self._routes.get(path)
        if hit is None:
            hit = self._match(path.decode("ascii"))
            if len(self._routes) >= 4096:
                self._routes.clear()
            self._routes[path] = hit
        return hit

    def _match(self, path: str) -> bool:
        for resource in self.app.router.resources():
            if resource is self.own:
                continue
            info = resource.get_info()
            if "path" in info:
                if info["path"] == path:
                    return False
            elif "pattern" in info:
                if info["pattern"].fullmatch(path):
                    return False
            elif "prefix" in info:
                prefix = info["prefix"].rstrip("/")
                if path == prefix or path.startswith(prefix + "/"):
                    return False
            else:
                return False  # a kind of route we cannot read: let aiohttp decide
        return True


class FastConnection(asyncio.Protocol):
    """One client connection: parses request heads, runs one :class:`Exchange` at a time."""

    def __init__(self, fp: FastPath) -> None:
        self.fp = fp
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.buf = b""  # bytes read and not yet consumed (from the start of the next request)
        self.ex: Exchange | None = None
        self.drain = 0  # request body bytes still to be read and dropped (an exchange ended early)
        self.closed = False
        self.paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.fp.conns.add(self)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is not None:
            if ex.body_left:
                n = ex.body_left
                if len(data) <= n:
                    ex.client_body(data)
                    return
                ex.client_body(data[:n])
                data = data[n:]
            self.buf += data
            if len(self.buf) > _PIPELINE_PAUSE:
                self.pause()
            return
        if self.drain:
            n = min(self.drain, len(data))
            self.drain -= n
            data = data[n:]
            if not data:
                return
        self.buf = self.buf + data if self.buf else data
        self.next_request()

    def eof_received(self) -> bool:
        return False  # the client closed: like aiohttp, treat it as gone (an exchange is cancelled)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fp.conns.discard(self)
        ex, self.ex = self.ex, None
        if ex is not None:
            ex.client_lost()

    def pause_writing(self) -> None:
        if self.ex is not None:
            self.ex.pause_upstream(True)

    def resume_writing(self) -> None:
        if self.ex is not None:
            self.ex.pause_upstream(False)

    # -- requests -----------------------------------------------------------------------------------
    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def next_request(self) -> None:
        """Start the exchange for the request at the head of ``buf``, if it is complete."""
        while self.ex is None and self.buf and not self.closed:
            buf = self.buf
            end = buf.find(b"\r\n\r\n", 0, _MAX_HEAD + 4)
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self.hand_off()
                return
            if not self.start(buf, end):
                self.hand_off()
                return
        if self.ex is None:
            self.resume()

    def start(self, buf: bytes, end: int) -> bool:
        """Parse the head ``buf[:end]``; start its exchange. False: aiohttp must take this request."""
        nl = buf.find(b"\r\n", 0, end + 2)
        m = _REQUEST_LINE_RE.fullmatch(buf, 0, nl)
        if m is None:
            return False
        fields = buf[nl + 2 : end + 2]
        if not _FIELDS_RE.fullmatch(fields):
            return False
        method, target = m[1], m[2]
        q = target.find(b"?")
        if not self.fp.proxied(target if q < 0 else target[:q]) or not self.fp.pool.all_plain:
            return False
        cfg = self.fp.config
        kept: list[bytes] = []
        clen = -1
        corr: str | None = None
        xff: bytes | None = None
        json_body = False
        conn_tokens: list[bytes] = []
        for line in fields.split(b"\r\n")[:-1]:
            i = line.find(b":")
            name = line[:i].lower()
            if name in _REQUEST_SPECIAL:
                value = line[i + 1 :].strip(b" \t")
                if name == b"content-length":
                    if clen >= 0 or not value.isdigit():
                        return False
                    clen = int(value)
                elif name in _REQUEST_REFUSED:
                    return False
                elif name == b"connection":
                    conn_tokens += [t.strip().lower() for t in value.split(b",")]
                    continue
                elif name == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                    continue
                elif name == b"x-request-id":
                    corr = value.decode("latin-1")
                elif name == b"content-type":
                    json_body = b"json" in value
                else:  # host and hop-by-hop fields
                    continue
            elif name.startswith(b"proxy-"):
                continue
            kept.append(line)
        if clen > cfg.max_body_bytes:
            return False
        if conn_tokens:
            drop = set(conn_tokens)
            kept = [ln for ln in kept if ln[: ln.find(b":")].lower() not in drop]
        peer = self.peer.encode("ascii")
        xff = (xff + b", " + peer if xff else peer) if peer else xff
        ex = Exchange(self, method.decode("ascii"), target.decode("ascii"), corr, time_ns())
        kept.append(b"X-TMB-Request-Id: " + ex.rid)
        if xff is not None:
            kept.append(b"X-Forwarded-For: " + xff)
        kept.append(b"\r\n")
        ex.request_line = method + b" " + target + b" HTTP/1.1\r\nHost: "
        ex.request_fields = b"\r\n".join(kept)
        ex.close_after = b"close" in conn_tokens
        rest = buf[end + 4 :]
        clen = max(clen, 0)
        self.buf = rest[clen:]
        body = rest[:clen]
        self.ex = ex
        ex.begin(clen, body, json_body and clen <= cfg.inspect_body_bytes, json_body)
        return True

    def hand_off(self) -> None:
        """Give the connection, and what was read of the current request, to aiohttp's protocol."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.fp.conns.discard(self)
        data, self.buf = self.buf, b""
        handler = self.fp.inner()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)

    def exchange_done(self, keep_open: bool, body_left: int) -> None:
        """Called by the exchange once its response is complete (or abandoned)."""
        self.ex = None
        if not keep_open or self.closed:
            return
        self.drain = body_left
        if body_left and self.buf:
            n = min(body_left, len(self.buf))
            self.drain -= n
            self.buf = self.buf[n:]
        self.next_request()

    def close_idle(self) -> None:
        """Shutdown: close now if no exchange runs, else once it ends."""
        if self.ex is None:
            if self.transport is not None:
                self.transport.close()
        else:
            self.ex.close_after = True


_REQUEST_REFUSED = frozenset([b"transfer-encoding", b"upgrade", b"expect"])
_REQUEST_SPECIAL = frozenset(
    [
        b"content-length",
        b"connection",
        b"x-forwarded-for",
        b"x-request-id",
        b"content-type",
        b"host",
        b"keep-alive",
        b"te",
        b"trailer",
        b"proxy-connection",
        *_REQUEST_REFUSED,
    ]
)


class _DispatchServer:
    """Stands in for aiohttp's ``web.Server`` as the listening socket's protocol factory."""

    def __init__(self, inner: web.Server, make_fp: Callable[[web.Server], FastPath]) -> None:
        self._inner = inner
        self.fp = make_fp(inner)

    def __call__(self) -> asyncio.Protocol:
        return FastConnection(self.fp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def pre_shutdown(self) -> None:
        self._inner.pre_shutdown()
        for conn in list(self.fp.conns):
            conn.close_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        await self._inner.shutdown(timeout)
        for conn in list(self.fp.conns):
            if conn.transport is not None:
                conn.transport.abort()
        for worker in self.fp.pool.workers:
            worker.close_idle()


def install(app: web.Application, proxy: Proxy, own: AbstractResource) -> bool:
    """Serve ``app``'s connections through the fast engine (call before the app's runner is set up).

    aiohttp has no public hook for the connection protocol, so the application's ``_make_handler`` (which
    the runner calls once, after start-up, to build its ``web.Server``) is wrapped for this instance.
    False (and nothing changed) when this aiohttp has no such method: every request then goes through
    aiohttp, slower but the same contract.
    """
    make_handler = getattr(app, _HOOK, None)
    if not callable(make_handler):
        return False

    def _make_handler(**kwargs: Any) -> web.Server:
        inner = make_handler(**kwargs)
        return _DispatchServer(inner, lambda s: FastPath(proxy, s, app, own))  # type: ignore[return-value]

    object.__setattr__(app, _HOOK, _make_handler)
    return True


_HOOK = "_make_handler"  # aiohttp's private method the runner calls to build its web.Server
