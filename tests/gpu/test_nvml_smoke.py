"""On a machine with an NVIDIA GPU: every field the NVML source claims agrees with direct driver calls.

Skips (with the reason) where ``pynvml.nvmlInit()`` fails, i.e. on machines without a GPU and driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pynvml: Any = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")


def _driver_reason() -> str | None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"no NVIDIA driver/GPU here: nvmlInit failed ({exc})"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return "NVML initialised but reports no GPU"
    finally:
        pynvml.nvmlShutdown()
    return None


REASON = _driver_reason()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)

from tmb.telemetry.nvml import NvmlSource  # noqa: E402
from tmb.telemetry.sample import FLOAT_FIELDS  # noqa: E402


@pytest.fixture
def src() -> Iterator[NvmlSource]:
    source = NvmlSource(rate_hz=20.0)
    pynvml.nvmlInit()  # NVML reference-counts init/shutdown: our own handle for the direct calls
    try:
        yield source
    finally:
        source.close()
        pynvml.nvmlShutdown()


def _direct(handle: Any, field: str) -> float:
    """The driver's own reading for ``field``, in the source's units."""
    if field == "power_w":
        return float(pynvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0
    if field == "energy_mj":
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    if field in ("gpu_util", "mem_util"):
        u = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return float(u.gpu if field == "gpu_util" else u.memory)
    if field in ("mem_used_bytes", "mem_total_bytes"):
        m = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return float(m.used if field == "mem_used_bytes" else m.total)
    if field == "sm_clock_mhz":
        return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    if field == "mem_clock_mhz":
        return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
    if field == "temp_c":
        return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    if field == "power_limit_w":
        return float(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)) / 1000.0
    raise KeyError(field)


# Absolute tolerances for readings that move between two calls a few ms apart.
TOLERANCE = {
    "power_w": 150.0,
    "energy_mj": 5_000.0,
    "gpu_util": 100.0,
    "mem_util": 100.0,
    "mem_used_bytes": 512 * 2**20,
    "mem_total_bytes": 0.0,
    "sm_clock_mhz": 2000.0,
    "mem_clock_mhz": 100.0,
    "temp_c": 3.0,
    "power_limit_w": 0.0,
}
GPM = ("sm_active", "tensor_active", "tensor_hmma", "tensor_imma", "tensor_dfma", "dram_active")


def test_claimed_fields_match_direct_driver_calls(src: NvmlSource) -> None:
    batch = src.read()
    meta = src.describe()
    assert batch.source == "nvml" and not batch.synthetic and meta["driver_version"]
    assert batch.power_field in ("instant", "average")
    for device in meta["devices"]:
        handle = pynvml.nvmlDeviceGetHandleByUUID(device["uuid"])
        (sample,) = batch.for_gpu(device["uuid"]).to_samples()
        claimed = device["supported_fields"]
        assert {"power_w", "mem_total_bytes", "power_limit_w"} <= set(claimed), claimed
        for field in FLOAT_FIELDS:
            value = getattr(sample, field)
            if field not in claimed:
                assert value is None, f"{field} not claimed but recorded"
                continue
            assert value is not None and np.isfinite(value), field
            if field in GPM:
                assert 0.0 <= value <= 1.0, (field, value)
                continue
            direct = _direct(handle, field)
            assert abs(value - direct) <= TOLERANCE[field], (field, value, direct)
        name = pynvml.nvmlDeviceGetName(handle)
        assert device["name"] == (name.decode() if isinstance(name, bytes) else name)


def test_power_field_matches_driver_capability(src: NvmlSource) -> None:
    for device in src.describe()["devices"]:
        handle = pynvml.nvmlDeviceGetHandleByUUID(device["uuid"])
        (fv,) = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        expected = "instant" if fv.nvmlReturn == pynvml.NVML_SUCCESS else "average"
        assert device["power_field"] == expected


def test_gpm_claimed_only_where_supported(src: NvmlSource) -> None:
    for device in src.describe()["devices"]:
        handle = pynvml.nvmlDeviceGetHandleByUUID(device["uuid"])
        try:
            supported = bool(pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except pynvml.NVMLError:
            supported = False
        if not supported:
            assert not set(GPM) & set(device["supported_fields"])


def test_sampler_runs_at_rate_on_the_real_driver(src: NvmlSource) -> None:
    async def two_batches() -> list[int]:
        sizes = []
        stream = src.batches(0.5)
        async for batch in stream:
            sizes.append(len(batch))
            if len(sizes) == 2:
                break
        await stream.aclose()
        return sizes

    sizes = asyncio.run(two_batches())
    assert all(size >= 1 for size in sizes) and src.sampler.stats.ticks >= 15
    assert not [f for f in src.findings if f.id == "telemetry.gpu_lost"]
