"""Every error path of the proxy, with real workers: 413, 502, 503, 504, disconnects, failover, health."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from test_proxy_support import HOST, Daemon, WorkerState, engine, make_config, start_daemon, workers

from tmb.spans import Outcome

__all__ = ["engine", "workers"]
W = dict[str, tuple[WorkerState, int]]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


async def until(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def daemon_factory(tmp_path: Path, engine: str) -> AsyncIterator[object]:
    runners = []

    async def make(workers: list[tuple[str, int]], **proxy: object) -> Daemon:
        proxy.setdefault("engine", engine)
        runner, d = await start_daemon(make_config(tmp_path / str(len(runners)), workers, **proxy))
        runners.append(runner)
        return d

    for i in range(4):
        (tmp_path / str(i)).mkdir()
    yield make
    for r in runners:
        await r.cleanup()


async def error_of(r: aiohttp.ClientResponse) -> dict[str, str]:
    body = await r.json()
    assert body["error"]["request_id"] == r.headers["X-TMB-Request-Id"]
    return body["error"]  # type: ignore[no-any-return]


async def test_body_too_large_413(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    d = await daemon_factory([("a", workers["a"][1])], max_body_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 500

    async with aiohttp.ClientSession() as s:
        async with s.post(f"{d.url}/echo", data=b"y" * 1001) as r:
            assert r.status == 413 and (await error_of(r))["type"] == "body_too_large"
        async with s.post(f"{d.url}/echo", data=chunks()) as r:  # no Content-Length: counted while streaming
            assert r.status == 413
            rid = r.headers["X-TMB-Request-Id"]
        async with s.post(f"{d.url}/echo", data=b"z" * 1000) as r:
            assert r.status == 200 and await r.read() == b"z" * 1000
    assert (await d.span(rid)).outcome is Outcome.REJECTED


async def test_upstream_down_502_json(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = await daemon_factory([("dead", closed_port())])
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{d.url}/v1/chat/completions", json={"model": "m"}) as r,
    ):
        assert r.status == 502 and r.content_type == "application/json"
        err = await error_of(r)
        rid = r.headers["X-TMB-Request-Id"]
    assert err["type"] == "upstream_unavailable" and "dead" in err["message"]
    span = await d.span(rid)
    assert (
        span.outcome is Outcome.UPSTREAM_ERROR and span.worker is None and span.failed_over_from == ("dead",)
    )


async def test_concurrency_limit_503(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    state, port = workers["a"]
    d = await daemon_factory([("a", port)], max_a=1)
    async with aiohttp.ClientSession() as s:
        first = asyncio.ensure_future(s.get(f"{d.url}/hold"))
        await until(lambda: state.hits == 1)
        async with s.get(f"{d.url}/hold") as r:
            assert r.status == 503 and (await error_of(r))["type"] == "workers_busy"
        state.release.set()
        async with await first as r:
            assert r.status == 200 and await r.json() == {"worker": "a"}
        pool = d.parts.pool
        await until(lambda: pool.workers[0].inflight == 0)
        async with s.get(f"{d.url}/hold") as r:  # the slot is free again
            assert r.status == 200
    assert state.hits == 2


async def test_silent_worker_504_and_upstream_cancelled(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    state, port = workers["a"]
    d = await daemon_factory([("a", port)], read_timeout_s=0.3)
    async with aiohttp.ClientSession() as s, s.get(f"{d.url}/stall-headers") as r:
        assert r.status == 504 and (await error_of(r))["type"] == "upstream_timeout"
        rid = r.headers["X-TMB-Request-Id"]
    await asyncio.wait_for(state.cancelled.wait(), 10)  # the proxy closed the upstream request
    span = await d.span(rid)
    assert span.outcome is Outcome.TIMEOUT and span.worker == "a" and span.status == 504


async def test_silence_mid_stream_is_a_timeout(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    d = await daemon_factory([("a", workers["a"][1])], read_timeout_s=0.3)
    async with aiohttp.ClientSession() as s, s.get(f"{d.url}/stall-body") as r:
        rid = r.headers["X-TMB-Request-Id"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # truncated: never a clean end
    span = await d.span(rid)
    assert span.outcome is Outcome.TIMEOUT and span.tokens == 1


async def test_client_disconnect_cancels_upstream(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    state, port = workers["a"]
    d = await daemon_factory([("a", port)])
    async with aiohttp.ClientSession() as s:
        r = await s.get(f"{d.url}/stall-body")
        rid = r.headers["X-TMB-Request-Id"]
        assert b"data:" in await asyncio.wait_for(r.content.readany(), 10)
        r.close()  # drop the connection mid-stream
    await asyncio.wait_for(state.cancelled.wait(), 10)
    span = await d.span(rid)
    assert span.outcome is Outcome.CLIENT_DISCONNECT and span.worker == "a"


async def test_worker_dying_mid_stream_is_recorded(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    d = await daemon_factory([("a", workers["a"][1])])
    async with aiohttp.ClientSession() as s, s.get(f"{d.url}/die") as r:
        rid = r.headers["X-TMB-Request-Id"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    span = await d.span(rid)
    assert span.outcome is Outcome.WORKER_DIED_MID_STREAM and span.worker == "a" and span.tokens == 2
    assert span.status == 200 and span.first_byte_ns is not None and "a" in (span.error or "")


async def test_failover_before_first_byte_credits_the_serving_worker(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    (a, pa), (_b, pb) = workers["a"], workers["b"]
    a.drop = True  # a accepts, reads the request, then hangs up without a byte of response
    d = await daemon_factory([("a", pa), ("b", pb)])
    rids = []
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(f"{d.url}/json", json={"model": "q"}) as r:
                assert r.status == 200 and r.headers["X-Worker"] == "b"
                rids.append(r.headers["X-TMB-Request-Id"])
    spans = [await d.span(rid) for rid in rids]
    assert all(sp.worker == "b" and sp.node == "node-b" and sp.gpus == ("GPU-b",) for sp in spans)
    assert any(sp.failed_over_from == ("a",) for sp in spans) and a.hits >= 1


async def test_health_checks_route_around_a_sick_worker(daemon_factory, workers: W) -> None:  # type: ignore[no-untyped-def]
    (a, pa), (b, pb) = workers["a"], workers["b"]
    d = await daemon_factory([("a", pa), ("b", pb)])
    a.sick = True
    async with aiohttp.ClientSession() as s:

        async def a_healthy() -> bool:
            async with s.get(f"{d.url}/metrics") as r:  # /healthz names no worker to anonymous callers
                return 'tmb_worker_healthy{worker="a"} 1.0' in await r.text()

        for _ in range(500):
            if not await a_healthy():
                break
            await asyncio.sleep(0.02)
        before = a.hits
        for _ in range(4):
            async with s.post(f"{d.url}/json", json={}) as r:
                assert r.headers["X-Worker"] == "b"
        assert a.hits == before
        b.sick = True
        status, doc = 0, {}
        for _ in range(500):
            async with s.get(f"{d.url}/healthz") as r:
                status, doc = r.status, await r.json()
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert status == 503 and doc["status"] == "degraded"
