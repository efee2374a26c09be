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

from tmb.fingerprint.beta import BetaFit, FitError, fit_beta
from tmb.fingerprint.judge import Judge, Judgement
from tmb.fingerprint.loadprofile import FORMAT, VERSION, LoadProfile, enroll_runs, load_profile
from tmb.fingerprint.mixture import BetaMixture, GaussMixture, fit_beta_mixture, fit_gauss_mixture
from tmb.fingerprint.summary import WindowSummary, summarise, window_summaries

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
