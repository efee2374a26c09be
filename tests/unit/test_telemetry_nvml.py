"""The NVML source against a test double of the ``pynvml`` module (no GPU on CI machines).

``FakeNvml`` below is a TEST DOUBLE: it mimics the slice of nvidia-ml-py's ``pynvml`` API the source uses
(functions, constants, NVMLError with ``.value``, struct-like return objects) and lets a test switch
fields off, make a GPU fall off the bus, or fill the driver's sample buffers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tmb.errors import TmbError
from tmb.telemetry.nvml import NvmlSource
from tmb.telemetry.record import record_async
from tmb.telemetry.replay import read_trace
from tmb.telemetry.sample import FLOAT_FIELDS


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    power_mw: int = 312_345
    instant_power: bool = True
    gpm: bool = True
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False
    flaky: set[str] = field(default_factory=set)
    energy_mj: int = 10_000_000
    util: tuple[int, int] = (87, 41)
    buffer: list[tuple[int, int]] = field(default_factory=list)  # (timestamp us, value)
    processes: list[tuple[int, int | None]] = field(default_factory=lambda: [(4242, 8 << 30)])


class FakeNvml:
    """TEST DOUBLE of the pynvml module."""

    NVMLError = FakeNvmlError
    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0
    NVML_TOTAL_POWER_SAMPLES = 0
    NVML_GPU_UTILIZATION_SAMPLES = 1
    NVML_MEMORY_UTILIZATION_SAMPLES = 2
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_SM_UTIL = 2
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_DFMA_TENSOR_UTIL = 6
    NVML_GPM_METRIC_HMMA_TENSOR_UTIL = 7
    NVML_GPM_METRIC_IMMA_TENSOR_UTIL = 9
    NVML_GPM_METRIC_DRAM_BW_UTIL = 10

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.calls: list[str] = []
        self.shutdown = False
        self.GPM_VALUES = {2: 62.5, 5: 30.0, 6: 0.0, 7: 25.0, 9: 5.0, 10: 55.0}

    def _gpu(self, handle: FakeGpu, what: str) -> FakeGpu:
        self.calls.append(what)
        if handle.lost:
            raise FakeNvmlError(self.NVML_ERROR_GPU_IS_LOST)
        if what in handle.unsupported:
            raise FakeNvmlError(self.NVML_ERROR_NOT_SUPPORTED)
        if what in handle.flaky:
            raise FakeNvmlError(self.NVML_ERROR_TIMEOUT)
        return handle

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return self._gpu(h, "uuid").uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        return self._gpu(h, "name").name

    def nvmlDeviceGetFieldValues(self, h: FakeGpu, ids: list[int]) -> list[Any]:
        g = self._gpu(h, "fields")
        assert ids == [self.NVML_FI_DEV_POWER_INSTANT]
        ret = 0 if g.instant_power else self.NVML_ERROR_NOT_SUPPORTED
        return [SimpleNamespace(nvmlReturn=ret, valueType=1, value=SimpleNamespace(uiVal=g.power_mw + 1))]

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return self._gpu(h, "power").power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        return self._gpu(h, "energy").energy_mj

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        g = self._gpu(h, "util")
        return SimpleNamespace(gpu=g.util[0], memory=g.util[1])

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        self._gpu(h, "memory")
        return SimpleNamespace(used=70 << 30, total=80 << 30, free=10 << 30)

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, which: int) -> int:
        self._gpu(h, "clock_sm" if which == self.NVML_CLOCK_SM else "clock_mem")
        return 1980 if which == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        self._gpu(h, "temperature")
        return 61

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:
        self._gpu(h, "power_limit")
        return 700_000

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[Any]:
        g = self._gpu(h, "processes")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in g.processes]

    def nvmlDeviceGetSamples(self, h: FakeGpu, kind: int, since_us: int) -> tuple[int, list[Any]]:
        g = self._gpu(h, "samples")
        new = [(ts, v) for ts, v in g.buffer if ts > since_us]
        if not new:
            raise FakeNvmlError(self.NVML_ERROR_NOT_FOUND)  # what the driver says when idle
        scale = 1 if kind == self.NVML_TOTAL_POWER_SAMPLES else 1000  # mW for power, percent otherwise
        return 1, [
            SimpleNamespace(timeStamp=ts, sampleValue=SimpleNamespace(uiVal=v // scale)) for ts, v in new
        ]

    def nvmlGpmQueryDeviceSupport(self, h: FakeGpu) -> Any:
        return SimpleNamespace(isSupportedDevice=int(self._gpu(h, "gpm_support").gpm))

    def nvmlGpmSampleAlloc(self) -> Any:
        return SimpleNamespace(taken_from=None)

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        sample.freed = True

    def nvmlGpmSampleGet(self, h: FakeGpu, sample: Any) -> Any:
        sample.taken_from = self._gpu(h, "gpm_sample").uuid
        return sample

    @staticmethod
    def c_nvmlGpmMetricsGet_t() -> Any:
        return SimpleNamespace(
            version=0,
            numMetrics=0,
            sample1=None,
            sample2=None,
            metrics=[SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(16)],
        )

    def nvmlGpmMetricsGet(self, mg: Any) -> Any:
        assert mg.version == 1 and mg.sample1 is not mg.sample2 and mg.sample1.taken_from
        for metric in mg.metrics[: mg.numMetrics]:
            if metric.metricId in self.GPM_VALUES:
                metric.value = self.GPM_VALUES[metric.metricId]
            else:
                metric.nvmlReturn = self.NVML_ERROR_NOT_SUPPORTED
        return mg


H100 = "GPU-11111111-2222-3333-4444-555555555555"
A10 = "GPU-aaaaaaaa-2222-3333-4444-555555555555"


class Wall:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        self.now += 1_000_000
        return self.now


def source(gpus: list[FakeGpu], **kw: Any) -> tuple[NvmlSource, FakeNvml]:
    nv = FakeNvml(gpus)
    kw.setdefault("wall_clock", Wall())
    return NvmlSource(nvml=nv, **kw), nv


def test_hopper_reads_every_field_with_units() -> None:
    src, _ = source([FakeGpu(H100)])
    batch = src.read()
    assert batch.source == "nvml" and not batch.synthetic and batch.power_field == "instant"
    (s,) = batch.to_samples()
    assert s.gpu == H100 and s.power_w == pytest.approx(312.346)  # the instant field, mW -> W
    assert (s.energy_mj, s.gpu_util, s.mem_util) == (10_000_000.0, 87.0, 41.0)
    assert (s.sm_active, s.tensor_active, s.tensor_hmma, s.tensor_imma) == (0.625, 0.30, 0.25, 0.05)
    assert s.tensor_dfma == 0.0 and s.dram_active == 0.55  # supported and zero is a real zero
    assert (s.mem_used_bytes, s.mem_total_bytes) == (float(70 << 30), float(80 << 30))
    assert (s.sm_clock_mhz, s.mem_clock_mhz, s.temp_c, s.power_limit_w) == (1980.0, 2619.0, 61.0, 700.0)
    assert s.processes == ((4242, 8 << 30),)
    meta = src.describe()
    assert meta["supported_fields"] == list(FLOAT_FIELDS) and meta["driver_version"] == "550.54.15"
    assert meta["devices"][0]["name"] == "NVIDIA H100 80GB HBM3" and not src.findings


def test_unsupported_fields_are_absent_never_zero() -> None:
    old = FakeGpu(
        A10, name="NVIDIA A10", instant_power=False, gpm=False, unsupported={"temperature", "energy"}
    )
    src, nv = source([old])
    batch = src.read()
    assert batch.power_field == "average" and batch.power_w[0] == pytest.approx(312.345)
    for name in ("temp_c", "energy_mj", "sm_active", "tensor_active", "dram_active"):
        assert np.isnan(batch.column(name)[0]), name
    assert batch.to_samples()[0].temp_c is None
    assert "temp_c" not in src.describe()["supported_fields"]
    nv.calls.clear()
    src.read()
    assert "temperature" not in nv.calls and "energy" not in nv.calls  # refused once, never asked again
    assert not src.findings


def test_processes_with_unknown_memory() -> None:
    src, _ = source([FakeGpu(H100, processes=[(9, None), (3, 1024)])])
    assert src.read().processes[0] == ((3, 1024), (9, None))


def test_gpu_lost_is_a_finding_and_others_go_on() -> None:
    lost, alive = FakeGpu(H100), FakeGpu(A10)
    src, nv = source([lost, alive])
    assert len(src.read()) == 2
    lost.lost = True
    batch = src.read()
    assert batch.gpus == (A10,) and len(batch) == 1
    (finding,) = src.findings
    assert finding.id == "telemetry.gpu_lost" and finding.context["gpu"] == H100
    assert finding.context["nvml_error"] == FakeNvml.NVML_ERROR_GPU_IS_LOST
    nv.calls.clear()
    src.read()
    assert len(nv.calls) > 0 and len(src.findings) == 1  # the lost GPU is not polled again
    assert src.describe()["devices"][0]["lost"] is True


def test_gpu_lost_at_start_up() -> None:
    src, _ = source([FakeGpu(H100, lost=True), FakeGpu(A10)])
    assert [f.id for f in src.findings] == ["telemetry.gpu_unavailable"]
    assert src.read().gpus == (A10,)


def test_transient_read_error_is_absent_and_warned_once() -> None:
    gpu = FakeGpu(H100)
    src, _ = source([gpu])
    gpu.flaky = {"util"}
    first, second = src.read(), src.read()
    assert np.isnan(first.gpu_util[0]) and np.isnan(second.gpu_util[0]) and first.power_w[0] > 0
    assert [f.id for f in src.findings] == ["telemetry.nvml_read_error"]
    gpu.flaky = set()
    assert src.read().gpu_util[0] == 87.0


def test_sample_buffers_not_found_when_idle_then_timestamped_samples() -> None:
    gpu = FakeGpu(H100)
    src, _ = source([gpu], buffers=True)
    assert len(src.read()) == 1 and not src.findings  # NOT_FOUND: no new buffered samples, no finding
    base = src.gpus[0].buffer_ts["power_w"]
    gpu.buffer = [(base - 5, 111_000), (base + 10, 250_000), (base + 20, 260_000)]
    batch = src.read()
    buffered = [s for s in batch.to_samples() if s.energy_mj is None]
    assert [s.t_ns for s in buffered] == [(base + 10) * 1000, (base + 20) * 1000]
    assert buffered[0].power_w == 250.0 and buffered[0].gpu_util == 250.0 and buffered[0].temp_c is None
    assert len(src.read()) == 1  # already seen: not repeated


def test_init_failure_is_a_clear_error() -> None:
    with pytest.raises(TmbError, match="NVML could not be initialised") as info:
        NvmlSource(nvml=FakeNvml([], init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert "synthetic" in info.value.diagnostics()


def test_close_frees_gpm_and_shuts_down() -> None:
    src, nv = source([FakeGpu(H100)])
    samples = list(src.gpus[0].gpm_samples)
    src.close()
    assert nv.shutdown and all(getattr(s, "freed", False) for s in samples)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)
        await asyncio.sleep(0)


async def _direct(poll: Any) -> Any:
    return poll()


async def test_batches_dedup_and_record(tmp_path: Path) -> None:
    clock = FakeClock()
    gpu = FakeGpu(H100)
    src, _ = source(
        [gpu],
        rate_hz=20.0,
        clock=clock,
        sleep=clock.sleep,
        run_blocking=_direct,
        wall_clock=lambda: 10**18 + clock.now,
    )
    trace = await record_async(src, 2.0, tmp_path / "h100.trace", interval_s=1.0, workload={"model": "m"})
    # Every reading is identical (a static fake GPU): dedup keeps one a second (heartbeat) per GPU.
    assert len(trace.batch) == 2 and int(np.diff(trace.batch.t_ns)[0]) == 1_000_000_000
    assert src.sampler.stats.deduplicated >= 38  # the background sampler may have run ahead a little
    back = read_trace(tmp_path / "h100.trace")
    assert back.batch == trace.batch and back.meta["synthetic"] is False
    assert back.meta["driver_version"] == "550.54.15" and back.meta["workload"] == {"model": "m"}
    assert back.meta["supported_fields"] == list(FLOAT_FIELDS) and back.meta["gpu_name"].startswith(
        "NVIDIA H100"
    )
    assert back.meta["sampler"]["ticks"] >= 40 and back.meta["sampler"]["missed"] == 0


def test_gpm_metric_refused_on_first_poll_is_dropped() -> None:
    src, nv = source([FakeGpu(H100)])
    del nv.GPM_VALUES[FakeNvml.NVML_GPM_METRIC_DFMA_TENSOR_UTIL]
    first, second = src.read(), src.read()
    assert np.isnan(first.tensor_dfma[0]) and np.isnan(second.tensor_dfma[0]) and second.sm_active[0] == 0.625
    claimed = src.describe()["supported_fields"]
    assert "tensor_dfma" not in claimed and "tensor_imma" in claimed
