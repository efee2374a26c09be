"""Statistical model fingerprinting from GPU telemetry.

Stable surface (the profile file format is in docs/profiles.md):

* fits: :func:`fit_beta` / :class:`BetaFit` (zero/one-inflated beta, Newton on sufficient statistics),
  :func:`fit_beta_mixture` / :class:`BetaMixture`, :func:`fit_gauss_mixture` / :class:`GaussMixture`;
* profiles: :func:`enroll`, :class:`Profile`, :func:`load_profile`;
* scoring: :class:`Scorer`, :func:`score_window`, :func:`score_batch`, :class:`Score`.

A fingerprint outcome is statistical evidence with a calibrated false-alarm rate, never a proof.
"""

from tmb.fingerprint.beta import BetaFit, FitError, fit_beta
from tmb.fingerprint.calibrate import CalibrationError, NullModel
from tmb.fingerprint.mixture import BetaMixture, GaussMixture, fit_beta_mixture, fit_gauss_mixture
from tmb.fingerprint.profile import FORMAT, VERSION, Profile, enroll, load_profile
from tmb.fingerprint.score import Score, Scorer, score_batch, score_window

__all__ = [
    "FORMAT",
    "VERSION",
    "BetaFit",
    "BetaMixture",
    "CalibrationError",
    "FitError",
    "GaussMixture",
    "NullModel",
    "Profile",
    "Score",
    "Scorer",
    "enroll",
    "fit_beta",
    "fit_beta_mixture",
    "fit_gauss_mixture",
    "load_profile",
    "score_batch",
    "score_window",
]
