"""The verdict engine's decisions, on real profiles enrolled from (labelled) synthetic telemetry and on
attestation summaries shaped like the ingest's."""

from __future__ import annotations

from pathlib import Path

import pytest

from sample_infra.demo_setup import demo_trace, enrol_profiles
from tmb.errors import Finding
from tmb.fingerprint import LoadProfile, load_profile
from tmb.ingest.results import AttestationSummary
from tmb.spans import Outcome, Span
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings, widen
from tmb.verdict.model import Decision, Verdict
from tmb.verdict.signing import load_or_create_key, verify_verdict

T0 = 1_700_000_000 * 10**9


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> list[LoadProfile]:
    """Load-aware profiles of the demo's load (one request in flight), four synthetic runs each."""
    out = tmp_path_factory.mktemp("profiles")
    return [load_profile(p) for p in enrol_profiles(["llama-1b/bf16/h100", "llama-1b/int8/h100"], out)]


def _span(**kw: object) -> Span:
    base: dict[str, object] = {
        "id": "ab" * 16,
        "correlation_id": "client-7",
        "worker": "w1",
        "node": "gpu-node-1",
        "gpus": ("GPU-1",),
        "model_served": "llama-1b/bf16/h100",
        "model_requested": "llama-1b",
        "method": "POST",
        "path": "/v1/chat/completions",
        "start_ns": T0,
        "first_byte_ns": T0 + 10**7,
        "end_ns": T0 + 6 * 10**9,
        "status": 200,
        "bytes_in": 100,
        "bytes_out": 1000,
        "tokens": 300,
        "outcome": Outcome.OK,
    }
    base.update(kw)
    return Span(**base)  # type: ignore[arg-type]


def _summary(ok: bool = True) -> AttestationSummary:
    findings = () if ok else (Finding("dm.verity_root_mismatch", "root matches no commitment"),)
    return AttestationSummary(
        "gpu-node-1",
        3,
        12345,
        1,
        0,
        "aa" * 32,
        "sha256",
        True,
        True,
        ok,
        findings,
        T0 + 7,
        {"llama-1b@v1": "cd" * 32},
    )


def _engine(
    tmp_path: Path, profiles: list[LoadProfile], *, demo: bool = True, load: float | None = None
) -> Engine:
    signer = load_or_create_key(str(tmp_path / "key.pem"))
    store = AsyncStore(str(tmp_path / "store.db"))
    return Engine(store, signer, None, profiles, EngineSettings(demo=demo), load_of=lambda _s, _w: load)


def _window(claim: str, seed: int = 99) -> SampleBatch:
    return demo_trace(claim, 6, seed=seed, start_ns=T0).slice_time(T0, T0 + 6 * 10**9)


def _decide(engine: Engine, span: Span, samples: SampleBatch, summary: AttestationSummary | None) -> Verdict:
    verdict, refs = engine.decide(span, widen(span, 1.0), samples, summary, [])
    assert {r.digest for r in refs} == set(verdict.attestation_evidence)
    return verdict


def test_honest_synthetic_is_demo_never_verified(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    v = _decide(_engine(tmp_path, profiles), _span(), _window("llama-1b/bf16/h100"), _summary())
    assert v.decision is Decision.DEMO and v.telemetry_source == "synthetic"
    assert v.fingerprint["decision"] == "consistent" and v.attestation["verified"] is True
    # what the client reads: when the quote was verified and which committed root the node mounted
    assert v.attestation["quote_time_ns"] == T0 + 7
    assert v.attestation["verity_roots"] == {"llama-1b@v1": "cd" * 32}
    v = _decide(_engine(tmp_path, profiles, demo=False), _span(), _window("llama-1b/bf16/h100"), _summary())
    assert v.decision is Decision.INSUFFICIENT_TELEMETRY
    assert [r.id for r in v.reasons] == ["telemetry.synthetic"]


def test_quantized_impostor_is_a_model_mismatch(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    v = _decide(_engine(tmp_path, profiles), _span(), _window("llama-1b/int8/h100"), _summary())
    assert v.decision is Decision.MODEL_MISMATCH
    assert v.fingerprint["best_alternative"] and "int8" in v.fingerprint["best_alternative"]


def test_attestation_failures_are_unattested(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    engine = _engine(tmp_path, profiles)
    v = _decide(engine, _span(), _window("llama-1b/bf16/h100"), _summary(ok=False))
    assert v.decision is Decision.UNATTESTED and v.reasons[0].id == "dm.verity_root_mismatch"
    v = _decide(engine, _span(), _window("llama-1b/bf16/h100"), None)
    assert v.decision is Decision.UNATTESTED and v.reasons[0].id == "attestation.no_quote"


def test_missing_profile_and_short_windows(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    engine = _engine(tmp_path, profiles)
    v = _decide(engine, _span(model_served="mixtral/bf16/h100"), _window("llama-1b/bf16/h100"), _summary())
    assert v.decision is Decision.INSUFFICIENT_TELEMETRY and v.reasons[0].id == "fingerprint.no_profile"
    short = _span(end_ns=T0 + 10**8)
    window = widen(short, 1.0)
    assert window.widened and window.t1_ns - window.t0_ns == 10**9 and window.t0_ns < T0
    v = _decide(engine, short, _window("llama-1b/bf16/h100").slice_time(T0, T0 + 10**8), _summary())
    assert v.window.widened and v.reasons[0].id == "window.widened"
    # two samples cannot decide: the fingerprint is inconclusive, which never breaks a chain that held
    assert v.fingerprint["decision"] == "inconclusive"
    assert v.decision is Decision.DEMO and "fingerprint.inconclusive" in [r.id for r in v.reasons]
    v = _decide(engine, _span(), SampleBatch.empty("nvml"), _summary())
    assert v.decision is Decision.INSUFFICIENT_TELEMETRY  # no telemetry at all is not inconclusive


def test_the_load_the_proxy_counted_is_scored(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    """The profiles know one request in flight; at 12 the window is outside what was enrolled: even an
    impostor's window is then inconclusive (never a mismatch), and the verdict carries the load."""
    v = _decide(_engine(tmp_path, profiles, load=12.0), _span(), _window("llama-1b/int8/h100"), _summary())
    assert v.fingerprint["decision"] == "inconclusive" and v.fingerprint["load"] == "12"
    assert v.decision is Decision.DEMO
    assert any("outside every enrolled load range" in r.message for r in v.reasons)
    v = _decide(_engine(tmp_path, profiles, load=1.0), _span(), _window("llama-1b/int8/h100"), _summary())
    assert v.decision is Decision.MODEL_MISMATCH and v.fingerprint["load"] == "1"


def test_real_telemetry_with_an_inconclusive_fingerprint_is_verified(
    tmp_path: Path, profiles: list[LoadProfile]
) -> None:
    real = _window("llama-1b/bf16/h100").with_source("nvml")
    real = SampleBatch(**{**real._fields(), "synthetic": False})
    v = _decide(_engine(tmp_path, profiles, demo=False, load=40.0), _span(), real, _summary())
    assert v.decision is Decision.VERIFIED and v.fingerprint["decision"] == "inconclusive"
    assert [r.id for r in v.reasons] == ["fingerprint.inconclusive"]
    v = _decide(_engine(tmp_path, profiles, demo=False, load=1.0), _span(), real, _summary())
    assert v.decision is Decision.VERIFIED and [r.id for r in v.reasons] == ["fingerprint.consistent"]
    assert v.fingerprint["power"] is not None and v.fingerprint["runs"] == 4


async def test_signed_verdict_verifies_and_floats_stay_out(
    tmp_path: Path, profiles: list[LoadProfile]
) -> None:
    engine = _engine(tmp_path, profiles)
    verdict = _decide(engine, _span(), _window("llama-1b/bf16/h100"), _summary())
    signed = engine.signer.sign(verdict)
    report = verify_verdict(signed.to_dict(), [engine.signer.public])
    assert report.ok, report.to_list()
    assert all(not isinstance(v, float) for v in signed.fingerprint.values())
    tampered = {**signed.to_dict(), "decision": "verified"}
    assert not verify_verdict(tampered, [engine.signer.public]).ok
    await engine.store.close()


def test_attestation_reasons_name_the_entry_and_the_rule(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    """A verdict's reasons have no context member: where a check failed (the IMA entry, the verity rule)
    must be in the message, or the verdict cannot say which entry was edited."""
    findings = (
        Finding(
            "ima.template_hash_mismatch", "template hash does not match", context={"entry": 2, "path": "/e"}
        ),
        Finding(
            "dm.verity_missing", "no device matches", context={"rule": "llama-1b@v1", "root_digest": "ab"}
        ),
    )
    summary = AttestationSummary("gpu-node-1", 3, 1, 1, 0, "aa" * 32, "sha256", False, False, False, findings)
    v = _decide(_engine(tmp_path, profiles), _span(), _window("llama-1b/bf16/h100"), summary)
    assert v.decision is Decision.UNATTESTED
    assert [r.message for r in v.reasons] == [
        "template hash does not match (entry=2, path=/e)",
        "no device matches (rule=llama-1b@v1)",
    ]


def test_quote_findings_lead_and_repeats_are_dropped(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    """The window's stored findings (a process binding, reported once per bindings document) are
    consequences; the quote's own findings (which IMA entry was edited) come first, each reason once."""
    binding = Finding("binding.exe_not_measured", "not measured", context={"pid": 7, "exe": "/e"})
    edited = Finding("ima.template_hash_mismatch", "template hash does not match", context={"entry": 2})
    summary = AttestationSummary("gpu-node-1", 3, 1, 1, 0, "aa" * 32, "sha256", False, False, True, (edited,))
    engine = _engine(tmp_path, profiles)
    span = _span()
    verdict, _ = engine.decide(
        span, widen(span, 1.0), _window("llama-1b/bf16/h100"), summary, [binding, binding, binding]
    )
    assert verdict.decision is Decision.UNATTESTED
    assert [r.id for r in verdict.reasons] == ["ima.template_hash_mismatch", "binding.exe_not_measured"]
    assert verdict.reasons[0].message.endswith("(entry=2)")


async def test_a_group_of_spans_gets_its_verdicts_together_and_a_bad_one_costs_only_itself(
    tmp_path: Path, profiles: list[LoadProfile]
) -> None:
    import json

    engine = _engine(tmp_path, profiles)
    spans = [_span(id=f"{i:032x}", node=f"gpu-node-{i % 2}") for i in range(6)]
    spans.append(_span(id="f" * 32, first_byte_ns=None, worker=None))  # nobody served it: no verdict
    bad = f"{3:032x}"
    decide = engine.decide

    def flaky(span: Span, *args: object) -> tuple[Verdict, list[object]]:
        if span.id == bad:
            raise RuntimeError("boom")
        return decide(span, *args)  # type: ignore[arg-type]

    engine.decide = flaky  # type: ignore[assignment,method-assign]
    await engine.on_spans(spans)
    docs = {}
    for span in spans:
        rec = await engine.store.lookup(span.id)
        if rec.state == "final":
            assert rec.doc is not None
            docs[span.id] = json.loads(rec.doc)
    assert sorted(docs) == sorted(f"{i:032x}" for i in range(6) if i != 3)
    assert all(verify_verdict(d, [engine.signer.public]).ok for d in docs.values())
    assert len({d["signature"] for d in docs.values()}) == 1  # both nodes' verdicts: one batch signature
    assert {d["node"] for d in docs.values()} == {"gpu-node-0", "gpu-node-1"}
    await engine.store.close()


def test_only_the_spans_gpus_are_scored(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    """A node's telemetry covers all its GPUs; the worker's GPU is the one judged (the int8 impostor on
    the node's other GPU must not make an honest worker a mismatch, nor hide a dishonest one)."""

    def on(gpu: str, claim: str) -> SampleBatch:
        return SampleBatch(**{**_window(claim)._fields(), "gpus": (gpu,)})

    node = SampleBatch.concat([on("GPU-A", "llama-1b/bf16/h100"), on("GPU-B", "llama-1b/int8/h100")])
    engine = _engine(tmp_path, profiles)
    v = _decide(engine, _span(gpus=("GPU-A",)), node, _summary())
    assert v.decision is Decision.DEMO and v.fingerprint["decision"] == "consistent"
    v = _decide(engine, _span(gpus=("GPU-B",)), node, _summary())
    assert v.decision is Decision.MODEL_MISMATCH


async def test_a_model_mismatch_verdict_is_told_to_the_event_sink(
    tmp_path: Path, profiles: list[LoadProfile]
) -> None:
    """The engine raises ``verdict.model_mismatch`` for each mismatch it signs (with the signed verdict),
    and nothing for the other decisions."""
    import json

    from tmb.events import Event

    events: list[Event] = []
    signer = load_or_create_key(str(tmp_path / "key.pem"))
    store = AsyncStore(str(tmp_path / "store.db"))
    engine = Engine(store, signer, None, profiles, EngineSettings(demo=True), events=events.append)
    impostor, honest = "1" * 32, "2" * 32
    decide = engine.decide

    def with_evidence(span: Span, window: object, *_: object) -> tuple[Verdict, list[object]]:
        served = "llama-1b/int8/h100" if span.id == impostor else "llama-1b/bf16/h100"
        return decide(span, window, _window(served), _summary(), [])  # type: ignore[arg-type,return-value]

    engine.decide = with_evidence  # type: ignore[assignment,method-assign]
    await engine.on_spans([_span(id=impostor), _span(id=honest)])
    [event] = events
    assert event.kind == "verdict.model_mismatch" and event.subject == impostor
    assert event.data["claimed_model"] == "llama-1b/bf16/h100" and event.data["node"] == "gpu-node-1"
    rec = await store.lookup(impostor)
    assert rec.doc is not None and json.loads(rec.doc) == event.data["verdict"]  # the published verdict
    assert verify_verdict(event.data["verdict"], [signer.public]).ok
    assert (await store.lookup(honest)).state == "final"
    await store.close()


async def test_a_failing_event_sink_costs_no_verdict(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    from tmb.events import Event

    def broken(_event: Event) -> None:
        raise RuntimeError("sink down")

    signer = load_or_create_key(str(tmp_path / "key.pem"))
    store = AsyncStore(str(tmp_path / "store.db"))
    engine = Engine(store, signer, None, profiles, EngineSettings(demo=True), events=broken)
    decide = engine.decide

    def impostor(span: Span, window: object, *_: object) -> tuple[Verdict, list[object]]:
        return decide(span, window, _window("llama-1b/int8/h100"), _summary(), [])  # type: ignore[arg-type,return-value]

    engine.decide = impostor  # type: ignore[assignment,method-assign]
    await engine.on_spans([_span()])
    rec = await store.lookup(_span().id)
    assert rec.state == "final" and rec.doc is not None and b"model_mismatch" in rec.doc
    await store.close()
