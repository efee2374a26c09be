"""``tmb telemetry record``, ``tmb telemetry show`` and ``tmb telemetry import``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tmb.errors import InputError
from tmb.extras import require
from tmb.telemetry.load import load_from_meta, run_from_meta
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

    _register_import(group)


def _register_import(group: Any) -> None:
    from tmb.telemetry.importers import FORMATS

    imp = group.add_parser(
        "import",
        help="turn a recording (nvidia-smi, dmon, dcgmi, dcgm-exporter, nvsmi scrape) into a trace",
        description="Read a telemetry recording made with another tool and write it as a tmb trace. "
        "Formats: " + ", ".join(FORMATS) + " (see docs/telemetry.md, 'Importing recordings').",
    )
    imp.add_argument("input", metavar="INPUT", help="the recording")
    imp.add_argument("--out", required=True, metavar="TRACE", help="trace file to write")
    imp.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="default: from the content")
    imp.add_argument("--gpu", metavar="INDEX|UUID|BUS_ID", help="import this GPU only (default: every GPU)")
    imp.add_argument(
        "--utc-offset",
        metavar="+HH:MM",
        help="the recording host's offset from UTC: +02:00, UTC-04:00 or --utc-offset=-04:00 (default: UTC)",
    )
    imp.add_argument("--start", metavar="TIME", help="time of the first sample where the file has none")
    imp.add_argument(
        "--interval", type=float, metavar="S", help="seconds between samples where the file has no times"
    )
    imp.add_argument(
        "--power",
        choices=("auto", "instant", "average"),
        default="auto",
        help="power reading (auto: instant if any)",
    )
    imp.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of failing"
    )
    imp.add_argument(
        "--sort", action="store_true", help="sort samples whose times go backwards instead of failing"
    )
    imp.add_argument(
        "--trim-idle", action="store_true", help="drop the leading and trailing 0 %% utilisation samples"
    )
    lab = imp.add_argument_group("labels (written to the trace metadata; flags win over --labels)")
    lab.add_argument("--labels", metavar="FILE", help="sidecar JSON or TOML file with any of the keys below")
    lab.add_argument("--model", help="served model")
    lab.add_argument("--precision", help="weights precision (bf16, fp16, int8, ...)")
    lab.add_argument("--engine", help="inference engine (vllm, trtllm, transformers, ...)")
    lab.add_argument("--gpu-type", help="GPU type as profiles name it (h100, a100, v100s, ...)")
    lab.add_argument("--regime", help="load regime")
    lab.add_argument(
        "--load", type=float, metavar="N", help="requests in flight, constant over the recording"
    )
    lab.add_argument("--run-id", help="recording session id (default: first 16 hex of the file's SHA-256)")
    lab.add_argument("--node", help="node name (default: the GPU UUID, or unknown-node)")
    lab.add_argument("--day", metavar="YYYY-MM-DD", help="day of the run (default: from the first timestamp)")
    imp.set_defaults(func=_import)


def _record(args: argparse.Namespace) -> int:
    if args.source == "synthetic":
        if args.regime not in REGIMES:
            raise InputError(f"unknown load regime {args.regime!r}", known=list(REGIMES))
        run = simulate(args.model, args.regime, args.seconds, args.rate, args.seed)
        m = MODELS[args.model]
        workload = {k: v for k, v in run.workload.items() if k != "load"}
        meta = {
            "gpu_name": m.gpu_name,
            "driver_version": None,
            "supported_fields": list(run.batch.present_fields()),
            "rate_hz": args.rate,
            "workload": workload,
            "load": run.workload["load"],  # where the fingerprint reads it (tmb.telemetry.load)
        }
        write_trace(args.out, run.batch, meta)
        batch = run.batch
    else:
        require("probe", "recording from NVML (--source nvml)", modules=("pynvml",))
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
        print("workload:    " + ", ".join(f"{k}={v}" for k, v in sorted(workload.items()) if k != "load"))
    load = load_from_meta(trace.meta, args.trace)
    if load is not None:
        lo, hi = min(load.values), max(load.values)
        print(f"load:        {lo:g}-{hi:g} requests in flight ({len(load.values)} steps, {load.source})")
    run = run_from_meta(trace.meta, args.trace)
    print(f"run:         {run.id} (node {run.node}, day {run.day})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from tmb.telemetry.importers import ImportOptions, Labels, import_recording, parse_utc_offset

    try:
        offset = None if args.utc_offset is None else parse_utc_offset(args.utc_offset)
    except ValueError as exc:
        raise InputError(f"--utc-offset: {exc}") from None
    options = ImportOptions(
        format=args.format,
        gpu=args.gpu,
        utc_offset_s=offset,
        start=args.start,
        interval_s=args.interval,
        power=args.power,
        skip_bad_rows=args.skip_bad_rows,
        sort=args.sort,
        trim_idle=args.trim_idle,
    )
    given = Labels(
        model=args.model,
        precision=args.precision,
        engine=args.engine,
        gpu_type=args.gpu_type,
        regime=args.regime,
        load=args.load,
        run_id=args.run_id,
        node=args.node,
        day=args.day,
    )
    labels = given.over(Labels.from_file(args.labels)) if args.labels else given
    imported = import_recording(args.input, options, labels)
    imp = imported.meta["import"]
    skipped = imp["skipped"]
    if skipped["count"]:
        print(f"note: skipped {skipped['count']} row(s) of {args.input}:", file=sys.stderr)
        for row in skipped["first"]:
            print(f"  line {row['line']}: {row['reason']}", file=sys.stderr)
        if skipped["count"] > len(skipped["first"]):
            print(f"  ... and {skipped['count'] - len(skipped['first'])} more", file=sys.stderr)
    if imp["readings_without_values"]:
        print(
            f"note: dropped {imp['readings_without_values']} reading(s) with no value (all N/A)",
            file=sys.stderr,
        )
    if imp["trim_idle"]:
        head, tail = imp["trim_idle"]["head"], imp["trim_idle"]["tail"]
        print(f"note: --trim-idle dropped {head} leading and {tail} trailing idle sample(s)", file=sys.stderr)
    if imp["timestamps"].get("assumed_utc"):
        print("note: the file's local times were taken as UTC (pass --utc-offset)", file=sys.stderr)
    imported.write(args.out)
    s = imported.batch.summary()
    print(
        f"wrote {args.out}: {s['samples']} samples, {len(s['gpus'])} GPU(s), {s['span_s']:.1f} s, "
        f"{s['rate_hz']:.2f} Hz per GPU, fields {', '.join(s['fields'])} ({imp['format']})"
    )
    return 0
