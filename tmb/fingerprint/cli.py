"""``tmb enroll`` and ``tmb fingerprint score|show|evaluate`` (load-aware profiles, docs/profiles.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tmb.errors import InputError
from tmb.extras import require

if TYPE_CHECKING:
    from tmb.fingerprint.judge import Judgement
    from tmb.fingerprint.loadprofile import LoadProfile

# The handlers import the fingerprint itself (numpy, scipy: most of a second), so `tmb enroll --help` and
# the parser do not.

#: Exit status of ``fingerprint score`` when no window could be decided either way.
EXIT_INCONCLUSIVE = 3


def register(sub: Any) -> None:
    """Add ``enroll`` and the ``fingerprint`` group to the top-level parser's subparsers."""
    enr = sub.add_parser("enroll", help="fit a load-aware fingerprint profile from telemetry traces (runs)")
    enr.add_argument("--model", required=True, help="model id the traces were recorded serving")
    enr.add_argument("--precision", help="weights precision (default: from the trace metadata)")
    enr.add_argument("--engine", help="inference engine (default: from the trace metadata)")
    enr.add_argument("--gpu", help="GPU type (default: from the trace metadata)")
    enr.add_argument("--regime", default="", help="free-form label kept in the profile key")
    enr.add_argument("--window", type=float, default=30.0, help="enrolment window, s (default 30)")
    enr.add_argument("--far", type=float, default=1e-3, help="target false-alarm rate per window (0.001)")
    enr.add_argument("--out", required=True, help="profile file to write (JSON)")
    enr.add_argument("traces", nargs="+", metavar="TRACE_OR_DIR", help="traces, one run each (folders: all)")
    enr.set_defaults(func=_enroll)

    fp = sub.add_parser("fingerprint", help="score telemetry against enrolled profiles")
    group = fp.add_subparsers(dest="fingerprint_command", metavar="ACTION")
    group.required = True
    sc = group.add_parser("score", help="score a trace's windows against the claimed model's profiles")
    sc.add_argument("--profiles", nargs="+", required=True, metavar="DIR_OR_FILE", help="profiles")
    sc.add_argument("--claimed", required=True, help="claimed model: model[/precision[/gpu_type]]")
    sc.add_argument("--window", type=float, default=10.0, help="window length, s (default 10)")
    sc.add_argument("--load", type=float, help="requests in flight (default: the trace's load series)")
    sc.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    sc.add_argument("trace", metavar="TRACE")
    sc.set_defaults(func=_score)
    show = group.add_parser("show", help="summarise a profile")
    show.add_argument("profile")
    show.add_argument("--json", action="store_true", help="print the whole profile")
    show.set_defaults(func=_show)
    ev = group.add_parser("evaluate", help="leave-one-run-out detection and false alarms over a corpus")
    ev.add_argument(
        "corpus", nargs="+", metavar="DIR_OR_TRACE", help="labelled traces (folders: recursively)"
    )
    ev.add_argument("--window", type=float, default=60.0, help="scored window, s (default 60)")
    ev.add_argument("--step", type=float, default=10.0, help="growth step for seconds-to-decide (10)")
    ev.add_argument("--enrol-window", type=float, help="enrolment window, s (default: --window / 2)")
    ev.add_argument("--far", type=float, default=1e-3, help="target false-alarm rate per window (0.001)")
    ev.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ev.add_argument("--png", metavar="OUT", help="write a confusion-matrix picture (PNG)")
    ev.set_defaults(func=_evaluate)


def _check(far: float, *windows: float) -> None:
    if not (0.0 < far < 1.0) or not all(math.isfinite(w) and w > 0.0 for w in windows):
        raise InputError("--far must be in (0, 1) and windows positive", far=far, windows=list(windows))


def _progress(i: int, n: int, what: str) -> None:
    if sys.stderr.isatty():
        print(f"\r[{i}/{n}] {what[-60:]:60}", end="" if i < n else "\n", file=sys.stderr, flush=True)


def _enroll(args: argparse.Namespace) -> int:
    from tmb.fingerprint.corpus import enroll_identity, load_runs
    from tmb.fingerprint.loadprofile import MIN_RUNS

    _check(args.far, args.window)
    runs, notes = load_runs(args.traces, args.window, progress=_progress)
    unlabelled = [r.path for r in runs if not r.load_labelled]
    if unlabelled:
        raise InputError(
            "traces without a load series cannot enrol a load-aware profile",
            paths=unlabelled[:5],
            hint="import with `tmb telemetry import --load N`, or record with a load series",
        )

    def pick(index: int, given: str | None, name: str) -> str:
        if given is not None:
            return given
        values = {r.identity[index] for r in runs}
        if len(values) > 1:
            raise InputError(f"traces disagree on {name}; pass --{name}", values=sorted(values))
        return values.pop()

    ident = (args.model, pick(1, args.precision, "precision"), pick(2, args.engine, "engine"))
    ident4 = (*ident, pick(3, args.gpu, "gpu"))
    runs = [dataclasses.replace(r, identity=ident4) for r in runs]
    profile = enroll_identity(runs, args.window, args.far, args.regime)
    for n in notes:
        print(str(n))
    profile.save(args.out)
    synthetic = " (synthetic telemetry)" if profile.synthetic else ""
    lo, hi = profile.load_range
    print(
        f"wrote {args.out}: profile {profile.key}, {len(runs)} run(s) ({profile.runs} calibrated), "
        f"load {lo:g}-{hi:g}, features {', '.join(profile.features)}{synthetic}"
    )
    if profile.runs < MIN_RUNS:
        print(
            f"note: {profile.runs} calibrated run(s); the profile answers `inconclusive` until it has "
            f"{MIN_RUNS} (enrol runs from more sessions, days and nodes, with overlapping loads)"
        )
    return 0


def load_profiles(specs: Sequence[str]) -> list[LoadProfile]:
    """Profiles from files and from every ``*.json`` in directories."""
    from tmb.fingerprint.loadprofile import load_profile

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


def _line(index: int, j: Judgement) -> str:
    if not math.isfinite(j.statistic):
        return f"window {index}: {j.decision} (load {j.load:.3g}, n {j.n_samples})"
    alt = f", closest alternative {j.best_alternative}" if j.best_alternative else ""
    power = f", power {j.power:.2f}" if j.power is not None else ""
    return (
        f"window {index}: {j.decision} (load {j.load:.3g}, max |z| {j.statistic:.2f} vs {j.threshold:.2f}, "
        f"n {j.n_samples}{power}{alt})"
    )


def overall(judgements: Sequence[Judgement]) -> str:
    if any(j.decision == "inconsistent" for j in judgements):
        return "inconsistent"
    return "consistent" if any(j.decision == "consistent" for j in judgements) else "inconclusive"


def _score(args: argparse.Namespace) -> int:
    from tmb.fingerprint.judge import Judge
    from tmb.fingerprint.summary import window_summaries
    from tmb.telemetry.load import LoadSeries, load_from_meta
    from tmb.telemetry.replay import read_trace

    _check(1e-3, args.window)
    judge = Judge(load_profiles(args.profiles))
    trace = read_trace(args.trace)
    if args.load is not None:
        if not (math.isfinite(args.load) and args.load >= 0):
            raise InputError("--load must be a non-negative number", load=args.load)
        load: LoadSeries | None = LoadSeries.constant(
            args.load, int(trace.batch.t_ns[0]) if len(trace.batch) else 0
        )
    else:
        load = load_from_meta(trace.meta, args.trace)
    windows = window_summaries(trace.batch, load, args.window)
    judgements = [judge.judge(args.claimed, w) for w in windows]
    result = overall(judgements)
    if args.json:
        print(json.dumps({"decision": result, "windows": [j.to_dict() for j in judgements]}, indent=2))
    else:
        if load is None:
            print("note: the trace has no load series: every window is idle (pass --load N)")
        for i, j in enumerate(judgements):
            print(_line(i, j))
            for f in j.findings:
                print(f"  {f}")
        label = " Telemetry is synthetic." if trace.batch.synthetic else ""
        print(
            f"fingerprint: {result} for claim {args.claimed!r} over {len(judgements)} window(s) of "
            f"{args.window:g} s (statistical evidence, not a proof).{label}"
        )
    return {"consistent": 0, "inconsistent": 1}.get(result, EXIT_INCONCLUSIVE)


def _show(args: argparse.Namespace) -> int:
    from tmb.fingerprint.loadprofile import MIN_RUNS, load_profile

    p = load_profile(args.profile)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, sort_keys=True))
        return 0
    e = p.enrolment
    lo, hi = p.load_range
    print(f"profile {p.key} (load-aware, format version 2){' — synthetic telemetry' if p.synthetic else ''}")
    print(
        f"  enrolment: {e.get('n_runs')} run(s) on {len(e.get('days', []))} day(s) and "
        f"{len(e.get('nodes', []))} node(s); {e.get('n_windows')} windows of {p.window_s:g} s; "
        f"load {lo:g}-{hi:g} requests in flight ({len(p.knots)} knots)"
    )
    decide = (
        "can decide" if p.runs >= MIN_RUNS else f"answers inconclusive (needs {MIN_RUNS} calibrated runs)"
    )
    print(
        f"  calibration: {p.runs} run(s) left out in turn; {decide}; target false-alarm rate {p.target_far:g}"
    )
    for name in p.features:
        c = p.calibration[name]
        curve = ", ".join(f"{k.load:g}: {k.location[name]:.4g}" for k in p.knots if name in k.location)
        print(
            f"  {name}: run shift sd {c.shift_sd:.3g}, window sd {c.window_sd:.3g}, floor {c.floor:.3g}; "
            f"median by load {curve}"
        )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tmb.fingerprint.corpus import load_runs
    from tmb.fingerprint.evaluate import confusion_png, evaluate, write_json

    if args.png:  # before the evaluation, which takes a while
        require("report", "the confusion-matrix picture (--png)")
    enrol_window = args.enrol_window or args.window / 2
    _check(args.far, args.window, args.step, enrol_window)
    runs, notes = load_runs(
        args.corpus, enrol_window, test_window_s=args.window, step_s=args.step, progress=_progress
    )
    result = evaluate(runs, window_s=args.window, target_far=args.far, progress=_progress)
    result.notes.extend(str(n) for n in notes)
    synthetic = sum(r.synthetic for r in runs)
    print(
        f"leave-one-run-out over {len(runs)} run(s) ({synthetic} synthetic), {len(result.identities)} "
        f"identities, {args.window:g} s windows, target false-alarm rate {args.far:g} per window"
    )
    print(result.table())
    for n in result.notes:
        print(f"note: {n}")
    print(f"scoring CPU: {result.cpu_s_per_window * 1e3:.3f} ms per window")
    if args.json:
        write_json(result, args.json)
    if args.png:
        confusion_png(result, args.png)
    honest_alarms = sum(p.inconsistent for p in result.pairs.values() if p.honest)
    return 1 if honest_alarms else 0
