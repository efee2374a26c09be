"""A node reboots (swtpm power-cycled: resetCount grows, PCRs restart, a new IMA log): the daemon starts a new
boot epoch on the first verified quote of the new boot, the probe ships the new log from its start, and the
node is attested again without an operator; the old boot's IMA bytes are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from swtpm import SwtpmFactory
from test_probe_e2e import wait_until
from test_probe_support import ENGINE_EXE, NODE, PROBE_BYTES, PROBE_PATH, NodeEnv, make_node, serve

from probes.agent import Probe
from tmb.attest.ima_build import LogBuilder
from tmb.events import Event
from tmb.ingest.routes import status_of
from tmb.ingest.service import Ingest
from tmb.ingest.wire import Head


async def run_until(env: NodeEnv, ingest: Ingest, url: str, cond: Any) -> Probe:
    probe = Probe(env.probe_config(url))
    stop = asyncio.Event()
    task = asyncio.create_task(probe.run(stop))
    try:
        await wait_until(lambda: cond(probe))
    finally:
        stop.set()
        await task
    return probe


def _last(ingest: Ingest) -> dict[str, Any]:
    last = ingest.store.last_quote(NODE)
    assert last is not None
    return last


@pytest.mark.parametrize(
    ("orderly", "longer"),
    [(True, True), (False, True), (False, False)],
    ids=["orderly", "unclean", "same-length"],
)
async def test_reboot_starts_a_new_epoch_and_the_node_is_attested_again(
    tmp_path: Path, swtpm_factory: SwtpmFactory, orderly: bool, longer: bool
) -> None:
    """``longer``: the old boot's log runs on past what the new one will hold; else both logs are the same
    length, so the old boot's offset is a record boundary of the new log too (the restarted probe may take
    it first and must still go back to 0 when the daemon starts the new epoch)."""
    env = make_node(tmp_path, swtpm_factory)
    events: list[Event] = []
    ingest = env.ingest(events=events.append)
    async with serve(ingest) as url:
        await run_until(env, ingest, url, lambda p: p.stats.quotes_acked >= 2 and _last(ingest).get("ok"))
        if longer:
            env.measure(ENGINE_EXE, b"engine")
            await run_until(env, ingest, url, lambda p: _last(ingest).get("ok") and p.stats.quotes_acked >= 2)
        before = _last(ingest)
        old_end = ingest.store.node(NODE).ima_end  # type: ignore[union-attr]
        old_log = env.log_path.read_bytes()
        held = ingest.store.node(NODE)
        assert (
            held is not None and held.segment is not None and held.seq is not None and held.head is not None
        )
        old_head = Head(held.segment, held.seq, held.head)
        assert old_end == len(old_log) and events == []

        # the reboot: the TPM resets (unclean: no TPM2_Shutdown, the clock may restart lower), a new IMA log
        env.tpm.close()
        env.swtpm.reboot(orderly=orderly)
        env.tpm = env.swtpm.client()
        env.log.close()
        env.log = open(env.log_path, "wb")  # noqa: SIM115 - closed by env.close
        env.builder = LogBuilder(env.log)
        env.measure("boot_aggregate", b"boot")
        env.measure(PROBE_PATH, PROBE_BYTES)
        env.measure(ENGINE_EXE, b"engine")
        env.mount_model()
        assert (
            (len(env.log_path.read_bytes()) < old_end)
            if longer
            else (len(env.log_path.read_bytes()) == old_end)
        )

        probe = await run_until(
            env,
            ingest,
            url,
            lambda p: _last(ingest).get("ok") and _last(ingest)["reset_count"] > before["reset_count"],
        )
    after = _last(ingest)
    assert after["ok"] and after["pcr_matched"], after
    # rebooted once, then attested again once (the first quote of the new boot comes before its IMA log:
    # the node is recorded as rebooted, not told unattested)
    assert [e.kind for e in events] == ["node.rebooted", "node.attested"], events
    assert events[-1].data["after"] == "rebooted"
    assert all(e.subject == NODE for e in events)
    assert ingest.store.node(NODE).ima_end == len(env.log_path.read_bytes())  # type: ignore[union-attr]
    refused = {f["id"] for r in probe.stats.refused for f in r["findings"]}
    assert refused <= {"ingest.quote_head_unknown", "chain.unknown_segment", "pcr.mismatch"}, refused
    if longer:  # the old boot's IMA bytes, offered at the old log's offsets: refused
        out = ingest.add_ima(NODE, {"offset": old_end, "data": ""})
        assert out.refusal is not None and out.refusal.id == "ima.delta_gap"
    # a quote of the new boot's TPM over a chain head of the old boot: refused, it attests nothing
    old_batch = ingest.store.batch(NODE, old_head.segment, old_head.seq)
    assert old_batch is not None
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    out = ingest.add_quote(NODE, env.quote_doc(nonce, old_head))
    assert out.refusal is not None and out.refusal.id == "epoch.old_boot", out.findings
    assert status_of("epoch.old_boot") == 409
    again = ingest.store.batch(NODE, old_head.segment, old_head.seq)
    assert again is not None and again.quote_id == old_batch.quote_id  # attested by nothing new
    # the old boot's entries (the extra measurement) are forgotten; the new boot's verified quote attests
    rows = [r for r in ingest.store.batches_overlapping(NODE, 0, 1 << 62) if r.quote_id == after["quote_id"]]
    assert rows, "no batch attested by the new boot's quote"
    env.close()


def test_silent_node_becomes_stale_and_recovers(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    """No verified quote for stale_after_s: stale (once-raised event, a node.stale finding in windows no quote
    covers, the metrics gauge); a verified quote ends it; a daemon restart does not raise it again."""
    from prometheus_client import CollectorRegistry, generate_latest
    from test_ingest_attacks import post, quote, sealed

    from tmb.daemon.metrics import StaleCollector

    env = make_node(tmp_path, swtpm_factory)
    now = [10**18]
    events: list[Event] = []
    ingest = env.ingest(stale_after_s=5.0, clock_ns=lambda: now[0], events=events.append)
    registry = CollectorRegistry()
    registry.register(StaleCollector(ingest.stale_nodes))
    s = 10**9
    now[0] += 4 * s
    assert ingest.check_stale() == [] and events == []
    now[0] += 2 * s  # registered 6 s ago, never quoted
    assert ingest.check_stale() == [NODE]
    assert ingest.check_stale() == [NODE]  # still stale: raised once
    assert [e.kind for e in events] == ["node.stale"]
    assert f'tmb_node_stale{{node="{NODE}"}} 1.0' in generate_latest(registry).decode()
    window = ingest.attested_window(NODE, now[0] - s, now[0])
    assert window.summary is None and "node.stale" in [f.id for f in window.findings]
    # a verified quote: no longer stale
    _, bs = sealed(1)
    post(ingest, *bs)
    back = quote(env, ingest, bs[-1].head)
    assert back.data["ok"]
    assert [e.kind for e in events] == ["node.stale", "node.attested"]  # attested again, told once
    assert events[-1].data == {"quote_id": back.data["quote_id"], "after": "stale"}
    assert quote(env, ingest, bs[-1].head).data["ok"] and len(events) == 2
    now[0] += s
    assert ingest.check_stale() == [] and "tmb_node_stale{" not in generate_latest(registry).decode()
    assert "tmb_nodes_stale 0.0" in generate_latest(registry).decode()
    # silent again: stale again, raised again
    now[0] += 6 * s
    kinds = ["node.stale", "node.attested", "node.stale"]
    assert ingest.check_stale() == [NODE] and [e.kind for e in events] == kinds
    ingest.close()
    again: list[Event] = []
    ingest = env.ingest(stale_after_s=5.0, clock_ns=lambda: now[0], events=again.append)
    assert ingest.check_stale() == [NODE] and again == []  # the restart remembers it was raised
    ingest.close()
    env.close()


def test_unattested_event_on_the_quote_that_breaks_the_chain(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    from test_ingest_attacks import post, quote, sealed

    env = make_node(tmp_path, swtpm_factory)
    events: list[Event] = []
    ingest = env.ingest(events=events.append)
    _, bs = sealed(1)
    post(ingest, *bs)
    assert quote(env, ingest, bs[-1].head).data["ok"] and events == []
    env.measure("/usr/bin/evil", b"not allowed")
    out = quote(env, ingest, bs[-1].head)
    assert not out.data["ok"] and [e.kind for e in events] == ["node.unattested"]
    assert events[0].data["why"], events[0].data
    quote(env, ingest, bs[-1].head)  # still unattested: not raised again
    assert [e.kind for e in events] == ["node.unattested"]
    ingest.close()
    env.close()
