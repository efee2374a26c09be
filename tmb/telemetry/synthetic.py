"""Synthetic GPU telemetry for machines without a GPU. Everything produced here is labelled synthetic.

:func:`generate` renders a whole trace for a workload model and load regime (deterministic for a seed);
:class:`SyntheticSource` renders telemetry live, driven by the request activity a worker reports
(:meth:`~SyntheticSource.request_started`, :meth:`~SyntheticSource.token_generated`,
:meth:`~SyntheticSource.request_finished`). Both share one simulator: phase and load set channel means,
AR(1) noise with correlation time ``tau_s`` is added, power lags its target (~0.1 s) and is capped near the
limit, NVML utilisation is quantised to integer percent (so exact 0 and 100 occur), the energy counter
integrates power in whole mJ, temperature follows power with a 20 s time constant.

Load sweeps (regime ``"sweep"``, ``load_schedule=[(seconds, requests_in_flight), ...]``) hold a closed-loop
concurrency per step; a :class:`RunShift` (``shift=``) moves one run's levels as real sessions move. Every
run's workload carries the requests in flight it simulated as a load series (``tmb.telemetry.load``).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid as uuidlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy.signal import lfilter

from tmb.errors import Finding, InputError, Severity
from tmb.telemetry.load import MAX_STEPS, LoadSeries
from tmb.telemetry.sample import FLOAT_FIELDS, FloatArray, IntArray, SampleBatch
from tmb.telemetry.workloads import MODELS, REGIMES, Levels, RunShift, WorkloadModel

__all__ = [
    "MODELS",
    "REGIMES",
    "SWEEP",
    "Levels",
    "RunShift",
    "SyntheticRun",
    "SyntheticSource",
    "WorkloadModel",
    "generate",
    "simulate",
]

IDLE, PREFILL, DECODE = 0, 1, 2
SWEEP: Final = "sweep"
_MEAN_OUTPUT_TOKENS: Final = 208.0  # the single regime's uniform 32..384
_POWER_LAG_S: Final = 0.1
_TEMP_TAU_S: Final = 20.0
_GPM_FIELDS: Final = (
    "sm_active",
    "tensor_active",
    "tensor_hmma",
    "tensor_imma",
    "tensor_dfma",
    "dram_active",
)


def model(name: str) -> WorkloadModel:
    """The workload model called ``name``; :class:`InputError` listing the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"unknown synthetic workload model {name!r}", known=sorted(MODELS)) from None


def supported_fields(m: WorkloadModel) -> tuple[str, ...]:
    """The fields a synthetic GPU of this model reports (GPM ones only where the GPU has GPM)."""
    return tuple(f for f in FLOAT_FIELDS if m.gpm or f not in _GPM_FIELDS)


def _ar1(z: FloatArray, phi: float, zi: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Unit-variance AR(1) along axis 0 from white noise ``z``; ``zi`` carries the state between calls."""
    y, zf = lfilter([math.sqrt(1.0 - phi * phi)], [1.0, -phi], z, axis=0, zi=zi)
    return np.asarray(y, dtype=np.float64), np.asarray(zf, dtype=np.float64)


def _lag(x: FloatArray, a: float, prev: float) -> FloatArray:
    """First-order lag ``y[n] = (1-a) x[n] + a y[n-1]`` starting from ``prev``."""
    y, _ = lfilter([1.0 - a], [1.0, -a], x, zi=[a * prev])
    return np.asarray(y, dtype=np.float64)


class _Simulator:
    """Stateful renderer: phases and loads at given times -> samples, continuous across calls."""

    def __init__(
        self, m: WorkloadModel, rate_hz: float, seed: int, gpu: str | None, shift: RunShift | None = None
    ) -> None:
        if not (math.isfinite(rate_hz) and 0 < rate_hz <= 1000):
            raise InputError("synthetic sample rate must be in (0, 1000] Hz", rate_hz=rate_hz)
        self.m = m
        self.shift = shift = None if shift == RunShift() else shift
        self.temp_idle_c = m.temp_idle_c if shift is None else m.temp_idle_c + shift.temp_c
        self.rng = np.random.default_rng(seed)
        self.dt = 1.0 / rate_hz
        self.phi = math.exp(-self.dt / m.tau_s)
        self.zi = self.phi * self.rng.standard_normal((1, 6))
        self.power_prev = m.idle.power_frac if shift is None else m.idle.power_frac + shift.power_frac
        self.temp = self.temp_idle_c
        self.energy_mj = float(self.rng.integers(10**8, 10**9))
        self.gpu = gpu or f"GPU-{uuidlib.UUID(bytes=self.rng.bytes(16))}"
        self.pid = int(self.rng.integers(1000, 60000))
        self.last_t_ns: int | None = None

    def render(
        self, t_ns: IntArray, phase: IntArray, load: FloatArray, mem_used: FloatArray | None = None
    ) -> SampleBatch:
        """``mem_used``: device memory per sample (default: the model's flat ``mem_used_bytes``)."""
        m, n = self.m, int(t_ns.shape[0])
        if n == 0:
            return SampleBatch.empty("synthetic", synthetic=True, power_field="instant")
        idle, pre, ds, db = (
            np.array(lv.as_tuple()) for lv in (m.idle, m.prefill, m.decode_single, m.decode_batched)
        )
        w = np.clip(load, 0.0, 1.0)[:, None] ** 0.7
        decode = ds + (db - ds) * w
        ph = phase[:, None]
        means = np.where(ph == IDLE, idle, np.where(ph == PREFILL, pre, decode))
        if self.shift is not None:
            means = _shifted(means, ph != IDLE, idle, self.shift)
        sd = np.array(m.noise.as_tuple()) * np.where(ph == IDLE, 0.2, 1.0)
        dips = (phase == DECODE) & (self.rng.random(n) < m.tensor_dip)
        means[dips, 4] *= 0.5
        noise, self.zi = _ar1(self.rng.standard_normal((n, 6)), self.phi, self.zi)
        # Power follows its target with a short lag, then noise; the limiter caps overshoot.
        target = _lag(means[:, 0], math.exp(-self.dt / _POWER_LAG_S), self.power_prev)
        self.power_prev = float(target[-1])
        pf = target + sd[:, 0] * noise[:, 0]
        pf = np.where(pf > 1.0, 1.0 + (pf - 1.0) * 0.1, pf)
        pf = np.maximum(pf, 0.5 * m.idle.power_frac)
        x = np.clip(means + sd * noise, 0.0, 1.0)
        power_w = np.round(pf * m.power_limit_w, 3)
        # Energy counter: whole mJ, integrating power over the actual sample spacing.
        prev_t = self.last_t_ns if self.last_t_ns is not None else int(t_ns[0]) - round(self.dt * 1e9)
        gaps = np.diff(np.concatenate([[prev_t], t_ns])).astype(np.float64) / 1e9
        energy = np.floor(self.energy_mj + np.cumsum(power_w * gaps * 1000.0))
        self.energy_mj = float(self.energy_mj + np.sum(power_w * gaps * 1000.0))
        self.last_t_ns = int(t_ns[-1])
        a_t = math.exp(-self.dt / _TEMP_TAU_S)
        temp = _lag(self.temp_idle_c + m.temp_rise_c * pf, a_t, self.temp)
        self.temp = float(temp[-1])
        throttle = np.clip((pf - 0.97) * 3.0, 0.0, 0.3)
        sm_clock = np.where(phase == IDLE, m.sm_clock_idle_mhz, np.round(m.sm_clock_max_mhz * (1 - throttle)))
        const = np.ones(n)
        mem = const * m.mem_used_bytes if mem_used is None else np.asarray(mem_used, dtype=np.float64)
        if self.shift is not None:
            mem = mem + self.shift.mem_used_bytes
        cols: dict[str, Any] = {
            "power_w": power_w,
            "energy_mj": energy,
            "gpu_util": np.round(x[:, 1] * 100.0),
            "mem_util": np.round(x[:, 2] * 100.0),
            "mem_used_bytes": mem,
            "mem_total_bytes": const * m.mem_total_bytes,
            "sm_clock_mhz": sm_clock,
            "mem_clock_mhz": const * m.mem_clock_mhz,
            "temp_c": np.round(temp),
            "power_limit_w": const * m.power_limit_w,
        }
        if m.gpm:
            tensor = np.round(x[:, 4], 4)
            cols |= {
                "sm_active": np.round(x[:, 3], 4),
                "tensor_active": tensor,
                "tensor_hmma": np.round(tensor * m.tensor_split[0], 4),
                "tensor_imma": np.round(tensor * m.tensor_split[1], 4),
                "tensor_dfma": np.round(tensor * m.tensor_split[2], 4),
                "dram_active": np.round(x[:, 5], 4),
            }
        if mem_used is None and self.shift is None:
            procs = [((self.pid, m.mem_used_bytes - 512 * 2**20),)] * n
        else:
            procs = [((self.pid, int(b) - 512 * 2**20),) for b in mem]
        return SampleBatch.from_columns(
            t_ns,
            (self.gpu,),
            source="synthetic",
            synthetic=True,
            power_field="instant",
            processes=procs,
            **cols,
        )


def _shifted(means: FloatArray, busy: npt.NDArray[np.bool_], idle: FloatArray, s: RunShift) -> FloatArray:
    """``means`` moved by a run shift: power gain above idle plus offset, utilisation offset when busy."""
    out = means.copy()
    out[:, 0] = idle[0] + s.gain * (means[:, 0] - idle[0]) + s.power_frac
    out[:, 1:] = np.where(busy, np.clip(means[:, 1:] + s.util, 0.0, 1.0), means[:, 1:])
    return out


@dataclass(frozen=True)
class SyntheticRun:
    """A generated trace and the workload that produced it (model, regime, requests, tokens, batch size)."""

    batch: SampleBatch
    workload: dict[str, Any]


def _schedule(
    m: WorkloadModel, regime: str, n: int, dt: float, rng: np.random.Generator
) -> tuple[IntArray, FloatArray, dict[str, Any]]:
    phase = np.zeros(n, dtype=np.int64)
    load = np.zeros(n)
    requests, tokens = 0, 0.0
    if regime == "single":
        i = int(rng.exponential(0.4) / dt)
        while i < n:
            pre = max(1, math.ceil(int(rng.integers(64, 1024)) / m.prefill_tokens_per_s / dt))
            want = int(rng.integers(32, 384))
            dec = max(1, round(want / m.tokens_per_s_single / dt))
            phase[i : i + pre] = PREFILL
            phase[i + pre : i + pre + dec] = DECODE
            requests += 1
            tokens += want * min(1.0, max(0, n - i - pre) / dec)
            i += pre + dec + int(rng.exponential(0.4) / dt)
    elif regime == "batched":
        # Running sequences: mean-reverting around 3/4 of the batch limit, re-drawn every second.
        mu = 0.75 * m.max_batch
        level = mu + rng.normal(0.0, 2.5)
        per_s = max(1, round(1.0 / dt))
        i, conc = 0, round(mu)
        while i < n:
            if i % per_s == 0:
                level = mu + 0.8 * (level - mu) + rng.normal(0.0, 0.1 * m.max_batch)
                conc = int(np.clip(round(level), 2, m.max_batch))
            load[i] = (conc - 1) / (m.max_batch - 1)
            if rng.random() < 0.12:  # a chunked-prefill step of a newly admitted request
                phase[i : i + int(rng.integers(1, 3))] = PREFILL
                requests += 1
            if phase[i] != PREFILL:
                phase[i] = DECODE
                tokens += m.tokens_per_s_batched * conc / m.max_batch * dt
            i += 1
    elif regime != "idle":
        raise InputError(f"unknown load regime {regime!r}", known=[*REGIMES, SWEEP])
    busy = load[phase == DECODE]
    batch_size = float(np.mean(busy * (m.max_batch - 1) + 1)) if busy.size and regime == "batched" else 1.0
    info = {"requests": requests, "tokens_generated": int(tokens), "batch_size": batch_size}
    return phase, load, info


def _sweep_levels(schedule: Sequence[tuple[float, float]]) -> tuple[FloatArray, FloatArray]:
    """(durations, requests in flight) of a load schedule; :class:`InputError` naming a bad step."""
    if not schedule:
        raise InputError("a load sweep needs at least one (seconds, requests in flight) step")
    durations, levels = [], []
    for i, step in enumerate(schedule):
        seconds, level = (float(x) for x in step)
        if not (math.isfinite(seconds) and seconds > 0):
            raise InputError("load sweep step durations must be positive seconds", step=i, seconds=seconds)
        if not (math.isfinite(level) and 0 <= level <= 4096 and level == round(level)):
            raise InputError("requests in flight must be a whole number in 0..4096", step=i, level=level)
        durations.append(seconds)
        levels.append(level)
    return np.array(durations), np.array(levels)


def _sweep(
    m: WorkloadModel, schedule: Sequence[tuple[float, float]], n: int, dt: float, rng: np.random.Generator
) -> tuple[IntArray, FloatArray, FloatArray, FloatArray, dict[str, Any]]:
    """Closed loop: each step holds its requests in flight (a finished request is replaced at once).

    Up to ``max_batch`` run (more wait in the queue); decode levels interpolate with the running count as
    in the batched regime; each admitted prompt is a chunked-prefill share of its sample. Returns phase,
    load, requests in flight, device memory per sample and the workload description.
    """
    durations, levels = _sweep_levels(schedule)
    step = np.searchsorted(np.cumsum(durations), np.arange(n) * dt + 1e-9, side="right")
    inflight = levels[np.minimum(step, levels.size - 1)]
    running = np.minimum(inflight, m.max_batch)
    load = np.clip((running - 1) / (m.max_batch - 1), 0.0, 1.0)
    single, batched = m.tokens_per_s_single, m.tokens_per_s_batched / m.max_batch
    rate = running * (single + (batched - single) * load**0.7)  # tokens/s, all sequences
    admitted = rng.poisson(rate * dt / _MEAN_OUTPUT_TOKENS)
    prompts = rng.integers(64, 1024, size=int(admitted.sum()), endpoint=True)
    prompt_tokens = np.bincount(np.repeat(np.arange(n), admitted), weights=prompts, minlength=n)
    phase = np.where(running > 0, DECODE, IDLE).astype(np.int64)
    phase[rng.random(n) < prompt_tokens / m.prefill_tokens_per_s / dt] = PREFILL
    decode = phase == DECODE
    info = {
        "engine": m.engine,
        "load_schedule": [[float(d), float(c)] for d, c in zip(durations, levels, strict=True)],
        "requests": int(admitted.sum()),
        "tokens_generated": int(np.sum(rate[decode]) * dt),
        "batch_size": float(np.mean(running[decode])) if bool(decode.any()) else 1.0,
    }
    mem = m.sweep_mem_bytes + m.mem_per_request_bytes * running
    return phase, load, inflight, mem, info


def _load_series(t_ns: IntArray, inflight: FloatArray, default: float, start_ns: int) -> dict[str, Any]:
    """Requests in flight per sample as steps (time-averaged over equal chunks beyond the step limit)."""
    if inflight.size == 0:
        return LoadSeries.constant(default, start_ns, "series").to_dict()
    t, v = t_ns, inflight.astype(np.float64)
    if int(np.count_nonzero(np.diff(v))) >= MAX_STEPS:
        idx = np.unique(np.linspace(0, v.size, MAX_STEPS // 2, endpoint=False).astype(np.int64))
        t, v = t[idx], np.add.reduceat(v, idx) / np.diff(np.append(idx, v.size))
    keep = np.concatenate([[True], v[1:] != v[:-1]])
    return LoadSeries(tuple(int(x) for x in t[keep]), tuple(float(x) for x in v[keep]), "series").to_dict()


def simulate(
    model_name: str,
    regime: str,
    seconds: float,
    rate_hz: float = 20.0,
    seed: int = 0,
    start_ns: int = 0,
    *,
    load_schedule: Sequence[tuple[float, float]] | None = None,
    shift: RunShift | None = None,
) -> SyntheticRun:
    """:func:`generate` plus the workload description (for trace metadata).

    ``regime="sweep"`` needs ``load_schedule``: ``(seconds, requests_in_flight)`` steps in order, the last
    one held until ``seconds`` (a longer schedule is cut there). ``shift`` moves this run's levels
    (default: none). ``workload["load"]`` is the requests in flight simulated, as a load series dict.
    """
    m = model(model_name)
    if not (math.isfinite(seconds) and 0 <= seconds <= 7 * 86400):
        raise InputError("synthetic trace length must be between 0 and 7 days", seconds=seconds)
    if (regime == SWEEP) != (load_schedule is not None):
        raise InputError("a load schedule goes with regime 'sweep', and only there", regime=regime)
    sim = _Simulator(m, rate_hz, seed, None, shift)
    n = math.floor(seconds * rate_hz + 1e-9)
    t_ns = start_ns + np.round(np.arange(n) * (1e9 / rate_hz)).astype(np.int64)
    rng = np.random.default_rng([seed, 1])
    mem: FloatArray | None = None
    if load_schedule is not None:
        phase, load, inflight, mem, info = _sweep(m, load_schedule, n, sim.dt, rng)
        first = float(info["load_schedule"][0][1])
    else:
        phase, load, info = _schedule(m, regime, n, sim.dt, rng)
        if regime == "batched":
            inflight = np.round(load * (m.max_batch - 1)) + 1.0
        else:
            inflight = (phase != IDLE).astype(np.float64)
        first = 0.0
    workload = {
        "model": m.model,
        "precision": m.precision,
        "gpu_type": m.gpu_type,
        "workload_model": m.name,
        "regime": regime,
        "seconds": seconds,
        "seed": seed,
        **info,
        "load": _load_series(t_ns, inflight, first, start_ns),
    }
    if shift is not None:
        workload["shift"] = shift.to_dict()
    return SyntheticRun(sim.render(t_ns, phase, load, mem), workload)


def generate(
    model: str, regime: str, seconds: float, rate_hz: float = 20.0, seed: int = 0, start_ns: int = 0
) -> SampleBatch:
    """``seconds`` of synthetic telemetry at ``rate_hz`` for workload ``model`` under load ``regime``.

    Deterministic for a seed; samples start at ``start_ns`` (wall-clock ns) on an exact rate grid.
    """
    return simulate(model, regime, seconds, rate_hz, seed, start_ns).batch


class SyntheticSource:
    """Live synthetic telemetry that follows the request activity reported to it.

    Call :meth:`request_started` when a request is admitted, :meth:`token_generated` per token (or in
    bulk), :meth:`request_finished` when it completes (or use :meth:`on_activity` as a callback). Samples
    lie on an exact ``rate_hz`` grid from construction time; a sample is in prefill while a request's
    prompt is being processed, in decode while any request runs (load from the number running), else idle.
    ``shift`` moves its levels as one recording session's (:class:`RunShift`; default none).
    """

    kind: Final = "synthetic"

    def __init__(
        self,
        model_name: str | WorkloadModel = "llama-1b/bf16/h100",
        *,
        rate_hz: float = 20.0,
        seed: int = 0,
        gpu: str | None = None,
        shift: RunShift | None = None,
        clock: Callable[[], int] = time.time_ns,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.model = model_name if isinstance(model_name, WorkloadModel) else model(model_name)
        self.rate_hz = rate_hz
        self._sim = _Simulator(self.model, rate_hz, seed, gpu, shift)
        self._clock, self._sleep = clock, sleep
        self._period_ns = max(1, round(1e9 / rate_hz))
        self._next_ns = clock()
        self._events: list[tuple[int, int]] = []  # (t_ns, +1 start / -1 finish)
        self._prefill: list[tuple[int, int]] = []  # [start, end) windows
        self._active = 0
        self._findings: list[Finding] = []
        self.requests = 0
        self.tokens_generated = 0

    @property
    def gpu(self) -> str:
        return self._sim.gpu

    @property
    def findings(self) -> list[Finding]:
        return list(self._findings)

    def request_started(self, tokens_expected: int = 128, prompt_tokens: int = 256) -> None:
        """A request was admitted now; its prompt of ``prompt_tokens`` is prefilled first."""
        now = self._clock()
        span = max(self._period_ns, round(max(prompt_tokens, 1) / self.model.prefill_tokens_per_s * 1e9))
        self._events.append((now, 1))
        self._prefill.append((now, now + span))
        self.requests += 1

    def token_generated(self, n: int = 1) -> None:
        """``n`` more output tokens were generated."""
        self.tokens_generated += max(0, n)

    def request_finished(self) -> None:
        """A request completed (or was cancelled) now."""
        self._events.append((self._clock(), -1))

    def on_activity(self, event: str, count: int = 1) -> None:
        """Callback form: ``event`` is ``"start"``, ``"token"`` or ``"finish"``."""
        if event == "start":
            self.request_started()
        elif event == "token":
            self.token_generated(count)
        elif event == "finish":
            self.request_finished()
        else:
            raise InputError(f"unknown activity event {event!r}", known=["start", "token", "finish"])

    def read(self, until_ns: int | None = None) -> SampleBatch:
        """Samples on the grid from the last read up to ``until_ns`` (default: now), inclusive."""
        until = self._clock() if until_ns is None else until_ns
        count = (until - self._next_ns) // self._period_ns + 1 if until >= self._next_ns else 0
        t = self._next_ns + self._period_ns * np.arange(count, dtype=np.int64)
        if count == 0:
            return self._sim.render(t, t, np.zeros(0))
        self._events.sort()
        ev_t = np.array([e[0] for e in self._events], dtype=np.int64)
        ev_d = np.array([e[1] for e in self._events], dtype=np.int64)
        csum = np.concatenate([[0], np.cumsum(ev_d)])
        active = self._active + csum[np.searchsorted(ev_t, t, side="right")]
        if bool(np.any(active < 0)):
            self._findings.append(
                Finding(
                    "telemetry.synthetic_unbalanced",
                    "more requests finished than started; running count clamped at 0",
                    Severity.WARNING,
                    {"t_ns": int(t[int(np.argmax(active < 0))])},
                )
            )
            active = np.maximum(active, 0)
        prefill = np.zeros(count, dtype=bool)
        for start, end in self._prefill:
            prefill |= (t >= start) & (t < end)
        last = int(t[-1])
        self._active = max(0, int(active[-1]))
        self._events = [e for e in self._events if e[0] > last]
        self._prefill = [w for w in self._prefill if w[1] > last + self._period_ns]
        self._next_ns = last + self._period_ns
        phase = np.where(prefill, PREFILL, np.where(active > 0, DECODE, IDLE)).astype(np.int64)
        load = np.clip((active - 1) / (self.model.max_batch - 1), 0.0, 1.0)
        # Device memory as a live engine shows it: the model's static allocation (weights + preallocated
        # cache: a quantised model's is lower) plus a little per running sequence.
        mem = (self.model.sweep_mem_bytes + self.model.mem_per_request_bytes * active).astype(np.float64)
        return self._sim.render(t, phase, load, mem)

    async def batches(self, interval_s: float = 1.0) -> AsyncGenerator[SampleBatch, None]:
        """A batch every ``interval_s`` (absolute deadlines on the source clock), forever."""
        step = max(1, round(interval_s * 1e9))
        deadline = self._clock() + step
        while True:
            await self._sleep(max(0.0, (deadline - self._clock()) / 1e9))
            yield self.read()
            deadline += step
            now = self._clock()
            if deadline <= now:  # fell behind: skip missed deadlines, never drift
                deadline += ((now - deadline) // step + 1) * step

    def describe(self) -> dict[str, Any]:
        """Trace metadata for this source."""
        m = self.model
        workload: dict[str, Any] = {
            "model": m.model,
            "precision": m.precision,
            "gpu_type": m.gpu_type,
            "workload_model": m.name,
            "regime": "activity",
            "requests": self.requests,
            "tokens_generated": self.tokens_generated,
        }
        if self._sim.shift is not None:
            workload["shift"] = self._sim.shift.to_dict()
        return {
            "source": "synthetic",
            "synthetic": True,
            "gpu_name": m.gpu_name,
            "driver_version": None,
            "gpus": [self.gpu],
            "supported_fields": list(supported_fields(m)),
            "power_field": "instant",
            "rate_hz": self.rate_hz,
            "workload": workload,
        }

    def close(self) -> None:
        """Nothing to release."""
