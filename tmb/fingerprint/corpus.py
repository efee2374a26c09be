"""Traces grouped into runs and identities: what enrolment and evaluation read.

A *run* is one recording session (``meta["run"]``, :mod:`tmb.telemetry.load`); an *identity* is
(model, precision, engine, GPU type) from ``meta["workload"]``. The same recording stored twice (for
example one file per layout of the same tool) is one run, not two: traces whose samples are identical
are merged and reported, because counting them twice would make leave-one-run-out calibration blind to
exactly the run-to-run shifts it exists to measure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tmb.errors import Finding, InputError, Severity, TmbError, finding
from tmb.fingerprint.loadprofile import DEFAULT_FAR, LoadProfile, enroll_runs
from tmb.fingerprint.summary import WindowSummary, growing_windows, window_summaries
from tmb.telemetry.load import load_from_meta, run_from_meta
from tmb.telemetry.replay import MAGIC, Trace, read_trace

Identity = tuple[str, str, str, str]  # model, precision, engine, gpu_type


@dataclass(frozen=True)
class Run:
    """One recording session of one identity, cut into windows."""

    id: str
    identity: Identity
    node: str
    day: str
    synthetic: bool
    path: str
    windows: tuple[WindowSummary, ...]  # enrolment windows (overlapping by half)
    load_labelled: bool
    tests: tuple[tuple[WindowSummary, ...], ...] = ()  # evaluation windows, each as its growing prefixes

    @property
    def claim(self) -> str:
        """The claim string an honest provider of this run makes: ``model/precision/gpu_type``."""
        model, precision, _engine, gpu = self.identity
        return f"{model}/{precision}/{gpu}"


def identity_of(trace: Trace) -> Identity:
    w = trace.meta.get("workload") or {}
    return (
        str(w.get("model") or ""),
        str(w.get("precision") or ""),
        str(w.get("engine") or ""),
        str(w.get("gpu_type") or ""),
    )


def content_digest(trace: Trace) -> str:
    """Digest of the samples themselves (timestamps excluded: one tool's layouts may disagree on them)."""
    h = hashlib.sha256()
    b = trace.batch
    for col in (b.power_w, b.gpu_util, b.mem_used_bytes, b.mem_util):
        h.update(col.tobytes())
    return h.hexdigest()


def trace_files(paths: Iterable[str | Path]) -> list[Path]:
    """Trace files under the given files and folders (recursively; recognised by their magic bytes)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            candidates = sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            candidates = [p]
        else:
            raise InputError("no such trace file or folder", path=str(p))
        for q in candidates:
            try:
                with q.open("rb") as fh:
                    if fh.read(len(MAGIC)) == MAGIC:
                        out.append(q)
            except OSError as exc:
                raise InputError(f"cannot read: {exc.strerror}", path=str(q)) from None
    return out


def load_runs(
    paths: Iterable[str | Path],
    window_s: float,
    *,
    test_window_s: float | None = None,
    step_s: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[Run], list[Finding]]:
    """Read every trace under ``paths`` as a :class:`Run` (duplicates merged and reported)."""
    files = trace_files(paths)
    if not files:
        raise InputError("no tmb trace found", paths=[str(p) for p in paths])
    runs: list[Run] = []
    notes: list[Finding] = []
    seen: dict[str, str] = {}
    for i, path in enumerate(files):
        if progress is not None:
            progress(i + 1, len(files), str(path))
        try:
            trace = read_trace(path)
            load = load_from_meta(trace.meta, str(path))
            info = run_from_meta(trace.meta, str(path))
        except TmbError as exc:
            exc.context.setdefault("path", str(path))
            raise
        digest = content_digest(trace)
        if digest in seen:
            notes.append(
                finding(
                    "fingerprint.duplicate_run",
                    "the same recording twice: counted once",
                    severity=Severity.INFO,
                    path=str(path),
                    same_as=seen[digest],
                )
            )
            continue
        seen[digest] = str(path)
        if len(trace.batch.gpus) > 1:
            notes.append(
                finding(
                    "fingerprint.gpus_pooled",
                    f"{len(trace.batch.gpus)} GPUs in one run are summarised together (right for one model"
                    " split over them; import one GPU per run otherwise: tmb telemetry import --gpu)",
                    severity=Severity.WARNING,
                    path=str(path),
                )
            )
        ident = identity_of(trace)
        if not ident[0]:
            raise InputError(
                "trace has no model label (meta workload.model)",
                path=str(path),
                hint="label it when importing: tmb telemetry import --model ...",
            )
        windows = window_summaries(trace.batch, load, window_s, window_s / 2)
        tests: list[tuple[WindowSummary, ...]] = []
        if test_window_s:
            tests = growing_windows(trace.batch, load, test_window_s, step_s or test_window_s)
        runs.append(
            Run(
                info.id,
                ident,
                info.node,
                info.day,
                trace.synthetic,
                str(path),
                tuple(windows),
                load is not None,
                tuple(tests),
            )
        )
    ids = [r.id for r in runs]
    dupes = sorted({x for x in ids if ids.count(x) > 1})
    if dupes:
        raise InputError("two different recordings share a run id", run_ids=dupes[:5])
    return runs, notes


def by_identity(runs: Sequence[Run]) -> dict[Identity, list[Run]]:
    out: dict[Identity, list[Run]] = {}
    for r in runs:
        out.setdefault(r.identity, []).append(r)
    return out


def enroll_identity(
    runs: Sequence[Run], window_s: float, target_far: float = DEFAULT_FAR, regime: str = ""
) -> LoadProfile:
    """A load-aware profile from runs of one identity (each run left out in turn to calibrate)."""
    if not runs:
        raise InputError("no run to enrol from")
    idents = {r.identity for r in runs}
    if len(idents) > 1:
        raise InputError("runs of different identities cannot form one profile", identities=sorted(idents))
    model, precision, engine, gpu = runs[0].identity
    return enroll_runs(
        {r.id: r.windows for r in runs},
        model=model,
        precision=precision,
        engine=engine,
        gpu_type=gpu,
        regime=regime,
        window_s=window_s,
        target_far=target_far,
        run_days={r.id: r.day for r in runs},
        run_nodes={r.id: r.node for r in runs},
        extra={
            "synthetic": any(r.synthetic for r in runs),
            "sources": [Path(r.path).name for r in runs],
            "unlabelled_load_runs": sorted(r.id for r in runs if not r.load_labelled),
        },
    )
