"""Load-aware fingerprint profiles, calibrated by leaving whole runs out (docs/profiles.md).

A profile describes one (model, precision, engine, GPU type, regime) as a function of the load (requests
in flight). Enrolment cuts every run (one recording session) into windows, summarises each window by the
median of every feature (:mod:`tmb.fingerprint.summary`), and

* bins the windows by load into **knots** (each enrolled load level, or load quantiles when the load is
  continuous); a knot holds the median of its windows' medians per feature and their sampling noise; the
  expected median at any load inside the enrolled range is the linear interpolation between knots;
* **calibrates by runs**: every run is left out in turn, the curve is rebuilt from the other runs and the
  left-out run's windows are compared with it. The median residual of a run is its *shift* (day, node,
  temperature, interpolation between loads); the spread of its windows around that shift is the window
  noise. ``shift_sd`` (root mean square of the run shifts, widened to its one-sided 90 % upper confidence
  bound for the number of runs) and ``window_sd`` are what scoring divides by, so shifts between runs are
  inside the threshold instead of being taken for a different model;
* floors every scale by a **prior for shifts it has not seen**: with fewer than :data:`MIN_DAYS` distinct
  days among the runs, power and activity features get ±:data:`PRIOR_DAY_SHIFT` of their scale (real
  recordings of one model on one system differ by tens of watts between days), with one node only
  ±:data:`PRIOR_NODE_SHIFT`; memory features get :data:`MEMORY_FLOOR` (allocation is deterministic, not
  day dependent, but differs by driver and allocator granularity).

A profile with fewer than :data:`MIN_RUNS` calibrated runs cannot reach a decision: it says so.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from scipy import stats

from tmb.errors import ConfigError, InputError, ParseError
from tmb.fingerprint.summary import MEMORY_FEATURES, SUMMARY_FEATURES, WindowSummary

FORMAT: Final = "tmb.fingerprint.profile"
VERSION: Final = 2
#: Runs a profile needs (each left out in turn) before it may decide anything.
MIN_RUNS: Final = 3
#: Distinct days (or nodes) the runs must span before the measured shift replaces the prior.
MIN_DAYS: Final = 3
PRIOR_DAY_SHIFT: Final = 0.05
PRIOR_NODE_SHIFT: Final = 0.02
MEMORY_FLOOR: Final = 0.002
#: Quantisation floor: integer watts / percent and MiB readings cannot resolve less.
RESOLUTION_FLOOR: Final = 0.004
#: Windows with less load than this are idle: they say nothing about the model.
MIN_LOAD: Final = 0.5
#: Distinct load levels up to which every level is a knot; above, load quantiles are.
MAX_LEVEL_KNOTS: Final = 32
QUANTILE_KNOTS: Final = 12
#: A load within this fraction (plus a quarter request) beyond the enrolled range still counts as inside.
LOAD_TOLERANCE: Final = 0.1
DEFAULT_FAR: Final = 1e-3
MARGIN_QUANTILE: Final = 0.1


@dataclass(frozen=True)
class Knot:
    """The claimed model's behaviour at one load: per feature, the median window median and its noise."""

    load: float
    location: Mapping[str, float]
    noise: Mapping[str, float]
    windows: int
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "load": self.load,
            "location": dict(self.location),
            "noise": dict(self.noise),
            "windows": self.windows,
            "runs": self.runs,
        }


@dataclass(frozen=True)
class FeatureCalibration:
    """How far genuine windows of a run left out fall from the curve of the other runs."""

    shift_sd: float  # run shifts (root mean square), widened to the upper confidence bound
    window_sd: float  # windows around their run's shift
    floor: float  # prior for shifts not seen, or the resolution
    runs: int  # runs that contributed residuals

    def to_dict(self) -> dict[str, Any]:
        return {
            "shift_sd": self.shift_sd,
            "window_sd": self.window_sd,
            "floor": self.floor,
            "runs": self.runs,
        }


@dataclass(frozen=True)
class LoadProfile:
    """One enrolled identity as a function of load (see the module docstring)."""

    model: str
    precision: str
    engine: str
    gpu_type: str
    regime: str
    knots: tuple[Knot, ...]
    calibration: Mapping[str, FeatureCalibration]
    window_s: float
    target_far: float
    enrolment: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property  # the fields are frozen: computed once
    def key(self) -> str:
        parts = (self.model, self.precision, self.engine, self.gpu_type, self.regime)
        return "/".join(p or "-" for p in parts)

    @functools.cached_property  # the fields are frozen: computed once
    def identity(self) -> tuple[str, str, str]:
        return (self.model, self.precision, self.gpu_type)

    @functools.cached_property  # the fields are frozen: computed once
    def features(self) -> tuple[str, ...]:
        return tuple(f for f in SUMMARY_FEATURES if f in self.calibration)

    @functools.cached_property  # the fields are frozen: computed once
    def runs(self) -> int:
        return min((c.runs for c in self.calibration.values()), default=0)

    @functools.cached_property  # the fields are frozen: computed once
    def load_range(self) -> tuple[float, float]:
        return (self.knots[0].load, self.knots[-1].load) if self.knots else (math.nan, math.nan)

    @property
    def synthetic(self) -> bool:
        return bool(self.enrolment.get("synthetic", False))

    def matches(self, claim: str) -> bool:
        """``model[/precision[/gpu_type]]``: every non-empty part of the claim must be equal."""
        parts = claim.split("/")
        mine = (self.model, self.precision, self.gpu_type)
        return all(not want or want == have for want, have in zip(parts, mine, strict=False))

    def in_range(self, load: float) -> bool:
        if not self.knots:
            return False
        lo, hi = self.load_range
        return lo * (1 - LOAD_TOLERANCE) - 0.25 <= load <= hi * (1 + LOAD_TOLERANCE) + 0.25

    @functools.cached_property
    def _curves(self) -> dict[str, tuple[list[float], list[float], list[float]]]:
        """Per feature: the knots' loads, locations and noises (built once; scoring reads them often)."""
        out: dict[str, tuple[list[float], list[float], list[float]]] = {}
        for name in SUMMARY_FEATURES:
            pts = [(k.load, k.location[name], k.noise[name]) for k in self.knots if name in k.location]
            if pts:
                out[name] = ([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
        return out

    def expected(self, name: str, load: float) -> tuple[float, float] | None:
        """Expected window median of ``name`` at ``load`` and the per-sample noise there (None: no data);
        linear between knots, the end knots' values beyond them."""
        curve = self._curves.get(name)
        if curve is None:
            return None
        xs, locs, noises = curve
        i = bisect.bisect_right(xs, load)
        if i == 0:
            return locs[0], noises[0]
        if i == len(xs):
            return locs[-1], noises[-1]
        f = (load - xs[i - 1]) / (xs[i] - xs[i - 1])
        return locs[i - 1] + f * (locs[i] - locs[i - 1]), noises[i - 1] + f * (noises[i] - noises[i - 1])

    def scale(self, name: str, load: float, n: int) -> float:
        """Standard deviation of a genuine window's median around :meth:`expected` for ``n`` samples."""
        return self.expected_scale(name, load, n)[1]

    def expected_scale(self, name: str, load: float, n: int) -> tuple[tuple[float, float] | None, float]:
        """:meth:`expected` and :meth:`scale` together (one interpolation)."""
        cal = self.calibration[name]
        exp = self.expected(name, load)
        sampling = exp[1] / max(n, 1) if exp is not None else 0.0
        return exp, math.sqrt(cal.shift_sd**2 + max(cal.window_sd**2, sampling) + cal.floor**2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "precision": self.precision,
            "engine": self.engine,
            "gpu_type": self.gpu_type,
            "regime": self.regime,
            "window_s": self.window_s,
            "target_far": self.target_far,
            "knots": [k.to_dict() for k in self.knots],
            "calibration": {name: c.to_dict() for name, c in self.calibration.items()},
            "enrolment": dict(self.enrolment),
        }

    def save(self, path: str | Path) -> None:
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n")
        tmp.replace(target)


def spread_margin(independent: int) -> float:
    """One-sided 90 % upper confidence factor on a spread estimated from ``independent`` values."""
    dof = max(independent, 1)
    return math.sqrt(dof / float(stats.chi2.ppf(MARGIN_QUANTILE, dof)))


# ---------------------------------------------------------------------------------------------- fitting


def fit_knots(windows: Sequence[WindowSummary], run_of: Sequence[str]) -> tuple[Knot, ...]:
    """Knots from windows (idle ones ignored); ``run_of[i]`` names the run of ``windows[i]``."""
    busy = [(w, r) for w, r in zip(windows, run_of, strict=True) if w.load >= MIN_LOAD]
    if not busy:
        return ()
    loads = np.array([w.load for w, _ in busy])
    levels = np.unique(np.round(loads, 3))
    if levels.size <= MAX_LEVEL_KNOTS:
        labels = np.searchsorted(levels, np.round(loads, 3))
    else:
        edges = np.quantile(loads, np.linspace(0, 1, QUANTILE_KNOTS + 1)[1:-1])
        labels = np.searchsorted(edges, loads, side="right")
    knots: list[Knot] = []
    for label in np.unique(labels):
        members = [busy[i] for i in np.flatnonzero(labels == label)]
        location: dict[str, float] = {}
        noise: dict[str, float] = {}
        for name in SUMMARY_FEATURES:
            vals = [w.features[name] for w, _ in members if name in w.features]
            if vals:
                location[name] = float(np.median([v.median for v in vals]))
                noise[name] = float(np.median([v.noise for v in vals]))
        knots.append(
            Knot(
                float(np.median([w.load for w, _ in members])),
                location,
                noise,
                len(members),
                len({r for _, r in members}),
            )
        )
    knots.sort(key=lambda k: k.load)
    return tuple(knots)


def _curve_at(knots: Sequence[Knot], name: str, load: float) -> float | None:
    pts = [(k.load, k.location[name]) for k in knots if name in k.location]
    if not pts:
        return None
    lo, hi = pts[0][0], pts[-1][0]
    if not (lo * (1 - LOAD_TOLERANCE) - 0.25 <= load <= hi * (1 + LOAD_TOLERANCE) + 0.25):
        return None
    return float(np.interp(load, [p[0] for p in pts], [p[1] for p in pts]))


def _floor(name: str, days: int, nodes: int) -> float:
    if name in MEMORY_FEATURES:
        return MEMORY_FLOOR
    if days < MIN_DAYS:
        return PRIOR_DAY_SHIFT
    if nodes < 2:
        return PRIOR_NODE_SHIFT
    return RESOLUTION_FLOOR


def calibrate(
    runs: Mapping[str, Sequence[WindowSummary]], days: int, nodes: int
) -> dict[str, FeatureCalibration]:
    """Leave-one-run-out residuals per feature (module docstring)."""
    shifts: dict[str, list[float]] = {}
    spread: dict[str, list[float]] = {}
    for out_id, out_windows in runs.items():
        others = [(w, r) for r, ws in runs.items() if r != out_id for w in ws]
        knots = fit_knots([w for w, _ in others], [r for _, r in others])
        residuals: dict[str, list[float]] = {}
        for w in out_windows:
            if w.load < MIN_LOAD:
                continue
            for name, fs in w.features.items():
                exp = _curve_at(knots, name, w.load)
                if exp is not None:
                    residuals.setdefault(name, []).append(fs.median - exp)
        for name, res in residuals.items():
            shift = float(np.median(res))
            shifts.setdefault(name, []).append(shift)
            spread.setdefault(name, []).extend(r - shift for r in res)
    present = {name for ws in runs.values() for w in ws for name in w.features}
    out: dict[str, FeatureCalibration] = {}
    for name in SUMMARY_FEATURES:
        if name not in present:
            continue
        s = shifts.get(name, [])
        k = len(s)
        shift_sd = (
            math.sqrt(float(np.mean(np.square(s)))) * spread_margin(k) if k else 0.0
        )  # runs=0: undecided
        window_sd = math.sqrt(float(np.mean(np.square(spread[name])))) if spread.get(name) else 0.0
        out[name] = FeatureCalibration(shift_sd, window_sd, _floor(name, days, nodes), k)
    return out


def enroll_runs(
    runs: Mapping[str, Sequence[WindowSummary]],
    *,
    model: str,
    precision: str = "",
    engine: str = "",
    gpu_type: str = "",
    regime: str = "",
    window_s: float,
    target_far: float = DEFAULT_FAR,
    run_days: Mapping[str, str] | None = None,
    run_nodes: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> LoadProfile:
    """Fit a :class:`LoadProfile` from the window summaries of each run (run id -> windows)."""
    if not model:
        raise InputError("a profile needs a model id")
    if not (0.0 < target_far < 1.0):
        raise InputError("the target false-alarm rate must be between 0 and 1", target_far=target_far)
    pairs = [(w, r) for r, ws in runs.items() for w in ws]
    knots = fit_knots([w for w, _ in pairs], [r for _, r in pairs])
    if not knots:
        raise InputError(
            "no busy window to enrol from: every window was idle (load below 0.5) or too short",
            hint="give the traces a load (tmb telemetry import --load N) and record while serving",
            runs=len(runs),
        )
    days = len(set((run_days or {}).values())) or 1
    nodes = len(set((run_nodes or {}).values())) or 1
    calibration = calibrate(runs, days, nodes)
    busy = [w for w, _ in pairs if w.load >= MIN_LOAD]
    enrolment: dict[str, Any] = {
        "runs": sorted(runs),
        "n_runs": len(runs),
        "days": sorted(set((run_days or {}).values())),
        "nodes": sorted(set((run_nodes or {}).values())),
        "n_windows": len(busy),
        "n_samples": int(sum(w.n_samples for w in busy)),
        "load_range": [knots[0].load, knots[-1].load],
        **(extra or {}),
    }
    return LoadProfile(
        model, precision, engine, gpu_type, regime, knots, calibration, window_s, target_far, enrolment
    )


# ------------------------------------------------------------------------------------------ reading


def load_profile(path: str | Path) -> LoadProfile:
    """Read a profile file; never returns a half-valid profile (docs/profiles.md, Errors)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read profile: {exc}", path=str(p)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"invalid JSON: {exc.msg}", path=str(p), line=exc.lineno, column=exc.colno) from None
    return profile_from_dict(data, str(p))


def _num(data: Mapping[str, Any], key: str, where: str, *, positive: bool = False) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number", path=where, field=key)
    if positive and value <= 0:
        raise ConfigError(f"{key} must be positive", path=where, field=key)
    return float(value)


def profile_from_dict(data: Any, where: str = "<profile>") -> LoadProfile:
    """Validate and build a profile from its JSON object; :class:`ConfigError` names the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(
            f"not a tmb fingerprint profile (format must be {FORMAT!r})", path=where, field="format"
        )
    if data.get("version") != VERSION:
        hint = "profile format 1 is not load-aware: re-enrol with `tmb enroll` (docs/profiles.md)"
        raise ConfigError(
            f"unsupported profile version {data.get('version')!r}", path=where, field="version", hint=hint
        )
    strings = {}
    for key in ("model", "precision", "engine", "gpu_type", "regime"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string", path=where, field=key)
        strings[key] = value
    if not strings["model"]:
        raise ConfigError("model must not be empty", path=where, field="model")
    window_s = _num(data, "window_s", where, positive=True)
    far = _num(data, "target_far", where, positive=True)
    if far >= 1:
        raise ConfigError("target_far must be below 1", path=where, field="target_far")
    raw_knots = data.get("knots")
    if not isinstance(raw_knots, list) or not raw_knots or len(raw_knots) > 4 * MAX_LEVEL_KNOTS:
        raise ConfigError(f"knots must be a list of 1 to {4 * MAX_LEVEL_KNOTS}", path=where, field="knots")
    knots: list[Knot] = []
    for i, raw in enumerate(raw_knots):
        at = f"knots[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError("knot must be an object", path=where, field=at)
        try:
            loc = {str(k): float(v) for k, v in dict(raw["location"]).items()}
            noise = {str(k): float(v) for k, v in dict(raw["noise"]).items()}
            knot = Knot(float(raw["load"]), loc, noise, int(raw["windows"]), int(raw["runs"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid knot: {exc}", path=where, field=at) from None
        values = [knot.load, *loc.values(), *noise.values()]
        if (
            not all(math.isfinite(v) for v in values)
            or set(loc) != set(noise)
            or not set(loc) <= set(SUMMARY_FEATURES)
        ):
            raise ConfigError("knot values must be finite, for known features", path=where, field=at)
        if knots and knot.load <= knots[-1].load:
            raise ConfigError("knots must be sorted by increasing load", path=where, field=at)
        knots.append(knot)
    raw_cal = data.get("calibration")
    if not isinstance(raw_cal, dict) or not raw_cal:
        raise ConfigError("calibration must be a non-empty object", path=where, field="calibration")
    calibration: dict[str, FeatureCalibration] = {}
    for name, raw in raw_cal.items():
        at = f"calibration.{name}"
        if name not in SUMMARY_FEATURES or not isinstance(raw, dict):
            raise ConfigError("unknown feature or not an object", path=where, field=at)
        try:
            cal = FeatureCalibration(
                float(raw["shift_sd"]), float(raw["window_sd"]), float(raw["floor"]), int(raw["runs"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid calibration: {exc}", path=where, field=at) from None
        if not (cal.shift_sd >= 0 and cal.window_sd >= 0 and cal.floor >= 0 and cal.runs >= 0):
            raise ConfigError("calibration values must be non-negative", path=where, field=at)
        calibration[name] = cal
    enrolment = data.get("enrolment", {})
    if not isinstance(enrolment, dict):
        raise ConfigError("enrolment must be an object", path=where, field="enrolment")
    return LoadProfile(
        knots=tuple(knots),
        calibration=calibration,
        window_s=window_s,
        target_far=far,
        enrolment=enrolment,
        **strings,
    )
