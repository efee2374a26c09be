"""Scoring a window against load-aware profiles: ``consistent``, ``inconsistent`` or ``inconclusive``.

For the claimed profile at the window's load, every feature's window median is standardised by the
run-calibrated scale (:meth:`LoadProfile.scale`): ``z_f = (median_f - expected_f(load)) / scale_f``. The
statistic is ``max_f |z_f|`` and the threshold the two-sided normal quantile for the target false-alarm
rate, Bonferroni-divided among the features. Then:

* ``inconsistent``: the statistic is beyond the threshold. The enrolled alternative (same GPU type, other
  model or precision) with the smallest statistic is named when it fits better than the claim;
* ``inconclusive``: too little power to decide: no busy load (idle window), too few samples, a load outside
  the enrolled range, a profile calibrated on fewer than :data:`MIN_RUNS` runs, or an alternative whose
  expected behaviour at this load lies inside the claimed profile's acceptance region (the window could
  not tell them apart);
* ``consistent`` otherwise.

``power`` is the probability that a window of this size and load from the nearest enrolled alternative
would be flagged (normal approximation), so a ``consistent`` outcome says how much it rules out.
A fingerprint outcome is statistical evidence, never a proof.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from scipy import special

from tmb.errors import Finding, InputError, Severity, finding
from tmb.fingerprint.loadprofile import MIN_LOAD, MIN_RUNS, LoadProfile
from tmb.fingerprint.summary import MIN_SAMPLES, WindowSummary

Outcome = Literal["consistent", "inconsistent", "inconclusive"]
#: Claims whose matching profiles a :class:`Judge` keeps (then it starts again).
CLAIMS_KEPT: Final = 1024


@dataclass(frozen=True)
class Judgement:
    """The fingerprint outcome for one window (statistical evidence, never a proof)."""

    decision: Outcome
    claimed: str
    profile: str | None
    load: float
    statistic: float
    threshold: float
    n_samples: int
    window_s: float
    false_alarm_rate: float
    deviations: Mapping[str, float] = field(default_factory=dict)
    best_alternative: str | None = None
    best_alternative_statistic: float | None = None
    power: float | None = None
    power_against: str | None = None  # the alternative ``power`` refers to (the nearest at this load)
    runs: int = 0
    findings: tuple[Finding, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "claimed": self.claimed,
            "profile": self.profile,
            "load": self.load,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "n_samples": self.n_samples,
            "window_s": self.window_s,
            "false_alarm_rate": self.false_alarm_rate,
            "deviations": dict(self.deviations),
            "best_alternative": self.best_alternative,
            "best_alternative_statistic": self.best_alternative_statistic,
            "power": self.power,
            "power_against": self.power_against,
            "runs": self.runs,
            "findings": [f.to_dict() for f in self.findings],
        }


def threshold(far: float, n_features: int) -> float:
    """Two-sided normal quantile for ``far`` split among ``n_features`` (Bonferroni)."""
    return float(-special.ndtri(far / (2.0 * max(n_features, 1))))


Expected = Callable[[LoadProfile, str, int], tuple[tuple[float, float] | None, float]]


def statistic(
    profile: LoadProfile, window: WindowSummary, names: Sequence[str], expected: Expected | None = None
) -> tuple[float, dict[str, float]]:
    """``max |z|`` over ``names`` and the signed ``z`` per feature, under ``profile`` at the window's load
    (``expected``: :meth:`LoadProfile.expected_scale` at the window's load, as the judge keeps it)."""
    zs: dict[str, float] = {}
    for name in names:
        fs = window.features.get(name)
        if fs is None:
            continue
        if expected is None:
            exp, scale = profile.expected_scale(name, window.load, fs.n)
        else:
            exp, scale = expected(profile, name, fs.n)
        if exp is not None:
            zs[name] = (fs.median - exp[0]) / scale
    return (max((abs(z) for z in zs.values()), default=math.nan), zs)


class Judge:
    """Scores windows against a fixed set of load-aware profiles."""

    def __init__(self, profiles: Sequence[LoadProfile], *, target_far: float | None = None) -> None:
        if not profiles:
            raise InputError("no profiles to score against")
        self.profiles = tuple(profiles)
        self.target_far = target_far
        self._matching: dict[str, tuple[LoadProfile, ...]] = {}  # claim -> the profiles it matches

    def _candidates(self, claim: str) -> tuple[LoadProfile, ...]:
        """The profiles ``claim`` matches, in order (kept for the next request with the same claim; claims
        come from requests, so at most :data:`CLAIMS_KEPT` of them)."""
        got = self._matching.get(claim)
        if got is None:
            got = tuple(p for p in self.profiles if p.matches(claim))
            if len(self._matching) >= CLAIMS_KEPT:
                self._matching.clear()
            self._matching[claim] = got
        return got

    def covers(self, claim: str) -> bool:
        return bool(self._candidates(claim))

    def judge(self, claimed: str, window: WindowSummary) -> Judgement:
        notes: list[Finding] = []
        candidates = list(self._candidates(claimed))
        far = self.target_far or (candidates[0].target_far if candidates else 1e-3)
        n = window.n_samples

        def undecided(fid: str, message: str, profile: LoadProfile | None = None, **ctx: Any) -> Judgement:
            notes.append(finding(fid, message, severity=Severity.WARNING, **ctx))
            return Judgement(
                "inconclusive", claimed, profile.key if profile else None, window.load, math.nan, math.nan,
                n, window.seconds, far, runs=profile.runs if profile else 0, findings=tuple(notes),
            )  # fmt: skip

        if not candidates:
            return undecided("fingerprint.no_profile", f"no enrolled profile matches claim {claimed!r}")
        if window.load < MIN_LOAD:
            return undecided(
                "fingerprint.idle_window", "no request in flight: an idle GPU says little", load=window.load
            )
        if n < MIN_SAMPLES:
            return undecided(
                "fingerprint.too_few_samples", f"{n} samples in the window, need {MIN_SAMPLES}", samples=n
            )
        in_range = [p for p in candidates if p.in_range(window.load)]
        if not in_range:
            ranges = {p.key: list(p.load_range) for p in candidates}
            return undecided(
                "fingerprint.load_out_of_range",
                f"load {window.load:.3g} is outside every enrolled load range of {claimed!r}",
                load=window.load,
                enrolled=ranges,
            )
        kept: dict[tuple[int, str], tuple[tuple[float, float] | None, float]] = {}

        def expected(p: LoadProfile, name: str, n: int) -> tuple[tuple[float, float] | None, float]:
            """``p.expected_scale`` at the window's load, once per profile and feature of this window (the
            claimed profile's are needed again against each alternative)."""
            got = kept.get((id(p), name))
            if got is None:
                got = kept[(id(p), name)] = p.expected_scale(name, window.load, n)
            return got

        scored = []
        for p in in_range:
            names = [f for f in p.features if f in window.features]
            if names:
                stat, zs = statistic(p, window, names, expected)
                scored.append((stat, p.key, p, names, zs))
        if not scored:
            return undecided(
                "fingerprint.feature_missing",
                "the window has none of the claimed profile's features",
                features=sorted(window.features),
            )
        stat, _, claim_p, names, zs = min(scored, key=lambda s: (s[0], s[1]))
        if claim_p.runs < MIN_RUNS:
            return undecided(
                "fingerprint.too_few_runs",
                f"{claim_p.key} is calibrated on {claim_p.runs} run(s), needs {MIN_RUNS} to decide",
                claim_p,
                runs=claim_p.runs,
                minimum=MIN_RUNS,
            )
        missing = sorted(set(claim_p.features) - set(names))
        if missing:
            notes.append(
                finding(
                    "fingerprint.feature_missing",
                    "features of the claimed profile absent from the window",
                    severity=Severity.INFO,
                    features=missing,
                )
            )
        thr = threshold(far, len(names))
        alts = self._alternatives(claim_p, window, names, thr, expected)
        best = min(alts, key=lambda a: a[1]) if alts else None
        nearest = min(alts, key=lambda a: (a[2], a[0])) if alts else None
        base: dict[str, Any] = {
            "claimed": claimed, "profile": claim_p.key, "load": window.load, "statistic": stat,
            "threshold": thr, "n_samples": n, "window_s": window.seconds, "false_alarm_rate": far,
            "deviations": zs, "power": nearest[2] if nearest else None,
            "power_against": nearest[0] if nearest else None, "runs": claim_p.runs,
        }  # fmt: skip
        if stat > thr:
            better = best if best is not None and best[1] < stat else None
            worst = max(zs, key=lambda k: abs(zs[k]))
            notes.append(
                finding(
                    "fingerprint.inconsistent",
                    f"{worst} is {zs[worst]:+.1f} scales from {claim_p.key} at load {window.load:.3g}"
                    f" (threshold {thr:.2f})",
                    feature=worst,
                    z=round(zs[worst], 3),
                    threshold=round(thr, 3),
                    closest=better[0] if better else None,
                )
            )
            return Judgement(
                "inconsistent",
                best_alternative=better[0] if better else None,
                best_alternative_statistic=better[1] if better else None,
                findings=tuple(notes),
                **base,
            )
        overlap = sorted(a[0] for a in alts if a[2] < 0.5 and a[1] <= thr)
        if overlap:
            notes.append(
                finding(
                    "fingerprint.alternatives_overlap",
                    f"at load {window.load:.3g} the window cannot tell {claim_p.key}"
                    f" from {', '.join(overlap)}",
                    severity=Severity.WARNING,
                    alternatives=overlap,
                )
            )
            return Judgement(
                "inconclusive",
                best_alternative=best[0] if best else None,
                best_alternative_statistic=best[1] if best else None,
                findings=tuple(notes),
                **base,
            )
        return Judgement("consistent", findings=tuple(notes), **base)

    def _alternatives(
        self,
        claim_p: LoadProfile,
        window: WindowSummary,
        names: Sequence[str],
        thr: float,
        expected: Expected,
    ) -> list[tuple[str, float, float]]:
        """(key, statistic of the window under it, power against it) for each applicable alternative."""
        out: list[tuple[str, float, float]] = []
        for alt in self.profiles:
            if alt.identity == claim_p.identity or not alt.in_range(window.load):
                continue
            if alt.gpu_type and claim_p.gpu_type and alt.gpu_type != claim_p.gpu_type:
                continue  # another kind of GPU cannot stand behind this node's claim
            common = [f for f in names if f in alt.features]
            if not common:
                continue
            sep, terms = 0.0, list[float]()
            own_scale = alt.runs >= MIN_RUNS  # else the claimed profile's scale
            for name in common:
                fs = window.features[name]
                c, c_scale = expected(claim_p, name, fs.n)
                if own_scale:
                    a, a_scale = expected(alt, name, fs.n)
                else:
                    a, a_scale = alt.expected(name, window.load), c_scale
                if a is None:
                    continue
                if c is not None:
                    sep = max(sep, abs(a[0] - c[0]) / c_scale)
                terms.append(abs(fs.median - a[0]) / a_scale)
            stat = max(terms, default=math.inf)
            out.append((alt.key, stat, float(special.ndtr(sep - thr))))
        return out
