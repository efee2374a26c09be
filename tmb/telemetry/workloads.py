"""Parameterised GPU workload models for the synthetic telemetry source.

Every level is a fraction of its scale: ``power_frac`` of the enforced power limit, ``gpu_util``/``mem_util``
of 100 %, GPM activities of 1. Numbers are plausible shapes for vLLM-style serving (memory-bound decode,
compute-bound prefill, near-100 % NVML utilisation whenever a request is in flight), chosen so that variants
of one model differ by a few percent of the power limit and by tensor-activity level and shape: not
separable on one sample, separable over tens of seconds. They are *not* measurements; recorded NVML traces
(``tmb telemetry record --source nvml``) replace them where a GPU is available.

:class:`RunShift` is what moves between recording sessions of one workload (day, node, temperature); the
synthetic generator applies one per run when asked (``simulate(..., shift=...)``), never by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

from tmb.errors import InputError

GIB: Final = 1 << 30
MIB: Final = 1 << 20


@dataclass(frozen=True)
class Levels:
    """Mean (or noise standard deviation of) each channel in one phase, as fractions of its scale."""

    power_frac: float
    gpu_util: float
    mem_util: float
    sm_active: float
    tensor_active: float
    dram_active: float

    def as_tuple(self) -> tuple[float, float, float, float, float, float]:
        return (
            self.power_frac,
            self.gpu_util,
            self.mem_util,
            self.sm_active,
            self.tensor_active,
            self.dram_active,
        )


CHANNELS: Final = ("power_frac", "gpu_util", "mem_util", "sm_active", "tensor_active", "dram_active")


@dataclass(frozen=True)
class WorkloadModel:
    """One (model, precision, GPU) pair served by an inference engine.

    Phases: ``idle`` (process resident, no request), ``prefill`` (prompt processing, compute bound),
    ``decode`` (token generation, memory bound); decode levels interpolate between ``decode_single`` (one
    sequence) and ``decode_batched`` (``max_batch`` sequences) with the number of running sequences.
    ``noise`` is the stationary standard deviation of the AR(1) noise with correlation time ``tau_s``.
    ``tensor_dip`` is the probability that a decode sample's tensor activity halves (kernel mix: dequantise,
    sampling, attention), which makes its distribution bimodal; ``tensor_split`` shares ``tensor_active``
    between the HMMA, IMMA and DFMA pipes. ``gpm`` False means the GPU has no GPM (pre-Hopper): SM, tensor
    and DRAM activity are absent from its samples.

    Device memory: the ``idle``/``single``/``batched`` regimes report ``mem_used_bytes`` flat (as they always
    have). Load sweeps (``simulate(..., "sweep", load_schedule=...)``) report ``mem_static_bytes`` (None: the
    same ``mem_used_bytes``) plus ``mem_per_request_bytes`` per running sequence: nearly deterministic for a
    (model, precision, engine, config), growing slightly with the batch, and lower for quantised weights
    even though the engine preallocates its KV cache.
    """

    name: str
    model: str
    precision: str
    gpu_type: str
    gpu_name: str
    power_limit_w: float
    idle: Levels
    prefill: Levels
    decode_single: Levels
    decode_batched: Levels
    noise: Levels
    tensor_split: tuple[float, float, float] = (1.0, 0.0, 0.0)
    tensor_dip: float = 0.05
    tau_s: float = 0.3
    tokens_per_s_single: float = 250.0
    tokens_per_s_batched: float = 3000.0
    prefill_tokens_per_s: float = 20000.0
    max_batch: int = 32
    gpm: bool = True
    mem_total_bytes: int = 80 * GIB
    mem_used_bytes: int = 72 * GIB
    sm_clock_idle_mhz: float = 345.0
    sm_clock_max_mhz: float = 1980.0
    mem_clock_mhz: float = 2619.0
    temp_idle_c: float = 33.0
    temp_rise_c: float = 45.0
    engine: str = "vllm"
    mem_static_bytes: int | None = None
    mem_per_request_bytes: int = 3 * MIB

    @property
    def sweep_mem_bytes(self) -> int:
        """Device memory in use with no sequence running, in the load-sweep path."""
        return self.mem_used_bytes if self.mem_static_bytes is None else self.mem_static_bytes


@dataclass(frozen=True)
class RunShift:
    """What moves between recording sessions of one workload on one kind of GPU.

    ``power_frac`` is added to the mean power of every phase (fraction of the power limit), after ``gain``
    has scaled the part above idle; ``util`` is added to the utilisation and activity means of busy samples;
    ``mem_used_bytes`` to device memory in use; ``temp_c`` to the temperature. Draw one per run with
    :func:`tmb.telemetry.synthetic_corpus.run_shift`; ``RunShift()`` changes nothing.
    """

    power_frac: float = 0.0
    util: float = 0.0
    mem_used_bytes: int = 0
    temp_c: float = 0.0
    gain: float = 1.0

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.power_frac, self.util, self.temp_c, self.gain)):
            raise InputError("run shift values must be finite", shift=repr(self))
        if not (0.5 <= self.gain <= 2.0 and abs(self.power_frac) <= 0.5 and abs(self.util) <= 0.5):
            raise InputError("run shift out of range (gain 0.5-2, power and util offsets within 0.5)")
        if abs(self.mem_used_bytes) > 8 * GIB or abs(self.temp_c) > 40.0:
            raise InputError("run shift out of range (memory within 8 GiB, temperature within 40 C)")

    def to_dict(self) -> dict[str, float | int]:
        return {
            "power_frac": self.power_frac,
            "util": self.util,
            "mem_used_bytes": self.mem_used_bytes,
            "temp_c": self.temp_c,
            "gain": self.gain,
        }


_IDLE_H100 = Levels(0.100, 0.0, 0.0, 0.0, 0.0, 0.0)
_NOISE = Levels(0.022, 0.025, 0.04, 0.045, 0.03, 0.045)

_LLAMA_1B_BF16_H100 = WorkloadModel(
    name="llama-1b/bf16/h100",
    model="llama-1b",
    precision="bf16",
    gpu_type="h100",
    gpu_name="NVIDIA H100 80GB HBM3",
    power_limit_w=700.0,
    idle=_IDLE_H100,
    prefill=Levels(0.62, 1.0, 0.35, 0.90, 0.55, 0.35),
    decode_single=Levels(0.30, 0.96, 0.45, 0.42, 0.10, 0.50),
    decode_batched=Levels(0.50, 0.99, 0.60, 0.72, 0.30, 0.62),
    noise=_NOISE,
    tensor_dip=0.06,
    tokens_per_s_single=260.0,
    tokens_per_s_batched=3200.0,
)

MODELS: Final[dict[str, WorkloadModel]] = {
    m.name: m
    for m in (
        _LLAMA_1B_BF16_H100,
        # W8A8: half the weight bytes (less DRAM), IMMA GEMMs with fp16 attention, dequantise kernels
        # interleaved (bimodal tensor activity), a few percent less power.
        replace(
            _LLAMA_1B_BF16_H100,
            name="llama-1b/int8/h100",
            precision="int8",
            prefill=Levels(0.59, 1.0, 0.30, 0.88, 0.45, 0.30),
            decode_single=Levels(0.27, 0.96, 0.36, 0.40, 0.08, 0.38),
            decode_batched=Levels(0.46, 0.99, 0.50, 0.70, 0.22, 0.50),
            tensor_split=(0.3, 0.7, 0.0),
            tensor_dip=0.30,
            tokens_per_s_single=330.0,
            tokens_per_s_batched=3800.0,
            # bf16 embeddings (0.5 GiB) kept, the other ~1 B parameters at one byte: ~0.9 GiB less.
            mem_static_bytes=72 * GIB - 920 * MIB,
        ),
        # FP8 (Hopper transformer engine): GEMMs on the HMMA pipe at lower activity, slightly less power.
        replace(
            _LLAMA_1B_BF16_H100,
            name="llama-1b/fp8/h100",
            precision="fp8",
            prefill=Levels(0.60, 1.0, 0.32, 0.89, 0.50, 0.32),
            decode_single=Levels(0.28, 0.96, 0.39, 0.41, 0.09, 0.40),
            decode_batched=Levels(0.47, 0.99, 0.53, 0.71, 0.26, 0.54),
            tensor_dip=0.15,
            tokens_per_s_single=310.0,
            tokens_per_s_batched=3600.0,
            mem_static_bytes=72 * GIB - 880 * MIB,
        ),
        replace(
            _LLAMA_1B_BF16_H100,
            name="llama-3b/bf16/h100",
            model="llama-3b",
            prefill=Levels(0.68, 1.0, 0.40, 0.93, 0.62, 0.40),
            decode_single=Levels(0.35, 0.97, 0.55, 0.48, 0.13, 0.58),
            decode_batched=Levels(0.56, 0.99, 0.68, 0.78, 0.35, 0.70),
            tokens_per_s_single=150.0,
            tokens_per_s_batched=2000.0,
            prefill_tokens_per_s=9000.0,
            mem_per_request_bytes=5 * MIB,
        ),
        # Launch-bound: the GPU waits for the host between small kernels, so even NVML utilisation drops.
        replace(
            _LLAMA_1B_BF16_H100,
            name="tiny-160m/bf16/h100",
            model="tiny-160m",
            prefill=Levels(0.42, 0.97, 0.20, 0.60, 0.30, 0.20),
            decode_single=Levels(0.20, 0.72, 0.20, 0.22, 0.04, 0.22),
            decode_batched=Levels(0.33, 0.90, 0.35, 0.45, 0.15, 0.38),
            noise=Levels(0.02, 0.06, 0.04, 0.045, 0.025, 0.045),
            tokens_per_s_single=600.0,
            tokens_per_s_batched=9000.0,
            prefill_tokens_per_s=60000.0,
            mem_used_bytes=70 * GIB,
            mem_per_request_bytes=1 * MIB,
        ),
        # A100 SXM4 80 GB: 400 W limit, higher idle share, runs closer to its limit; no GPM (pre-Hopper).
        replace(
            _LLAMA_1B_BF16_H100,
            name="llama-1b/bf16/a100",
            gpu_type="a100",
            gpu_name="NVIDIA A100-SXM4-80GB",
            power_limit_w=400.0,
            idle=Levels(0.14, 0.0, 0.0, 0.0, 0.0, 0.0),
            prefill=Levels(0.74, 1.0, 0.42, 0.92, 0.62, 0.42),
            decode_single=Levels(0.40, 0.97, 0.55, 0.48, 0.14, 0.60),
            decode_batched=Levels(0.62, 0.99, 0.70, 0.80, 0.38, 0.72),
            gpm=False,
            tokens_per_s_single=170.0,
            tokens_per_s_batched=2100.0,
            prefill_tokens_per_s=9000.0,
            sm_clock_idle_mhz=210.0,
            sm_clock_max_mhz=1410.0,
            mem_clock_mhz=1593.0,
            temp_idle_c=30.0,
            temp_rise_c=40.0,
        ),
    )
}

REGIMES: Final = ("idle", "single", "batched")
