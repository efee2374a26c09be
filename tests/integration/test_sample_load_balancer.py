"""The sample load balancer on real sockets (127.0.0.1): round robin, health eviction and recovery, failover,
502/413 JSON errors, streaming pass-through to a real sample worker."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sample_infra.load_balancer import LoadBalancer, main
from sample_infra.worker import WorkerConfig, WorkerNode
from tmb.errors import InputError


class Backend:
    """A tiny upstream: answers with its name and the headers it got; ``healthy`` drives ``/health``."""

    def __init__(self, name: str) -> None:
        self.name, self.healthy, self.url = name, True, ""
        self.headers: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": self.healthy}, status=200 if self.healthy else 503)

    async def _any(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        body = await request.read()
        return web.json_response(
            {"name": self.name, "path": request.path_qs, "method": request.method, "body": body.decode()},
            headers={"X-Backend": self.name, "Connection": "keep-alive, X-Secret", "X-Secret": "hop"},
        )

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    bs = [Backend(n) for n in "abc"]
    for b in bs:
        await b.start()
    yield bs
    for b in bs:
        await b.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def names(http: aiohttp.ClientSession, lb: LoadBalancer, n: int) -> list[str]:
    out = []
    for _ in range(n):
        async with http.get(f"{lb.url}/v1/x") as resp:
            assert resp.status == 200
            out.append((await resp.json())["name"])
    return out


async def test_round_robin_and_forwarding(backends: list[Backend], http: aiohttp.ClientSession) -> None:
    lb = LoadBalancer([b.url for b in backends], health_interval_s=60)
    await lb.start()
    try:
        assert lb.healthy() == [b.url for b in backends]
        assert await names(http, lb, 6) == ["a", "b", "c", "a", "b", "c"]
        async with http.post(f"{lb.url}/v1/completions?x=1", data=b'{"prompt": "hi"}') as resp:
            data = await resp.json()
            assert resp.headers["X-Backend"] == data["name"] == "a"
            assert "X-Secret" not in resp.headers  # named in Connection: hop-by-hop, not forwarded
        assert data == {
            "name": "a",
            "path": "/v1/completions?x=1",
            "method": "POST",
            "body": '{"prompt": "hi"}',
        }
        seen = backends[0].headers[-1]
        assert seen["X-Forwarded-For"] == "127.0.0.1" and seen["X-Forwarded-Host"] == lb.url[7:]
        async with http.get(f"{lb.url}/lb/status") as resp:
            status = await resp.json()
        assert status["healthy"] == 3 and sum(u["served"] for u in status["upstreams"]) == 7
    finally:
        await lb.stop()


async def test_health_eviction_and_recovery(backends: list[Backend], http: aiohttp.ClientSession) -> None:
    lb = LoadBalancer([b.url for b in backends], health_interval_s=60, fall=2, rise=2)
    await lb.start()
    try:
        backends[1].healthy = False
        await lb.check_health()
        assert backends[1].url in lb.healthy()  # one failure is not enough (fall=2)
        await lb.check_health()
        assert lb.healthy() == [backends[0].url, backends[2].url]
        assert set(await names(http, lb, 4)) == {"a", "c"}
        backends[1].healthy = True
        await lb.check_health()
        assert backends[1].url not in lb.healthy()  # rise=2
        await lb.check_health()
        assert backends[1].url in lb.healthy()
        assert set(await names(http, lb, 3)) == {"a", "b", "c"}
    finally:
        await lb.stop()


async def test_periodic_checks_run_on_their_own(backends: list[Backend], http: aiohttp.ClientSession) -> None:
    lb = LoadBalancer([b.url for b in backends], health_interval_s=0.05, fall=1)
    await lb.start()
    try:
        backends[2].healthy = False
        for _ in range(200):  # bounded wait for a check round
            if backends[2].url not in lb.healthy():
                break
            await asyncio.sleep(0.02)
        assert lb.healthy() == [backends[0].url, backends[1].url]
    finally:
        await lb.stop()


async def test_dead_upstream_fails_over_then_502(
    backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    lb = LoadBalancer([b.url for b in backends[:2]], health_interval_s=60)
    await lb.start()
    try:
        await backends[0].stop()  # gone, but still "healthy" until a check or a failed forward
        assert await names(http, lb, 2) == ["b", "b"]
        assert lb.healthy() == [backends[1].url]
        assert "forwarding failed" in (lb.upstreams[0].last_error or "")
        backends[1].healthy = False
        for _ in range(2):
            await lb.check_health()
        async with http.post(f"{lb.url}/v1/chat/completions", json={}) as resp:
            assert resp.status == 502
            err = (await resp.json())["error"]
        assert err["code"] == "bad_gateway" and err["message"] == "no healthy upstream"
    finally:
        await lb.stop()


async def test_body_limit_and_bad_config(backends: list[Backend], http: aiohttp.ClientSession) -> None:
    lb = LoadBalancer([backends[0].url], max_body_bytes=1000)
    await lb.start()
    try:
        async with http.post(f"{lb.url}/v1/completions", data=io.BytesIO(b"x" * 5000)) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"
    finally:
        await lb.stop()
    for bad, kwargs in (([], {}), (["ftp://x"], {}), (["127.0.0.1:80"], {}), (["http://h"], {"fall": 0})):
        with pytest.raises(InputError):
            LoadBalancer(bad, **kwargs)  # type: ignore[arg-type]
    assert main(["--upstream", "nope"]) == 2


async def test_streams_pass_through_unbuffered(http: aiohttp.ClientSession) -> None:
    node = WorkerNode(WorkerConfig(node_id="w1", token_delay_s=0.01))
    await node.start()
    lb = LoadBalancer([node.url], health_interval_s=60)
    await lb.start()
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Describe the bench."}],
        "max_tokens": 100,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with http.post(f"{lb.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["X-Worker-Node"] == "w1"
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await resp.content.readline()
            # The first event reached us while the worker was still generating: nothing was buffered.
            assert first.startswith(b"data: {") and node.in_flight == 1
            rest = await resp.content.read()
        text = (first + rest).decode()
        assert text.endswith("data: [DONE]\n\n") and text.count("data: ") == 1 + 100 + 1 + 1 + 1
        assert node.in_flight == 0 and node.tokens == 100
    finally:
        await lb.stop()
        await node.stop()


async def test_upstream_dying_mid_stream_truncates_the_response(http: aiohttp.ClientSession) -> None:
    node = WorkerNode(WorkerConfig(node_id="w1", token_delay_s=0.01, shutdown_grace_s=0.0))
    await node.start()
    lb = LoadBalancer([node.url], health_interval_s=60)
    await lb.start()
    body = {"prompt": "The river", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    try:
        async with http.post(f"{lb.url}/v1/completions", json=body) as resp:
            assert (await resp.content.readline()).startswith(b"data: {")
            await node.stop()
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.content.read()  # truncated, never a clean end of stream
    finally:
        await lb.stop()
        await node.stop()
