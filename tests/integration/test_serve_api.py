"""The verdict API on the real daemon: pending/long-poll/final, keys, evidence, errors, metrics, admin,
and a schemathesis run against /openapi.json."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from test_proxy_support import Daemon, WorkerState, make_config, start_daemon, workers

from tmb.config import AdminConfig, Config
from tmb.daemon.app import Daemon as DaemonParts
from tmb.spans import Span
from tmb.verdict.model import Decision, Reason, Verdict, Window
from tmb.verdict.store import EvidenceRef

__all__ = ["workers"]
TOKEN = "t0ken-for-tests"
VENV_BIN = Path(sys.executable).parent


class GatedEngine:
    """Publishes a signed `demo` verdict for a span once the test opens the gate, with the store and
    signer of the daemon it is given to (``parts``, set once the daemon is built)."""

    def __init__(self) -> None:
        self.parts: DaemonParts | None = None
        self.gate = asyncio.Event()

    async def start(self, config: Config) -> tuple[web.AppRunner, Daemon]:
        runner, d = await start_daemon(config, self)
        self.parts = d.parts
        return runner, d

    async def on_spans(self, spans: Sequence[Span]) -> None:
        for span in spans:
            await self.on_span(span)

    async def on_span(self, span: Span) -> None:
        await self.gate.wait()
        if not span.served:
            return
        assert span.worker and span.node
        verdict = Verdict(
            span.id,
            span.correlation_id,
            span.worker,
            span.node,
            span.gpus,
            span.model_served,
            span.model_requested,
            Window(span.start_ns, span.end_ns + 10**9, True),
            {"policy_ok": True, "pcr10": "00" * 32},
            {"p_value": "0.42", "samples": 12},
            Decision.DEMO,
            (Reason("telemetry.synthetic", "synthetic telemetry source (demo deployment)"),),
            "synthetic",
            span.end_ns,
        )
        refs = [
            EvidenceRef("quote", "ab" * 32, span.node, span.end_ns, None, {"pcr": 10}),
            EvidenceRef("telemetry_batch", "cd" * 32, span.node, None, None, {"seq": 3}),
        ]
        assert self.parts is not None
        await self.parts.store.publish(self.parts.signer.sign(verdict), refs)


@pytest.fixture
async def served(
    tmp_path: Path, workers: dict[str, tuple[WorkerState, int]]
) -> AsyncIterator[tuple[Daemon, GatedEngine]]:
    engine = GatedEngine()
    config = make_config(tmp_path, [("a", workers["a"][1])], max_body_bytes=100_000)
    config = dataclasses.replace(config, admin=AdminConfig(token=TOKEN))
    runner, d = await engine.start(config)
    yield d, engine
    engine.gate.set()
    await runner.cleanup()


async def test_verdict_pending_long_poll_final_and_verifiable(
    served: tuple[Daemon, GatedEngine], tmp_path: Path
) -> None:
    d, engine = served
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{d.url}/json", json={"model": "m-a"}, headers={"X-Request-Id": "c-1"}) as r:
            rid = r.headers["X-TMB-Request-Id"]
            await r.read()
        # store ack "commit": the response completed only after the span was stored (pending)
        async with s.get(f"{d.url}/v1/verdicts/{rid}") as r:
            assert r.status == 202 and r.headers["Retry-After"] == "1"
            assert await r.json() == {"request_id": rid, "state": "pending"}
        async with s.get(f"{d.url}/v1/evidence/{rid}") as r:
            assert r.status == 202
        poll = asyncio.ensure_future(s.get(f"{d.url}/v1/verdicts/{rid}?wait=20"))
        await asyncio.sleep(0.1)
        assert not poll.done()  # still waiting: nothing published yet
        engine.gate.set()
        async with await asyncio.wait_for(poll, 20) as r:
            assert r.status == 200
            body = await r.read()
        async with s.get(f"{d.url}/v1/evidence/{rid}") as r:
            ev = await r.json()
    doc = json.loads(body)
    assert doc["request_id"] == rid and doc["correlation_id"] == "c-1" and doc["decision"] == "demo"
    assert [e["kind"] for e in ev["evidence"]] == ["quote", "telemetry_batch"] and ev["evidence"][0][
        "detail"
    ] == {"pcr": 10}
    path = tmp_path / "verdict.json"

    async def verify(doc: bytes) -> tuple[int | None, bytes, bytes]:
        path.write_bytes(doc)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tmb",
            "verify-verdict",
            str(path),
            "--keys-url",
            f"{d.url}/v1/keys",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode, out, err

    code, out, err = await verify(body)
    assert code == 0, err
    assert b"synthetic telemetry" in out
    code, _, err = await verify(body.replace(b'"demo"', b'"verified"'))
    assert code == 1 and b"signature_invalid" in err


async def test_api_errors_404_400(served: tuple[Daemon, GatedEngine], tmp_path: Path) -> None:
    d, _ = served
    async with aiohttp.ClientSession() as s:
        for path, status, kind in [
            (f"/v1/verdicts/{'0' * 32}", 404, "unknown_request"),
            ("/v1/verdicts/NOT-AN-ID", 400, "bad_request_id"),
            ("/v1/verdicts/a/b", 400, "bad_request_id"),
            (f"/v1/verdicts/{'0' * 32}?wait=-1", 400, "bad_wait"),
            (f"/v1/verdicts/{'0' * 32}?wait=nan", 400, "bad_wait"),
            (f"/v1/verdicts/{'0' * 32}?wait=1e9", 400, "bad_wait"),
            (f"/v1/evidence/{'0' * 32}", 404, "unknown_request"),
        ]:
            async with s.get(d.url + path) as r:
                assert r.status == status, path
                assert (await r.json())["error"]["type"] == kind, path
        async with s.post(f"{d.url}/echo", data=b"x" * (d.config.proxy.max_body_bytes + 1)) as r:
            rid = r.headers["X-TMB-Request-Id"]
        await d.span(rid)
        async with s.get(f"{d.url}/v1/verdicts/{rid}") as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_served"


async def test_keys_metrics_openapi(served: tuple[Daemon, GatedEngine]) -> None:
    d, engine = served
    engine.gate.set()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{d.url}/json") as r:
            await r.read()
        async with s.get(f"{d.url}/v1/keys") as r:
            (key,) = (await r.json())["keys"]
        assert key["algorithm"] == "Ed25519" and len(bytes.fromhex(key["public_key_hex"])) == 32
        for _ in range(500):
            async with s.get(f"{d.url}/metrics") as r:
                text = await r.text()
            if 'tmb_requests_total{code="200",outcome="ok",worker="a"} 1.0' in text:
                break
            await asyncio.sleep(0.01)
        assert 'tmb_requests_total{code="200",outcome="ok",worker="a"} 1.0' in text
        assert (
            'tmb_generated_tokens_total{worker="a"} 7.0' in text and 'tmb_worker_healthy{worker="a"}' in text
        )
        async with s.get(f"{d.url}/openapi.json") as r:
            doc = await r.json()
        assert {"/v1/verdicts/{id}", "/v1/keys", "/v1/evidence/{id}", "/metrics", "/healthz"} <= set(
            doc["paths"]
        )


async def test_admin_needs_the_bearer_token(
    served: tuple[Daemon, GatedEngine], workers: dict[str, tuple[WorkerState, int]]
) -> None:
    d, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    new = {"name": "b", "url": f"http://127.0.0.1:{workers['b'][1]}", "node": "node-b", "model": "mb"}
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with s.get(f"{d.management_url}/admin/workers", headers=headers) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        async with s.post(
            f"{d.management_url}/admin/workers", json={**new, "url": "ftp://x"}, headers=auth
        ) as r:
            assert r.status == 400 and "url" in (await r.json())["error"]["message"]
        async with s.post(f"{d.management_url}/admin/workers", json=new, headers=auth) as r:
            assert r.status == 201
        async with s.post(f"{d.management_url}/admin/workers", json=new, headers=auth) as r:
            assert r.status == 409
        async with s.get(f"{d.management_url}/admin/workers", headers=auth) as r:
            assert set(await r.json()) == {"a", "b"}
        async with s.post(f"{d.url}/json", json={"model": "mb"}) as r:  # routed by model to the new worker
            assert r.headers["X-Worker"] == "b"
        async with s.post(f"{d.management_url}/admin/prune", headers=auth) as r:
            assert (await r.json())["deleted"] == 0


async def test_schemathesis_against_the_openapi_document(served: tuple[Daemon, GatedEngine]) -> None:
    d, engine = served
    engine.gate.set()
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "schemathesis"),
        "run",
        f"{d.url}/openapi.json",
        "--url",
        d.url,
        "-n",
        "15",
        "--seed",
        "7",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "-H",
        f"Authorization: Bearer {TOKEN}",
        "--request-timeout",
        "10",
        "--generation-deterministic",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 100)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]


async def test_serve_freezes_the_startup_heap_out_of_the_gc(
    tmp_path: Path, workers: dict[str, tuple[WorkerState, int]]
) -> None:
    """Full GC passes over the startup heap were most of the p99 latency under load (bench_proxy.py)."""
    import gc

    from tmb.daemon.serve import serve

    gc.unfreeze()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(
        serve(make_config(tmp_path, [("a", workers["a"][1])]), ready=lambda url, _: ready.set_result(url))
    )
    try:
        address = await asyncio.wait_for(ready, 20)
        assert gc.get_freeze_count() > 1000  # modules, config, app: everything allocated before serving
        async with aiohttp.ClientSession() as s, s.get(f"{address}/healthz") as r:
            assert r.status == 200
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()
