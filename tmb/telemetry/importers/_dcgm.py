"""``dcgmi dmon`` output and dcgm-exporter Prometheus scrapes."""

from __future__ import annotations

import math
import re
from typing import Final

from tmb.errors import InputError
from tmb.telemetry.importers._common import (
    GpuRef,
    Parsed,
    Reading,
    RowIssues,
    Source,
    no_data,
    parse_instant,
    parse_value,
    range_problem,
)
from tmb.telemetry.sample import PowerField

# dcgmi dmon short names (DCGM's field table) -> tmb field. Ratios (SMACT ...) are fractions 0..1.
DCGMI_FIELDS: Final[dict[str, str]] = {
    "TOTEC": "energy_mj",
    "GPUTL": "gpu_util",
    "MCUTL": "mem_util",
    "SMACT": "sm_active",
    "TENSO": "tensor_active",
    "DRAMA": "dram_active",
    "FBUSD": "mem_used_bytes",
    "FBTTL": "mem_total_bytes",
    "SMCLK": "sm_clock_mhz",
    "MMCLK": "mem_clock_mhz",
    "TMPTR": "temp_c",
    "EPLMT": "power_limit_w",
    "PMLMT": "power_limit_w",
}
DCGMI_POWER: Final[dict[str, PowerField]] = {"POWINST": "instant", "POWER": "average"}
# dcgm-exporter metric -> tmb field.
PROM_FIELDS: Final[dict[str, str]] = {
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "energy_mj",
    "DCGM_FI_DEV_GPU_UTIL": "gpu_util",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "mem_util",
    "DCGM_FI_PROF_SM_ACTIVE": "sm_active",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "tensor_active",
    "DCGM_FI_PROF_PIPE_TENSOR_HMMA_ACTIVE": "tensor_hmma",
    "DCGM_FI_PROF_PIPE_TENSOR_IMMA_ACTIVE": "tensor_imma",
    "DCGM_FI_PROF_PIPE_TENSOR_DFMA_ACTIVE": "tensor_dfma",
    "DCGM_FI_PROF_DRAM_ACTIVE": "dram_active",
    "DCGM_FI_DEV_FB_USED": "mem_used_bytes",
    "DCGM_FI_DEV_FB_TOTAL": "mem_total_bytes",
    "DCGM_FI_DEV_SM_CLOCK": "sm_clock_mhz",
    "DCGM_FI_DEV_MEM_CLOCK": "mem_clock_mhz",
    "DCGM_FI_DEV_GPU_TEMP": "temp_c",
    "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": "power_limit_w",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": "power_limit_w",
}
PROM_POWER: Final[dict[str, PowerField]] = {
    "DCGM_FI_DEV_POWER_USAGE_INSTANT": "instant",
    "DCGM_FI_DEV_POWER_USAGE": "average",
}
_FB_PARTS: Final = ("DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_RESERVED")


def pick_power(available: set[str], table: dict[str, PowerField], want: str) -> tuple[str | None, PowerField]:
    """The power source to read: instant when present (``auto``), else the average."""
    for name, kind in table.items():
        if name in available and want in ("auto", kind):
            return name, kind
    if want != "auto" and available & set(table):
        raise InputError(f"the file has no {want} power reading", available=sorted(available & set(table)))
    return None, "none"


# -- dcgmi dmon ---------------------------------------------------------------------------------------------

_ENTITY = re.compile(r"^(\S+)\s+(\d+)(?:\s+(.*))?$")


def parse_dcgmi(source: Source, issues: RowIssues, *, power: str) -> Parsed:
    rows: list[tuple[int, str, list[str], list[str]]] = []
    tags: list[str] = []
    seen_tags: set[str] = set()
    for no, text in source.lines:
        if text.startswith("#Entity") or text.startswith("# Entity"):
            tags = text.lstrip("#").split()[1:]
            seen_tags.update(tags)
            continue
        if not text.strip() or re.fullmatch(r"ID\b.*", text.strip()):
            continue  # the units line ("ID   W   C"), blank for ratio fields
        rows.append((no, text, tags, []))
    if not seen_tags:
        raise no_data(source, "no '#Entity ...' header line: not dcgmi dmon output")
    power_tag, power_field = pick_power(seen_tags, DCGMI_POWER, power)
    mapping = {t: f for t, f in DCGMI_FIELDS.items() if t in seen_tags}
    mapping = {t: f for t, f in mapping.items() if not (t == "PMLMT" and "EPLMT" in seen_tags)}
    if power_tag:
        mapping[power_tag] = "power_w"
    parsed = Parsed(
        format="dcgmi-dmon",
        tool="dcgmi dmon",
        readings=[],
        rows_read=0,
        timing="order",
        power_field=power_field,
        columns={f: t for t, f in mapping.items()},
        ignored_columns=sorted(seen_tags - set(mapping) - {"FBFRE"}),
    )
    for no, text, row_tags, _ in rows:
        parsed.rows_read += 1
        m = _ENTITY.match(text.strip())
        if not m or not row_tags:
            issues.bad(no, "not an '<entity> <id> <values...>' row under a '#Entity' header", text)
            continue
        kind, ent, rest = m.group(1), int(m.group(2)), (m.group(3) or "").split()
        if kind.upper() != "GPU":
            issues.ignore(f"entity {kind} (not a whole GPU)")
            continue
        if len(rest) != len(row_tags):
            issues.bad(no, f"{len(rest)} values where the header has {len(row_tags)}", text)
            continue
        row = dict(zip(row_tags, rest, strict=True))
        try:
            values = {f: parse_value(row[t], f) for t, f in mapping.items() if t in row}
            if "FBFRE" in row and "mem_total_bytes" not in values:
                free = parse_value(row["FBFRE"], "mem_used_bytes")
                values["mem_total_bytes"] = values.get("mem_used_bytes", math.nan) + free
        except ValueError as exc:
            issues.bad(no, str(exc), text)
            continue
        values = {f: v for f, v in values.items() if not math.isnan(v)}
        if problem := range_problem(values):
            issues.bad(no, problem, text)
            continue
        ref = GpuRef(index=ent)
        parsed.add(no, ref, values, None)
    if "FBFRE" in seen_tags and "FBTTL" not in seen_tags and "FBUSD" in seen_tags:
        parsed.columns["mem_total_bytes"] = "FBUSD + FBFRE"
        parsed.notes.append("total memory is FBUSD + FBFRE (reserved memory not included)")
    return parsed


# -- dcgm-exporter Prometheus scrapes -----------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+(-?\d+))?\s*$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_MARKER = re.compile(r"^#\s*scrape\b\s*(.*)$", re.IGNORECASE)


def parse_labels(text: str) -> dict[str, str]:
    """``gpu="0",UUID="GPU-..."`` -> dict; ValueError when malformed."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text.rstrip()):
        m = _LABEL.match(text, pos)
        if not m:
            raise ValueError(f"malformed labels near {text[pos : pos + 30]!r}")
        out[m.group(1)] = re.sub(r"\\(.)", lambda x: {"n": "\n"}.get(x.group(1), x.group(1)), m.group(2))
        pos = m.end()
    return out


def is_prometheus(lines: list[str]) -> bool:
    return any(
        line.startswith(("# HELP DCGM_", "# TYPE DCGM_")) or re.match(r"^DCGM_FI_\w+(\{.*\})?\s+\S+", line)
        for line in lines
    )


class _Scrape:
    def __init__(self, number: int, t_ns: int | None) -> None:
        self.number, self.t_ns = number, t_ns
        self.gpus: dict[str, tuple[int, GpuRef, dict[str, float], int | None]] = {}
        self.seen: set[tuple[str, str]] = set()


def parse_prometheus(source: Source, issues: RowIssues, *, utc_offset_s: int, power: str) -> Parsed:
    names = {m.group(1) for _, t in source.lines if (m := _SAMPLE.match(t)) and not t.startswith("#")}
    power_metric, power_field = pick_power(names, PROM_POWER, power)
    mapping = dict(PROM_FIELDS)
    if "DCGM_FI_DEV_ENFORCED_POWER_LIMIT" in names:
        mapping.pop("DCGM_FI_DEV_POWER_MGMT_LIMIT")
    if power_metric:
        mapping[power_metric] = "power_w"
    parsed = Parsed(
        format="dcgm-prometheus",
        tool="dcgm-exporter /metrics",
        readings=[],
        rows_read=0,
        timing="order",
        power_field=power_field,
        columns={f: m for m, f in mapping.items() if m in names},
        ignored_columns=sorted(n for n in names - set(mapping) - set(_FB_PARTS) if n.startswith("DCGM_")),
    )
    markers = [m for _, t in source.lines if (m := _MARKER.match(t))]
    marker_times = all(m.group(1).strip() for m in markers) and bool(markers)
    zoneless = False
    scrapes: list[_Scrape] = [] if markers else [_Scrape(0, None)]
    line_times = True
    for no, text in source.lines:
        if m := _MARKER.match(text):
            t_ns = None
            if marker_times:
                try:
                    t_ns, zoned = parse_instant(m.group(1), utc_offset_s)
                    zoneless |= not zoned
                except ValueError as exc:
                    issues.bad(no, f"scrape marker: {exc}", text)
            scrapes.append(_Scrape(len(scrapes), t_ns))
            continue
        if text.startswith("#") or not text.strip():
            continue
        parsed.rows_read += 1
        sm = _SAMPLE.match(text)
        if not sm:
            issues.bad(no, "not a Prometheus sample line ('name{labels} value')", text)
            continue
        name, label_text, raw, stamp = sm.groups()
        if name not in mapping and name not in _FB_PARTS:
            issues.ignore("metric not used by tmb")
            continue
        if not scrapes:
            issues.bad(no, "sample before the first '# scrape' marker", text)
            continue
        try:
            labels = parse_labels(label_text or "")
            if labels.get("GPU_I_ID"):
                issues.ignore("MIG instance series")
                continue
            if not any(k in labels for k in ("gpu", "UUID", "pci_bus_id")):
                raise ValueError("no gpu, UUID or pci_bus_id label")
            field = mapping.get(name, "mem_used_bytes")
            value = math.nan if raw.lower() == "nan" else parse_value(raw, field)
            problem = None if math.isnan(value) else range_problem({field: value})
            if problem:
                raise ValueError(problem)
        except ValueError as exc:
            issues.bad(no, str(exc), text)
            continue
        gpu = labels.get("gpu", "")
        ref = GpuRef(
            int(gpu) if gpu.isdigit() else None, labels.get("UUID") or None, labels.get("pci_bus_id") or None
        )
        if labels.get("modelName"):
            parsed.names.setdefault(ref.key, labels["modelName"])
        parsed.driver_version = parsed.driver_version or labels.get("DCGM_FI_DRIVER_VERSION")
        scrape = scrapes[-1]
        if not markers and (name, ref.key) in scrape.seen:
            scrape = _Scrape(len(scrapes), None)  # the same series again: the next scrape began
            scrapes.append(scrape)
        scrape.seen.add((name, ref.key))
        line_times &= stamp is not None
        line, _, values, t_line = scrape.gpus.setdefault(
            ref.key, (no, ref, {}, int(stamp) * 1_000_000 if stamp is not None else None)
        )
        if name in _FB_PARTS:
            values[f"_{name}"] = value
        elif not math.isnan(value):
            values[field] = value
    for scrape in scrapes:
        for line, ref, values, t_line in scrape.gpus.values():
            parts = [values.pop(f"_{n}", math.nan) for n in _FB_PARTS]
            if "mem_total_bytes" not in values and "mem_used_bytes" in values and not math.isnan(parts[0]):
                values["mem_total_bytes"] = (
                    values["mem_used_bytes"] + parts[0] + (0.0 if math.isnan(parts[1]) else parts[1])
                )
                parsed.columns["mem_total_bytes"] = "DCGM_FI_DEV_FB_USED + FB_FREE (+ FB_RESERVED)"
            t_ns = scrape.t_ns if marker_times else (t_line if line_times else None)
            parsed.readings.append(Reading(line, ref, values, t_ns, scrape.number))
    if marker_times:
        parsed.timing, parsed.local_time = "file", zoneless
        parsed.notes.append("sample times from the '# scrape <time>' markers")
    elif line_times and parsed.readings:
        parsed.timing = "file"
        parsed.notes.append("sample times from the samples' own Prometheus timestamps (ms)")
    elif len(scrapes) > 1:
        how = "'# scrape' markers" if markers else "a repeated series starting the next scrape"
        parsed.notes.append(f"{len(scrapes)} scrapes told apart by {how}; times by scrape order")
    return parsed
