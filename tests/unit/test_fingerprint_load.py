"""The load-aware fingerprint: window summaries, knots over load, leave-one-run-out calibration, the three
outcomes, the profile file; and, where ../shared/real-gpu-traces is present, the real recordings."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from tmb.errors import ConfigError, InputError
from tmb.fingerprint import Judge, LoadProfile, enroll_runs, load_profile, summarise, window_summaries
from tmb.fingerprint.loadprofile import MEMORY_FLOOR, MIN_RUNS, PRIOR_DAY_SHIFT
from tmb.fingerprint.summary import FeatureSummary, WindowSummary
from tmb.telemetry.load import LoadRecorder, LoadSeries, concurrency, load_from_meta, run_from_meta
from tmb.telemetry.sample import SampleBatch

REAL = Path(__file__).resolve().parents[3] / "shared" / "real-gpu-traces"


def _w(load: float, **medians: float) -> WindowSummary:
    return WindowSummary(0, 30 * 10**9, load, {k: FeatureSummary(v, 30, 1e-4) for k, v in medians.items()})


def _runs(
    offsets: Sequence[float], curve: Mapping[float, float] | None = None, mem: float = 0.5, windows: int = 4
) -> dict[str, list[WindowSummary]]:
    """Runs whose power follows ``curve`` (load -> median) shifted by each run's offset; memory flat."""
    curve = curve or {1.0: 0.3, 4.0: 0.5, 8.0: 0.7}
    rng = np.random.default_rng(0)
    return {
        f"run{i}": [
            _w(load, power_frac=p + off + float(rng.normal(0, 0.002)), mem_used_frac=mem)
            for load, p in curve.items()
            for _ in range(windows)
        ]
        for i, off in enumerate(offsets)
    }


def _profile(
    runs: Mapping[str, Sequence[WindowSummary]], model: str = "m", days: int = 1, **kw: str
) -> LoadProfile:
    return enroll_runs(
        runs,
        model=model,
        gpu_type="h100",
        window_s=30,
        run_days={r: f"2025-01-0{1 + i % days}" for i, r in enumerate(runs)},
        run_nodes={r: "n1" for r in runs},
        **kw,
    )


def test_summary_is_the_median_and_the_load_is_time_averaged() -> None:
    n = 200
    t = (np.arange(n) * 50_000_000).astype(np.int64)
    power = np.full(n, 300.0)
    power[5] = 5000.0  # a spike: the median ignores it
    batch = SampleBatch.from_columns(
        list(t), ("GPU-1",), gpu=[0] * n, source="import", synthetic=False, power_field="average",
        power_w=power, power_limit_w=np.full(n, 700.0), mem_used_bytes=np.full(n, 40.0 * 2**30),
        mem_total_bytes=np.full(n, 80.0 * 2**30), gpu_util=np.full(n, 100.0),
    )  # fmt: skip
    load = LoadSeries((0, 5 * 10**9), (2.0, 6.0))
    (w,) = window_summaries(batch, load, 10.0)
    assert w.features["power_frac"].median == pytest.approx(300 / 700)
    assert w.features["mem_used_frac"].median == pytest.approx(0.5) and w.load == pytest.approx(4.0)
    assert summarise(batch, 3.0).n_samples == n
    assert concurrency([(0, 10), (5, 20)], 0, 20) == pytest.approx(1.25)
    rec = LoadRecorder()
    for t_ns, v in ((10, 1), (20, 2), (30, 1), (40, 0)):
        rec.set(t_ns, v)
    assert rec.mean(10, 30) == pytest.approx(1.5) and rec.mean(0, 5) is None


def test_knots_interpolate_and_runs_are_left_out() -> None:
    p = _profile(_runs([0.0, 0.01, -0.01, 0.005]))
    assert [k.load for k in p.knots] == [1.0, 4.0, 8.0] and p.runs == 4
    exp = p.expected("power_frac", 6.0)
    assert exp is not None and exp[0] == pytest.approx(0.6, abs=0.01)  # between the 4 and 8 knots
    cal = p.calibration["power_frac"]
    assert cal.shift_sd > 0.005  # the runs' offsets are measured ...
    assert cal.floor == PRIOR_DAY_SHIFT  # ... and one day of runs cannot see day-to-day shifts
    assert p.calibration["mem_used_frac"].floor == MEMORY_FLOOR
    three_days = _profile(_runs([0.0, 0.01, -0.01, 0.005]), days=3)
    assert three_days.calibration["power_frac"].floor < PRIOR_DAY_SHIFT


def test_three_outcomes() -> None:
    claim = _profile(_runs([0.0, 0.004, -0.004, 0.002], mem=0.50), model="big")
    other = _profile(_runs([0.0, 0.004, -0.004, 0.002], mem=0.45), model="small")
    twin = _profile(_runs([0.0, 0.004, -0.004, 0.002], mem=0.501), model="twin")
    judge = Judge([claim, other])
    honest = judge.judge("big", _w(4.0, power_frac=0.5, mem_used_frac=0.5))
    assert honest.decision == "consistent" and honest.power is not None and honest.power > 0.99
    fake = judge.judge("big", _w(4.0, power_frac=0.5, mem_used_frac=0.45))
    assert fake.decision == "inconsistent" and fake.best_alternative == other.key
    assert [f.id for f in fake.findings] == ["fingerprint.inconsistent"]
    # a load the profile never saw: inconclusive, never inconsistent
    far = judge.judge("big", _w(40.0, power_frac=0.9, mem_used_frac=0.45))
    assert far.decision == "inconclusive" and far.findings[-1].id == "fingerprint.load_out_of_range"
    idle = judge.judge("big", _w(0.0, power_frac=0.1, mem_used_frac=0.5))
    assert idle.decision == "inconclusive" and idle.findings[-1].id == "fingerprint.idle_window"
    # an alternative the window cannot be told from: inconclusive, naming it
    both = Judge([claim, twin]).judge("big", _w(4.0, power_frac=0.5, mem_used_frac=0.5005))
    assert both.decision == "inconclusive" and both.findings[-1].id == "fingerprint.alternatives_overlap"
    assert twin.key in both.findings[-1].message
    # too few runs to calibrate: cannot decide either way
    thin = _profile(_runs([0.0, 0.01]), model="big")
    out = Judge([thin]).judge("big", _w(4.0, power_frac=0.5, mem_used_frac=0.1))
    assert thin.runs < MIN_RUNS and out.decision == "inconclusive"
    assert out.findings[-1].id == "fingerprint.too_few_runs"
    assert Judge([claim]).judge("nobody", _w(4.0, power_frac=0.5)).findings[-1].id == "fingerprint.no_profile"


def test_another_gpu_type_is_no_alternative() -> None:
    claim = _profile(_runs([0.0, 0.004, -0.004, 0.002], mem=0.50), model="big")
    twin = enroll_runs(
        _runs([0.0, 0.004, -0.004, 0.002], mem=0.5001), model="twin", gpu_type="a100", window_s=30
    )
    assert (
        Judge([claim, twin]).judge("big", _w(4.0, power_frac=0.5, mem_used_frac=0.5)).decision == "consistent"
    )


def test_profile_file_round_trip_and_errors(tmp_path: Path) -> None:
    p = _profile(_runs([0.0, 0.004, -0.004]), precision="bf16")
    path = tmp_path / "p.json"
    p.save(path)
    back = load_profile(path)
    assert back.key == p.key and back.knots == p.knots and back.calibration == p.calibration
    data = json.loads(path.read_text())
    for field, value, where in (
        ("version", 1, "version"),
        ("knots", [], "knots"),
        ("knots", list(reversed(data["knots"])), "knots[1]"),
        (
            "calibration",
            {"power_frac": {"shift_sd": -1, "window_sd": 0, "floor": 0, "runs": 1}},
            "calibration.power_frac",
        ),
        ("target_far", 2, "target_far"),
        ("model", "", "model"),
    ):
        path.write_text(json.dumps({**data, field: value}))
        with pytest.raises(ConfigError) as info:
            load_profile(path)
        assert info.value.context["field"] == where and info.value.context["path"] == str(path)
    with pytest.raises(InputError):
        enroll_runs({"r": [_w(0.0, power_frac=0.1)]}, model="m", window_s=30)  # only idle windows


def test_trace_labels_are_validated() -> None:
    assert load_from_meta({}) is None
    series = load_from_meta({"load": LoadSeries.constant(8, 100).to_dict()})
    assert series is not None and series.mean(0, 10**9) == 8.0
    with pytest.raises(ConfigError) as info:
        load_from_meta({"load": {"steps": [[2, 1.0], [1, 2.0]]}}, "t.trace")
    assert info.value.context["path"] == "t.trace"
    with pytest.raises(ConfigError):
        load_from_meta({"load": {"steps": [[0, -1.0]]}})
    run = run_from_meta({"t_first_ns": 1_700_000_000 * 10**9, "gpus": ["GPU-9"]})
    assert (run.node, run.day) == ("GPU-9", "2023-11-14") and run.id.startswith("GPU-9@")


@pytest.mark.skipif(
    not REAL.is_dir(), reason="../shared/real-gpu-traces is absent (real data lives outside the repo)"
)
def test_real_trtllm_recordings_leave_one_run_out(tmp_path: Path) -> None:
    """Real Llama-2-7B TensorRT-LLM recordings on a V100S, imported with tmb's own command: honest fp16
    runs left out are never accused, and INT4 weights behind the fp16 claim are caught."""
    from tmb.cli import main
    from tmb.fingerprint.corpus import load_runs
    from tmb.fingerprint.evaluate import evaluate

    root = REAL / "trtllm-llama2-v100s" / "llama" / "7B"
    for prec in ("fp16", "fp16_wq4"):
        for path in sorted((root / prec).glob("1-gpu-*-batch/*max1000*.out")):
            batch = path.parent.name.split("-")[2]
            out = tmp_path / f"{prec}-{batch}-{path.stem[-8:]}.tmbtrace"
            args = ["telemetry", "import", str(path), "--out", str(out), "--gpu", "0", "--trim-idle"]
            args += [
                "--model",
                "llama-2-7b",
                "--precision",
                prec,
                "--engine",
                "trtllm",
                "--gpu-type",
                "v100s",
            ]
            assert main([*args, "--load", batch]) == 0
    runs, notes = load_runs([tmp_path], 30.0, test_window_s=60.0, step_s=10.0)
    assert any(n.id == "fingerprint.duplicate_run" for n in notes)  # the same recording in two layouts
    result = evaluate(runs, window_s=60.0)
    pairs = {(p.claimed, p.actual): p for p in result.pairs.values()}
    fp16, int4 = "llama-2-7b/fp16/trtllm/v100s", "llama-2-7b/fp16_wq4/trtllm/v100s"
    honest = pairs[(fp16, fp16)]
    assert honest.windows > 100 and honest.inconsistent == 0 and honest.consistent > 0
    swap = pairs[(fp16, int4)]
    assert swap.in_range > 20 and swap.inconsistent / swap.in_range >= 0.95
    assert math.isfinite(result.cpu_s_per_window)
