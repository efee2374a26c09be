"""``tmb enroll``, ``tmb fingerprint score`` and ``tmb fingerprint show``."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tmb.errors import InputError, Severity
from tmb.fingerprint.profile import Profile, enroll, load_profile
from tmb.fingerprint.score import Score, Scorer, score_batch
from tmb.telemetry.replay import Trace, read_trace


def register(sub: Any) -> None:
    """Add ``enroll`` and the ``fingerprint`` group to the top-level parser's subparsers."""
    enr = sub.add_parser("enroll", help="fit a fingerprint profile from telemetry traces")
    enr.add_argument("--model", required=True, help="model id the traces were recorded serving")
    enr.add_argument("--precision", help="weights precision (default: from the trace metadata)")
    enr.add_argument("--engine", default="", help="inference engine (vllm, sglang, ...)")
    enr.add_argument("--gpu", help="GPU type (default: from the trace metadata)")
    enr.add_argument("--regime", help="load regime (default: from the trace metadata)")
    enr.add_argument("--window", type=float, default=10.0, help="calibration window, s (default 10)")
    enr.add_argument("--far", type=float, default=1e-3, help="target false-alarm rate (default 0.001)")
    enr.add_argument("--heldout-fraction", type=float, default=0.3, help="share held out to calibrate")
    enr.add_argument("--out", required=True, help="profile file to write (JSON)")
    enr.add_argument("traces", nargs="+", metavar="TRACE", help="recorded telemetry traces")
    enr.set_defaults(func=_enroll)

    fp = sub.add_parser("fingerprint", help="score telemetry against enrolled profiles")
    group = fp.add_subparsers(dest="fingerprint_command", metavar="ACTION")
    group.required = True
    sc = group.add_parser("score", help="score a trace's windows against the claimed model's profiles")
    sc.add_argument("--profiles", nargs="+", required=True, metavar="DIR_OR_FILE", help="profiles")
    sc.add_argument("--claimed", required=True, help="claimed model: model[/precision[/gpu_type]]")
    sc.add_argument("--window", type=float, default=10.0, help="window length, s (default 10)")
    sc.add_argument("--json", action="store_true", help="print the scores as JSON")
    sc.add_argument("trace", metavar="TRACE")
    sc.set_defaults(func=_score)
    show = group.add_parser("show", help="summarise a profile")
    show.add_argument("profile")
    show.add_argument("--json", action="store_true", help="print the profile (without held-out data)")
    show.set_defaults(func=_show)


def _from_meta(traces: Sequence[Trace], key: str, given: str | None) -> str:
    if given is not None:
        return given
    values = {str((t.meta.get("workload") or {}).get(key) or "") for t in traces}
    if len(values) > 1:
        raise InputError(f"traces disagree on {key}; pass it explicitly", field=key, values=sorted(values))
    return values.pop() if values else ""


def _enroll(args: argparse.Namespace) -> int:
    traces = [read_trace(p) for p in args.traces]
    if not (0.0 < args.far < 1.0) or not (math.isfinite(args.window) and args.window > 0.0):
        raise InputError("--far must be in (0, 1) and --window positive", far=args.far, window=args.window)
    tokens: list[int] | None = []
    for t in traces:
        count = (t.meta.get("workload") or {}).get("tokens_generated")
        if not isinstance(count, int) or count <= 0 or tokens is None:
            tokens = None
        else:
            tokens.append(count)
    profile, findings = enroll(
        args.model,
        [t.batch for t in traces],
        precision=_from_meta(traces, "precision", args.precision),
        engine=args.engine,
        gpu_type=_from_meta(traces, "gpu_type", args.gpu),
        regime=_from_meta(traces, "regime", args.regime),
        tokens=tokens,
        window_s=args.window,
        target_far=args.far,
        heldout_fraction=args.heldout_fraction,
    )
    for f in findings:
        if f.severity is not Severity.INFO:
            print(str(f))
    profile.save(args.out)
    synthetic = " (synthetic telemetry)" if profile.enrolment.get("synthetic") else ""
    print(f"wrote {args.out}: profile {profile.key}, features {', '.join(profile.features)}{synthetic}")
    return 0


def load_profiles(specs: Sequence[str]) -> list[Profile]:
    """Profiles from files and from every ``*.json`` in directories."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise InputError(f"no profile (*.json) in directory {p}", path=str(p))
            paths.extend(found)
        else:
            paths.append(p)
    return [load_profile(p) for p in paths]


def _line(index: int, s: Score) -> str:
    alt = (
        f", best alternative {s.best_alternative} (LLR {s.best_alternative_llr:.1f})"
        if s.best_alternative
        else ""
    )
    stat = f"z {s.statistic:.2f}, p {s.p_value:.3g}" if math.isfinite(s.statistic) else "no statistic"
    return f"window {index}: {s.decision} ({stat}, n {s.n_samples}, n_eff {s.n_eff:.0f}{alt})"


def _score(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.profiles)
    trace = read_trace(args.trace)
    scorer = Scorer(profiles)
    scores = score_batch(scorer, args.claimed, trace.batch, window_s=args.window)
    decided = [s for s in scores if s.decision != "insufficient_data"]
    if any(s.decision == "inconsistent" for s in scores):
        overall = "inconsistent"
    else:
        overall = "consistent" if decided else "insufficient_data"
    if args.json:
        print(json.dumps({"decision": overall, "windows": [s.to_dict() for s in scores]}, indent=2))
    else:
        for i, s in enumerate(scores):
            print(_line(i, s))
            for f in s.findings:
                print(f"  {f}")
        far = scores[0].false_alarm_rate
        label = " Telemetry is synthetic." if trace.batch.synthetic else ""
        print(
            f"fingerprint: {overall} for claim {args.claimed!r} over {len(scores)} window(s) of "
            f"{args.window:g} s (false-alarm rate {far:g} per window; statistical evidence, not a proof)."
            f"{label}"
        )
    return 0 if overall == "consistent" else 1


def _show(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    if args.json:
        data = profile.to_dict()
        data["heldout"] = {"segments": len(profile.heldout)}
        print(json.dumps(data, indent=2))
        return 0
    cal = profile.calibration
    print(f"profile {profile.key} (format version {profile.version})")
    print(f"  enrolment: {json.dumps({k: v for k, v in profile.enrolment.items() if k != 'features'})}")
    for name, dist in profile.features.items():
        comps = ", ".join(
            f"{w:.2f} x Beta({c.a:.3g}, {c.b:.3g})"
            for w, c in zip(dist.weights, dist.components, strict=True)
        )
        base = dist.components[0]
        print(f"  {name}: P(0)={base.p0:.3g} P(1)={base.p1:.3g} interior {comps}")
    if profile.copula is not None:
        names = ", ".join(profile.copula.names)
        print(f"  dependence: {len(profile.copula.weights)}-component mixture on {names}")
    print(
        f"  calibration: window {cal.window_s:g} s, target false-alarm rate {cal.target_far:g}, "
        f"GOF threshold z < {cal.gof_threshold_z:.2f} ({cal.gof.n_windows} held-out windows)"
    )
    return 0
