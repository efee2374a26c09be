"""The probe against a hostile daemon (an aiohttp server on 127.0.0.1 playing the ingest API): answers of
200 MB, garbage, wrong types, an ``ima_offset`` outside the local IMA log, answers that never complete. The
probe reads at most 1 MiB of an answer, gives up on one after ``http_timeout_s``, checks every value it
takes, records each refusal as a finding with a stable id, keeps running, retries with backoff and recovers
once the daemon behaves."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from swtpm import SwtpmFactory
from test_probe_e2e import wait_until
from test_probe_support import NodeEnv, make_node

from probes.agent import MAX_ANSWER_BYTES, Probe
from probes.ima_reader import ImaReader
from tmb.attest.ima_build import LogBuilder

MiB = 1 << 20


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same doubling backoff, from 0.05 s to 0.4 s instead of 0.2 s to 5 s: the tests count retries,
    they need not wait for the production pauses between them."""
    monkeypatch.setattr("probes.agent.SEND_BACKOFF", (0.05, 0.4))


HUGE = 200 * MiB


class HostileDaemon:
    """Answers every ingest route according to ``mode``; counts what it answered and streamed."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.ima_offset = 0
        self.answers = 0
        self.routes: Counter[str] = Counter()
        self.streamed: list[int] = []  # body bytes written per streamed answer before the client left
        self.ima_posts: list[dict[str, Any]] = []
        self.released = asyncio.Event()

    def good(self, **extra: Any) -> dict[str, Any]:
        doc = {"nonce": os.urandom(32).hex(), "quote": False, "ima_offset": self.ima_offset, "head": None}
        return doc | extra

    async def handle(self, request: web.Request) -> web.StreamResponse:
        what = request.match_info["what"]
        body = await request.read()
        if what == "ima" and request.method == "POST":
            self.ima_posts.append(json.loads(body))
        self.answers += 1
        self.routes[what] += 1
        answer: Callable[[web.Request], Awaitable[web.StreamResponse]] = getattr(self, f"_{self.mode}")
        return await answer(request)

    async def _good(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.good())

    async def _stream(self, request: web.Request, declared: int | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared is not None:
            resp.content_length = declared
        await resp.prepare(request)
        chunk, sent = b'{"pad": "' + b"x" * (64 * 1024 - 9), 0
        try:
            while sent < HUGE and not self.released.is_set():
                await resp.write(chunk)
                sent += len(chunk)
                chunk = b"x" * len(chunk)
        except ConnectionError:
            pass
        self.streamed.append(sent)
        return resp

    async def _huge_chunked(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, None)

    async def _huge_declared(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, HUGE)

    async def _garbage(self, request: web.Request) -> web.StreamResponse:
        bodies: list[bytes] = [
            b"garbage",
            b"[1, 2, 3]",
            b"[" * 200_000,  # deeper than any JSON parser recursion limit
            b'{"nonce": "' + b"ab" * 100 + b'"',  # truncated
            b"\xff\xfe\x00garbage",
        ]
        body = bodies[self.answers % len(bodies)]
        return web.Response(body=body, content_type="application/json")

    async def _wrong_types(self, request: web.Request) -> web.StreamResponse:
        docs: list[dict[str, Any]] = [
            self.good(nonce=12345, quote="yes", ima_offset="0"),
            self.good(nonce="ab" * 16, quote=1, ima_offset=True),  # a 16-byte nonce, a number for a flag
            self.good(nonce="zz" * 32, ima_offset=10**30),
            self.good(nonce=" ab" * 32, ima_offset=1.5),
            self.good(nonce=["ab" * 32], ima_offset=-1),
        ]
        if request.method == "POST" and self.answers % 3 == 0:
            refusal = self.good(nonce={"n": 1}, findings={"id": "ingest.malformed"}, error="no")
            return web.json_response(refusal, status=409)
        return web.json_response(docs[self.answers % len(docs)])

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            await resp.write(b'{"nonce": "')
            for _ in range(300):
                if self.released.is_set():
                    break
                await resp.write(b"a")
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        return resp

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.released.wait(), 30)
        return web.json_response(self.good())


@asynccontextmanager
async def hostile(daemon: HostileDaemon) -> AsyncIterator[str]:
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/v1/ingest/{node}/{what}", daemon.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        daemon.released.set()
        await runner.cleanup()


@asynccontextmanager
async def running(env: NodeEnv, url: str, **kw: Any) -> AsyncIterator[Probe]:
    kw.setdefault("enroll", False)  # this fake daemon speaks evidence only: the probe posts unsigned
    probe = Probe(env.probe_config(url, **kw))
    stop = asyncio.Event()
    task = asyncio.create_task(probe.run(stop))
    try:
        yield probe
        assert not task.done(), task  # the probe kept running through all of it
    finally:
        stop.set()
        await task


def refused(probe: Probe, fid: str, **context: Any) -> list[dict[str, Any]]:
    found = [f for f in probe.stats.refusals if f.id == fid]
    return [dict(f.context) for f in found if all(f.context.get(k) == v for k, v in context.items())]


async def backs_off(probe: Probe, daemon: HostileDaemon) -> None:
    """The probe retries: two more failed attempts come, but with backoff, not in a tight loop."""
    errors, answers = probe.stats.send_errors, daemon.answers
    await wait_until(lambda: probe.stats.send_errors >= errors + 2)
    assert daemon.answers - answers < 40, daemon.answers - answers


async def recovers(probe: Probe, daemon: HostileDaemon) -> None:
    daemon.mode = "good"
    acked, quotes = probe.stats.batches_acked, probe.stats.quotes_acked
    await wait_until(lambda: probe.stats.batches_acked > acked + 2 and probe.stats.quotes_acked > quotes)


async def test_huge_answers_are_refused_unread(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = make_node(tmp_path, swtpm_factory)
    daemon = HostileDaemon("huge_chunked")
    async with hostile(daemon) as url, running(env, url, http_timeout_s=5.0) as probe:
        await wait_until(lambda: len(daemon.streamed) >= 2)
        await backs_off(probe, daemon)
        daemon.mode = "huge_declared"
        await wait_until(lambda: bool(refused(probe, "probe.answer_too_large", content_length=HUGE)))
        await recovers(probe, daemon)
    assert refused(probe, "probe.answer_too_large", limit=MAX_ANSWER_BYTES)
    # the probe stopped reading at 1 MiB and closed the connection: what the daemon could write before its
    # writes failed is what the kernel's socket buffers hold, never the 200 MB it tried to send
    assert daemon.streamed and max(daemon.streamed) < 32 * MiB, daemon.streamed
    assert probe.stats.answers_refused >= 3
    env.close()


async def test_garbage_answers_are_refused(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = make_node(tmp_path, swtpm_factory)
    daemon = HostileDaemon("garbage")
    async with hostile(daemon) as url, running(env, url) as probe:
        await wait_until(lambda: probe.stats.answers_refused >= 5)
        await backs_off(probe, daemon)
        assert probe.stats.batches_acked == 0  # nothing counts as acknowledged by a garbage answer
        await recovers(probe, daemon)
    malformed = refused(probe, "probe.answer_malformed")
    assert len(malformed) >= 4 and all(m["status"] == 200 for m in malformed), malformed
    env.close()


async def test_values_of_the_wrong_type_or_range_are_refused(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    env = make_node(tmp_path, swtpm_factory)
    daemon = HostileDaemon("wrong_types")
    async with hostile(daemon) as url, running(env, url) as probe:
        await wait_until(
            lambda: (
                {c["field"] for c in refused(probe, "probe.answer_bad_value")}
                >= {"nonce", "quote", "ima_offset", "findings"}
            )
        )
        await asyncio.sleep(1.0)
        assert probe.stats.quotes == 0  # no nonce it was given was usable: nothing was quoted with one
        assert daemon.ima_posts == []  # no offset it was given was taken
        await recovers(probe, daemon)
    got = {(c["field"], c["got"]) for c in refused(probe, "probe.answer_bad_value")}
    assert ("nonce", repr("ab" * 16)) in got and ("quote", repr("yes")) in got
    assert (
        ("ima_offset", "-1") in got and ("ima_offset", repr(10**30)) in got and ("ima_offset", "True") in got
    )
    assert daemon.ima_posts and daemon.ima_posts[0]["offset"] == 0  # after recovery, from the good offset
    env.close()


async def test_ima_offset_outside_the_local_log_is_refused(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    env = make_node(tmp_path, swtpm_factory)
    size = env.log_path.stat().st_size
    daemon = HostileDaemon("good")
    daemon.ima_offset = size + 4096
    async with hostile(daemon) as url, running(env, url) as probe:
        await wait_until(lambda: bool(refused(probe, "probe.answer_ima_offset_outside_log")))
        daemon.ima_offset = 5  # inside the first record
        await wait_until(
            lambda: bool(refused(probe, "probe.answer_ima_offset_outside_log", problem="inside_record"))
        )
        await wait_until(lambda: probe.stats.quotes_acked >= 2)
        assert daemon.ima_posts == []  # quotes went out, but no IMA from an offset it could not check
        daemon.ima_offset = 0
        await wait_until(lambda: bool(daemon.ima_posts))
    (beyond,) = refused(probe, "probe.answer_ima_offset_outside_log", problem="beyond_log")
    assert beyond["offset"] == size + 4096 and beyond["boundary"] == size
    post = daemon.ima_posts[0]
    assert post["offset"] == 0 and base64.b64decode(post["data"]) == env.log_path.read_bytes()
    env.close()


async def test_slow_answers_time_out(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = make_node(tmp_path, swtpm_factory)
    daemon = HostileDaemon("trickle")  # headers at once, then a byte every 0.1 s for 30 s
    async with hostile(daemon) as url, running(env, url, http_timeout_s=1.0) as probe:
        await wait_until(lambda: probe.stats.answers_refused >= 2)
        daemon.mode = "stall"  # no headers at all
        n = probe.stats.answers_refused
        await wait_until(lambda: probe.stats.answers_refused >= n + 2)
        await recovers(probe, daemon)
    timeouts = refused(probe, "probe.answer_timeout")
    assert timeouts and all(t["timeout_s"] == 1.0 for t in timeouts), timeouts
    env.close()


def test_check_offset_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "binary_runtime_measurements"
    with open(path, "wb") as fh:
        builder = LogBuilder(fh)
        builder.file("boot_aggregate", b"boot")
        builder.file("/usr/bin/tmb-probe", b"probe")
        builder.buffer("dm_table_load", b"table")
        data = path.read_bytes()
        fh.write(data[:40])  # a record the kernel is still appending
    reader = ImaReader(path)
    assert reader.check_offset(0) == (None, 0)
    ends, pos = [], 0
    while True:
        problem, boundary = reader.check_offset(pos + 1)
        if problem == "beyond_log":
            break
        assert problem == "inside_record" and boundary > pos
        assert reader.check_offset(boundary) == (None, boundary)
        ends.append(boundary)
        pos = boundary
    assert len(ends) == 3 and ends[-1] == len(data) == boundary  # the partial record is not in the log yet
    assert reader.check_offset(-1)[0] == "negative"
    assert reader.check_offset(len(data) + 40) == ("beyond_log", len(data))
