"""Shared parts of the proxy/serve tests (no tests here): fake workers and an in-process daemon on 127.0.0.1.

The fake worker is a real aiohttp server; its routes:

* ``/echo`` (any method): streams the request body back; ``X-Seen`` carries the request headers as JSON.
* ``/json``: an OpenAI-style chat completion with ``usage.completion_tokens = 7``.
* ``/sse?n=N&ack=1``: N chat-completion chunks then a usage event and ``[DONE]``; with ``ack=1`` event i+1 is
  sent only after ``POST /ack?i=i`` reached the worker (so a proxy that buffers deadlocks the test).
* ``/stall-headers``: never answers (sleeps); ``/stall-body``: headers and one event, then silence.
* ``/die``: headers and two events, then the worker drops the connection.
* ``/hold``: waits until ``state.release`` is set; ``/hop``: a response with hop-by-hop headers.
* ``/health``: 200, or 503 while ``state.sick``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tmb.config import (
    Config,
    ManagementConfig,
    ProxyConfig,
    ServerConfig,
    StoreConfig,
    VerdictsConfig,
    WorkerConfig,
)
from tmb.daemon.app import DAEMON_KEY, build_app
from tmb.daemon.app import Daemon as DaemonParts
from tmb.daemon.pipeline import VerdictEngine
from tmb.proxy.site import ProxyRunner, ProxySite
from tmb.spans import Span

HOST = "127.0.0.1"


@dataclass
class WorkerState:
    name: str
    acks: dict[int, asyncio.Event] = field(default_factory=dict)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    sick: bool = False
    drop: bool = False  # /json: close the connection without answering
    hits: int = 0

    def ack(self, i: int) -> asyncio.Event:
        return self.acks.setdefault(i, asyncio.Event())


def chunk_event(i: int, text: str) -> bytes:
    doc = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def worker_app(state: WorkerState) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        state.hits += 1
        resp = web.StreamResponse(headers={"X-Seen": json.dumps(list(request.headers.items()))})
        resp.content_type = request.content_type or "application/octet-stream"
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def js(request: web.Request) -> web.StreamResponse:
        state.hits += 1
        body = await request.read()
        if state.drop:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        model = json.loads(body).get("model") if body else None
        return web.json_response(
            {
                "id": "x",
                "model": model,
                "worker": state.name,
                "choices": [],
                "usage": {"completion_tokens": 7},
            },
            headers={"X-Worker": state.name},
        )

    async def sse(request: web.Request) -> web.StreamResponse:
        state.hits += 1
        n, ack = int(request.query.get("n", "5")), request.query.get("ack") == "1"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Worker": state.name})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
        for i in range(n):
            await resp.write(chunk_event(i, f"t{i}"))
            if ack:
                await asyncio.wait_for(state.ack(i).wait(), 30)
        await resp.write(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d}}\n\n' % n)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def ack(request: web.Request) -> web.Response:
        state.ack(int(request.query["i"])).set()
        return web.Response(text="ok")

    async def stall_headers(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(60)
        finally:
            state.cancelled.set()
        return web.Response(text="late")

    async def stall_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk_event(0, "a"))
        try:
            await asyncio.sleep(60)
        finally:
            state.cancelled.set()
        return resp

    async def die(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk_event(0, "a") + chunk_event(1, "b"))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def hold(request: web.Request) -> web.Response:
        state.hits += 1
        await state.release.wait()
        return web.json_response({"worker": state.name})

    async def hop(request: web.Request) -> web.Response:
        return web.Response(
            text="hop",
            headers={
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Checksum",
                "Upgrade": "h2c",
                "X-End-To-End": "kept",
            },
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=503 if state.sick else 200, text="health")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/json", js)
    app.router.add_get("/sse", sse)
    app.router.add_post("/ack", ack)
    app.router.add_get("/stall-headers", stall_headers)
    app.router.add_get("/stall-body", stall_body)
    app.router.add_get("/die", die)
    app.router.add_route("*", "/hold", hold)
    app.router.add_get("/hop", hop)
    app.router.add_get("/health", health)
    return app


async def start(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 as ``tmb serve`` does (an app without the proxy: a plain TCP site)."""
    runner = ProxyRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = ProxySite(runner, HOST, 0)
    await site.start()
    return runner, site.port


@dataclass
class Daemon:
    url: str  # the proxy listener
    app: web.Application
    config: Config
    spans: list[Span]

    @property
    def parts(self) -> DaemonParts:
        """What build_app assembled (store, signer, pool, engine, ingest, pipeline, ...)."""
        return self.app[DAEMON_KEY]

    @property
    def management_url(self) -> str:
        """The management listener (evidence ingest, admin)."""
        return self.parts.management_url

    async def span(self, rid: str, timeout: float = 10.0) -> Span:
        """The span with id ``rid`` once the pipeline saw it (bounded wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for s in self.spans:
                if s.id == rid:
                    return s
            await asyncio.sleep(0.01)
        raise AssertionError(f"no span {rid} within {timeout}s; have {[s.id for s in self.spans]}")


def make_config(tmp: Path, workers: list[tuple[str, int]], **proxy: Any) -> Config:
    wcfg = tuple(
        WorkerConfig(
            name=name,
            url=f"http://{HOST}:{port}",
            node=f"node-{name}",
            gpus=(f"GPU-{name}",),
            model="m-" + name,
            max_concurrency=proxy.pop(f"max_{name}", 8),
        )
        for name, port in workers
    )
    return Config(
        server=ServerConfig(host=HOST, port=0),
        management=ManagementConfig(host=HOST, port=0),
        workers=wcfg,
        proxy=ProxyConfig(**({"health_interval_s": 0.2} | proxy)),
        verdicts=VerdictsConfig(key_file=str(tmp / "key.pem")),
        store=StoreConfig(path=str(tmp / "store.sqlite3")),
    )


async def start_daemon(config: Config, engine: VerdictEngine | None = None) -> tuple[web.AppRunner, Daemon]:
    """The daemon as `tmb serve` builds it (``engine``: instead of the one the config describes), its
    proxy listener on a free port of 127.0.0.1 and its management listener as the config says."""
    app = await build_app(config, engine=engine)
    parts = app[DAEMON_KEY]
    spans: list[Span] = []
    original = parts.metrics.observe

    def observe(span: Span) -> None:  # spy on what the pipeline stored
        spans.append(span)
        original(span)

    parts.metrics.observe = observe  # type: ignore[method-assign]
    runner, port = await start(app)
    return runner, Daemon(f"http://{HOST}:{port}", app, config, spans)


@pytest.fixture(params=["fast", "aiohttp"])
def engine(request: pytest.FixtureRequest) -> str:
    """The proxy engine under test: every proxy test runs against both."""
    return str(request.param)


@pytest.fixture
async def workers() -> AsyncIterator[dict[str, tuple[WorkerState, int]]]:
    runners, out = [], {}
    for name in ("a", "b"):
        state = WorkerState(name)
        runner, port = await start(worker_app(state))
        runners.append(runner)
        out[name] = (state, port)
    yield out
    for state, _ in out.values():
        state.release.set()
    for r in runners:
        await r.cleanup()
