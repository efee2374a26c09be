"""The report's telemetry section: the request window's features against the enrolled profiles.

For a bundle that carries a telemetry window (``telemetry``), the profiles and the claimed model, the window
is scored as the daemon scores it (:class:`tmb.fingerprint.Scorer`), and every feature of the claimed
profile is drawn: the window's histogram (interior values, as a density; exact 0 and 1 as bars of their
share) against the claimed profile's fitted zero/one-inflated beta mixture and the best-fitting
alternative's. A last figure shows the window over time. matplotlib runs on the Agg backend; each figure
is a PNG embedded as a ``data:`` URI, so the page stays self-contained.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tmb.errors import InputError, ParseError, TmbError
from tmb.report.html import Plot, TelemetrySection

if TYPE_CHECKING:
    from tmb.attest.evidence import Bundle
    from tmb.fingerprint import Profile
    from tmb.fingerprint.mixture import BetaMixture
    from tmb.fingerprint.score import Score

PLOT_FEATURES_ORDER = ("power_frac", "gpu_util", "mem_util", "sm_active", "tensor_active", "dram_active")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pdf(mix: BetaMixture, grid: np.ndarray) -> np.ndarray:
    """Density of the mixture's interior part on ``grid`` (already weighted by the interior mass)."""
    return np.exp(mix.logpdf(grid))


def _summary(score: Score) -> str:
    if score.decision == "consistent":
        head = f"consistent with {score.claimed}"
    elif score.decision == "inconsistent":
        alt = f"; closest enrolled: {score.best_alternative}" if score.best_alternative else ""
        head = f"inconsistent with {score.claimed}{alt}"
    else:
        head = f"not enough telemetry to judge {score.claimed}"
    p = f"p = {score.p_value:.3g}, " if math.isfinite(score.p_value) else ""
    return f"{head} ({p}{score.n_samples} samples, {score.window_s:.1f} s, FAR {score.false_alarm_rate:g})"


def _alternative(profiles: list[Profile], score: Score) -> Profile | None:
    if score.best_alternative is None:
        return None
    return next((p for p in profiles if p.key == score.best_alternative), None) or next(
        (p for p in profiles if score.best_alternative.startswith("/".join(p.identity))), None
    )


def telemetry_section(bundle: Bundle) -> TelemetrySection | None:
    """The section for a bundle with a telemetry window, else None. InputError for an unreadable one."""
    if bundle.telemetry is None:
        return None
    from tmb.fingerprint import Scorer, load_profile
    from tmb.telemetry.features import extract
    from tmb.telemetry.sample import SampleBatch

    try:
        batch = SampleBatch.decode(Path(bundle.telemetry).read_bytes())
    except OSError as exc:
        raise InputError(
            f"cannot read the telemetry window: {exc.strerror}", path=str(bundle.telemetry)
        ) from None
    except (ParseError, ValueError) as exc:
        raise InputError(
            f"the telemetry window is not a sample batch: {exc}", path=str(bundle.telemetry)
        ) from None
    profiles = [load_profile(p) for p in bundle.profiles]
    values = extract(batch).values
    claimed = bundle.claimed or ""
    seconds = (int(batch.t_ns[-1]) - int(batch.t_ns[0])) / 1e9 if len(batch) > 1 else None
    score: Score | None = None
    if profiles and claimed and any(p.matches(claimed) for p in profiles):
        try:
            score = Scorer(profiles).score(claimed, values, window_s=seconds)
        except TmbError as exc:
            raise InputError(
                f"cannot score the telemetry window: {exc.message}", bundle=str(bundle.root)
            ) from None
    if score is None:
        summary, ok = (
            f"no enrolled profile for the claimed model {claimed or '(none given)'}: not scored",
            False,
        )
    else:
        summary, ok = _summary(score), score.decision == "consistent"
    own = next((p for p in profiles if score is not None and p.key == score.profile), None)
    if own is None:
        own = next((p for p in profiles if claimed and p.matches(claimed)), None)
    alt = _alternative(profiles, score) if score is not None else None
    plots = _plots(batch, values, own, alt)
    return TelemetrySection(summary, ok, tuple(plots), batch.synthetic)


def _plots(batch: Any, values: dict[str, np.ndarray], own: Profile | None, alt: Profile | None) -> list[Plot]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: list[Plot] = []
    names = [f for f in PLOT_FEATURES_ORDER if f in values and values[f].size]
    grid = np.linspace(0.002, 0.998, 400)
    for name in names:
        x = values[name]
        fig, ax = plt.subplots(figsize=(5.2, 2.8))
        try:
            inner = x[(x > 0) & (x < 1)]
            if inner.size:
                weight = np.full(inner.size, 1.0 / x.size)  # interior share of the window, as a density
                ax.hist(inner, bins=40, range=(0, 1), weights=weight * 40, color="#8fb3d9", label="window")
            for atom, at in ((0.0, 0.0), (1.0, 1.0)):
                share = float(np.mean(x == atom))
                if share:
                    ax.bar(
                        [at], [share * 40], width=0.025, color="#2b5d8a", label=f"window: exactly {atom:g}"
                    )
            for profile, style, label in ((own, "-", "claimed profile"), (alt, "--", "closest alternative")):
                if profile is not None and name in profile.features:
                    ax.plot(
                        grid,
                        _pdf(profile.features[name], grid),
                        style,
                        lw=1.6,
                        label=f"{label} ({profile.key})",
                    )
            ax.set_xlim(0, min(1.0, max(0.15, float(x.max()) * 1.4 + 0.05)))  # zoom on where the data is
            ax.set_xlabel(f"{name} (fraction of scale)")
            ax.set_ylabel("density")
            ax.legend(fontsize=7, loc="upper left")
            caption = f"{x.size} samples; mean {float(np.mean(x)):.3f}"
            plots.append(Plot(f"{name}: window vs enrolled distribution", _png(fig), caption))
        finally:
            plt.close(fig)
    if len(batch) and names:
        t = (batch.t_ns.astype(np.float64) - float(batch.t_ns[0])) / 1e9
        fig, ax = plt.subplots(figsize=(5.2, 2.6))
        try:
            for name in names:
                if values[name].size == len(batch):
                    ax.plot(t, values[name], lw=1.0, label=name)
            ax.set_xlabel("seconds into the window")
            ax.set_ylim(-0.02, 1.05)
            ax.legend(fontsize=7, ncol=3, loc="lower right")
            plots.append(Plot("the window over time", _png(fig), f"{len(batch)} samples from {batch.source}"))
        finally:
            plt.close(fig)
    return plots
