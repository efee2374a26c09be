"""The NVML telemetry source (the ``pynvml`` module of ``nvidia-ml-py``).

Per GPU, keyed by UUID, each poll reads: power (``NVML_FI_DEV_POWER_INSTANT`` via
``nvmlDeviceGetFieldValues`` where the driver has it, else ``nvmlDeviceGetPowerUsage``, a ~1 s average on
recent GPUs; the batch's ``power_field`` says which), the total energy counter, GPU/memory utilisation,
memory used/total, SM and memory clocks, temperature, the enforced power limit, the compute processes, and
on Hopper and newer the GPM metrics between consecutive polls (SM activity, any/HMMA/IMMA/DFMA tensor
activity, DRAM bandwidth). Optionally (``buffers=True``) the driver's own sample buffers
(``nvmlDeviceGetSamples``: power, GPU and memory utilisation, with the driver's timestamps) are added as
extra sparse samples. Unit conversions: mW -> W, percent -> fraction for GPM only.

A getter the driver refuses at start-up (NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND, ...) is never
called again and its fields stay absent (NaN), never zero. A GPU that falls off the bus (GPU_IS_LOST,
GPU_NOT_FOUND, RESET_REQUIRED) becomes a ``telemetry.gpu_lost`` finding and is not polled again; the
other GPUs go on.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tmb.errors import Finding, Severity, TmbError
from tmb.telemetry.sample import FLOAT_FIELDS, PowerField, Process, Sample, SampleBatch
from tmb.telemetry.source import Clock, RunBlocking, Sampler, Sleep, _to_thread, sampled_batches

_LOST = ("NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_GPU_NOT_FOUND", "NVML_ERROR_RESET_REQUIRED")
_UNSUPPORTED = (
    "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_NO_PERMISSION",
    "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NVML_ERROR_INVALID_ARGUMENT",
    "NVML_ERROR_NOT_FOUND",
)
_VALUE_ATTR = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
# Sample field <- GPM metric constant name (values are percent, stored as fractions).
_GPM_METRICS = (
    ("sm_active", "NVML_GPM_METRIC_SM_UTIL"),
    ("tensor_active", "NVML_GPM_METRIC_ANY_TENSOR_UTIL"),
    ("tensor_hmma", "NVML_GPM_METRIC_HMMA_TENSOR_UTIL"),
    ("tensor_imma", "NVML_GPM_METRIC_IMMA_TENSOR_UTIL"),
    ("tensor_dfma", "NVML_GPM_METRIC_DFMA_TENSOR_UTIL"),
    ("dram_active", "NVML_GPM_METRIC_DRAM_BW_UTIL"),
)
_BUFFERS = (
    ("power_w", "NVML_TOTAL_POWER_SAMPLES", 1e-3),
    ("gpu_util", "NVML_GPU_UTILIZATION_SAMPLES", 1.0),
    ("mem_util", "NVML_MEMORY_UTILIZATION_SAMPLES", 1.0),
)


class _GpuLost(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class _Gpu:
    index: int
    handle: Any
    uuid: str
    name: str
    getters: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    power_field: PowerField = "none"
    gpm_samples: list[Any] = field(default_factory=list)
    gpm_ids: dict[str, int] = field(default_factory=dict)
    gpm_pending: bool = False
    buffer_ts: dict[str, int] = field(default_factory=dict)
    lost: bool = False

    def supported_fields(self) -> list[str]:
        names: set[str] = set(self.gpm_ids) if "gpm" in self.getters else set()
        for getter in self.getters.values():
            names.update(getattr(getter, "fields", ()))
        return [f for f in FLOAT_FIELDS if f in names]


def _fields(*names: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    def tag(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        fn.fields = names  # type: ignore[attr-defined]
        return fn

    return tag


class NvmlSource:
    """Telemetry of every (or the selected) NVIDIA GPU through NVML; see the module docstring.

    ``nvml`` is the ``pynvml`` module (tests inject a double); ``wall_clock`` stamps samples (ns since
    the epoch); ``clock``/``sleep``/``run_blocking`` drive the :class:`~tmb.telemetry.source.Sampler`.
    """

    kind = "nvml"

    def __init__(
        self,
        *,
        rate_hz: float = 20.0,
        dedup: bool = True,
        heartbeat_s: float = 1.0,
        buffers: bool = False,
        gpus: Sequence[str] | None = None,
        nvml: Any | None = None,
        wall_clock: Clock = time.time_ns,
        clock: Clock = time.monotonic_ns,
        sleep: Sleep | None = None,
        run_blocking: RunBlocking = _to_thread,
    ) -> None:
        try:
            self._nv = nvml if nvml is not None else importlib.import_module("pynvml")
            self._nv.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError (no driver, no library), OSError
            raise TmbError(
                "NVML could not be initialised",
                hint="no NVIDIA driver here? use the synthetic or replay telemetry source",
                error=f"{type(exc).__name__}: {exc}",
            ) from None
        self._err: type[Exception] = self._nv.NVMLError
        self._lost_codes = {getattr(self._nv, n) for n in _LOST if hasattr(self._nv, n)}
        self._unsupported_codes = {getattr(self._nv, n) for n in _UNSUPPORTED if hasattr(self._nv, n)}
        self._not_found = getattr(self._nv, "NVML_ERROR_NOT_FOUND", 6)
        self._wall = wall_clock
        self._buffers = buffers
        self._findings: list[Finding] = []
        self._warned: set[tuple[str, str, int]] = set()
        self.rate_hz = rate_hz
        self.driver_version = self._text(self._safe(self._nv.nvmlSystemGetDriverVersion))
        self.gpus: list[_Gpu] = []
        for index in range(int(self._nv.nvmlDeviceGetCount())):
            gpu = self._open(index)
            if gpu is not None and (gpus is None or gpu.uuid in gpus):
                self.gpus.append(gpu)
        extra = {"sleep": sleep} if sleep is not None else {}
        self.sampler = Sampler(
            self.poll,
            rate_hz=rate_hz,
            dedup=dedup,
            heartbeat_s=heartbeat_s,
            clock=clock,
            run_blocking=run_blocking,
            **extra,
        )

    # -- setup -------------------------------------------------------------------------------------------

    @staticmethod
    def _text(value: Any) -> str | None:
        return value.decode() if isinstance(value, bytes) else None if value is None else str(value)

    def _safe(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._err:
            return None

    def _lost(self, gpu: _Gpu, exc: _GpuLost | Exception, during: str) -> None:
        gpu.lost = True
        code = exc.code if isinstance(exc, _GpuLost) else getattr(exc, "value", None)
        self._findings.append(
            Finding(
                "telemetry.gpu_lost",
                f"GPU {gpu.uuid} stopped answering NVML ({exc}); no more samples from it",
                Severity.ERROR,
                {
                    "gpu": gpu.uuid,
                    "index": gpu.index,
                    "nvml_error": code,
                    "during": during,
                    "t_ns": self._wall(),
                },
            )
        )

    def _open(self, index: int) -> _Gpu | None:
        nv = self._nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = self._text(nv.nvmlDeviceGetUUID(handle)) or f"index-{index}"
        except self._err as exc:
            self._findings.append(
                Finding(
                    "telemetry.gpu_unavailable",
                    f"GPU {index} could not be opened: {exc}",
                    Severity.ERROR,
                    {"index": index, "nvml_error": getattr(exc, "value", None)},
                )
            )
            return None
        gpu = _Gpu(index, handle, uuid, self._text(self._safe(nv.nvmlDeviceGetName, handle)) or "unknown")
        try:
            self._probe(gpu)
        except _GpuLost as exc:
            self._lost(gpu, exc, "probe")
        return gpu

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._err as exc:
            code = getattr(exc, "value", None)
            if code in self._lost_codes:
                raise _GpuLost(int(code or 0), str(exc)) from None
            raise

    def _probe(self, gpu: _Gpu) -> None:
        """Find the getters the driver answers for this GPU; the rest are never called again."""
        nv, h = self._nv, gpu.handle
        candidates: dict[str, Callable[[], dict[str, Any]]] = {}

        @_fields("power_w")
        def power_instant() -> dict[str, Any]:
            (fv,) = self._call(nv.nvmlDeviceGetFieldValues, h, [nv.NVML_FI_DEV_POWER_INSTANT])
            if fv.nvmlReturn != 0:
                raise nv.NVMLError(fv.nvmlReturn)
            return {"power_w": getattr(fv.value, _VALUE_ATTR.get(fv.valueType, "uiVal")) / 1000.0}

        @_fields("power_w")
        def power_average() -> dict[str, Any]:
            return {"power_w": self._call(nv.nvmlDeviceGetPowerUsage, h) / 1000.0}

        @_fields("energy_mj")
        def energy() -> dict[str, Any]:
            return {"energy_mj": float(self._call(nv.nvmlDeviceGetTotalEnergyConsumption, h))}

        @_fields("gpu_util", "mem_util")
        def util() -> dict[str, Any]:
            u = self._call(nv.nvmlDeviceGetUtilizationRates, h)
            return {"gpu_util": float(u.gpu), "mem_util": float(u.memory)}

        @_fields("mem_used_bytes", "mem_total_bytes")
        def memory() -> dict[str, Any]:
            m = self._call(nv.nvmlDeviceGetMemoryInfo, h)
            return {"mem_used_bytes": float(m.used), "mem_total_bytes": float(m.total)}

        @_fields("sm_clock_mhz")
        def sm_clock() -> dict[str, Any]:
            return {"sm_clock_mhz": float(self._call(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM))}

        @_fields("mem_clock_mhz")
        def mem_clock() -> dict[str, Any]:
            return {"mem_clock_mhz": float(self._call(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM))}

        @_fields("temp_c")
        def temperature() -> dict[str, Any]:
            return {"temp_c": float(self._call(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU))}

        @_fields("power_limit_w")
        def power_limit() -> dict[str, Any]:
            return {"power_limit_w": self._call(nv.nvmlDeviceGetEnforcedPowerLimit, h) / 1000.0}

        @_fields()
        def processes() -> dict[str, Any]:
            procs = self._call(nv.nvmlDeviceGetComputeRunningProcesses, h)
            rows: list[Process] = [
                (int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in procs
            ]
            return {"processes": tuple(sorted(rows, key=lambda r: r[0]))}

        candidates = {
            "power_instant": power_instant,
            "power_average": power_average,
            "energy": energy,
            "util": util,
            "memory": memory,
            "sm_clock": sm_clock,
            "mem_clock": mem_clock,
            "temperature": temperature,
            "power_limit": power_limit,
            "processes": processes,
        }
        for name, getter in candidates.items():
            if name == "power_average" and "power_instant" in gpu.getters:
                continue
            try:
                getter()
            except self._err as exc:
                if getattr(exc, "value", None) not in self._unsupported_codes:
                    self._warn(gpu, name, exc)
                continue
            except (AttributeError, TypeError):
                continue  # an older pynvml without the constant or function
            gpu.getters[name] = getter
        gpu.power_field = (
            "instant"
            if "power_instant" in gpu.getters
            else "average"
            if "power_average" in gpu.getters
            else "none"
        )
        self._probe_gpm(gpu)
        if self._buffers:
            now_us = self._wall() // 1000
            gpu.buffer_ts = {name: now_us for name, const, _ in _BUFFERS if hasattr(nv, const)}

    def _probe_gpm(self, gpu: _Gpu) -> None:
        nv = self._nv
        try:
            if not self._call(nv.nvmlGpmQueryDeviceSupport, gpu.handle).isSupportedDevice:
                return
            samples = [self._call(nv.nvmlGpmSampleAlloc), self._call(nv.nvmlGpmSampleAlloc)]
            self._call(nv.nvmlGpmSampleGet, gpu.handle, samples[0])
        except (self._err, AttributeError):
            return
        gpu.gpm_samples = samples
        gpu.gpm_ids = {f: getattr(nv, const) for f, const in _GPM_METRICS if hasattr(nv, const)}
        gpu.gpm_pending = True  # metrics the first real poll refuses are dropped then

        def gpm() -> dict[str, Any]:
            return self._gpm(gpu)

        gpu.getters["gpm"] = gpm

    def _gpm(self, gpu: _Gpu) -> dict[str, Any]:
        """GPM metrics between the previous poll and now (percent -> fraction)."""
        if not gpu.gpm_ids:
            return {}
        nv = self._nv
        prev, cur = gpu.gpm_samples
        self._call(nv.nvmlGpmSampleGet, gpu.handle, cur)
        gpu.gpm_samples = [cur, prev]
        mg = nv.c_nvmlGpmMetricsGet_t()
        mg.version = nv.NVML_GPM_METRICS_GET_VERSION
        mg.numMetrics = len(gpu.gpm_ids)
        mg.sample1, mg.sample2 = prev, cur
        for i, mid in enumerate(gpu.gpm_ids.values()):
            mg.metrics[i].metricId = mid
        try:
            self._call(nv.nvmlGpmMetricsGet, mg)
        except self._err:
            if gpu.gpm_pending:
                gpu.gpm_ids = {}  # refused outright on the first poll: no GPM on this GPU
            raise
        out: dict[str, Any] = {}
        for i, name in enumerate(gpu.gpm_ids):
            metric = mg.metrics[i]
            if metric.nvmlReturn == 0:
                out[name] = float(metric.value) / 100.0
        if gpu.gpm_pending:
            gpu.gpm_ids = {f: mid for f, mid in gpu.gpm_ids.items() if f in out}
            gpu.gpm_pending = False
        return out

    def _warn(self, gpu: _Gpu, what: str, exc: Exception) -> None:
        code = int(getattr(exc, "value", -1) or -1)
        if (gpu.uuid, what, code) in self._warned:
            return
        self._warned.add((gpu.uuid, what, code))
        self._findings.append(
            Finding(
                "telemetry.nvml_read_error",
                f"NVML {what} failed on GPU {gpu.uuid}: {exc}; recorded absent",
                Severity.WARNING,
                {"gpu": gpu.uuid, "reading": what, "nvml_error": code},
            )
        )

    # -- polling -----------------------------------------------------------------------------------------

    def poll(self) -> list[Sample]:
        """One reading of every GPU still present (blocking: run it in a thread), plus buffered samples."""
        out: list[Sample] = []
        for gpu in self.gpus:
            if gpu.lost:
                continue
            try:
                t_ns = self._wall()
                values: dict[str, Any] = {}
                for name, getter in gpu.getters.items():
                    try:
                        values.update(getter())
                    except self._err as exc:
                        self._warn(gpu, name, exc)
                out.append(Sample(t_ns=t_ns, gpu=gpu.uuid, **values))
                if gpu.buffer_ts:
                    out.extend(self._buffered(gpu))
            except _GpuLost as exc:
                self._lost(gpu, exc, "poll")
        return out

    def _buffered(self, gpu: _Gpu) -> list[Sample]:
        """New entries of the driver's sample buffers since the last poll (NOT_FOUND: none yet)."""
        nv = self._nv
        rows: dict[int, dict[str, Any]] = {}
        for name, const, scale in _BUFFERS:
            if name not in gpu.buffer_ts:
                continue
            try:
                vtype, samples = self._call(
                    nv.nvmlDeviceGetSamples, gpu.handle, getattr(nv, const), gpu.buffer_ts[name]
                )
            except self._err as exc:
                if getattr(exc, "value", None) != self._not_found:  # NOT_FOUND: nothing new (idle GPU)
                    self._warn(gpu, f"samples:{name}", exc)
                continue
            attr = _VALUE_ATTR.get(vtype, "uiVal")
            for s in samples:
                if s.timeStamp > gpu.buffer_ts[name]:
                    rows.setdefault(int(s.timeStamp), {})[name] = float(getattr(s.sampleValue, attr)) * scale
                    gpu.buffer_ts[name] = int(s.timeStamp)
        return [Sample(t_ns=ts * 1000, gpu=gpu.uuid, **vals) for ts, vals in sorted(rows.items())]

    def _power_field(self) -> PowerField:
        kinds = {g.power_field for g in self.gpus if not g.lost}
        if kinds == {"instant"}:
            return "instant"
        return "average" if "average" in kinds or "instant" in kinds else "none"

    def build(self, samples: list[Sample]) -> SampleBatch:
        """A batch of NVML samples (``power_field`` the weakest of the GPUs')."""
        return SampleBatch.from_samples(
            samples, source="nvml", synthetic=False, power_field=self._power_field()
        )

    def read(self) -> SampleBatch:
        """One poll as a batch (blocking)."""
        return self.build(self.poll())

    def batches(self, interval_s: float = 1.0) -> AsyncGenerator[SampleBatch, None]:
        """Sample at ``rate_hz`` in the background; a batch every ``interval_s``."""
        return sampled_batches(self.sampler, self.build, interval_s)

    @property
    def findings(self) -> list[Finding]:
        return list(self._findings)

    def describe(self) -> dict[str, Any]:
        """Trace metadata: GPU names, driver version, supported fields and power field per GPU, rates."""
        return {
            "source": "nvml",
            "synthetic": False,
            "driver_version": self.driver_version,
            "gpu_name": self.gpus[0].name if self.gpus else None,
            "devices": [
                {
                    "uuid": g.uuid,
                    "name": g.name,
                    "index": g.index,
                    "power_field": g.power_field,
                    "supported_fields": g.supported_fields(),
                    "lost": g.lost,
                }
                for g in self.gpus
            ],
            "supported_fields": [
                f for f in FLOAT_FIELDS if any(f in g.supported_fields() for g in self.gpus)
            ],
            "power_field": self._power_field(),
            "rate_hz": self.rate_hz,
            "sampler": vars(self.sampler.stats).copy(),
        }

    def close(self) -> None:
        """Free GPM samples and shut NVML down (errors ignored: the GPU may be gone)."""
        for gpu in self.gpus:
            for s in gpu.gpm_samples:
                self._safe(self._nv.nvmlGpmSampleFree, s)
            gpu.gpm_samples = []
        self._safe(self._nv.nvmlShutdown)
