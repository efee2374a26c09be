"""A window of telemetry reduced to what the load-aware fingerprint compares: per feature, the median and
the noise around it, plus the window's load.

Features (fractions of their scale, so GPUs of one kind compare across nodes):

* ``power_frac``, ``gpu_util``, ``mem_util``, ``sm_active``, ``tensor_active``: :mod:`tmb.telemetry.features`;
* ``mem_used_frac``: device memory in use / total (NVML ``nvmlDeviceGetMemoryInfo``);
* ``proc_mem_frac``: GPU memory of the compute processes (NVML per-process ``usedGpuMemory``) / total.

Memory is nearly deterministic for a (model, precision, engine, configuration): quantised weights change it
even when the engine preallocates its cache. The median is the location statistic because it ignores the
few samples a window catches of a ramp (weights loaded, cache not yet allocated) or a power spike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from tmb.fingerprint.beta import FloatArray
from tmb.telemetry.load import LoadSeries
from tmb.telemetry.sample import SampleBatch

#: Every feature a load-aware profile may hold, in a fixed order.
SUMMARY_FEATURES: Final = (
    "power_frac",
    "gpu_util",
    "mem_util",
    "sm_active",
    "tensor_active",
    "mem_used_frac",
    "proc_mem_frac",
)
#: Features that do not drift with the day or the node (allocation is deterministic).
MEMORY_FEATURES: Final = frozenset({"mem_used_frac", "proc_mem_frac"})
#: Fewest samples of a feature for a window to be summarised.
MIN_SAMPLES: Final = 10
#: Largest lag-1 autocorrelation used for the effective sample size.
MAX_RHO: Final = 0.95


@dataclass(frozen=True)
class FeatureSummary:
    """One feature over one window: median, sample count, noise per effective sample."""

    median: float
    n: int
    # Variance of the window median times the sample count: (pi/2) sd^2 (1+rho)/(1-rho).
    noise: float

    @property
    def median_var(self) -> float:
        return self.noise / max(self.n, 1)


@dataclass(frozen=True)
class WindowSummary:
    """What the fingerprint scores for one window: its load and, per feature, a :class:`FeatureSummary`."""

    t0_ns: int
    t1_ns: int
    load: float
    features: Mapping[str, FeatureSummary]

    @property
    def seconds(self) -> float:
        return (self.t1_ns - self.t0_ns) / 1e9

    @property
    def n_samples(self) -> int:
        return max((f.n for f in self.features.values()), default=0)


#: Largest valid value of each :data:`SUMMARY_FEATURES` member (``power_frac``: any finite one).
_UPPER: Final = np.array([np.finfo(np.float64).max, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def _process_bytes(processes: Sequence[Sequence[tuple[int, int | None]]]) -> FloatArray:
    """GPU memory of each sample's processes (NaN where none is listed); consecutive samples usually list
    the same processes, so a repeat costs one comparison."""
    out = np.empty(len(processes), dtype=np.float64)
    prev: object = None
    value = math.nan
    for i, procs in enumerate(processes):
        if procs is not prev and procs != prev:
            value = float(sum(p[1] for p in procs if p[1] is not None)) if procs else math.nan
            prev = procs
        out[i] = value
    return out


def _raw_features(batch: SampleBatch) -> FloatArray:
    """Every :data:`SUMMARY_FEATURES` member per sample, unvalidated (samples x features): row ``i`` depends
    on sample ``i`` alone, so the rows of a window cut from a batch are the batch's rows
    (:meth:`SampleBatch.per_sample` keeps them on the ingest's decoded batches)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        limit = batch.power_limit_w
        total = batch.mem_total_bytes
        denom = np.where(total > 0, total, np.nan)
        x: FloatArray = np.column_stack(
            [
                batch.power_w / np.where(limit > 0, limit, np.nan),
                batch.gpu_util / 100.0,
                batch.mem_util / 100.0,
                batch.sm_active,
                batch.tensor_active,
                batch.mem_used_bytes / denom,
                _process_bytes(batch.processes) / denom,  # NaN throughout when no sample lists processes
            ]
        )
    return x


#: The key of :func:`_raw_features` in a batch's per-sample memo.
RAW_FEATURES: Final = "tmb.fingerprint.summary.raw_features"


def _feature_matrix(batch: SampleBatch) -> tuple[tuple[str, ...], FloatArray]:
    """The per-sample feature values as one samples x features matrix (the features with at least one
    valid value, in :data:`SUMMARY_FEATURES` order; an invalid value is NaN): every feature is validated
    in one pass over the matrix instead of a handful of array calls per feature."""
    x = batch.per_sample(RAW_FEATURES, _raw_features)
    if not x.shape[0]:
        return (), x[:, :0]
    # non-finite, negative or above the feature's upper bound: invalid (NaN compares False)
    ok = (x >= 0) & (x <= _UPPER)
    names: tuple[str, ...] = SUMMARY_FEATURES
    if bool(ok.all()):
        return names, x
    valid = ok.any(axis=0)
    x = np.where(ok, x, np.nan)
    if not bool(valid.all()):
        keep = np.flatnonzero(valid)
        names, x = tuple(names[j] for j in keep), x[:, keep]
    return names, x


def sample_features(batch: SampleBatch) -> dict[str, FloatArray]:
    """Per-sample values of every :data:`SUMMARY_FEATURES` member the batch has, aligned with the samples:
    an invalid or missing value is NaN (the validity rules of :mod:`tmb.telemetry.features`)."""
    names, x = _feature_matrix(batch)
    return {name: x[:, j] for j, name in enumerate(names)}


def _lag1(x: FloatArray) -> float:
    if x.size < 3:
        return 0.0
    d = x - x.mean()
    den = float(np.dot(d, d))
    return float(np.dot(d[1:], d[:-1]) / den) if den > 0 else 0.0


def _column_medians(x: FloatArray) -> FloatArray:
    """``np.median(x, axis=0)`` of a matrix without NaN, bit for bit (the middle order statistic, or the
    mean of the two middle ones), without ``np.median``'s generic machinery (most of its cost here)."""
    s = np.sort(x, axis=0)
    half = x.shape[0] // 2
    if x.shape[0] % 2:
        mid: FloatArray = s[half]
        return mid
    out: FloatArray = s[half - 1] + s[half]
    out /= 2.0
    return out


def _summarise_matrix(
    names: Sequence[str], x: FloatArray, load: float, t0_ns: int, t1_ns: int
) -> WindowSummary:
    out: dict[str, FeatureSummary] = {}
    if not names:
        return WindowSummary(int(t0_ns), int(t1_ns), float(load), out)
    if x.shape[0] >= MIN_SAMPLES and not bool(np.isnan(x).any()):
        # The common case, every feature valid in every sample: one pass over the matrix.
        med = _column_medians(x)
        d = x - x.mean(axis=0)
        ss = np.einsum("ij,ij->j", d, d)
        lag = np.einsum("ij,ij->j", d[1:], d[:-1])
        rho = np.clip(np.divide(lag, ss, out=np.zeros_like(ss), where=ss > 0), 0.0, MAX_RHO)
        noise = (math.pi / 2.0) * (ss / x.shape[0]) * (1.0 + rho) / (1.0 - rho)
        n = int(x.shape[0])
        for name, m, e in zip(names, med.tolist(), noise.tolist(), strict=True):
            out[name] = FeatureSummary(m, n, e)
        return WindowSummary(int(t0_ns), int(t1_ns), float(load), out)
    for j, name in enumerate(names):
        col = x[:, j]
        col = col[np.isfinite(col)]
        if col.size < MIN_SAMPLES:
            continue
        r = min(max(_lag1(col), 0.0), MAX_RHO)
        sd = float(col.std())
        out[name] = FeatureSummary(
            float(np.median(col)), int(col.size), (math.pi / 2.0) * sd * sd * (1.0 + r) / (1.0 - r)
        )
    return WindowSummary(int(t0_ns), int(t1_ns), float(load), out)


def summarise_values(values: Mapping[str, FloatArray], load: float, t0_ns: int, t1_ns: int) -> WindowSummary:
    """Summarise per-sample feature values (NaN ignored; features with fewer than :data:`MIN_SAMPLES`
    valid values are left out)."""
    names = [n for n in SUMMARY_FEATURES if n in values]
    if not names:
        return WindowSummary(int(t0_ns), int(t1_ns), float(load), {})
    x = np.column_stack([np.asarray(values[n], dtype=np.float64) for n in names])
    return _summarise_matrix(names, x, load, t0_ns, t1_ns)


def summarise(batch: SampleBatch, load: float) -> WindowSummary:
    """Summarise a whole batch as one window whose load is ``load``."""
    t0 = int(batch.t_ns[0]) if len(batch) else 0
    t1 = int(batch.t_ns[-1]) if len(batch) else 0
    if not len(batch):
        return WindowSummary(t0, t1, float(load), {})
    names, x = _feature_matrix(batch)
    return _summarise_matrix(names, x, load, t0, t1)


def _covered_until(t: npt.NDArray[np.int64]) -> int:
    """The end of the time the samples cover: the last one plus one mean sampling period."""
    last = int(t[-1])
    return last + ((last - int(t[0])) // (len(t) - 1) if len(t) > 1 else 0) + 1


def window_summaries(
    batch: SampleBatch, load: LoadSeries | None, window_s: float, stride_s: float | None = None
) -> list[WindowSummary]:
    """Consecutive windows of ``window_s`` (every ``stride_s``, default the window) over a trace.

    A window's load is the time average of ``load`` over it (0 where the trace has no load series). Windows
    with fewer than :data:`MIN_SAMPLES` samples of every feature are skipped.
    """
    if len(batch) == 0 or window_s <= 0:
        return []
    values = sample_features(batch)
    stride = max(int((stride_s or window_s) * 1e9), 1)
    width = int(window_s * 1e9)
    t = batch.t_ns
    last = _covered_until(t)
    out: list[WindowSummary] = []
    t0 = int(t[0])
    while t0 + width <= last:
        t1 = t0 + width
        lo, hi = int(np.searchsorted(t, t0, "left")), int(np.searchsorted(t, t1, "left"))
        if hi - lo >= MIN_SAMPLES:
            mean_load = load.mean(t0, t1) if load is not None else 0.0
            part = {name: v[lo:hi] for name, v in values.items()}
            summary = summarise_values(part, mean_load, t0, t1)
            if summary.features:
                out.append(summary)
        t0 += stride
    return out


def growing_windows(
    batch: SampleBatch, load: LoadSeries | None, window_s: float, step_s: float
) -> list[tuple[WindowSummary, ...]]:
    """Non-overlapping windows of ``window_s``, each as its prefixes of ``step_s``, ``2 step_s``, ... up
    to the whole window (the last element): how long a window must grow before the fingerprint decides.

    Windows whose whole length has fewer than :data:`MIN_SAMPLES` samples are skipped; short prefixes
    are kept even when empty of features (they are then inconclusive).
    """
    if len(batch) == 0 or window_s <= 0 or step_s <= 0:
        return []
    values = sample_features(batch)
    t = batch.t_ns
    width = int(window_s * 1e9)
    steps = [int(min(k * step_s, window_s) * 1e9) for k in range(1, math.ceil(window_s / step_s) + 1)]
    out: list[tuple[WindowSummary, ...]] = []
    t0, last = int(t[0]), _covered_until(t)
    while t0 + width <= last:
        lo = int(np.searchsorted(t, t0, "left"))
        if int(np.searchsorted(t, t0 + width, "left")) - lo >= MIN_SAMPLES:
            prefixes = []
            for span in steps:
                hi = int(np.searchsorted(t, t0 + span, "left"))
                mean_load = load.mean(t0, t0 + span) if load is not None else 0.0
                prefixes.append(
                    summarise_values({k: v[lo:hi] for k, v in values.items()}, mean_load, t0, t0 + span)
                )
            out.append(tuple(prefixes))
        t0 += width
    return out
