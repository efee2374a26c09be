"""Enrolled profiles: one fitted distribution per feature for a (model, precision, engine, GPU, regime).

A profile is saved as versioned JSON (format ``tmb.fingerprint.profile``, version :data:`VERSION`;
``docs/profiles.md`` documents every field). Besides the fits it keeps the held-out enrolment segments
(base64 little-endian float64), because the likelihood-ratio threshold against an alternative profile can
only be calibrated once the alternatives are known, at scoring time.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tmb.errors import ConfigError, Finding, InputError, ParseError, Severity, finding
from tmb.fingerprint.beta import FitError, FloatArray
from tmb.fingerprint.calibrate import DEFAULT_FAR, NullModel, fit_null
from tmb.fingerprint.copula import Copula, fit_copula, normal_scores
from tmb.fingerprint.mixture import BetaMixture, GaussMixture, fit_beta_mixture, fit_gauss_mixture
from tmb.fingerprint.window import prepare
from tmb.telemetry.features import energy_per_token_j, extract
from tmb.telemetry.sample import SampleBatch

FORMAT = "tmb.fingerprint.profile"
VERSION = 1
#: Held-out samples kept per feature and segment (the rest is dropped from the file).
MAX_HELDOUT = 12_000

FeatureValues = Mapping[str, FloatArray]


@dataclass(frozen=True)
class Calibration:
    """The GOF null and threshold for the enrolment window length and target false-alarm rate."""

    window_s: float
    target_far: float
    gof: NullModel
    gof_threshold_z: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "target_far": self.target_far,
            "gof": self.gof.to_dict(),
            "gof_threshold_z": self.gof_threshold_z,
        }


@dataclass(frozen=True)
class Profile:
    """One enrolled behaviour. ``key`` names it; ``identity`` is what a claim is compared with."""

    model: str
    precision: str
    engine: str
    gpu_type: str
    regime: str
    features: Mapping[str, BetaMixture]
    calibration: Calibration
    enrolment: Mapping[str, Any]
    heldout: tuple[Mapping[str, FloatArray], ...]
    copula: Copula | None = None
    energy_per_token: GaussMixture | None = None
    version: int = VERSION
    source_path: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return "/".join(
            p or "-" for p in (self.model, self.precision, self.engine, self.gpu_type, self.regime)
        )

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.model, self.precision, self.gpu_type)

    @property
    def rate_hz(self) -> float:
        return float(self.enrolment.get("rate_hz", 20.0))

    def matches(self, claim: str) -> bool:
        """Whether ``claim`` (``model[/precision[/gpu_type]]``, empty parts wildcards) names this profile."""
        parts = claim.split("/")
        if len(parts) > len(self.identity):
            return False
        return all(not want or want == have for want, have in zip(parts, self.identity, strict=False))

    def scores(self, values: FeatureValues, names: Collection[str]) -> dict[str, FloatArray]:
        """Normal scores of the (copula) features among ``names`` (see :mod:`tmb.fingerprint.copula`)."""
        out = {}
        for f in names:
            if f in values and f in self.features and (self.copula is None or f in self.copula.names):
                m0, m1, _mi = self.features[f].components[0].masses()
                out[f] = normal_scores(values[f], self.features[f].cdf, m0, m1)
        return out

    def series(
        self, values: FeatureValues, names: Collection[str] | None = None, *, copula: bool = True
    ) -> FloatArray:
        """Joint per-sample log-likelihood over the profile's features in ``values`` (and ``names``).

        Feature arrays are taken as aligned sample by sample and truncated to the shortest; the copula
        term is added when ``copula`` is true and the profile has one.
        """
        use = [f for f in self.features if f in values and (names is None or f in names)]
        if not use:
            return np.zeros(0)
        n = min(values[f].size for f in use)
        cut = {f: values[f][:n] for f in use}
        total = np.zeros(n)
        for f in use:
            total += self.features[f].logpdf(cut[f])
        if copula and self.copula is not None:
            total += self.copula.logdensity(self.scores(cut, use))
        return total

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": self.version,
            "model": self.model,
            "precision": self.precision,
            "engine": self.engine,
            "gpu_type": self.gpu_type,
            "regime": self.regime,
            "features": {name: dist.to_dict() for name, dist in self.features.items()},
            "calibration": self.calibration.to_dict(),
            "enrolment": dict(self.enrolment),
            "heldout": {
                "encoding": "base64-f64le",
                "segments": [{k: _b64(v) for k, v in seg.items()} for seg in self.heldout],
            },
        }
        if self.copula is not None:
            out["copula"] = self.copula.to_dict()
        if self.energy_per_token is not None:
            out["energy_per_token_j"] = self.energy_per_token.to_dict()
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _b64(arr: FloatArray) -> str:
    return base64.b64encode(np.asarray(arr, dtype="<f8").tobytes()).decode("ascii")


def _unb64(text: Any, where: str) -> FloatArray:
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{where}: invalid base64 ({exc})") from None
    if len(raw) % 8:
        raise ValueError(f"{where}: length {len(raw)} is not a multiple of 8")
    arr = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not bool(np.all(np.isfinite(arr))) or bool(np.any((arr < 0) | (arr > 1))):
        raise ValueError(f"{where}: values must be finite fractions")
    return arr


def load_profile(path: str | Path) -> Profile:
    """Read a profile file; a corrupt file or another format version raises an error naming file and field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read profile {p}: {exc}", path=str(p)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"profile {p} is not valid JSON: {exc.msg}", path=str(p), line=exc.lineno, column=exc.colno
        ) from None
    return profile_from_dict(data, str(p))


def profile_from_dict(data: Any, where: str = "<profile>") -> Profile:
    """Validate and build a :class:`Profile`; raises :class:`ConfigError` naming the bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"profile {where} is not a JSON object", path=where, field="/")
    if data.get("format") != FORMAT:
        raise ConfigError(
            f"profile {where} is not a tmb profile", path=where, field="format", got=data.get("format")
        )
    if data.get("version") != VERSION:
        raise ConfigError(
            f"profile {where} has format version {data.get('version')!r}; this tmb reads version {VERSION}",
            path=where,
            field="version",
            hint="re-enrol the profile with this version of tmb",
        )
    current = "model"
    try:
        strings = {}
        for key in ("model", "precision", "engine", "gpu_type", "regime"):
            current = key
            value = data[key]
            if not isinstance(value, str):
                raise ValueError("expected a string")
            strings[key] = value
        if not strings["model"]:
            raise ValueError("model must not be empty")
        current = "features"
        feats = data["features"]
        if not isinstance(feats, dict) or not feats:
            raise ValueError("expected a non-empty object")
        features: dict[str, BetaMixture] = {}
        for name, spec in feats.items():
            current = f"features.{name}"
            features[name] = BetaMixture.from_dict(spec)
        current = "calibration"
        cal = data["calibration"]
        calibration = Calibration(
            float(cal["window_s"]),
            float(cal["target_far"]),
            NullModel.from_dict(cal["gof"]),
            float(cal["gof_threshold_z"]),
        )
        if not (0.0 < calibration.target_far < 1.0 and calibration.window_s > 0.0):
            raise ValueError("target_far must be in (0, 1) and window_s positive")
        current = "enrolment"
        enrolment = data["enrolment"]
        if not isinstance(enrolment, dict):
            raise ValueError("expected an object")
        current = "heldout"
        held = data["heldout"]
        if held.get("encoding") != "base64-f64le":
            raise ValueError(f"unknown encoding {held.get('encoding')!r}")
        segments = []
        for i, seg in enumerate(held["segments"]):
            current = f"heldout.segments[{i}]"
            segments.append({k: _unb64(v, k) for k, v in seg.items()})
        copula = None
        if "copula" in data:
            current = "copula"
            copula = Copula.from_dict(data["copula"])
            if not set(copula.names) <= set(features):
                raise ValueError("copula names features the profile does not have")
        energy = None
        if "energy_per_token_j" in data:
            current = "energy_per_token_j"
            energy = GaussMixture.from_dict(data["energy_per_token_j"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(
            f"profile {where}: invalid field {current!r}: {detail}", path=where, field=current
        ) from None
    return Profile(
        features=features,
        calibration=calibration,
        enrolment=enrolment,
        heldout=tuple(segments),
        copula=copula,
        energy_per_token=energy,
        source_path=where,
        model=strings["model"],
        precision=strings["precision"],
        engine=strings["engine"],
        gpu_type=strings["gpu_type"],
        regime=strings["regime"],
    )


def _trace_features(trace: SampleBatch | Mapping[str, Any]) -> tuple[dict[str, Any], float | None, str]:
    if isinstance(trace, SampleBatch):
        fs = extract(trace)
        rate = None
        if len(trace) > 1 and len(trace.gpus) == 1:
            span = float(trace.t_ns[-1] - trace.t_ns[0]) / 1e9
            rate = (len(trace) - 1) / span if span > 0 else None
        return fs.aligned(), rate, trace.source
    return dict(trace), None, "features"


def enroll(
    model_id: str,
    traces: Sequence[SampleBatch | Mapping[str, Any]],
    *,
    precision: str = "",
    engine: str = "",
    gpu_type: str = "",
    regime: str = "",
    tokens: Sequence[int] | None = None,
    window_s: float = 10.0,
    target_far: float = DEFAULT_FAR,
    heldout_fraction: float = 0.3,
    rate_hz: float | None = None,
    max_components: int = 2,
) -> tuple[Profile, list[Finding]]:
    """Fit a profile from traces (sample batches, or feature arrays by name at ``rate_hz``).

    The first ``1 - heldout_fraction`` of every trace is fitted; the rest is held out to calibrate the
    goodness-of-fit threshold for ``window_s`` windows at ``target_far`` (and, at scoring time, the
    likelihood-ratio thresholds). ``tokens`` (one count per trace) adds energy per generated token.
    Returns the profile and the findings raised while cleaning the data.
    """
    if not model_id:
        raise InputError("model id must not be empty")
    if not traces:
        raise InputError("no traces to enrol from")
    if not 0.05 <= heldout_fraction <= 0.8:
        raise InputError("heldout_fraction must be within [0.05, 0.8]", got=heldout_fraction)
    if tokens is not None and len(tokens) != len(traces):
        raise InputError("tokens needs one count per trace", traces=len(traces), tokens=len(tokens))
    found: list[Finding] = []
    fit_parts: dict[str, list[FloatArray]] = {}
    heldout: list[dict[str, FloatArray]] = []
    fit_aligned: list[dict[str, FloatArray]] = []
    rates: list[float] = []
    sources: set[str] = set()
    synthetic = False
    n_samples = 0
    # With enough traces whole traces are held out (every ``every``-th one), so the null spread includes
    # the variation between sessions; otherwise the tail of every trace is.
    every = max(2, round(1.0 / heldout_fraction))
    whole = len(traces) >= every
    for index, trace in enumerate(traces):
        raw, rate, source = _trace_features(trace)
        sources.add(source)
        synthetic = synthetic or (isinstance(trace, SampleBatch) and trace.synthetic)
        if rate is not None:
            rates.append(rate)
        clean, notes = prepare(raw)
        found.extend(_with_trace(notes, index))
        seg: dict[str, FloatArray] = {}
        fit_seg: dict[str, FloatArray] = {}
        for name, values in clean.items():
            if whole:
                cut = 0 if index % every == every - 1 else values.size
            else:
                cut = round(values.size * (1.0 - heldout_fraction))
            fit_parts.setdefault(name, []).append(values[:cut])
            fit_seg[name] = values[:cut]
            seg[name] = values[cut:][:MAX_HELDOUT]
            n_samples = max(n_samples, values.size)
        if any(v.size for v in seg.values()):
            heldout.append(seg)
        if any(v.size for v in fit_seg.values()):
            fit_aligned.append(fit_seg)
    rate_used = float(rate_hz if rate_hz is not None else (np.median(rates) if rates else 20.0))
    features: dict[str, BetaMixture] = {}
    stats: dict[str, Any] = {}
    for name, parts in fit_parts.items():
        values = np.concatenate(parts)
        if values.size < 50:
            raise InputError(f"feature {name!r} has {values.size} enrolment samples, need 50", feature=name)
        try:
            features[name] = fit_beta_mixture(values, max_components=max_components)
        except FitError as exc:
            # E.g. one repeated interior value (a stuck counter): leave the feature out, say so.
            found.append(
                finding(
                    "fingerprint.feature_not_fitted",
                    f"feature {name!r} left out of the profile: {exc.message}",
                    severity=Severity.WARNING,
                    feature=name,
                )
            )
            continue
        stats[name] = {"n_fit": int(values.size), "mean": float(values.mean()), "sd": float(values.std())}
    if not features:
        raise InputError("the traces hold no usable feature")
    window_n = max(round(window_s * rate_used), 2)
    draft = Profile(model_id, precision, engine, gpu_type, regime, features, _PLACEHOLDER, {}, ())
    copula = fit_copula([draft.scores(_aligned(p), features) for p in fit_aligned if _aligned(p)])
    draft = Profile(model_id, precision, engine, gpu_type, regime, features, _PLACEHOLDER, {}, (), copula)
    gof = fit_null([draft.series(seg) for seg in heldout], window_n, alpha=target_far / 2.0)
    calibration = Calibration(window_s, target_far, gof, gof.threshold(target_far / 2.0))
    energy = None
    if tokens is not None:
        per_token = [
            e
            for t, tok in zip(traces, tokens, strict=True)
            if isinstance(t, SampleBatch)
            and (e := energy_per_token_j(t, tok)) is not None
            and math.isfinite(e)
        ]
        if len(per_token) >= 2:
            energy = fit_gauss_mixture(per_token, max_components=1)
    enrolment = {
        "n_traces": len(traces),
        "n_samples": n_samples,
        "rate_hz": rate_used,
        "heldout_fraction": heldout_fraction,
        "heldout_split": "whole traces" if whole else "trace tails",
        "sources": sorted(sources),
        "synthetic": synthetic,
        "features": stats,
    }
    profile = Profile(
        model_id,
        precision,
        engine,
        gpu_type,
        regime,
        features,
        calibration,
        enrolment,
        tuple(heldout),
        copula,
        energy,
    )
    return profile, found


_PLACEHOLDER = Calibration(1.0, DEFAULT_FAR, NullModel(0.0, 1.0, 0.0, 0.0, 1.0, 0, 1), 0.0)


def _aligned(seg: FeatureValues) -> dict[str, FloatArray]:
    """The segment when all its features have the same length (sample-aligned), else empty."""
    sizes = {v.size for v in seg.values()}
    return dict(seg) if len(sizes) == 1 else {}


def _with_trace(notes: list[Finding], index: int) -> list[Finding]:
    return [Finding(f.id, f.message, f.severity, {**f.context, "trace": index}) for f in notes]
