"""Beta MLE: tmb's Newton fit on sufficient statistics vs ``scipy.stats.beta.fit(x, floc=0, fscale=1)``.

Same run, same data (10,000 interior samples per shape), ``--repeats`` timings each, medians compared.
The log-likelihoods (both evaluated with ``scipy.stats.beta.logpdf``) must agree: tmb's optimum is asserted
to be at least as good as scipy's, to 1e-9. The ratio (scipy time / tmb time) is printed last.

    .venv/bin/python bench/bench_beta_fit.py [--repeats 200] [--n 10000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from scipy import stats

from tmb.fingerprint.beta import fit_beta

SHAPES = [(0.3, 0.4), (0.5, 3.0), (2.0, 5.0), (1.0, 1.0), (20.0, 3.0), (50.0, 50.0)]


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    rng = np.random.default_rng(20260101)
    ratios = []
    print(f"{'shape':>14} {'tmb us':>9} {'scipy us':>9} {'ratio':>6} {'loglik tmb - scipy':>19} {'iters':>5}")
    for a, b in SHAPES:
        x = rng.beta(a, b, size=args.n)
        x = x[(x > 0.0) & (x < 1.0)]
        ours = fit_beta(x)
        sa, sb, _loc, _scale = stats.beta.fit(x, floc=0, fscale=1)
        ll_ours = float(stats.beta.logpdf(x, ours.a, ours.b).sum())
        ll_scipy = float(stats.beta.logpdf(x, sa, sb).sum())
        assert ours.converged, (a, b)
        assert ll_ours >= ll_scipy - 1e-9, (a, b, ll_ours, ll_scipy)
        assert abs(ll_ours - ll_scipy) <= 1e-6 * abs(ll_scipy), (a, b, ll_ours, ll_scipy)
        # Two interleaved rounds each (the faster median counts) so drift in machine load hits both alike.
        ours_fn = partial(fit_beta, x)
        scipy_fn = partial(stats.beta.fit, x, floc=0, fscale=1)
        medians: dict[str, list[float]] = {"ours": [], "scipy": []}
        for _round in range(2):
            medians["ours"].append(_median_time(ours_fn, args.repeats))
            medians["scipy"].append(_median_time(scipy_fn, args.repeats))
        t_ours, t_scipy = min(medians["ours"]), min(medians["scipy"])
        ratio = t_scipy / t_ours
        ratios.append(ratio)
        print(
            f"{f'({a:g}, {b:g})':>14} {t_ours * 1e6:9.1f} {t_scipy * 1e6:9.1f} {ratio:6.2f} "
            f"{ll_ours - ll_scipy:19.3e} {ours.iterations:5d}"
        )
    gmean = float(np.exp(np.mean(np.log(ratios))))
    print(
        f"beta fit on {args.n} samples, median of {args.repeats}: tmb is {gmean:.2f}x faster than "
        f"scipy.stats.beta.fit(floc=0, fscale=1) (geometric mean over {len(SHAPES)} shapes; "
        f"min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
    )


if __name__ == "__main__":
    main()
