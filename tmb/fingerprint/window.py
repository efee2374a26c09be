"""Feature preparation and the per-window statistics shared by enrolment, calibration and scoring.

Preparation (:func:`prepare`) is the one place where values are cleaned, so enrolment and scoring treat
them identically:

* NaN and ±inf are dropped (finding ``fingerprint.nonfinite_dropped``);
* negative values are dropped (``fingerprint.negative_dropped``; negative power is a broken reading);
* values above 1 (a power fraction overshooting the limit) are folded into the atom at 1: the limiter
  holds power at the limit, so overshoot is treated as censored at it (info ``fingerprint.folded_to_one``).

The window statistic is the *joint per-sample log-likelihood* ``L_t = Σ_f log p_f(x_{f,t})`` (features
treated as conditionally independent given the profile; their correlation shows up in the spread of ``L``,
which calibration measures). Telemetry at 20 Hz is strongly autocorrelated, so the mean of ``L`` over a
window of ``n`` samples is standardised with the effective sample size ``n_eff = n (1 - ρ) / (1 + ρ)``,
``ρ`` the lag-1 autocorrelation of ``L`` (the AR(1) variance inflation of a mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from tmb.errors import Finding, Severity, finding
from tmb.fingerprint.beta import FloatArray

#: Features modelled as fractions in [0, 1] (zero/one-inflated beta mixtures).
FRACTION_FEATURES = ("power_frac", "gpu_util", "mem_util", "sm_active", "tensor_active")

LogPdf = Callable[[FloatArray], FloatArray]


def prepare(raw: Mapping[str, object]) -> tuple[dict[str, FloatArray], list[Finding]]:
    """Clean each feature's values (see module docstring); unknown features are ignored with a finding."""
    out: dict[str, FloatArray] = {}
    found: list[Finding] = []
    for name, values in raw.items():
        if name not in FRACTION_FEATURES:
            found.append(
                finding(
                    "fingerprint.unknown_feature",
                    f"feature {name!r} is not modelled; ignored",
                    severity=Severity.INFO,
                    feature=name,
                )
            )
            continue
        try:
            arr = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            found.append(finding("fingerprint.bad_values", f"feature {name!r} is not numeric", feature=name))
            continue
        finite = np.isfinite(arr)
        if not bool(finite.all()):
            found.append(
                finding(
                    "fingerprint.nonfinite_dropped",
                    f"{int((~finite).sum())} NaN/inf value(s) of {name!r} dropped",
                    severity=Severity.WARNING,
                    feature=name,
                    dropped=int((~finite).sum()),
                    of=int(arr.size),
                )
            )
            arr = arr[finite]
        neg = arr < 0.0
        if bool(neg.any()):
            found.append(
                finding(
                    "fingerprint.negative_dropped",
                    f"{int(neg.sum())} negative value(s) of {name!r} dropped (a broken reading)",
                    severity=Severity.WARNING,
                    feature=name,
                    dropped=int(neg.sum()),
                    of=int(arr.size),
                    min=float(arr.min()),
                )
            )
            arr = arr[~neg]
        over = arr > 1.0
        if bool(over.any()):
            found.append(
                finding(
                    "fingerprint.folded_to_one",
                    f"{int(over.sum())} value(s) of {name!r} above 1 counted as at the limit",
                    severity=Severity.INFO,
                    feature=name,
                    folded=int(over.sum()),
                )
            )
            arr = np.minimum(arr, 1.0)
        out[name] = arr
    return out, found


def lag1(series: FloatArray) -> float:
    """Lag-1 autocorrelation, clipped to [0, 0.99] (0 for fewer than three values or zero variance)."""
    if series.size < 3:
        return 0.0
    d = series - series.mean()
    denom = float(np.dot(d, d))
    if denom <= 0.0:
        return 0.0
    rho = float(np.dot(d[:-1], d[1:])) / denom
    return min(max(rho, 0.0), 0.99)


def n_eff(n: int, rho: float) -> float:
    """Effective sample size of a mean of ``n`` AR(1)-correlated values."""
    return n * (1.0 - rho) / (1.0 + rho)


def joint_series(values: Mapping[str, FloatArray], logpdfs: Mapping[str, LogPdf]) -> FloatArray:
    """``L_t`` over the features present in both mappings, truncated to the shortest feature."""
    names = [f for f in logpdfs if f in values]
    if not names:
        return np.zeros(0)
    n = min(values[f].size for f in names)
    total = np.zeros(n)
    for f in names:
        total += logpdfs[f](values[f][:n])
    return total


def standardised(series: FloatArray, mu: float, sd: float, rho_floor: float) -> tuple[float, float, float]:
    """``(z, n_eff, rho)``: the window mean of ``series`` against ``mu``, in units of its standard error.

    ``rho`` is the larger of the window's own lag-1 autocorrelation and ``rho_floor`` (the enrolment
    estimate), so a short window cannot understate the correlation of the genuine process.
    """
    rho = max(lag1(series), rho_floor)
    ne = n_eff(int(series.size), rho)
    se = sd / math.sqrt(max(ne, 1e-12))
    z = (float(series.mean()) - mu) / se if se > 0.0 else 0.0
    return z, ne, rho


def windows(n: int, length: int, stride: int) -> list[slice]:
    """Slices of ``length`` starting every ``stride`` samples within ``n`` (none when ``n < length``)."""
    if length <= 0 or n < length:
        return []
    return [slice(s, s + length) for s in range(0, n - length + 1, max(stride, 1))]
