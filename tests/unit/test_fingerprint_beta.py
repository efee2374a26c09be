"""Zero/one-inflated beta MLE: recovery, agreement with scipy, atoms, weights, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from tmb.errors import InputError
from tmb.fingerprint.beta import FitError, beta_loglik, fit_beta

GRID = [
    (0.3, 0.4),  # U-shaped
    (0.5, 0.5),  # arcsine, U-shaped
    (0.5, 3.0),  # J-shaped towards 0
    (3.0, 0.6),  # J-shaped towards 1
    (1.0, 1.0),  # uniform
    (2.0, 5.0),
    (10.0, 2.0),
    (40.0, 60.0),  # concentrated
]


def _interior(rng: np.random.Generator, a: float, b: float, n: int) -> np.ndarray:
    x = rng.beta(a, b, size=n)
    return x[(x > 0.0) & (x < 1.0)]


@pytest.mark.parametrize(("a", "b"), GRID)
def test_recovers_known_parameters(a: float, b: float) -> None:
    rng = np.random.default_rng(7)
    fit = fit_beta(_interior(rng, a, b, 40_000))
    assert fit.converged and fit.grad_norm < 1e-8
    assert fit.iterations <= 20
    assert fit.a == pytest.approx(a, rel=0.05)
    assert fit.b == pytest.approx(b, rel=0.05)
    assert fit.p0 == 0.0 and fit.p1 == 0.0


@pytest.mark.parametrize(("a", "b"), GRID)
def test_loglik_at_least_scipy_to_1e9(a: float, b: float) -> None:
    x = _interior(np.random.default_rng(11), a, b, 5_000)
    fit = fit_beta(x)
    sa, sb, _loc, _scale = stats.beta.fit(x, floc=0, fscale=1)
    ours = float(stats.beta.logpdf(x, fit.a, fit.b).sum())
    theirs = float(stats.beta.logpdf(x, sa, sb).sum())
    assert ours >= theirs - 1e-9
    assert ours - theirs < 1e-6 * abs(theirs) + 1e-6  # same optimum, not a different one
    # The reported log-likelihood is the same quantity, computed from the sufficient statistics.
    assert fit.loglik == pytest.approx(ours, rel=1e-12, abs=1e-7)


def test_newton_reaches_stationary_point_from_sufficient_statistics() -> None:
    x = _interior(np.random.default_rng(3), 0.7, 1.8, 2_000)
    fit = fit_beta(x)
    n, s1, s2 = x.size, float(np.log(x).sum()), float(np.log1p(-x).sum())
    best = beta_loglik(fit.a, fit.b, n, s1, s2)
    for da, db in [(1e-4, 0), (-1e-4, 0), (0, 1e-4), (0, -1e-4), (1e-4, 1e-4)]:
        assert beta_loglik(fit.a + da, fit.b + db, n, s1, s2) < best


def test_exact_zeros_and_ones_are_inflation_masses() -> None:
    rng = np.random.default_rng(5)
    inner = _interior(rng, 2.0, 3.0, 7_000)
    x = np.concatenate([np.zeros(2_000), np.ones(1_000), inner])
    rng.shuffle(x)
    fit = fit_beta(x)
    plain = fit_beta(inner)
    assert fit.p0 == pytest.approx(2_000 / x.size) and fit.p1 == pytest.approx(1_000 / x.size)
    assert (fit.a, fit.b) == pytest.approx((plain.a, plain.b), rel=1e-12)  # atoms do not bend the beta
    n, n0, n1 = x.size, 2_000, 1_000
    ni = n - n0 - n1
    expected = n0 * math.log(n0 / n) + n1 * math.log(n1 / n) + ni * math.log(ni / n) + plain.loglik
    assert fit.loglik == pytest.approx(expected, rel=1e-12)
    m0, m1, mi = fit.masses()
    assert m0 + m1 + mi == pytest.approx(1.0)
    assert fit.logpdf([0.0])[0] == pytest.approx(math.log((n0 + 0.5) / (n + 1.5)))
    assert fit.logpdf([1.0])[0] == pytest.approx(math.log((n1 + 0.5) / (n + 1.5)))
    assert fit.cdf([0.0])[0] == pytest.approx(m0) and fit.cdf([1.0])[0] == 1.0
    # The interior density integrates to the interior mass.
    grid = np.linspace(1e-6, 1 - 1e-6, 200_001)
    assert np.trapezoid(np.exp(fit.logpdf(grid)), grid) == pytest.approx(mi, rel=1e-4)


def test_unseen_atom_keeps_finite_likelihood() -> None:
    fit = fit_beta(_interior(np.random.default_rng(1), 2.0, 2.0, 1_000))
    assert fit.p0 == 0.0
    assert np.isfinite(fit.logpdf([0.0, 1.0])).all()


def test_only_atoms() -> None:
    fit = fit_beta([0.0] * 30 + [1.0] * 10)
    assert fit.p0 == pytest.approx(0.75) and fit.p1 == pytest.approx(0.25) and fit.n_interior == 0
    assert fit.loglik == pytest.approx(30 * math.log(0.75) + 10 * math.log(0.25))


def test_weights_equal_repetition_and_scale_free() -> None:
    rng = np.random.default_rng(9)
    x = _interior(rng, 1.5, 4.0, 500)
    counts = rng.integers(0, 5, size=x.size)
    weighted = fit_beta(x, counts.astype(float))
    repeated = fit_beta(np.repeat(x, counts))
    assert (weighted.a, weighted.b) == pytest.approx((repeated.a, repeated.b), rel=1e-10)
    assert weighted.loglik == pytest.approx(repeated.loglik, rel=1e-10)
    scaled = fit_beta(x, counts * 0.125)
    assert (scaled.a, scaled.b) == pytest.approx((weighted.a, weighted.b), rel=1e-10)


@pytest.mark.parametrize(
    ("values", "weights"),
    [
        ([], None),
        ([0.2, float("nan"), 0.4], None),
        ([0.2, float("inf")], None),
        ([0.2, -0.1, 0.5], None),
        ([0.2, 1.5], None),
        ([0.3] * 50, None),  # a single repeated value identifies no beta
        ([0.2, 0.4], [1.0]),
        ([0.2, 0.4], [1.0, -1.0]),
        ([0.2, 0.4], [0.0, 0.0]),
    ],
)
def test_bad_input_raises_fit_error(values: list[float], weights: list[float] | None) -> None:
    with pytest.raises(FitError) as info:
        fit_beta(values, weights)
    assert isinstance(info.value, InputError) and info.value.message


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(0.2, 30.0),
    b=st.floats(0.2, 30.0),
    n=st.integers(50, 2_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_fit_is_a_maximum(a: float, b: float, n: int, seed: int) -> None:
    x = _interior(np.random.default_rng(seed), a, b, n)
    if np.ptp(x) <= 0:
        return
    fit = fit_beta(x)
    assert fit.converged
    s1, s2 = float(np.log(x).sum()), float(np.log1p(-x).sum())
    assert fit.loglik >= beta_loglik(a, b, x.size, s1, s2) - 1e-8 * max(1.0, abs(fit.loglik))
