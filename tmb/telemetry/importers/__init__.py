"""Recordings people already have, turned into tmb traces (``tmb telemetry import``).

Formats (:data:`FORMATS`; :func:`detect_format` tells them apart by content):

* ``nvidia-smi-csv``: ``nvidia-smi --query-gpu=... --format=csv[,nounits]``;
* ``nvidia-smi-dmon``: ``nvidia-smi dmon [-o DT|T]``;
* ``dcgmi-dmon``: ``dcgmi dmon -e ...``;
* ``dcgm-prometheus``: dcgm-exporter ``/metrics`` scrapes, one or several (``# scrape <time>`` markers);
* ``nvsmi-scrape``: ``nvsmi profiling: <GPU>`` followed by one Python dict literal per line.

:func:`import_recording` returns the batch (``source="import"``, never synthetic) and the trace metadata,
with ``meta["import"]`` recording how it was read: format, file and SHA-256, rows read and skipped, timing,
GPU selection. Format details and metadata keys: docs/telemetry.md, "Importing recordings".
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tmb.errors import InputError, ParseError
from tmb.telemetry.importers._build import ImportOptions, build
from tmb.telemetry.importers._common import Parsed, RowIssues, Source, parse_utc_offset
from tmb.telemetry.importers._dcgm import is_prometheus, parse_dcgmi, parse_prometheus
from tmb.telemetry.importers._labels import WORKLOAD_KEYS, Labels
from tmb.telemetry.importers._nvsmi import HEADER as NVSMI_HEADER
from tmb.telemetry.importers._nvsmi import parse_nvsmi
from tmb.telemetry.importers._smi import is_dmon_header, looks_like_csv_header, parse_dmon, parse_smi_csv
from tmb.telemetry.replay import write_trace
from tmb.telemetry.sample import SampleBatch

__all__ = [
    "FORMATS",
    "WORKLOAD_KEYS",
    "ImportOptions",
    "Imported",
    "Labels",
    "detect_format",
    "import_recording",
    "parse_utc_offset",
]

FORMATS: Final = ("nvidia-smi-csv", "nvidia-smi-dmon", "dcgmi-dmon", "dcgm-prometheus", "nvsmi-scrape")
_SNIFF_LINES: Final = 64


@dataclass(frozen=True)
class Imported:
    """An imported recording: the samples and the trace metadata."""

    batch: SampleBatch
    meta: dict[str, Any]

    def write(self, path: str | os.PathLike[str]) -> Path:
        return write_trace(path, self.batch, self.meta)


def detect_format(lines: list[str], name: str = "<input>") -> str:
    """The format of a recording from its first lines; :class:`InputError` when none fits."""
    head = [line for line in lines if line.strip()][:_SNIFF_LINES]
    if not head:
        raise InputError(f"{name}: the file is empty", path=name)
    first = head[0].strip()
    if first.startswith(NVSMI_HEADER) or first.startswith("{'timestamp"):
        return "nvsmi-scrape"
    if is_prometheus(head):
        return "dcgm-prometheus"
    if any(line.startswith(("#Entity", "# Entity")) for line in head):
        return "dcgmi-dmon"
    for line in head:
        tokens = line.lstrip("#").replace(",", " ").split()
        if line.startswith("#") and "pid" in tokens and "gpu" in tokens:
            raise InputError(
                f"{name}: this is nvidia-smi pmon output (per process), which tmb does not import",
                path=name,
                hint="record with nvidia-smi dmon or --query-gpu instead",
            )
        if is_dmon_header(line):
            return "nvidia-smi-dmon"
    if first.startswith("<?xml") or first.startswith("<nvidia_smi_log"):
        raise InputError(f"{name}: nvidia-smi -q -x XML is not a format tmb imports", path=name)
    if looks_like_csv_header(first):
        return "nvidia-smi-csv"
    raise InputError(
        f"{name}: cannot tell what tool wrote this file",
        path=name,
        first_line=first,
        hint=f"pass --format ({', '.join(FORMATS)}); see docs/telemetry.md",
    )


def _source(path: Path) -> tuple[Source, bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read recording: {exc.strerror}", path=str(path)) from None
    name = str(path)
    if data.startswith(b"TMBTRACE"):
        raise InputError(f"{name} is already a tmb trace", path=name, hint="use tmb telemetry show")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParseError(
            f"{name}, line {line}: not UTF-8 text", path=name, line=line, offset=exc.start
        ) from None
    raw = text.splitlines()
    lines = tuple((n, line.rstrip()) for n, line in enumerate(raw, 1) if line.strip())
    return Source(name, lines, partial_last=bool(text) and not text.endswith(("\n", "\r"))), data


def _parse(fmt: str, source: Source, issues: RowIssues, opts: ImportOptions) -> Parsed:
    offset = opts.utc_offset_s or 0
    if fmt == "nvidia-smi-csv":
        return parse_smi_csv(source, issues, utc_offset_s=offset, power=opts.power)
    if fmt == "nvidia-smi-dmon":
        return parse_dmon(source, issues, utc_offset_s=offset)
    if fmt == "dcgmi-dmon":
        return parse_dcgmi(source, issues, power=opts.power)
    if fmt == "dcgm-prometheus":
        return parse_prometheus(source, issues, utc_offset_s=offset, power=opts.power)
    if fmt == "nvsmi-scrape":
        return parse_nvsmi(source, issues)
    raise InputError(f"unknown recording format {fmt!r}", known=list(FORMATS))


def import_recording(
    path: str | os.PathLike[str], options: ImportOptions | None = None, labels: Labels | None = None
) -> Imported:
    """Read a recording into a batch and trace metadata (see the module docstring)."""
    opts = options or ImportOptions()
    p = Path(path)
    source, data = _source(p)
    if not source.lines:
        raise InputError(f"{source.name}: the file is empty", path=source.name)
    fmt = detect_format([t for _, t in source.lines], source.name) if opts.format == "auto" else opts.format
    issues = source.issues(opts.skip_bad_rows)
    parsed = _parse(fmt, source, issues, opts)
    file_info = {
        "file": p.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "format_detected": opts.format == "auto",
    }
    batch, meta = build(parsed, issues, opts, labels or Labels(), file_info)
    return Imported(batch, meta)
