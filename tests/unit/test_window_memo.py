"""The ingest's memo of decoded batches and their per-sample features (``tmb.ingest.window.Windows``,
``SampleBatch.per_sample``): a memo only. Windows cut from memoised batches must give the verdict the
engine gives without the memo, and the offline audit's cut (decode, slice, concat, as
``tmb.verdict.bundle_check.window_from_batches``): same samples, same telemetry digest, same summary bit
for bit, same decision and figures. And the memo never answers whether a window is attested: a new
segment after a reboot, or batches not yet covered by a quote, read from the store every time."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from sample_infra.demo_setup import demo_trace, enrol_profiles
from tmb.fingerprint import LoadProfile, load_profile
from tmb.fingerprint import summary as summary_mod
from tmb.fingerprint.summary import summarise
from tmb.ingest import window as window_mod
from tmb.ingest.results import AttestationSummary
from tmb.ingest.store import IngestStore
from tmb.ingest.window import Windows
from tmb.spans import Outcome, Span
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings, widen
from tmb.verdict.signing import load_or_create_key

T0 = 1_700_000_000 * 10**9
S = 10**9
NODE = "node-1"
BF16, INT8 = "llama-1b/bf16/h100", "llama-1b/int8/h100"


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> list[LoadProfile]:
    out = tmp_path_factory.mktemp("profiles")
    return [load_profile(p) for p in enrol_profiles([BF16, INT8], out)]


def _trace(seconds: int, seed: int, start: int = T0, invalid: bool = False) -> SampleBatch:
    """Two GPUs of one node (bf16 and int8), real-format samples with processes; optionally with
    invalid readings (NaN, infinities, negatives, above the scale) as a faulty driver gives them."""
    a = dataclasses.replace(demo_trace(BF16, seconds, seed=seed, start_ns=start), gpus=("GPU-A",))
    b = dataclasses.replace(demo_trace(INT8, seconds, seed=seed + 1, start_ns=start + 7), gpus=("GPU-B",))
    trace = SampleBatch.concat([a, b])
    if invalid:
        rng = np.random.default_rng(seed)
        cols = {}
        for name in ("power_w", "gpu_util", "sm_active", "mem_used_bytes"):
            col = trace.column(name).copy()
            hit = rng.integers(0, len(trace), size=len(trace) // 4)
            col[hit] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 150.0], size=hit.size)
            cols[name] = col
        trace = dataclasses.replace(trace, **cols)
    return SampleBatch.decode(trace.encode())  # a plain, validated batch


def _store(tmp: Path, trace: SampleBatch, segment: bytes, *, attest: bool, first: int = 0) -> IngestStore:
    """One sealed batch a second of ``trace`` in a new segment of NODE's chain, attested by one quote."""
    store = IngestStore(tmp / "ingest.db")
    store.upsert_node(NODE, b"ak", T0)
    _add_segment(store, trace, segment, attest=attest, first=first)
    return store


def _add_segment(
    store: IngestStore, trace: SampleBatch, segment: bytes, *, attest: bool, first: int = 0
) -> None:
    summary = AttestationSummary(NODE, 1, 1, 1, 0, "aa" * 32, "sha256", True, True, True)
    prev = segment * 2
    t = int(trace.t_ns[0])
    seconds = -(-(int(trace.t_ns[-1]) - t + 1) // S)
    with store.transaction():
        store.add_segment(NODE, segment, 0, None, T0)
        for k in range(seconds):
            part = trace.slice_time(t + k * S, t + (k + 1) * S)
            payload = part.encode()
            digest = hashlib.sha256(prev + payload).digest()
            store.add_batch(
                NODE, segment, first + k, digest, prev, payload, (int(part.t_ns[0]), int(part.t_ns[-1])), T0
            )
            prev = digest
        if attest:
            qid = store.add_quote(
                NODE, T0, True, (segment, first + seconds - 1, prev), summary.to_dict(), b"m", b"s"
            )
            store.attest(NODE, segment, first + seconds - 1, qid)


def _audit_cut(store: IngestStore, t0: int, t1: int) -> SampleBatch | None:
    """The window as the offline audit cuts it: every batch decoded afresh, sliced, concatenated."""
    parts = [
        SampleBatch.decode(r.payload).slice_time(t0, t1) for r in store.batches_overlapping(NODE, t0, t1)
    ]
    parts = [p for p in parts if len(p)]
    return SampleBatch.concat(parts) if parts else None


def _span(i: int, gpus: tuple[str, ...], t0: int, t1: int, claim: str) -> Span:
    return Span(
        f"{i:032x}", None, "w1", NODE, gpus, claim, "llama-1b", "POST", "/v1/chat/completions",
        t0, t0 + 10**6, t1, 200, 10, 10, 10, Outcome.OK,
    )  # fmt: skip


def _engine(tmp: Path, profiles: list[LoadProfile], loads: dict[str, float]) -> Engine:
    store = AsyncStore(str(tmp / f"v{id(loads)}.db"))
    key = load_or_create_key(str(tmp / "key.pem"))
    return Engine(store, key, None, profiles, EngineSettings(demo=True), load_of=lambda sp, _w: loads[sp.id])


@pytest.mark.parametrize("invalid", [False, True])
def test_memoised_windows_decide_as_the_audit_cut(
    tmp_path: Path, profiles: list[LoadProfile], invalid: bool
) -> None:
    trace = _trace(30, seed=5 if invalid else 3, invalid=invalid)
    store = _store(tmp_path, trace, b"\x01" * 16, attest=True)
    memo, plain = Windows(store, threading.Lock()), Windows(store, threading.Lock(), memo=False)
    rng = np.random.default_rng(11 if invalid else 12)
    gpu_sets = [
        ("GPU-A",),
        ("GPU-B",),
        ("GPU-A", "GPU-B"),
        ("GPU-B", "GPU-A"),
        ("GPU-X",),
        ("GPU-A", "GPU-A"),
        (),
    ]
    spans, loads = [], {}
    for i in range(300):
        t0 = T0 + int(rng.integers(-S, 31 * S))
        length = int(rng.choice([1, 10**6, S // 3, S, int(rng.integers(1, 8 * S))]))
        span = _span(i, gpu_sets[i % len(gpu_sets)], t0, t0 + length, [BF16, INT8, "llama-1b"][i % 3])
        spans.append(span)
        loads[span.id] = float(rng.choice([0.0, 0.5, 1.0, 1.0, 2.0, 3.5, 40.0]))
    memo_engine, plain_engine = _engine(tmp_path, profiles, loads), _engine(tmp_path, profiles, dict(loads))
    decisions = set()
    for span in spans:
        window = widen(span, 1.0)
        got = memo.attested_window(NODE, window.t0_ns, window.t1_ns)
        ref = plain.attested_window(NODE, window.t0_ns, window.t1_ns)
        cut = _audit_cut(store, window.t0_ns, window.t1_ns)
        assert got.samples.encode() == ref.samples.encode()
        assert cut is None or got.samples.encode() == cut.encode()
        assert got.summary == ref.summary and got.findings == ref.findings and got.batches == ref.batches
        # the summary of the memoised window, bit for bit the validated batch's (the audit's)
        if cut is not None:
            assert summarise(got.samples, 2.0) == summarise(cut, 2.0)
            for g in ("GPU-A", "GPU-B"):
                if g in got.samples.gpus:
                    assert summarise(got.samples.for_gpu(g), 1.0) == summarise(cut.for_gpu(g), 1.0)
        v1, r1 = memo_engine.decide(span, window, got.samples, got.summary, got.findings, got.batches)
        # the reference engine decides on the audit's validated cut (no memo anywhere), its own cache unused
        samples = cut if cut is not None else ref.samples
        v2, r2 = plain_engine.decide(span, window, samples, ref.summary, ref.findings)
        assert dataclasses.replace(v1, issued_ns=0) == dataclasses.replace(v2, issued_ns=0), span.id
        assert r1 == r2
        decisions.add(v1.fingerprint.get("decision", "not_scored"))
    if not invalid:
        assert decisions >= {"consistent", "inconsistent", "inconclusive"}
    assert 0 < memo.held[0] <= len(store.batches_overlapping(NODE, 0, 1 << 62))


def test_features_are_computed_once_per_stored_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, _trace(10, seed=1), b"\x02" * 16, attest=True)
    calls: list[int] = []
    raw = summary_mod._raw_features

    def counted(batch: SampleBatch):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        return raw(batch)

    monkeypatch.setattr(summary_mod, "_raw_features", counted)
    windows = Windows(store, threading.Lock())
    touched = set()
    for k in range(200):  # overlapping 1 s windows, as concurrent requests give them
        t0 = T0 + k * 45 * 10**6
        w = windows.attested_window(NODE, t0, t0 + S)
        touched |= {b.digest for b in w.batches}
        summarise(w.samples.for_gpu("GPU-A"), 1.0)
        summarise(w.samples, 1.0)
    assert len(calls) == len(touched) == 10  # once per stored batch (whole: 40 samples), never per window
    assert set(calls) == {40}
    # without the memo: once per window summarised
    calls.clear()
    plain = Windows(store, threading.Lock(), memo=False)
    w = plain.attested_window(NODE, T0, T0 + S)
    summarise(w.samples, 1.0)
    summarise(w.samples, 1.0)
    assert len(calls) == 2


def test_a_new_segment_is_read_from_the_store_not_the_memo(tmp_path: Path) -> None:
    """A reboot: the node's chain restarts in a new segment with the same readings (same payload bytes,
    so the same decoded content) over the same times, not yet attested. The window must be unattested
    although the memo holds decoded batches with exactly those samples; once a quote covers the new
    segment, the window rests on the new batches."""
    trace = _trace(6, seed=2)
    store = _store(tmp_path, trace, b"\x03" * 16, attest=True)
    windows = Windows(store, threading.Lock())
    before = windows.attested_window(NODE, T0 + S, T0 + 3 * S)
    assert before.summary is not None and len(before.samples)
    store.conn.execute(
        "DELETE FROM ingest_batches WHERE segment = ?", (b"\x03" * 16,)
    )  # retention/fork: gone
    _add_segment(store, trace, b"\x04" * 16, attest=False)
    after = windows.attested_window(NODE, T0 + S, T0 + 3 * S)
    assert after.summary is None
    assert "ingest.window_unattested" in [f.id for f in after.findings]
    assert {b.segment for b in after.batches} == {b"\x04" * 16}
    windows.forget(NODE)
    assert windows.held == (0, 0)
    again = windows.attested_window(NODE, T0 + S, T0 + 3 * S)
    assert again.summary is None  # still not attested, with the memo cold too
    qid = store.add_quote(
        NODE,
        T0,
        True,
        (b"\x04" * 16, 5, store.batch(NODE, b"\x04" * 16, 5).digest),
        before.summary.to_dict(),
        b"m",
        b"s",
    )  # type: ignore[union-attr]
    store.attest(NODE, b"\x04" * 16, 5, qid)
    attested = windows.attested_window(NODE, T0 + S, T0 + 3 * S)
    assert attested.summary is not None and attested.samples.encode() == before.samples.encode()
    assert {b.segment for b in attested.batches} == {b"\x04" * 16}


def test_batches_read_before_their_quote_are_attested_only_by_it(tmp_path: Path) -> None:
    trace = _trace(4, seed=4)
    store = _store(tmp_path, trace, b"\x05" * 16, attest=False)
    windows = Windows(store, threading.Lock())
    for _ in range(3):  # the engine looks repeatedly while it waits: the memo warms
        w = windows.attested_window(NODE, T0, T0 + 2 * S)
        assert w.summary is None and len(w.samples)
    summary = AttestationSummary(NODE, 1, 1, 1, 0, "aa" * 32, "sha256", True, True, True)
    last = store.batch(NODE, b"\x05" * 16, 3)
    assert last is not None
    qid = store.add_quote(NODE, T0, True, (b"\x05" * 16, 3, last.digest), summary.to_dict(), b"m", b"s")
    store.attest(NODE, b"\x05" * 16, 3, qid)
    assert windows.attested_window(NODE, T0, T0 + 2 * S).summary == summary


def test_the_memo_is_bounded_per_node_and_in_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = _trace(20, seed=6)
    store = _store(tmp_path, trace, b"\x06" * 16, attest=True)
    per_batch = 40  # two GPUs at 20 Hz, one batch a second
    monkeypatch.setattr(window_mod, "DECODED_NODE_SAMPLES", 5 * per_batch)
    windows = Windows(store, threading.Lock())
    for k in range(19):
        windows.attested_window(NODE, T0 + k * S, T0 + (k + 1) * S)
        assert windows.held[1] <= 5 * per_batch
    assert windows.held[0] == 5
    monkeypatch.setattr(window_mod, "DECODED_SAMPLES", 3 * per_batch)
    windows.attested_window(NODE, T0, T0 + S)
    assert windows.held[1] <= 3 * per_batch
    monkeypatch.setattr(window_mod, "DECODED_CACHE", 2)
    windows.attested_window(NODE, T0 + S, T0 + 2 * S)
    assert windows.held[0] <= 2
    monkeypatch.setattr(window_mod, "DECODED_NODE_SAMPLES", per_batch - 1)  # a batch above a node's share
    w = windows.attested_window(NODE, T0 + 7 * S, T0 + 8 * S)
    assert len(w.samples) == per_batch and windows.held[0] <= 2


def test_threads_share_the_memo(tmp_path: Path) -> None:
    store = _store(tmp_path, _trace(8, seed=8), b"\x07" * 16, attest=True)
    lock = threading.Lock()
    windows = Windows(store, lock)
    want = {k: summarise(_audit_cut(store, T0 + k * S // 2, T0 + k * S // 2 + S), 1.0) for k in range(14)}  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                for k in range(14):
                    w = windows.attested_window(NODE, T0 + k * S // 2, T0 + k * S // 2 + S)
                    assert summarise(w.samples, 1.0) == want[k]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_cut_batches_equal_validated_ones() -> None:
    """slice_time, for_gpu and concat build their batches without re-validating: they must equal the
    validated construction of the same samples, read-only, with the per-sample rows gathered exactly."""
    trace = _trace(5, seed=9).memoised()
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = sorted(int(x) for x in rng.integers(T0 - S, T0 + 6 * S, size=2))
        parts = [trace.slice_time(a, b), trace.for_gpu("GPU-B"), trace.slice_time(b, b + S).for_gpu("GPU-A")]
        parts.append(SampleBatch.concat([p for p in parts if len(p)] or [parts[0]]))
        for part in parts:
            checked = SampleBatch(**part._fields())  # the validated construction: its checks hold
            assert part.encode() == checked.encode() == SampleBatch.decode(part.encode()).encode()
            assert part.to_samples() == checked.to_samples()
            assert not part.t_ns.flags.writeable and not part.power_w.flags.writeable
            rows = part.per_sample(summary_mod.RAW_FEATURES, summary_mod._raw_features)
            direct = summary_mod._raw_features(SampleBatch.decode(part.encode()))
            assert rows.shape == direct.shape
            assert np.array_equal(rows, direct, equal_nan=True)
            assert not rows.flags.writeable
    with pytest.raises(Exception, match="rows"):
        trace.slice_time(T0, T0 + S).per_sample("bad", lambda b: np.zeros(len(b) + 1))


@pytest.mark.parametrize("shared_ns", [window_mod.SHARED_READ_NS, 0])
def test_windows_read_together_equal_windows_read_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_ns: int
) -> None:
    """``attested_windows`` (the engine's look-ahead: one read of the store for a group's windows) gives
    what ``attested_window`` gives for each, attested or not, in one segment or across two."""
    monkeypatch.setattr(window_mod, "SHARED_READ_NS", shared_ns)
    trace = _trace(12, seed=12)
    store = _store(tmp_path, trace.slice_time(T0, T0 + 6 * S), b"\x08" * 16, attest=True)
    _add_segment(store, trace.slice_time(T0 + 6 * S, T0 + 13 * S), b"\x09" * 16, attest=False, first=0)
    together, alone = Windows(store, threading.Lock()), Windows(store, threading.Lock(), memo=False)
    rng = np.random.default_rng(3)
    for _ in range(30):
        ranges = []
        for _ in range(int(rng.integers(1, 12))):
            t0 = T0 + int(rng.integers(-S, 13 * S))
            ranges.append((t0, t0 + int(rng.integers(1, 3 * S))))
        got = together.attested_windows(NODE, ranges)
        for (t0, t1), w in zip(ranges, got, strict=True):
            want = alone.attested_window(NODE, t0, t1)
            assert w is not None
            assert (w.samples.encode(), w.summary, w.findings, w.batches) == (
                want.samples.encode(),
                want.summary,
                want.findings,
                want.batches,
            )
    first_only = together.attested_windows(NODE, [(T0 + 8 * S, T0 + 9 * S), (T0, T0 + S)], lambda w: False)
    assert first_only[1] is None and first_only[0] is not None and first_only[0].summary is None
    unknown = together.attested_windows("node-x", [(T0, T0 + S), (T0 + S, T0 + 2 * S)])
    assert all(w is not None and [f.id for f in w.findings] == ["ingest.unknown_node"] for w in unknown)
    assert together.attested_windows(NODE, []) == []


def test_cut_time_is_concat_of_slices() -> None:
    """``SampleBatch.cut_time`` (a window cut from stored batches without building the slices) equals the
    concatenation of the slices, also for batches overlapping in time (two GPUs' batches, merged by time),
    with the per-sample rows gathered from the whole batches."""
    a = dataclasses.replace(demo_trace(BF16, 4, seed=1, start_ns=T0), gpus=("GPU-A",))
    b = dataclasses.replace(demo_trace(INT8, 4, seed=2, start_ns=T0 + 3), gpus=("GPU-B",))
    c = dataclasses.replace(demo_trace(BF16, 2, seed=3, start_ns=T0 + 4 * S), gpus=("GPU-A",))
    batches = [SampleBatch.decode(x.encode()).memoised() for x in (a, b, c)]
    rng = np.random.default_rng(5)
    for _ in range(80):
        t0 = T0 + int(rng.integers(-S, 6 * S))
        t1 = t0 + int(rng.integers(0, 4 * S))
        order = [batches[i] for i in rng.permutation(3)]
        parts = [p for p in (x.slice_time(t0, t1) for x in order) if len(p)]
        got = SampleBatch.cut_time(order, t0, t1)
        if not parts:
            assert got is None
            continue
        want = SampleBatch.concat(parts)
        assert got is not None and got.encode() == want.encode() and got.gpus == want.gpus
        rows = got.per_sample(summary_mod.RAW_FEATURES, summary_mod._raw_features)
        direct = summary_mod._raw_features(SampleBatch.decode(got.encode()))
        assert np.array_equal(rows, direct, equal_nan=True)
        assert summarise(got, 1.0) == summarise(SampleBatch.decode(want.encode()), 1.0)
