"""The load a GPU served, and the run a recording belongs to: the two labels a load-aware fingerprint needs.

**Load** is the number of requests in flight on the GPU (the serving engine's concurrency), a step
function of time. The daemon measures it from its own request spans; a trace carries it in its metadata
under ``load`` (written by ``tmb telemetry import --load``, the synthetic generator, or a recorder that
knows its load)::

    "load": {"unit": "requests_in_flight", "source": "label" | "series" | "spans",
             "steps": [[t_ns, value], ...]}

``steps`` are sorted by time; each value holds from its time until the next step (the last one until the
end of the trace). A window's load is the time average of the step function over the window.

**Run**: one recording session (one process start to stop on one node, on one day). Fingerprint
thresholds are calibrated by leaving whole runs out, so every trace says which run it is::

    "run": {"id": "...", "node": "...", "day": "YYYY-MM-DD"}

Absent keys are derived: the run id from the trace's first timestamp and GPU, the node from
``devices``/``gpus``, the day from the first timestamp (UTC).
"""

from __future__ import annotations

import bisect
import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from tmb.errors import ConfigError

UNIT: Final = "requests_in_flight"
LOAD_SOURCES: Final = ("label", "series", "spans")
#: Most steps a trace's load series may carry (the metadata block is at most 1 MiB).
MAX_STEPS: Final = 20_000


@dataclass(frozen=True)
class LoadSeries:
    """A step function: ``values[i]`` requests in flight from ``t_ns[i]`` until ``t_ns[i + 1]``."""

    t_ns: tuple[int, ...]
    values: tuple[float, ...]
    source: str = "label"

    def __post_init__(self) -> None:
        if len(self.t_ns) != len(self.values) or not self.t_ns:
            raise ConfigError("a load series needs at least one step, as many times as values", field="load")
        if len(self.t_ns) > MAX_STEPS:
            raise ConfigError(f"a load series holds at most {MAX_STEPS} steps", field="load.steps")
        if any(b < a for a, b in zip(self.t_ns, self.t_ns[1:], strict=False)):
            raise ConfigError("load steps must be sorted by time", field="load.steps")
        if any(not (math.isfinite(v) and v >= 0.0) for v in self.values):
            raise ConfigError("load values must be finite and non-negative", field="load.steps")
        if self.source not in LOAD_SOURCES:
            raise ConfigError(f"unknown load source {self.source!r}", field="load.source", known=LOAD_SOURCES)

    @classmethod
    def constant(cls, value: float, t0_ns: int = 0, source: str = "label") -> LoadSeries:
        return cls((int(t0_ns),), (float(value),), source)

    def mean(self, t0_ns: int, t1_ns: int) -> float:
        """Time-averaged load over ``[t0_ns, t1_ns]`` (the value at ``t0_ns`` for an empty window).

        Before the first step the load is taken to be the first value.
        """
        ts = np.asarray(self.t_ns, dtype=np.int64)
        vs = np.asarray(self.values, dtype=np.float64)
        i = max(int(np.searchsorted(ts, t0_ns, side="right")) - 1, 0)
        if t1_ns <= t0_ns:
            return float(vs[i])
        j = int(np.searchsorted(ts, t1_ns, side="left"))
        edges = np.concatenate(([t0_ns], ts[i + 1 : j], [t1_ns])).astype(np.float64)
        return float(np.dot(np.diff(edges), vs[i:j] if j > i else vs[i : i + 1]) / (t1_ns - t0_ns))

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": UNIT,
            "source": self.source,
            "steps": [[t, v] for t, v in zip(self.t_ns, self.values, strict=True)],
        }


def load_from_meta(meta: Mapping[str, Any], where: str = "<trace>") -> LoadSeries | None:
    """The trace's load series, None when it has none; :class:`ConfigError` naming ``where`` if malformed."""
    raw = meta.get("load")
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or raw.get("unit", UNIT) != UNIT:
        raise ConfigError(f"trace load must be an object in unit {UNIT!r}", path=where, field="load")
    steps = raw.get("steps")
    if not isinstance(steps, list) or not all(
        isinstance(s, list | tuple) and len(s) == 2 and isinstance(s[0], int) and _is_num(s[1]) for s in steps
    ):
        raise ConfigError("trace load steps must be [[t_ns, value], ...]", path=where, field="load.steps")
    try:
        times = tuple(int(s[0]) for s in steps)
        return LoadSeries(times, tuple(float(s[1]) for s in steps), str(raw.get("source", "label")))
    except ConfigError as exc:
        exc.context.setdefault("path", where)
        raise


def _is_num(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class RunInfo:
    """Which recording session a trace is: thresholds are calibrated by leaving whole runs out."""

    id: str
    node: str
    day: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "node": self.node, "day": self.day}


def run_from_meta(meta: Mapping[str, Any], where: str = "<trace>") -> RunInfo:
    """The trace's run; missing parts are derived from the rest of the metadata (absence is no error)."""
    raw = meta.get("run") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("trace run must be an object", path=where, field="run")
    t0 = meta.get("t_first_ns")
    gpus = meta.get("gpus") or []
    node = str(raw.get("node") or "")
    if not node:
        node = str(gpus[0]) if isinstance(gpus, list) and gpus else "unknown-node"
    day = str(raw.get("day") or "")
    if not day:
        day = day_of(int(t0)) if isinstance(t0, int) else "unknown-day"
    run_id = str(raw.get("id") or "")
    if not run_id:
        run_id = f"{node}@{t0}" if isinstance(t0, int) else where
    return RunInfo(run_id, node, day)


def day_of(t_ns: int) -> str:
    """The UTC calendar day of a wall-clock timestamp."""
    return _dt.datetime.fromtimestamp(t_ns / 1e9, tz=_dt.UTC).strftime("%Y-%m-%d")


def concurrency(intervals: Iterable[tuple[int, int]], t0_ns: int, t1_ns: int) -> float:
    """Time-averaged number of the ``(start_ns, end_ns)`` intervals in flight over ``[t0_ns, t1_ns]``.

    This is how the daemon measures a window's load from its request spans.
    """
    if t1_ns <= t0_ns:
        return float(sum(1 for a, b in intervals if a <= t0_ns <= b))
    total = 0
    for a, b in intervals:
        lo, hi = max(a, t0_ns), min(b, t1_ns)
        if hi > lo:
            total += hi - lo
    return total / (t1_ns - t0_ns)


def series_from_intervals(intervals: Sequence[tuple[int, int]], source: str = "spans") -> LoadSeries:
    """The step function of requests in flight for these ``(start_ns, end_ns)`` intervals."""
    if not intervals:
        return LoadSeries.constant(0.0, 0, source)
    events: dict[int, int] = {}
    for a, b in intervals:
        events[a] = events.get(a, 0) + 1
        events[max(a, b)] = events.get(max(a, b), 0) - 1
    ts, vs, level = [], [], 0
    for t in sorted(events):
        level += events[t]
        ts.append(t)
        vs.append(float(level))
    return LoadSeries(tuple(ts), tuple(vs), source)


class LoadRecorder:
    """Requests in flight on one worker as they change, for the daemon: the proxy calls :meth:`set` on
    every change; :meth:`mean` answers a request window's load. Keeps between ``keep`` and ``2 keep``
    recent changes; before the oldest one kept, nothing is known (None).

    Beside each change it keeps the running integral of the load up to it (exact integers, requests x ns),
    so :meth:`mean` is two bisections and a division however many changes the window holds (under load a
    one-second window holds thousands: summing them per request cost more than the rest of a verdict)."""

    __slots__ = ("_area", "_keep", "_t", "_v")

    def __init__(self, keep: int = 100_000) -> None:
        self._keep = keep
        self._t: list[int] = []
        self._v: list[int] = []
        self._area: list[int] = []  # _area[i]: the integral of the load from _t[0] to _t[i]

    def set(self, t_ns: int, value: int) -> None:
        ts = self._t
        if ts:
            last = ts[-1]
            if t_ns < last:
                t_ns = last  # the wall clock stepped back: keep the history sorted
            self._area.append(self._area[-1] + self._v[-1] * (t_ns - last))
        else:
            self._area.append(0)
        ts.append(t_ns)
        self._v.append(value)
        if len(ts) > 2 * self._keep:
            del ts[: self._keep], self._v[: self._keep], self._area[: self._keep]

    def mean(self, t0_ns: int, t1_ns: int) -> float | None:
        """Time-averaged requests in flight over the window (None: the window predates the history; a
        window starting before the history counts from its first change; an empty window: the value at
        its start)."""
        ts, vs, area = self._t, self._v, self._area
        if not ts or t1_ns < ts[0]:
            return None
        i = max(bisect.bisect_right(ts, t0_ns) - 1, 0)
        t0_ns = max(t0_ns, ts[0])
        if t1_ns <= t0_ns:
            return float(vs[i])
        k = bisect.bisect_left(ts, t1_ns, lo=i) - 1  # the last change before t1_ns
        start = area[i] + vs[i] * (t0_ns - ts[i])
        end = area[k] + vs[k] * (t1_ns - ts[k])
        return (end - start) / (t1_ns - t0_ns)
