"""Dependence between features: a Gaussian mixture on the normal scores of the fitted marginals.

Marginal fits alone are confounded by load: a larger model at low concurrency draws the same power as a
smaller one at high concurrency. What differs is the *relation* between the features (memory utilisation
for a given SM activity, power for a given tensor activity). tmb keeps every marginal as fitted (the
zero/one-inflated beta mixtures) and models the normal scores ``z_f = Φ⁻¹(F_f(x_f))`` jointly with a
Gaussian mixture ``g``. The joint log-density of a sample is

    Σ_f log p_f(x_f) + log g(z) - Σ_f log φ(z_f)

(the change of variables from ``x`` to ``z``), a proper density for any density ``g``; with one component
and unit variances ``g`` is the classical Gaussian copula. The number of components (1, 2, 4 or 6) is
chosen by BIC; EM starts deterministically from a split of the samples along the first principal axis.
Marginalising a Gaussian mixture to a subset of features keeps the sub-vectors and sub-matrices, so
profiles with different feature sets (an A100 has no GPM activity) compare on their common features.

Atoms (exact 0 or 1) map to the middle of their probability jump; scores are clipped to ±:data:`Z_CLIP`
so a value far in a tail is judged by its marginal. Covariances get :data:`RIDGE` on the diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from tmb.fingerprint.beta import FloatArray

Z_CLIP = 5.0
RIDGE = 1e-3
COMPONENTS = (1, 2, 4, 6)
MAX_ITER = 150
TOL = 1e-6
MAX_FIT_SAMPLES = 20_000

Cdf = Callable[[FloatArray], FloatArray]
Matrix = npt.NDArray[np.float64]


def normal_scores(x: FloatArray, cdf: Cdf, m0: float, m1: float) -> FloatArray:
    """``Φ⁻¹`` of the mid-distribution function at each value (atoms at the middle of their jump)."""
    u = cdf(x)
    u = np.where(x <= 0.0, 0.5 * m0, np.where(x >= 1.0, 1.0 - 0.5 * m1, u))
    z: FloatArray = np.clip(special.ndtri(np.clip(u, 1e-300, 1.0)), -Z_CLIP, Z_CLIP)
    return z


def _gauss_logpdf(z: Matrix, mean: Matrix, cov: Matrix) -> FloatArray:
    return _gauss_logpdf_prepared(z, *_prepare(mean, cov))


def _prepare(mean: Matrix, cov: Matrix) -> tuple[Matrix, Matrix, float]:
    """What a Gaussian log-density needs of its parameters: mean, inverse, log-determinant."""
    chol = np.linalg.cholesky(cov)  # raises LinAlgError unless positive definite
    inv: Matrix = np.asarray(np.linalg.inv(cov), dtype=np.float64)
    return mean, inv, 2.0 * float(np.log(np.diag(chol)).sum())


def _gauss_logpdf_prepared(z: Matrix, mean: Matrix, inv: Matrix, logdet: float) -> FloatArray:
    diff = z - mean
    quad = ((diff @ inv) * diff).sum(axis=1)
    out: FloatArray = -0.5 * (z.shape[1] * math.log(2 * math.pi) + logdet + quad)
    return out


@dataclass(frozen=True)
class Copula:
    """Gaussian mixture over the normal scores of ``names`` (in that order)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    covs: tuple[tuple[tuple[float, ...], ...], ...]

    def logdensity(self, scores: Mapping[str, FloatArray]) -> FloatArray:
        """Per-sample ``log g(z) - Σ log φ(z_f)`` over the features in both ``scores`` and :attr:`names`."""
        keep = [n for n in self.names if n in scores]
        n = min((s.size for s in scores.values()), default=0)
        if len(keep) < 2:
            return np.zeros(n)
        z = np.stack([scores[k][:n] for k in keep], axis=1)
        parts = [
            math.log(w) + _gauss_logpdf_prepared(z, *prepared)
            for w, prepared in zip(self.weights, self._prepared(tuple(keep)), strict=True)
        ]
        logg = parts[0] if len(parts) == 1 else np.logaddexp.reduce(np.stack(parts), axis=0)
        base = -0.5 * (len(keep) * math.log(2 * math.pi) + (z * z).sum(axis=1))
        out: FloatArray = logg - base
        return out

    def _prepared(self, keep: tuple[str, ...]) -> list[tuple[Matrix, Matrix, float]]:
        """Per component, the marginal over ``keep``: mean, inverse covariance, log-determinant. Computed
        once per feature subset (the parameters never change; every window used to invert them again)."""
        cache: dict[tuple[str, ...], list[tuple[Matrix, Matrix, float]]] = self.__dict__.setdefault(
            "_prepared_cache", {}
        )
        out = cache.get(keep)
        if out is None:
            idx = [self.names.index(k) for k in keep]
            out = cache[keep] = [
                _prepare(np.asarray(m)[idx], np.asarray(c)[np.ix_(idx, idx)])
                for m, c in zip(self.means, self.covs, strict=True)
            ]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "gauss_mixture_on_normal_scores",
            "names": list(self.names),
            "weights": list(self.weights),
            "means": [list(m) for m in self.means],
            "covs": [[list(r) for r in c] for c in self.covs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Copula:
        names = tuple(str(n) for n in data["names"])
        weights = tuple(float(w) for w in data["weights"])
        means = tuple(tuple(float(v) for v in m) for m in data["means"])
        covs = tuple(tuple(tuple(float(v) for v in r) for r in c) for c in data["covs"])
        d = len(names)
        if not weights or len(means) != len(weights) or len(covs) != len(weights):
            raise ValueError("weights, means and covs must have one entry per component")
        if any(not (0.0 < w <= 1.0) for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError("weights must be positive and sum to 1")
        for m, c in zip(means, covs, strict=True):
            mat = np.asarray(c, dtype=np.float64)
            if (
                len(m) != d
                or mat.shape != (d, d)
                or not np.all(np.isfinite(mat))
                or not np.allclose(mat, mat.T)
            ):
                raise ValueError("each mean needs one value per name and each cov a symmetric d x d matrix")
            if np.linalg.eigvalsh(mat).min() <= 0.0:
                raise ValueError("covariances must be positive definite")
        return cls(names, weights, means, covs)


def fit_copula(score_segments: Sequence[Mapping[str, FloatArray]]) -> Copula | None:
    """Fit the mixture to aligned normal-score segments; None with fewer than two common features."""
    names: list[str] = sorted(set.intersection(*(set(s) for s in score_segments))) if score_segments else []
    if len(names) < 2:
        return None
    rows = [
        np.stack([seg[k][: min(seg[j].size for j in names)] for k in names], axis=1) for seg in score_segments
    ]
    z = np.concatenate(rows)
    if z.shape[0] > MAX_FIT_SAMPLES:  # deterministic thinning
        z = z[:: math.ceil(z.shape[0] / MAX_FIT_SAMPLES)]
    d = len(names)
    if z.shape[0] < 20 * d:
        return None
    best: tuple[float, Copula] | None = None
    for k in COMPONENTS:
        if z.shape[0] < 50 * k * d:
            break
        fitted = _em(z, k)
        if fitted is None:
            continue
        ll, cop = fitted
        params = (k - 1) + k * (d + d * (d + 1) / 2)
        bic = -2.0 * ll + params * math.log(z.shape[0])
        if best is None or bic < best[0]:
            best = (bic, Copula(tuple(names), *_freeze(cop)))
    return None if best is None else best[1]


def _freeze(
    cop: tuple[FloatArray, Matrix, npt.NDArray[np.float64]],
) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[tuple[tuple[float, ...], ...], ...]]:
    w, m, c = cop
    return (
        tuple(float(v) for v in w),
        tuple(tuple(float(v) for v in row) for row in m),
        tuple(tuple(tuple(float(v) for v in r) for r in ci) for ci in c),
    )


def _em(z: Matrix, k: int) -> tuple[float, tuple[FloatArray, Matrix, npt.NDArray[np.float64]]] | None:
    n, d = z.shape
    centred = z - z.mean(axis=0)
    _u, _s, vt = np.linalg.svd(centred, full_matrices=False)
    order = np.argsort(centred @ vt[0], kind="stable")
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.arange(n) * k // n  # k equal slices along the first principal axis
    resp = np.eye(k)[labels]
    prev = -math.inf
    ll = -math.inf
    w = np.full(k, 1.0 / k)
    means = np.zeros((k, d))
    covs = np.tile(np.eye(d), (k, 1, 1))
    for _ in range(MAX_ITER):
        nk = resp.sum(axis=0)
        if float(nk.min()) < 5 * d:
            return None
        w = nk / n
        means = (resp.T @ z) / nk[:, None]
        for j in range(k):
            diff = z - means[j]
            covs[j] = (resp[:, j, None] * diff).T @ diff / nk[j] + RIDGE * np.eye(d)
        try:
            logp = np.stack([math.log(w[j]) + _gauss_logpdf(z, means[j], covs[j]) for j in range(k)], axis=1)
        except np.linalg.LinAlgError:
            return None
        tot = np.logaddexp.reduce(logp, axis=1)
        ll = float(tot.sum())
        resp = np.exp(logp - tot[:, None])
        if ll - prev < TOL * n:
            break
        prev = ll
    return ll, (w, means, covs)
