"""Thresholds from held-out genuine data, never hand-set.

Enrolment keeps part of every trace out of the fit (the *held-out* segments). For a window statistic
(the joint log-likelihood under the claimed profile, or the log-likelihood ratio against an alternative)
:func:`fit_null` measures on those segments

* the per-sample mean ``mu``, standard deviation ``sd`` and lag-1 autocorrelation ``rho`` of the series,
* the distribution of the standardised window mean ``z = (mean - mu) / (sd / sqrt(n_eff))`` over sliding
  held-out windows of the scored window's length (stride a quarter window).

``z`` is close to N(0, 1) when the n_eff correction is right; the held-out windows measure what it really
is: the null is modelled as ``N(z_mean, z_sd)`` with ``z_sd`` the measured spread floored at 1 (a smaller
one is not trusted) and widened to its one-sided 90 % upper confidence bound given the number of
non-overlapping held-out windows (:func:`spread_margin`), and the threshold for a false-alarm rate
``alpha`` is its ``alpha`` quantile. A 0.1 % rate cannot be read off a few dozen windows empirically, so the
tail is the normal extrapolation; ``empirical_far`` reports the fraction of held-out windows beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from tmb.errors import InputError
from tmb.fingerprint.beta import FloatArray
from tmb.fingerprint.window import lag1, standardised, windows

#: Fewest held-out windows a null distribution is estimated from.
MIN_WINDOWS = 8
#: Default target false-alarm rate (per scored window, both tests together).
DEFAULT_FAR = 1e-3
#: Lower chi-square quantile behind :func:`spread_margin` (a one-sided 90 % bound).
MARGIN_QUANTILE = 0.1


class CalibrationError(InputError):
    """Too little held-out data to calibrate a threshold."""


@dataclass(frozen=True)
class NullModel:
    """Null (genuine-data) distribution of a standardised window statistic for one window length."""

    mu: float
    sd: float
    rho: float
    z_mean: float
    z_sd: float
    n_windows: int
    window_n: int
    empirical_far: float = 0.0

    def pvalue(self, z: float) -> float:
        """Lower-tail p-value of a window's ``z`` (small: the window is unlike genuine data)."""
        return float(special.ndtr((z - self.z_mean) / self.z_sd))

    def threshold(self, alpha: float) -> float:
        """The ``z`` below which a window is rejected at false-alarm rate ``alpha``."""
        return float(self.z_mean + self.z_sd * special.ndtri(alpha))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mu": self.mu,
            "sd": self.sd,
            "rho": self.rho,
            "z_mean": self.z_mean,
            "z_sd": self.z_sd,
            "n_windows": self.n_windows,
            "window_n": self.window_n,
            "empirical_far": self.empirical_far,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NullModel:
        out = cls(
            float(data["mu"]),
            float(data["sd"]),
            float(data["rho"]),
            float(data["z_mean"]),
            float(data["z_sd"]),
            int(data["n_windows"]),
            int(data["window_n"]),
            float(data["empirical_far"]),
        )
        if not (out.sd > 0.0 and out.z_sd >= 1.0 and 0.0 <= out.rho < 1.0 and out.window_n > 0):
            raise ValueError("sd must be positive, z_sd >= 1, 0 <= rho < 1 and window_n positive")
        if not all(math.isfinite(v) for v in (out.mu, out.sd, out.z_mean, out.z_sd)):
            raise ValueError("values must be finite")
        return out


def series_moments(segments: Sequence[FloatArray]) -> tuple[float, float, float]:
    """Pooled mean, standard deviation and (length-weighted) lag-1 autocorrelation of the segments."""
    usable = [s for s in segments if s.size > 0]
    if not usable:
        raise CalibrationError("no held-out samples to calibrate on")
    allv = np.concatenate(usable)
    mu = float(allv.mean())
    sd = float(allv.std())
    weights = [s.size for s in usable if s.size >= 3]
    rho = sum(lag1(s) * s.size for s in usable if s.size >= 3) / sum(weights) if weights else 0.0
    return mu, max(sd, 1e-12), rho


def fit_null(segments: Sequence[FloatArray], window_n: int, *, alpha: float = DEFAULT_FAR) -> NullModel:
    """Null distribution of ``z`` for windows of ``window_n`` samples, from held-out segments.

    Raises :class:`CalibrationError` when the segments hold fewer than :data:`MIN_WINDOWS` windows.
    """
    mu, sd, rho = series_moments(segments)
    stride = max(window_n // 4, 1)
    zs: list[float] = []
    for seg in segments:
        for w in windows(seg.size, window_n, stride):
            z, _ne, _rho = standardised(seg[w], mu, sd, rho)
            zs.append(z)
    if len(zs) < MIN_WINDOWS:
        raise CalibrationError(
            f"held-out data hold {len(zs)} window(s) of {window_n} samples, need {MIN_WINDOWS}",
            hint="enrol longer traces or calibrate for a shorter window",
            windows=len(zs),
            window_n=window_n,
        )
    arr = np.asarray(zs)
    z_sd = max(float(arr.std(ddof=1)), 1.0) * spread_margin(sum(seg.size // window_n for seg in segments))
    null = NullModel(mu, sd, rho, float(arr.mean()), z_sd, len(zs), window_n)
    thr = null.threshold(alpha)
    return NullModel(mu, sd, rho, null.z_mean, null.z_sd, len(zs), window_n, float(np.mean(arr < thr)))


def spread_margin(independent: int) -> float:
    """Factor on the measured spread: its one-sided 90 % upper confidence bound from ``independent`` windows.

    Overlapping held-out windows are not independent; the non-overlapping count is what the spread is
    really estimated from. Thin enrolment thus widens the threshold instead of raising false alarms.
    """
    dof = max(independent - 1, 1)
    return math.sqrt(dof / float(stats.chi2.ppf(MARGIN_QUANTILE, dof)))


def max_window(segments: Sequence[FloatArray]) -> int:
    """The longest window length for which the segments still hold :data:`MIN_WINDOWS` windows."""
    lo, hi = 1, max((s.size for s in segments), default=0)
    best = 0
    while lo <= hi:
        mid = (lo + hi) // 2
        count = sum(len(windows(s.size, mid, max(mid // 4, 1))) for s in segments)
        if count >= MIN_WINDOWS:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best
