"""One request through the fast engine, driven by callbacks from both connections (no task, no coroutine).

Life of an :class:`Exchange`: the client connection parsed a head and calls :meth:`Exchange.begin`. A JSON
body of at most ``inspect_body_bytes`` is gathered whole first (its ``model`` routes the request and it can
be sent again on failover); any other body is relayed as it arrives. Candidate workers are tried in the
pool's order: an idle keep-alive connection, or a new one (connect failure or timeout: the worker is
marked down and the next one tried). The response head and body bytes are relayed as they come (SSE: one
write per read, no added delay); failover happens only before the response head and while the request body
can still be sent again. The span is emitted when the response is complete and the byte that completes it
(the last body piece, the chunked terminator, or for an empty body the head itself) is written only once
the span callback's future resolved (store ack ``commit``). The contract (failover rule, failure table,
request record, header rules) is :mod:`tmb.proxy.contract`; this module only does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from time import time_ns
from typing import TYPE_CHECKING, Any

import httptools

from tmb.proxy import contract
from tmb.proxy.contract import BODY_LATE, UPSTREAM_TIMEOUT, Failure, RequestRecord
from tmb.proxy.fast_upstream import FastUpstream, connect, take_idle
from tmb.proxy.inspect import SseTokenCounter, model_from_json, usage_from_json

if TYPE_CHECKING:
    from tmb.proxy.fast import FastConnection
    from tmb.proxy.upstream import Worker

log = logging.getLogger("tmb.proxy")

_NONE, _WHOLE, _STREAM = 0, 1, 2  # request body: none (or complete), gathered whole, streamed
_QUEUE_PAUSE = 1 << 18  # streamed body bytes held while connecting before reading from the client pauses
_RESPONSE_DROP = frozenset(name.encode() for name in contract.RESPONSE_DROP)


class Exchange:
    """Per-request state of the fast engine; also the ``httptools`` callbacks of the worker's response."""

    __slots__ = (
        "body",
        "body_left",
        "body_sent",
        "cands",
        "chunked_in",
        "chunked_out",
        "ci",
        "close_after",
        "close_delimited",
        "conn",
        "connecting",
        "deadline",
        "empty",
        "expected",
        "finished",
        "fp",
        "head_seen",
        "inspect_json",
        "interim",
        "json_parts",
        "last_io",
        "mode",
        "n",
        "out",
        "parser",
        "reason",
        "rec",
        "request_fields",
        "request_line",
        "retried",
        "rh",
        "rid",
        "sniff",
        "sse",
        "tail",
        "timer",
        "up",
        "worker",
    )

    def __init__(self, conn: FastConnection, method: str, target: str, corr: str | None, t0: int) -> None:
        self.conn = conn
        self.fp = conn.fp
        self.rec = RequestRecord(corr, method, target, t0)
        self.rid = self.rec.rid.encode("ascii")
        self.request_line = self.request_fields = b""
        self.close_after = False
        self.mode = _NONE
        self.body: list[bytes] = []
        self.body_left = 0
        self.body_sent = False
        self.sniff = False
        self.cands: list[Worker] = []
        self.ci = 0
        self.worker: Worker | None = None
        self.up: FastUpstream | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.retried = False
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None
        self.last_io = 0.0
        total = self.fp.config.total_timeout_s
        self.deadline = self.fp.loop.time() + total if total else float("inf")
        self._reset_response()

    def _reset_response(self) -> None:
        self.reason = b""
        self.rh: list[tuple[bytes, bytes]] = []
        self.interim = self.head_seen = self.chunked_in = self.chunked_out = False
        self.empty = self.close_delimited = self.inspect_json = False
        self.expected: int | None = None
        self.tail = b""
        self.out: list[bytes] = []  # response bytes of the current read, written together after it
        self.n = 0
        self.sse: SseTokenCounter | None = None
        self.json_parts: list[bytes] = []

    # -- request side -------------------------------------------------------------------------------
    def begin(self, clen: int, body: bytes, whole: bool, is_json: bool) -> None:
        """Start with ``clen`` body bytes announced, ``body`` of them already read."""
        if clen == 0:
            self.dispatch(None)
            return
        self.body_left = clen
        if whole:
            self.mode = _WHOLE
        else:
            self.mode, self.sniff = _STREAM, is_json
            self.dispatch(None)
        if body:
            self.client_body(body)
        if self.mode == _WHOLE and self.body_left and not self.finished:  # the rest must come in time
            loop = self.fp.loop
            self.timer = loop.call_at(loop.time() + self.fp.config.header_timeout_s, self._body_late)

    def client_body(self, data: bytes) -> None:
        """Request body bytes from the client (never more than ``body_left``)."""
        self.body_left -= len(data)
        rec = self.rec
        rec.bytes_in += len(data)
        if self.finished:
            return
        if self.mode == _WHOLE:
            self.body.append(data)
            if not self.body_left:
                self._stop_timer()
                whole = b"".join(self.body)
                self.body = [whole]
                rec.model = model_from_json(whole)
                self.dispatch(rec.model)
            return
        if self.sniff and rec.bytes_in == len(data):
            rec.model = model_from_json(data[:65536])
        up = self.up
        if up is not None:
            if not up.closed and up.transport is not None:
                up.transport.write(data)
                self.body_sent = True
            return
        self.body.append(data)
        if sum(map(len, self.body)) > _QUEUE_PAUSE:
            self.conn.pause()

    def dispatch(self, model: str | None) -> None:
        pool = self.fp.pool
        self.cands = pool.candidates(model)
        if not self.cands:
            self.refuse(contract.no_candidates(bool(pool.workers)))
            return
        self.try_next()

    def try_next(self) -> None:
        cands = self.cands
        while self.ci < len(cands):
            w = cands[self.ci]
            self.ci += 1
            if w.full:
                continue
            w.inflight += 1
            self.worker = w
            conn = take_idle(w)
            if conn is not None:
                self.attach(conn)
            else:
                self.connecting = self.fp.loop.create_task(self._connect(w))
            return
        self.give_up()

    def give_up(self) -> None:
        self.refuse(contract.gave_up(self.rec))

    async def _connect(self, w: Worker) -> None:
        try:
            conn = await connect(w, self.fp.config.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            self.connecting = None
            if self.finished:
                return
            kind = "ConnectionTimeoutError" if isinstance(exc, TimeoutError) else type(exc).__name__
            self._worker_failed(f"{kind}: {exc or 'connection timed out'}", connect=True)
            self.try_next()
            return
        self.connecting = None
        if self.finished:
            conn.release(True)
            return
        self.attach(conn)

    def _worker_failed(self, why: str, *, connect: bool = False) -> None:
        w = self.worker
        if w is not None:
            self.rec.attempt_failed(w, why, connect=connect)
            w.inflight -= 1
            self.worker = None

    def replayable(self) -> bool:
        return self.mode != _STREAM or not self.body_sent

    def attach(self, conn: FastUpstream) -> None:
        """Send the request on ``conn`` (the worker's head, and the body read so far)."""
        assert self.worker is not None and conn.transport is not None  # noqa: S101
        self.up = conn
        conn.owner = self
        self.parser = httptools.HttpResponseParser(self)
        self._reset_response()
        head = self.request_line + self.worker.host_header + b"\r\n" + self.request_fields
        if self.body:
            data = b"".join(self.body)
            if self.mode == _STREAM:
                self.body = []
                self.body_sent = True
                self.conn.resume()
            conn.transport.write(head + data)
        else:
            conn.transport.write(head)
        self._arm_timer()

    # -- timers -------------------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        loop = self.fp.loop
        self.last_io = now = loop.time()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(min(now + self.fp.config.read_timeout_s, self.deadline), self._on_timer)

    def _body_late(self) -> None:
        """A JSON body read whole before choosing a worker did not arrive within ``header_timeout_s``."""
        self.timer = None
        if self.finished or self.up is not None or not self.body_left:
            return
        self.refuse(BODY_LATE, contract.body_late(self.fp.config.header_timeout_s))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.up is None or self.finished:
            return
        loop = self.fp.loop
        when = min(self.last_io + self.fp.config.read_timeout_s, self.deadline)
        if loop.time() < when:
            self.timer = loop.call_at(when, self._on_timer)
            return
        rec = self.rec
        if self.head_seen:
            rec.silent("read timeout")
            self.broken()
            return
        up, self.up = self.up, None
        up.abort()  # the worker sees its request cancelled
        rec.worker = self.worker
        name = self.worker.name if self.worker else "?"
        self.refuse(UPSTREAM_TIMEOUT, contract.upstream_timeout(name))

    # -- response side: FastUpstream events and httptools callbacks ---------------------------------
    def up_data(self, data: bytes) -> None:
        self.last_io = self.fp.loop.time()
        assert self.parser is not None  # noqa: S101
        try:
            self.parser.feed_data(data)
            if self.out:
                out, self.out = self.out, []
                if self.conn.transport is not None and not self.finished:
                    self.conn.transport.write(b"".join(out) if len(out) > 1 else out[0])
        except httptools.HttpParserError as exc:
            if self.finished:
                return
            if isinstance(exc, httptools.HttpParserCallbackError):
                log.exception("fast proxy: request %s failed", self.rec.rid)
            self._up_failed(f"invalid response: {exc}")

    def up_lost(self, conn: FastUpstream, exc: Exception | None) -> None:
        if conn is not self.up or self.finished:
            return
        self.up = None
        self._stop_timer()
        if not self.head_seen:
            if conn.reused and not self.retried and self.replayable() and self.worker is not None:
                self.retried = True  # a stale keep-alive connection: once more on a fresh one
                self.connecting = self.fp.loop.create_task(self._connect(self.worker))
                return
            self._up_failed(f"ServerDisconnectedError: {exc or 'Server disconnected'}")
            return
        if self.close_delimited and exc is None:
            self.complete(False)
            return
        kind = type(exc).__name__ if exc else "ServerDisconnectedError"
        self.rec.broke_off(f"{kind}: {exc or 'connection closed mid-response'}")
        self.broken()

    def _up_failed(self, why: str) -> None:
        """The worker failed before its response head: next worker while the body can be sent again."""
        if self.up is not None:
            self.up.abort()
            self.up = None
        self._stop_timer()
        if self.head_seen:
            self.rec.broke_off(why)
            self.broken()
            return
        self._worker_failed(why)
        if contract.may_try_next(head_seen=False, replayable=self.replayable()):
            self.try_next()
        else:
            self.give_up()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.rh.append((name, value))

    def on_headers_complete(self) -> None:
        if self.finished:
            return
        assert self.parser is not None  # noqa: S101
        status = self.parser.get_status_code()
        if status < 200:  # interim (100, 103): not relayed
            self.interim = True
            self.rh, self.reason = [], b""
            return
        rec = self.rec
        rec.first_byte_ns = time_ns()
        rec.status = status
        rec.worker = self.worker
        self.head_seen = True
        fields = [(n.lower(), n, v) for n, v in self.rh]
        named: set[bytes] = set()
        for ln, _, v in fields:
            if ln == b"connection":
                named.update(t.strip().lower() for t in v.split(b","))
        out = [b"HTTP/1.1 %d %s\r\n" % (status, self.reason)]
        ctype = b""
        for ln, n, v in fields:
            if ln in _RESPONSE_DROP or ln.startswith(b"proxy-") or ln in named:
                if ln == b"transfer-encoding":
                    self.chunked_in = b"chunked" in v.lower()
                continue
            if ln == b"content-length":
                self.expected = int(v)
            elif ln == b"content-type":
                ctype = v
            out.append(n + b": " + v + b"\r\n")
        expected = self.expected
        self.empty = status in (204, 304) or expected == 0
        if not self.empty and expected is None:
            self.chunked_out = True
            self.close_delimited = not self.chunked_in
            out.append(b"Transfer-Encoding: chunked\r\n")
        out.append(b"X-TMB-Request-Id: " + self.rid + b"\r\n")
        if self.close_after:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        head = b"".join(out)
        if ctype.startswith(b"text/event-stream"):
            self.sse = SseTokenCounter()
        else:
            self.inspect_json = b"json" in ctype
        if self.empty:
            self.tail = head  # nothing follows the head: it completes the response
        else:
            self.out.append(head)

    def on_body(self, data: bytes) -> None:
        if self.finished or self.interim:
            return
        n = self.n = self.n + len(data)
        if self.sse is not None:
            self.sse.feed(data)
        elif self.inspect_json and n <= self.fp.config.max_response_inspect_bytes:
            self.json_parts.append(data)
        if self.chunked_out:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self.expected is not None and n >= self.expected:
            self.tail = data  # the last piece waits for the span's ack
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.finished:
            return
        assert self.parser is not None  # noqa: S101
        self.complete(self.parser.should_keep_alive())

    # -- endings ------------------------------------------------------------------------------------
    def _tokens(self, with_json: bool) -> None:
        if self.sse is not None:
            self.rec.tokens = self.sse.tokens
        elif with_json and self.json_parts:
            self.rec.tokens = usage_from_json(b"".join(self.json_parts))

    def complete(self, keep_alive: bool) -> None:
        """The worker's response is complete: release its connection, ack the span, send the tail."""
        self.rec.bytes_out = self.n
        self._tokens(True)
        self._stop_timer()
        up, self.up = self.up, None
        if up is not None:
            up.release(keep_alive and not self.body_left)
        tail = self.tail + b"0\r\n\r\n" if self.chunked_out else self.tail
        if self.out:  # what came with the end in the same read goes with it
            tail = b"".join(self.out) + tail
            self.out = []
        self.respond(tail, False)

    def refuse(self, failure: Failure, message: str = "") -> None:
        """Answer ``failure`` in the error envelope (sent whether or not the store acknowledged the span)."""
        rec = self.rec
        status = failure.status
        body = json.dumps(rec.refuse(failure, message)).encode()
        rec.bytes_out = len(body)
        if failure.close:
            self.close_after = True  # the rest of the request is not read
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            % (
                status,
                HTTPStatus(status).phrase.encode(),
                len(body),
            )
        )
        close = b"Connection: close\r\n" if self.close_after else b""
        self.respond(head + b"X-TMB-Request-Id: " + self.rid + b"\r\n" + close + b"\r\n" + body, True)

    def respond(self, tail: bytes, always: bool) -> None:
        """Emit the span; write ``tail`` once acknowledged (on a failed ack: abort, unless ``always``)."""
        self.finished = True
        waiter: Any = self.rec.emit(self.fp.proxy.on_span_end)
        if waiter is None:
            self._send_tail(tail, True, always)
            return
        if not isinstance(waiter, asyncio.Future):
            waiter = asyncio.ensure_future(waiter)
        waiter.add_done_callback(lambda fut: self._acked(fut, tail, always))

    def _acked(self, fut: asyncio.Future[Any], tail: bytes, always: bool) -> None:
        ok = not fut.cancelled() and fut.exception() is None
        if not ok:
            exc = None if fut.cancelled() else fut.exception()
            log.error("span %s was not acknowledged by the store", self.rec.rid, exc_info=exc)
        self._send_tail(tail, ok, always)

    def _send_tail(self, tail: bytes, ok: bool, always: bool) -> None:
        tr = self.conn.transport
        if self.conn.closed or tr is None or tr.is_closing():
            self.end(False)
            return
        if not ok and not always:
            tr.abort()  # the client sees a truncated response: it was not acknowledged
            self.end(False)
            return
        if tail:
            tr.write(tail)
        if self.close_after:
            tr.close()
            self.end(False)
            return
        self.end(True)

    def broken(self) -> None:
        """The response broke off after its head went out: the client connection is cut."""
        self.finished = True
        rec = self.rec
        rec.bytes_out = self.n
        self._tokens(False)
        self._stop_timer()
        if self.up is not None:
            self.up.abort()
            self.up = None
        rec.emit(self.fp.proxy.on_span_end)
        if self.conn.transport is not None:
            self.conn.transport.abort()
        self.end(False)

    def client_lost(self) -> None:
        """The client went away: the worker's request is cancelled (its connection dropped)."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        rec = self.rec
        if not rec.emitted:
            rec.client_gone()
            rec.bytes_out = self.n
            self._tokens(False)
            rec.emit(self.fp.proxy.on_span_end)
        self.finished = True
        self._stop_timer()
        if self.up is not None:
            self.up.abort()
            self.up = None
        self.end(False)

    def end(self, keep_open: bool) -> None:
        w = self.worker
        if w is not None:
            w.inflight -= 1
            self.worker = None
        self._stop_timer()
        # The parser holds bound methods of this exchange: without this the pair (and every list and
        # tuple it holds) is a reference cycle, freed only by the cyclic GC instead of at once.
        self.parser = None
        if self.conn.ex is self:
            self.conn.exchange_done(keep_open, self.body_left)

    def pause_client(self, pause: bool) -> None:
        """The worker reads the request body slower than the client sends it (or caught up again)."""
        if pause:
            self.conn.pause()
        else:
            self.conn.resume()

    def pause_upstream(self, pause: bool) -> None:
        """The client reads slower than the worker writes (or caught up again)."""
        up = self.up
        if up is not None and up.transport is not None and not up.closed:
            if pause:
                up.transport.pause_reading()
            else:
                up.transport.resume_reading()
