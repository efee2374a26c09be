"""Statistical model fingerprinting from GPU telemetry, load-aware (docs/profiles.md).

Stable surface:

* window summaries: :func:`summarise`, :func:`window_summaries`, :class:`WindowSummary` (per feature the
  window median and its noise, and the window's load in requests in flight);
* profiles: :func:`enroll_runs` (leave-one-run-out calibration), :class:`LoadProfile`, :func:`load_profile`;
* scoring: :class:`Judge`, :class:`Judgement` (``consistent`` / ``inconsistent`` / ``inconclusive``);
* fits used to describe a window's distribution: :func:`fit_beta` / :class:`BetaFit` (zero/one-inflated
  beta, Newton on sufficient statistics), :func:`fit_beta_mixture` / :class:`BetaMixture`.

A fingerprint outcome is statistical evidence with a calibrated false-alarm rate, never a proof.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tmb.lazy import lazy_names

if TYPE_CHECKING:
    from tmb.fingerprint.beta import BetaFit, FitError, fit_beta
    from tmb.fingerprint.judge import Judge, Judgement
    from tmb.fingerprint.loadprofile import FORMAT, VERSION, LoadProfile, enroll_runs, load_profile
    from tmb.fingerprint.mixture import BetaMixture, GaussMixture, fit_beta_mixture, fit_gauss_mixture
    from tmb.fingerprint.summary import WindowSummary, summarise, window_summaries

_WHERE = {
    "BetaFit": "tmb.fingerprint.beta",
    "FitError": "tmb.fingerprint.beta",
    "fit_beta": "tmb.fingerprint.beta",
    "Judge": "tmb.fingerprint.judge",
    "Judgement": "tmb.fingerprint.judge",
    "FORMAT": "tmb.fingerprint.loadprofile",
    "VERSION": "tmb.fingerprint.loadprofile",
    "LoadProfile": "tmb.fingerprint.loadprofile",
    "enroll_runs": "tmb.fingerprint.loadprofile",
    "load_profile": "tmb.fingerprint.loadprofile",
    "BetaMixture": "tmb.fingerprint.mixture",
    "GaussMixture": "tmb.fingerprint.mixture",
    "fit_beta_mixture": "tmb.fingerprint.mixture",
    "fit_gauss_mixture": "tmb.fingerprint.mixture",
    "WindowSummary": "tmb.fingerprint.summary",
    "summarise": "tmb.fingerprint.summary",
    "window_summaries": "tmb.fingerprint.summary",
}

__all__ = [
    "FORMAT",
    "VERSION",
    "BetaFit",
    "BetaMixture",
    "FitError",
    "GaussMixture",
    "Judge",
    "Judgement",
    "LoadProfile",
    "WindowSummary",
    "enroll_runs",
    "fit_beta",
    "fit_beta_mixture",
    "fit_gauss_mixture",
    "load_profile",
    "summarise",
    "window_summaries",
]

__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
