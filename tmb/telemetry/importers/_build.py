"""From parsed readings to a :class:`SampleBatch` and the trace metadata that says how it was made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tmb.errors import InputError, ParseError
from tmb.telemetry.importers._common import (
    GpuRef,
    Parsed,
    Reading,
    RowIssues,
    normalise_bus_id,
    parse_instant,
)
from tmb.telemetry.importers._labels import Labels
from tmb.telemetry.load import LoadSeries, RunInfo, day_of
from tmb.telemetry.sample import FLOAT_FIELDS, SampleBatch


@dataclass(frozen=True)
class ImportOptions:
    """How to read a recording (the ``tmb telemetry import`` flags)."""

    format: str = "auto"
    gpu: str | None = None  # INDEX, UUID or PCI bus id; None = every GPU
    utc_offset_s: int | None = None  # local wall times in the file are this far east of UTC
    start: str | None = None  # when the first sample was taken, for files without absolute times
    interval_s: float | None = None  # seconds between samples, for files timed by sample order
    power: str = "auto"  # auto (instant where the file has it) | instant | average
    skip_bad_rows: bool = False
    sort: bool = False
    trim_idle: bool = False

    def __post_init__(self) -> None:
        if self.interval_s is not None and not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise InputError("--interval must be a positive number of seconds", interval=self.interval_s)
        if self.power not in ("auto", "instant", "average"):
            raise InputError("--power must be auto, instant or average", power=self.power)


@dataclass
class _Device:
    ref: GpuRef
    uuid: str
    synthesized: bool
    name: str | None
    number: int  # the file's index, else the order of first appearance (as in GPU-import-<number>)


def _devices(parsed: Parsed) -> dict[str, _Device]:
    devices: dict[str, _Device] = {}
    taken: set[str] = set()
    for r in parsed.readings:
        if r.gpu.key in devices:
            continue
        number = r.gpu.index if r.gpu.index is not None else len(devices)
        if r.gpu.uuid:
            uuid, synth = r.gpu.uuid, False
        else:
            n = number
            uuid, synth = f"GPU-import-{n}", True
            while uuid in taken:
                n += 1
                uuid = f"GPU-import-{n}"
        taken.add(uuid)
        devices[r.gpu.key] = _Device(r.gpu, uuid, synth, parsed.names.get(r.gpu.key), number)
    return devices


def _select(devices: dict[str, _Device], want: str | None) -> list[str]:
    if want is None:
        return list(devices)
    w = want.strip()
    hits = [
        k
        for k, d in devices.items()
        if w.lower() == d.uuid.lower()
        or (w.isdigit() and d.number == int(w))
        or (d.ref.bus_id is not None and normalise_bus_id(w) == normalise_bus_id(d.ref.bus_id))
    ]
    if not hits:
        raise InputError(
            f"no GPU {want!r} in the recording",
            available=[_describe(d) for d in devices.values()],
            hint="--gpu takes a GPU index, UUID or PCI bus id from the file",
        )
    return hits


def _describe(d: _Device) -> str:
    parts = [d.uuid, f"index {d.number}"]
    return " ".join(parts + ([f"bus {d.ref.bus_id}"] if d.ref.bus_id else []))


def _offset_text(seconds: int) -> str:
    sign = "+" if seconds >= 0 else "-"
    return f"{sign}{abs(seconds) // 3600:02d}:{abs(seconds) % 3600 // 60:02d}"


def _times(parsed: Parsed, readings: list[Reading], opts: ImportOptions) -> tuple[list[int], dict[str, Any]]:
    offset = opts.utc_offset_s or 0
    try:
        start_ns = parse_instant(opts.start, offset)[0] if opts.start else None
    except ValueError as exc:
        raise InputError(f"--start: {exc}", hint="give Unix seconds or e.g. 2024-03-29T08:43:09Z") from None
    interval = opts.interval_s or parsed.default_interval_s
    info: dict[str, Any] = {"source": "file" if parsed.timing == "file" else "sample order"}
    if parsed.timing == "file":
        shift = (start_ns or 0) if parsed.relative else 0
        times = [int(r.t_ns) + shift if r.t_ns is not None else 0 for r in readings]
        absolute = not parsed.relative or start_ns is not None
        if parsed.relative:
            info["note"] = "the file has times of day only: times are relative to the first row" + (
                ", placed at --start" if start_ns is not None else ""
            )
        elif parsed.local_time:
            info["utc_offset"] = _offset_text(offset)
            info["assumed_utc"] = opts.utc_offset_s is None
            info["note"] = (
                "local wall times in the file, taken as UTC (pass --utc-offset to convert)"
                if opts.utc_offset_s is None
                else f"local wall times in the file, converted from UTC{_offset_text(offset)}"
            )
        else:
            info["note"] = "absolute times in the file"
        if start_ns is not None and not parsed.relative:
            info["start_ignored"] = "the file has its own absolute times"
    else:
        anchor = start_ns if start_ns is not None else parsed.anchor_ns
        times = [(anchor or 0) + round(r.seq * interval * 1e9) for r in readings]
        absolute = anchor is not None
        info["interval_s"] = interval
        info["interval_given"] = opts.interval_s is not None
        where = "--start" if start_ns is not None else ("the file" if anchor is not None else "none: t = 0")
        info["note"] = (
            f"the file has no usable sample times: samples {interval:g} s apart, start from {where}"
        )
    info["absolute"] = absolute
    return times, info


def _check_order(readings: list[Reading], times: list[int], sort: bool, name: str) -> int:
    """Per GPU, times must not go backwards in file order; with ``sort`` they are counted (then sorted)."""
    last: dict[str, tuple[int, int]] = {}
    backwards = 0
    for r, t in zip(readings, times, strict=True):
        prev = last.get(r.gpu.key)
        if prev is not None and t < prev[0]:
            if not sort:
                raise ParseError(
                    f"{name}, line {r.line}: time goes backwards (before line {prev[1]}, same GPU)",
                    path=name,
                    line=r.line,
                    hint="pass --sort to sort the samples by time (noted in the metadata)",
                )
            backwards += 1
        if prev is None or t >= prev[0]:
            last[r.gpu.key] = (t, r.line)
    return backwards


def _trim_idle(batch: SampleBatch) -> tuple[SampleBatch, dict[str, int]]:
    util = batch.column("gpu_util")
    if not np.any(~np.isnan(util)):
        raise InputError("--trim-idle needs GPU utilisation, and the recording has none")
    busy = np.flatnonzero(~(util == 0.0))
    if busy.size == 0:
        raise InputError("--trim-idle: the GPU utilisation is 0 throughout; nothing would be left")
    kept = batch.slice_time(int(batch.t_ns[busy[0]]), int(batch.t_ns[busy[-1]]) + 1)
    head = int(np.searchsorted(batch.t_ns, batch.t_ns[busy[0]], side="left"))
    return kept, {"head": head, "tail": len(batch) - len(kept) - head}


def build(
    parsed: Parsed, issues: RowIssues, opts: ImportOptions, labels: Labels, file_info: dict[str, Any]
) -> tuple[SampleBatch, dict[str, Any]]:
    """The batch and the full trace metadata for a parsed recording."""
    name = file_info["file"]
    if parsed.rows_read == 0:
        raise InputError(f"{name}: no data rows (only headers or comments)", path=name)
    devices = _devices(parsed)
    chosen = _select(devices, opts.gpu)
    readings = [r for r in parsed.readings if r.gpu.key in chosen]
    times, tinfo = _times(parsed, readings, opts)
    backwards = _check_order(readings, times, opts.sort, name) if parsed.timing == "file" else 0
    kept = [i for i, r in enumerate(readings) if r.values]
    without = len(readings) - len(kept)
    if not kept:
        raise InputError(
            f"{name}: no sample with a value left",
            path=name,
            rows_read=parsed.rows_read,
            skipped=issues.count,
            hint="every row was absent (N/A), skipped or of another GPU",
        )
    order = sorted(kept, key=lambda i: times[i])
    used = [k for k in chosen if any(readings[i].gpu.key == k for i in kept)]
    index = {k: n for n, k in enumerate(used)}
    columns = {f: np.array([readings[i].values.get(f, math.nan) for i in order]) for f in FLOAT_FIELDS}
    batch = SampleBatch.from_columns(
        [times[i] for i in order],
        [devices[k].uuid for k in used],
        gpu=[index[readings[i].gpu.key] for i in order],
        source="import",
        synthetic=False,
        power_field=parsed.power_field,
        processes=None,
        **{f: c for f, c in columns.items() if not np.all(np.isnan(c))},
    )
    trimmed = None
    if opts.trim_idle:
        batch, trimmed = _trim_idle(batch)
    absolute = bool(tinfo["absolute"])
    t_first = int(batch.t_ns[0])
    real = [devices[k].uuid for k in used if not devices[k].synthesized]
    run = RunInfo(
        labels.run_id or file_info["sha256"][:16],
        labels.node or (real[0] if real else "unknown-node"),
        labels.day or (day_of(t_first) if absolute else "unknown-day"),
    )
    gpu_names = sorted({d.name for k in used if (d := devices[k]).name})
    imp: dict[str, Any] = {
        **file_info,
        "format": parsed.format,
        "tool": parsed.tool,
        "rows_read": parsed.rows_read,
        "samples": len(batch),
        "skipped": issues.to_dict(),
        "ignored": dict(issues.ignored),
        "readings_without_values": without,
        "timestamps": {**tinfo, "sorted": backwards if opts.sort else None},
        "gpu_selection": {
            "requested": opts.gpu,
            "selected": [devices[k].uuid for k in chosen],
            "available": [_describe(d) for d in devices.values()],
            "without_values": [devices[k].uuid for k in chosen if k not in index],
        },
        "uuids": (
            "from the file"
            if not any(devices[k].synthesized for k in used)
            else "synthesized as GPU-import-<index>: the file names GPUs by index or bus id only"
        ),
        "power": {"source": parsed.columns.get("power_w"), "field": parsed.power_field},
        "columns": dict(parsed.columns),
        "ignored_columns": list(parsed.ignored_columns),
        "notes": list(parsed.notes),
        "trim_idle": trimmed,
    }
    meta: dict[str, Any] = {
        "synthetic": False,
        "gpu_name": ", ".join(gpu_names) or None,
        "driver_version": parsed.driver_version,
        "supported_fields": list(batch.present_fields()),
        "devices": [
            {
                "uuid": devices[k].uuid,
                "index": devices[k].ref.index,
                "bus_id": devices[k].ref.bus_id,
                "name": devices[k].name,
                "uuid_synthesized": devices[k].synthesized,
            }
            for k in used
        ],
        "workload": labels.workload(),
        "run": run.to_dict(),
        "import": imp,
    }
    if parsed.timing == "order":
        meta["rate_hz"] = 1.0 / tinfo["interval_s"]
    if labels.load is not None:
        meta["load"] = LoadSeries.constant(labels.load, t_first, "label").to_dict()
    return batch, meta
