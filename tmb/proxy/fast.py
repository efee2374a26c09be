"""The fast engine (``[proxy] engine = "fast"``): an HTTP/1.1 relay written as asyncio protocols.

Same contract as the aiohttp engine (:mod:`tmb.proxy.contract`: request ids, hop-by-hop headers, spans,
failover, the failure table, store ack), at a fraction of the CPU: no task, coroutine, request or response
object per request; request heads are parsed by hand, response heads and bodies by ``httptools``
(llhttp); body bytes are relayed as they arrive; workers are reached over keep-alive connections
(:mod:`tmb.proxy.fast_upstream`).

:class:`FastPath` is a dispatcher in front of the daemon's aiohttp server (``runner.server``), put there by
:class:`tmb.proxy.site.ProxySite`: every client connection starts in a :class:`FastConnection`. A request
it does not handle itself is handed, with the connection and the bytes read so far, to aiohttp's own
protocol, which then keeps the connection: the daemon's own paths (:data:`tmb.proxy.contract.DAEMON_PATHS`,
so the API and metrics behave exactly as before), and whatever the fast path leaves to aiohttp: HTTP/1.0,
``HEAD``, ``Transfer-Encoding`` (chunked uploads), ``Expect``, ``Upgrade``, bodies over ``max_body_bytes``
(413), percent-encoded paths, unusual heads, https workers.

The dispatcher is also the connection gate, for both engines (with ``engine = "aiohttp"`` every complete
head is handed to aiohttp): at most ``max_connections`` client connections (lowered to what the open-file
limit allows; the next one is answered 503 and closed), a request head must arrive within
``header_timeout_s`` of its first byte (else 408 and close), an idle connection is closed after
``keepalive_timeout_s`` (aiohttp gets the same keep-alive timeout for the connections it holds). Heads that
cannot be HTTP/1.x (no version, HTTP/0.9 or 2.0 request lines, lines ending in a bare LF) are answered 400
here, with a span, like every request the proxy refuses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit
from time import time_ns
from typing import TYPE_CHECKING

from aiohttp import web

from tmb.config import ProxyConfig
from tmb.envelope import error_body
from tmb.proxy import contract
from tmb.proxy.contract import BAD_REQUEST, normal_form, under
from tmb.proxy.exchange import Exchange

if TYPE_CHECKING:
    from tmb.proxy.app import Proxy

log = logging.getLogger("tmb.proxy")

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELDS_RE = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_REQUEST_LINE_RE = re.compile(rb"(GET|POST|PUT|DELETE|PATCH|OPTIONS) (/[!-$&-~]*) HTTP/1\.1")
_MAX_HEAD = 8190  # aiohttp's own line limit: longer heads go to aiohttp (which answers 400/431)
_PIPELINE_PAUSE = 1 << 20  # bytes read ahead of the current exchange before reading pauses
_HTTP1 = (b"HTTP/1.1", b"HTTP/1.0")
_UNPRINTABLE_RE = re.compile(rb"[^\x20-\x7e]")
_FD_RESERVE = 64  # open files besides connections: listening socket, store, logs, event loop, threads
_MAX_LINGER = 64  # refused connections lingering at once (the rest are closed at once)
_LINGER_S = 2.0  # how long a refused connection waits for the client to read its 503 and hang up


def connection_cap(config: ProxyConfig, upstream: int, nofile: int) -> int:
    """``max_connections``, lowered to what the open-file limit ``nofile`` leaves for client connections
    once ``upstream`` connections to workers (and a reserve) are counted; at least 1."""
    if nofile == RLIM_INFINITY:
        return config.max_connections
    return max(1, min(config.max_connections, nofile - upstream - _FD_RESERVE - _MAX_LINGER))


def _connection_error(status: bytes, kind: str, message: str, extra: bytes = b"") -> bytes:
    """A whole response for a connection-level refusal (no request: the envelope without a request id)."""
    body = json.dumps(error_body(kind, message)).encode()
    return (
        b"HTTP/1.1 %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
        b"%sConnection: close\r\n\r\n%s" % (status, len(body), extra, body)
    )


class FastPath:
    """Shared state of the fast engine on one listening socket: the proxy, aiohttp's server (for hand-offs),
    open connections. :meth:`connection` is the socket's protocol factory."""

    def __init__(self, proxy: Proxy, inner: web.Server) -> None:
        self.proxy = proxy
        self.pool = proxy.pool
        self.config = proxy.config
        self.inner = inner
        self.conns: set[FastConnection] = set()
        self.loop = asyncio.get_running_loop()
        own = proxy.own_prefixes  # the daemon's paths as mounted: aiohttp's
        self._own = re.compile(b"(?:" + b"|".join(re.escape(p.encode()) for p in own) + rb")(?:/|\Z)")
        # the same, matched against the lower-cased path (no spelling in upper case is relayed either)
        self._own_lower = re.compile(
            b"(?:" + b"|".join(re.escape(p.lower().encode()) for p in own) + rb")(?:/|\Z)"
        )
        self._own_str = tuple(p.lower() for p in own)
        self._any_own = bool(own)
        self.fast = self.config.engine == "fast"  # False: every head goes to aiohttp (the gate stays)
        self.header_timeout = self.config.header_timeout_s
        self.keepalive_timeout = self.config.keepalive_timeout_s
        upstream = 2 * sum(w.config.max_concurrency for w in self.pool.workers)  # both engines' pools
        nofile = getrlimit(RLIMIT_NOFILE)[0]
        self.max_conns = connection_cap(self.config, upstream, nofile)
        if self.max_conns < self.config.max_connections:
            log.warning(
                "proxy.max_connections lowered from %d to %d: the open-file limit (ulimit -n) is %d; "
                "raise it (systemd: LimitNOFILE=) to at least %d",
                self.config.max_connections,
                self.max_conns,
                nofile,
                self.config.max_connections + upstream + _FD_RESERVE + _MAX_LINGER,
            )
        self.refused: set[_Refused] = set()  # refused connections still lingering
        self.refusal = _connection_error(
            b"503 Service Unavailable",
            "too_many_connections",
            f"the proxy holds its maximum of {self.max_conns} client connections; retry later",
            b"Retry-After: 1\r\n",
        )
        self.head_late = _connection_error(
            b"408 Request Timeout",
            "header_timeout",
            f"the request head did not arrive within {self.header_timeout:g} s",
        )

    def connection(self) -> asyncio.Protocol:
        return FastConnection(self)

    def open_connections(self) -> int:
        """Client connections held now: in the fast engine, and those handed to aiohttp."""
        return len(self.conns) + len(self.inner.connections)

    def proxied(self, path: bytes) -> bool:
        """Whether ``path`` (no query) is relayed here rather than answered by the daemon. No spelling of
        a daemon path is relayed (``//v1/ingest``, ``/V1/ingest``, dot segments, percent escapes:
        :func:`tmb.proxy.contract.normal_form`): those go to aiohttp, whose routes decide."""
        if not self._any_own:
            return True
        if b"//" in path or b"/." in path or b"%" in path:  # rare: the contract's normal form
            return self._own.match(path) is None and not under(
                normal_form(path.decode("latin-1")), self._own_str
            )
        return self._own_lower.match(path.lower()) is None  # the normal form of such a path is its lower case

    def close_idle(self) -> None:
        """Stop serving: idle connections close now, busy ones once their exchange ends."""
        for conn in list(self.conns):
            conn.close_idle()

    def abort(self) -> None:
        """After aiohttp's server shut down: cut what is left (its spans are emitted as disconnects)."""
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        for refused in list(self.refused):
            if refused.transport is not None:
                refused.transport.abort()
        for worker in self.pool.workers:
            worker.close_idle()


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
        # One timer per connection, re-armed lazily: idle (no request, no byte of one) until ``expires``
        # (keep-alive timeout); a head that started waits until ``expires`` (header timeout) once
        # ``head_timed``. While an exchange runs neither applies (the exchange has its own timeouts).
        self.timer: asyncio.TimerHandle | None = None
        self.expires = 0.0
        self.head_timed = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fp = self.fp
        if fp.open_connections() >= fp.max_conns:
            refused = _Refused(fp)
            transport.set_protocol(refused)
            refused.connection_made(transport)
            return
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        fp.conns.add(self)
        self.expires = fp.loop.time() + fp.keepalive_timeout
        self.timer = fp.loop.call_at(self.expires, self._on_timer)

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
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
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
                elif buf.find(b"\n\n", 0, _MAX_HEAD) >= 0:  # a head ended by bare LFs: never complete
                    self.reject(buf[: buf.find(b"\n")], "request head lines must end with CRLF")
                else:
                    self.head_pending()
                return
            self.head_timed = False
            if not (self.fp.fast and self.start(buf, end)):
                why = _refused_line(buf)
                if why is None:
                    self.hand_off()
                else:
                    self.reject(buf[: buf.find(b"\r\n")], why)
                return
        if self.ex is None:
            self.resume()
            if not self.buf:  # idle: the keep-alive timeout runs (the timer catches up lazily)
                self.head_timed = False
                self.expires = self.fp.loop.time() + self.fp.keepalive_timeout

    def head_pending(self) -> None:
        """Part of a head is here: it must be complete within the header timeout of its first byte."""
        if self.head_timed:
            return
        self.head_timed = True
        loop = self.fp.loop
        self.expires = loop.time() + self.fp.header_timeout
        timer = self.timer
        if timer is None or timer.when() > self.expires:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(self.expires, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        transport = self.transport
        if self.closed or transport is None:
            return
        loop = self.fp.loop
        now = loop.time()
        if self.ex is not None:  # busy: look again one keep-alive timeout from now
            self.timer = loop.call_at(now + self.fp.keepalive_timeout, self._on_timer)
        elif now < self.expires:
            self.timer = loop.call_at(self.expires, self._on_timer)
        elif self.head_timed and self.buf:
            log.info(
                "client %s: request head incomplete after %g s: 408, closed",
                self.peer,
                self.fp.header_timeout,
            )
            transport.write(self.fp.head_late)
            transport.close()
        else:  # idle too long (or draining a body nobody reads): close quietly
            transport.close()

    def reject(self, line: bytes, message: str) -> None:
        """Answer the head at the start of ``buf`` (request line ``line``) with 400 and close: an exchange
        that reaches no worker, so the answer and the span are the proxy's own."""
        parts = _UNPRINTABLE_RE.sub(b"?", line[:_MAX_HEAD]).split(b" ", 2)
        method = parts[0][:32].decode("ascii")
        target = parts[1].decode("ascii") if len(parts) > 1 else ""
        ex = Exchange(self, method, target, None, time_ns())
        self.buf = b""
        self.ex = ex
        ex.refuse(BAD_REQUEST, message)

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
                else:  # host, hop-by-hop fields, a client's X-TMB-Request-Id (tmb sends its own)
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
        if self.timer is not None:  # aiohttp's keep-alive timeout takes over
            self.timer.cancel()
            self.timer = None
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


def _refused_line(buf: bytes) -> str | None:
    """Why the complete head at the start of ``buf`` is refused outright, or None: aiohttp decides."""
    line = buf[: buf.find(b"\r\n")]
    if not line:
        return None  # empty lines before a request line: aiohttp skips them (RFC 9112 section 2.2)
    parts = line.split(b" ")
    if len(parts) == 3 and parts[2] in _HTTP1:
        return None
    return "a request line is METHOD SP request-target SP HTTP/1.1 (or HTTP/1.0), CRLF"


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections``: 503, then closed. What the client sends meanwhile is read and
    dropped, so that closing does not reset the connection before the client could read the answer."""

    def __init__(self, fp: FastPath) -> None:
        self.fp = fp
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fp = self.fp
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tr
        tr.write(fp.refusal)
        if len(fp.refused) >= _MAX_LINGER or not tr.can_write_eof():
            tr.close()
            return
        fp.refused.add(self)
        tr.write_eof()
        self.timer = fp.loop.call_later(_LINGER_S, tr.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client hung up: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.fp.refused.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


# Request fields the head parser looks at: the contract's not-forwarded ones (hop-by-hop, Host, Expect,
# X-Forwarded-For, a client's X-TMB-Request-Id), those it reads, and those left to aiohttp.
_REQUEST_REFUSED = frozenset([b"transfer-encoding", b"upgrade", b"expect"])
_REQUEST_SPECIAL = frozenset(
    [
        *(name.encode() for name in contract.NOT_FORWARDED),
        b"content-length",
        b"x-request-id",
        b"content-type",
    ]
)
