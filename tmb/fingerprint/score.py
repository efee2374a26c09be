"""Scoring a window of telemetry against the claimed profile.

Two tests, both standardised with the effective sample size and both calibrated on held-out enrolment data
for the scored window's length (:mod:`tmb.fingerprint.calibrate`):

* **goodness of fit**: the joint per-sample log-likelihood under the claimed profile, against its held-out
  distribution; a window unlike anything the claimed model produced fails it;
* **likelihood ratio**: the per-sample log-likelihood ratio of the claimed profile against every enrolled
  profile of another identity; a window that fits an alternative better than genuine windows usually do
  fails it. The best alternative and its summed LLR are reported.

The target false-alarm rate is split evenly between the two tests, the LLR half Bonferroni-divided among
the alternatives. When the claim matches several profiles (load regimes) the best-fitting one is used.
The outcome is statistical evidence, not a proof.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from tmb.errors import Finding, InputError, Severity, finding
from tmb.fingerprint.beta import FloatArray
from tmb.fingerprint.calibrate import CalibrationError, NullModel, fit_null, max_window
from tmb.fingerprint.profile import Profile
from tmb.fingerprint.window import prepare, standardised
from tmb.telemetry.features import extract
from tmb.telemetry.sample import SampleBatch

Decision = Literal["consistent", "inconsistent", "insufficient_data"]

#: Fewest samples (per feature) a window needs before it is scored.
MIN_SAMPLES = 40
#: Fewest effective samples.
MIN_N_EFF = 4.0


@dataclass(frozen=True)
class Score:
    """The fingerprint outcome for one window (statistical evidence, never a proof)."""

    decision: Decision
    claimed: str
    profile: str | None
    statistic: float
    p_value: float
    n_samples: int
    n_eff: float
    best_alternative: str | None
    best_alternative_llr: float | None
    llr_p_value: float | None
    false_alarm_rate: float
    window_s: float
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "claimed": self.claimed,
            "profile": self.profile,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "n_samples": self.n_samples,
            "n_eff": self.n_eff,
            "best_alternative": self.best_alternative,
            "best_alternative_llr": self.best_alternative_llr,
            "llr_p_value": self.llr_p_value,
            "false_alarm_rate": self.false_alarm_rate,
            "window_s": self.window_s,
            "findings": [f.to_dict() for f in self.findings],
        }


class Scorer:
    """Scores windows against a fixed set of profiles, caching the null distributions per window length."""

    def __init__(self, profiles: Sequence[Profile], *, target_far: float | None = None) -> None:
        if not profiles:
            raise InputError("no profiles to score against")
        self.profiles = tuple(profiles)
        self.target_far = target_far
        self._nulls: dict[tuple[int, int, int, frozenset[str], bool], NullModel | None] = {}

    def _null(
        self, claimed: Profile, alt: Profile | None, window_n: int, names: frozenset[str], copula: bool
    ) -> tuple[NullModel | None, int]:
        ids = (self.profiles.index(claimed), -1 if alt is None else self.profiles.index(alt))
        key = (*ids, window_n, names, copula)
        if key not in self._nulls:
            segs = [_series(seg, claimed, alt, names, copula) for seg in claimed.heldout]
            n = min(window_n, max_window(segs))
            try:
                self._nulls[key] = fit_null(segs, n) if n >= 2 else None
            except CalibrationError:
                self._nulls[key] = None
        null = self._nulls[key]
        return null, (null.window_n if null is not None else 0)

    def score(
        self,
        claimed: str,
        values: Mapping[str, Any],
        *,
        window_s: float | None = None,
        energy_per_token_j: float | None = None,
    ) -> Score:
        """Score one window of feature values (``features(batch)``) against the profiles ``claimed`` names.

        ``energy_per_token_j`` (when the proxy supplied token counts) is compared with the claimed
        profile's enrolment distribution and reported as an info finding; it does not enter the decision,
        because one value per window cannot be calibrated on held-out windows the way the tests are.
        """
        notes: list[Finding] = []
        candidates = [p for p in self.profiles if p.matches(claimed)]
        far = self.target_far or (candidates[0].calibration.target_far if candidates else 1e-3)

        def fail(decision: Decision, **kw: Any) -> Score:
            base: dict[str, Any] = {
                "profile": None, "statistic": math.nan, "p_value": math.nan, "n_samples": 0, "n_eff": 0.0,
                "best_alternative": None, "best_alternative_llr": None, "llr_p_value": None,
            }  # fmt: skip
            base.update(kw)
            return Score(
                decision,
                claimed,
                false_alarm_rate=far,
                window_s=window_s or math.nan,
                findings=tuple(notes),
                **base,
            )

        if not candidates:
            notes.append(finding("fingerprint.no_profile", f"no enrolled profile matches claim {claimed!r}"))
            return fail("insufficient_data")
        clean, prep_notes = prepare(values)
        notes.extend(prep_notes)
        n_samples = max((v.size for v in clean.values()), default=0)
        usable = self._usable(clean, candidates, notes)
        if not usable:
            notes.append(
                finding("fingerprint.empty_window", "the window holds no usable sample", samples=n_samples)
            )
            return fail("insufficient_data", n_samples=n_samples)
        n = min(v.size for v in usable.values())
        if n < MIN_SAMPLES:
            notes.append(
                finding(
                    "fingerprint.too_few_samples",
                    f"{n} samples in the window, need {MIN_SAMPLES}",
                    severity=Severity.WARNING,
                    samples=n,
                    minimum=MIN_SAMPLES,
                )
            )
            return fail("insufficient_data", n_samples=n)
        # The claimed profile: the best-fitting regime among those the claim names.
        aligned = len({v.size for v in usable.values()}) == 1
        if not aligned:
            notes.append(
                finding(
                    "fingerprint.unaligned_features",
                    "features have different sample counts (values dropped): scored without the copula",
                    severity=Severity.INFO,
                    counts={k: int(v.size) for k, v in usable.items()},
                )
            )
        names = frozenset(usable)
        memo = _SeriesMemo()  # the claimed profile's series comes up three times per window: compute it once
        fits = [(float(memo(p, usable, None, aligned).mean()), i) for i, p in enumerate(candidates)]
        claim_p = candidates[max(fits)[1]]
        missing = sorted(set(claim_p.features) - set(usable))
        if missing:
            notes.append(
                finding(
                    "fingerprint.feature_missing",
                    "features of the claimed profile absent from the window",
                    severity=Severity.WARNING,
                    features=missing,
                )
            )
        gof_series = memo(claim_p, usable, None, aligned)
        gof_null, used_n = self._null(claim_p, None, gof_series.size, names, aligned)
        if gof_null is None:
            notes.append(finding("fingerprint.uncalibrated", "the profile's held-out data cannot calibrate"))
            return fail("insufficient_data", profile=claim_p.key, n_samples=n)
        if used_n < gof_series.size:
            notes.append(
                finding(
                    "fingerprint.calibration_window_shorter",
                    "held-out data calibrate windows only up to a shorter length",
                    severity=Severity.INFO,
                    window_n=gof_series.size,
                    calibrated_n=used_n,
                )
            )
        z, ne, rho = standardised(gof_series, gof_null.mu, gof_null.sd, gof_null.rho)
        if ne < MIN_N_EFF:
            notes.append(
                finding(
                    "fingerprint.too_few_effective_samples",
                    f"n_eff {ne:.1f} after autocorrelation (rho {rho:.2f}), need {MIN_N_EFF}",
                    severity=Severity.WARNING,
                    n_eff=ne,
                    rho=rho,
                )
            )
            return fail("insufficient_data", profile=claim_p.key, n_samples=n, n_eff=ne)
        alternatives = [p for p in self.profiles if not p.matches(claimed)]
        alpha_gof = far / 2.0 if alternatives else far
        alpha_llr = (far / 2.0) / max(len(alternatives), 1)
        p_gof = gof_null.pvalue(z)
        decision: Decision = "consistent"
        if p_gof < alpha_gof:
            decision = "inconsistent"
            notes.append(
                finding(
                    "fingerprint.goodness_of_fit",
                    "the window is unlike the claimed profile's enrolment data",
                    statistic=z,
                    p_value=p_gof,
                    alpha=alpha_gof,
                )
            )
        best: tuple[float, str, float] | None = None  # (p-value, key, summed LLR)
        for alt in alternatives:
            series = _series(usable, claim_p, alt, names, aligned, memo)
            if series.size == 0:
                continue
            null, _ = self._null(claim_p, alt, series.size, names, aligned)
            if null is None:
                continue
            z_alt, _ne, _rho = standardised(series, null.mu, null.sd, null.rho)
            p_alt = null.pvalue(z_alt)
            if best is None or p_alt < best[0]:
                best = (p_alt, alt.key, float(series.sum()))
        if best is not None and best[0] < alpha_llr:
            decision = "inconsistent"
            notes.append(
                finding(
                    "fingerprint.likelihood_ratio",
                    f"the window fits {best[1]} better than genuine windows of the claim fit it",
                    alternative=best[1],
                    llr=best[2],
                    p_value=best[0],
                    alpha=alpha_llr,
                )
            )
        if energy_per_token_j is not None and claim_p.energy_per_token is not None:
            e = claim_p.energy_per_token
            notes.append(
                finding(
                    "fingerprint.energy_per_token",
                    "energy per generated token compared with the claimed profile's enrolment",
                    severity=Severity.INFO,
                    joules=energy_per_token_j,
                    enrolled_mean=e.means[0],
                    enrolled_sd=e.sds[0],
                    z=(energy_per_token_j - e.means[0]) / e.sds[0],
                )
            )
        return Score(
            decision,
            claimed,
            claim_p.key,
            z,
            p_gof,
            n,
            ne,
            None if best is None else best[1],
            None if best is None else best[2],
            None if best is None else best[0],
            far,
            window_s if window_s is not None else n / claim_p.rate_hz,
            tuple(notes),
        )

    @staticmethod
    def _usable(
        clean: Mapping[str, FloatArray], candidates: Sequence[Profile], notes: list[Finding]
    ) -> dict[str, FloatArray]:
        modelled = set().union(*(p.features for p in candidates))
        usable: dict[str, FloatArray] = {}
        for name, arr in clean.items():
            if name not in modelled and arr.size:
                notes.append(
                    finding(
                        "fingerprint.unexpected_feature",
                        f"the window reports {name!r}, which no profile of the claim has (another GPU?)",
                        severity=Severity.WARNING,
                        feature=name,
                    )
                )
            if name not in modelled or arr.size == 0:
                continue
            if arr.size > 1 and float(arr.min()) == float(arr.max()) and 0.0 < float(arr[0]) < 1.0:
                # One repeated interior value: a stuck sensor or a replayed constant, not telemetry.
                notes.append(
                    finding(
                        "fingerprint.constant_feature",
                        f"every value of {name!r} is {float(arr[0])!r}: a stuck or fabricated reading",
                        severity=Severity.WARNING,
                        feature=name,
                        value=float(arr[0]),
                        samples=int(arr.size),
                    )
                )
                continue
            usable[name] = arr
        return usable


class _SeriesMemo:
    """:meth:`Profile.series` results within one :meth:`Scorer.score` call, keyed by profile, values
    object and the features actually used (the same window is scored against the same profile on the
    same features several times: claim selection, goodness of fit, each likelihood ratio)."""

    def __init__(self) -> None:
        self._done: dict[tuple[int, int, tuple[str, ...], bool], FloatArray] = {}

    def __call__(
        self, profile: Profile, values: Mapping[str, FloatArray], names: Collection[str] | None, copula: bool
    ) -> FloatArray:
        used = tuple(f for f in profile.features if f in values and (names is None or f in names))
        key = (id(profile), id(values), used, copula)
        out = self._done.get(key)
        if out is None:
            out = self._done[key] = profile.series(values, used, copula=copula)
        return out


_SeriesFn = Callable[[Profile, Mapping[str, FloatArray], Collection[str] | None, bool], FloatArray]


def _direct(
    profile: Profile, values: Mapping[str, FloatArray], names: Collection[str] | None, copula: bool
) -> FloatArray:
    return profile.series(values, names, copula=copula)


def _series(
    values: Mapping[str, FloatArray],
    claimed: Profile,
    alt: Profile | None,
    names: frozenset[str],
    copula: bool,
    series: _SeriesFn = _direct,
) -> FloatArray:
    """Log-likelihood under ``claimed`` or, with ``alt``, the log-likelihood ratio on common features."""
    if alt is None:
        return series(claimed, values, names, copula)
    common = names & set(claimed.features) & set(alt.features)
    if not common:
        return np.zeros(0)
    ratio: FloatArray = series(claimed, values, common, copula) - series(alt, values, common, copula)
    return ratio


def score_window(
    profiles: Sequence[Profile], claimed: str, values: Mapping[str, Any], *, window_s: float | None = None
) -> Score:
    """One-shot :meth:`Scorer.score` (build a :class:`Scorer` to score many windows)."""
    return Scorer(profiles).score(claimed, values, window_s=window_s)


def score_batch(scorer: Scorer, claimed: str, batch: SampleBatch, *, window_s: float = 10.0) -> list[Score]:
    """Score consecutive ``window_s`` windows of a sample batch (the last, shorter one too).

    Values the telemetry layer dropped as invalid (NaN, inf, negative power, fractions above 1) become
    findings of the window they fell in. An empty batch gives one ``insufficient_data`` score.
    """
    if not (math.isfinite(window_s) and window_s > 0.0):
        raise InputError("window length must be a positive number of seconds", window_s=window_s)
    if len(batch) == 0:
        return [scorer.score(claimed, {}, window_s=window_s)]
    step = round(window_s * 1e9)
    t0, t_end = int(batch.t_ns[0]), int(batch.t_ns[-1])
    out: list[Score] = []
    for start in range(t0, t_end + 1, step):
        window = batch.slice_time(start, start + step)
        fs = extract(window)
        result = scorer.score(claimed, fs.aligned(), window_s=window_s)
        dropped = {k: v for k, v in fs.dropped.items() if v}
        if dropped:
            note = finding(
                "fingerprint.invalid_samples_dropped",
                f"{sum(dropped.values())} invalid value(s) dropped (NaN, inf, negative or out of range)",
                severity=Severity.WARNING,
                dropped=dropped,
                window_start_ns=start,
            )
            result = replace(result, findings=(note, *result.findings))
        out.append(result)
    return out
