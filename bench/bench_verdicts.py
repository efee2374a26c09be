"""Verdicts per second on one core: scoring + signing + storing, the verdict engine's whole job per request.

Enrols two load-aware profiles (llama-1b bf16 and int8 on H100, the demo's load, four synthetic runs each),
then for N requests with 5 s windows (100 samples at 20 Hz): ``Engine.decide`` (window summary, the
fingerprint judged against the claimed profile and the alternatives), then signing and storing them as
the daemon
does under load: batch signatures (``BatchSigner.sign_many``, one Ed25519 signature per 256 verdicts) and
one store transaction (``AsyncStore.publish_many``, synchronous=NORMAL, the default). Side by side in the
same run, the peer: the same signing + storing of pre-built verdicts (no scoring), so the cost of scoring
shows as a ratio.
Run: ``.venv/bin/python bench/bench_verdicts.py [--requests N] [--repeats R]``. Prints the ratio last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from sample_infra.demo_setup import demo_trace, enrol_profiles
from tmb.fingerprint import Judge, load_profile, summarise
from tmb.ingest.results import AttestationSummary
from tmb.spans import Outcome, Span
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings, widen
from tmb.verdict.signing import load_or_create_key

T0 = 1_700_000_000 * 10**9


def profiles(tmp: Path) -> list:  # type: ignore[type-arg]
    paths = enrol_profiles(["llama-1b/bf16/h100", "llama-1b/int8/h100"], tmp / "profiles")
    return [load_profile(p) for p in paths]


def span(i: int) -> Span:
    start = T0 + i * 5 * 10**9
    return Span(
        f"{i:032x}", None, "w1", "gpu-node-1", ("GPU-1",), "llama-1b/bf16/h100", "llama-1b", "POST",
        "/v1/chat/completions", start, start + 10**7, start + 5 * 10**9, 200, 100, 1000, 250, Outcome.OK,
    )  # fmt: skip


async def run(n: int, repeats: int) -> None:
    summary = AttestationSummary("gpu-node-1", 1, 1, 1, 0, "aa" * 32, "sha256", True, True, True)
    windows = [demo_trace("llama-1b/bf16/h100", 5, seed=100 + i, start_ns=span(i).start_ns) for i in range(n)]
    windows = [w.slice_time(span(i).start_ns, span(i).end_ns) for i, w in enumerate(windows)]
    full, sign_only, scoring = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        signer = load_or_create_key(Path(tmp) / "key.pem")
        profs = profiles(Path(tmp))
        engine = Engine(AsyncStore(Path(tmp) / "a.db"), signer, None, profs, EngineSettings(demo=True))
        judge = Judge(profs)
        peer = AsyncStore(Path(tmp) / "b.db")
        decisions: dict[str, int] = {}
        for r in range(repeats):
            t = time.process_time()
            decided = []
            for i in range(n):
                sp = span(i + r * n)
                verdict, refs = engine.decide(sp, widen(sp, 1.0), windows[i], summary, [])
                decisions[verdict.decision.value] = decisions.get(verdict.decision.value, 0) + 1
                decided.append((verdict, refs))
            # as the daemon does under load: the verdicts decided together signed and stored together
            signed = await engine.batch_signer.sign_many([v for v, _ in decided])
            await engine.store.publish_many([(v, refs) for v, (_, refs) in zip(signed, decided, strict=True)])
            full.append((time.process_time() - t) / n)
            t = time.process_time()
            prebuilt = [dataclasses.replace(verdict, request_id=f"{i + r * n:032x}") for i in range(n)]
            signed = await engine.batch_signer.sign_many(prebuilt)
            await peer.publish_many([(v, refs) for v in signed])
            sign_only.append((time.process_time() - t) / n)
            t = time.process_time()
            for i in range(n):
                judge.judge("llama-1b/bf16/h100", summarise(windows[i], 1.0))
            scoring.append((time.process_time() - t) / n)
        await engine.store.close()
        await peer.close()
    f, s, sc = statistics.median(full), statistics.median(sign_only), statistics.median(scoring)
    print(f"{n} requests x {repeats} repeats, 5 s windows at 20 Hz, 2 profiles; decisions: {decisions}")
    print(f"score + sign + store : {f * 1e3:7.3f} ms CPU per verdict  -> {1 / f:8.0f} verdicts/s per core")
    print(f"sign + store (peer)  : {s * 1e3:7.3f} ms CPU per verdict  -> {1 / s:8.0f} verdicts/s per core")
    print(f"scoring alone (summary + judge of one 5 s window): {sc * 1e3:.3f} ms CPU (aim <= 0.5 ms)")
    print(f"ratio full/peer CPU per verdict: {f / s:.2f}x; verdicts per core per second: {1 / f:.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(run(args.requests, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
