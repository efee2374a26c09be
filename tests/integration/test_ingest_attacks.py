"""Attacks on the evidence, each caught by the ingest with its finding (real swtpm quotes, SQLite file)."""

from __future__ import annotations

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
from tmb.ingest.wire import TelemetryBatch
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


def quote(env: NodeEnv, ingest: Ingest, head: Any, ima: bool = True) -> IngestResult:
    if ima:
        assert status(ingest.add_ima(NODE, env.ima_doc())) == 200
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    return ingest.add_quote(NODE, env.quote_doc(nonce, head))


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
    assert status(ingest.add_quote(NODE, doc)) == 200
    again = ingest.add_quote(NODE, doc)
    assert status(again) == 409 and ids(again) == ["ingest.nonce_reused"]
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


def _bind(ingest: Ingest, exe: str, maps: list[dict[str, str]]) -> list[str]:
    out = ingest.add_bindings(
        NODE, {"t_ns": 1, "processes": [{"pid": 42, "exe": exe, "maps": maps, "error": None}]}
    )
    assert status(out) == 200
    return ids(out)


def test_gpu_process_bindings(node: NodeEnv) -> None:
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    assert quote(node, ingest, bs[-1].head).data["ok"]
    model = "/models/llama/model.safetensors"
    assert (
        _bind(ingest, ENGINE_EXE, [{"path": model, "dev": "253:0"}, {"path": "/usr/lib/x.so", "dev": "8:1"}])
        == []
    )
    assert _bind(ingest, "/usr/bin/evil", []) == ["binding.exe_not_allowlisted"]
    assert _bind(ingest, ENGINE_EXE, [{"path": model, "dev": "8:1"}]) == ["binding.model_not_from_verity"]
    assert _bind(ingest, ENGINE_EXE, [{"path": model, "dev": "7:1"}]) == ["binding.model_bypasses_verity"]
    # the binding findings ride along the next quote's summary
    node.measure("/usr/bin/unrelated", b"y")
    node.policy_doc["allow"]["/usr/bin/unrelated"] = [
        "sha256:" + __import__("hashlib").sha256(b"y").hexdigest()
    ]
    ingest.policy = node.policy
    out = quote(node, ingest, bs[-1].head)
    assert "binding.model_bypasses_verity" in ids(out) and not out.ok


def test_bindings_count_only_from_the_next_verified_quote(node: NodeEnv) -> None:
    """A bindings post no quote followed changes nothing a verdict reads (stored findings, the quote
    summaries); the next verified quote takes it up. Persisted across a restart in between."""
    ingest = node.ingest()
    _, bs = sealed(1)
    post(ingest, *bs)
    assert quote(node, ingest, bs[-1].head).data["ok"]  # the measured state bindings are checked against
    model = "/models/llama/model.safetensors"
    assert _bind(ingest, ENGINE_EXE, [{"path": model, "dev": "7:1"}]) == ["binding.model_bypasses_verity"]
    assert ingest.store.findings(NODE) == []  # not in effect: no quote followed it yet
    first = quote(node, ingest, bs[-1].head, ima=False)
    assert "binding.model_bypasses_verity" in ids(first) and not first.data["ok"]
    # an empty list posted after the quote: not in effect yet
    assert _bind(ingest, ENGINE_EXE, []) == []
    stored = [f["id"] for f in ingest.store.findings(NODE)]
    assert stored.count("binding.model_bypasses_verity") == 1
    ingest.close()
    ingest = node.ingest()  # a daemon restart keeps the pending post pending
    row = ingest.store.node(NODE)
    assert row is not None and row.state.bindings_pending == [] and row.state.bindings
    second = quote(node, ingest, bs[-1].head, ima=False)
    assert "binding.model_bypasses_verity" not in ids(second) and second.data["ok"], ids(second)
    # a planted entry is likewise not in effect until a quote follows it
    assert _bind(ingest, "/usr/bin/evil", []) == ["binding.exe_not_allowlisted"]
    assert [f["id"] for f in ingest.store.findings(NODE)].count("binding.exe_not_allowlisted") == 0
    third = quote(node, ingest, bs[-1].head, ima=False)
    assert "binding.exe_not_allowlisted" in ids(third)
    ingest.close()
