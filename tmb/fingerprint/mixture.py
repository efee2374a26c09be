"""Two-component mixtures by EM, and the choice between one and two components by BIC.

* :func:`fit_beta_mixture`: fractions in [0, 1]. The atoms at 0 and 1 are shared (zero/one inflation, see
  :mod:`tmb.fingerprint.beta`); the interior is ``w Beta(a1, b1) + (1 - w) Beta(a2, b2)``, fitted by EM whose
  M-step is the weighted Newton fit of :func:`~tmb.fingerprint.beta.fit_beta`.
* :func:`fit_gauss_mixture`: unbounded values (power in watts, energy per token): a 1-D Gaussian mixture
  with a closed-form M-step and a variance floor.

Both start deterministically from a quantile split (lower / upper part of the sorted data at the 25th, 50th
and 75th percentiles; the best final likelihood wins), run a bounded number of iterations, report
convergence, and keep the two-component model only when it lowers BIC (``-2 ll + k ln n``) below the
one-component fit, so a unimodal sample yields one component.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from tmb.fingerprint.beta import BetaFit, FitError, FloatArray, fit_beta, fit_beta_logs

MAX_EM_ITER = 200
#: EM stops when the log-likelihood gains less than this per sample.
EM_TOL = 1e-7
SPLITS = (0.5, 0.25, 0.75)
MIN_WEIGHT = 1e-3


def _logsumexp2(l1: FloatArray, l2: FloatArray) -> FloatArray:
    out: FloatArray = np.logaddexp(l1, l2)
    return out


@dataclass(frozen=True)
class BetaMixture:
    """Zero/one-inflated mixture of one or two betas on the interior.

    ``weights[i]`` is the share of component ``i`` among interior values; the atoms come from
    ``components[0]`` (all components carry the same ``p0``, ``p1`` and counts). ``bic`` is that of the
    chosen model; ``iterations`` and ``converged`` report EM (0 and True for one component).
    """

    weights: tuple[float, ...]
    components: tuple[BetaFit, ...]
    loglik: float
    bic: float
    iterations: int
    converged: bool

    @property
    def k(self) -> int:
        return len(self.components)

    def logpdf(self, x: npt.ArrayLike) -> FloatArray:
        arr = np.asarray(x, dtype=np.float64)
        base = self.components[0]
        if self.k == 1:
            return base.logpdf(arr)
        out = base.logpdf(arr)  # right at the atoms; interior replaced below
        inner = (arr > 0.0) & (arr < 1.0)
        xi = arr[inner]
        _m0, _m1, mi = base.masses()
        l1 = math.log(self.weights[0]) + self.components[0].beta_logpdf(xi)
        l2 = math.log(self.weights[1]) + self.components[1].beta_logpdf(xi)
        out[inner] = math.log(mi) + _logsumexp2(l1, l2)
        return out

    def cdf(self, x: npt.ArrayLike) -> FloatArray:
        arr = np.asarray(x, dtype=np.float64)
        base = self.components[0]
        m0, _m1, mi = base.masses()
        clipped = np.clip(arr, 0.0, 1.0)
        inner = sum(
            w * special.betainc(c.a, c.b, clipped) for w, c in zip(self.weights, self.components, strict=True)
        )
        out: FloatArray = np.where(arr < 0.0, 0.0, np.where(arr >= 1.0, 1.0, m0 + mi * inner))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "zoib_mixture",
            "weights": list(self.weights),
            "components": [c.to_dict() for c in self.components],
            "loglik": self.loglik,
            "bic": self.bic,
            "iterations": self.iterations,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BetaMixture:
        comps = tuple(BetaFit.from_dict(c) for c in data["components"])
        weights = tuple(float(w) for w in data["weights"])
        if not comps or len(comps) != len(weights) or len(comps) > 2:
            raise ValueError("components and weights must have the same length, 1 or 2")
        if any(not (0.0 < w <= 1.0) for w in weights) or abs(sum(weights) - 1.0) > 1e-9:
            raise ValueError("weights must be positive and sum to 1")
        for c in comps:
            if not (c.a > 0.0 and c.b > 0.0 and math.isfinite(c.a) and math.isfinite(c.b)):
                raise ValueError("beta parameters must be positive and finite")
            if not (0.0 <= c.n0 <= c.n and 0.0 <= c.n1 <= c.n - c.n0):
                raise ValueError("counts n, n0, n1 are inconsistent")
        return cls(
            weights,
            comps,
            float(data["loglik"]),
            float(data["bic"]),
            int(data["iterations"]),
            bool(data["converged"]),
        )


def _bic(loglik: float, params: int, n: float) -> float:
    return -2.0 * loglik + params * math.log(max(n, 1.0))


def fit_beta_mixture(x: npt.ArrayLike, *, max_components: int = 2) -> BetaMixture:
    """Fit one and (if ``max_components`` is 2) two beta components; keep the one with the lower BIC."""
    arr = np.asarray(x, dtype=np.float64).ravel()
    single = fit_beta(arr)
    n = single.n
    best = BetaMixture((1.0,), (single,), single.loglik, _bic(single.loglik, 2, n), 0, True)
    if max_components < 2:
        return best
    xi = np.sort(arr[(arr > 0.0) & (arr < 1.0)])
    if xi.size < 20:
        return best
    atoms = single.loglik - _interior_ll_single(single, xi)
    logs = (np.log(xi), np.log1p(-xi))
    for q in SPLITS:
        cand = _em_beta(xi, logs, q, single, atoms)
        if cand is not None and cand.bic < best.bic:
            best = cand
    return best


def _interior_ll_single(fit: BetaFit, xi: FloatArray) -> float:
    return float(fit.beta_logpdf(xi).sum())


def _em_beta(
    xi: FloatArray, logs: tuple[FloatArray, FloatArray], q: float, single: BetaFit, atoms: float
) -> BetaMixture | None:
    split = int(q * xi.size)
    resp = np.zeros(xi.size)
    resp[:split] = 1.0  # deterministic start: lower part -> component 0
    prev = -math.inf
    ll = -math.inf
    comps: tuple[BetaFit, BetaFit] | None = None
    w0 = q
    converged = False
    it = 0
    for it in range(1, MAX_EM_ITER + 1):  # noqa: B007 - reported after the loop
        try:
            ni = float(xi.size)
            c0 = fit_beta_logs(xi, logs[0], logs[1], resp, ni, 0.0, 0.0)
            c1 = fit_beta_logs(xi, logs[0], logs[1], 1.0 - resp, ni, 0.0, 0.0)
        except FitError:
            return None
        w0 = float(resp.mean())
        if not (MIN_WEIGHT < w0 < 1.0 - MIN_WEIGHT):
            return None
        comps = (c0, c1)
        l0 = math.log(w0) + _beta_ll(c0, logs)
        l1 = math.log(1.0 - w0) + _beta_ll(c1, logs)
        tot = _logsumexp2(l0, l1)
        ll = float(tot.sum())
        resp = np.exp(l0 - tot)
        if ll - prev < EM_TOL * xi.size:
            converged = True
            break
        prev = ll
    if comps is None or not math.isfinite(ll):
        return None
    total = atoms + ll
    shared = [_with_atoms(c, single) for c in comps]
    return BetaMixture((w0, 1.0 - w0), (shared[0], shared[1]), total, _bic(total, 5, single.n), it, converged)


def _beta_ll(c: BetaFit, logs: tuple[FloatArray, FloatArray]) -> FloatArray:
    out: FloatArray = (c.a - 1.0) * logs[0] + (c.b - 1.0) * logs[1] - special.betaln(c.a, c.b)
    return out


def _with_atoms(c: BetaFit, single: BetaFit) -> BetaFit:
    return BetaFit(
        c.a, c.b, single.p0, single.p1, single.n, single.n0, single.n1, c.loglik, c.iterations, c.grad_norm,
        c.converged,
    )  # fmt: skip


@dataclass(frozen=True)
class GaussMixture:
    """One or two Gaussian components for unbounded values; same report fields as :class:`BetaMixture`."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    sds: tuple[float, ...]
    n: float
    loglik: float
    bic: float
    iterations: int
    converged: bool

    @property
    def k(self) -> int:
        return len(self.means)

    def logpdf(self, x: npt.ArrayLike) -> FloatArray:
        arr = np.asarray(x, dtype=np.float64)
        parts = [
            math.log(w) - math.log(s) - 0.5 * math.log(2 * math.pi) - 0.5 * ((arr - m) / s) ** 2
            for w, m, s in zip(self.weights, self.means, self.sds, strict=True)
        ]
        out: FloatArray = parts[0] if len(parts) == 1 else _logsumexp2(parts[0], parts[1])
        return out

    def cdf(self, x: npt.ArrayLike) -> FloatArray:
        arr = np.asarray(x, dtype=np.float64)
        out: FloatArray = sum(
            (
                w * special.ndtr((arr - m) / s)
                for w, m, s in zip(self.weights, self.means, self.sds, strict=True)
            ),
            np.zeros_like(arr),
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "gauss_mixture",
            "weights": list(self.weights),
            "means": list(self.means),
            "sds": list(self.sds),
            "n": self.n,
            "loglik": self.loglik,
            "bic": self.bic,
            "iterations": self.iterations,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GaussMixture:
        weights = tuple(float(v) for v in data["weights"])
        means = tuple(float(v) for v in data["means"])
        sds = tuple(float(v) for v in data["sds"])
        if not (1 <= len(weights) <= 2 and len(weights) == len(means) == len(sds)):
            raise ValueError("weights, means and sds must have the same length, 1 or 2")
        if any(not (s > 0.0 and math.isfinite(s)) for s in sds) or any(not math.isfinite(m) for m in means):
            raise ValueError("means must be finite and sds positive")
        if any(not (0.0 < w <= 1.0) for w in weights) or abs(sum(weights) - 1.0) > 1e-9:
            raise ValueError("weights must be positive and sum to 1")
        return cls(
            weights, means, sds, float(data["n"]), float(data["loglik"]), float(data["bic"]),
            int(data["iterations"]), bool(data["converged"]),
        )  # fmt: skip


def fit_gauss_mixture(x: npt.ArrayLike, *, max_components: int = 2, sd_floor: float = 1e-6) -> GaussMixture:
    """Fit one and two Gaussians (EM, quantile-split start); keep the one with the lower BIC."""
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size < 2 or not np.all(np.isfinite(arr)):
        raise FitError("need at least two finite values", n=int(arr.size))
    n = float(arr.size)
    sd = max(float(arr.std()), sd_floor * max(1.0, abs(float(arr.mean()))))
    single = GaussMixture((1.0,), (float(arr.mean()),), (sd,), n, 0.0, 0.0, 0, True)
    ll1 = float(single.logpdf(arr).sum())
    best = GaussMixture((1.0,), single.means, single.sds, n, ll1, _bic(ll1, 2, n), 0, True)
    if max_components < 2 or arr.size < 20:
        return best
    xs = np.sort(arr)
    floor = sd_floor * max(1.0, float(np.abs(xs).max()))
    for q in SPLITS:
        cand = _em_gauss(xs, q, floor)
        if cand is not None and cand.bic < best.bic:
            best = cand
    return best


def _em_gauss(xs: FloatArray, q: float, floor: float) -> GaussMixture | None:
    resp = np.zeros(xs.size)
    resp[: int(q * xs.size)] = 1.0
    prev = -math.inf
    n = float(xs.size)
    cur: GaussMixture | None = None
    for it in range(1, MAX_EM_ITER + 1):
        r = (resp, 1.0 - resp)
        sums = [float(ri.sum()) for ri in r]
        if min(sums) < MIN_WEIGHT * n:
            return None
        means = tuple(float(np.dot(ri, xs)) / si for ri, si in zip(r, sums, strict=True))
        sds = tuple(
            max(math.sqrt(float(np.dot(ri, (xs - m) ** 2)) / si), floor)
            for ri, si, m in zip(r, sums, means, strict=True)
        )
        weights = (sums[0] / n, sums[1] / n)
        parts = [
            math.log(w) - math.log(s) - 0.5 * math.log(2 * math.pi) - 0.5 * ((xs - m) / s) ** 2
            for w, m, s in zip(weights, means, sds, strict=True)
        ]
        tot = _logsumexp2(parts[0], parts[1])
        ll = float(tot.sum())
        resp = np.exp(parts[0] - tot)
        done = ll - prev < EM_TOL * n
        cur = GaussMixture(weights, means, sds, n, ll, _bic(ll, 5, n), it, done)
        if done:
            break
        prev = ll
    return cur
