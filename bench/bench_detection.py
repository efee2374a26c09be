"""Detection power of the fingerprint on held-out synthetic traces, at a 0.1 % false-alarm rate.

Enrols one profile per (workload model, regime) for every synthetic model and the ``single`` and
``batched`` regimes (``--enrol-traces`` traces of ``--enrol-seconds`` each, seeds 1..N), then scores
held-out traces (seeds from 10,000 on, never enrolled) against the claim ``llama-1b/bf16/h100``:

* **fixed windows**: the share of ``L``-second windows flagged ``inconsistent`` at a 0.1 % false-alarm
  rate per window, for the genuine model (the measured false-alarm rate) and every substitution;
* **sequential**: looks at 5, 10, ..., 30 s of a trace, each at 0.1 % / 6 (Bonferroni, so a whole genuine
  trace is falsely flagged at most 0.1 % of the time); the decision time is the first look that flags.
  TPR is the share of substitute traces flagged within 30 s; the median decision time is over them.

Telemetry is synthetic (tmb.telemetry.synthetic): these figures measure the statistics, not real GPUs.

    .venv/bin/python bench/bench_detection.py [--traces 40] [--genuine-traces 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from tmb.fingerprint import Profile, Scorer, enroll
from tmb.telemetry import features, generate

CLAIM = "llama-1b/bf16/h100"
MODELS = [
    "llama-1b/bf16/h100",
    "llama-1b/int8/h100",
    "llama-1b/fp8/h100",
    "llama-3b/bf16/h100",
    "tiny-160m/bf16/h100",
    "llama-1b/bf16/a100",
]
SCENARIOS = {
    "genuine (false alarms)": "llama-1b/bf16/h100",
    "quantized int8": "llama-1b/int8/h100",
    "quantized fp8": "llama-1b/fp8/h100",
    "larger model (3b)": "llama-3b/bf16/h100",
    "smaller model (160m)": "tiny-160m/bf16/h100",
    "different GPU (a100)": "llama-1b/bf16/a100",
}
REGIMES = ("single", "batched")
FIXED = (5.0, 10.0, 20.0, 30.0)
LOOKS = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0)
FAR = 1e-3


def enrol_all(traces: int, seconds: float) -> list[Profile]:
    out = []
    for name in MODELS:
        model, precision, gpu = name.split("/")
        for regime in REGIMES:
            batches = [generate(name, regime, seconds, seed=s) for s in range(1, traces + 1)]
            out.append(enroll(model, batches, precision=precision, gpu_type=gpu, regime=regime)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrol-traces", type=int, default=6)
    parser.add_argument("--enrol-seconds", type=float, default=300.0)
    parser.add_argument("--traces", type=int, default=40, help="held-out traces per scenario and regime")
    parser.add_argument("--genuine-traces", type=int, default=200, help="held-out genuine traces per regime")
    args = parser.parse_args()

    t0 = time.perf_counter()
    profiles = enrol_all(args.enrol_traces, args.enrol_seconds)
    print(f"enrolled {len(profiles)} profiles in {time.perf_counter() - t0:.1f} s")
    fixed = Scorer(profiles, target_far=FAR)
    sequential = Scorer(profiles, target_far=FAR / len(LOOKS))

    head = " ".join(f"{f'{L:g}s':>6}" for L in FIXED)
    print(f"{'scenario':<24} {'regime':<8} {'traces':>6} {head} {'seq TPR':>8} {'median s':>8}")
    summary: dict[str, tuple[float, float]] = {}
    genuine_flags = genuine_windows = genuine_traces_flagged = genuine_traces = 0
    for label, name in SCENARIOS.items():
        genuine = name == CLAIM
        n_traces = args.genuine_traces if genuine else args.traces
        all_flagged = 0
        all_times: list[float] = []
        for regime in REGIMES:
            hits = dict.fromkeys(FIXED, 0)
            times: list[float] = []
            for seed in range(10_000, 10_000 + n_traces):
                batch = generate(name, regime, max(LOOKS), seed=seed)
                for L in FIXED:
                    window = features(batch.slice_time(0, int(L * 1e9)))
                    hits[L] += fixed.score(CLAIM, window).decision == "inconsistent"
                for L in LOOKS:
                    window = features(batch.slice_time(0, int(L * 1e9)))
                    if sequential.score(CLAIM, window).decision == "inconsistent":
                        times.append(L)
                        break
            rates = " ".join(f"{hits[L] / n_traces:6.3f}" for L in FIXED)
            tpr = len(times) / n_traces
            med = statistics.median(times) if times else float("nan")
            print(f"{label:<24} {regime:<8} {n_traces:>6} {rates} {tpr:8.3f} {med:8.1f}")
            all_flagged += len(times)
            all_times += times
            if genuine:
                genuine_flags += sum(hits.values())
                genuine_windows += n_traces * len(FIXED)
                genuine_traces_flagged += len(times)
                genuine_traces += n_traces
        if not genuine:
            total = n_traces * len(REGIMES)
            summary[label] = (
                all_flagged / total,
                statistics.median(all_times) if all_times else float("nan"),
            )

    worst = min(summary.values(), key=lambda v: v[0])
    slowest = max(v[1] for v in summary.values())
    print(
        f"genuine: {genuine_flags}/{genuine_windows} fixed windows and "
        f"{genuine_traces_flagged}/{genuine_traces} sequential traces falsely flagged (target {FAR:g})"
    )
    print(
        "detection at 0.1% false-alarm rate (synthetic telemetry): "
        + ", ".join(f"{k} TPR {v[0]:.1%} median {v[1]:g} s" for k, v in summary.items())
        + f"; worst TPR {worst[0]:.1%} within {max(LOOKS):g} s, slowest median decision {slowest:g} s"
    )


if __name__ == "__main__":
    main()
