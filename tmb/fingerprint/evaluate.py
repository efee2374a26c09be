"""Leave-one-run-out evaluation of the fingerprint over a labelled corpus (``tmb fingerprint evaluate``).

For every run R of the corpus: every identity's profile is enrolled from all runs except R (each
enrolment itself calibrated by leaving its runs out in turn, so R never influences a threshold), and R's
windows are scored as if its provider claimed each enrolled identity in turn. A claim of R's own identity
measures honest false alarms; a claim of another identity measures detection of that substitution. The
table counts windows per (claimed, actual) pair: ``inconsistent`` (a false alarm when honest, a detection
otherwise), ``consistent``, ``inconclusive`` (by reason) and how long a window had to grow before the
outcome was decided. Substitutions are counted against claims on the same GPU type only.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tmb.fingerprint.corpus import Identity, Run, by_identity, enroll_identity
from tmb.fingerprint.judge import Judge, Judgement
from tmb.fingerprint.loadprofile import DEFAULT_FAR, LoadProfile


@dataclass
class PairResult:
    """Counts for one (claimed identity, actual identity) pair."""

    claimed: str
    actual: str
    honest: bool
    windows: int = 0
    inconsistent: int = 0
    consistent: int = 0
    inconclusive: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    decide_s: list[float] = field(default_factory=list)
    runs: set[str] = field(default_factory=set)

    @property
    def in_range(self) -> int:
        """Windows whose load was inside the claimed profile's enrolled range."""
        return self.windows - self.reasons["fingerprint.load_out_of_range"]

    def to_dict(self) -> dict[str, Any]:
        rate = self.inconsistent / self.windows if self.windows else math.nan
        return {
            "claimed": self.claimed,
            "actual": self.actual,
            "honest": self.honest,
            "runs": len(self.runs),
            "windows": self.windows,
            "windows_in_load_range": self.in_range,
            "inconsistent": self.inconsistent,
            "consistent": self.consistent,
            "inconclusive": self.inconclusive,
            "inconclusive_reasons": dict(self.reasons),
            "false_alarm_rate" if self.honest else "detection_rate": _nan_none(rate),
            "detection_rate_in_load_range": None
            if self.honest or not self.in_range
            else self.inconsistent / self.in_range,
            "inconclusive_share": _nan_none(self.inconclusive / self.windows if self.windows else math.nan),
            "median_seconds_to_decide": _nan_none(
                float(np.median(self.decide_s)) if self.decide_s else math.nan
            ),
        }


def _nan_none(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 6)


def _name(ident: Identity) -> str:
    model, precision, engine, gpu = ident
    return "/".join(p or "-" for p in (model, precision, engine, gpu))


@dataclass
class Evaluation:
    window_s: float
    target_far: float
    pairs: dict[tuple[str, str], PairResult]
    runs: int
    identities: list[str]
    cpu_s_per_window: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "target_far": self.target_far,
            "runs": self.runs,
            "identities": self.identities,
            "cpu_ms_per_window": round(self.cpu_s_per_window * 1e3, 4),
            "pairs": [p.to_dict() for p in self.pairs.values()],
            "notes": self.notes,
        }

    def table(self) -> str:
        head = (
            f"{'claimed':28} {'actual':28} {'runs':>4} {'windows':>7} {'in range':>8} {'inconsist.':>10}"
            f" {'consistent':>10} {'inconcl.':>8} {'rate':>7} {'rate in range':>13} {'s to decide':>11}"
        )
        lines = [head, "-" * len(head)]
        for p in sorted(self.pairs.values(), key=lambda p: (p.claimed, not p.honest, p.actual)):
            d = p.to_dict()
            rate = d["false_alarm_rate"] if p.honest else d["detection_rate"]
            rr = d.get("detection_rate_in_load_range")
            kind = "FA " if p.honest else "det"
            lines.append(
                f"{p.claimed:28} {p.actual:28} {len(p.runs):4d} {p.windows:7d} {p.in_range:8d}"
                f" {p.inconsistent:10d} {p.consistent:10d} {p.inconclusive:8d}"
                f" {kind}{_pct(rate):>4} {_pct(rr):>13} {_sec(d['median_seconds_to_decide']):>11}"
            )
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%" if x in (0, 1) else f"{100 * x:.1f}%"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def evaluate(
    runs: Sequence[Run],
    *,
    window_s: float,
    target_far: float = DEFAULT_FAR,
    progress: Callable[[int, int, str], None] | None = None,
) -> Evaluation:
    """Leave-one-run-out evaluation (module docstring). ``runs`` must carry test windows (``tests``)."""
    groups = by_identity(runs)
    pairs: dict[tuple[str, str], PairResult] = {}
    cpu, scored = 0.0, 0
    notes: list[str] = []
    for i, held in enumerate(runs):
        if progress is not None:
            progress(i + 1, len(runs), held.id)
        profiles: list[LoadProfile] = []
        for members in groups.values():
            rest = [r for r in members if r.id != held.id]
            if rest:
                profiles.append(enroll_identity(rest, window_s, target_far))
        if not profiles:
            continue
        judge = Judge(profiles, target_far=target_far)
        for prof in profiles:
            ident = (prof.model, prof.precision, prof.engine, prof.gpu_type)
            if prof.gpu_type and held.identity[3] and prof.gpu_type != held.identity[3]:
                continue
            claim = f"{prof.model}/{prof.precision}/{prof.gpu_type}"
            key = (_name(ident), _name(held.identity))
            pair = pairs.setdefault(key, PairResult(key[0], key[1], ident == held.identity))
            for prefixes in held.tests:
                t0 = time.process_time()
                final = judge.judge(claim, prefixes[-1])
                cpu += time.process_time() - t0
                scored += 1
                _count(pair, final, held.id)
                if final.decision != "inconclusive":
                    pair.decide_s.append(_decided_after(judge, claim, prefixes, final))
    if not pairs:
        notes.append("no pair could be evaluated: every identity needs runs besides the one left out")
    return Evaluation(
        window_s,
        target_far,
        pairs,
        len(runs),
        sorted(_name(k) for k in groups),
        cpu / scored if scored else math.nan,
        notes,
    )


def _count(pair: PairResult, j: Judgement, run_id: str) -> None:
    pair.windows += 1
    pair.runs.add(run_id)
    if j.decision == "inconsistent":
        pair.inconsistent += 1
    elif j.decision == "consistent":
        pair.consistent += 1
    else:
        pair.inconclusive += 1
        reason = next((f.id for f in j.findings if f.severity.value != "info"), "fingerprint.inconclusive")
        pair.reasons[reason] += 1


def _decided_after(judge: Judge, claim: str, prefixes: Sequence[Any], final: Judgement) -> float:
    """Seconds of the shortest prefix that already reached the whole window's outcome."""
    for prefix in prefixes[:-1]:
        if judge.judge(claim, prefix).decision == final.decision:
            return float(prefix.seconds)
    return float(prefixes[-1].seconds)


def confusion_png(result: Evaluation, path: str | Path) -> Path:
    """A confusion-matrix picture: rows actual, columns claimed; each cell the share of windows flagged
    ``inconsistent`` (false alarms on the diagonal, detections elsewhere) and the inconclusive share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = result.identities
    flagged = np.full((len(names), len(names)), np.nan)
    undecided = np.full_like(flagged, np.nan)
    for p in result.pairs.values():
        if p.windows and p.actual in names and p.claimed in names:
            r, c = names.index(p.actual), names.index(p.claimed)
            flagged[r, c] = p.inconsistent / p.windows
            undecided[r, c] = p.inconclusive / p.windows
    size = 2.0 + 1.1 * len(names)
    fig, ax = plt.subplots(figsize=(size + 2, size))
    im = ax.imshow(flagged, vmin=0, vmax=1, cmap="Blues")  # one hue: flagged is good off the diagonal only
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("claimed")
    ax.set_ylabel("actually served")
    for r in range(len(names)):
        for c in range(len(names)):
            if math.isfinite(flagged[r, c]):
                honest = r == c
                alarm = honest and flagged[r, c] > 0
                kind = "false alarms" if honest else "detected"
                ax.text(
                    c, r, f"{100 * flagged[r, c]:.0f}% {kind}\n{100 * undecided[r, c]:.0f}% inconcl.",
                    ha="center", va="center", fontsize=7,
                    color="#b00000" if alarm else ("white" if flagged[r, c] > 0.6 else "black"),
                    fontweight="bold" if honest else "normal",
                )  # fmt: skip
            if r == c:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=2, ec="#444444"))
    fig.colorbar(im, ax=ax, label="share of windows judged inconsistent")
    ax.set_title(
        f"tmb fingerprint, leave-one-run-out, {result.window_s:g} s windows\n"
        "(framed diagonal: honest runs, where any flag is a false alarm)"
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_json(result: Evaluation, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True) + "\n")
