"""The verdict engine's decisions, on real profiles enrolled from (labelled) synthetic telemetry and on
attestation summaries shaped like the ingest's."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

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


@settings(max_examples=300, deadline=None)
@example(start=T0 - 10**10 + 1, length=0, min_ms=1001, grid_ms=0)  # 1.001 * 1e9 < 1001000000
@given(
    start=st.integers(T0 - 10**10, T0 + 10**10),
    length=st.integers(0, 3 * 10**9),
    min_ms=st.integers(0, 2000),
    grid_ms=st.sampled_from([0, 1, 100, 250, 333, 1000]),
)
def test_a_window_covers_its_request_and_lies_on_the_grid(
    start: int, length: int, min_ms: int, grid_ms: int
) -> None:
    span = _span(start_ns=start, end_ns=start + length)
    w = widen(span, min_ms / 1000, grid_ms / 1000)
    assert w.t0_ns <= start and w.t1_ns >= start + length  # the whole request, always
    assert w.t1_ns - w.t0_ns >= min(min_ms * 10**6, max(length, min_ms * 10**6))
    grid = grid_ms * 10**6
    if grid:
        assert w.t0_ns % grid == 0 and w.t1_ns % grid == 0
        assert w.t1_ns - w.t0_ns < max(length, min_ms * 10**6) + 2 * grid  # at most a step more each side
    assert w.widened == ((w.t0_ns, w.t1_ns) != (start, start + length))
    if not grid:  # no grid: the old window, centred, exactly min_window long for a short request
        plain = widen(span, min_ms / 1000)
        assert (w.t0_ns, w.t1_ns) == (plain.t0_ns, plain.t1_ns)
        if length < min_ms * 10**6:
            assert (
                w.t1_ns - w.t0_ns == min_ms * 10**6 and abs((w.t0_ns + w.t1_ns) - (2 * start + length)) <= 1
            )


def test_short_requests_within_one_grid_step_share_one_window() -> None:
    step = 250 * 10**6
    base = T0 + 7 * step  # on the grid
    spans = [_span(start_ns=base + i * 10**6 + 1, end_ns=base + i * 10**6 + 5 * 10**6) for i in range(200)]
    windows = {(w.t0_ns, w.t1_ns) for w in (widen(s, 1.0, 0.25) for s in spans)}
    # 200 requests started over 200 ms (widened windows starting within one step, or two): at most 2 windows
    assert 1 <= len(windows) <= 2, windows
    assert len({(w.t0_ns, w.t1_ns) for w in (widen(s, 1.0) for s in spans)}) == 200  # without the grid


def test_concurrent_requests_are_scored_once_per_window(
    tmp_path: Path, profiles: list[LoadProfile], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's cost follows time, not requests: requests sharing a grid window are summarised and
    judged once, and each gets the verdict it would get alone."""
    import tmb.verdict.engine as engine_module

    calls = {"summarise": 0, "judge": 0}
    real_summarise = engine_module.summarise

    def counted_summarise(*args: object) -> object:
        calls["summarise"] += 1
        return real_summarise(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "summarise", counted_summarise)
    engine = _engine(tmp_path, profiles, load=1.0)
    assert engine.judge is not None
    real_judge = engine.judge.judge

    def counted_judge(*args: object) -> object:
        calls["judge"] += 1
        return real_judge(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.judge, "judge", counted_judge)
    trace = demo_trace("llama-1b/bf16/h100", 6, seed=5, start_ns=T0)
    from tmb.ingest.results import BatchRef

    refs = (BatchRef(b"\x01" * 16, 0, b"\x02" * 32, 1),)
    verdicts, spans = [], []
    for i in range(60):  # 60 requests of 20 ms, started 4 ms apart, in the middle of the trace
        span = _span(
            id=f"{i:032x}",
            start_ns=T0 + 2 * 10**9 + i * 4 * 10**6,
            end_ns=T0 + 2 * 10**9 + i * 4 * 10**6 + 2 * 10**7,
        )
        window = widen(span, 1.0, 0.25)
        samples = trace.slice_time(window.t0_ns, window.t1_ns)
        verdict, _ = engine.decide(span, window, samples, _summary(), [], batches=refs)
        verdicts.append(verdict)
        spans.append(span)
    distinct = {(v.window.t0_ns, v.window.t1_ns) for v in verdicts}
    assert len(distinct) <= 2 and calls["summarise"] == len(distinct) and calls["judge"] == len(distinct)
    (tmp_path / "alone").mkdir()
    alone = _engine(tmp_path / "alone", profiles, load=1.0)
    for v, span in list(zip(verdicts, spans, strict=True))[::7]:  # as a fresh engine decides it alone
        samples = trace.slice_time(v.window.t0_ns, v.window.t1_ns)
        want, _ = alone.decide(span, v.window, samples, _summary(), [])
        assert want.fingerprint == v.fingerprint and want.decision is v.decision and want.reasons == v.reasons
    assert {v.decision for v in verdicts} == {Decision.DEMO}
