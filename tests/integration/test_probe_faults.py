"""Faults: the daemon killed -9 and restarted mid-stream, the probe killed and restarted, a TPM that answers
errors or slowly. Nothing lost, nothing counted twice, attestation waits for a good quote."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from swtpm import SwtpmFactory
from test_epochs import run_until
from test_probe_e2e import wait_until
from test_probe_support import NODE, NodeEnv, make_node, serve

from probes.agent import Probe
from probes.tpm import Quote, TpmClient
from tmb.attest.ekcert import ek_pin
from tmb.errors import TpmError


def _toml(doc: dict[str, Any]) -> str:
    lines = ["version = 1", "[allow]"]
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in doc["allow"].items()]
    lines += ["[require]", f"paths = {json.dumps(doc['require']['paths'])}"]
    for rule in doc["verity"]:
        lines.append("[[verity]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon(env: NodeEnv, port: int) -> subprocess.Popen[str]:
    policy = env.tmp / "policy.toml"
    policy.write_text(_toml(env.policy_doc))
    ak = env.tmp / "ak.pub"
    assert env.ak.tpm2b_public is not None
    ak.write_bytes(env.ak.tpm2b_public)
    cmd = [
        sys.executable,
        "-m",
        "tmb.ingest",
        "--db",
        str(env.tmp / "daemon.db"),
        "--policy",
        str(policy),
    ]
    cmd += ["--port", str(port), "--node", f"{NODE}={ak}", "--ek-pin", ek_pin(env.tpm.ek_public("rsa"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on"), (line, proc.stderr.read() if proc.stderr else "")
    return proc


def _reap(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _rows(db: Path) -> list[tuple[bytes, int, int | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT segment, seq, quote_id FROM ingest_batches ORDER BY segment, seq"
        ).fetchall()


async def test_daemon_killed_and_restarted(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = make_node(tmp_path, swtpm_factory)
    port = _free_port()
    daemon = _daemon(env, port)
    probe = Probe(env.probe_config(f"http://127.0.0.1:{port}"))
    stop = asyncio.Event()
    task = asyncio.create_task(probe.run(stop))
    try:
        await wait_until(lambda: probe.stats.quotes_acked >= 1 and probe.stats.batches_acked >= 3)
        _reap(daemon, signal.SIGKILL)
        errors = probe.stats.send_errors
        sealed = probe.stats.sealed
        await wait_until(lambda: probe.stats.send_errors > errors + 1 and probe.stats.sealed > sealed + 3)
        assert len(probe.buffer) > 0  # buffered on disk while the daemon is down
        daemon = _daemon(env, port)
        await wait_until(lambda: probe.stats.quotes_acked >= 3 and len(probe.buffer) <= 1)
        stop.set()
        await task
    finally:
        _reap(daemon)
    rows = _rows(env.tmp / "daemon.db")
    assert [seq for _, seq, _ in rows] == list(range(len(rows)))  # one segment, no gap, no duplicate
    assert len(rows) >= probe.stats.sealed - len(probe.buffer)
    assert sum(q is not None for _, _, q in rows) > sealed  # batches sealed while it was down got attested
    assert probe.stats.refused == [] or all(r["kind"] == "quote" for r in probe.stats.refused)
    env.close()


async def test_probe_restarted_starts_a_quoted_linked_segment(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    env = make_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    async with serve(ingest) as url:
        first = Probe(env.probe_config(url))
        task = asyncio.create_task(first.run())
        await wait_until(lambda: first.stats.quotes_acked >= 1 and first.stats.sealed >= 4)
        task.cancel()  # killed: no goodbye
        await asyncio.gather(task, return_exceptions=True)
        head = first.chain.head
        second = Probe(env.probe_config(url))
        assert second.chain.segment != first.chain.segment
        stop = asyncio.Event()
        task = asyncio.create_task(second.run(stop))
        await wait_until(lambda: second.stats.quotes_acked >= 1)
        stop.set()
        await task
    assert head is not None
    genesis = ingest.store.batch(NODE, second.chain.segment, 0)
    assert genesis is not None and genesis.quote_id is not None  # the new genesis is quoted
    seg = ingest.store.segment(NODE, second.chain.segment)
    assert seg is not None and seg.link_segment == head.segment and seg.link_seq == head.seq
    # the old segment's tail, sent after its last quote, is covered through the link
    old = ingest.store.batch(NODE, head.segment, head.seq)
    assert old is not None and old.quote_id is not None
    env.close()


class FlakyTpm(TpmClient):
    """Fails the first ``errors`` quotes, then answers one slowly, then behaves."""

    calls = 0

    def __init__(self, tcti: str, errors: int, slow_s: float) -> None:
        super().__init__(tcti)
        self.errors, self.slow_s = errors, slow_s

    def quote(self, *args: Any, **kw: Any) -> Quote:
        FlakyTpm.calls += 1
        if FlakyTpm.calls <= self.errors:
            raise TpmError("TPM_RC_RETRY (injected)")
        if FlakyTpm.calls == self.errors + 1:
            time.sleep(self.slow_s)
        return super().quote(*args, **kw)


async def test_tpm_errors_and_slowness(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = make_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    FlakyTpm.calls = 0
    async with serve(ingest) as url:
        cfg = env.probe_config(url, tpm_timeout_s=0.5)
        probe = Probe(cfg, tpm=lambda: FlakyTpm(cfg.tcti, errors=3, slow_s=1.0))
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await wait_until(lambda: probe.stats.tpm_errors >= 3 and probe.stats.batches_acked >= 5)
        assert ingest.store.count_batches(NODE, attested=True) == 0  # attestation waits
        await wait_until(lambda: probe.stats.quotes_acked >= 1)
        stop.set()
        await task
    assert probe.stats.tpm_errors >= 4  # three errors and one timeout
    assert ingest.store.count_batches(NODE, attested=True) >= 5
    assert ingest.store.last_quote(NODE)["ok"]
    env.close()


Tamper = Callable[[web.Request, bytes, int, bytes], Awaitable[bytes | None]]


@asynccontextmanager
async def _relay(daemon: str, tamper: Tamper) -> AsyncIterator[str]:
    """A relay on 127.0.0.1 in front of the daemon at ``daemon`` (real sockets both ways); every answer
    passes through ``tamper(request, request body, status, answer)``: the answer to send on, or None to cut
    the connection instead (the daemon has taken the request; its answer never arrives)."""
    async with aiohttp.ClientSession() as upstream:

        async def relay(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            drop = ("host", "content-length")
            headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
            url = daemon + request.path_qs
            async with upstream.request(request.method, url, data=body, headers=headers) as r:
                answer = await tamper(request, body, r.status, await r.read())
                if answer is None:
                    assert request.transport is not None
                    request.transport.abort()
                return web.Response(status=r.status, body=answer or b"", content_type=r.content_type)

        front = web.Application()
        front.router.add_route("*", "/{tail:.*}", relay)
        runner = web.AppRunner(front, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def test_quote_answer_lost_the_resent_quote_is_a_duplicate(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """The daemon takes a quote and the connection drops before its answer reaches the probe (a crash or a
    network cut at the worst moment): the probe keeps the quote and sends it again, byte for byte. That is
    a delivery, not a replay: taken as a duplicate, nothing refused, nothing kept twice."""
    env = make_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    lost: list[int] = []

    async def lose_first_quote_answer(
        request: web.Request, _: bytes, status: int, answer: bytes
    ) -> bytes | None:
        if request.path.endswith("/quotes") and status == 200 and not lost:
            lost.append(status)
            return None
        return answer

    async with serve(ingest) as daemon, _relay(daemon, lose_first_quote_answer) as url:
        probe = await run_until(env, ingest, url, lambda p: bool(lost) and p.stats.quotes_acked >= 2)
    assert probe.stats.send_errors >= 1  # the lost answer was seen as one
    assert probe.stats.refused == [], probe.stats.refused
    quotes = ingest.store.records(NODE, "quote")
    assert len({q.digest for q in quotes}) == len(quotes)  # every quote kept once
    env.close()


async def test_an_answer_naming_a_used_nonce_is_not_quoted_with_again(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """An answer the daemon computed before it took the probe's quote (a request that timed out and was
    served late, or one in flight meanwhile) names that quote's nonce as the next one, and asks for a quote.
    The probe must not quote with it again: the daemon would refuse that quote as a replay (409)."""
    env = make_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    quoted: list[str] = []
    stale: list[str] = []

    async def stale_after_first_quote(request: web.Request, body: bytes, status: int, answer: bytes) -> bytes:
        if request.path.endswith("/quotes") and status == 200 and not quoted:
            quoted.append(json.loads(body)["nonce"])
        elif quoted and not stale and request.path.endswith("/batches") and status == 200:
            stale.append(quoted[0])  # the next answer is as if computed before that quote was taken
            return json.dumps({**json.loads(answer), "nonce": quoted[0], "quote": True}).encode()
        return answer

    async with serve(ingest) as daemon, _relay(daemon, stale_after_first_quote) as url:
        probe = await run_until(env, ingest, url, lambda p: bool(stale) and p.stats.quotes_acked >= 3)
    assert probe.stats.refused == [], probe.stats.refused
    env.close()
