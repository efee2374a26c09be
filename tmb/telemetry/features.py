"""Per-sample fingerprint features on a 0..1 scale, and energy per generated token.

Features (:data:`FEATURES`):

* ``power_frac``: ``power_w / power_limit_w`` (dimensionless; may exceed 1 briefly, power can overshoot the
  enforced limit within the limiter's reaction time, so values above 1 are kept);
* ``gpu_util``, ``mem_util``: NVML utilisation percent / 100;
* ``sm_active``, ``tensor_active``: GPM fractions as recorded.

Absent features (all NaN in the batch) are omitted from the result. Invalid values are dropped and
counted per feature: NaN where the field is otherwise present, ±inf, negative values, a power fraction
from a non-positive limit, and fractions above 1 for the utilisation/activity features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from tmb.telemetry.sample import FloatArray, SampleBatch

BoolArray = npt.NDArray[np.bool_]

FEATURES: Final[tuple[str, ...]] = ("power_frac", "gpu_util", "mem_util", "sm_active", "tensor_active")

_BOUNDED: Final = frozenset({"gpu_util", "mem_util", "sm_active", "tensor_active"})


@dataclass(frozen=True)
class FeatureSet:
    """Feature values (only valid ones) and, per feature, how many samples were dropped as invalid.

    ``values[name]`` and ``dropped[name]`` exist for every feature present in the batch; ``samples`` is
    the batch length.
    """

    values: dict[str, FloatArray]
    dropped: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    masks: dict[str, BoolArray] = field(default_factory=dict, repr=False)  # per sample: value valid
    raw: dict[str, FloatArray] = field(default_factory=dict, repr=False)  # per sample, invalid included

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def aligned(self) -> dict[str, FloatArray]:
        """Feature values of the samples where every feature with any valid value is valid: the arrays
        line up sample by sample (what a joint model of the features needs). A feature with no valid
        value at all stays empty rather than emptying the others."""
        usable = [m for m in self.masks.values() if bool(m.any())]
        if not usable:
            return dict(self.values)
        joint = np.logical_and.reduce(usable)
        out: dict[str, FloatArray] = {}
        for name, values in self.values.items():
            if not bool(self.masks[name].any()):
                out[name] = values
                continue
            picked = np.ascontiguousarray(self.raw[name][joint], dtype=np.float64)
            picked.setflags(write=False)
            out[name] = picked
        return out


def _raw(batch: SampleBatch, name: str) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "power_frac":
            limit = batch.power_limit_w
            frac: FloatArray = batch.power_w / np.where(limit > 0, limit, np.nan)
            # A sample with power but no usable limit is invalid (counted), not absent.
            return np.where(np.isnan(batch.power_w), np.nan, np.where(np.isnan(frac), np.inf, frac))
        if name in ("gpu_util", "mem_util"):
            pct: FloatArray = batch.column(name) / 100.0
            return pct
        return batch.column(name)


def extract(batch: SampleBatch) -> FeatureSet:
    """Features of every sample, with invalid values dropped and counted (see module docstring)."""
    values: dict[str, FloatArray] = {}
    dropped: dict[str, int] = {}
    masks: dict[str, BoolArray] = {}
    raws: dict[str, FloatArray] = {}
    for name in FEATURES:
        x = _raw(batch, name)
        source = batch.power_w if name == "power_frac" else x
        if not bool(np.any(~np.isnan(source))) and not bool(np.any(np.isinf(source))):
            continue  # absent: the driver never reported it
        ok = np.isfinite(x) & (x >= 0)
        if name in _BOUNDED:
            ok &= x <= 1.0
        kept = np.ascontiguousarray(x[ok], dtype=np.float64)
        kept.setflags(write=False)
        values[name] = kept
        dropped[name] = int(x.shape[0] - kept.shape[0])
        masks[name], raws[name] = ok, x
    return FeatureSet(values=values, dropped=dropped, samples=len(batch), masks=masks, raw=raws)


def features(batch: SampleBatch) -> dict[str, FloatArray]:
    """Per-sample features by name (see :func:`extract` for the dropped counts)."""
    return extract(batch).values


def energy_per_token_j(batch: SampleBatch, tokens: int) -> float | None:
    """Joules per generated token over the batch's time span, summed over its GPUs.

    Uses the energy counter (``energy_mj``) where a GPU has at least two readings that never decrease;
    otherwise integrates ``power_w`` over time (trapezoid rule, finite non-negative readings only). Returns
    None when ``tokens <= 0`` or no GPU has enough data. The result covers first to last sample only.
    """
    if tokens <= 0 or len(batch) < 2:
        return None
    total_j = 0.0
    measured = False
    for index in range(len(batch.gpus)):
        sel = batch.gpu == index
        t_s = (batch.t_ns[sel] - batch.t_ns[sel][:1]).astype(np.float64) / 1e9 if bool(sel.any()) else None
        if t_s is None:
            continue
        energy = batch.energy_mj[sel]
        ok = np.isfinite(energy) & (energy >= 0)
        e = energy[ok]
        if e.shape[0] >= 2 and bool(np.all(np.diff(e) >= 0)):
            total_j += float(e[-1] - e[0]) / 1000.0
            measured = True
            continue
        power = batch.power_w[sel]
        ok = np.isfinite(power) & (power >= 0)
        if int(ok.sum()) >= 2:
            p, t = power[ok], t_s[ok]
            total_j += float(np.sum((p[1:] + p[:-1]) * 0.5 * np.diff(t)))
            measured = True
    return total_j / tokens if measured else None
