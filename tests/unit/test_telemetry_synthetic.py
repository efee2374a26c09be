"""The synthetic source: labels, determinism, realism properties, activity-driven rendering."""

from __future__ import annotations

import numpy as np
import pytest

from tmb.errors import InputError
from tmb.telemetry import MODELS, REGIMES, SampleBatch, SyntheticSource, features, generate, simulate
from tmb.telemetry.synthetic import supported_fields

REQUIRED = (
    "llama-1b/bf16/h100",
    "llama-1b/int8/h100",
    "llama-1b/fp8/h100",
    "llama-3b/bf16/h100",
    "llama-1b/bf16/a100",
    "tiny-160m/bf16/h100",
)


def lag1(x: np.ndarray) -> float:
    return float(np.corrcoef(x[:-1], x[1:])[0, 1])


def test_models_and_labels() -> None:
    assert set(REQUIRED) <= set(MODELS) and REGIMES == ("idle", "single", "batched")
    for name in REQUIRED:
        for regime in REGIMES:
            batch = generate(name, regime, 3.0, rate_hz=10.0, seed=1, start_ns=10**18)
            assert batch.source == "synthetic" and batch.synthetic is True, (name, regime)
            assert len(batch) == 30 and int(batch.t_ns[0]) == 10**18
            assert int(batch.t_ns[1] - batch.t_ns[0]) == 100_000_000
            assert batch.present_fields() == supported_fields(MODELS[name])
            assert SampleBatch.decode(batch.encode()).synthetic


def test_deterministic_for_a_seed() -> None:
    a = generate("llama-1b/int8/h100", "single", 20.0, seed=7)
    assert a.encode() == generate("llama-1b/int8/h100", "single", 20.0, seed=7).encode()
    assert a.encode() != generate("llama-1b/int8/h100", "single", 20.0, seed=8).encode()
    run = simulate("llama-1b/int8/h100", "single", 20.0, seed=7)
    assert run.batch == a and run.workload["requests"] > 0 and run.workload["tokens_generated"] > 0


def test_unknown_model_or_regime() -> None:
    with pytest.raises(InputError, match="unknown synthetic workload model"):
        generate("gpt-5/fp4/b200", "single", 1.0)
    with pytest.raises(InputError, match="unknown load regime"):
        generate("llama-1b/bf16/h100", "frantic", 1.0)
    with pytest.raises(InputError):
        generate("llama-1b/bf16/h100", "single", 1.0, rate_hz=0.0)


def test_utilisation_is_integer_percent_with_exact_bounds() -> None:
    batch = generate("llama-1b/bf16/h100", "single", 60.0, seed=2)
    util = batch.gpu_util
    assert bool(np.all(util == np.round(util))) and bool(np.all(batch.mem_util == np.round(batch.mem_util)))
    assert bool(np.any(util == 0.0)) and bool(np.any(util == 100.0))
    assert float(util.min()) >= 0.0 and float(util.max()) <= 100.0


def test_noise_is_autocorrelated() -> None:
    # In the idle regime the means are constant: what is left is the AR(1) noise (phi = exp(-0.05/0.3)).
    idle = generate("llama-1b/bf16/h100", "idle", 60.0, seed=4)
    assert lag1(idle.power_w) > 0.6
    busy = generate("llama-1b/bf16/h100", "batched", 60.0, seed=4)
    assert lag1(busy.power_w) > 0.5 and lag1(busy.sm_active) > 0.3


def test_power_limit_and_energy_counter() -> None:
    batch = generate("llama-3b/bf16/h100", "batched", 30.0, seed=5)
    assert bool(np.all(batch.power_limit_w == 700.0)) and float(batch.power_w.max()) <= 700.0 * 1.02
    assert bool(np.all(np.diff(batch.energy_mj) >= 0)) and bool(
        np.all(batch.energy_mj == np.round(batch.energy_mj))
    )
    assert batch.processes[0][0][1] is not None and batch.temp_c.min() > 20


def test_variants_differ_modestly() -> None:
    bf16 = features(generate("llama-1b/bf16/h100", "batched", 120.0, seed=11))
    int8 = features(generate("llama-1b/int8/h100", "batched", 120.0, seed=12))
    gap = float(bf16["power_frac"].mean() - int8["power_frac"].mean())
    assert 0.01 < gap < 0.08  # a few percent of the limit
    # Not separable on one sample: the distributions overlap heavily.
    overlap = float(np.mean(int8["power_frac"] > np.median(bf16["power_frac"])))
    assert overlap > 0.15
    assert float(bf16["tensor_active"].mean()) > float(int8["tensor_active"].mean())
    a100 = features(generate("llama-1b/bf16/a100", "batched", 60.0, seed=13))
    assert float(a100["power_frac"].mean()) > float(bf16["power_frac"].mean())


def test_quantized_model_uses_integer_tensor_pipe() -> None:
    int8 = generate("llama-1b/int8/h100", "batched", 10.0, seed=1)
    bf16 = generate("llama-1b/bf16/h100", "batched", 10.0, seed=1)
    assert float(int8.tensor_imma.mean()) > float(int8.tensor_hmma.mean()) > 0
    assert float(bf16.tensor_imma.max()) == 0.0 and float(bf16.tensor_hmma.mean()) > 0
    assert bool(np.all(np.isnan(generate("llama-1b/bf16/a100", "batched", 2.0).tensor_active)))


class FakeClock:
    def __init__(self, start: int = 1_000_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)


def test_activity_drives_the_source() -> None:
    clock = FakeClock()
    src = SyntheticSource("llama-1b/bf16/h100", seed=3, clock=clock, sleep=clock.sleep)
    clock.advance(2.0)
    idle = src.read()
    assert len(idle) == 41 and float(idle.gpu_util.max()) <= 3.0 and idle.synthetic
    src.request_started(tokens_expected=64, prompt_tokens=2000)  # 0.1 s of prefill
    for _ in range(30):
        clock.advance(0.1)
        src.token_generated(8)
    busy = src.read()
    src.request_finished()
    clock.advance(2.0)
    after = src.read()
    assert len(busy) == 60 and float(np.median(busy.gpu_util)) >= 90
    assert float(busy.tensor_active[:2].mean()) > float(busy.tensor_active[5:].mean())  # prefill first
    assert float(np.median(after.gpu_util[5:])) == 0.0
    assert float(busy.power_w.mean()) > float(idle.power_w.mean()) + 50
    assert src.tokens_generated == 240 and src.requests == 1
    whole = SampleBatch.concat([idle, busy, after])
    assert bool(np.all(np.diff(whole.t_ns) == 50_000_000))  # one grid, no gaps, no repeats
    assert src.describe()["synthetic"] is True and src.describe()["workload"]["tokens_generated"] == 240


def test_load_raises_power_and_unbalanced_finish_is_a_finding() -> None:
    clock = FakeClock()
    one = SyntheticSource("llama-1b/bf16/h100", seed=1, clock=clock)
    many = SyntheticSource("llama-1b/bf16/h100", seed=1, clock=clock)
    one.on_activity("start")
    for _ in range(24):
        many.on_activity("start")
    clock.advance(10.0)
    assert float(many.read().power_w.mean()) > float(one.read().power_w.mean()) + 50
    one.request_finished()
    one.request_finished()
    clock.advance(1.0)
    one.read()
    assert [f.id for f in one.findings] == ["telemetry.synthetic_unbalanced"]
    with pytest.raises(InputError):
        one.on_activity("explode")


async def test_batches_follow_absolute_deadlines() -> None:
    clock = FakeClock()
    src = SyntheticSource("tiny-160m/bf16/h100", rate_hz=10.0, clock=clock, sleep=clock.sleep)
    stream = src.batches(1.0)
    sizes = []
    async for batch in stream:
        sizes.append(len(batch))
        clock.advance(0.3)  # the consumer is slow; deadlines must not drift
        if len(sizes) == 5:
            break
    await stream.aclose()
    assert sizes == [11, 10, 10, 10, 10] and clock.now == 1_000_000_000_000 + 5_300_000_000
