"""The report's telemetry section: the request window judged against the enrolled load-aware profiles.

For a bundle that carries a telemetry window (``telemetry``), the profiles and the claimed model, the window
is judged exactly as the daemon judges it: :func:`tmb.fingerprint.summarise` at the window's load, then
:meth:`tmb.fingerprint.Judge.judge`. The load is the manifest's ``load`` when present, else the signed
verdict's ``fingerprint.load``, else 1 request in flight (the daemon's own default); the summary says which.

Figures, per feature of the claimed profile that the window has:

* the profile's expected median as a function of load (linear through its knots, flat beyond them inside
  the load range the judge accepts) with the acceptance band ``± threshold · scale`` at the window's sample
  count, the closest alternative's curve dashed, and the window's median as a point at its load;
* the window's own distribution: its histogram (interior values as a density, exact 0 and 1 as bars of
  their share) with a zero/one-inflated beta mixture fitted to it (:func:`tmb.fingerprint.fit_beta_mixture`)
  and a vertical line at the claimed profile's expected median.

A last figure shows the window over time. matplotlib runs on the Agg backend; each figure is a PNG embedded
as a ``data:`` URI, so the page stays self-contained. The outcome is statistical evidence, not a proof.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tmb.errors import InputError, Severity, TmbError
from tmb.report.html import Plot, TelemetrySection

if TYPE_CHECKING:
    from tmb.attest.evidence import Bundle
    from tmb.fingerprint import Judgement, LoadProfile, WindowSummary
    from tmb.fingerprint.beta import FloatArray
    from tmb.telemetry.sample import SampleBatch

#: The load when neither the manifest nor the verdict records one: the request itself (as the daemon does).
DEFAULT_LOAD = 1.0
_BINS = 40


@dataclass(frozen=True)
class WindowLoad:
    """The window's load (requests in flight) and where it came from."""

    value: float
    source: str  # "manifest", "verdict" or "default"

    def describe(self) -> str:
        return {
            "manifest": "from the bundle manifest",
            "verdict": "from the signed verdict",
        }.get(self.source, f"not recorded: assumed {DEFAULT_LOAD:g} request in flight")


def window_load(bundle: Bundle) -> WindowLoad:
    """The manifest's ``load``, else the verdict's ``fingerprint.load``, else :data:`DEFAULT_LOAD`.

    InputError naming the file when the verdict cannot be read or its load is not a number >= 0."""
    if bundle.load is not None:
        return WindowLoad(bundle.load, "manifest")
    if bundle.verdict is None:
        return WindowLoad(DEFAULT_LOAD, "default")
    path = Path(bundle.verdict)
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read the verdict: {exc.strerror}", path=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the verdict is not JSON: {exc}", path=str(path)) from None
    fingerprint = doc.get("fingerprint") if isinstance(doc, dict) else None
    raw = fingerprint.get("load") if isinstance(fingerprint, dict) else None
    if raw is None:
        return WindowLoad(DEFAULT_LOAD, "default")
    try:
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise ValueError(raw)
        value = float(raw)  # a decimal string in the signed encoding
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InputError(
            "the verdict's fingerprint.load must be a number >= 0 (requests in flight)",
            path=str(path),
            key="fingerprint.load",
            got=raw,
        )
    return WindowLoad(value, "verdict")


def _read_batch(path: Path) -> SampleBatch:
    from tmb.telemetry.sample import SampleBatch

    try:
        return SampleBatch.decode(path.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read the telemetry window: {exc.strerror}", path=str(path)) from None
    except TmbError as exc:
        raise InputError(
            f"the telemetry window is not a sample batch: {exc.message}", path=str(path)
        ) from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise InputError(f"the telemetry window is not a sample batch: {exc}", path=str(path)) from None


def _read_profiles(paths: Sequence[Path]) -> list[LoadProfile]:
    from tmb.fingerprint import load_profile

    out = []
    for path in paths:
        try:
            out.append(load_profile(path))
        except InputError:
            raise  # names the file (and the field) already
        except TmbError as exc:
            raise InputError(f"cannot read profile: {exc.message}", path=str(path)) from None
    return out


def telemetry_section(bundle: Bundle, *, plots: bool = True) -> TelemetrySection | None:
    """The section for a bundle with a telemetry window, else None. InputError for anything unreadable.

    ``plots=False`` leaves the pictures out (text and JSON audits): no matplotlib, no [report] extra."""
    if bundle.telemetry is None:
        return None
    from tmb.fingerprint import Judge, summarise

    batch = _read_batch(Path(bundle.telemetry))
    profiles = _read_profiles(bundle.profiles)
    load = window_load(bundle)
    claimed = bundle.claimed or ""
    try:
        summary = summarise(batch, load.value)
    except (TmbError, ValueError) as exc:
        text = exc.message if isinstance(exc, TmbError) else str(exc)
        raise InputError(
            f"cannot summarise the telemetry window: {text}", path=str(bundle.telemetry)
        ) from None
    judgement: Judgement | None = None
    if not claimed:
        text = "no claimed model in the bundle: the window is not judged"
    elif not profiles:
        text = f"no enrolled profile in the bundle: the window is not judged against {claimed}"
    else:
        try:
            judgement = Judge(profiles).judge(claimed, summary)
        except TmbError as exc:
            raise InputError(
                f"cannot judge the telemetry window: {exc.message}", bundle=str(bundle.root)
            ) from None
    own = _claimed_profile(profiles, claimed, judgement)
    alt = _alternative(profiles, judgement)
    if judgement is not None:
        text = _summary(judgement, load, alt)
    pictures = _plots(batch, summary, judgement, own, alt) if plots else []
    # As in a verdict: `inconsistent` fails; `inconclusive` leaves a chain that held standing (the section
    # says why the fingerprint could not decide); no judgement or no profile for the claim fails closed.
    unprofiled = judgement is not None and any(f.id == "fingerprint.no_profile" for f in judgement.findings)
    ok = judgement is not None and judgement.decision != "inconsistent" and not unprofiled
    decision = judgement.decision if judgement is not None else "not_judged"
    return TelemetrySection(text, ok, tuple(pictures), batch.synthetic, decision)


# ---------------------------------------------------------------------------------------------- summary


def _summary(j: Judgement, load: WindowLoad, alt: LoadProfile | None) -> str:
    head = {
        "consistent": f"consistent with {j.claimed}",
        "inconsistent": f"inconsistent with {j.claimed}",
    }.get(j.decision, f"inconclusive for {j.claimed}")
    if j.profile:
        head += f" (profile {j.profile})"
    parts = [f"{head} at load {j.load:.3g} ({load.describe()})"]
    if math.isfinite(j.statistic):
        worst = max(j.deviations, key=lambda k: abs(j.deviations[k]), default=None)
        at = f" ({worst})" if worst else ""
        parts.append(f"max |z| {j.statistic:.2f}{at} vs threshold {j.threshold:.2f}")
    parts.append(f"{j.n_samples} samples, {j.window_s:.1f} s")
    if j.power is not None:
        against = f" against the nearest alternative {alt.key}" if alt is not None else ""
        parts.append(f"power {j.power:.2f}{against}")
    if j.decision == "inconsistent" and j.best_alternative:
        parts.append(f"closest enrolled: {j.best_alternative}")
    if j.decision == "inconclusive":
        why = next((f for f in j.findings if f.severity is not Severity.INFO), None)
        parts.append(f"cannot decide: {why.message if why else 'too little power'}")
    return "; ".join(parts)


def _claimed_profile(
    profiles: Sequence[LoadProfile], claimed: str, j: Judgement | None
) -> LoadProfile | None:
    """The profile the judge scored against, else the first one matching the claim (to draw it anyway)."""
    if j is not None and j.profile is not None:
        found = next((p for p in profiles if p.key == j.profile), None)
        if found is not None:
            return found
    return next((p for p in profiles if claimed and p.matches(claimed)), None)


def _alternative(profiles: Sequence[LoadProfile], j: Judgement | None) -> LoadProfile | None:
    """The alternative the judge names when inconsistent; else the one its power refers to."""
    key = j.best_alternative or j.power_against if j is not None else None
    return next((p for p in profiles if p.key == key), None) if key else None


# ------------------------------------------------------------------------------------------------ plots


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _threshold(j: Judgement | None, own: LoadProfile, names: Sequence[str]) -> float:
    from tmb.fingerprint.judge import threshold

    if j is not None and math.isfinite(j.threshold):
        return j.threshold
    return threshold(j.false_alarm_rate if j is not None else own.target_far, len(names))


def _accepted_loads(profile: LoadProfile) -> tuple[float, float]:
    """The load range the judge accepts for ``profile`` (its knots widened by the tolerance)."""
    from tmb.fingerprint.loadprofile import LOAD_TOLERANCE

    lo, hi = profile.load_range
    return max(0.0, lo * (1 - LOAD_TOLERANCE) - 0.25), hi * (1 + LOAD_TOLERANCE) + 0.25


def _plots(
    batch: SampleBatch,
    window: WindowSummary,
    j: Judgement | None,
    own: LoadProfile | None,
    alt: LoadProfile | None,
) -> list[Plot]:
    import matplotlib

    matplotlib.use("Agg")
    from tmb.fingerprint.summary import SUMMARY_FEATURES, sample_features

    per_sample = sample_features(batch)
    values = {k: v[np.isfinite(v)] for k, v in per_sample.items()}
    if own is not None:
        names = [f for f in own.features if f in window.features]
    else:
        names = [f for f in SUMMARY_FEATURES if f in window.features]
    plots: list[Plot] = []
    thr = _threshold(j, own, names) if own is not None and names else math.nan
    for name in names:
        if own is not None:
            plots.append(_load_plot(name, window, own, alt, thr))
        if values.get(name) is not None and values[name].size:
            plots.append(_distribution_plot(name, values[name], window, own))
    timeline = _timeline(batch, per_sample)
    if timeline is not None:
        plots.append(timeline)
    return plots


def _load_plot(
    name: str, window: WindowSummary, own: LoadProfile, alt: LoadProfile | None, thr: float
) -> Plot:
    import matplotlib.pyplot as plt

    fs = window.features[name]
    load = window.load
    lo, hi = _accepted_loads(own)
    ranges = [(lo, hi)]
    if alt is not None and name in alt.features:
        ranges.append(_accepted_loads(alt))
    x_lo = min(min(r[0] for r in ranges), load)
    x_hi = max(max(r[1] for r in ranges), load)
    pad = 0.05 * max(x_hi - x_lo, 1.0)
    fig, ax = plt.subplots(figsize=(5.2, 2.8))
    try:
        xs = np.linspace(lo, hi, 200)
        curve = [own.expected(name, x) for x in xs]
        med = np.array([c[0] if c else math.nan for c in curve])
        band = np.array([thr * own.scale(name, x, fs.n) for x in xs])
        ax.fill_between(
            xs, med - band, med + band, color="#c9dcef", label=f"acceptance band (±{thr:.2f} scales)"
        )
        ax.plot(xs, med, "-", color="#2b5d8a", lw=1.6, label=f"claimed: {own.key}")
        knots = [(k.load, k.location[name]) for k in own.knots if name in k.location]
        ax.plot([k[0] for k in knots], [k[1] for k in knots], "o", color="#2b5d8a", ms=3.5)
        if alt is not None and name in alt.features:
            a_lo, a_hi = _accepted_loads(alt)
            a_xs = np.linspace(a_lo, a_hi, 200)
            a_med = [e[0] if (e := alt.expected(name, x)) else math.nan for x in a_xs]
            ax.plot(a_xs, a_med, "--", color="#b5533c", lw=1.4, label=f"closest alternative: {alt.key}")
        expected = own.expected(name, load)
        z = (fs.median - expected[0]) / own.scale(name, load, fs.n) if expected else math.nan
        outside = math.isfinite(thr) and math.isfinite(z) and abs(z) > thr
        ax.plot(
            [load],
            [fs.median],
            "D",
            color="#c0392b" if outside else "#1e7b34",
            ms=6,
            label=f"window (z = {z:+.2f})" if math.isfinite(z) else "window",
            zorder=5,
        )
        ax.set_xlim(max(0.0, x_lo - pad), x_hi + pad)
        ax.set_xlabel("load (requests in flight)")
        ax.set_ylabel(f"{name} (window median)")
        ax.legend(fontsize=7, loc="best")
        caption = f"window median {fs.median:.4f} at load {load:.3g} ({fs.n} samples)"
        if expected:
            scale = own.scale(name, load, fs.n)
            caption += (
                f"; expected {expected[0]:.4f}, scale {scale:.4f} at {fs.n} samples, z = {z:+.2f}"
                f" (threshold {thr:.2f})"
            )
        caption += f"; knots at load {', '.join(f'{k[0]:.3g}' for k in knots)}"
        return Plot(f"{name}: expected median vs load", _png(fig), caption)
    finally:
        plt.close(fig)


def _distribution_plot(name: str, x: FloatArray, window: WindowSummary, own: LoadProfile | None) -> Plot:
    import matplotlib.pyplot as plt

    from tmb.fingerprint import FitError, fit_beta_mixture

    expected = own.expected(name, window.load) if own is not None and name in own.features else None
    claimed_key = own.key if own is not None else ""
    marks = [float(x.min()), float(x.max())] + ([expected[0]] if expected else [])
    lo, hi = min(marks), max(marks)
    pad = max(0.03, 0.1 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    width = (hi - lo) / _BINS
    fig, ax = plt.subplots(figsize=(5.2, 2.8))
    try:
        inner = x[(x > 0) & (x < 1)]
        if inner.size:
            weights = np.full(inner.size, 1.0 / (x.size * width))  # interior share, as a density
            ax.hist(inner, bins=_BINS, range=(lo, hi), weights=weights, color="#8fb3d9", label="window")
        for atom in (0.0, 1.0):
            share = float(np.mean(x == atom))
            if share and lo <= atom <= hi:
                at = atom + (width / 2 if atom == 0.0 else -width / 2)  # drawn inside the axes
                ax.bar([at], [share / width], width=width, color="#2b5d8a", label=f"window: exactly {atom:g}")
        try:
            mix = fit_beta_mixture(x)
        except FitError as exc:
            fit_note = f"no beta mixture fitted: {exc.message}"
        except (ValueError, ArithmeticError) as exc:
            fit_note = f"no beta mixture fitted: {exc}"
        else:
            grid = np.linspace(max(lo, 1e-4), min(hi, 1 - 1e-4), 400)
            with np.errstate(all="ignore"):
                density = np.exp(mix.logpdf(grid))
            ax.plot(grid, density, "-", color="#1c2430", lw=1.4, label=f"beta mixture ({mix.k} comp.)")
            p0, p1 = mix.components[0].p0, mix.components[0].p1
            state = "converged" if mix.converged else "NOT converged"
            fit_note = (
                f"fitted zero/one-inflated beta mixture: {mix.k} component(s), weights "
                f"{', '.join(f'{w:.2f}' for w in mix.weights)}, P(0) {p0:.3f}, P(1) {p1:.3f}, {state}"
                + (f" after {mix.iterations} EM iterations" if mix.k > 1 else "")
            )
        if expected:
            ax.axvline(expected[0], color="#2b5d8a", ls="-", lw=1.6, label=f"claimed median ({claimed_key})")
        if name in window.features:
            ax.axvline(window.features[name].median, color="#c0392b", ls=":", lw=1.4, label="window median")
        ax.set_xlim(lo, hi)
        ax.set_xlabel(f"{name} (fraction of scale)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="best")
        caption = f"{x.size} samples; {fit_note}"
        if expected:
            caption += f"; claimed profile's expected median at load {window.load:.3g}: {expected[0]:.4f}"
        return Plot(f"{name}: the window's distribution", _png(fig), caption)
    finally:
        plt.close(fig)


def _timeline(batch: SampleBatch, values: Mapping[str, FloatArray]) -> Plot | None:
    import matplotlib.pyplot as plt

    from tmb.fingerprint.summary import SUMMARY_FEATURES

    names = [f for f in SUMMARY_FEATURES if f in values and bool(np.isfinite(values[f]).any())]
    if not len(batch) or not names:
        return None
    t = (batch.t_ns.astype(np.float64) - float(batch.t_ns[0])) / 1e9
    fig, ax = plt.subplots(figsize=(5.2, 2.6))
    try:
        for name in names:
            ax.plot(t, values[name], lw=1.0, label=name)
        ax.set_xlabel("seconds into the window")
        ax.set_ylim(-0.02, 1.05)
        ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        return Plot("the window over time", _png(fig), f"{len(batch)} samples from {batch.source}")
    finally:
        plt.close(fig)
