"""The end-to-end demo's scenarios as tests, on one shared run (module fixture): real swtpm processes, probes,
the daemon (proxy, ingest, verdict engine), the load balancer, sample workers and the client on 127.0.0.1.
Telemetry is SYNTHETIC (no GPU), so an honest request's best verdict is ``demo``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sample_infra.demo import DemoResult, Row, Settings, run_demo
from tmb.telemetry.sample import SampleBatch

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    return asyncio.run(run_demo(out, Settings(offline=False), say=lines.append))


def rows(result: DemoResult, node: str, round_: str | None = None) -> list[Row]:
    got = [r for r in result.rows if r.outcome.node == node and (round_ is None or r.round == round_)]
    assert got, f"no request reached {node}"
    return got


def test_every_request_got_a_signed_verdict(demo: DemoResult) -> None:
    assert len(demo.rows) == 15  # 3 rounds x 5 workers, the round robin gives each worker one a round
    for r in demo.rows:
        assert r.outcome.verdict_state == "final" and r.outcome.signature == "ok", r.outcome.problems
        assert r.outcome.claimed_model == "llama-1b/bf16/h100"
        assert r.outcome.completion_tokens == 200  # long enough for a fingerprint
    assert demo.ok


def test_honest_traffic_is_demo_never_verified(demo: DemoResult) -> None:
    for node in ("node-1", "node-2"):
        for r in rows(demo, node):
            v = r.outcome.verdict or {}
            assert r.decision == "demo", r.reasons
            assert v["telemetry_source"] == "synthetic" and v["attestation"]["verified"] is True
            assert v["fingerprint"]["decision"] == "consistent"
            assert [x["id"] for x in r.reasons] == ["telemetry.synthetic"]


def test_model_substitution_is_a_mismatch(demo: DemoResult) -> None:
    for r in rows(demo, "node-3"):
        v = r.outcome.verdict or {}
        assert r.decision == "model_mismatch", r.reasons
        assert v["attestation"]["verified"] is True  # the node itself is attested: only telemetry tells
        assert r.reasons[0]["id"] == "fingerprint.inconsistent"
        assert "int8" in (v["fingerprint"]["best_alternative"] or "")


def test_each_mismatch_was_notified_by_a_signed_webhook(demo: DemoResult) -> None:
    """The operator's receiver got a ``verdict.model_mismatch`` notification for each of node-3's requests
    (checked against the keys of ``GET /v1/keys``), carrying the signed verdict, and none for the others."""
    assert demo.notifications_refused == []
    told = {e["subject"]: e for e in demo.notifications if e["kind"] == "verdict.model_mismatch"}
    mismatched = {r.outcome.request_id for r in rows(demo, "node-3")}
    assert set(told) == mismatched
    for rid in mismatched:
        data = told[rid]["data"]
        assert data["node"] == "node-3" and data["claimed_model"] == "llama-1b/bf16/h100"
        served = next(r.outcome.verdict for r in demo.rows if r.outcome.request_id == rid)
        assert served is not None
        assert {k: v for k, v in data["verdict"].items() if k != "log"} == {
            k: v for k, v in served.items() if k != "log"
        }


def test_tampered_ima_log_is_unattested_naming_the_entry(demo: DemoResult) -> None:
    for r in rows(demo, "node-4"):
        assert r.decision == "unattested"
        first = r.reasons[0]
        assert first["id"] == "ima.template_hash_mismatch", r.reasons
        assert "entry=2" in first["message"] and sys.executable.split("/")[-1][:6] in first["message"]
        assert len({(x["id"], x["message"]) for x in r.reasons}) == len(r.reasons)  # each reason once


def test_other_model_image_is_unattested_naming_the_rule(demo: DemoResult) -> None:
    for r in rows(demo, "node-5"):
        assert r.decision == "unattested"
        ids = [x["id"] for x in r.reasons]
        assert ids[0] == "dm.verity_root_mismatch", ids
        assert any("rule=llama-1b@sample-ngram-v1" in x["message"] for x in r.reasons), r.reasons


def test_probe_killed_and_restarted_loses_nothing(demo: DemoResult) -> None:
    info = demo.restart
    assert info["node"] == "node-1" and info["new_segment_quoted"] and info["refused_after"] == []
    (during,) = rows(demo, "node-1", "2")
    (after,) = rows(demo, "node-1", "3")
    assert during.decision == "demo" and after.decision == "demo"
    # The request that ran across the kill: its window spans both chain segments, every batch attested.
    window = (during.outcome.verdict or {})["window"]
    db = sqlite3.connect(f"file:{demo.out / 'daemon' / 'ingest.sqlite3'}?mode=ro", uri=True)
    try:
        batches = db.execute(
            "SELECT segment, seq, payload, quote_id FROM ingest_batches WHERE node = 'node-1' "
            "AND t1_ns >= ? AND t0_ns < ? ORDER BY t0_ns",
            (window["t0_ns"], window["t1_ns"]),
        ).fetchall()
        segments = db.execute("SELECT COUNT(*) FROM ingest_segments WHERE node = 'node-1'").fetchone()[0]
    finally:
        db.close()
    assert segments >= 2
    assert len({b[0] for b in batches}) == 2 and all(b[3] is not None for b in batches)
    times = SampleBatch.concat([SampleBatch.decode(b[2]) for b in batches if b[2]]).t_ns
    gaps = np.diff(times)
    assert gaps.size and int(gaps.max()) <= 2 * int(gaps.min())  # no hole in the telemetry across the restart


def _audit(bundle: Path, page: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tmb", "audit", str(bundle), "--html", str(page)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_bundles_audit_with_telemetry_plots(demo: DemoResult, tmp_path: Path) -> None:
    assert set(demo.bundles) >= {"honest-node-1", "impostor-node-3"}
    honest = _audit(demo.bundles["honest-node-1"], tmp_path / "honest.html")
    assert honest.returncode == 0, honest.stdout + honest.stderr
    assert "SYNTHETIC telemetry): consistent with llama-1b/bf16/h100" in honest.stdout
    impostor = _audit(demo.bundles["impostor-node-3"], tmp_path / "impostor.html")
    assert impostor.returncode == 1, impostor.stdout + impostor.stderr
    assert "inconsistent with llama-1b/bf16/h100" in impostor.stdout
    for page in (tmp_path / "honest.html", tmp_path / "impostor.html"):
        text = page.read_text()
        assert text.count('<img alt="') >= 5 and 'src="data:image/png;base64,' in text
        assert "Synthetic telemetry" in text
    tampered = _audit(demo.bundles["tampered-log-node-4"], tmp_path / "t.html")
    assert tampered.returncode == 1 and "ima.template_hash_mismatch" in tampered.stdout
    # The bundles are the daemon's export: each audit re-derives the daemon's decision from the bundle alone.
    for audit, decision in ((honest, "demo"), (impostor, "model_mismatch"), (tampered, "unattested")):
        assert f"decision re-derived from the bundle: {decision}; the daemon's verdict: {decision}" in (
            audit.stdout
        ), audit.stdout
        assert "DECISION: the same" in audit.stdout
    assert set(demo.reports) == set(demo.bundles) and all(p.is_file() for p in demo.reports.values())


def _ours(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker`` (the demo's output folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
    return found


def test_cli_stops_everything_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmb", "demo", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("round 1"):
                break
            assert time.monotonic() < deadline, "".join(seen)
        assert any("nodes booted" in s for s in seen), "".join(seen)
        assert _ours(str(out))  # its swtpm processes are running
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert _ours(str(out)) == []  # every swtpm it started is gone


def test_exported_bundle_edits_are_named(demo: DemoResult, tmp_path: Path) -> None:
    """One byte edited in each part of the daemon's export of an honest request fails `tmb audit`, naming
    the part: the quote, an IMA segment, the nonce log, a telemetry batch, the commitment, the policy."""
    bundle = demo.bundles["honest-node-1"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    key = tmp_path / "daemon.pub"
    key.write_text(demo_key_hex(demo))
    ok = subprocess.run(
        [sys.executable, "-m", "tmb", "audit", str(bundle), "--daemon-key", str(key)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "nonces.key_unpinned" not in ok.stdout
    commitment = manifest["commitments"][0]
    root = json.loads((bundle / commitment).read_text())["verity"]["root_hash"]
    cases = [
        ("quotes/0.attest", -5, "quote.signature_invalid"),
        (manifest["ima_segments"][-1]["file"], 40, "ima."),
        ("nonces.json", -60, "nonces.signature_invalid"),
        (manifest["batches"], "prev", "chain.digest_mismatch"),  # a hex digit of a sealed field
        (commitment, None, "audit.commitment_not_in_verdict"),
        ("policy.toml", 0, "audit.evidence_not_in_verdict"),  # a comment added: not the policy in force
    ]
    for rel, at, expected in cases:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(bundle, copy)
        m = json.loads((copy / "manifest.json").read_text())
        m["sha256"].pop(rel, None)  # a forger fixes the manifest: the cryptographic checks remain
        (copy / "manifest.json").write_text(json.dumps(m))
        data = bytearray((copy / rel).read_bytes())
        if at is None:  # the commitment's root, one hex digit changed (still a valid commitment)
            text = data.decode().replace(root, ("0" if root[0] != "0" else "1") + root[1:])
            data = bytearray(text.encode())
        elif rel == "policy.toml":
            data += b"\n# edited after the daemon exported it\n"
        elif at == "prev":  # still well-formed (a flipped bit may leave hex: a parse error, not this check)
            lines = data.decode().splitlines(keepends=True)
            i = max(range(len(lines)), key=lambda k: len(lines[k]))
            doc = json.loads(lines[i])
            doc["prev"] = ("1" if doc["prev"][0] == "0" else "0") + doc["prev"][1:]
            lines[i] = json.dumps(doc) + "\n"
            data = bytearray("".join(lines).encode())
        else:
            assert isinstance(at, int)
            data[at] ^= 0x01
        (copy / rel).write_bytes(bytes(data))
        run = subprocess.run(
            [sys.executable, "-m", "tmb", "audit", str(copy)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 1, (rel, run.stdout)
        assert expected in run.stdout, (rel, expected, run.stdout)


def test_exported_telemetry_must_come_from_quoted_batches(demo: DemoResult, tmp_path: Path) -> None:
    """The window's samples are cut from the sealed batches behind a verified quote's head: a shortened
    telemetry.bin, or a forged chain of fake samples for the window (intact digests, but no quote covers
    it), fails the audit naming it."""
    from probes.chain import Chain

    bundle = demo.bundles["honest-node-1"]
    held = SampleBatch.decode((bundle / "telemetry.bin").read_bytes())

    def audit(copy: Path) -> subprocess.CompletedProcess[str]:
        m = json.loads((copy / "manifest.json").read_text())
        m["sha256"] = {}
        (copy / "manifest.json").write_text(json.dumps(m))
        return subprocess.run(
            [sys.executable, "-m", "tmb", "audit", str(copy)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    short = tmp_path / "short"
    shutil.copytree(bundle, short)
    (short / "telemetry.bin").write_bytes(held.slice_time(0, int(held.t_ns[-1])).encode())
    run = audit(short)
    assert run.returncode == 1 and "telemetry.window_mismatch" in run.stdout, run.stdout

    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    chain = Chain("node-1")
    fake = [chain.genesis(held.source), chain.seal(held.encode())]
    with (forged / "telemetry" / "batches.jsonl").open("a") as fh:
        for b in fake:
            fh.write(json.dumps(b.to_wire(), sort_keys=True) + "\n")
    run = audit(forged)
    assert run.returncode == 1 and "chain.window_unattested" in run.stdout, run.stdout


def demo_key_hex(demo: DemoResult) -> str:
    from tmb.verdict.signing import load_or_create_key

    return load_or_create_key(demo.out / "daemon" / "verdict-key.pem").public.raw.hex()


def test_evidence_export_cli_writes_the_same_bundle_from_the_stores(demo: DemoResult, tmp_path: Path) -> None:
    """`tmb evidence export` against the stopped daemon's stores writes a request's bundle that audits to
    the daemon's decision, as the one the running daemon served."""
    row = next(r for r in demo.rows if r.round == "1" and r.outcome.node == "node-3")
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "tmb", "evidence", "export", "--config", str(demo.out / "tmb.toml")]
    cmd += ["--request-id", str(row.outcome.request_id), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    served = demo.bundles["impostor-node-3"]
    for rel in ("verdict.json", "nonces.json", "telemetry.bin", "quotes/0.attest", "ima.log"):
        assert (out / rel).read_bytes() == (served / rel).read_bytes(), rel  # Ed25519 is deterministic
    audit = subprocess.run(
        [sys.executable, "-m", "tmb", "audit", str(out)], capture_output=True, text=True, timeout=120
    )
    assert "decision re-derived from the bundle: model_mismatch; the daemon's verdict: model_mismatch" in (
        audit.stdout
    ), audit.stdout
    missing = subprocess.run(
        [*cmd[:-4], "--request-id", "0" * 32, "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 1 and not (tmp_path / "none").exists()
