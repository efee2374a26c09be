"""The sample client on real sockets (127.0.0.1): load balancer -> a test double of tmb's proxy -> a real
sample worker, and a TEST DOUBLE OF THE DAEMON'S VERDICT API (``/v1/keys``, ``/v1/verdicts/{id}``: 202 with
``Retry-After`` first, then 200 with a verdict signed by tmb.verdict's real Signer). The real daemon is
tested in its own files; here only the client's side of that API is under test."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sample_infra import client as client_mod
from sample_infra.client import Client, format_table
from sample_infra.load_balancer import LoadBalancer
from sample_infra.worker import WorkerConfig, WorkerNode
from tmb.verdict import Decision, Reason, Signer, Verdict, Window

CLAIM = "llama-1b/bf16/h100"


class FakeProxy:
    """TEST DOUBLE of tmb's proxy: forwards to one worker, mints ``X-TMB-Request-Id``, remembers the node."""

    def __init__(self, worker: WorkerNode) -> None:
        self.worker = worker
        self.served: dict[str, str] = {}
        self.hold_s = 0.0  # like tmb with store.ack = commit: the response completes once the span is stored
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        body = await request.read()
        async with (
            aiohttp.ClientSession() as s,
            s.request(request.method, self.worker.url + request.path_qs, data=body or None) as up,
        ):
            resp = web.StreamResponse(status=up.status)
            for k in ("Content-Type", "X-Worker-Node"):
                if k in up.headers:
                    resp.headers[k] = up.headers[k]
            resp.headers["X-TMB-Request-Id"] = rid
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
        await asyncio.sleep(self.hold_s)
        self.served[rid] = self.worker.config.node_id
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


@dataclass
class FakeDaemon:
    """TEST DOUBLE of the daemon's verdict API (GET /v1/keys, GET /v1/verdicts/{id}); see module doc."""

    proxy: FakeProxy
    signer: Signer
    mode: str = "honest"  # honest | tampered | other_id
    url: str = ""

    def __post_init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.waits: list[str] = []
        app = web.Application()
        app.router.add_get("/v1/keys", self._keys)
        app.router.add_get("/v1/verdicts/{id}", self._verdict)
        self.runner = web.AppRunner(app)

    async def _keys(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self.signer.public.to_dict()]})

    async def _verdict(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        self.waits.append(request.query.get("wait", ""))
        if rid not in self.proxy.served:
            return web.json_response({"error": {"type": "unknown_request", "message": "no such"}}, status=404)
        self.calls[rid] = self.calls.get(rid, 0) + 1
        if self.calls[rid] == 1:
            return web.json_response(
                {"request_id": rid, "state": "pending"}, status=202, headers={"Retry-After": "0"}
            )
        now = time.time_ns()
        verdict = Verdict(
            request_id=rid if self.mode != "other_id" else uuid.uuid4().hex,
            correlation_id=None,
            worker="w-" + self.proxy.served[rid],
            node=self.proxy.served[rid],
            gpus=(self.proxy.worker.gpu_uuid,),
            claimed_model=CLAIM,
            requested_model=None,
            window=Window(now - 10**9, now),
            attestation={"policy_ok": True},
            fingerprint={"p_value": "0.41", "samples": 40},
            decision=Decision.DEMO,
            reasons=(Reason("verdict.demo", "all checks passed on synthetic telemetry"),),
            telemetry_source="synthetic",
            issued_ns=now,
        )
        doc = self.signer.sign(verdict).to_dict()
        if self.mode == "tampered":
            doc["decision"] = "verified"
        return web.Response(body=json.dumps(doc), content_type="application/json")

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


@dataclass
class Stack:
    worker: WorkerNode
    proxy: FakeProxy
    daemon: FakeDaemon
    lb: LoadBalancer


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    worker = WorkerNode(WorkerConfig(node_id="node-7", token_delay_s=0.001))
    await worker.start()
    proxy = FakeProxy(worker)
    await proxy.start()
    daemon = FakeDaemon(proxy, Signer(Ed25519PrivateKey.generate()))
    await daemon.start()
    lb = LoadBalancer([proxy.url], health_interval_s=60)
    await lb.start()
    yield Stack(worker, proxy, daemon, lb)
    await lb.stop()
    await daemon.runner.cleanup()
    await proxy.runner.cleanup()
    await worker.stop()


async def test_prompts_through_the_lb_get_verified_verdicts(stack: Stack) -> None:
    prompts = ["Tell me about the workshop.", "What does the ledger record?", "Rain?", "The kitchen."]
    async with Client(stack.lb.url, stack.daemon.url, wait_s=2.0, deadline_s=20.0) as c:
        outcomes = await c.run(prompts, stream="alternate", max_tokens=12)
    assert [o.stream for o in outcomes] == [False, True, False, True]
    ids = {o.request_id for o in outcomes}
    assert len(ids) == 4 and ids <= set(stack.proxy.served)  # (the LB's health check got an id too)
    for o in outcomes:
        assert o.accepted and o.verdict_state == "final" and o.signature == "ok", o.problems
        assert o.decision == "demo" and o.node == "node-7" and o.worker == "w-node-7"
        assert o.claimed_model == CLAIM and o.reason and o.reason.startswith("verdict.demo")
        assert o.completion_tokens is not None and 1 <= o.completion_tokens <= 12
        assert stack.daemon.calls[o.request_id or ""] == 2  # 202 first, then the verdict
    assert set(stack.daemon.waits) == {"2"}
    table = format_table(outcomes)
    assert all(o.request_id in table for o in outcomes if o.request_id)
    assert "node-7" in table and CLAIM in table and "demo" in table
    json.dumps([o.to_dict() for o in outcomes])  # the JSON list is plain data


@pytest.mark.parametrize("mode", ["tampered", "other_id"])
async def test_bad_verdicts_are_not_accepted(stack: Stack, mode: str) -> None:
    stack.daemon.mode = mode
    async with Client(stack.lb.url, stack.daemon.url, wait_s=1.0, deadline_s=20.0) as c:
        (o,) = await c.run(["Hello"], stream="on")
    assert o.verdict_state == "final" and o.signature == "invalid" and not o.accepted
    expected = "verdict.signature_invalid" if mode == "tampered" else "client.request_id_mismatch"
    assert any(expected in p for p in o.problems), o.problems


async def test_pinned_key_from_another_daemon_is_refused(stack: Stack) -> None:
    other = Signer(Ed25519PrivateKey.generate()).public
    async with Client(stack.lb.url, stack.daemon.url, keys=[other], deadline_s=20.0) as c:
        (o,) = await c.run(["Hello"], stream="off")
    assert o.signature == "invalid" and any("verdict.unknown_key" in p for p in o.problems)


async def test_unknown_pending_and_no_request_id(stack: Stack) -> None:
    async with Client(stack.lb.url, stack.daemon.url, deadline_s=0.0) as c:
        await c.keys()
        state, doc, problem = await c.fetch_verdict("0" * 32)
        assert state == "unknown" and doc is None and "unknown_request" in (problem or "")
        rid = uuid.uuid4().hex
        stack.proxy.served[rid] = "node-7"
        state, doc, problem = await c.fetch_verdict(rid)  # deadline 0: the 202 is final for this client
        assert state == "pending" and doc is None and problem is not None
    # Straight to the worker (not through tmb): no request id, no verdict to ask for.
    async with Client(stack.worker.url, stack.daemon.url) as c:
        (o,) = await c.run(["Hello"], stream="off")
    assert o.verdict_state == "no_request_id" and not o.accepted and "X-TMB-Request-Id" in o.problems[0]
    # Nothing listening: a clear failure, no traceback.
    async with Client("http://127.0.0.1:9", stack.daemon.url) as c:
        (o,) = await c.run(["Hello"], stream="off")
    assert o.verdict_state == "request_failed" and o.request_id is None and "ClientConnector" in o.problems[0]


async def test_cli_json_and_exit_status(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--lb", stack.lb.url, "--daemon", stack.daemon.url, "--count", "2", "--max-tokens", "5"]
    assert await asyncio.to_thread(client_mod.main, [*args, "--json", "--wait", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(r["accepted"] and r["decision"] == "demo" for r in rows)
    stack.daemon.mode = "tampered"
    assert await asyncio.to_thread(client_mod.main, [*args, "--prompt", "Hi", "--wait", "1"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("request id") and "invalid" in out
    assert await asyncio.to_thread(client_mod.main, [*args, "--count", "-1"]) == 2


async def test_extra_body_members_reach_the_worker(stack: Stack) -> None:
    """``extra_body`` (the demo sends vLLM's ``ignore_eos``) is merged into every request: with it a request
    generates exactly ``max_tokens`` (long enough for a telemetry fingerprint), stream or not."""
    async with Client(
        stack.lb.url, stack.daemon.url, wait_s=2.0, deadline_s=20.0, extra_body={"ignore_eos": True}
    ) as c:
        outcomes = await c.run(["Rain?"] * 4, stream="alternate", max_tokens=200)
    assert [o.completion_tokens for o in outcomes] == [200] * 4, [o.problems for o in outcomes]


async def test_stream_is_read_to_its_end_before_asking_for_the_verdict(stack: Stack) -> None:
    """tmb (store.ack = commit) sends a response's last byte only once the request is stored; a client that
    stops reading at ``data: [DONE]`` may ask for the verdict of a request the daemon does not know yet."""
    stack.proxy.hold_s = 0.3
    async with Client(stack.lb.url, stack.daemon.url, wait_s=2.0, deadline_s=20.0) as c:
        outcomes = await c.run(["Rain?", "The kitchen."], stream="on", max_tokens=5)
    assert [o.verdict_state for o in outcomes] == ["final", "final"], [o.problems for o in outcomes]
