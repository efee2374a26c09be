"""Zero/one-inflated beta distribution: maximum likelihood by Newton's method on sufficient statistics.

Utilisation counters are integer percents, so exact 0 and 1 are common (an idle GPU reports 0 % for
minutes). A plain beta density gives them likelihood 0 or infinity, and clipping to ``[eps, 1-eps]`` makes
the likelihood depend on ``eps``. tmb therefore models a fraction ``x`` as a **zero/one-inflated beta**:

* ``P(x = 0) = p0``, ``P(x = 1) = p1`` (point masses), and
* with probability ``1 - p0 - p1``, ``x ~ Beta(a, b)`` on the open interval (0, 1).

The fit estimates ``p0`` and ``p1`` as the (weighted) fractions of exact zeros and ones and fits the beta
on the interior values only; ``loglik`` is the maximised likelihood of all values with respect to Lebesgue
measure on (0, 1) plus counting measure on {0, 1}. For *scoring* (:meth:`BetaFit.logpdf`) the masses are
the add-one-half (Krichevsky-Trofimov) estimates ``(n0 + 1/2) / (n + 3/2)`` and so on, so an atom never seen
at enrolment keeps a small, finite probability instead of minus infinity. Enrolment, calibration and
scoring all go through the same :meth:`BetaFit.logpdf`, so the handling is identical everywhere.

The interior fit is Newton's method on ``(a, b)`` using only ``n``, ``Σ ln x`` and ``Σ ln(1 - x)``: the
beta family is an exponential family in ``(a - 1, b - 1)``, so the log-likelihood is strictly concave and
Newton with step halving (which also keeps both parameters positive) converges from the method-of-moments
start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from tmb.errors import InputError

FloatArray = npt.NDArray[np.float64]

#: Newton stops when the per-sample gradient norm falls below this.
GRAD_TOL = 1e-12
#: Bound on Newton iterations (quadratic convergence needs far fewer).
MAX_ITER = 100


class FitError(InputError):
    """The data do not identify the distribution (too few or identical interior values)."""


@dataclass(frozen=True)
class BetaFit:
    """A fitted zero/one-inflated beta, with its convergence report.

    ``n``, ``n0`` and ``n1`` are (weighted) counts of all values, exact zeros and exact ones;
    ``loglik`` is the maximised log-likelihood (MLE masses); ``iterations``, ``grad_norm`` (per-sample
    gradient of the interior log-likelihood at the optimum) and ``converged`` report Newton's method.
    """

    a: float
    b: float
    p0: float
    p1: float
    n: float
    n0: float
    n1: float
    loglik: float
    iterations: int
    grad_norm: float
    converged: bool

    @property
    def n_interior(self) -> float:
        return self.n - self.n0 - self.n1

    def masses(self) -> tuple[float, float, float]:
        """Smoothed (add-one-half) masses of 0, 1 and the interior, used for scoring; they sum to 1."""
        denom = self.n + 1.5
        return (self.n0 + 0.5) / denom, (self.n1 + 0.5) / denom, (self.n_interior + 0.5) / denom

    def beta_logpdf(self, x: FloatArray) -> FloatArray:
        """Log-density of the beta part at interior points (no mass factor)."""
        a, b = self.a, self.b
        with np.errstate(divide="ignore"):
            out: FloatArray = (a - 1.0) * np.log(x) + (b - 1.0) * np.log1p(-x) - special.betaln(a, b)
        return out

    def logpdf(self, x: npt.ArrayLike) -> FloatArray:
        """Log-likelihood of each value (atoms at 0 and 1, smoothed masses); values must lie in [0, 1]."""
        arr = np.asarray(x, dtype=np.float64)
        m0, m1, mi = self.masses()
        out = np.empty_like(arr)
        zero = arr <= 0.0
        one = arr >= 1.0
        inner = ~(zero | one)
        out[zero] = math.log(m0)
        out[one] = math.log(m1)
        out[inner] = math.log(mi) + self.beta_logpdf(arr[inner])
        return out

    def cdf(self, x: npt.ArrayLike) -> FloatArray:
        """Distribution function with the smoothed masses (right-continuous at the atoms)."""
        arr = np.asarray(x, dtype=np.float64)
        m0, _m1, mi = self.masses()
        inner = special.betainc(self.a, self.b, np.clip(arr, 0.0, 1.0))
        out: FloatArray = np.where(arr < 0.0, 0.0, np.where(arr >= 1.0, 1.0, m0 + mi * inner))
        return out

    def mean(self) -> float:
        _m0, m1, mi = self.masses()
        return m1 + mi * self.a / (self.a + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "p0": self.p0,
            "p1": self.p1,
            "n": self.n,
            "n0": self.n0,
            "n1": self.n1,
            "loglik": self.loglik,
            "iterations": self.iterations,
            "grad_norm": self.grad_norm,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BetaFit:
        return cls(
            a=float(data["a"]),
            b=float(data["b"]),
            p0=float(data["p0"]),
            p1=float(data["p1"]),
            n=float(data["n"]),
            n0=float(data["n0"]),
            n1=float(data["n1"]),
            loglik=float(data["loglik"]),
            iterations=int(data["iterations"]),
            grad_norm=float(data["grad_norm"]),
            converged=bool(data["converged"]),
        )


def beta_loglik(a: float, b: float, n: float, s1: float, s2: float) -> float:
    """Interior beta log-likelihood from the sufficient statistics (``s1 = Σ ln x``, ``s2 = Σ ln(1-x)``)."""
    return float(-n * special.betaln(a, b) + (a - 1.0) * s1 + (b - 1.0) * s2)


def _moments_start(mean: float, var: float) -> tuple[float, float]:
    if not (0.0 < mean < 1.0) or var <= 0.0:
        return 1.0, 1.0
    common = mean * (1.0 - mean) / var - 1.0
    if common <= 0.0:
        # Variance at or beyond the Bernoulli limit: a strongly U-shaped start.
        return 0.5 * mean + 1e-3, 0.5 * (1.0 - mean) + 1e-3
    return mean * common, (1.0 - mean) * common


def _ll_per_sample(a: float, b: float, m1: float, m2: float) -> float:
    return math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + (a - 1.0) * m1 + (b - 1.0) * m2


def newton_beta(
    n: float, s1: float, s2: float, start: tuple[float, float]
) -> tuple[float, float, int, float, bool]:
    """Maximise the beta log-likelihood given sufficient statistics; returns (a, b, iters, |grad|, ok).

    Works on per-sample statistics so the tolerance does not depend on ``n``. Each Newton step is halved
    until both parameters stay positive and the log-likelihood does not decrease (the positivity guard).
    """
    m1, m2 = s1 / n, s2 / n
    a, b = start
    cur = _ll_per_sample(a, b, m1, m2)
    gnorm = math.inf
    point = np.empty(3)
    for it in range(MAX_ITER + 1):
        point[0], point[1], point[2] = a, b, a + b
        psa, psb, psab = special.digamma(point).tolist()
        g1 = psab - psa + m1
        g2 = psab - psb + m2
        gnorm = math.hypot(g1, g2)
        if gnorm < GRAD_TOL or it == MAX_ITER:
            break
        tra, trb, tab = special.zeta(2.0, point).tolist()  # trigamma
        h11 = tab - tra
        h22 = tab - trb
        det = h11 * h22 - tab * tab
        # Newton direction d = -H^{-1} g (H is negative definite, so this is an ascent direction).
        da = -(h22 * g1 - tab * g2) / det
        db = -(h11 * g2 - tab * g1) / det
        # Near the optimum the predicted gain is below lgamma's rounding noise: only guard positivity.
        tiny = 0.5 * (g1 * da + g2 * db) < 1e-13 * (1.0 + abs(cur))
        step = 1.0
        for _ in range(60):
            na, nb = a + step * da, b + step * db
            if na > 0.0 and nb > 0.0:
                new = _ll_per_sample(na, nb, m1, m2)
                if tiny or new >= cur:
                    break
            step *= 0.5
        else:
            return a, b, it, gnorm, False
        a, b, cur = na, nb, new
        if abs(step * da) <= 1e-15 * a and abs(step * db) <= 1e-15 * b:
            # The step no longer moves the parameters: at the optimum to machine precision.
            point[0], point[1], point[2] = a, b, a + b
            psa, psb, psab = special.digamma(point).tolist()
            gnorm = math.hypot(psab - psa + m1, psab - psb + m2)
            return a, b, it + 1, gnorm, gnorm < 1e-8
    return a, b, it, gnorm, gnorm < GRAD_TOL or gnorm < 1e-8


def fit_beta(x: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> BetaFit:
    """Fit a zero/one-inflated beta to values in [0, 1], optionally weighted (the EM M-step).

    Raises :class:`FitError` for non-finite or out-of-range values, negative weights, or interior values
    that cannot identify a beta (fewer than two distinct ones). With no interior value at all the beta part
    is a placeholder ``Beta(1, 1)`` with zero interior mass.
    """
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise FitError("no values to fit")
    if weights is None:
        # Fast path: the two log passes double as the range check (0, 1 give -inf; outside or NaN, NaN).
        with np.errstate(divide="ignore", invalid="ignore"):
            s1 = float(np.log(arr).sum())
            s2 = float(np.log(1.0 - arr).sum())
        if math.isfinite(s1) and math.isfinite(s2):
            return _fit_interior(arr, None, float(arr.size), 0.0, 0.0, (s1, s2))
    lo, hi = float(arr.min()), float(arr.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
        raise FitError(
            "values must be finite and within [0, 1]",
            bad=int(np.sum(~((arr >= 0.0) & (arr <= 1.0)))),
        )
    if weights is None:
        w = np.ones_like(arr)
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != arr.shape:
            raise FitError("weights and values differ in length", values=arr.size, weights=w.size)
        if not (float(w.min()) >= 0.0 and math.isfinite(float(w.max()))):
            raise FitError("weights must be finite and non-negative")
    n = float(w.sum())
    if n <= 0.0:
        raise FitError("total weight is zero")
    zero, one = arr == 0.0, arr == 1.0
    n0, n1 = float(w[zero].sum()), float(w[one].sum())
    inner = ~(zero | one) & (w > 0.0)
    xi, wi = arr[inner], w[inner]
    if xi.size == 0:
        atoms = sum(c * math.log(c / n) for c in (n0, n1) if c > 0.0)
        return BetaFit(1.0, 1.0, n0 / n, n1 / n, n, n0, n1, atoms, 0, 0.0, True)
    return _fit_interior(xi, wi, n, n0, n1, None)


def fit_beta_logs(
    x: FloatArray, logx: FloatArray, log1mx: FloatArray, weights: FloatArray, n: float, n0: float, n1: float
) -> BetaFit:
    """Weighted interior fit from precomputed ``ln x`` and ``ln(1 - x)`` (the EM M-step's fast path).

    ``x`` must be interior values; ``n``, ``n0``, ``n1`` are the totals the atoms are reported against.
    """
    ni = float(weights.sum())
    if ni <= 0.0:
        raise FitError("total weight is zero")
    s1 = float(np.dot(weights, logx))
    s2 = float(np.dot(weights, log1mx))
    mean = float(np.dot(weights, x)) / ni
    var = float(np.dot(weights, x * x)) / ni - mean * mean
    if not var > 1e-12 * mean * (1.0 - mean):
        raise FitError("interior values do not identify a beta (they are all the same value)")
    a, b, iters, gnorm, ok = newton_beta(ni, s1, s2, _moments_start(mean, var))
    loglik = beta_loglik(a, b, ni, s1, s2)
    return BetaFit(a, b, n0 / n, n1 / n, n, n0, n1, loglik, iters, gnorm, ok)


def _fit_interior(
    xi: FloatArray, wi: FloatArray | None, n: float, n0: float, n1: float, sums: tuple[float, float] | None
) -> BetaFit:
    if wi is None:
        ni = float(xi.size)
        if sums is None:
            s1, s2 = float(np.log(xi).sum()), float(np.log(1.0 - xi).sum())
        else:
            s1, s2 = sums
        mean = float(xi.sum()) / ni
        var = max(float(np.dot(xi, xi)) / ni - mean * mean, 0.0)
    else:
        ni = float(wi.sum())
        s1 = float(np.dot(wi, np.log(xi)))
        s2 = float(np.dot(wi, np.log(1.0 - xi)))
        mean = float(np.dot(wi, xi)) / ni
        var = float(np.dot(wi, (xi - mean) ** 2)) / ni
    if not var > 1e-12 * mean * (1.0 - mean):
        raise FitError(
            "interior values do not identify a beta (they are all the same value)", value=float(xi[0])
        )
    a, b, iters, gnorm, ok = newton_beta(ni, s1, s2, _moments_start(mean, var))
    atoms = sum(c * math.log(c / n) for c in (n0, n1, ni) if c > 0.0)
    loglik = atoms + beta_loglik(a, b, ni, s1, s2)
    return BetaFit(a, b, n0 / n, n1 / n, n, n0, n1, loglik, iters, gnorm, ok)
