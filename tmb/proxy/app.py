"""The reverse proxy handler: any method and path relayed to a worker, bodies streamed both ways.

Per request: a tmb request id (``os.urandom(16).hex()``) is minted and sent to the client as the
``X-TMB-Request-Id`` response header (with the headers, so before the first SSE event) and to the worker
as a request header; the client's ``X-Request-Id`` is kept only as the span's ``correlation_id``. An
``X-TMB-Request-Id`` from the client is not forwarded, nor one from the worker relayed: the only one either
side sees is tmb's.

* Hop-by-hop headers (RFC 9110 §7.6.1: ``Connection`` and the fields it names, ``Keep-Alive``, ``TE``,
  ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-*``) are dropped both ways; ``Host`` and
  ``Expect`` are not forwarded (the worker's own host is used).
* Request bodies: a JSON body of at most ``proxy.inspect_body_bytes`` with a ``Content-Length`` is read
  whole (its ``model`` is parsed, and it can be replayed on failover); any other body is streamed chunk by
  chunk. Response bodies are always streamed chunk by chunk as they arrive (no buffering, SSE flushed per
  read).
* Failover to the next candidate worker happens only before the first response byte, and only while the
  request body can still be sent again.
* Errors, with a JSON body ``{"error": {"type", "message", "request_id"}}``: 400 a request target that is
  not a path (absolute form) or a version other than HTTP/1.0 and 1.1, 408 a JSON body
  read whole that did not arrive within ``header_timeout_s``, 413 body too large, 502 no worker
  reachable, 503 every candidate at its concurrency limit, 504 worker silent before its headers.
  Failures after the headers went out end the client connection without a complete response.
* ``on_span_end(span)`` is called once per request; when it returns an awaitable (store ack ``commit``),
  the byte that completes the response is sent only after it resolves.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from time import time_ns
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.streams import StreamReader

from tmb.config import ProxyConfig
from tmb.proxy.inspect import SseTokenCounter, model_from_json, usage_from_json
from tmb.proxy.upstream import Worker, WorkerPool
from tmb.spans import Outcome, Span

log = logging.getLogger("tmb.proxy")

SpanCallback = Callable[[Span], Awaitable[None] | None]
REQUEST_ID_HEADER = "X-TMB-Request-Id"

_HOP_BY_HOP = frozenset(
    ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"]
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "expect", REQUEST_ID_HEADER.lower()}
_HTTP1 = (HttpVersion11, HttpVersion10)
_NO_BODY_STATUS = frozenset([204, 304])


_ID_POOL: list[str] = []


def _new_request_id() -> str:
    """128 bits from the OS CSPRNG as 32 hex digits; fetched 256 ids per system call."""
    if not _ID_POOL:
        raw = os.urandom(16 * 256).hex()
        _ID_POOL.extend(raw[i : i + 32] for i in range(0, len(raw), 32))
    return _ID_POOL.pop()


def strip_hop_by_hop(headers: Any, drop: frozenset[str]) -> list[tuple[str, str]]:
    """The end-to-end fields of ``headers`` (a multidict), in order, repeats kept."""
    conn = headers.get("Connection")
    if conn:
        drop = drop | {t.strip().lower() for t in conn.split(",")}
    return [
        (k, v) for k, v in headers.items() if (lk := k.lower()) not in drop and not lk.startswith("proxy-")
    ]


class _BodyTooLarge(Exception):
    pass


class _BodyStream:
    """A streamed request body with a size limit; remembers whether any of it was sent."""

    __slots__ = ("content", "limit", "model", "n", "sniff", "started", "too_large")

    def __init__(self, content: StreamReader, limit: int, sniff: bool) -> None:
        self.content = content
        self.limit = limit
        self.sniff = sniff
        self.n = 0
        self.started = False
        self.too_large = False
        self.model: str | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self.content.iter_any():
            if self.sniff and self.n == 0:
                self.model = model_from_json(chunk[:65536])
            self.n += len(chunk)
            if self.n > self.limit:
                self.too_large = True
                raise _BodyTooLarge
            yield chunk


class _Rec:
    """Mutable per-request state, frozen into a :class:`Span` at the end."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "corr",
        "emitted",
        "error",
        "failed",
        "first_byte_ns",
        "method",
        "model",
        "outcome",
        "path",
        "rid",
        "start_ns",
        "status",
        "tokens",
        "worker",
    )

    def __init__(self, rid: str, corr: str | None, method: str, path: str, start_ns: int) -> None:
        self.rid, self.corr, self.method, self.path, self.start_ns = rid, corr, method, path, start_ns
        self.worker: Worker | None = None
        self.model: str | None = None
        self.first_byte_ns: int | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.tokens: int | None = None
        self.outcome = Outcome.OK
        self.failed: list[str] = []
        self.error: str | None = None
        self.emitted = False

    def span(self) -> Span:
        w = self.worker
        wc = w.config if w is not None else None
        return Span(
            id=self.rid,
            correlation_id=self.corr,
            worker=wc.name if wc else None,
            node=wc.node if wc else None,
            gpus=wc.gpus if wc else (),
            model_served=(wc.model or None) if wc else None,
            model_requested=self.model,
            method=self.method,
            path=self.path,
            start_ns=self.start_ns,
            first_byte_ns=self.first_byte_ns,
            end_ns=time_ns(),
            status=self.status,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            tokens=self.tokens,
            outcome=self.outcome,
            failed_over_from=tuple(self.failed),
            error=self.error,
        )


class Proxy:
    """The catch-all handler. ``handle`` is the aiohttp handler; one instance per daemon."""

    def __init__(
        self, pool: WorkerPool, config: ProxyConfig, on_span_end: SpanCallback | None = None
    ) -> None:
        self.pool = pool
        self.config = config
        self.on_span_end = on_span_end

    async def _finish(self, rec: _Rec) -> bool:
        """Emit the span; wait for its ack when the callback asks for it. False: the ack failed."""
        if self.on_span_end is None or rec.emitted:
            return True
        rec.emitted = True
        waiter = self.on_span_end(rec.span())
        if waiter is None:
            return True
        try:
            await waiter
        except Exception:
            log.exception("span %s was not acknowledged by the store", rec.rid)
            return False
        return True

    async def _error(
        self, request: web.Request, rec: _Rec, status: int, kind: str, message: str, close: bool = False
    ) -> web.Response:
        rec.status = status
        rec.error = f"{kind}: {message}"
        body = {"error": {"type": kind, "message": message, "request_id": rec.rid}}
        resp = web.json_response(body, status=status, headers={REQUEST_ID_HEADER: rec.rid})
        if close:
            resp.force_close()
        rec.bytes_out = len(resp.body)  # type: ignore[arg-type]
        await self._finish(rec)
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rec = _Rec(
            _new_request_id(),
            request.headers.get("X-Request-Id"),
            request.method,
            request.raw_path,
            time_ns(),
        )
        try:
            return await self._handle(request, rec)
        except asyncio.CancelledError:
            rec.outcome = Outcome.CLIENT_DISCONNECT
            rec.error = "client disconnected"
            if self.on_span_end is not None and not rec.emitted:
                rec.emitted = True
                self.on_span_end(rec.span())
            raise

    async def _handle(self, request: web.Request, rec: _Rec) -> web.StreamResponse:
        cfg = self.config
        if request.version not in _HTTP1 or rec.path[:1] != "/":
            return await self._bad_request(request, rec)
        headers = request.headers
        clen = request.content_length
        if clen is not None and clen > cfg.max_body_bytes:
            rec.outcome = Outcome.REJECTED
            return await self._error(
                request,
                rec,
                413,
                "body_too_large",
                f"request body of {clen} bytes exceeds {cfg.max_body_bytes}",
            )
        fwd = strip_hop_by_hop(headers, _NOT_FORWARDED)
        fwd.append((REQUEST_ID_HEADER, rec.rid))
        peer = request.remote
        if peer:
            prior = headers.get("X-Forwarded-For")
            fwd.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
        body: bytes | _BodyStream | None = None
        if request.body_exists:
            is_json = "json" in headers.get("Content-Type", "")
            if is_json and clen is not None and clen <= cfg.inspect_body_bytes:
                try:
                    async with asyncio.timeout(cfg.header_timeout_s):
                        body = await request.read()
                except TimeoutError:
                    rec.outcome = Outcome.REJECTED
                    return await self._error(
                        request,
                        rec,
                        408,
                        "request_timeout",
                        f"request body not received within {cfg.header_timeout_s:g} s",
                        close=True,  # the rest of the body is not read
                    )
                rec.bytes_in = len(body)
                rec.model = model_from_json(body)
            else:
                body = _BodyStream(request.content, cfg.max_body_bytes, is_json)
        candidates = self.pool.candidates(rec.model)
        if not candidates:
            rec.outcome = Outcome.REJECTED
            if not self.pool.workers:
                rec.outcome = Outcome.UPSTREAM_ERROR
                return await self._error(request, rec, 502, "no_workers", "no worker is configured")
            return await self._error(
                request,
                rec,
                503,
                "workers_busy",
                "every worker serving this request is at its concurrency limit",
            )
        last_error = "no worker available"
        for worker in candidates:
            if worker.full:
                continue
            worker.inflight += 1
            try:
                try:
                    upstream = await worker.session.request(
                        rec.method, worker.url(rec.path), headers=fwd, data=body, allow_redirects=False
                    )
                except (
                    aiohttp.ClientConnectorError,
                    aiohttp.ConnectionTimeoutError,
                    aiohttp.ClientOSError,
                    aiohttp.ServerDisconnectedError,
                ) as exc:
                    if isinstance(body, _BodyStream):
                        if body.too_large:
                            break
                        _sync_stream(rec, body)
                    last_error = f"{worker.name}: {type(exc).__name__}: {exc}"
                    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                        worker.mark_down(last_error)
                    rec.failed.append(worker.name)
                    if isinstance(body, _BodyStream) and body.started:
                        break  # the body is gone: no failover
                    continue
                except TimeoutError:
                    rec.worker = worker
                    rec.outcome = Outcome.TIMEOUT
                    if isinstance(body, _BodyStream):
                        _sync_stream(rec, body)
                    return await self._error(
                        request,
                        rec,
                        504,
                        "upstream_timeout",
                        f"worker {worker.name} sent no response in time",
                    )
                except aiohttp.ClientError as exc:
                    if isinstance(body, _BodyStream) and body.too_large:
                        break
                    rec.failed.append(worker.name)
                    last_error = f"{worker.name}: {type(exc).__name__}: {exc}"
                    break
                except _BodyTooLarge:
                    break
                except ValueError:  # a target yarl or the client cannot encode (no worker saw it)
                    return await self._bad_request(request, rec)
                rec.worker = worker
                if isinstance(body, _BodyStream):
                    _sync_stream(rec, body)
                return await self._relay(request, rec, upstream, body)
            finally:
                worker.inflight -= 1
        if isinstance(body, _BodyStream):
            _sync_stream(rec, body)
            if body.too_large:
                rec.outcome = Outcome.REJECTED
                rec.failed.clear()
                return await self._error(
                    request, rec, 413, "body_too_large", f"request body exceeds {cfg.max_body_bytes} bytes"
                )
        rec.outcome = Outcome.UPSTREAM_ERROR
        if rec.failed:
            return await self._error(request, rec, 502, "upstream_unavailable", last_error)
        return await self._error(
            request, rec, 503, "workers_busy", "every worker serving this request is at its concurrency limit"
        )

    async def _bad_request(self, request: web.Request, rec: _Rec) -> web.Response:
        """400 for a request the proxy relays to no worker: not HTTP/1.x, or a target that is not a path."""
        rec.outcome = Outcome.REJECTED
        if request.version not in _HTTP1:
            message = "only HTTP/1.1 and HTTP/1.0 are proxied"
        else:
            message = "the request target must be a path (origin form): no absolute URL, authority or '*'"
        return await self._error(request, rec, 400, "bad_request", message, close=True)

    async def _relay(
        self,
        request: web.Request,
        rec: _Rec,
        upstream: aiohttp.ClientResponse,
        body: bytes | _BodyStream | None,
    ) -> web.StreamResponse:
        rec.first_byte_ns = time_ns()
        rec.status = status = upstream.status
        resp = web.StreamResponse(status=status, reason=upstream.reason)
        resp.headers.extend(strip_hop_by_hop(upstream.headers, _HOP_BY_HOP))
        resp.headers[REQUEST_ID_HEADER] = rec.rid
        ctype = upstream.headers.get("Content-Type", "")
        sse = SseTokenCounter() if ctype.startswith("text/event-stream") else None
        inspect_json = "json" in ctype
        json_parts: list[bytes] = []
        expected = upstream.content_length
        empty = rec.method == "HEAD" or status in _NO_BODY_STATUS or expected == 0
        done = False

        async def complete() -> bool:
            """Token count and request size into the span, then emit it (False: its ack failed)."""
            _tokens(rec, sse, json_parts)
            if isinstance(body, _BodyStream):
                _sync_stream(rec, body)
            return await self._finish(rec)

        try:
            if empty:
                if isinstance(body, _BodyStream):
                    _sync_stream(rec, body)
                if not await self._finish(rec):
                    return _abort(request, resp)
                done = True
            await resp.prepare(request)
            write = resp.write
            n = 0
            limit = self.config.max_response_inspect_bytes
            async for chunk in upstream.content.iter_any():
                n += len(chunk)
                if sse is not None:
                    sse.feed(chunk)
                elif inspect_json and n <= limit:
                    json_parts.append(chunk)
                if expected is not None and n >= expected and not done:
                    rec.bytes_out = n
                    done = True
                    if not await complete():
                        return _abort(request, resp)
                await write(chunk)
                rec.bytes_out = n
            if not done:
                done = True
                if not await complete():
                    return _abort(request, resp)
            await resp.write_eof()
            upstream.release()
            return resp
        except asyncio.CancelledError:
            upstream.close()  # the client went away: drop the worker's connection (cancels its request)
            raise
        except TimeoutError as exc:
            rec.outcome, rec.error = (
                Outcome.TIMEOUT,
                f"worker silent mid-response: {exc or type(exc).__name__}",
            )
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            # the client went away while we wrote to it (handler cancellation may not have fired yet)
            rec.outcome, rec.error = Outcome.CLIENT_DISCONNECT, f"client connection lost: {exc}"
        except (aiohttp.ClientError, OSError) as exc:
            rec.outcome = Outcome.WORKER_DIED_MID_STREAM
            rec.error = (
                f"worker {rec.worker.name if rec.worker else '?'} broke off: {type(exc).__name__}: {exc}"
            )
        upstream.close()
        _tokens(rec, sse, [])
        if isinstance(body, _BodyStream):
            _sync_stream(rec, body)
        if self.on_span_end is not None and not rec.emitted:
            rec.emitted = True
            self.on_span_end(rec.span())
        return _abort(request, resp)


def _sync_stream(rec: _Rec, body: _BodyStream) -> None:
    rec.bytes_in = body.n
    if rec.model is None:
        rec.model = body.model


def _tokens(rec: _Rec, sse: SseTokenCounter | None, json_parts: list[bytes]) -> None:
    if sse is not None:
        rec.tokens = sse.tokens
    elif json_parts:
        rec.tokens = usage_from_json(b"".join(json_parts))


def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """End the client connection without completing the response (the client sees it as truncated)."""
    resp.force_close()
    if request.transport is not None:
        request.transport.abort()
    return resp


def make_proxy_routes(app: web.Application, proxy: Proxy) -> None:
    """Add the catch-all route; call after every route of the daemon's own (they take precedence).

    The app's connections start in the fast engine's dispatcher (:mod:`tmb.proxy.fast`: connection cap,
    header and keep-alive timeouts, heads that are not HTTP/1.x); with ``[proxy] engine = "fast"`` it relays
    what it can itself and hands to aiohttp (and so to this route) the rest, with ``"aiohttp"`` everything.
    """
    route = app.router.add_route("*", "/{tail:.*}", proxy.handle)
    try:
        from tmb.proxy.fast import install
    except ImportError as exc:  # httptools missing: every request through aiohttp, no connection gate
        log.warning("proxy engine 'fast' unavailable (%s): using 'aiohttp' without a connection cap", exc)
        return
    if not install(app, proxy, route.resource):  # type: ignore[arg-type]
        log.warning(
            "proxy engine 'fast' cannot hook this aiohttp version: using 'aiohttp' without a connection cap"
        )
