"""Scoring windows: substitutions detected, genuine windows accepted, bad input gives findings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tmb.errors import InputError
from tmb.fingerprint import Profile, Scorer, enroll, score_batch, score_window
from tmb.fingerprint.calibrate import fit_null
from tmb.fingerprint.window import lag1, n_eff, standardised
from tmb.telemetry import SampleBatch, energy_per_token_j, features, generate, simulate

CLAIM = "llama-1b/bf16/h100"
SCENARIOS = {
    "quantized int8": "llama-1b/int8/h100",
    "quantized fp8": "llama-1b/fp8/h100",
    "larger model": "llama-3b/bf16/h100",
    "smaller model": "tiny-160m/bf16/h100",
    "different GPU": "llama-1b/bf16/a100",
}


def _enrol(name: str, regime: str) -> Profile:
    model, precision, gpu = name.split("/")
    traces = [generate(name, regime, 100.0, seed=s) for s in range(1, 7)]
    return enroll(model, traces, precision=precision, gpu_type=gpu, regime=regime)[0]


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    profiles = [_enrol(CLAIM, "single"), _enrol(CLAIM, "batched")]
    profiles += [_enrol(name, "batched") for name in SCENARIOS.values()]
    return Scorer(profiles)


def _window(name: str, seed: int, seconds: float = 20.0, regime: str = "batched") -> dict[str, np.ndarray]:
    return features(generate(name, regime, seconds, seed=seed))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_substitution_is_detected(scorer: Scorer, scenario: str) -> None:
    flagged = 0
    for seed in range(200, 205):
        s = scorer.score(CLAIM, _window(SCENARIOS[scenario], seed))
        flagged += s.decision == "inconsistent"
        assert s.n_samples == 400 and 0 < s.n_eff < s.n_samples
        assert s.false_alarm_rate == 1e-3
    assert flagged == 5


def test_best_alternative_names_the_substitute(scorer: Scorer) -> None:
    s = scorer.score(CLAIM, _window("llama-3b/bf16/h100", 210))
    assert s.decision == "inconsistent"
    assert s.best_alternative == "llama-3b/bf16/-/h100/batched"
    assert s.best_alternative_llr is not None and s.best_alternative_llr < 0
    assert s.llr_p_value is not None and s.llr_p_value < 1e-3
    assert "fingerprint.likelihood_ratio" in {f.id for f in s.findings}


def test_genuine_windows_are_accepted(scorer: Scorer) -> None:
    decisions = []
    for regime in ("batched", "single"):
        for seed in range(300, 315):
            s = scorer.score(CLAIM, _window(CLAIM, seed, regime=regime))
            decisions.append(s.decision)
            assert s.profile == f"llama-1b/bf16/-/h100/{regime}"  # the best-fitting regime is used
    # Calibrated for 0.1 % per window: 30 genuine windows should essentially never be flagged.
    assert decisions.count("inconsistent") <= 1
    assert decisions.count("consistent") >= 29


def test_partial_claim_makes_precision_no_substitution(scorer: Scorer) -> None:
    # Claiming only "llama-1b" accepts any enrolled llama-1b variant; the GPU still has to match.
    s = scorer.score("llama-1b//h100", _window("llama-1b/int8/h100", 220))
    assert s.decision == "consistent" and s.profile == "llama-1b/int8/-/h100/batched"


def test_unknown_claim_is_insufficient(scorer: Scorer) -> None:
    s = scorer.score("mistral-7b", _window(CLAIM, 1))
    assert s.decision == "insufficient_data" and s.findings[0].id == "fingerprint.no_profile"


@pytest.mark.parametrize(
    ("values", "finding_id"),
    [
        ({}, "fingerprint.empty_window"),
        ({"power_frac": np.array([])}, "fingerprint.empty_window"),
        ({"power_frac": np.full(400, np.nan)}, "fingerprint.nonfinite_dropped"),
        ({"power_frac": np.full(400, 0.42), "gpu_util": np.full(400, 0.42)}, "fingerprint.constant_feature"),
        ({"power_frac": np.linspace(0.3, 0.5, 20)}, "fingerprint.too_few_samples"),
        ({"power_frac": -np.linspace(0.3, 0.5, 400)}, "fingerprint.negative_dropped"),
    ],
)
def test_bad_windows_are_insufficient_with_findings(
    scorer: Scorer, values: dict[str, np.ndarray], finding_id: str
) -> None:
    s = scorer.score(CLAIM, values)
    assert s.decision == "insufficient_data"
    assert finding_id in {f.id for f in s.findings}
    assert math.isnan(s.statistic) and math.isnan(s.p_value)


def test_nan_inf_and_negative_samples_are_dropped_not_scored(scorer: Scorer) -> None:
    window = {k: v.copy() for k, v in _window(CLAIM, 400).items()}
    window["power_frac"][::10] = np.nan
    window["power_frac"][5] = np.inf
    window["power_frac"][7] = -1.0
    s = scorer.score(CLAIM, window)
    ids = {f.id for f in s.findings}
    assert {"fingerprint.nonfinite_dropped", "fingerprint.negative_dropped"} <= ids
    assert "fingerprint.unaligned_features" in ids  # features no longer line up sample by sample
    assert s.decision == "consistent"  # the remaining genuine telemetry still matches


def test_constant_feature_is_excluded_and_named(scorer: Scorer) -> None:
    window = dict(_window(CLAIM, 401))
    window["power_frac"] = np.full(400, 0.45)  # a stuck power sensor
    s = scorer.score(CLAIM, window)
    assert "fingerprint.constant_feature" in {f.id for f in s.findings}
    assert s.decision in ("consistent", "inconsistent")  # scored on the other features


def test_substitute_with_missing_features_still_detected(scorer: Scorer) -> None:
    # A100 telemetry has no GPM activity: the claimed H100 profile's GPM features are missing.
    s = scorer.score(CLAIM, _window("llama-1b/bf16/a100", 230))
    assert s.decision == "inconsistent"
    assert "fingerprint.feature_missing" in {f.id for f in s.findings}


def test_score_batch_windows_and_dropped_values(scorer: Scorer) -> None:
    batch = generate(CLAIM, "batched", 25.0, seed=500)
    scores = score_batch(scorer, CLAIM, batch, window_s=10.0)
    assert [s.decision for s in scores[:2]] == ["consistent", "consistent"]
    assert scores[2].decision == "insufficient_data" or scores[2].n_samples == 100
    power = batch.power_w.copy()
    power[3] = -5.0
    cols = {k: v for k, v in batch.columns().items() if not np.isnan(v).all()}
    cols["power_w"] = power
    bad = SampleBatch.from_columns(batch.t_ns, batch.gpus, source="synthetic", **cols)
    first = score_batch(scorer, CLAIM, bad, window_s=10.0)[0]
    assert first.findings[0].id == "fingerprint.invalid_samples_dropped"
    empty = score_batch(scorer, CLAIM, SampleBatch.empty("synthetic"), window_s=10.0)
    assert [s.decision for s in empty] == ["insufficient_data"]
    with pytest.raises(InputError):
        score_batch(scorer, CLAIM, batch, window_s=0.0)
    with pytest.raises(InputError):
        Scorer([])


def test_one_shot_score_window_matches_scorer(scorer: Scorer) -> None:
    window = _window("tiny-160m/bf16/h100", 240)
    assert score_window(scorer.profiles, CLAIM, window).decision == "inconsistent"


def test_effective_sample_size_of_ar1() -> None:
    rng = np.random.default_rng(1)
    phi, n = 0.8, 200_000
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    assert lag1(x) == pytest.approx(phi, abs=0.01)
    assert n_eff(1000, 0.8) == pytest.approx(1000 * 0.2 / 1.8)
    assert lag1(np.full(10, 3.0)) == 0.0 and lag1(np.array([1.0, 2.0])) == 0.0
    # Naive iid z-scores of AR(1) window means are far too wide; the n_eff ones are about N(0, 1).
    sd = float(x.std())
    naive, corrected = [], []
    for start in range(0, n - 400, 400):
        w = x[start : start + 400]
        naive.append((w.mean()) / (sd / math.sqrt(400)))
        corrected.append(standardised(w, 0.0, sd, 0.0)[0])
    assert np.std(naive) > 2.5
    assert np.std(corrected) == pytest.approx(1.0, abs=0.2)


def test_null_model_threshold_and_pvalue() -> None:
    rng = np.random.default_rng(2)
    segments = [rng.standard_normal(2_000) for _ in range(3)]
    null = fit_null(segments, 100)
    assert null.z_sd >= 1.0 and null.n_windows >= 8
    thr = null.threshold(1e-3)
    assert null.pvalue(thr) == pytest.approx(1e-3)
    assert null.pvalue(null.z_mean) == pytest.approx(0.5)


def test_unexpected_gpm_features_for_an_a100_claim(scorer: Scorer) -> None:
    s = scorer.score("llama-1b/bf16/a100", _window(CLAIM, 250))
    assert "fingerprint.unexpected_feature" in {f.id for f in s.findings}
    assert s.decision == "inconsistent"  # and the common features fit the H100 profile better


def test_energy_per_token_is_reported_not_decisive() -> None:
    runs = [simulate(CLAIM, "batched", 40.0, seed=s) for s in range(1, 4)]
    tokens = [r.workload["tokens_generated"] for r in runs]
    prof, _ = enroll("llama-1b", [r.batch for r in runs], precision="bf16", gpu_type="h100", tokens=tokens)
    assert prof.energy_per_token is not None and prof.energy_per_token.k == 1
    run = simulate(CLAIM, "batched", 20.0, seed=77)
    joules = energy_per_token_j(run.batch, run.workload["tokens_generated"])
    assert joules is not None
    s = Scorer([prof]).score(CLAIM, features(run.batch), energy_per_token_j=joules)
    notes = {f.id: f for f in s.findings}
    assert abs(notes["fingerprint.energy_per_token"].context["z"]) < 10
    assert s.decision == "consistent"
