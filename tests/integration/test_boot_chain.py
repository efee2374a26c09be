"""The boot chain end to end: a real swtpm booted from a UEFI event log (PCRs 0-9 extended with exactly what
the log says), an IMA log whose boot_aggregate is computed from those PCRs, the real probe shipping both
to the real ingest over 127.0.0.1. A quote whose PCRs 0-9 do not replay from the event log, or whose IMA
log was not started by this boot's kernel, attests nothing; so, when one is required, does a node without
an event log. Also: the event log writer round-trips through the parser."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from swtpm import SwtpmFactory
from test_probe_e2e import wait_until
from test_probe_support import NODE, PROBE_BYTES, PROBE_PATH, ROOT, SALT, NodeEnv, serve

from probes import agent
from probes.agent import Probe
from probes.config import ProbeConfig
from probes.tpm import AK_HANDLE
from tmb.attest.bootagg import boot_aggregate
from tmb.attest.eventlog import check_pcrs, read_eventlog, replay
from tmb.attest.eventlog_build import EventLogBuilder, make_certificate, standard_boot
from tmb.attest.eventlog_events import summarize
from tmb.attest.ima_build import LogBuilder
from tmb.errors import Finding, Report, Severity
from tmb.ingest.identity import IdentityPolicy
from tmb.ingest.results import AttestationSummary
from tmb.ingest.service import Ingest
from tmb.spans import Outcome, Span
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings, widen
from tmb.verdict.model import Decision, Verdict
from tmb.verdict.signing import load_or_create_key

ENGINE = os.path.realpath(sys.executable)
CMDLINE = "root=/dev/vda1 ro ima_policy=tcb ima_hash=sha256"
EVIL_CMDLINE = "root=/dev/vda1 ro ima=off"  # a boot whose kernel measures nothing
HONEST_AGGREGATE = boot_aggregate(standard_boot(EventLogBuilder(), cmdline=CMDLINE).pcrs["sha256"], "sha256")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def booted_node(
    tmp: Path,
    factory: SwtpmFactory,
    *,
    boot_cmdline: str = CMDLINE,
    sent_cmdline: str | None = None,
    aggregate: bytes | None = None,
) -> NodeEnv:
    """A node whose swtpm was booted from a Secure Boot event log with ``boot_cmdline`` (PCRs 0-9 extended
    with what the log says), and whose IMA log starts with ``aggregate`` (default: the boot_aggregate the
    kernel computes from the TPM's PCRs 0-9), then the probe, the engine and the model's dm-verity mount,
    PCR 10 extended with each. ``sent_cmdline``: the probe's event log file claims another boot (not
    extended). The policy allows the boot_aggregate the IMA log carries and the honest boot's."""
    tmp.mkdir(parents=True, exist_ok=True)
    sw = factory()
    tpm = sw.client()
    ak = tpm.create_or_load_ak(AK_HANDLE, "rsa")
    eventlog = tmp / "binary_bios_measurements"
    with eventlog.open("wb") as f:
        standard_boot(EventLogBuilder(f), cmdline=boot_cmdline).extend_into(tpm.pcr_extend)
    if sent_cmdline is not None:
        eventlog.write_bytes(standard_boot(EventLogBuilder(), cmdline=sent_cmdline).getvalue())
    values = tpm.pcr_read(range(10), ("sha256",))
    pcrs = {i: v for i in range(10) if (v := values.get("sha256", i)) is not None}
    first = aggregate if aggregate is not None else boot_aggregate(pcrs, "sha256")
    log_path = tmp / "binary_runtime_measurements"
    fh = open(log_path, "wb")  # noqa: SIM115 - closed by NodeEnv.close
    policy_doc: dict[str, Any] = {
        "version": 1,
        "allow": {
            "boot_aggregate": sorted({f"sha256:{first.hex()}", f"sha256:{HONEST_AGGREGATE.hex()}"}),
            PROBE_PATH: [_sha(PROBE_BYTES)],
            ENGINE: [_sha(b"engine")],
        },
        "require": {"paths": [PROBE_PATH]},
        "verity": [{"name": "model@1", "root_digest": ROOT, "salt": SALT, "data_blocks": 16}],
    }
    env = NodeEnv(sw, tpm, ak, log_path, fh, LogBuilder(fh), policy_doc, tmp)
    env.extra["eventlog"] = eventlog
    env._extend(env.builder.add("ima-ng", "boot_aggregate", digest=first).extends)
    env.measure(PROBE_PATH, PROBE_BYTES)
    env.measure(ENGINE, b"engine")
    env.mount_model()
    return env


async def run_probe(
    env: NodeEnv, ingest: Ingest, **config: Any
) -> tuple[Probe, AttestationSummary | None, list[Finding]]:
    """Run the probe until two quotes are acknowledged and batches are covered; the summary and findings
    of the attested window."""
    kw: dict[str, Any] = {"eventlog": str(env.extra["eventlog"])}
    kw.update(config)
    async with serve(ingest) as url:
        probe = Probe(env.probe_config(url, **kw))
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await wait_until(
            lambda: probe.stats.quotes_acked >= 2 and ingest.store.count_batches(NODE, attested=True) >= 3
        )
        stop.set()
        await task
    rows = [r for r in ingest.store.batches_overlapping(NODE, 0, 1 << 62) if r.quote_id is not None]
    t0, t1 = min(r.t0_ns for r in rows if r.t0_ns), max(r.t1_ns for r in rows if r.t1_ns) + 1
    window = ingest.attested_window(NODE, t0, t1)
    return probe, window.summary, list(window.findings)


def decide(tmp_path: Path, summary: AttestationSummary, findings: list[Finding]) -> Verdict:
    """The verdict engine's decision on a request of this node whose window the summary covers."""
    signer = load_or_create_key(str(tmp_path / "verdict-key.pem"))
    engine = Engine(AsyncStore(str(tmp_path / "store.db")), signer, None, [], EngineSettings(demo=True))
    t0 = time.time_ns()
    span = Span(
        id="ab" * 16,
        correlation_id="c",
        worker="w1",
        node=NODE,
        gpus=("GPU-1",),
        model_served="llama-1b/bf16/h100",
        model_requested="llama-1b",
        method="POST",
        path="/v1/chat/completions",
        start_ns=t0,
        first_byte_ns=t0 + 10**7,
        end_ns=t0 + 10**9,
        status=200,
        bytes_in=1,
        bytes_out=1,
        tokens=1,
        outcome=Outcome.OK,
    )
    verdict, _ = engine.decide(span, widen(span, 1.0), SampleBatch.empty("synthetic"), summary, findings)
    return verdict


def _ids(summary: AttestationSummary, severity: Severity | None = None) -> set[str]:
    return {f.id for f in summary.findings if severity is None or f.severity is severity}


# ------------------------------------------------------------------------------------------ the writer


def test_event_log_writer_round_trips_through_the_parser(tmp_path: Path) -> None:
    builder = standard_boot(EventLogBuilder(), cmdline=CMDLINE)
    raw = builder.getvalue()
    log = read_eventlog(io.BytesIO(raw), name="built")
    assert log.fmt == "crypto-agile" and log.banks == ("sha1", "sha256")
    assert list(log.events) == [b.event for b in builder.events]  # byte offsets, sizes, digests, data
    assert b"".join(b.record for b in builder.events) == raw
    result = replay(log.events)
    assert result.report.findings == []
    assert {b: dict(v) for b, v in result.pcrs.items()} == builder.pcrs
    assert check_pcrs(result, {"sha256": {i: builder.pcrs["sha256"][i] for i in range(10)}}, Report())
    summary = summarize(log.events)
    assert summary.report.findings == []  # every digest is what its data says, Secure Boot on, separators
    assert summary.secure_boot is True
    assert [(a.role, a.path) for a in summary.boot_apps] == [
        ("shim", "\\EFI\\debian\\shimx64.efi"),
        ("grub", "\\EFI\\debian\\grubx64.efi"),
        ("kernel", None),
    ]
    assert [c.text for c in summary.kernel_cmdlines] == [f"/boot/vmlinuz-6.1.0-tmb {CMDLINE}"]
    assert {k: [s.kind for s in v] for k, v in summary.variables.items()} == {
        "PK": ["x509"],
        "KEK": ["x509"],
        "db": ["x509"],
        "dbx": ["sha256"],
    }
    assert summary.variables["db"][0].subject == "CN=tmb test db"
    assert make_certificate("tmb test db") == make_certificate("tmb test db")  # deterministic
    # the same boot, the same bytes; another command line changes PCR 8 alone
    again = standard_boot(EventLogBuilder(), cmdline=CMDLINE).getvalue()
    assert again == raw
    other = standard_boot(EventLogBuilder(), cmdline=EVIL_CMDLINE).pcrs["sha256"]
    assert [i for i in range(24) if other[i] != builder.pcrs["sha256"][i]] == [8]
    # StartupLocality: PCR 0 starts at the locality, as the parser replays it
    local = EventLogBuilder(startup_locality=3)
    local.separator(0)
    assert (
        replay(read_eventlog(io.BytesIO(local.getvalue())).events).pcrs["sha256"][0]
        == local.pcrs["sha256"][0]
    )
    with pytest.raises(ValueError):
        EventLogBuilder(banks=("sha1", "md5"))


def test_a_swtpm_booted_from_the_log_holds_what_it_replays_to(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """Extending a real TPM with the builder's digests (firmware's code path) gives the replayed values in
    both banks: real TPM arithmetic, not the builder's."""
    path = tmp_path / "binary_bios_measurements"
    with swtpm_factory().client() as tpm:
        with path.open("wb") as f:
            builder = standard_boot(EventLogBuilder(f))
            builder.extend_into(tpm.pcr_extend)
        values = tpm.pcr_read(range(10), ("sha1", "sha256"))
    quoted = {b: {i: values.get(b, i) or b"" for i in range(10)} for b in ("sha1", "sha256")}
    result = replay(read_eventlog(path).events)
    report = Report()
    assert check_pcrs(result, quoted, report), report.findings
    assert quoted["sha256"][0] != bytes(32) and quoted["sha256"][9] != bytes(32)


# ---------------------------------------------------------------------------------- probe and ingest


async def test_honest_boot_is_attested(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = booted_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    probe, summary, findings = await run_probe(env, ingest)
    assert probe.stats.refused == [], probe.stats.refused
    assert summary is not None and summary.ok and summary.boot_ok is True, findings
    assert not {i for i in _ids(summary) if i.startswith(("boot.", "eventlog."))}, summary.findings
    held = ingest.store.eventlog(NODE)
    assert held is not None and held.data == env.extra["eventlog"].read_bytes()
    # the quote covered PCRs 0-10 and the summary keeps every value the signature covers
    assert sorted(map(int, summary.pcrs["sha256"])) == list(range(11))
    assert summary.pcrs["sha256"]["8"] == env.tpm.pcr_read([8]).get("sha256", 8).hex()  # type: ignore[union-attr]
    # a probe restart in the same boot does not send the log again (the daemon's answers say it has it)
    received = held.received_ns
    await run_probe(env, ingest)
    again = ingest.store.eventlog(NODE)
    assert again is not None and again.received_ns == received
    env.close()


async def test_event_log_that_does_not_replay_is_unattested(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """The TPM was booted with IMA switched off; the probe's log claims the usual command line."""
    env = booted_node(tmp_path, swtpm_factory, boot_cmdline=EVIL_CMDLINE, sent_cmdline=CMDLINE)
    ingest = env.ingest()
    _, summary, findings = await run_probe(env, ingest)
    assert summary is not None and not summary.ok and summary.boot_ok is False
    bad = [f for f in summary.findings if f.id == "eventlog.pcr_mismatch"]
    assert [(f.context["bank"], f.context["pcr"]) for f in bad] == [("sha256", 8)], summary.findings
    assert _ids(summary, Severity.ERROR) == {"eventlog.pcr_mismatch"}  # the IMA log and policy are fine
    verdict = decide(tmp_path, summary, findings)
    assert verdict.decision is Decision.UNATTESTED and verdict.reasons[0].id == "eventlog.pcr_mismatch"
    env.close()


async def test_user_space_ima_forgery_is_unattested(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    """The forgery: a node booted without IMA replays an honest node's IMA log (its allowlisted
    boot_aggregate) into PCR 10 from user space. PCR 10 and the policy hold; PCRs 0-9 give it away."""
    env = booted_node(tmp_path, swtpm_factory, boot_cmdline=EVIL_CMDLINE, aggregate=HONEST_AGGREGATE)
    ingest = env.ingest()
    _, summary, findings = await run_probe(env, ingest)
    assert summary is not None and summary.pcr_matched and summary.policy_ok and summary.verity_ok
    assert not summary.ok and summary.boot_ok is False
    assert _ids(summary, Severity.ERROR) == {"boot.aggregate_mismatch"}, summary.findings
    (f,) = [f for f in summary.findings if f.id == "boot.aggregate_mismatch"]
    assert f.context["entry"] == 0 and f.context["logged"] == HONEST_AGGREGATE.hex()
    verdict = decide(tmp_path, summary, findings)
    assert verdict.decision is Decision.UNATTESTED and verdict.reasons[0].id == "boot.aggregate_mismatch"
    env.close()


async def test_no_event_log_is_a_warning_unless_required(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    """Rule: without [boot] policy or require_eventlog, a node that sends no event log is attested on PCR 10
    alone with a warning; with require_eventlog it is not."""
    env = booted_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    _, summary, _ = await run_probe(env, ingest, eventlog="")
    assert summary is not None and summary.ok and summary.boot_ok is None
    assert [f.severity for f in summary.findings if f.id == "boot.no_eventlog"] == [Severity.WARNING]
    assert ingest.store.eventlog(NODE) is None
    ingest.close()

    strict = env.ingest(tmp_path / "strict.db", require_eventlog=True)
    # a missing file is the same as none: the probe says so (a warning finding shipped with its batches)
    _, summary, findings = await run_probe(env, strict, eventlog=str(tmp_path / "no-such-log"))
    assert summary is not None and not summary.ok and summary.boot_ok is False
    assert _ids(summary, Severity.ERROR) == {"boot.no_eventlog"}, summary.findings
    assert "probe.eventlog_unreadable" in {f.id for f in findings}
    verdict = decide(tmp_path, summary, findings)
    assert verdict.decision is Decision.UNATTESTED and verdict.reasons[0].id == "boot.no_eventlog"
    env.close()


BOOT_POLICY = {
    "secure_boot": "required",
    "kernels": [_sha(b"tmb test kernel image (vmlinuz)")],  # standard_boot's kernel image
    "cmdline": {"require": ["ima_policy=tcb"], "forbid": ["ima=off"]},
}


async def test_boot_policy_holds_or_names_the_rule(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    """With a [boot] section: an honest boot that meets it is attested; a boot whose (truthful) event log
    breaks it is not; and an event log is required."""
    env = booted_node(tmp_path / "good", swtpm_factory)
    env.policy_doc["boot"] = BOOT_POLICY
    _, summary, _ = await run_probe(env, env.ingest())
    assert summary is not None and summary.ok and summary.boot_ok is True, summary.findings
    assert not {i for i in _ids(summary) if i.startswith("boot.")}
    env.close()

    env = booted_node(tmp_path / "evil", swtpm_factory, boot_cmdline=EVIL_CMDLINE)
    env.policy_doc["boot"] = BOOT_POLICY
    _, summary, findings = await run_probe(env, env.ingest())
    assert summary is not None and not summary.ok and summary.boot_ok is False
    assert _ids(summary, Severity.ERROR) == {"boot.cmdline_missing", "boot.cmdline_forbidden"}, (
        summary.findings
    )
    verdict = decide(tmp_path / "evil", summary, findings)
    assert verdict.decision is Decision.UNATTESTED
    assert {r.id for r in verdict.reasons} == {"boot.cmdline_missing", "boot.cmdline_forbidden"}
    # the same node without its event log: a [boot] section requires one
    _, summary, _ = await run_probe(env, env.ingest(tmp_path / "evil" / "again.db"), eventlog="")
    assert summary is not None and not summary.ok
    assert _ids(summary, Severity.ERROR) == {"boot.no_eventlog"}, summary.findings
    env.close()


async def test_event_log_is_sent_again_after_the_daemon_lost_it(
    tmp_path: Path, swtpm_factory: SwtpmFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "EVENTLOG_RESEND_S", 0.5)  # 30 s outside tests
    env = booted_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    async with serve(ingest) as url:
        probe = Probe(env.probe_config(url, eventlog=str(env.extra["eventlog"])))
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await wait_until(lambda: ingest.store.eventlog(NODE) is not None and probe.stats.quotes_acked >= 1)
        with ingest.store.transaction():  # the daemon's state is lost (restored from an old backup, ...)
            ingest.store.conn.execute("DELETE FROM ingest_eventlogs")
        await wait_until(lambda: ingest.store.eventlog(NODE) is not None)
        acked = probe.stats.quotes_acked
        await wait_until(lambda: probe.stats.quotes_acked >= acked + 2)
        stop.set()
        await task
    last = ingest.store.last_quote(NODE)
    assert last is not None and last["ok"] and last["boot_ok"] is True, last
    env.close()


async def test_probe_offers_the_event_log_only_when_the_daemon_lacks_it(tmp_path: Path) -> None:
    """The daemon's ``eventlog`` answers, one by one (no daemon needed): checked, and the log queued only
    when the daemon holds another or none, once, and not again within EVENTLOG_RESEND_S."""
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(standard_boot(EventLogBuilder()).getvalue())
    cfg = {"node": NODE, "source": "synthetic", "state_dir": str(tmp_path / "state"), "buffer_fsync": False}
    probe = Probe(ProbeConfig(**cfg, eventlog=str(log)))
    await probe._load_eventlog()
    mine = hashlib.sha256(log.read_bytes()).hexdigest()
    for bad in (5, "zz", "ab" * 20, ["x"]):
        probe._offer_eventlog("nonce", bad)
    assert [r.context["field"] for r in probe.stats.refusals] == ["eventlog"] * 4
    probe._offer_eventlog("nonce", mine.upper())  # the daemon holds it
    assert not probe.buffer.has("eventlog")
    probe._offer_eventlog("nonce", None)  # it holds none: queue it, once
    probe._offer_eventlog("batches", "00" * 32)
    (item,) = probe.buffer.peek(10)
    assert item.kind == "eventlog" and base64.b64decode(item.doc["data"]) == log.read_bytes()
    assert item.doc["sha256"] == mine
    probe.buffer.ack(item)
    probe._offer_eventlog("nonce", None)  # acknowledged but "lost" again at once: not within 30 s
    assert not probe.buffer.has("eventlog")
    probe.close()
    quiet = Probe(ProbeConfig(**cfg, eventlog=""))  # no event log configured: nothing to offer
    await quiet._load_eventlog()
    quiet._offer_eventlog("nonce", None)
    assert not quiet.buffer.has("eventlog") and quiet.buffer.findings == []
    quiet.close()


async def test_probe_bounds_the_event_log(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = booted_node(tmp_path, swtpm_factory)
    big = tmp_path / "huge_bios_measurements"
    big.write_bytes(env.extra["eventlog"].read_bytes() + bytes(4 * 1024 * 1024))
    ingest = env.ingest()
    _, summary, findings = await run_probe(env, ingest, eventlog=str(big))
    assert ingest.store.eventlog(NODE) is None  # never sent
    (f,) = [f for f in findings if f.id == "probe.eventlog_too_large"]
    assert f.context["limit"] == 4 * 1024 * 1024
    assert summary is not None and summary.ok  # no event log, none required: the warning rule
    env.close()


# ------------------------------------------------------------------------------------------ the route


async def test_eventlog_route_refuses_bad_input_with_findings(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    env = booted_node(tmp_path, swtpm_factory)
    ingest = env.ingest(identity=IdentityPolicy(insecure_static_nodes=True))  # unsigned posts: the bodies
    raw = env.extra["eventlog"].read_bytes()
    async with serve(ingest) as url, aiohttp.ClientSession() as http:

        async def post(node: str, body: Any = None, data: bytes | None = None) -> tuple[int, dict[str, Any]]:
            raw = data if data is not None else json.dumps(body).encode()
            kw = {"data": io.BytesIO(raw), "headers": {"Content-Type": "application/json"}}
            async with http.post(f"{url}/v1/ingest/{node}/eventlog", **kw) as resp:
                return resp.status, await resp.json()

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        def fids(doc: dict[str, Any]) -> list[str]:
            return [f["id"] for f in doc["findings"]]

        # a legacy (SHA-1) log whose second event declares 4 GiB of data
        oversized_event = struct.pack("<II20sI", 0, 8, bytes(20), 0) + struct.pack(
            "<II20sI", 0, 8, bytes(20), 1 << 32 - 1
        )
        cases: list[tuple[Any, int, str]] = [
            ({"data": "%%%"}, 400, "ingest.malformed"),
            ([1, 2], 400, "ingest.malformed"),
            ({"data": b64(raw), "sha256": "00" * 32}, 400, "ingest.malformed"),
            ({"data": b64(b"")}, 422, "eventlog.truncated"),
            ({"data": b64(raw[:-3])}, 422, "eventlog.truncated"),
            ({"data": b64(oversized_event)}, 422, "eventlog.malformed"),
            ({"data": b64(raw + bytes(4 * 1024 * 1024))}, 413, "eventlog.too_large"),
        ]
        for body, status, fid in cases:
            got, doc = await post(NODE, body)
            assert (got, fids(doc)) == (status, [fid]), (body if len(str(body)) < 200 else fid, doc)
            assert doc["eventlog"] is None
        got, doc = await post(NODE, data=b"{not json")
        assert got == 400 and fids(doc) == ["ingest.malformed"]
        got, doc = await post("nobody", {"data": b64(raw)})
        assert got == 401 and fids(doc) == ["auth.not_enrolled"]
        # refusals are recorded against the node (they show in its windows' findings)
        assert {"eventlog.truncated", "eventlog.malformed", "eventlog.too_large"} <= {
            f["id"] for f in ingest.store.findings(NODE)
        }
        digest = hashlib.sha256(raw).hexdigest()
        got, doc = await post(NODE, {"data": b64(raw), "sha256": digest})
        assert got == 200 and doc["ok"] and doc["replaced"] is False and doc["eventlog"] == digest, doc
        assert doc["events"] == len(read_eventlog(io.BytesIO(raw)).events) and doc["banks"] == [
            "sha1",
            "sha256",
        ]
        got, doc = await post(NODE, {"data": b64(raw)})  # the same log again: nothing changes
        assert got == 200 and doc["replaced"] is False and doc["eventlog"] == digest
        other = standard_boot(EventLogBuilder(), cmdline=EVIL_CMDLINE).getvalue()
        got, doc = await post(NODE, {"data": b64(other)})
        assert got == 200 and doc["replaced"] is True and doc["eventlog"] == hashlib.sha256(other).hexdigest()
        async with http.get(f"{url}/v1/ingest/{NODE}/nonce") as resp:
            assert (await resp.json())["eventlog"] == hashlib.sha256(other).hexdigest()
    env.close()
