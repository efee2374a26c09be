"""Beta and Gaussian mixtures by EM; BIC chooses one component for unimodal data."""

from __future__ import annotations

import numpy as np
import pytest

from tmb.fingerprint.beta import FitError
from tmb.fingerprint.mixture import BetaMixture, GaussMixture, fit_beta_mixture, fit_gauss_mixture


def _two_betas(seed: int, n: int = 10_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = int(0.3 * n)
    return np.concatenate([rng.beta(2.0, 10.0, k), rng.beta(12.0, 3.0, n - k)])


def test_beta_mixture_recovers_components() -> None:
    mix = fit_beta_mixture(_two_betas(1))
    assert mix.k == 2 and mix.converged and mix.iterations < 200
    order = np.argsort([c.a / (c.a + c.b) for c in mix.components])
    lo, hi = (mix.components[i] for i in order)
    assert mix.weights[order[0]] == pytest.approx(0.3, abs=0.02)
    assert (lo.a, lo.b) == pytest.approx((2.0, 10.0), rel=0.12)
    assert (hi.a, hi.b) == pytest.approx((12.0, 3.0), rel=0.12)
    assert sum(mix.weights) == pytest.approx(1.0)


@pytest.mark.parametrize(("a", "b"), [(3.0, 4.0), (0.5, 0.5), (20.0, 5.0), (0.6, 2.0)])
def test_bic_keeps_one_component_for_a_single_beta(a: float, b: float) -> None:
    x = np.random.default_rng(4).beta(a, b, 5_000)
    mix = fit_beta_mixture(x[(x > 0) & (x < 1)])
    assert mix.k == 1
    assert (mix.components[0].a, mix.components[0].b) == pytest.approx((a, b), rel=0.1)


def test_bic_picks_two_for_bimodal_and_one_when_capped() -> None:
    x = _two_betas(2, 3_000)
    assert fit_beta_mixture(x).k == 2
    assert fit_beta_mixture(x, max_components=1).k == 1


def test_mixture_with_atoms_density_is_normalised() -> None:
    x = np.concatenate([np.zeros(500), np.ones(200), _two_betas(3, 4_000)])
    mix = fit_beta_mixture(x)
    base = mix.components[0]
    assert base.p0 == pytest.approx(500 / x.size) and base.p1 == pytest.approx(200 / x.size)
    m0, m1, mi = base.masses()
    grid = np.linspace(1e-7, 1 - 1e-7, 400_001)
    interior = np.trapezoid(np.exp(mix.logpdf(grid)), grid)
    assert interior == pytest.approx(mi, rel=1e-3)
    assert mix.cdf(np.array([0.0]))[0] == pytest.approx(m0)
    assert mix.cdf(np.array([0.999999]))[0] == pytest.approx(1.0 - m1, abs=1e-4)


def test_fits_are_deterministic_and_round_trip() -> None:
    x = _two_betas(5, 4_000)
    first, second = fit_beta_mixture(x), fit_beta_mixture(x)
    assert first == second
    again = BetaMixture.from_dict(first.to_dict())
    np.testing.assert_array_equal(again.logpdf(x), first.logpdf(x))


def test_beta_mixture_rejects_bad_data() -> None:
    with pytest.raises(FitError):
        fit_beta_mixture([0.1, float("nan")])
    with pytest.raises(ValueError, match="sum to 1"):
        BetaMixture.from_dict({**fit_beta_mixture(_two_betas(6, 2_000)).to_dict(), "weights": [0.5, 0.7]})


def test_gauss_mixture_recovers_power_in_watts() -> None:
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(120.0, 8.0, 3_000), rng.normal(450.0, 30.0, 7_000)])
    mix = fit_gauss_mixture(x)
    assert mix.k == 2 and mix.converged
    order = np.argsort(mix.means)
    assert [mix.means[i] for i in order] == pytest.approx([120.0, 450.0], rel=0.02)
    assert [mix.sds[i] for i in order] == pytest.approx([8.0, 30.0], rel=0.08)
    assert mix.weights[order[0]] == pytest.approx(0.3, abs=0.02)
    assert GaussMixture.from_dict(mix.to_dict()) == mix


def test_gauss_mixture_one_component_for_unimodal() -> None:
    x = np.random.default_rng(9).normal(300.0, 20.0, 4_000)
    mix = fit_gauss_mixture(x)
    assert mix.k == 1
    assert mix.means[0] == pytest.approx(300.0, rel=0.01) and mix.sds[0] == pytest.approx(20.0, rel=0.05)
    grid = np.linspace(100, 500, 40_001)
    assert np.trapezoid(np.exp(mix.logpdf(grid)), grid) == pytest.approx(1.0, rel=1e-6)


def test_gauss_mixture_bad_input() -> None:
    with pytest.raises(FitError):
        fit_gauss_mixture([1.0])
    with pytest.raises(FitError):
        fit_gauss_mixture([1.0, float("inf"), 2.0])
