"""What the fast engine adds to the proxy contract, on raw sockets: pipelining, hand-offs to aiohttp on
the same connection, keep-alive reuse of worker connections (a stale one is retried, not a failover),
framing (Content-Length kept, empty bodies), ``Connection: close``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from test_proxy_support import HOST, Daemon, WorkerState, engine, make_config, start_daemon, workers

from tmb.daemon.app import build_app
from tmb.proxy.app import PROXY_KEY
from tmb.proxy.contract import normal_form, own_prefixes, under

__all__ = ["engine", "workers"]
W = dict[str, tuple[WorkerState, int]]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-case names), body (Content-Length or chunked)."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = b""
    return status, headers, body


@pytest.fixture
async def daemon(tmp_path: Path, workers: W, engine: str) -> AsyncIterator[Daemon]:
    runner, d = await start_daemon(make_config(tmp_path, [("a", workers["a"][1])], engine=engine))
    yield d
    await runner.cleanup()


async def connect(d: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(d.url.rsplit(":", 1)[1])
    return await asyncio.open_connection(HOST, port)


async def test_pipelined_requests_and_a_daemon_route_on_one_connection(daemon: Daemon) -> None:
    reader, writer = await connect(daemon)
    body = json.dumps({"model": "m-a"}).encode()
    post = b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    writer.write(post % (len(body), body) + b"GET /sse?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    s1, h1, b1 = await read_response(reader)
    s2, h2, b2 = await read_response(reader)
    assert s1 == 200 and json.loads(b1)["usage"]["completion_tokens"] == 7
    assert s2 == 200 and b2.endswith(b"data: [DONE]\n\n")
    rids = [h1["x-tmb-request-id"], h2["x-tmb-request-id"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", r) for r in rids) and rids[0] != rids[1]
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the daemon's own route, same connection
    s3, h3, b3 = await read_response(reader)
    assert s3 == 200 and json.loads(b3)["status"] == "ok" and "x-tmb-request-id" not in h3
    writer.write(b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    s4, h4, _ = await read_response(reader)
    assert s4 == 200 and h4.get("connection", "").lower() == "close"
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after the response
    writer.close()
    spans = [await daemon.span(r) for r in rids]
    assert spans[0].model_requested == "m-a" and spans[0].tokens == 7 and spans[1].tokens == 2


async def test_http10_and_head_are_still_proxied(daemon: Daemon) -> None:
    reader, writer = await connect(daemon)
    writer.write(b"GET /json HTTP/1.0\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", headers["x-tmb-request-id"])
    writer.close()
    reader, writer = await connect(daemon)
    writer.write(b"HEAD /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = await asyncio.wait_for(reader.read(), 10)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    writer.close()


async def test_content_length_is_kept_and_empty_bodies_stay_empty(daemon: Daemon) -> None:
    reader, writer = await connect(daemon)
    writer.write(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and int(headers["content-length"]) == len(body)
    assert "transfer-encoding" not in headers
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and body == b""
    writer.close()


async def test_a_stale_keep_alive_connection_is_retried_not_failed_over(tmp_path: Path) -> None:
    """The worker closes a kept-alive connection when it gets a second request on it, unanswered."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            connections += head.startswith(b"GET /x ")  # not the health check's
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # a second request on this connection: hang up instead
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    runner, d = await start_daemon(make_config(tmp_path, [("a", port)], engine="fast", health_interval_s=60))
    try:
        reader, writer = await connect(d)
        rids = []
        for _ in range(3):
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert status == 200 and body == b"{}"
            rids.append(headers["x-tmb-request-id"])
        writer.close()
        spans = [await d.span(r) for r in rids]
        assert all(s.failed_over_from == () and s.worker == "a" for s in spans)
        assert connections == 3
        assert d.parts.pool.workers[0].healthy
    finally:
        await runner.cleanup()
        server.close()


async def test_a_proxied_request_leaves_no_reference_cycles(daemon: Daemon) -> None:
    """Every request's objects are freed by reference counting, not left to the cyclic GC (whose full
    passes stall the loop under load). Checked with the GC saving what it would have collected."""
    import gc

    reader, writer = await connect(daemon)

    async def rounds(n: int) -> None:
        for _ in range(n):
            writer.write(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_response(reader)
            assert status == 200
        await asyncio.sleep(0.3)  # spans stored, verdicts decided and published

    await rounds(5)  # warm: pools, caches, first-use imports
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await rounds(30)
        gc.collect()
        leaked = {type(o).__qualname__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    writer.close()
    assert not {"Exchange", "HttpResponseParser", "_Rec", "Span", "Verdict", "Task"} & leaked, leaked


async def test_on_a_plain_aiohttp_site_the_daemon_still_proxies(tmp_path: Path, workers: W) -> None:
    """The fast engine and the connection gate come with :class:`ProxySite`; an application served on
    aiohttp's own ``TCPSite`` goes through the aiohttp engine: it costs speed, not service."""
    app = await build_app(make_config(tmp_path, [("a", workers["a"][1])], engine="fast"))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    try:
        reader, writer = await asyncio.open_connection(HOST, runner.addresses[0][1])
        writer.write(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and len(headers["x-tmb-request-id"]) == 32
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and "x-tmb-request-id" not in headers
        writer.close()
        assert not app[PROXY_KEY].gates
    finally:
        await runner.cleanup()


async def test_the_fast_engine_hands_the_daemons_own_paths_to_aiohttp(daemon: Daemon) -> None:
    """Paths under the daemon's own prefixes go to aiohttp's router (a route there answers; an unknown
    path under them reaches the catch-all and is proxied, as before)."""
    proxy = daemon.app[PROXY_KEY]
    assert "/healthz" in proxy.own_prefixes and "/v1/verdicts" in proxy.own_prefixes
    (gate,) = proxy.gates
    assert not gate.proxied(b"/healthz") and not gate.proxied(b"/v1/verdicts/abc")
    assert gate.proxied(b"/healthzz") and gate.proxied(b"/v1/chat/completions") and gate.proxied(b"/")
    reader, writer = await connect(daemon)
    writer.write(b"GET /v1/keys HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and "x-tmb-request-id" not in headers and b"keys" in body
    writer.close()


async def test_proxied_is_the_contracts_rule_for_every_spelling(daemon: Daemon) -> None:
    """``FastPath.proxied`` (its cheap path for plain paths included) decides as the contract does: a path
    is relayed unless it, or its normal form, lies under one of the daemon's own prefixes."""
    proxy = daemon.app[PROXY_KEY]
    (gate,) = proxy.gates
    own = tuple(p.lower() for p in proxy.own_prefixes)
    raw = re.compile("(?:" + "|".join(re.escape(p) for p in proxy.own_prefixes) + r")(?:/|\Z)")

    def reference(path: str) -> bool:
        return raw.match(path) is None and not under(normal_form(path), own)

    paths = [
        "/", "/healthz", "/HEALTHZ", "/Healthz/x", "/healthzz", "/v1/ingest", "/V1/Ingest/node-1",
        "//v1/ingest", "/x/../v1/ingest", "/./v1/verdicts/a", "/v1/ingest/../../x", "/v1/chat/completions",
        "/V1/CHAT/completions", "/v1/ingest%2fx", "/v1/%69ngest", "/v1/verdictsx", "/v1/verdicts/", "/a//b",
        "/tmb/metrics", "/TMB/Metrics/", "/v1/keys", "/v1/keysx", "/..", "/.well-known/x",
    ]  # fmt: skip
    decided = {p: gate.proxied(p.encode("latin-1")) for p in paths}
    assert decided == {p: reference(p) for p in paths}
    assert not decided["/HEALTHZ"] and not decided["//v1/ingest"] and decided["/v1/chat/completions"]


def test_every_daemon_route_must_lie_under_the_declared_paths() -> None:
    assert own_prefixes(["/v1/verdicts/{id}", "/tmb/metrics", "/v1/ingest/{node}/nonce", "/healthz"]) == (
        "/v1/verdicts",
        "/tmb/metrics",
        "/v1/ingest",
        "/healthz",
    )
    with pytest.raises(ValueError, match="DAEMON_PATHS"):
        own_prefixes(["/v1/chat/completions"])
    with pytest.raises(ValueError, match="DAEMON_PATHS"):
        own_prefixes(["/healthzz"])
