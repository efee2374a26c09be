"""Signed webhook notifications (tmb.daemon.notify) against a real aiohttp receiver on 127.0.0.1 that
checks each signature with `cryptography` itself: delivery, retries (receiver down, 5xx, 408/429),
permanent 4xx refusals, the attempts bound, the kinds filter, the bounded outbox, events from other
threads, kill -9 of a process holding queued events, and the receiver's check of tampered or replayed
notifications. Backoff is milliseconds here; every wait is on a condition, bounded generously."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from time import time_ns
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from prometheus_client import CollectorRegistry, generate_latest

from tmb.config import NotifyConfig
from tmb.daemon.metrics import NotifyMetrics
from tmb.daemon.notify import (
    FORMAT,
    NotificationError,
    Notifier,
    keys_from_document,
    signed_request,
    verify_notification,
)
from tmb.daemon.outbox import Delivery
from tmb.events import Event
from tmb.verdict.signing import Signer, load_or_create_key

HOST = "127.0.0.1"
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0}


async def until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Wait for ``cond`` (polled every 10 ms), failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)


def check_signature(body: bytes, headers: dict[str, str], public: Ed25519PublicKey) -> None:
    """The receiver's check, with `cryptography` alone: Ed25519 over the exact body bytes."""
    sig = headers["Tmb-Signature"]
    assert sig.startswith("ed25519=")
    public.verify(base64.b64decode(sig.removeprefix("ed25519=")), body)  # raises InvalidSignature


class Receiver:
    """A webhook receiver: answers the statuses of ``script`` in turn, then ``then``; keeps every request
    and checks every signature with the daemon's public key."""

    def __init__(
        self,
        public: Ed25519PublicKey,
        script: list[int | tuple[int, dict[str, str]]] | None = None,
        then: int = 200,
    ) -> None:
        self.public = public
        self.script = list(script or [])
        self.then = then
        self.got: list[tuple[bytes, dict[str, str], int]] = []
        self.bad: list[str] = []  # requests whose signature did not verify
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        try:
            check_signature(body, headers, self.public)
        except Exception as exc:  # the notifier retries a 500; the fixture fails the test
            self.bad.append(repr(exc))
            return web.Response(status=500)
        step = self.script.pop(0) if self.script else self.then
        status, reply = step if isinstance(step, tuple) else (step, {})
        self.got.append((body, headers, status))
        return web.Response(status=status, headers=reply)

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, port)
        await site.start()
        return f"http://{HOST}:{self.runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def docs(self, status: int | None = None) -> list[dict[str, Any]]:
        return [json.loads(b) for b, _, s in self.got if status is None or s == status]


@pytest.fixture
def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


@pytest.fixture
async def receiver(signer: Signer) -> AsyncIterator[Receiver]:
    r = Receiver(Ed25519PublicKey.from_public_bytes(signer.public.raw))
    yield r
    await r.stop()
    assert r.bad == []


def make(tmp_path: Path, signer: Signer, urls: list[str], **settings: Any) -> tuple[Notifier, NotifyMetrics]:
    metrics = NotifyMetrics(CollectorRegistry())
    cfg = NotifyConfig(urls=tuple(urls), **(FAST | settings))
    n = Notifier(
        cfg, tmp_path / "notify.sqlite3", signer, "tmb-test/daemon", metrics=metrics, rng=lambda: 0.5
    )
    return n, metrics


def value(metrics: NotifyMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stale(i: int = 0) -> Event:
    return Event("node.stale", f"node-{i}", time_ns(), {"missed_periods": 5, "i": i})


async def test_an_event_is_delivered_signed_with_the_daemon_key(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        n.emit(stale(7))
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 1, what="delivery")
    finally:
        await n.stop()
        n.close()
    [(body, headers, status)] = receiver.got
    assert status == 200
    doc = json.loads(body)
    assert doc["format"] == FORMAT and doc["seq"] == 1 and doc["attempt"] == 1 and doc["to"] == url
    assert doc["daemon"] == {"origin": "tmb-test/daemon", "key_id": signer.key_id}
    assert doc["event"]["kind"] == "node.stale" and doc["event"]["subject"] == "node-7"
    assert doc["event"]["data"] == {"missed_periods": 5, "i": 7}
    assert headers["Tmb-Notification-Id"] == doc["id"] and len(doc["id"]) == 32
    assert headers["Tmb-Key-Id"] == signer.key_id and headers["Content-Type"] == "application/json"
    assert abs(int(headers["Tmb-Timestamp"]) - doc["sent_ns"] // 10**9) <= 1
    # the receiver's helper, with the keys as GET /v1/keys publishes them
    keys = keys_from_document({"keys": [signer.public.to_dict()]})
    assert verify_notification(body, headers, keys, url=url) == doc
    assert n.outbox is not None and n.outbox.counts() == {"pending": 0, "dead": 0, "events": 0}
    assert value(metrics, "tmb_notify_events_total", kind="node.stale") == 1


async def test_tampered_or_replayed_notifications_fail_verification(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    url = await receiver.start()
    n, _ = make(tmp_path, signer, [url])
    await n.start()
    try:
        n.emit(stale())
        await until(lambda: len(receiver.got) == 1, what="delivery")
    finally:
        await n.stop()
        n.close()
    body, headers, _ = receiver.got[0]
    sent = json.loads(body)["sent_ns"]
    key = signer.public.raw

    def reason(b: bytes, h: dict[str, str], keys: Any = key, **kw: Any) -> str:
        with pytest.raises(NotificationError) as info:
            verify_notification(b, h, keys, now_ns=sent, **kw)
        return info.value.reason

    assert verify_notification(body, headers, key, now_ns=sent)["event"]["kind"] == "node.stale"
    assert reason(body.replace(b"node-0", b"node-1"), headers) == "notify.bad_signature"
    assert reason(body + b" ", headers) == "notify.bad_signature"
    sig = base64.b64decode(headers["Tmb-Signature"].removeprefix("ed25519="))
    flipped = base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()
    assert reason(body, {**headers, "Tmb-Signature": "ed25519=" + flipped}) == "notify.bad_signature"
    assert reason(body, {**headers, "Tmb-Signature": "ed25519=???"}) == "notify.bad_signature"
    other = Ed25519PrivateKey.generate().public_key()
    assert reason(body, headers, other) == "notify.unknown_key"  # another daemon's key
    assert reason(body, headers, {"ab" * 32: key}) == "notify.unknown_key"
    # signed by someone else who names our key id: the signature check refuses it
    forger = Signer(Ed25519PrivateKey.generate())
    forged = {**headers, "Tmb-Signature": "ed25519=" + base64.b64encode(forger.sign_bytes(body)).decode()}
    assert reason(body, forged) == "notify.bad_signature"
    assert reason(body, {k: v for k, v in headers.items() if k != "Tmb-Signature"}) == "notify.missing_header"
    assert reason(body, {**headers, "Tmb-Notification-Id": "0" * 32}) == "notify.id_mismatch"
    # a replay: the same signed request, an hour later
    with pytest.raises(NotificationError) as info:
        verify_notification(body, headers, key, now_ns=sent + 3600 * 10**9)
    assert info.value.reason == "notify.stale"
    assert reason(body, headers, url="http://127.0.0.1:1/other") == "notify.wrong_receiver"
    # a verdict-like document signed with the same key is not a notification
    doc = json.dumps({"format": "tmb-verdict/1"}).encode()
    signed = {**headers, "Tmb-Signature": "ed25519=" + base64.b64encode(signer.sign_bytes(doc)).decode()}
    assert reason(doc, signed) == "notify.wrong_format"
    assert reason(b"x" * (1024 * 1024 + 1), headers) == "notify.too_large"


async def test_a_receiver_that_is_down_gets_it_once_it_is_up(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    port = free_port()
    url = f"http://{HOST}:{port}/hook"
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        n.emit(stale())
        await until(lambda: value(metrics, "tmb_notify_retries_total") >= 2, what="two failed attempts")
        assert receiver.got == [] and value(metrics, "tmb_notify_delivered_total") == 0
        assert await receiver.start(port) == url
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 1, what="delivery")
    finally:
        await n.stop()
        n.close()
    [doc] = receiver.docs()
    assert doc["attempt"] >= 3 and doc["seq"] == 1


async def test_5xx_then_success_is_retried_with_the_same_id(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    receiver.script = [500, 503, 408, 429]
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        n.emit(stale())
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 1, what="delivery")
    finally:
        await n.stop()
        n.close()
    docs = receiver.docs()
    assert [s for _, _, s in receiver.got] == [500, 503, 408, 429, 200]
    assert [d["attempt"] for d in docs] == [1, 2, 3, 4, 5]
    assert len({d["id"] for d in docs}) == 1 and {d["seq"] for d in docs} == {1}
    assert len({d["sent_ns"] for d in docs}) == 5  # each attempt signed anew
    assert value(metrics, "tmb_notify_retries_total") == 4


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_a_4xx_refusal_is_permanent(
    tmp_path: Path, signer: Signer, receiver: Receiver, status: int
) -> None:
    receiver.then = status
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        n.emit(stale())
        await until(lambda: value(metrics, "tmb_notify_dead_total", reason="rejected") == 1, what="dead")
        assert n.outbox is not None
        assert n.outbox.dead_deliveries() == [(1, url, 1, f"HTTP {status}")]
        assert n.outbox.counts()["dead"] == 1
    finally:
        await n.stop()
        n.close()
    assert len(receiver.got) == 1 and value(metrics, "tmb_notify_retries_total") == 0


async def test_after_max_attempts_the_delivery_is_dead_and_counted(
    tmp_path: Path, signer: Signer, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.then = 502
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url], max_attempts=3)
    await n.start()
    try:
        with caplog.at_level(logging.WARNING, logger="tmb.notify"):
            n.emit(stale())
            await until(lambda: value(metrics, "tmb_notify_dead_total", reason="attempts") == 1, what="dead")
        text = generate_latest(metrics.registry).decode()
    finally:
        await n.stop()
        n.close()
    assert [s for _, _, s in receiver.got] == [502, 502, 502]
    [said] = [
        r.getMessage() for r in caplog.records if "is dead after 3 attempts (attempts)" in r.getMessage()
    ]
    assert "/<redacted>" in said and "/hook" not in said  # the URL's path may hold a secret: not logged
    assert 'tmb_notify_dead_total{reason="attempts"} 1.0' in text
    assert 'tmb_notify_outbox{state="dead"} 1.0' in text


async def test_max_age_bounds_the_retries(tmp_path: Path, signer: Signer, receiver: Receiver) -> None:
    receiver.then = 503
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url], max_age_s=0.001, max_attempts=1000)
    n.emit(stale())
    recorded = time_ns()
    await until(lambda: time_ns() - recorded > 10**7, what="the event being older than max_age_s")
    await n.start()
    try:
        await until(lambda: value(metrics, "tmb_notify_dead_total", reason="age") == 1, what="dead")
    finally:
        await n.stop()
        n.close()
    assert len(receiver.got) == 1


async def test_every_receiver_gets_it_and_one_down_does_not_hold_up_the_other(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    url = await receiver.start()
    down = f"http://{HOST}:{free_port()}/hook"
    n, metrics = make(tmp_path, signer, [down, url], max_attempts=1000)
    await n.start()
    try:
        for i in range(5):
            n.emit(stale(i))
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 5, what="deliveries")
        assert n.outbox is not None and n.outbox.counts()["pending"] == 5  # the ones to the receiver down
    finally:
        await n.stop()
        n.close()
    assert sorted(d["event"]["subject"] for d in receiver.docs()) == [f"node-{i}" for i in range(5)]
    assert sorted(d["seq"] for d in receiver.docs()) == [1, 2, 3, 4, 5]


async def test_the_kinds_filter(tmp_path: Path, signer: Signer, receiver: Receiver) -> None:
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url], kinds=("node.stale", "verdict.model_mismatch"))
    n.emit(Event("node.rebooted", "node-1", time_ns(), {"boot": 2}))
    n.emit(stale(1))
    n.emit(Event("verdict.model_mismatch", "ab" * 16, time_ns()))
    assert n.outbox is not None and n.outbox.counts()["events"] == 2  # the reboot was not recorded
    await n.start()  # events recorded before the start are delivered once it runs
    try:
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 2, what="deliveries")
    finally:
        await n.stop()
        n.close()
    assert sorted(d["event"]["kind"] for d in receiver.docs()) == ["node.stale", "verdict.model_mismatch"]


async def test_the_outbox_is_bounded_dead_first_and_drops_are_counted_and_logged(
    tmp_path: Path, signer: Signer, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.then = 400
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url], max_queued=3)
    assert n.outbox is not None
    await n.start()
    try:
        n.emit(stale(0))
        n.emit(stale(1))
        await until(lambda: value(metrics, "tmb_notify_dead_total", reason="rejected") == 2, what="dead")
    finally:
        await n.stop()
    # not delivering now: the outbox holds 2 dead events; three more fill it, the dead go first
    for i in range(2, 5):
        n.emit(stale(i))
    assert n.outbox.counts() == {"pending": 3, "dead": 0, "events": 3}
    assert value(metrics, "tmb_notify_dropped_total") == 0
    with caplog.at_level(logging.ERROR, logger="tmb.notify"):
        n.emit(stale(5))  # full of undelivered events: the oldest goes, loudly
    assert value(metrics, "tmb_notify_dropped_total") == 1
    assert any("dropped undelivered event 3 (node.stale)" in r.getMessage() for r in caplog.records)
    subjects = [json.loads(d.event)["subject"] for d in n.outbox.due(time_ns() + 10**12, 10)]
    assert subjects == ["node-3", "node-4", "node-5"]
    n.close()


async def test_emit_from_other_threads_wakes_the_delivery(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        threads = [threading.Thread(target=n.emit, args=(stale(i),)) for i in range(20)]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 20, what="deliveries")
    finally:
        await n.stop()
        n.close()
    assert sorted(d["seq"] for d in receiver.docs()) == list(range(1, 21))


async def test_emit_never_raises(tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture) -> None:
    n, metrics = make(tmp_path, signer, ["http://127.0.0.1:9/hook"])
    n.emit(Event("node.stale", "node-1", 1, {"odd": {1, 2}, "nan": float("nan"), "raw": b"\x00"}))
    assert n.outbox is not None
    [d] = n.outbox.due(time_ns(), 10)
    assert json.loads(d.event)["data"] == {"odd": [1, 2], "nan": "nan", "raw": "00"}
    n.emit(Event("node.stale", "node-2", 1, {"big": "x" * 100_000}))  # over 64 KiB: sent without its data
    big = json.loads(n.outbox.due(time_ns(), 10)[1].event)
    assert big["data"]["truncated"] is True and big["data"]["bytes"] > 100_000
    n.close()
    with caplog.at_level(logging.ERROR, logger="tmb.notify"):
        n.emit(stale())  # the outbox is closed: logged and counted, not raised
    assert value(metrics, "tmb_notify_lost_total") == 1
    assert any("it is lost" in r.getMessage() for r in caplog.records)
    n.emit("not an event")  # type: ignore[arg-type]  # a caller's bug: still logged, counted, not raised
    assert value(metrics, "tmb_notify_lost_total") == 2
    inert = Notifier(NotifyConfig(), tmp_path / "none.sqlite3", signer, "x")
    inert.emit(stale())  # no receivers: nothing recorded, no file
    assert inert.outbox is None and not (tmp_path / "none.sqlite3").exists()


async def test_urls_removed_from_the_config_are_abandoned(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    url = await receiver.start()
    old, _ = make(tmp_path, signer, ["http://127.0.0.1:9/gone", url])
    old.emit(stale())
    old.close()
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 1, what="delivery")
    finally:
        await n.stop()
    assert value(metrics, "tmb_notify_dead_total", reason="url_removed") == 1
    assert n.outbox is not None
    assert [(u, e) for _, u, _, e in n.outbox.dead_deliveries()] == [
        ("http://127.0.0.1:9/gone", "the URL is no longer in [notify] urls")
    ]
    n.close()


CHILD = """
import asyncio, sys
from tmb.config import NotifyConfig
from tmb.daemon.notify import Notifier
from tmb.events import Event
from tmb.verdict.signing import load_or_create_key

async def main():
    db, key, url, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = NotifyConfig(urls=(url,), backoff_s=0.01, max_backoff_s=0.05)
    n = Notifier(cfg, db, load_or_create_key(key), "tmb-test/child")
    await n.start()
    for i in range(count):
        n.emit(Event("node.unattested", f"node-{i}", i, {"i": i}))
    print("recorded", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_events_queued_by_a_process_killed_with_sigkill_are_delivered_after_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    key = tmp_path / "key.pem"
    signer = load_or_create_key(key)
    receiver.public = Ed25519PublicKey.from_public_bytes(signer.public.raw)
    receiver.then = 503  # the receiver is overloaded while the first process runs
    url = await receiver.start()
    db = tmp_path / "notify.sqlite3"
    count = 40
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(db),
        str(key),
        url,
        str(count),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)) == b"recorded\n"
        await until(lambda: len(receiver.got) >= 10, what="attempts by the first process")
        proc.send_signal(signal.SIGKILL)  # mid-retry: attempts in flight, none delivered
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {d["id"]: d["event"]["subject"] for d in receiver.docs()}
    receiver.then = 200
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == count, what="deliveries")
    finally:
        await n.stop()
        n.close()
    delivered = receiver.docs(200)
    assert sorted(d["event"]["subject"] for d in delivered) == sorted(f"node-{i}" for i in range(count))
    assert sorted(d["seq"] for d in delivered) == list(range(1, count + 1))
    for d in delivered:  # the same notification as attempted before the kill (receivers dedupe on id)
        if d["id"] in before:
            assert before[d["id"]] == d["event"]["subject"]
    assert set(before) <= {d["id"] for d in delivered}
    assert all(d["daemon"]["key_id"] == signer.key_id for d in delivered)


async def test_the_daemon_delivers_across_a_restart_and_counts_in_metrics(
    tmp_path: Path, receiver: Receiver
) -> None:
    """``tmb serve`` as build_app assembles it: the notifier (the engine's event sink) starts and stops
    with the daemon, an event left undelivered at a stop is delivered after the next start, receivers
    verify with the keys of ``GET /v1/keys``, and ``/metrics`` counts."""
    import aiohttp
    from test_proxy_support import make_config, start_daemon

    receiver.then = 503
    url = await receiver.start()
    config = dataclasses.replace(make_config(tmp_path, []), notify=NotifyConfig(urls=(url,), **FAST))
    runner, daemon = await start_daemon(config)
    try:
        parts = daemon.parts
        receiver.public = Ed25519PublicKey.from_public_bytes(parts.signer.public.raw)
        assert parts.engine.events == parts.notifier.emit  # model_mismatch verdicts are told to it
        parts.notifier.emit(stale(3))
        await until(lambda: len(receiver.got) >= 2, what="failed attempts")
    finally:
        await runner.cleanup()
    assert (tmp_path / "store.notify.sqlite3").exists()  # beside the store's file
    receiver.then = 200
    runner, daemon = await start_daemon(config)
    try:
        await until(lambda: receiver.docs(200) != [], what="delivery after the restart")
        async with aiohttp.ClientSession() as s:
            async with s.get(daemon.url + "/v1/keys") as r:
                keys = keys_from_document(await r.json())
            # the receiver's 200 arrives before the notifier records the delivery: wait for the count
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30.0
            while True:
                async with s.get(daemon.url + "/metrics") as r:
                    text = await r.text()
                if "tmb_notify_delivered_total 1.0" in text or loop.time() > deadline:
                    break
                await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
    body, headers, _ = receiver.got[-1]
    doc = verify_notification(body, headers, keys, url=url)
    assert doc["event"]["subject"] == "node-3" and doc["attempt"] >= 2  # one failure recorded at least
    assert doc["id"] == receiver.docs()[0]["id"]  # the same notification as before the restart
    assert "tmb_notify_delivered_total 1.0" in text and 'tmb_notify_outbox{state="pending"} 0.0' in text


async def test_the_documented_receiver_accepts_dedupes_and_refuses(tmp_path: Path, signer: Signer) -> None:
    """docs/verdict.md's receiver (cryptography alone), run as written against real deliveries."""
    import aiohttp

    doc = (Path(__file__).resolve().parents[2] / "docs" / "verdict.md").read_text(encoding="utf-8")
    code = doc.split("<!-- receiver-example -->\n```python\n", 1)[1].split("```", 1)[0]
    space: dict[str, Any] = {}
    exec(compile(code, "docs/verdict.md", "exec"), space)  # our own documentation, as written
    handled: list[dict[str, Any]] = []
    port = free_port()
    url = f"http://{HOST}:{port}/tmb"
    keys = keys_from_document({"keys": [signer.public.to_dict()]})
    runner = web.AppRunner(space["receiver"](keys, url, handled.append), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        n.emit(stale(1))
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 1, what="delivery")
        assert [e["subject"] for e in handled] == ["node-1"]
        assert n.outbox is not None
        # what an attacker could send: a replay of a signed request, a tampered one, one for elsewhere
        sent = Delivery(9, "cd" * 16, url, json.dumps(stale(2).to_dict()), time_ns(), 0)
        body, headers = signed_request(signer, "tmb-test/daemon", sent, time_ns())
        async with aiohttp.ClientSession() as s:

            async def post(b: bytes, h: dict[str, str]) -> int:
                async with s.post(url, data=b, headers=h) as r:
                    return r.status

            assert await post(body, headers) == 204 and len(handled) == 2
            assert await post(body, headers) == 204 and len(handled) == 2  # a duplicate: not handled again
            assert await post(body.replace(b"node-2", b"node-9"), headers) == 400
            elsewhere = dataclasses.replace(sent, id="ef" * 16, url="http://10.0.0.1/tmb")
            b2, h2 = signed_request(signer, "tmb-test/daemon", elsewhere, time_ns())
            assert await post(b2, h2) == 400  # signed, but for another receiver
            old, h3 = signed_request(
                signer, "tmb-test/daemon", dataclasses.replace(sent, id="aa" * 16), time_ns() - 10**12
            )
            assert await post(old, h3) == 400  # signed 1000 s ago
            forger = Signer(Ed25519PrivateKey.generate())
            b4, h4 = signed_request(
                forger, "tmb-test/daemon", dataclasses.replace(sent, id="bb" * 16), time_ns()
            )
            assert await post(b4, {**h4, "Tmb-Key-Id": signer.key_id}) == 400
        assert [e["subject"] for e in handled] == ["node-1", "node-2"]
    finally:
        await n.stop()
        n.close()
        await runner.cleanup()


async def test_a_receivers_retry_after_is_honoured(
    tmp_path: Path, signer: Signer, receiver: Receiver
) -> None:
    receiver.script = [(429, {"Retry-After": "1"})]
    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url], max_backoff_s=5.0)  # backoff alone: 10 ms
    await n.start()
    try:
        n.emit(stale())
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 1, what="delivery")
    finally:
        await n.stop()
        n.close()
    first, second = receiver.docs()
    assert second["sent_ns"] - first["sent_ns"] >= 10**9  # waited as asked, not the 10 ms backoff


async def test_tmb_notify_verify_checks_a_received_notification(
    tmp_path: Path, signer: Signer, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    from tmb.cli import main

    url = await receiver.start()
    n, metrics = make(tmp_path, signer, [url])
    await n.start()
    try:
        n.emit(stale(4))
        await until(lambda: value(metrics, "tmb_notify_delivered_total") == 1, what="delivery")
    finally:
        await n.stop()
        n.close()
    body, headers, _ = receiver.got[0]
    (tmp_path / "body.json").write_bytes(body)
    (tmp_path / "headers.json").write_text(json.dumps(headers))
    (tmp_path / "headers.txt").write_text(
        "HTTP/1.1 POST\n" + "".join(f"{k}: {v}\n" for k, v in headers.items())
    )
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [signer.public.to_dict()]}))
    (tmp_path / "other.pem").write_text(Signer(Ed25519PrivateKey.generate()).public.to_dict()["pem"])
    (tmp_path / "tampered.json").write_bytes(body.replace(b"node-4", b"node-5"))

    def run(*argv: str) -> tuple[int, str]:
        code = main(["notify", "verify", *argv])
        out = capsys.readouterr()
        return code, out.out + out.err

    keys = ["--key", str(tmp_path / "keys.json")]
    code, out = run(
        str(tmp_path / "body.json"), "--headers", str(tmp_path / "headers.json"), *keys, "--url", url
    )
    assert code == 0 and "node.stale node-4" in out and signer.key_id[:16] in out
    code, out = run(str(tmp_path / "body.json"), "--headers", str(tmp_path / "headers.txt"), *keys)
    assert code == 0
    code, out = run(str(tmp_path / "tampered.json"), "--headers", str(tmp_path / "headers.json"), *keys)
    assert code == 1 and out.startswith("FAIL notify.bad_signature")
    code, out = run(
        str(tmp_path / "body.json"),
        "--headers",
        str(tmp_path / "headers.json"),
        "--key",
        str(tmp_path / "other.pem"),
    )
    assert code == 1 and out.startswith("FAIL notify.unknown_key")
    code, out = run(
        str(tmp_path / "body.json"), "--headers", str(tmp_path / "headers.json"), *keys, "--url", "http://x/y"
    )
    assert code == 1 and out.startswith("FAIL notify.wrong_receiver")
    old = Delivery(3, "ab" * 16, url, json.dumps(stale(9).to_dict()), 0, 0)
    old_body, old_headers = signed_request(signer, "tmb-test/daemon", old, time_ns() - 86400 * 10**9)
    (tmp_path / "old.json").write_bytes(old_body)
    (tmp_path / "old-headers.json").write_text(json.dumps(old_headers))
    code, out = run(str(tmp_path / "old.json"), "--headers", str(tmp_path / "old-headers.json"), *keys)
    assert code == 1 and out.startswith("FAIL notify.stale")  # a day old
    code, out = run(
        str(tmp_path / "old.json"), "--headers", str(tmp_path / "old-headers.json"), *keys, "--any-time"
    )
    assert code == 0 and "node.stale node-9" in out  # checking a stored notification later
    code, out = run(str(tmp_path / "missing"), "--headers", str(tmp_path / "headers.json"), *keys)
    assert code == 2 and "cannot read the body" in out and "Traceback" not in out
    code, out = run(str(tmp_path / "body.json"), "--headers", str(tmp_path / "body.json"), *keys)
    assert code == 2 and "headers must be a JSON object of strings" in out


async def test_an_outbox_that_cannot_be_opened_stops_the_daemon_with_a_clear_error(tmp_path: Path) -> None:
    from test_proxy_support import make_config

    from tmb.daemon.app import build_app
    from tmb.daemon.outbox import OutboxError

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database" * 100)
    for db, says in ((tmp_path / "missing" / "o.sqlite3", "unable to open"), (garbage, "not a database")):
        notify = NotifyConfig(urls=("http://127.0.0.1:9/hook",), db=str(db))
        config = dataclasses.replace(make_config(tmp_path, []), notify=notify)
        with pytest.raises(OutboxError) as info:
            await build_app(config)
        assert "cannot open the notification outbox" in info.value.message and says in info.value.message
        assert "Traceback" not in info.value.diagnostics()
