"""Features on a 0..1 scale, dropped-value accounting, energy per token."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tmb.telemetry import FEATURES, SampleBatch, energy_per_token_j, extract, features, generate
from tmb.telemetry.sample import FLOAT_FIELDS

GPU = "GPU-f0000000-0000-0000-0000-000000000001"


def test_feature_names_and_scale_on_hopper() -> None:
    batch = generate("llama-1b/bf16/h100", "batched", 10.0, seed=3)
    feats = features(batch)
    assert tuple(feats) == FEATURES
    for name, values in feats.items():
        assert values.shape == (len(batch),), name
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.02, name
    np.testing.assert_allclose(feats["power_frac"], batch.power_w / 700.0)
    np.testing.assert_allclose(feats["gpu_util"], batch.gpu_util / 100.0)
    assert extract(batch).dropped_total == 0


def test_absent_features_are_omitted_not_zero() -> None:
    feats = features(generate("llama-1b/bf16/a100", "single", 5.0))  # no GPM before Hopper
    assert set(feats) == {"power_frac", "gpu_util", "mem_util"}
    only_power = SampleBatch.from_columns([1, 2], [GPU], source="nvml", power_w=[100.0, 200.0])
    fs = extract(only_power)
    assert set(fs.values) == {"power_frac"}
    assert fs.values["power_frac"].size == 0 and fs.dropped == {"power_frac": 2}  # no limit: unusable
    assert features(SampleBatch.empty("nvml")) == {}


def test_invalid_values_are_dropped_and_counted() -> None:
    batch = SampleBatch.from_columns(
        [1, 2, 3, 4, 5, 6],
        [GPU],
        source="nvml",
        power_w=[350.0, -5.0, math.inf, math.nan, 700.0, 720.0],
        power_limit_w=[700.0, 700.0, 700.0, 700.0, 0.0, 700.0],
        gpu_util=[0.0, 100.0, 101.0, -1.0, math.nan, 50.0],
        sm_active=[0.5, math.nan, math.nan, 1.5, 0.2, -math.inf],
    )
    fs = extract(batch)
    np.testing.assert_allclose(fs.values["power_frac"], [0.5, 720.0 / 700.0])  # overshoot above 1 is kept
    assert fs.dropped["power_frac"] == 4  # negative, inf, NaN among present, zero limit
    np.testing.assert_array_equal(fs.values["gpu_util"], [0.0, 1.0, 0.5])
    assert fs.dropped["gpu_util"] == 3
    np.testing.assert_array_equal(fs.values["sm_active"], [0.5, 0.2])
    assert fs.dropped["sm_active"] == 4 and fs.dropped_total == 11 and fs.samples == 6


def _constant_power(energy: list[float] | None) -> SampleBatch:
    t = [int(i * 1e9) for i in range(11)]  # 10 s
    if energy is None:
        return SampleBatch.from_columns(t, [GPU], source="nvml", power_w=[100.0] * 11)
    return SampleBatch.from_columns(t, [GPU], source="nvml", power_w=[100.0] * 11, energy_mj=energy)


def test_energy_per_token_from_counter_and_from_power() -> None:
    counter = [5e6 + 90_000.0 * i for i in range(11)]  # 90 W by the counter, 900 J in 10 s
    assert energy_per_token_j(_constant_power(counter), 100) == pytest.approx(9.0)
    assert energy_per_token_j(_constant_power(None), 100) == pytest.approx(10.0)  # 100 W x 10 s
    wrapped = counter[:5] + [0.0] * 6  # counter reset: fall back to power
    assert energy_per_token_j(_constant_power(wrapped), 100) == pytest.approx(10.0)
    assert energy_per_token_j(_constant_power(None), 0) is None
    assert energy_per_token_j(SampleBatch.empty("nvml"), 10) is None
    two_gpus = SampleBatch.concat(
        [
            _constant_power(None),
            SampleBatch.from_columns([0, 10**10], ["GPU-2"], source="nvml", power_w=[50.0] * 2),
        ]
    )
    assert energy_per_token_j(two_gpus, 100) == pytest.approx(15.0)


def test_energy_per_token_on_synthetic_trace_matches_power_integral() -> None:
    batch = generate("llama-3b/bf16/h100", "batched", 20.0, seed=9)
    from_counter = energy_per_token_j(batch, 1000)
    dt = np.diff(batch.t_ns) / 1e9
    integral = float(np.sum(batch.power_w[1:] * dt)) / 1000
    assert from_counter == pytest.approx(integral, rel=0.01)


def test_aligned_features_line_up_sample_by_sample() -> None:
    batch = generate("llama-1b/bf16/h100", "batched", 2.0, seed=3)
    gpu = batch.column("gpu_util").copy()
    gpu[[3, 7]] = np.nan  # two samples lose one feature
    broken = SampleBatch.from_columns(
        batch.t_ns,
        batch.gpus,
        source=batch.source,
        synthetic=batch.synthetic,
        power_field=batch.power_field,
        gpu=batch.gpu,
        **{name: (gpu if name == "gpu_util" else batch.column(name)) for name in FLOAT_FIELDS},
    )
    fs = extract(broken)
    assert fs.values["gpu_util"].size == len(batch) - 2
    assert fs.values["power_frac"].size == len(batch)  # per feature, only its own invalid values go
    aligned = fs.aligned()
    assert {v.size for v in aligned.values()} == {len(batch) - 2}  # jointly: both samples go everywhere
    keep = np.ones(len(batch), dtype=bool)
    keep[[3, 7]] = False
    np.testing.assert_array_equal(aligned["power_frac"], fs.raw["power_frac"][keep])
