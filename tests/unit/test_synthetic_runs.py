"""Synthetic load sweeps, run-to-run shifts, load-dependent memory and the evaluation corpus."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tmb.errors import InputError
from tmb.telemetry import SampleBatch, SyntheticSource, generate, read_trace, simulate
from tmb.telemetry.load import MAX_STEPS, LoadSeries, day_of, load_from_meta, run_from_meta
from tmb.telemetry.synthetic_corpus import run_shift, synthetic_corpus
from tmb.telemetry.workloads import GIB, MIB, MODELS, RunShift

BF16 = "llama-1b/bf16/h100"
SWEEP = [(20.0, 1.0), (20.0, 8.0), (20.0, 32.0)]
# sha256 of generate(...).encode() before load sweeps and run shifts existed: defaults must not move.
PINNED = {
    (BF16, "batched"): "416820d376a7d6b322588d27cc9d7a62e5f070034d6eae868a2e10129715c10b",
    (BF16, "single"): "b135efa96e1bdf3a881df6f07f392a148e078ad126dc4ac9d6f9e42b8b27f0de",
    ("llama-1b/int8/h100", "batched"): "c0e9bc27c9c6e7f0262b11e76a8b5dd0b6830c80b7083005d8fa986bd6d52156",
    ("llama-1b/bf16/a100", "idle"): "b18f4d25f1757e4c308011712fc40fabc23e8610b2abe5dec62dee156d9311a4",
}


def per_step(batch: SampleBatch, field: str, steps: int) -> np.ndarray:
    values = np.asarray(getattr(batch, field), dtype=np.float64)
    return np.asarray(values.reshape(steps, -1).mean(axis=1))


def test_default_outputs_unchanged() -> None:
    for (name, regime), digest in PINNED.items():
        got = hashlib.sha256(generate(name, regime, 5, seed=1).encode()).hexdigest()
        assert got == digest, (name, regime)
    workload = dict(simulate(BF16, "batched", 5, seed=1).workload)
    load = workload.pop("load")
    assert workload == {
        "model": "llama-1b",
        "precision": "bf16",
        "gpu_type": "h100",
        "workload_model": BF16,
        "regime": "batched",
        "seconds": 5,
        "seed": 1,
        "requests": 11,
        "tokens_generated": 9955,
        "batch_size": 23.702380952380953,
    }
    # Running sequences are re-drawn each second: steps on whole seconds, equal neighbours merged.
    assert load["unit"] == "requests_in_flight" and load["source"] == "series"
    assert [t for t, _ in load["steps"]] == [0, 1_000_000_000, 2_000_000_000, 3_000_000_000]
    assert all(2 <= v <= MODELS[BF16].max_batch for _, v in load["steps"])


def test_single_regime_load_is_the_requests_it_ran() -> None:
    run = simulate(BF16, "single", 30.0, seed=4, start_ns=10**18)
    series = load_from_meta(run.workload)
    assert series is not None and set(series.values) == {0.0, 1.0} and series.t_ns[0] == 10**18
    busy = float(np.mean(run.batch.gpu_util > 50))  # idle noise may read 1 %
    t0, t1 = int(run.batch.t_ns[0]), int(run.batch.t_ns[-1]) + 50_000_000
    assert series.mean(t0, t1) == pytest.approx(busy, abs=0.03)
    idle = load_from_meta(simulate(BF16, "idle", 3.0, seed=4).workload)
    assert idle == LoadSeries((0,), (0.0,), "series")


def test_sweep_power_and_utilisation_follow_the_load() -> None:
    run = simulate(BF16, "sweep", 60.0, seed=3, start_ns=10**18, load_schedule=SWEEP)
    limit = MODELS[BF16].power_limit_w
    power = per_step(run.batch, "power_w", 3)
    util = per_step(run.batch, "gpu_util", 3)
    assert power[0] < power[1] < power[2] and power[2] - power[0] > 0.15 * limit
    assert util[0] < util[2]
    # Load moves power more than the model does: int8 at the same load is much closer than load 1 vs 32.
    int8 = per_step(
        simulate("llama-1b/int8/h100", "sweep", 60.0, seed=3, load_schedule=SWEEP).batch, "power_w", 3
    )
    assert float(np.max(np.abs(power - int8))) < 0.5 * (power[2] - power[0])
    assert run.workload["regime"] == "sweep" and run.workload["engine"] == "vllm"
    assert run.workload["load_schedule"] == [[20.0, 1.0], [20.0, 8.0], [20.0, 32.0]]
    assert run.workload["requests"] > 0 and 1.0 < run.workload["batch_size"] < 32.0
    series = load_from_meta({"load": run.workload["load"]})
    assert series == LoadSeries(
        (10**18, 10**18 + 20 * 10**9, 10**18 + 40 * 10**9), (1.0, 8.0, 32.0), "series"
    )


def test_sweep_last_step_holds_and_zero_is_idle() -> None:
    run = simulate(BF16, "sweep", 6.0, rate_hz=10.0, seed=1, load_schedule=[(2.0, 0), (2.0, 4)])
    assert len(run.batch) == 60
    assert [v for _, v in run.workload["load"]["steps"]] == [0.0, 4.0]
    assert float(np.max(run.batch.gpu_util[:20])) <= 2.0 and float(np.min(run.batch.gpu_util[20:])) > 50.0
    empty = simulate(BF16, "sweep", 0.0, seed=1, load_schedule=[(2.0, 3)])
    assert len(empty.batch) == 0 and empty.workload["load"]["steps"] == [[0, 3.0]]


def test_sweep_is_deterministic_for_a_seed() -> None:
    a = simulate(BF16, "sweep", 30.0, seed=9, load_schedule=SWEEP, shift=RunShift(power_frac=0.01))
    b = simulate(BF16, "sweep", 30.0, seed=9, load_schedule=SWEEP, shift=RunShift(power_frac=0.01))
    assert a.batch.encode() == b.batch.encode() and a.workload == b.workload
    assert simulate(BF16, "sweep", 30.0, seed=10, load_schedule=SWEEP).batch.encode() != a.batch.encode()


def test_memory_depends_on_precision_and_grows_with_load() -> None:
    mem = {
        name: per_step(simulate(name, "sweep", 60.0, seed=2, load_schedule=SWEEP).batch, "mem_used_bytes", 3)
        for name in (BF16, "llama-1b/int8/h100", "llama-1b/fp8/h100")
    }
    for name in ("llama-1b/int8/h100", "llama-1b/fp8/h100"):
        assert bool(np.all(mem[BF16] - mem[name] > 512 * MIB)), name
        assert bool(np.all(mem[BF16] - mem[name] < 2 * GIB)), name
    for values in mem.values():
        growth = values[2] - values[0]
        assert values[0] < values[1] < values[2] and 31 * MIB <= growth <= 256 * MIB
    # Nearly deterministic: constant within a step, the process's share follows it.
    batch = simulate(BF16, "sweep", 10.0, seed=2, load_schedule=[(10.0, 4)]).batch
    assert len(set(batch.mem_used_bytes.tolist())) == 1
    assert batch.processes[0][0][1] == int(batch.mem_used_bytes[0]) - 512 * MIB


def test_shift_moves_the_run() -> None:
    shift = RunShift(power_frac=0.04, mem_used_bytes=3 * MIB, temp_c=2.0)
    base = simulate(BF16, "batched", 60.0, seed=1)
    moved = simulate(BF16, "batched", 60.0, seed=1, shift=shift)
    limit = MODELS[BF16].power_limit_w
    delta = float(np.mean(moved.batch.power_w) - np.mean(base.batch.power_w))
    assert delta == pytest.approx(0.04 * limit, abs=0.005 * limit)
    assert bool(np.all(moved.batch.mem_used_bytes - base.batch.mem_used_bytes == 3 * MIB))
    temp = float(np.mean(moved.batch.temp_c) - np.mean(base.batch.temp_c))
    assert 2.0 < temp < 2.0 + 0.04 * MODELS[BF16].temp_rise_c + 0.3  # offset, plus the lagging power part
    assert moved.batch.temp_c[0] - base.batch.temp_c[0] == pytest.approx(2.0, abs=1.0)
    assert moved.workload["shift"] == shift.to_dict() and "shift" not in base.workload
    noop = simulate(BF16, "batched", 5.0, seed=1, shift=RunShift()).batch.encode()
    assert noop == generate(BF16, "batched", 5.0, seed=1).encode()
    gained = simulate(BF16, "sweep", 20.0, seed=1, load_schedule=[(20.0, 32)], shift=RunShift(gain=1.1))
    flat = simulate(BF16, "sweep", 20.0, seed=1, load_schedule=[(20.0, 32)])
    above_idle = float(np.mean(flat.batch.power_w)) - MODELS[BF16].idle.power_frac * limit
    gain_delta = float(np.mean(gained.batch.power_w) - np.mean(flat.batch.power_w))
    assert gain_delta == pytest.approx(0.1 * above_idle, rel=0.1)


def test_live_source_takes_a_shift() -> None:
    clock = [0]
    plain = SyntheticSource(BF16, seed=3, clock=lambda: clock[0])
    shifted = SyntheticSource(BF16, seed=3, clock=lambda: clock[0], shift=RunShift(power_frac=0.05))
    clock[0] = 5 * 10**9
    a, b = plain.read(), shifted.read()
    assert float(np.mean(b.power_w) - np.mean(a.power_w)) == pytest.approx(0.05 * 700.0, abs=5.0)
    assert shifted.describe()["workload"]["shift"]["power_frac"] == 0.05
    assert "shift" not in plain.describe()["workload"]


def test_long_load_series_is_averaged_within_the_step_limit() -> None:
    flicker = [(0.1, float(i % 2)) for i in range(MAX_STEPS + 5000)]
    run = simulate(BF16, "sweep", len(flicker) * 0.1, rate_hz=10.0, seed=1, load_schedule=flicker)
    series = load_from_meta(run.workload)
    assert series is not None and len(series.t_ns) <= MAX_STEPS
    t0, t1 = int(run.batch.t_ns[0]), int(run.batch.t_ns[-1]) + 100_000_000
    assert series.mean(t0, t1) == pytest.approx(0.5, abs=0.01)


def test_run_shift_magnitudes_and_structure() -> None:
    assert run_shift(7, node="node-1", day="2025-01-06") == run_shift(7, node="node-1", day="2025-01-06")
    assert run_shift(7, node="node-1", day="2025-01-06") != run_shift(8, node="node-1", day="2025-01-06")
    shifts = {(n, d): run_shift(1, node=f"n{n}", day=f"d{d}") for n in range(30) for d in range(30)}
    power = np.array([[shifts[n, d].power_frac for d in range(30)] for n in range(30)])
    assert float(np.max(np.abs(power))) <= 0.049 + 0.015 + 0.003
    assert float(np.std(power.mean(axis=0))) > 1.3 * float(np.std(power.mean(axis=1)))  # days move more
    assert 0.005 < float(np.std(power.mean(axis=1))) < 0.015  # nodes: about +-1.5 %
    mem = {s.mem_used_bytes for s in shifts.values()}
    assert max(abs(m) for m in mem) <= 4 * MIB and len(mem) > 3
    assert all(0.96 <= s.gain <= 1.04 and abs(s.temp_c) <= 6.5 for s in shifts.values())


def test_invalid_sweeps_and_shifts() -> None:
    with pytest.raises(InputError, match="load schedule"):
        simulate(BF16, "sweep", 5.0)
    with pytest.raises(InputError, match="load schedule"):
        simulate(BF16, "batched", 5.0, load_schedule=[(5.0, 2)])
    with pytest.raises(InputError, match="at least one"):
        simulate(BF16, "sweep", 5.0, load_schedule=[])
    with pytest.raises(InputError, match="durations"):
        simulate(BF16, "sweep", 5.0, load_schedule=[(0.0, 2)])
    with pytest.raises(InputError, match="whole number"):
        simulate(BF16, "sweep", 5.0, load_schedule=[(5.0, 1.5)])
    with pytest.raises(InputError, match="unknown load regime"):
        simulate(BF16, "frantic", 5.0)
    with pytest.raises(InputError):
        RunShift(gain=0.0)
    with pytest.raises(InputError):
        RunShift(power_frac=float("nan"))


def test_corpus_writes_labelled_runs(tmp_path: Path) -> None:
    models = [BF16, "llama-1b/int8/h100"]

    def corpus(out: Path) -> list[Path]:
        return synthetic_corpus(out, models, 4, loads=[1, 4, 16], seconds_per_load=3.0, rate_hz=10.0, seed=5)

    paths = corpus(tmp_path / "a")
    assert len(paths) == 8 and len({p.name for p in paths}) == 8
    runs, shifts = set(), []
    for path in paths:
        trace = read_trace(path)
        meta = trace.meta
        assert trace.batch.synthetic and meta["synthetic"] is True and meta["source"] == "synthetic"
        assert len(trace.batch) == 90
        workload = meta["workload"]
        assert workload["model"] == "llama-1b" and workload["precision"] in {"bf16", "int8"}
        assert (
            workload["gpu_type"] == "h100" and workload["engine"] == "vllm" and workload["regime"] == "sweep"
        )
        assert "load" not in workload
        series = load_from_meta(meta, str(path))
        assert series is not None and series.source == "series" and sorted(series.values) == [1.0, 4.0, 16.0]
        assert series.t_ns[0] == meta["t_first_ns"]
        run = run_from_meta(meta, str(path))
        assert run.to_dict() == meta["run"] and run.day == day_of(meta["t_first_ns"])
        runs.add((run.id, run.node, run.day))
        shifts.append(workload["shift"])
    assert len(runs) == 8
    assert {r[1] for r in runs} == {"node-1", "node-2"} and {r[2] for r in runs} == {
        "2025-01-06",
        "2025-01-07",
    }
    assert len({tuple(sorted(s.items())) for s in shifts}) == 8
    again = corpus(tmp_path / "b")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    with pytest.raises(InputError):
        synthetic_corpus(tmp_path / "c", models=["gpt-5/fp4/b200"])
    with pytest.raises(InputError):
        synthetic_corpus(tmp_path / "c", models=models, runs_per_model=0)
