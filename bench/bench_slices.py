"""The verdict engine's scoring of concurrent requests on one GPU, without HTTP.

What bench_fullcost.py's daemon does per request once the evidence is in (read the attested window from
the ingest's SQLite store, decode, cut, digest, summarise, judge), with and without the per-batch memo of
the window path.

One node, one GPU, synthetic telemetry at 20 Hz in the probe's shape (one sealed batch a second, every batch
attested by one verified quote), the demo's two enrolled profiles; ``--rps`` requests a second of telemetry,
each a few milliseconds long (widened to ``[verdicts] min_window_ms`` = 1 s around its middle, as the
engine does), so dozens of request windows overlap each second of telemetry, as with continuous batching.
For each request: ``Ingest.attested_window`` (here ``Windows.attested_windows`` on the store, ``--group``
consecutive requests' windows read together as the engine's look-ahead reads them) then ``Engine.decide``;
signing and storing are left out (bench_verdicts.py measures them).

Three ways, side by side in the same run, fresh engines each repeat:

* ``no memo``: every window's per-sample features computed from its own samples (``Windows(memo=False)``),
  each request's window its own (``[verdicts] window_grid_ms = 0``);
* ``memo``: the per-batch memo of the window path, each request's window its own;
* ``memo + grid``: window ends aligned to the ``--grid-ms`` grid (the default of ``window_grid_ms``), so
  requests starting within one step share one window, cut, digested, summarised and judged once.

The first two must give the same verdict figures bit for bit (checked); the grid gives other windows (a
little longer), so its verdicts are compared by their decisions only. Prints the ratio LAST: CPU per
request with the memo alone / with the memo and the grid.

    .venv/bin/python bench/bench_slices.py [--seconds 20] [--rps 200] [--repeats 5] [--grid-ms 250]
                                           [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sample_infra.demo_setup import demo_trace, enrol_profiles
from tmb.fingerprint import load_profile
from tmb.ingest.results import AttestationSummary
from tmb.ingest.store import IngestStore
from tmb.ingest.window import Windows
from tmb.spans import Outcome, Span
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings, widen
from tmb.verdict.signing import load_or_create_key

T0 = 1_700_000_000 * 10**9
NODE, GPU = "node-1", "GPU-bench-0"
CLAIM, IMPOSTOR = "llama-1b/bf16/h100", "llama-1b/int8/h100"


def fill(store: IngestStore, seconds: int) -> None:
    """``seconds`` one-second batches of the claimed model's telemetry, all attested by one quote."""
    trace = demo_trace(CLAIM, seconds + 1, seed=11, start_ns=T0)
    store.upsert_node(NODE, b"ak", T0)
    segment, prev = b"\x01" * 16, b"\x00" * 32
    summary = AttestationSummary(NODE, 1, 1, 1, 0, "aa" * 32, "sha256", True, True, True)
    with store.transaction():
        store.add_segment(NODE, segment, 0, None, T0)
        for k in range(seconds + 1):
            part = trace.slice_time(T0 + k * 10**9, T0 + (k + 1) * 10**9)
            part = part.__class__(**{**part._fields(), "gpus": (GPU,)})
            payload = part.encode()
            digest = hashlib.sha256(prev + payload).digest()
            span = (int(part.t_ns[0]), int(part.t_ns[-1]))
            store.add_batch(NODE, segment, k, digest, prev, payload, span, T0)
            prev = digest
        qid = store.add_quote(NODE, T0, True, (segment, seconds, prev), summary.to_dict(), b"m", b"s")
        store.attest(NODE, segment, seconds, qid)


def spans(seconds: int, rps: int) -> list[Span]:
    out = []
    n = seconds * rps
    for i in range(n):
        start = T0 + 10**9 + i * (seconds - 1) * 10**9 // n  # whole windows inside the telemetry
        span = Span(
            f"{i:032x}", None, "w1", NODE, (GPU,), CLAIM, "llama-1b", "POST", "/v1/chat/completions",
            start, start + 10**6, start + 4 * 10**6, 200, 100, 1000, 250, Outcome.OK,
        )  # fmt: skip
        out.append(span)
    return out


def run_once(
    windows: Windows, engine: Engine, todo: list[Span], group: int
) -> tuple[float, dict[str, int], list[str]]:
    """Every span's verdict as the engine decides it, reading the windows of ``group`` consecutive spans
    together (its look-ahead; one window at a time where ``Windows`` cannot read several)."""
    decisions: dict[str, int] = {}
    digests = []
    together = hasattr(windows, "attested_windows")
    t = time.process_time()
    for g in range(0, len(todo), group):
        spans_ = todo[g : g + group]
        ws = [widen(sp, engine.settings.min_window_s, engine.settings.grid_s) for sp in spans_]
        if together:
            got = windows.attested_windows(NODE, [(w.t0_ns, w.t1_ns) for w in ws])
        else:
            got = [windows.attested_window(NODE, w.t0_ns, w.t1_ns) for w in ws]
        for sp, w, a in zip(spans_, ws, got, strict=True):
            assert a is not None
            verdict, _ = engine.decide(sp, w, a.samples, a.summary, a.findings, a.batches)
            decisions[verdict.decision.value] = decisions.get(verdict.decision.value, 0) + 1
            figures = repr(
                (verdict.decision, verdict.fingerprint, verdict.attestation_evidence, verdict.reasons)
            )
            digests.append(hashlib.sha256(figures.encode()).hexdigest())
    return (time.process_time() - t) / len(todo), decisions, digests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group", type=int, default=16, help="spans whose windows are read together")
    ap.add_argument("--grid-ms", type=int, default=int(EngineSettings().grid_s * 1000), help="window grid")
    ap.add_argument("--profile", action="store_true", help="cProfile the grid's runs (top 15 by own time)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        profs = [load_profile(p) for p in enrol_profiles([CLAIM, IMPOSTOR], tmp / "profiles")]
        store = IngestStore(tmp / "ingest.db")
        fill(store, args.seconds)
        signer = load_or_create_key(tmp / "key.pem")
        todo = spans(args.seconds, args.rps)
        lock = threading.Lock()
        times: dict[str, list[float]] = {"no memo": [], "memo": [], "memo + grid": []}
        ratios = []
        prof = cProfile.Profile() if args.profile else None
        same = True
        decisions: dict[str, dict[str, int]] = {}
        plain = EngineSettings(demo=True, grid_s=0.0)
        grid = EngineSettings(demo=True, grid_s=args.grid_ms / 1000)
        for _ in range(args.repeats):
            # fresh engines and windows each repeat: the memo starts cold, as after a restart
            off = Windows(store, lock, memo=False) if _has_memo() else Windows(store, lock)
            e_off = Engine(AsyncStore(tmp / "a.db"), signer, None, profs, plain)
            t_off, decisions["no memo"], d_off = run_once(off, e_off, todo, args.group)
            e_on = Engine(AsyncStore(tmp / "b.db"), signer, None, profs, plain)
            t_on, decisions["memo"], d_on = run_once(Windows(store, lock), e_on, todo, args.group)
            e_grid = Engine(AsyncStore(tmp / "c.db"), signer, None, profs, grid)
            if prof is not None:
                prof.enable()
            t_grid, decisions["memo + grid"], _ = run_once(Windows(store, lock), e_grid, todo, args.group)
            if prof is not None:
                prof.disable()
            same = same and d_off == d_on
            for name, t in (("no memo", t_off), ("memo", t_on), ("memo + grid", t_grid)):
                times[name].append(t)
            ratios.append((t_off / t_on, t_on / t_grid))
        store.close()
    med = statistics.median
    print(
        f"{len(todo)} requests over {args.seconds} s of 20 Hz telemetry ({args.rps} req/s, 1 s windows, "
        f"grid {args.grid_ms} ms), x {args.repeats} repeats (medians); load average before: "
        f"{load_before:.2f}, after: {os.getloadavg()[0]:.2f}"
    )
    print(f"decisions per repeat: {decisions}")
    print(f"identical verdict figures and evidence digests with and without the memo: {same}")
    for name, ts in times.items():
        print(f"  {name:<12}: {med(ts) * 1e6:8.1f} us CPU per request")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    print(
        "ratio CPU per request without/with the memo (median of same-run ratios): "
        f"{med(r[0] for r in ratios):.2f}"
    )
    print(
        "ratio CPU per request, memo alone / memo + grid (median of same-run ratios): "
        f"{med(r[1] for r in ratios):.2f}"
    )
    return 0 if same and all(d == decisions["memo"] for d in decisions.values()) else 1


def _has_memo() -> bool:
    import inspect

    return "memo" in inspect.signature(Windows.__init__).parameters


if __name__ == "__main__":
    raise SystemExit(main())
