"""A round-robin HTTP load balancer with active health checks (the provider's load balancer in the demo).

In the demo its upstreams are tmb's proxy (``tmb serve``), not the workers: the provider's traffic goes
load balancer -> tmb -> workers unchanged. Every method and path is forwarded (``GET /lb/status`` excepted,
which reports the upstreams); request bodies are read whole (bounded, so a request can be retried on
another upstream when the first cannot be reached), responses are streamed back chunk by chunk as they
arrive, Server-Sent Events included.

Health: every ``health_interval_s`` each upstream gets ``GET health_path``; a 2xx answer within
``health_timeout_s`` is a pass. ``fall`` consecutive failures evict an upstream, ``rise`` consecutive
passes bring it back; the first round, which :meth:`LoadBalancer.start` runs before listening, decides
each upstream's state at once. A connection failure while forwarding evicts at once and the request goes
to the next healthy upstream (only before any response byte). No healthy upstream: 502 with a JSON error
body; an upstream that does not answer within ``request_timeout_s``: 504; an upstream that dies mid-response:
the client's connection is closed (a truncated response, never a clean end).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from tmb.errors import InputError, TmbError

__all__ = ["LoadBalancer", "Upstream", "main", "serve_until_signal"]

# RFC 9110 section 7.6.1 connection-specific fields, plus those the two HTTP stacks set themselves.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass
class Upstream:
    """One backend: its base URL, health state and counters."""

    url: str
    healthy: bool = False
    passes: int = 0
    fails: int = 0
    served: int = 0
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "served": self.served,
            "last_error": self.last_error,
        }


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InputError("an upstream is an http(s)://host:port URL", upstream=url)
    return url.rstrip("/")


def _error(status: int, message: str, code: str, **extra: Any) -> web.Response:
    body = {"error": {"message": message, "type": "load_balancer_error", "code": code, **extra}}
    return web.json_response(body, status=status)


def _hop_by_hop(headers: Any) -> set[str]:
    named = {h.strip().lower() for v in headers.getall("Connection", ()) for h in v.split(",")}
    return set(_HOP_BY_HOP) | named


class LoadBalancer:
    """Round robin over healthy upstreams. ``await start()`` returns the URL; ``await stop()`` closes."""

    def __init__(
        self,
        upstreams: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health_path: str = "/health",
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
        fall: int = 2,
        rise: int = 1,
        request_timeout_s: float = 300.0,
        max_body_bytes: int = 1 << 20,
        shutdown_grace_s: float = 1.0,
    ) -> None:
        if not upstreams:
            raise InputError("the load balancer needs at least one upstream")
        if not health_path.startswith("/"):
            raise InputError("the health path must start with /", health_path=health_path)
        if fall < 1 or rise < 1 or health_interval_s <= 0 or health_timeout_s <= 0 or request_timeout_s <= 0:
            raise InputError("fall, rise, intervals and timeouts must be positive")
        self.upstreams = [Upstream(_base_url(u)) for u in upstreams]
        self.host, self.port = host, port
        self.health_path = health_path
        self.health_interval_s, self.health_timeout_s = health_interval_s, health_timeout_s
        self.fall, self.rise = fall, rise
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.shutdown_grace_s = shutdown_grace_s
        self.url = ""
        self._next = 0
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._checker: asyncio.Task[None] | None = None

    def healthy(self) -> list[str]:
        """URLs of the upstreams in rotation now."""
        return [u.url for u in self.upstreams if u.healthy]

    def status(self) -> dict[str, Any]:
        return {"upstreams": [u.to_dict() for u in self.upstreams], "healthy": len(self.healthy())}

    async def start(self) -> str:
        """Run one health check round, start listening and the periodic checks; the base URL."""
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.health_timeout_s),
        )
        await asyncio.gather(*(self._check(u, initial=True) for u in self.upstreams))
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_get("/lb/status", self._status)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=max(self.shutdown_grace_s, 0.001))
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise InputError(f"cannot listen: {exc.strerror}", host=self.host, port=self.port) from None
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._checker = asyncio.create_task(self._check_loop())
        return self.url

    async def stop(self) -> None:
        """Stop the checks, the listener and the upstream connections."""
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
            self._checker = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check_health(self) -> None:
        """One round of health checks, all upstreams at once."""
        await asyncio.gather(*(self._check(u) for u in self.upstreams))

    async def _check(self, up: Upstream, initial: bool = False) -> None:
        assert self._session is not None
        error: str | None = None
        try:
            timeout = aiohttp.ClientTimeout(total=self.health_timeout_s)
            async with self._session.get(up.url + self.health_path, timeout=timeout) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    error = f"health check answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"health check failed: {type(exc).__name__}: {exc}"
        if error is None:
            up.passes, up.fails = up.passes + 1, 0
            if up.passes >= self.rise or initial:
                up.healthy = True
        else:
            up.passes, up.fails, up.last_error = 0, up.fails + 1, error
            if up.fails >= self.fall or initial:
                up.healthy = False

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    def _pick(self, exclude: set[str]) -> Upstream | None:
        n = len(self.upstreams)
        for i in range(n):
            up = self.upstreams[(self._next + i) % n]
            if up.healthy and up.url not in exclude:
                self._next = (self._next + i + 1) % n
                return up
        return None

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "request body too large", "request_too_large", limit=self.max_body_bytes)
        drop = _hop_by_hop(request.headers) | {"host", "content-length"}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
        peer = request.remote or "unknown"
        prior = request.headers.get("X-Forwarded-For")
        headers += [
            ("X-Forwarded-For", f"{prior}, {peer}" if prior else peer),
            ("X-Forwarded-Host", request.host),
            ("X-Forwarded-Proto", request.scheme),
        ]
        tried: set[str] = set()
        while (up := self._pick(tried)) is not None:
            tried.add(up.url)
            try:
                upstream = await self._session.request(
                    request.method,
                    up.url + request.path_qs,
                    headers=headers,
                    data=io.BytesIO(body) if body else None,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=self.health_timeout_s, sock_read=self.request_timeout_s
                    ),
                )
            except TimeoutError as exc:
                if not isinstance(exc, aiohttp.ConnectionTimeoutError):
                    return _error(504, f"upstream {up.url} did not answer in time", "upstream_timeout")
                up.healthy, up.passes, up.fails = False, 0, self.fall
                up.last_error = "forwarding failed: connection timed out"
                continue
            except aiohttp.ClientError as exc:
                up.healthy, up.passes, up.fails = False, 0, self.fall
                up.last_error = f"forwarding failed: {type(exc).__name__}: {exc}"
                continue
            up.served += 1
            return await self._relay(request, upstream)
        message = "no healthy upstream" if not tried else "no upstream could be reached"
        return _error(502, message, "bad_gateway", tried=sorted(tried))

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        drop = _hop_by_hop(upstream.headers)
        for key, value in upstream.headers.items():
            if key.lower() not in drop:
                resp.headers.add(key, value)
        try:
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except (aiohttp.ClientError, ConnectionResetError, TimeoutError):
            # Upstream died mid-response or the client left: close both sides, so the client sees a
            # truncated response (never a clean end) and the upstream sees the cancellation.
            upstream.close()
            if request.transport is not None:
                request.transport.close()
        finally:
            upstream.release()
        return resp


async def serve_until_signal(
    start: Callable[[], Awaitable[str]], stop: Callable[[], Awaitable[None]], banner: str
) -> None:
    """Run ``start()``, print ``banner`` (``{url}`` filled in), wait for SIGINT/SIGTERM, run ``stop()``."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    url = await start()
    print(banner.format(url=url), flush=True)
    try:
        await done.wait()
    finally:
        await stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sample_infra.load_balancer --upstream URL [--upstream URL ...]``; serve until a signal."""
    p = argparse.ArgumentParser(
        prog="python -m sample_infra.load_balancer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--upstream", action="append", required=True, help="base URL; repeat for several")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed at start)")
    p.add_argument("--health-path", default="/health")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between check rounds")
    p.add_argument("--health-timeout", type=float, default=1.0)
    p.add_argument("--fall", type=int, default=2, help="failed checks that evict an upstream")
    p.add_argument("--rise", type=int, default=1, help="passed checks that bring it back")
    p.add_argument("--request-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    try:
        lb = LoadBalancer(
            args.upstream,
            host=args.host,
            port=args.port,
            health_path=args.health_path,
            health_interval_s=args.health_interval,
            health_timeout_s=args.health_timeout,
            fall=args.fall,
            rise=args.rise,
            request_timeout_s=args.request_timeout,
        )
        banner = f"load balancer listening on {{url}} -> {', '.join(u.url for u in lb.upstreams)}"
        asyncio.run(serve_until_signal(lb.start, lb.stop, banner))
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
