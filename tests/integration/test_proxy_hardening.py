"""Adversarial requests against both proxy engines, on raw sockets (THREAT_MODEL.md, "Adversarial tests: the
proxy"): request ids a worker or a client tries to impose, trickled and idle connections, the connection
cap (also under a small open-file limit), request targets and heads that are not HTTP/1.x origin form.

Timeouts are configured tiny (0.3 s); the tests only bound how late a connection is closed, generously."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from test_proxy_support import HOST, Daemon, WorkerState, engine, make_config, start_daemon, workers

from tmb.config import ProxyConfig, load_config
from tmb.errors import ConfigError
from tmb.proxy.fast import connection_cap
from tmb.spans import Outcome

__all__ = ["engine", "workers"]
W = dict[str, tuple[WorkerState, int]]
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
RID = re.compile(r"[0-9a-f]{32}")


async def read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, list[str]], bytes]:
    """One response: status line, headers (lower-case names, every value kept), body (Content-Length or
    chunked; none otherwise)."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.setdefault(name.lower(), []).append(value.strip())
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"][0])), 10)
    elif headers.get("transfer-encoding") == ["chunked"]:
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip(), 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), 10)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = b""
    return status_line, headers, body


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the daemon sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data


def rid_of(headers: dict[str, list[str]]) -> str:
    ids = headers["x-tmb-request-id"]
    assert len(ids) == 1 and RID.fullmatch(ids[0]), ids
    return ids[0]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.fixture
async def daemon_factory(tmp_path: Path, engine: str) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    runners = []

    async def make(workers: list[tuple[str, int]], **proxy: Any) -> Daemon:
        proxy.setdefault("engine", engine)
        home = tmp_path / str(len(runners))
        home.mkdir()
        runner, d = await start_daemon(make_config(home, workers, **proxy))
        runners.append(runner)
        return d

    yield make
    for r in runners:
        await r.cleanup()


async def connect(d: Daemon) -> Conn:
    return await asyncio.open_connection(HOST, int(d.url.rsplit(":", 1)[1]))


# -- row 1: a worker's X-TMB-Request-Id ------------------------------------------------------------------
async def test_a_workers_own_request_id_never_reaches_the_client(
    daemon_factory: Callable[..., Awaitable[Daemon]], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker answering with another request's id must not make a client fetch (and "verify") that
    request's verdict: the client sees exactly one X-TMB-Request-Id, tmb's."""
    other = "0123456789abcdef0123456789abcdef"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 200 OK\r\nX-TMB-Request-Id: %s\r\nx-tmb-request-id: %s\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                    % (other.encode(), b"f" * 32)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        d = await daemon_factory([("a", server.sockets[0].getsockname()[1])])
        reader, writer = await connect(d)
        for _ in range(2):  # a fresh and a kept-alive connection to the worker
            writer.write(b"GET /v1/chat HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert status.startswith("HTTP/1.1 200") and body == b"{}"
            rid = rid_of(headers)
            assert rid not in (other, "f" * 32)
            span = await d.span(rid)
            assert span.worker == "a" and span.outcome is Outcome.OK
        writer.close()
    finally:
        server.close()
    no_tracebacks(caplog)


# -- row 2: a client's X-TMB-Request-Id ------------------------------------------------------------------
async def test_a_clients_request_id_is_not_forwarded(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W
) -> None:
    d = await daemon_factory([("a", workers["a"][1])])
    reader, writer = await connect(d)
    forged = "0" * 29 + "bad"
    writer.write(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-TMB-Request-Id: %s\r\nX-Request-Id: corr-7\r\n"
        b"x-tmb-request-id: %s\r\n\r\n" % (forged.encode(), forged.encode())
    )
    _, headers, _ = await read_response(reader)
    rid = rid_of(headers)
    seen = json.loads(headers["x-seen"][0])
    assert [v for k, v in seen if k.lower() == "x-tmb-request-id"] == [rid]  # tmb's, and only tmb's
    assert [v for k, v in seen if k.lower() == "x-request-id"] == ["corr-7"]  # the client's own id stays
    writer.close()
    span = await d.span(rid)
    assert span.correlation_id == "corr-7" and span.id != forged


# -- row 4: trickled and idle connections, the connection cap --------------------------------------------
async def test_a_trickled_head_is_cut_at_the_header_timeout(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W
) -> None:
    d = await daemon_factory([("a", workers["a"][1])], header_timeout_s=0.3)
    reader, writer = await connect(d)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def trickle() -> None:
        writer.write(b"GET /echo HTTP/1.1\r\n")
        for i in range(100):  # one header line every 0.1 s, for 10 s unless cut
            await asyncio.sleep(0.1)
            writer.write(b"X-Line-%d: slow\r\n" % i)
            await writer.drain()

    task = asyncio.ensure_future(trickle())
    data = await closed_within(reader, 5)
    elapsed = loop.time() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    writer.close()
    assert 0.25 <= elapsed < 5, elapsed
    if data:  # what the daemon answered before closing (a client still writing may see a reset)
        assert data.startswith(b"HTTP/1.1 408 ") and b'"header_timeout"' in data
    reader, writer = await connect(d)  # the daemon still serves
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status.startswith("HTTP/1.1 200")
    writer.close()
    assert workers["a"][0].hits == 1


async def test_idle_connections_are_closed_at_the_keepalive_timeout(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W
) -> None:
    d = await daemon_factory([("a", workers["a"][1])], keepalive_timeout_s=0.3)
    silent = await connect(d)  # never sends a byte
    reader, writer = await connect(d)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status.startswith("HTTP/1.1 200")
    assert await closed_within(reader, 5) == b""  # kept alive, then closed quietly
    assert await closed_within(silent[0], 5) == b""
    writer.close()
    silent[1].close()
    # a connection handed to aiohttp (a daemon route) gets the same keep-alive timeout
    reader, writer = await connect(d)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status.startswith("HTTP/1.1 200")
    assert await closed_within(reader, 5) == b""
    writer.close()


async def test_connections_over_the_cap_get_503_and_close(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W
) -> None:
    d = await daemon_factory([("a", workers["a"][1])], max_connections=3)
    held = [await connect(d) for _ in range(2)]
    reader, writer = await connect(d)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # handed to aiohttp: still counted
    status, _, _ = await read_response(reader)
    assert status.startswith("HTTP/1.1 200")
    held.append((reader, writer))
    over, over_w = await connect(d)
    over_w.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await closed_within(over, 5)
    status_line, _, body = data.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 503 Service Unavailable", data
    assert b"Connection: close\r\n" in body and b"Retry-After: 1\r\n" in body
    err = json.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert err["type"] == "too_many_connections" and "3" in err["message"]
    over_w.close()
    for _, w in held:
        w.close()
    assert workers["a"][0].hits == 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:  # the slots come back once the daemon saw the closes
        reader, writer = await connect(d)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await read_response(reader)
        writer.close()
        if status.startswith("HTTP/1.1 200"):
            break
        assert loop.time() < deadline, status
        await asyncio.sleep(0.05)


def test_the_cap_fits_the_open_file_limit() -> None:
    cfg = ProxyConfig(max_connections=4096)
    assert connection_cap(cfg, 128, 16384) == 4096
    assert connection_cap(cfg, 16, 256) == 256 - 16 - 128  # what a small `ulimit -n` leaves
    assert connection_cap(cfg, 1000, 256) == 1
    import resource

    assert connection_cap(cfg, 10**6, resource.RLIM_INFINITY) == 4096


def test_the_unit_file_leaves_room_for_the_default_cap() -> None:
    unit = Path(__file__).resolve().parents[2] / "systemd" / "tmb.service"
    limits = [
        int(ln.split("=", 1)[1]) for ln in unit.read_text().splitlines() if ln.startswith("LimitNOFILE=")
    ]
    assert len(limits) == 1
    cfg = ProxyConfig()
    assert connection_cap(cfg, 2 * 64 * 16, limits[0]) == cfg.max_connections  # 16 workers at the default


def test_the_gate_keys_are_validated() -> None:
    cfg = load_config(env={"TMB_PROXY_HEADER_TIMEOUT_S": "2.5", "TMB_PROXY_MAX_CONNECTIONS": "9"})
    assert cfg.proxy.header_timeout_s == 2.5 and cfg.proxy.max_connections == 9
    assert cfg.proxy.keepalive_timeout_s == 60.0
    for key, value in (("MAX_CONNECTIONS", "0"), ("HEADER_TIMEOUT_S", "0"), ("KEEPALIVE_TIMEOUT_S", "-1")):
        with pytest.raises(ConfigError, match=key.lower()):
            load_config(env={f"TMB_PROXY_{key}": value})


CONFIG = """
[server]
host = "127.0.0.1"
port = 0

[management]
port = 0

[[workers]]
name = "w1"
url = "http://127.0.0.1:{port}"
node = "node-1"
max_concurrency = 8

[proxy]
engine = "{engine}"

[verdicts]
key_file = "{dir}/key.pem"

[store]
path = "{dir}/tmb.sqlite3"
"""


async def test_idle_sockets_under_ulimit_256_get_503s_not_failures(tmp_path: Path, engine: str) -> None:
    """The report's setup: `tmb serve` under `ulimit -n 256`, 300 idle connections. The cap is lowered to
    what the limit leaves (with a warning naming LimitNOFILE), the connections over it get a clean 503, and
    the daemon serves again once they are gone."""
    from test_proxy_support import start, worker_app

    runner, port = await start(worker_app(WorkerState("w1")))
    config = tmp_path / "tmb.toml"
    config.write_text(CONFIG.format(port=port, dir=tmp_path, engine=engine))
    log = (tmp_path / "stderr").open("wb")
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        'ulimit -n 256 && exec "$0" "$@"',
        sys.executable,
        "-m",
        "tmb",
        "serve",
        "--config",
        str(config),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env={**os.environ, "TMB_PROXY_HEALTH_INTERVAL_S": "60"},
    )
    idle: list[Conn] = []
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        daemon_port = int(m[1])
        for _ in range(300):
            idle.append(await asyncio.open_connection(HOST, daemon_port))
        reader, writer = await asyncio.open_connection(HOST, daemon_port)
        writer.write(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await closed_within(reader, 10)
        writer.close()
        assert data.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in data, data[:200]
        for _, w in idle:
            w.close()
        idle.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            reader, writer = await asyncio.open_connection(HOST, daemon_port)
            writer.write(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_response(reader)
            writer.close()
            if status.startswith("HTTP/1.1 200"):
                break
            assert loop.time() < deadline, status
            await asyncio.sleep(0.1)
    finally:
        for _, w in idle:
            w.close()
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
        log.close()
        await runner.cleanup()
    stderr = (tmp_path / "stderr").read_text()
    assert "max_connections lowered from 4096" in stderr and "LimitNOFILE" in stderr, stderr
    assert "Traceback" not in stderr and "Too many open files" not in stderr, stderr


# -- rows 8, 9, 10: targets and heads that are not HTTP/1.x origin form ----------------------------------
async def bad_request(d: Daemon, data: bytes) -> tuple[str, str]:
    """Send ``data``; the answer must be a 400 with tmb's JSON error; returns its status line and id."""
    reader, writer = await connect(d)
    writer.write(data)
    status, headers, body = await read_response(reader)
    writer.close()
    assert " 400 " in status, (status, body)
    rid = rid_of(headers)
    err = json.loads(body)["error"]
    assert err["type"] == "bad_request" and err["request_id"] == rid
    return status, rid


async def test_an_absolute_form_target_is_400_with_a_span(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W, caplog: pytest.LogCaptureFixture
) -> None:
    d = await daemon_factory([("a", workers["a"][1])])
    for target in (b"http://evil.example/echo", b"http://127.0.0.1:1/echo"):
        status, rid = await bad_request(d, b"GET %s HTTP/1.1\r\nHost: evil.example\r\n\r\n" % target)
        assert status.startswith("HTTP/1.1 400")
        span = await d.span(rid)
        assert span.outcome is Outcome.REJECTED and span.status == 400 and span.worker is None
        assert span.path == target.decode()
    reader, writer = await connect(d)  # authority form: aiohttp's parser refuses it (400, no request)
    writer.write(b"GET evil.example:80 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    status, _, _ = await read_response(reader)
    writer.close()
    assert " 400 " in status
    assert workers["a"][0].hits == 0
    no_tracebacks(caplog)


async def test_bare_lf_heads_are_400_not_a_hang(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W, caplog: pytest.LogCaptureFixture
) -> None:
    d = await daemon_factory([("a", workers["a"][1])])
    _, rid = await bad_request(d, b"GET /echo HTTP/1.1\nHost: x\nConnection: keep-alive\n\n")
    span = await d.span(rid)
    assert span.outcome is Outcome.REJECTED and span.status == 400
    assert (span.method, span.path) == ("GET", "/echo")
    # a bare LF inside an otherwise CRLF head: aiohttp's parser answers 400, logged without a traceback
    reader, writer = await connect(d)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n")
    status, _, _ = await read_response(reader)
    writer.close()
    assert " 400 " in status
    assert workers["a"][0].hits == 0
    no_tracebacks(caplog)


async def test_http09_and_other_versions_are_400(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W, caplog: pytest.LogCaptureFixture
) -> None:
    d = await daemon_factory([("a", workers["a"][1])])
    for head in (
        b"GET /echo\r\n\r\n",
        b"GET /echo HTTP/0.9\r\n\r\n",
        b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n",
    ):
        status, rid = await bad_request(d, head)
        assert status.startswith("HTTP/1.1 400")
        span = await d.span(rid)
        assert span.outcome is Outcome.REJECTED and (span.method, span.path) == ("GET", "/echo")
    # after a request aiohttp served on the same connection (a daemon route), aiohttp parses the next head
    reader, writer = await connect(d)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /echo\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status.startswith("HTTP/1.1 200")
    status, headers, body = await read_response(reader)
    writer.close()
    assert " 400 " in status and json.loads(body)["error"]["type"] == "bad_request", (status, body)
    span = await d.span(rid_of(headers))
    assert span.outcome is Outcome.REJECTED
    assert workers["a"][0].hits == 0
    no_tracebacks(caplog)


# -- a JSON body the proxy reads whole: within the header timeout ----------------------------------------
async def test_a_trickled_json_body_is_408_at_the_header_timeout(
    daemon_factory: Callable[..., Awaitable[Daemon]], workers: W, engine: str
) -> None:
    d = await daemon_factory([("a", workers["a"][1])], header_timeout_s=0.3)
    reader, writer = await connect(d)
    writer.write(
        b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        b'{"model": '
    )
    status, headers, body = await read_response(reader)
    assert status.startswith("HTTP/1.1 408") and headers["connection"] == ["close"]
    assert json.loads(body)["error"]["type"] == "request_timeout"
    if engine == "fast":  # aiohttp reads and drops the rest for up to 10 s first (its lingering close)
        assert await closed_within(reader, 5) == b""
    writer.close()
    span = await d.span(rid_of(headers))
    assert span.outcome is Outcome.REJECTED and span.status == 408 and span.worker is None
    assert workers["a"][0].hits == 0
