"""The aiohttp engine (``[proxy] engine = "aiohttp"``): the catch-all handler relays any method and path to
a worker with aiohttp's client, bodies streamed both ways. It does the I/O; the contract (request ids,
headers, failover, the failure table, the span) is :mod:`tmb.proxy.contract`.

* Request bodies: a JSON body of at most ``proxy.inspect_body_bytes`` with a ``Content-Length`` is read
  whole (its ``model`` is parsed, and it can be replayed on failover); any other body is streamed chunk by
  chunk. Response bodies are always streamed chunk by chunk as they arrive (no buffering, SSE flushed per
  read).
* ``on_span_end(span)`` is called once per request; when it returns an awaitable (store ack ``commit``),
  the byte that completes the response is sent only after it resolves.

With ``[proxy] engine = "fast"`` this handler gets only what the fast engine hands to aiohttp (see
:mod:`tmb.proxy.fast`); :func:`make_proxy_routes` mounts it, :mod:`tmb.proxy.site` serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from time import time_ns
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.streams import StreamReader

from tmb.config import ProxyConfig
from tmb.proxy import contract
from tmb.proxy.contract import (
    BAD_REQUEST,
    BODY_LATE,
    BODY_TOO_LARGE,
    NOT_FORWARDED,
    REQUEST_ID_HEADER,
    RESPONSE_DROP,
    UPSTREAM_TIMEOUT,
    Failure,
    RequestRecord,
    SpanCallback,
    strip_hop_by_hop,
)
from tmb.proxy.inspect import SseTokenCounter, model_from_json, usage_from_json
from tmb.proxy.upstream import WorkerPool

if TYPE_CHECKING:
    from tmb.proxy.fast import FastPath

log = logging.getLogger("tmb.proxy")

__all__ = ["PROXY_KEY", "REQUEST_ID_HEADER", "Proxy", "SpanCallback", "make_proxy_routes"]

_HTTP1 = (HttpVersion11, HttpVersion10)
_NO_BODY_STATUS = frozenset([204, 304])
# No connection to the worker: it is marked down (the next one may be tried)
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


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


class Proxy:
    """The proxy of one daemon: the workers, the settings, the span callback, and the catch-all handler of
    the aiohttp engine (``handle``). Both engines read it; :func:`make_proxy_routes` mounts it."""

    def __init__(
        self, pool: WorkerPool, config: ProxyConfig, on_span_end: SpanCallback | None = None
    ) -> None:
        self.pool = pool
        self.config = config
        self.on_span_end = on_span_end
        self.own_prefixes: tuple[str, ...] = ()  # the daemon's own paths as mounted (make_proxy_routes)
        self.gates: set[FastPath] = set()  # the fast engine's dispatchers serving it (one per ProxySite)

    async def _finish(self, rec: RequestRecord) -> bool:
        """Emit the span; wait for its ack when the callback asks for it. False: the ack failed."""
        waiter = rec.emit(self.on_span_end)
        if waiter is None:
            return True
        try:
            await waiter
        except Exception:
            log.exception("span %s was not acknowledged by the store", rec.rid)
            return False
        return True

    async def _refuse(self, rec: RequestRecord, failure: Failure, message: str = "") -> web.Response:
        """Answer ``failure`` (the envelope, with the request id), then emit the span."""
        body = rec.refuse(failure, message)
        resp = web.json_response(body, status=failure.status, headers={REQUEST_ID_HEADER: rec.rid})
        if failure.close:
            resp.force_close()
        rec.bytes_out = len(resp.body)  # type: ignore[arg-type]
        await self._finish(rec)
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rec = RequestRecord(request.headers.get("X-Request-Id"), request.method, request.raw_path, time_ns())
        try:
            return await self._handle(request, rec)
        except asyncio.CancelledError:
            rec.client_gone()
            rec.emit(self.on_span_end)
            raise

    async def _handle(self, request: web.Request, rec: RequestRecord) -> web.StreamResponse:
        cfg = self.config
        if request.version not in _HTTP1:
            return await self._refuse(rec, BAD_REQUEST, contract.BAD_VERSION)
        if rec.path[:1] != "/":
            return await self._refuse(rec, BAD_REQUEST, contract.BAD_TARGET)
        headers = request.headers
        clen = request.content_length
        if clen is not None and clen > cfg.max_body_bytes:
            return await self._refuse(rec, BODY_TOO_LARGE, contract.body_too_large(cfg.max_body_bytes, clen))
        fwd = strip_hop_by_hop(headers, NOT_FORWARDED)
        fwd.append((REQUEST_ID_HEADER, rec.rid))
        prior = ", ".join(headers.getall("X-Forwarded-For", ())) or None
        xff = contract.forwarded_for(prior, request.remote or "")
        if xff is not None:
            fwd.append(("X-Forwarded-For", xff))
        body: bytes | _BodyStream | None = None
        if request.body_exists:
            is_json = "json" in headers.get("Content-Type", "")
            if is_json and clen is not None and clen <= cfg.inspect_body_bytes:
                try:
                    async with asyncio.timeout(cfg.header_timeout_s):
                        body = await request.read()
                except TimeoutError:
                    return await self._refuse(rec, BODY_LATE, contract.body_late(cfg.header_timeout_s))
                rec.bytes_in = len(body)
                rec.model = model_from_json(body)
            else:
                body = _BodyStream(request.content, cfg.max_body_bytes, is_json)
        candidates = self.pool.candidates(rec.model)
        if not candidates:
            return await self._refuse(rec, contract.no_candidates(bool(self.pool.workers)))
        for worker in candidates:
            if worker.full:
                continue
            worker.inflight += 1
            try:
                try:
                    upstream = await worker.session.request(
                        rec.method, worker.url(rec.path), headers=fwd, data=body, allow_redirects=False
                    )
                except _BodyTooLarge:
                    break
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if isinstance(body, _BodyStream):
                        if body.too_large:
                            break
                        _sync_stream(rec, body)
                    if isinstance(exc, TimeoutError) and not isinstance(exc, _CONNECT_ERRORS):
                        rec.worker = worker  # silent before its head: no failover (it may still work)
                        return await self._refuse(
                            rec, UPSTREAM_TIMEOUT, contract.upstream_timeout(worker.name)
                        )
                    why = f"{type(exc).__name__}: {exc}"
                    rec.attempt_failed(worker, why, connect=isinstance(exc, _CONNECT_ERRORS))
                    replayable = not (isinstance(body, _BodyStream) and body.started)
                    if contract.may_try_next(head_seen=False, replayable=replayable):
                        continue
                    break
                except ValueError:  # a target yarl or the client cannot encode (no worker saw it)
                    return await self._refuse(rec, BAD_REQUEST, contract.BAD_TARGET)
                rec.worker = worker
                if isinstance(body, _BodyStream):
                    _sync_stream(rec, body)
                return await self._relay(request, rec, upstream, body)
            finally:
                worker.inflight -= 1
        if isinstance(body, _BodyStream):
            _sync_stream(rec, body)
            if body.too_large:
                rec.failed.clear()
                return await self._refuse(rec, BODY_TOO_LARGE, contract.body_too_large(cfg.max_body_bytes))
        return await self._refuse(rec, contract.gave_up(rec))

    async def _relay(
        self,
        request: web.Request,
        rec: RequestRecord,
        upstream: aiohttp.ClientResponse,
        body: bytes | _BodyStream | None,
    ) -> web.StreamResponse:
        rec.first_byte_ns = time_ns()
        rec.status = status = upstream.status
        resp = web.StreamResponse(status=status, reason=upstream.reason)
        resp.headers.extend(strip_hop_by_hop(upstream.headers, RESPONSE_DROP))
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
            rec.silent(f"{exc}")
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            # the client went away while we wrote to it (handler cancellation may not have fired yet)
            rec.client_gone(f"client connection lost: {exc}")
        except (aiohttp.ClientError, OSError) as exc:
            rec.broke_off(f"{type(exc).__name__}: {exc}")
        upstream.close()
        _tokens(rec, sse, [])
        if isinstance(body, _BodyStream):
            _sync_stream(rec, body)
        rec.emit(self.on_span_end)
        return _abort(request, resp)


def _sync_stream(rec: RequestRecord, body: _BodyStream) -> None:
    rec.bytes_in = body.n
    if rec.model is None:
        rec.model = body.model


def _tokens(rec: RequestRecord, sse: SseTokenCounter | None, json_parts: list[bytes]) -> None:
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


PROXY_KEY = web.AppKey("tmb.proxy", Proxy)


def make_proxy_routes(app: web.Application, proxy: Proxy) -> None:
    """The route setup: the catch-all route of the aiohttp engine, added after every route of the daemon's
    own (they take precedence). Every route already mounted must lie under
    :data:`tmb.proxy.contract.DAEMON_PATHS` (ValueError otherwise); their prefixes as mounted are what the
    fast engine hands to aiohttp. Serve the app with :class:`tmb.proxy.site.ProxySite` (on a
    :class:`tmb.proxy.site.ProxyRunner`) for the fast engine and the connection gate; on any other site
    every request goes through this handler, with aiohttp's own timeouts and no connection cap.
    """
    proxy.own_prefixes = contract.own_prefixes(r.canonical for r in app.router.resources())
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app[PROXY_KEY] = proxy

    async def cut_fast_connections(app: web.Application) -> None:
        """Once aiohttp's server shut down, before the cleanup contexts close the workers and the store:
        the fast engine's connections still open are cut (their spans are stored as disconnects)."""
        for gate in proxy.gates:
            gate.abort()

    app.on_cleanup.insert(0, cut_fast_connections)
