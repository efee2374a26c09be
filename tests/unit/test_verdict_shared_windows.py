"""Requests whose windows coincide share the window's telemetry digest and summary (``Engine._cached``), and
the summary itself is computed with fewer array calls: neither may change a verdict. The oracle is the
engine's former per-request path (filter the request's GPUs, ``np.median``-based summary, judge), computed
one request at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from sample_infra.demo_setup import demo_trace, enrol_profiles
from tmb.fingerprint import Judge, LoadProfile, load_profile
from tmb.fingerprint.summary import (
    MAX_RHO,
    MIN_SAMPLES,
    SUMMARY_FEATURES,
    FeatureSummary,
    WindowSummary,
    sample_features,
    summarise,
)
from tmb.ingest.results import AttestationSummary, BatchRef
from tmb.spans import Outcome, Span
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings, Window, _fingerprint_dict
from tmb.verdict.signing import load_or_create_key

T0 = 1_700_000_000 * 10**9
BF16, INT8 = "llama-1b/bf16/h100", "llama-1b/int8/h100"


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> list[LoadProfile]:
    out = tmp_path_factory.mktemp("profiles")
    return [load_profile(p) for p in enrol_profiles([BF16, INT8], out)]


def _reference_summary(batch: SampleBatch, load: float) -> WindowSummary:
    """The summary as the engine computed it before (``np.median`` over the feature matrix; per feature
    when any value is invalid)."""
    values = sample_features(batch) if len(batch) else {}
    names = [n for n in SUMMARY_FEATURES if n in values]
    out: dict[str, FeatureSummary] = {}
    t0 = int(batch.t_ns[0]) if len(batch) else 0
    t1 = int(batch.t_ns[-1]) if len(batch) else 0
    if not names:
        return WindowSummary(t0, t1, float(load), out)
    x = np.column_stack([np.asarray(values[n], dtype=np.float64) for n in names])
    if x.shape[0] >= MIN_SAMPLES and not bool(np.isnan(x).any()):
        med = np.median(x, axis=0)
        d = x - x.mean(axis=0)
        ss = np.einsum("ij,ij->j", d, d)
        lag = np.einsum("ij,ij->j", d[1:], d[:-1])
        rho = np.clip(np.divide(lag, ss, out=np.zeros_like(ss), where=ss > 0), 0.0, MAX_RHO)
        noise = (math.pi / 2.0) * (ss / x.shape[0]) * (1.0 + rho) / (1.0 - rho)
        for j, name in enumerate(names):
            out[name] = FeatureSummary(float(med[j]), int(x.shape[0]), float(noise[j]))
        return WindowSummary(t0, t1, float(load), out)
    for j, name in enumerate(names):
        col = x[:, j][np.isfinite(x[:, j])]
        if col.size < MIN_SAMPLES:
            continue
        d = col - col.mean()
        den = float(np.dot(d, d))
        r = float(np.dot(d[1:], d[:-1]) / den) if den > 0 else 0.0
        r = min(max(r, 0.0), MAX_RHO)
        sd = float(col.std())
        noise_j = (math.pi / 2.0) * sd * sd * (1.0 + r) / (1.0 - r)
        out[name] = FeatureSummary(float(np.median(col)), int(col.size), noise_j)
    return WindowSummary(t0, t1, float(load), out)


def test_summary_matches_the_median_reference() -> None:
    rng = np.random.default_rng(7)
    for i in range(60):
        batch = demo_trace([BF16, INT8][i % 2], 1 + i % 4, seed=i, start_ns=T0)
        if i % 3 == 0:  # invalid values: NaN, infinities, negatives, above the scale, a column all invalid
            cols = {}
            for name in ("power_w", "gpu_util", "sm_active", "mem_used_bytes"):
                col = batch.column(name).copy()
                hit = rng.integers(0, len(batch), size=len(batch) // 3)
                col[hit] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 150.0], size=hit.size)
                cols[name] = col
            cols["tensor_active"] = np.full(len(batch), np.nan)
            batch = dataclasses.replace(batch, **cols)
        for n in (len(batch), 1, 9, 10, 11, 12, 31):
            part = batch.slice_time(T0, int(batch.t_ns[min(n, len(batch) - 1)]))
            assert summarise(part, 2.0) == _reference_summary(part, 2.0), (i, n)


def _two_gpu_trace() -> SampleBatch:
    """One node, two GPUs: GPU-A serves bf16, GPU-B int8, over 12 s."""
    a = dataclasses.replace(demo_trace(BF16, 12, seed=3, start_ns=T0), gpus=("GPU-A",))
    b = dataclasses.replace(demo_trace(INT8, 12, seed=4, start_ns=T0 + 7), gpus=("GPU-B",))
    return SampleBatch.concat([a, b])


def _span(i: int, gpus: tuple[str, ...], t0: int, t1: int, claim: str) -> Span:
    return Span(
        f"{i:032x}", None, "w1", "node-1", gpus, claim, "llama-1b", "POST", "/v1/chat/completions",
        t0, t0 + 10**6, t1, 200, 10, 10, 10, Outcome.OK,
    )  # fmt: skip


def test_overlapping_requests_decide_as_one_by_one(tmp_path: Path, profiles: list[LoadProfile]) -> None:
    trace = _two_gpu_trace()
    refs = (BatchRef(b"\x01" * 16, 0, hashlib.sha256(trace.encode()).digest(), 1),)
    summary = AttestationSummary("node-1", 1, 1, 1, 0, "aa" * 32, "sha256", True, True, True)
    s = 10**9
    # overlapping windows, several coinciding exactly, on one GPU, the other, both, or neither of the trace
    shapes = [(0, 5), (1, 6), (0, 5), (2, 7), (0, 5), (3, 11), (1, 6), (6, 11), (0, 12), (4, 4.5), (0, 5)]
    gpu_sets = [("GPU-A",), ("GPU-B",), ("GPU-A", "GPU-B"), ("GPU-X",), ("GPU-A", "GPU-A")]
    loads = iter([1.0, 0.0, 1.0, 3.0, None, 1.0, 1.5, 1.0, 0.5, 1.0, 1.0] * 20)
    spans, windows = [], []
    for i, (a, b) in enumerate(shapes * 4):
        gpus = gpu_sets[i % len(gpu_sets)]
        span = _span(i, gpus, T0 + int(a * s), T0 + int(b * s), [BF16, INT8, "llama-1b"][i % 3])
        spans.append(span)
        windows.append(Window(span.start_ns, span.end_ns, False))
    load_by_id = {sp.id: next(loads) for sp in spans}
    signer = load_or_create_key(str(tmp_path / "key.pem"))
    shared = Engine(
        AsyncStore(str(tmp_path / "a.db")), signer, None, profiles, EngineSettings(demo=True),
        load_of=lambda sp, _w: load_by_id[sp.id],
    )  # fmt: skip
    judge = Judge(profiles)
    decisions = set()
    for span, window in zip(spans, windows, strict=True):
        samples = trace.slice_time(window.t0_ns, window.t1_ns)
        got, got_refs = shared.decide(span, window, samples, summary, [], batches=refs)
        alone = Engine(
            AsyncStore(str(tmp_path / "b.db")), signer, None, profiles, EngineSettings(demo=True),
            load_of=lambda sp, _w: load_by_id[sp.id],
        )  # fmt: skip
        want, want_refs = alone.decide(span, window, samples, summary, [])
        assert dataclasses.replace(got, issued_ns=0) == dataclasses.replace(want, issued_ns=0)
        assert got_refs == want_refs
        # the former per-request path, by hand
        mine = [samples.for_gpu(g) for g in span.gpus if g in samples.gpus]
        part = samples
        if mine and len(mine) < len(samples.gpus):
            part = SampleBatch.concat(mine) if len(mine) > 1 else mine[0]
        load = load_by_id[span.id]
        oracle = _reference_summary(part, 1.0 if load is None else load)
        assert span.model_served is not None
        score = judge.judge(span.model_served, oracle)
        assert got.fingerprint == _fingerprint_dict(score)
        decisions.add(got.fingerprint["decision"])
    summaries = [k for k in shared._windows if len(k) == 5]  # (node, t0, t1, batches, gpus): a summary
    assert 0 < len(summaries) < len(spans)  # coinciding windows were shared
    assert decisions >= {"consistent", "inconsistent", "inconclusive"}
