"""The ingest wakes the verdict engine when a quote attests new batches (no polling), its checks run off the
event loop one request of a node at a time, and a window's batches are decoded once (real swtpm quotes)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from swtpm import SwtpmFactory
from test_probe_support import NODE, NodeEnv, make_node

from probes.chain import Chain
from tmb.ingest.service import Ingest
from tmb.ingest.wakeup import Wakeups
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings
from tmb.verdict.model import Window
from tmb.verdict.signing import load_or_create_key


@pytest.fixture
def node(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Any:
    env = make_node(tmp_path, swtpm_factory)
    yield env
    env.close()


async def test_wakeups_lose_no_notification() -> None:
    w = Wakeups()
    since = w.generation("n")
    w.notify("n")  # between looking and waiting: the wait returns at once
    assert await w.wait("n", since, 5.0)
    assert not await w.wait("n", w.generation("n"), 0.05)
    since = w.generation("n")
    threading.Timer(0.05, w.notify, ("n",)).start()  # the ingest notifies from its worker threads
    t = time.monotonic()
    assert await w.wait("n", since, 5.0) and time.monotonic() - t < 2.0
    assert not await w.wait("other", w.generation("other"), 0.01)


async def test_quote_wakes_the_engine_waiting_for_its_window(node: NodeEnv, tmp_path: Path) -> None:
    ingest = node.ingest()
    now = time.time_ns()
    chain = Chain(NODE)
    batches = [chain.genesis("synthetic")]
    for k in range(3):
        t = now - 3_000_000_000 + k * 1_000_000_000
        samples = SampleBatch.from_columns(
            [t, t + 500_000_000], ["GPU-x"], source="synthetic", power_w=[100.0, 101.0]
        )
        batches.append(chain.seal(samples.encode()))
    taken = await ingest.submit(NODE, ingest.add_batches, {"batches": [b.to_wire() for b in batches]})
    assert taken.accepted and taken.data["accepted"] == [0, 1, 2, 3]
    assert (await ingest.submit(NODE, ingest.add_ima, node.ima_doc())).accepted

    store = AsyncStore(str(tmp_path / "store.db"))
    engine = Engine(store, load_or_create_key(tmp_path / "k.pem"), ingest, [], EngineSettings(wait_s=60.0))
    window = Window(now - 2_900_000_000, now - 1_000_000_000, False)
    waiting = asyncio.create_task(engine._wait_for_evidence(NODE, window))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # nothing attested yet: the engine sleeps until the ingest says so
    nonce = bytes.fromhex((await ingest.submit(NODE, ingest.nonce)).data["nonce"])
    t = time.monotonic()
    quoted = await ingest.submit(NODE, ingest.add_quote, node.quote_doc(nonce, batches[-1].head))
    assert quoted.ok and quoted.attested == 4, quoted.findings
    got = await asyncio.wait_for(waiting, 5.0)
    assert time.monotonic() - t < 5.0
    assert got.summary is not None and got.summary.ok and got.covers_end()
    assert got.quote_id == quoted.data["quote_id"]
    assert {b.seq for b in got.batches} == {1, 2} and all(b.quote_id == got.quote_id for b in got.batches)
    decoded = len(ingest.windows._decoded)
    again = ingest.attested_window(NODE, window.t0_ns, window.t1_ns)
    assert len(ingest.windows._decoded) == decoded and again.samples.encode() == got.samples.encode()
    await store.close()
    ingest.close()


async def test_a_nodes_requests_run_in_order_off_the_loop(node: NodeEnv) -> None:
    ingest: Ingest = node.ingest()
    chain = Chain(NODE)
    batches = [chain.genesis("synthetic")] + [
        chain.seal(SampleBatch.empty("synthetic").encode()) for _ in range(20)
    ]
    loop_thread = threading.get_ident()
    threads: list[int] = []
    add = ingest.add_batches

    def recording(n: str, doc: Any) -> Any:
        threads.append(threading.get_ident())
        return add(n, doc)

    results = await asyncio.gather(
        *(ingest.submit(NODE, recording, {"batches": [b.to_wire()]}) for b in batches)
    )  # each batch alone: any reordering would be refused as a gap
    assert all(r.accepted for r in results), [r.ids for r in results if not r.accepted]
    assert loop_thread not in threads
    ingest.close()


async def test_a_group_of_spans_reads_its_windows_in_one_hop(
    node: NodeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans stored together (one node, windows ending together): once the first span's window is covered,
    the others' windows are read in the same thread hop; each verdict rests on its own window's evidence,
    exactly as read alone."""
    import tmb.verdict.engine as engine_module
    from tmb.spans import Outcome, Span
    from tmb.verdict.engine import widen

    ingest = node.ingest()
    now = time.time_ns()
    chain = Chain(NODE)
    batches = [chain.genesis("synthetic")]
    for k in range(4):
        t = now - 4_000_000_000 + k * 1_000_000_000
        ts = [t + j * 50_000_000 for j in range(20)]
        samples = SampleBatch.from_columns(
            ts, ["GPU-x"], source="synthetic", power_w=[100.0 + j for j in range(20)]
        )
        batches.append(chain.seal(samples.encode()))
    assert (
        await ingest.submit(NODE, ingest.add_batches, {"batches": [b.to_wire() for b in batches]})
    ).accepted
    assert (await ingest.submit(NODE, ingest.add_ima, node.ima_doc())).accepted
    nonce = bytes.fromhex((await ingest.submit(NODE, ingest.nonce)).data["nonce"])
    assert (await ingest.submit(NODE, ingest.add_quote, node.quote_doc(nonce, batches[-1].head))).ok

    spans = [
        Span(
            f"{i:032x}",
            None,
            "w1",
            NODE,
            ("GPU-x",),
            None,
            None,
            "GET",
            "/",
            now - 3_000_000_000 + i * 7_000_000,
            None,
            now - 1_500_000_000 + i * 3_000_000,
            200,
            0,
            0,
            None,
            Outcome.OK,
        )
        for i in range(6)
    ]
    spans = [dataclasses.replace(s, first_byte_ns=s.start_ns + 1) for s in spans]
    hops = 0
    real_to_thread = asyncio.to_thread

    async def counted(fn: Any, /, *args: Any) -> Any:
        nonlocal hops
        hops += 1
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(engine_module.asyncio, "to_thread", counted)
    store = AsyncStore(str(tmp_path / "store.db"))
    engine = Engine(store, load_or_create_key(tmp_path / "k.pem"), ingest, [], EngineSettings(wait_s=5.0))
    for s in spans:
        store.add_span(s)
    await engine.on_spans(spans)
    assert hops == 1  # one hop for the six windows (each read on its own: six hops)
    for s in spans:
        record = await store.lookup(s.id)
        assert record.state == "final" and record.doc is not None
        doc = json.loads(record.doc)
        window = widen(s, 1.0, engine.settings.grid_s)
        assert (doc["window"]["t0_ns"], doc["window"]["t1_ns"]) == (window.t0_ns, window.t1_ns)
        alone = ingest.attested_window(NODE, window.t0_ns, window.t1_ns)
        assert alone.covers_end() and doc["attestation"]["verified"] is True
        refs = {r.kind: r.digest for r in await store.evidence(s.id)}
        assert refs["telemetry_window"] == hashlib.sha256(alone.samples.encode()).hexdigest()
    await store.close()
    ingest.close()
