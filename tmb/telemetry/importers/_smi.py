"""``nvidia-smi --query-gpu=... --format=csv[,nounits]`` and ``nvidia-smi dmon`` recordings."""

from __future__ import annotations

import csv
import math
import re
from typing import Final

from tmb.errors import InputError
from tmb.telemetry.importers._common import (
    GpuRef,
    Parsed,
    RowIssues,
    Source,
    no_data,
    parse_value,
    parse_wall_time,
    range_problem,
)
from tmb.telemetry.sample import PowerField

# --query-gpu field -> tmb field (first match wins for power limit and clocks; power is chosen apart).
CSV_FIELDS: Final[dict[str, str]] = {
    "utilization.gpu": "gpu_util",
    "utilization.memory": "mem_util",
    "memory.used": "mem_used_bytes",
    "memory.total": "mem_total_bytes",
    "clocks.current.sm": "sm_clock_mhz",
    "clocks.sm": "sm_clock_mhz",
    "clocks.current.memory": "mem_clock_mhz",
    "clocks.mem": "mem_clock_mhz",
    "temperature.gpu": "temp_c",
    "enforced.power.limit": "power_limit_w",
    "power.limit": "power_limit_w",
}
CSV_POWER: Final[dict[str, PowerField]] = {
    "power.draw.instant": "instant",
    "power.draw.average": "average",
    "power.draw": "average",
}
_CSV_IDS: Final = {"timestamp", "index", "uuid", "gpu_uuid", "pci.bus_id", "gpu_bus_id", "name", "gpu_name"}
_CSV_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def split_header(cell: str) -> tuple[str, str | None]:
    """``power.draw [W]`` -> (``power.draw``, ``W``)."""
    m = re.fullmatch(r"\s*(.*?)\s*(?:\[([^\]]*)\])?\s*", cell)
    name, unit = (m.group(1), m.group(2)) if m else (cell.strip(), None)
    return name.lower(), unit


def looks_like_csv_header(line: str) -> bool:
    names = [split_header(c)[0] for c in line.split(",")]
    known = set(CSV_FIELDS) | set(CSV_POWER) | _CSV_IDS
    return all(_CSV_NAME.match(n) for n in names) and any(n in known for n in names)


def choose_power(available: dict[str, int], want: str) -> tuple[str | None, PowerField]:
    """The power column to read: ``instant`` when the file has it (``auto``), else the average."""
    order = {
        "auto": ("power.draw.instant", "power.draw.average", "power.draw"),
        "instant": ("power.draw.instant",),
        "average": ("power.draw.average", "power.draw"),
    }[want]
    for name in order:
        if name in available:
            return name, CSV_POWER[name]
    if want != "auto" and any(n in available for n in CSV_POWER):
        raise InputError(
            f"the file has no {want} power column", available=sorted(set(CSV_POWER) & set(available))
        )
    return None, "none"


def parse_smi_csv(source: Source, issues: RowIssues, *, utc_offset_s: int, power: str) -> Parsed:
    lines = list(source.lines)
    if not lines:
        raise no_data(source, "the file is empty")
    head_no, head_text = lines[0]
    header = [split_header(c) for c in next(csv.reader([head_text], skipinitialspace=True))]
    names = [h[0] for h in header]
    col = {n: i for i, n in reversed(list(enumerate(names)))}
    power_col, power_field = choose_power(col, power)
    wanted: dict[str, str] = {}
    for qname, fname in CSV_FIELDS.items():
        if qname in col and fname not in wanted.values():
            wanted[qname] = fname
    if power_col:
        wanted[power_col] = "power_w"
    if not wanted:
        raise InputError(
            f"{source.name}: no telemetry column in the header (line {head_no})",
            path=source.name,
            columns=names,
            hint="query at least one of power.draw, utilization.gpu, memory.used, temperature.gpu",
        )
    index_col, uuid_col = col.get("index"), col.get("uuid", col.get("gpu_uuid"))
    bus_col = col.get("pci.bus_id", col.get("gpu_bus_id"))
    name_col = col.get("name", col.get("gpu_name"))
    ts_col, drv_col = col.get("timestamp"), col.get("driver_version")
    parsed = Parsed(
        format="nvidia-smi-csv",
        tool="nvidia-smi --query-gpu --format=csv",
        readings=[],
        rows_read=0,
        timing="file" if ts_col is not None else "order",
        power_field=power_field,
        local_time=ts_col is not None,
        columns={f: q for q, f in wanted.items()},
        ignored_columns=[n for n in names if n not in wanted and n not in _CSV_IDS and n != "driver_version"],
    )
    for no, text in lines[1:]:
        if text.strip() == head_text.strip():
            issues.ignore("repeated header line")
            continue
        parsed.rows_read += 1
        cells = next(csv.reader([text], skipinitialspace=True))
        if len(cells) != len(names):
            issues.bad(no, f"{len(cells)} cells where the header has {len(names)}", text)
            continue
        try:
            values = {f: parse_value(cells[col[q]], f, header[col[q]][1]) for q, f in wanted.items()}
            values = {f: v for f, v in values.items() if not math.isnan(v)}
            index = None
            if index_col is not None and cells[index_col].strip():
                index = int(cells[index_col])
            t_ns = None if ts_col is None else parse_wall_time(cells[ts_col], utc_offset_s)[0]
        except ValueError as exc:
            issues.bad(no, str(exc), text)
            continue
        if problem := range_problem(values):
            issues.bad(no, problem, text)
            continue
        uuid = cells[uuid_col].strip() if uuid_col is not None else ""
        bus = cells[bus_col].strip() if bus_col is not None else ""
        ref = GpuRef(index, uuid or None, bus or None)
        if name_col is not None and cells[name_col].strip():
            parsed.names.setdefault(ref.key, cells[name_col].strip())
        if drv_col is not None and cells[drv_col].strip() and not parsed.driver_version:
            parsed.driver_version = cells[drv_col].strip()
        parsed.add(no, ref, values, t_ns)
    return parsed


# -- nvidia-smi dmon ----------------------------------------------------------------------------------------

DMON_FIELDS: Final[dict[str, str]] = {
    "pwr": "power_w",
    "gtemp": "temp_c",
    "sm": "gpu_util",
    "mem": "mem_util",
    "mclk": "mem_clock_mhz",
    "pclk": "sm_clock_mhz",
    "fb": "mem_used_bytes",
}


def is_dmon_header(text: str) -> bool:
    tokens = text.lstrip("#").replace(",", " ").split()
    return text.startswith("#") and "gpu" in tokens and ("pwr" in tokens or "sm" in tokens)


def parse_dmon(source: Source, issues: RowIssues, *, utc_offset_s: int) -> Parsed:
    parsed = Parsed(
        format="nvidia-smi-dmon",
        tool="nvidia-smi dmon",
        readings=[],
        rows_read=0,
        timing="order",
        power_field="average",
    )
    names: list[str] = []
    units: list[str] = []
    day_s = 86_400 * 1_000_000_000
    first_tod: int | None = None
    last_tod, rollover = 0, 0
    for no, text in source.lines:
        sep = "," if "," in text else None
        if text.startswith("#"):
            tokens = text.lstrip("#").split(sep)
            tokens = [t.strip() for t in tokens if t.strip()]
            if is_dmon_header(text):
                names, units = [t.lower() for t in tokens], []
            elif names and len(tokens) == len(names):
                units = tokens
            continue
        if not text.strip():
            continue
        parsed.rows_read += 1
        if not names:
            issues.bad(no, "data before the '# gpu ...' header line", text)
            continue
        cells = [c.strip() for c in text.split(sep)]
        cells = [c for c in cells if c] if sep is None else cells
        if len(cells) != len(names):
            issues.bad(no, f"{len(cells)} columns where the header has {len(names)}", text)
            continue
        row = dict(zip(names, cells, strict=True))
        unit = dict(zip(names, units, strict=True)) if units else {}
        try:
            values = {f: parse_value(row[c], f, unit.get(c)) for c, f in DMON_FIELDS.items() if c in row}
            values = {f: v for f, v in values.items() if not math.isnan(v)}
            index = int(row["gpu"])
            t_ns = None
            if "date" in row and "time" in row:
                t_ns = parse_wall_time(f"{row['date']} {row['time']}", utc_offset_s)[0]
            elif "time" in row:
                tod = parse_wall_time(f"1970-01-01 {row['time']}", 0)[0]
                if first_tod is None:
                    first_tod = last_tod = tod
                if tod < last_tod:
                    rollover += day_s  # past midnight
                last_tod = tod
                t_ns = tod + rollover - first_tod
        except ValueError as exc:
            issues.bad(no, str(exc), text)
            continue
        if problem := range_problem(values):
            issues.bad(no, problem, text)
            continue
        ref = GpuRef(index=index)
        parsed.add(no, ref, values, t_ns)
        if t_ns is not None:
            parsed.timing = "file"
            parsed.relative = "date" not in row
            parsed.local_time = "date" in row
    if not names:
        raise no_data(source, "no '# gpu pwr ...' header line: not nvidia-smi dmon output")
    parsed.columns = {f: c for c, f in DMON_FIELDS.items() if c in names}
    parsed.ignored_columns = [n for n in names if n not in DMON_FIELDS and n not in ("gpu", "date", "time")]
    if "pclk" in names:
        parsed.notes.append("pclk (the graphics clock) is read as the SM clock")
    return parsed
