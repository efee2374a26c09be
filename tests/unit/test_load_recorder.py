"""LoadRecorder.mean from running integrals: the same answers as the step function it records, at any size."""

from __future__ import annotations

import bisect
import random

import pytest

from tmb.telemetry.load import MAX_STEPS, LoadRecorder, LoadSeries


def reference(ts: list[int], vs: list[int], t0: int, t1: int) -> float | None:
    """The load series of the recorded changes, averaged as LoadSeries does (the definition)."""
    if not ts or t1 < ts[0]:
        return None
    i = max(bisect.bisect_right(ts, t0) - 1, 0)
    j = bisect.bisect_left(ts, t1, lo=i)
    steps_t, steps_v = ts[i:j] or ts[i : i + 1], [float(v) for v in (vs[i:j] or vs[i : i + 1])]
    t0 = max(t0, steps_t[0])
    return LoadSeries(tuple(steps_t), tuple(steps_v), "spans").mean(t0, max(t1, t0))


def test_mean_matches_the_step_function_on_random_histories() -> None:
    rng = random.Random(18)
    for _ in range(200):
        rec = LoadRecorder(keep=rng.choice([4, 50, 100_000]))
        t, level, ts, vs = rng.randrange(10**6), 0, [], []
        for _ in range(rng.randrange(1, 120)):
            t += rng.choice([0, 0, 1, 7, 1000, 123_456])  # ties included
            if rng.random() < 0.05:
                t -= 500  # the wall clock stepped back: recorded at the last time
            level = max(0, level + rng.choice([-1, 1, 1, 0]))
            rec.set(t, level)
        ts, vs = rec._t, rec._v  # what is kept (trimmed to between keep and 2 keep changes)
        assert ts == sorted(ts)
        for _ in range(40):
            a = rng.randrange(ts[0] - 2000, ts[-1] + 2000)
            b = a + rng.choice([0, 0, 1, 5, 999, 250_000])
            got, want = rec.mean(a, b), reference(ts, vs, a, b)
            assert (got is None) == (want is None)
            if want is not None:
                assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_a_window_with_more_changes_than_a_load_series_holds() -> None:
    """Under load a window holds more changes than MAX_STEPS: averaged all the same (no ConfigError)."""
    rec = LoadRecorder()
    for i in range(3 * MAX_STEPS):
        rec.set(1000 + 10 * i, 1 + i % 2)  # 1 and 2 in flight, alternately, 10 ns each
    assert rec.mean(1000, 1000 + 10 * 3 * MAX_STEPS) == pytest.approx(1.5)
    assert rec.mean(0, 999) is None and rec.mean(0, 1000) == 1.0 and rec.mean(1005, 1005) == 1.0
    assert rec.mean(0, 1020) == pytest.approx(1.5)  # before the history: counted from its first change
