"""End to end: the probe (synthetic telemetry, real swtpm, IMA log file) ships to the ingest daemon over
127.0.0.1; batches become attested by verified quotes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from swtpm import SwtpmFactory
from test_probe_support import NODE, ROOT, make_node, serve

from probes.agent import Probe


async def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_probe_batches_become_attested(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = make_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    async with serve(ingest) as url:
        probe = Probe(env.probe_config(url))
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await wait_until(
            lambda: probe.stats.quotes_acked >= 2 and ingest.store.count_batches(NODE, attested=True) >= 4
        )
        stop.set()
        await task
    assert probe.stats.refused == [], probe.stats.refused
    last = ingest.store.last_quote(NODE)
    assert last is not None and last["ok"], last
    assert last["pcr10"] == env.tpm.pcr_read([10]).get("sha256", 10).hex()
    rows = [r for r in ingest.store.batches_overlapping(NODE, 0, 1 << 62) if r.quote_id is not None]
    t0, t1 = min(r.t0_ns for r in rows if r.t0_ns), max(r.t1_ns for r in rows if r.t1_ns) + 1
    window = ingest.attested_window(NODE, t0, t1)
    samples, summary, findings = window.samples, window.summary, window.findings
    assert window.quote_id == summary.quote_id if summary else False
    assert {(b.segment, b.seq) for b in window.batches} >= {(r.segment, r.seq) for r in rows if r.t0_ns}
    assert summary is not None and summary.ok and summary.verity_ok and summary.policy_ok, findings
    assert summary.verity == {"model@1": ROOT}  # the commitment satisfied, with the root the node mounted
    assert 0 < summary.quote_time_ns <= time.time_ns()
    assert len(samples) >= 4 and samples.synthetic and samples.source == "synthetic"
    # the genesis (seq 0, no samples) is covered too
    seg = rows[0].segment
    assert ingest.store.batch(NODE, seg, 0).quote_id is not None
    # the process bindings (bind_pids: this process) are covered by the quotes and in effect, none unquoted
    state = ingest.store.node(NODE).state
    assert state.bindings_sha256 is not None, state
    covered = {r.meta.get("bindings") for r in ingest.store.records(NODE, "quote")}
    assert state.bindings_sha256 in covered
    assert {r.digest.hex() for r in ingest.store.records(NODE, "bindings")} >= covered - {None}
    assert not [f for f in findings if f.id.startswith("binding.")], findings
    env.close()
