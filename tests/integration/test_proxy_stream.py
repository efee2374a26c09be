"""Through the proxy: bytes identical both ways, SSE event by event, headers, request ids, spans, tokens."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from test_proxy_support import Daemon, WorkerState, engine, make_config, start_daemon, workers
from yarl import URL

from tmb.spans import Outcome

__all__ = ["engine", "workers"]


@pytest.fixture
async def daemon(
    tmp_path: Path, workers: dict[str, tuple[WorkerState, int]], engine: str
) -> AsyncIterator[Daemon]:
    config = make_config(tmp_path, [("a", workers["a"][1])], engine=engine)
    runner, d = await start_daemon(config)
    yield d
    await runner.cleanup()


async def test_large_bodies_are_identical_both_ways(daemon: Daemon) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def body() -> AsyncIterator[bytes]:  # chunked upload: no Content-Length
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    async with aiohttp.ClientSession() as s:
        async with s.post(URL(f"{daemon.url}/echo?x=1%2F2", encoded=True), data=io.BytesIO(payload)) as r:
            assert r.status == 200
            got = await r.read()
            rid = r.headers["X-TMB-Request-Id"]
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        async with s.put(f"{daemon.url}/echo", data=body()) as r:
            assert await r.read() == payload
    span = await daemon.span(rid)
    assert span.bytes_in == len(payload) and span.bytes_out == len(payload)
    assert span.path == "/echo?x=1%2F2" and span.method == "POST" and span.outcome is Outcome.OK


async def test_sse_events_arrive_one_by_one(
    daemon: Daemon, workers: dict[str, tuple[WorkerState, int]]
) -> None:
    _state, port = workers["a"]
    n = 6
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/sse?n={n}&ack=1") as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-TMB-Request-Id"])  # with the headers
        rid = r.headers["X-TMB-Request-Id"]
        buf = b""
        for i in range(n):
            # The worker sends event i+1 only after our ack for i: a buffering proxy never delivers event i.
            while f'"t{i}"'.encode() not in buf:
                buf += await asyncio.wait_for(r.content.readany(), 20)
            async with s.post(f"http://127.0.0.1:{port}/ack?i={i}") as a:
                assert a.status == 200
        rest = await r.read()
        assert (buf + rest).endswith(b"data: [DONE]\n\n")
    span = await daemon.span(rid)
    assert span.tokens == n and span.outcome is Outcome.OK and span.status == 200
    assert span.first_byte_ns is not None and span.start_ns <= span.first_byte_ns <= span.end_ns


async def test_span_fields_model_and_json_usage(daemon: Daemon) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{daemon.url}/json",
            json={"model": "llama-x", "messages": []},
            headers={"X-Request-Id": "client-42"},
        ) as r,
    ):
        doc = await r.json()
        rid = r.headers["X-TMB-Request-Id"]
    assert doc["model"] == "llama-x"
    assert rid != "client-42" and re.fullmatch(r"[0-9a-f]{32}", rid)
    span = await daemon.span(rid)
    assert span.correlation_id == "client-42"
    assert (span.worker, span.node, span.gpus, span.model_served) == ("a", "node-a", ("GPU-a",), "m-a")
    assert span.model_requested == "llama-x" and span.tokens == 7
    assert span.bytes_in == len(json.dumps({"model": "llama-x", "messages": []}))


async def test_request_ids_are_unique_and_forwarded(daemon: Daemon) -> None:
    ids = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.get(f"{daemon.url}/echo", headers={"X-Request-Id": "same"}) as r:
                seen = {k.lower(): v for k, v in json.loads(r.headers["X-Seen"])}
                assert seen["x-tmb-request-id"] == r.headers["X-TMB-Request-Id"], seen
                assert seen["x-request-id"] == "same"  # passed through untouched
                ids.add(r.headers["X-TMB-Request-Id"])
    assert len(ids) == 20


async def test_hop_by_hop_headers_are_stripped_both_ways(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{daemon.url}/echo",
            headers={
                "Connection": "keep-alive, X-Client-Hop",
                "X-Client-Hop": "1",
                "TE": "trailers",
                "Proxy-Authorization": "Basic eA==",
                "Keep-Alive": "timeout=1",
                "X-Kept": "yes",
            },
        ) as r:
            seen = {k.lower() for k, _ in json.loads(r.headers["X-Seen"])}
        assert "x-kept" in seen
        for hop in ("x-client-hop", "te", "proxy-authorization", "keep-alive"):
            assert hop not in seen, hop
        async with s.get(f"{daemon.url}/hop") as r:
            assert await r.text() == "hop"
            assert r.headers["X-End-To-End"] == "kept"
            for hop in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
                assert hop not in r.headers, hop


async def test_daemon_routes_are_not_proxied(
    daemon: Daemon, workers: dict[str, tuple[WorkerState, int]]
) -> None:
    state = workers["a"][0]
    before = state.hits
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{daemon.url}/v1/keys") as r:
            assert r.status == 405
        async with s.get(f"{daemon.url}/v1/keys") as r:
            assert r.status == 200 and "X-TMB-Request-Id" not in r.headers
    assert state.hits == before
