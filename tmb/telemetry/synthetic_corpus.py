"""Synthetic runs for evaluations: run-to-run shifts and a small corpus of load sweeps.

Real telemetry of one model on one kind of GPU moves between recording sessions: tens of watts between days
(with the machine room's temperature), a few watts between nodes, a few MiB of device memory.
:func:`run_shift` draws such a :class:`~tmb.telemetry.workloads.RunShift` reproducibly from a seed, a node
and a day; the day's part is shared by every run on that day, the node's by every run on that node.
:func:`synthetic_corpus` writes one trace per run, each a load sweep with its own shift, labelled with its
load series and its run.
Everything here is synthetic and says so.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from tmb.errors import InputError
from tmb.telemetry.load import RunInfo
from tmb.telemetry.replay import write_trace
from tmb.telemetry.synthetic import MODELS, SWEEP, model, simulate, supported_fields
from tmb.telemetry.workloads import MIB, RunShift

__all__ = ["DEFAULT_LOADS", "RunShift", "run_shift", "synthetic_corpus"]

#: Requests in flight a corpus run sweeps through (each for ``seconds_per_load``).
DEFAULT_LOADS: Final = (1, 2, 4, 8, 16, 32)

# Magnitudes (uniform half-widths). Power in fractions of the power limit: 0.05 is 35 W on a 700 W H100.
_DAY_TEMP_C: Final = 4.0  # machine-room temperature of the day
_DAY_POWER_PER_C: Final = 0.006  # leakage and fans: +0.6 % of the limit per degree warmer
_DAY_POWER: Final = 0.025  # the rest of the day's offset (clocks, driver, firmware): total within +-0.049
_DAY_GAIN: Final = 0.02  # the day's scale of the power above idle
_DAY_UTIL: Final = 0.01
_NODE_POWER: Final = 0.015  # node to node: +-1.5 % of the limit (about +-10 W on an H100)
_NODE_GAIN: Final = 0.01
_NODE_UTIL: Final = 0.005
_NODE_TEMP_C: Final = 2.0
_NODE_MEM_MIB: Final = 2  # whole MiB: driver and context allocations differ a little
_RUN_POWER: Final = 0.003  # what is left per session: about +-2 W
_RUN_TEMP_C: Final = 0.5
_RUN_MEM_MIB: Final = 2


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from the parts' text (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def run_shift(seed: int, *, node: str = "node-1", day: str = "day-0", run: str = "") -> RunShift:
    """The shift of run ``run`` on ``node`` on ``day``: reproducible for (seed, node, day, run).

    Day: temperature within +-4 C, power within +-4.9 % of the limit (0.6 %/C of it from the temperature),
    gain within +-2 %, utilisation within +-1 %. Node: power +-1.5 %, gain +-1 %, utilisation +-0.5 %,
    temperature +-2 C, memory +-2 MiB. Run: power +-0.3 %, temperature +-0.5 C, memory +-2 MiB.
    """
    d, nd, r = _rng(seed, "day", day), _rng(seed, "node", node), _rng(seed, "run", node, day, run)
    temp_day = d.uniform(-_DAY_TEMP_C, _DAY_TEMP_C)
    power = _DAY_POWER_PER_C * temp_day + d.uniform(-_DAY_POWER, _DAY_POWER)
    gain = 1.0 + d.uniform(-_DAY_GAIN, _DAY_GAIN)
    util = d.uniform(-_DAY_UTIL, _DAY_UTIL)
    power += nd.uniform(-_NODE_POWER, _NODE_POWER)
    gain += nd.uniform(-_NODE_GAIN, _NODE_GAIN)
    util += nd.uniform(-_NODE_UTIL, _NODE_UTIL)
    temp = temp_day + nd.uniform(-_NODE_TEMP_C, _NODE_TEMP_C)
    mem_mib = int(nd.integers(-_NODE_MEM_MIB, _NODE_MEM_MIB, endpoint=True))
    power += r.uniform(-_RUN_POWER, _RUN_POWER)
    temp += r.uniform(-_RUN_TEMP_C, _RUN_TEMP_C)
    mem_mib += int(r.integers(-_RUN_MEM_MIB, _RUN_MEM_MIB, endpoint=True))
    return RunShift(
        power_frac=round(float(power), 6),
        util=round(float(util), 6),
        mem_used_bytes=mem_mib * MIB,
        temp_c=round(float(temp), 3),
        gain=round(float(gain), 6),
    )


def _day(first_day: str, offset: int) -> str:
    try:
        start = _dt.date.fromisoformat(first_day)
    except ValueError:
        raise InputError("first_day must be YYYY-MM-DD", first_day=first_day) from None
    return (start + _dt.timedelta(days=offset)).isoformat()


def synthetic_corpus(
    out_dir: str | os.PathLike[str],
    models: Sequence[str] | None = None,
    runs_per_model: int = 4,
    loads: Sequence[int] = DEFAULT_LOADS,
    seconds_per_load: float = 10.0,
    rate_hz: float = 20.0,
    seed: int = 0,
    *,
    nodes: int = 2,
    first_day: str = "2025-01-06",
    shuffle: bool = True,
) -> list[Path]:
    """Write one synthetic load-sweep trace per run into ``out_dir``; returns their paths.

    ``models``: workload model names (default: all of :data:`MODELS`). Run ``r`` of a model runs on node
    ``node-{r % nodes + 1}`` on day ``first_day + r // nodes``, so runs differ by node, by day or both, and
    gets :func:`run_shift` for them. Each run sweeps ``loads`` (requests in flight, each held for
    ``seconds_per_load``; in a per-run random order when ``shuffle``) and starts at 08:00 UTC of its day
    (plus a stagger per model). Metadata: ``workload`` (model, precision, gpu_type, engine, regime
    ``sweep``, counts, the shift), ``load`` (the sweep's series), ``run`` (id, node, day), ``synthetic``.
    """
    names = list(MODELS) if models is None else list(models)
    if runs_per_model < 1 or nodes < 1 or not loads or not names:
        raise InputError("a corpus needs models, loads, at least one run per model and one node")
    if len(set(names)) != len(names):
        raise InputError("each model may appear once in a corpus", models=names)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create corpus directory: {exc.strerror}", path=str(out)) from None
    span_s = len(loads) * seconds_per_load
    paths: list[Path] = []
    for k, name in enumerate(names):
        m = model(name)
        slug = name.replace("/", "-")
        for r in range(runs_per_model):
            node, day = f"node-{r % nodes + 1}", _day(first_day, r // nodes)
            run_id = f"{slug}-r{r}"
            rng = _rng(seed, "run", name, r)
            run_seed = int(rng.integers(2**31))
            order = [loads[i] for i in rng.permutation(len(loads))] if shuffle else list(loads)
            midnight = _dt.datetime.fromisoformat(day).replace(tzinfo=_dt.UTC)
            start_s = midnight.timestamp() + 8 * 3600 + (k * (span_s + 60.0)) % (14 * 3600)
            shift = run_shift(seed, node=node, day=day, run=run_id)
            run = simulate(
                name,
                SWEEP,
                span_s,
                rate_hz,
                seed=run_seed,
                start_ns=round(start_s * 1e9),
                load_schedule=[(seconds_per_load, float(c)) for c in order],
                shift=shift,
            )
            meta: dict[str, Any] = {
                "source": "synthetic",
                "synthetic": True,
                "gpu_name": m.gpu_name,
                "driver_version": None,
                "supported_fields": list(supported_fields(m)),
                "power_field": "instant",
                "rate_hz": rate_hz,
                "workload": {key: v for key, v in run.workload.items() if key != "load"},
                "load": run.workload["load"],
                "run": RunInfo(run_id, node, day).to_dict(),
            }
            paths.append(write_trace(out / f"{run_id}.trace", run.batch, meta))
    return paths
