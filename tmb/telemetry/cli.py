"""``tmb telemetry record`` and ``tmb telemetry show``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tmb.errors import InputError
from tmb.telemetry.replay import read_trace, write_trace
from tmb.telemetry.synthetic import MODELS, REGIMES, simulate


def register(sub: Any) -> None:
    """Add the ``telemetry`` subcommand group to the top-level parser's subparsers."""
    parser = sub.add_parser("telemetry", help="record and inspect GPU telemetry traces")
    group = parser.add_subparsers(dest="telemetry_command", metavar="ACTION")
    group.required = True

    rec = group.add_parser("record", help="record a telemetry trace (NVML or synthetic)")
    rec.add_argument("--source", choices=("synthetic", "nvml"), default="synthetic")
    rec.add_argument(
        "--model",
        default="llama-1b/bf16/h100",
        help=f"synthetic: workload model ({', '.join(MODELS)}); nvml: served model, for the metadata",
    )
    rec.add_argument("--regime", default="single", help=f"load regime ({', '.join(REGIMES)})")
    rec.add_argument("--seconds", type=float, default=30.0, help="length of the trace, s")
    rec.add_argument("--rate", type=float, default=20.0, help="sampling rate, Hz")
    rec.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    rec.add_argument("--out", required=True, help="trace file to write")
    rec.set_defaults(func=_record)

    show = group.add_parser("show", help="summarise a telemetry trace")
    show.add_argument("trace")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=_show)


def _record(args: argparse.Namespace) -> int:
    if args.source == "synthetic":
        if args.regime not in REGIMES:
            raise InputError(f"unknown load regime {args.regime!r}", known=list(REGIMES))
        run = simulate(args.model, args.regime, args.seconds, args.rate, args.seed)
        m = MODELS[args.model]
        meta = {
            "gpu_name": m.gpu_name,
            "driver_version": None,
            "supported_fields": list(run.batch.present_fields()),
            "rate_hz": args.rate,
            "workload": run.workload,
        }
        write_trace(args.out, run.batch, meta)
        batch = run.batch
    else:
        from tmb.telemetry.nvml import NvmlSource
        from tmb.telemetry.record import record

        source = NvmlSource(rate_hz=args.rate)
        try:
            trace = record(
                source, args.seconds, args.out, workload={"model": args.model, "regime": args.regime}
            )
        finally:
            source.close()
        batch = trace.batch
    label = " (synthetic)" if batch.synthetic else ""
    print(f"wrote {args.out}: {len(batch)} samples{label}")
    return 0


def _show(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    summary = dict(trace.batch.summary())
    summary["workload"] = trace.meta.get("workload")
    summary["gpu_name"] = trace.meta.get("gpu_name")
    summary["driver_version"] = trace.meta.get("driver_version")
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(f"trace:       {args.trace}")
    print(f"telemetry:   {'SYNTHETIC' if trace.synthetic else 'measured'} (source {summary['source']})")
    span, rate = summary["span_s"], summary["rate_hz"]
    print(f"samples:     {summary['samples']} over {span:.2f} s, {rate:.2f} Hz per GPU")
    print(f"gpus:        {', '.join(summary['gpus']) or '-'} ({summary['gpu_name'] or 'unknown'})")
    print(f"driver:      {summary['driver_version'] or '-'}")
    print(f"power field: {summary['power_field']}")
    print(f"fields:      {', '.join(summary['fields']) or '-'}")
    workload = summary["workload"]
    if isinstance(workload, dict) and workload:
        print("workload:    " + ", ".join(f"{k}={v}" for k, v in sorted(workload.items())))
    return 0
