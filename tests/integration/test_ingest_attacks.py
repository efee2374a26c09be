"""Attacks on the evidence, each caught by the ingest with its finding (real swtpm quotes, SQLite file)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from swtpm import SwtpmFactory
from test_probe_support import ENGINE_EXE, NODE, NodeEnv, make_node

from probes.chain import Chain
from tmb.ingest.results import IngestResult
from tmb.ingest.routes import status_of
from tmb.ingest.service import Ingest
from tmb.ingest.wire import TelemetryBatch, bindings_bytes
from tmb.telemetry.sample import SampleBatch


def payload(k: int) -> bytes:
    t = time.time_ns() - 10**9 * (100 - k)
    return SampleBatch.from_columns(
        [t, t + 50_000_000], ["GPU-x"], source="synthetic", power_w=[100.0 + k, 101.0]
    ).encode()


def post(ingest: Ingest, *batches: TelemetryBatch) -> IngestResult:
    return ingest.add_batches(NODE, {"batches": [b.to_wire() for b in batches]})


def ids(outcome: IngestResult) -> list[str]:
    return [f.id for f in outcome.findings]


def status(outcome: IngestResult) -> int:
    """The HTTP status the routes answer with (200 when taken, else the refusing finding's)."""
    return 200 if outcome.refusal is None else status_of(outcome.refusal.id)


@pytest.fixture
def node(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Any:
    env = make_node(tmp_path, swtpm_factory)
    yield env
    env.close()


def sealed(n: int) -> tuple[Chain, list[TelemetryBatch]]:
    chain = Chain(NODE)
    return chain, [chain.genesis("synthetic")] + [chain.seal(payload(k)) for k in range(1, n + 1)]


def quote(
    env: NodeEnv, ingest: Ingest, head: Any, ima: bool = True, bindings: bytes | None = None
) -> IngestResult:
    if ima:
        assert status(ingest.add_ima(NODE, env.ima_doc())) == 200
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    return ingest.add_quote(NODE, env.quote_doc(nonce, head, bindings))


def test_honest_stream_is_attested_and_survives_restart(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(3)
    assert status(post(ingest, *bs)) == 200
    out = quote(node, ingest, bs[-1].head)
    assert status(out) == 200 and out.data["ok"] and out.data["attested"] == 4, out.data
    ingest.close()
    again = Ingest(node.tmp / "ingest.db", policy=node.policy)  # daemon restart: state from SQLite
    dup = post(again, *bs)
    assert status(dup) == 200 and dup.data["duplicates"] == 4 and dup.data["accepted"] == []
    assert again.store.count_batches(NODE) == 4
    assert again.store.node(NODE).ima_data == b""  # verified IMA bytes are not kept, never re-read
    node.measure("/usr/bin/late-tool", b"x")
    out = quote(node, again, bs[-1].head)
    assert "policy.path_not_allowed" in ids(out) and not out.data["summary"]["policy_ok"]


def test_batch_edited_after_sealing(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(2)
    doc = bs[2].to_wire()
    doc["payload"] = bs[1].to_wire()["payload"]
    out = ingest.add_batches(NODE, {"batches": [bs[0].to_wire(), bs[1].to_wire(), doc]})
    assert status(out) == 409 and "chain.digest_mismatch" in ids(out)
    assert out.data["accepted"] == [0, 1]


def test_batch_dropped(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(3)
    out = post(ingest, bs[0], bs[1], bs[3])
    assert status(out) == 409 and ids(out) == ["chain.gap"]


def test_batches_reordered(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(3)
    out = post(ingest, bs[0], bs[2], bs[1])
    assert status(out) == 409 and ids(out) == ["chain.reorder"]


def test_chain_forked(node: NodeEnv) -> None:
    ingest = node.ingest()
    chain, bs = sealed(2)
    assert status(post(ingest, *bs)) == 200
    other = Chain(NODE, segment=chain.segment)
    fork = [other.genesis("synthetic"), other.seal(payload(9))]
    out = post(ingest, fork[1])
    assert status(out) == 409 and ids(out) == ["chain.fork"]
    side = Chain(NODE, segment=chain.segment, previous_head=bs[1].digest)
    side._next_seq = 3  # a batch 3 that does not follow the held batch 2
    out = post(ingest, side.seal(payload(7)))
    assert status(out) == 409 and ids(out) == ["chain.fork"]


def test_quote_replayed(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    ingest.add_ima(NODE, node.ima_doc())
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    doc = node.quote_doc(nonce, bs[-1].head)
    first = ingest.add_quote(NODE, doc)
    assert status(first) == 200 and first.data["ok"]
    kept = ingest.store.records(NODE, "quote")
    # The very same quote again (a probe that died before it saw the answer): taken, nothing changes.
    again = ingest.add_quote(NODE, doc)
    assert status(again) == 200 and again.data["duplicate"] is True, again.findings
    assert again.data["quote_id"] == first.data["quote_id"] and "ok" not in again.data
    assert ingest.store.records(NODE, "quote") == kept and ingest.store.last_quote(NODE) is not None
    # Its message with another signature is not that quote: a replay.
    forged = dict(doc, signature=base64.b64encode(b"\x00" * 72).decode())
    replay = ingest.add_quote(NODE, forged)
    assert status(replay) == 409 and ids(replay) == ["ingest.nonce_reused"]
    fresh = dict(doc, nonce=ingest.nonce(NODE).data["nonce"])  # old quote, new nonce
    out = ingest.add_quote(NODE, fresh)
    assert status(out) == 422 and "quote.nonce_mismatch" in ids(out)
    unknown = dict(doc, nonce="11" * 32)
    assert ids(ingest.add_quote(NODE, unknown)) == ["ingest.nonce_unknown"]


def test_quote_over_unknown_head_and_unregistered_ak(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, bs[0])
    out = quote(node, ingest, bs[1].head)
    assert status(out) == 409 and ids(out) == ["ingest.quote_head_unknown"]
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    doc = dict(node.quote_doc(nonce, bs[0].head), ak_name="000b" + "00" * 32)
    assert ids(ingest.add_quote(NODE, doc)) == ["ingest.ak_unregistered"]


@pytest.mark.parametrize(
    ("allowed", "finding"), [(None, "policy.required_missing"), (False, "policy.digest_not_allowed")]
)
def test_probe_measurement_missing_or_not_allowlisted(
    tmp_path: Path, swtpm_factory: SwtpmFactory, allowed: bool | None, finding: str
) -> None:
    env = make_node(tmp_path, swtpm_factory, probe=allowed is not None, probe_allowed=bool(allowed))
    ingest = env.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    out = quote(env, ingest, bs[-1].head)
    assert status(out) == 200 and finding in ids(out)
    assert out.data["summary"]["pcr_matched"] and not out.data["summary"]["policy_ok"] and not out.data["ok"]
    summary = ingest.attested_window(NODE, 0, 1 << 62).summary
    assert summary is not None and not summary.ok
    env.close()


def test_ima_log_rewritten_or_short(node: NodeEnv) -> None:
    ingest = node.ingest()
    doc = node.ima_doc()
    assert status(ingest.add_ima(NODE, doc)) == 200
    raw = bytearray(node.log_path.read_bytes())
    raw[40] ^= 1
    import base64

    out = ingest.add_ima(NODE, {"offset": 0, "data": base64.b64encode(bytes(raw)).decode()})
    assert status(out) == 409 and ids(out) == ["ima.delta_conflict"]
    out = ingest.add_ima(NODE, {"offset": len(raw) + 10, "data": ""})
    assert status(out) == 409 and ids(out) == ["ima.delta_gap"] and out.data["ima_offset"] == len(raw)
    # a PCR extended with something the log does not show: the quote cannot be matched
    node.tpm.pcr_extend(10, {"sha256": b"\x01" * 32, "sha1": b"\x01" * 20})
    _, bs = sealed(0)
    post(ingest, *bs)
    out = quote(node, ingest, bs[0].head, ima=False)
    assert status(out) == 200 and "pcr.mismatch" in ids(out) and not out.data["summary"]["pcr_matched"]


def _bind(ingest: Ingest, exe: str, maps: list[dict[str, str]], t_ns: int = 1) -> tuple[list[str], bytes]:
    """Post one process's bindings: the post's findings (against the last verified quote's state, nothing a
    verdict reads) and the document's digest, which a quote must cover for it to take effect."""
    doc = {"t_ns": t_ns, "processes": [{"pid": 42, "exe": exe, "maps": maps, "error": None}]}
    out = ingest.add_bindings(NODE, doc)
    assert status(out) == 200
    digest = hashlib.sha256(bindings_bytes(doc)).digest()
    assert out.data["sha256"] == digest.hex()
    return ids(out), digest


def test_gpu_process_bindings(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    assert quote(node, ingest, bs[-1].head).data["ok"]
    model = "/models/llama/model.safetensors"
    clean = [{"path": model, "dev": "253:0"}, {"path": "/usr/lib/x.so", "dev": "8:1"}]
    assert _bind(ingest, ENGINE_EXE, clean)[0] == []
    assert _bind(ingest, "/usr/bin/evil", [])[0] == ["binding.exe_not_allowlisted"]
    assert _bind(ingest, ENGINE_EXE, [{"path": model, "dev": "8:1"}])[0] == ["binding.model_not_from_verity"]
    found, digest = _bind(ingest, ENGINE_EXE, [{"path": model, "dev": "7:1"}])
    assert found == ["binding.model_bypasses_verity"]
    # the binding findings ride along the summary of the quote that covers the document
    node.measure("/usr/bin/unrelated", b"y")
    node.policy_doc["allow"]["/usr/bin/unrelated"] = [
        "sha256:" + __import__("hashlib").sha256(b"y").hexdigest()
    ]
    ingest.policy = node.policy
    out = quote(node, ingest, bs[-1].head, bindings=digest)
    assert "binding.model_bypasses_verity" in ids(out) and not out.ok
    assert "binding.unquoted" not in ids(out)


def test_garbage_quote_does_not_burn_the_nonce(node: NodeEnv) -> None:
    """A quote whose signature does not verify is refused without consuming its nonce: the honest quote
    with the same nonce is still taken, and the nonce log names the quote that consumed it."""
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    ingest.add_ima(NODE, node.ima_doc())
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    doc = node.quote_doc(nonce, bs[-1].head)
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[-1] ^= 1
    garbage = dict(doc, signature=base64.b64encode(bytes(sig)).decode())
    out = ingest.add_quote(NODE, garbage)
    assert status(out) == 422 and "quote.signature_invalid" in ids(out), ids(out)
    row = ingest.store.nonce_row(NODE, nonce)
    assert row is not None and row.consumed_ns is None
    assert status(ingest.add_quote(NODE, doc)) == 200
    row = ingest.store.nonce_row(NODE, nonce)
    message = base64.b64decode(doc["message"])
    assert row is not None and row.consumed_ns is not None
    assert row.quote_digest == hashlib.sha256(message).digest()
    assert row.issued_ns <= row.consumed_ns


def test_nonce_survives_restart_and_evidence_is_kept_as_received(node: NodeEnv) -> None:
    """A nonce issued before a restart is accepted after it (the nonce log is in the store); the AK, the
    IMA bytes (append-only segments at their offsets) and the quote (TPMS_ATTEST, signature, PCR values as
    received) are kept under their SHA-256, and the summary names the quote by that digest."""
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    ima = node.ima_doc()
    data = base64.b64decode(ima["data"])
    half = len(data) // 2
    assert status(ingest.add_ima(NODE, {"offset": 0, "data": base64.b64encode(data[:half]).decode()})) == 200
    assert status(ingest.add_ima(NODE, ima)) == 200  # overlaps: only the new bytes are a segment
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    ingest.close()
    again = Ingest(node.tmp / "ingest.db", policy=node.policy)
    doc = node.quote_doc(nonce, bs[-1].head)
    out = again.add_quote(NODE, doc)
    assert status(out) == 200 and out.data["ok"], ids(out)
    store = again.store
    segments = store.records(NODE, "ima")
    assert [(r.ref, r.meta["length"]) for r in segments] == [(0, half), (half, len(data) - half)]
    assert b"".join(store.blob(r.digest) or b"" for r in segments) == data
    message = base64.b64decode(doc["message"])
    digest = hashlib.sha256(message).digest()
    assert out.data["summary"]["quote_digest"] == digest.hex()
    (q,) = store.records(NODE, "quote")
    assert q.digest == digest and store.blob(digest) == message
    assert store.blob(bytes.fromhex(q.meta["signature"])) == base64.b64decode(doc["signature"])
    assert json.loads(store.blob(bytes.fromhex(q.meta["pcrs"])) or b"") == doc["pcrs"]
    (ak,) = store.records(NODE, "ak")
    assert store.blob(ak.digest) == store.node(NODE).ak


def test_bindings_count_only_once_a_verified_quote_covers_them(node: NodeEnv) -> None:
    """A bindings document counts only from the verified quote whose qualifying data covers its digest; a
    posted document no quote covers never takes effect (``binding.unquoted``), not even later; a quote
    cannot claim a document it does not cover; a covered document the daemon lacks is an error. Pending
    state persists across a restart."""
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    assert quote(node, ingest, bs[-1].head).data["ok"]  # the measured state bindings are checked against
    model = "/models/llama/model.safetensors"
    found, bad = _bind(ingest, ENGINE_EXE, [{"path": model, "dev": "7:1"}])
    assert found == ["binding.model_bypasses_verity"]
    assert ingest.store.findings(NODE) == []  # not in effect: no quote covers it yet
    first = quote(node, ingest, bs[-1].head, ima=False, bindings=bad)
    assert "binding.model_bypasses_verity" in ids(first) and not first.data["ok"]
    # a clean document posted, then a quote that does not cover it: it never takes effect
    found, clean = _bind(ingest, ENGINE_EXE, [])
    assert found == []
    second = quote(node, ingest, bs[-1].head, ima=False)
    assert "binding.unquoted" in ids(second) and "binding.model_bypasses_verity" in ids(second)
    unquoted = next(f for f in second.findings if f.id == "binding.unquoted")
    assert unquoted.context == {"sha256": clean.hex(), "covered": None}
    stored = [f["id"] for f in ingest.store.findings(NODE)]
    assert stored.count("binding.model_bypasses_verity") == 1
    # a quote naming a document its qualifying data does not cover is refused: the TPM did not sign it
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    claimed = dict(node.quote_doc(nonce, bs[-1].head), bindings=clean.hex())
    out = ingest.add_quote(NODE, claimed)
    assert status(out) == 422 and "quote.nonce_mismatch" in ids(out), ids(out)
    # the same document posted again, pending across a daemon restart, then covered: in effect
    assert _bind(ingest, ENGINE_EXE, [])[1] == clean
    ingest.close()
    ingest = node.ingest()
    row = ingest.store.node(NODE)
    assert row is not None and row.state.bindings_pending == clean.hex() and row.state.bindings
    third = quote(node, ingest, bs[-1].head, ima=False, bindings=clean)
    assert "binding.model_bypasses_verity" not in ids(third) and third.data["ok"], ids(third)
    # a planted document the quote does not cover (it covers the probe's own) is never in effect
    found, planted = _bind(ingest, "/usr/bin/evil", [], t_ns=2)
    assert found == ["binding.exe_not_allowlisted"]
    fourth = quote(node, ingest, bs[-1].head, ima=False, bindings=clean)
    assert "binding.exe_not_allowlisted" not in ids(fourth) and fourth.data["ok"] is False
    unquoted = next(f for f in fourth.findings if f.id == "binding.unquoted")
    assert unquoted.context == {"sha256": planted.hex(), "covered": clean.hex()}
    fifth = quote(node, ingest, bs[-1].head, ima=False)  # nothing pending: the covered document stays
    assert fifth.data["ok"], ids(fifth)
    stored = [f["id"] for f in ingest.store.findings(NODE)]
    assert "binding.exe_not_allowlisted" not in stored
    row = ingest.store.node(NODE)
    assert row is not None and row.state.bindings_sha256 == clean.hex()
    # a quote covering a document the daemon never received: an error until a held one is covered
    missing = quote(node, ingest, bs[-1].head, ima=False, bindings=hashlib.sha256(b"never posted").digest())
    assert "binding.missing" in ids(missing) and not missing.data["ok"]
    again = quote(node, ingest, bs[-1].head, ima=False)
    assert "binding.missing" in ids(again)
    assert quote(node, ingest, bs[-1].head, ima=False, bindings=clean).data["ok"]
    ingest.close()


def test_bindings_bounds(node: NodeEnv) -> None:
    """An oversized bindings document is refused (413 ``binding.too_large``), never kept."""
    ingest = node.ingest()
    many = {"t_ns": 1, "processes": [{"pid": i, "exe": None, "maps": []} for i in range(5000)]}
    out = ingest.add_bindings(NODE, many)
    assert status(out) == 413 and ids(out) == ["binding.too_large"]
    big = {
        "t_ns": 1,
        "processes": [{"pid": 1, "exe": "/x", "maps": [{"path": "/m" * 2_200_000, "dev": "1:1"}]}],
    }
    out = ingest.add_bindings(NODE, big)
    assert status(out) == 413 and ids(out) == ["binding.too_large"]
    assert ingest.store.records(NODE, "bindings") == []
    ingest.close()
