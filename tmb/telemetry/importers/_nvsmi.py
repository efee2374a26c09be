"""The "nvsmi scrape" format: a loop that ran plain ``nvidia-smi`` and saved its table as Python dicts.

Line 1 is ``nvsmi profiling: <GPU name>``; each further line is a dict literal (parsed with
``ast.literal_eval``, never ``eval``) in one of two layouts:

* one GPU: ``{'timestamp_readable': ..., 'timestamp_raw': <epoch s>, 'power_usage': '209W / 250W',
  'memory_usage': '30620MiB / 32768MiB', 'gpu_utilization': '100%'}``;
* every GPU: ``{'timestamp_readable': ..., 'timestamp_raw': ..., 0: {'temp_celsius': '22C', 'power_usage':
  ..., ...}, 1: {...}, 'num_gpus': N}``.

Some recordings repeat one constant ``timestamp_raw`` on every line: their samples are then timed by order,
``--interval`` apart (1.1 s by default, the sampler's pace), starting at that constant.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Final

from tmb.telemetry.importers._common import (
    GpuRef,
    Parsed,
    RowIssues,
    Source,
    no_data,
    parse_value,
    range_problem,
)

HEADER: Final = "nvsmi profiling:"
DEFAULT_INTERVAL_S: Final = 1.1
_PAIR = re.compile(r"^\s*(\S+?)\s*/\s*(\S+?)\s*$")
_GPU_KEYS: Final = ("power_usage", "memory_usage", "gpu_utilization", "temp_celsius")


def _pair(text: str, first: str, second: str) -> dict[str, float]:
    """``'209W / 250W'`` -> {first: 209, second: 250}; ``'N/A'`` -> {}."""
    if text.strip().upper() == "N/A":
        return {}
    m = _PAIR.match(text)
    if not m:
        raise ValueError(f"expected 'value / value', got {text!r}")
    return {first: parse_value(m.group(1), first), second: parse_value(m.group(2), second)}


def _gpu_values(entry: dict[Any, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for key, value in entry.items():
        if key not in _GPU_KEYS:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        if key == "power_usage":
            values.update(_pair(value, "power_w", "power_limit_w"))
        elif key == "memory_usage":
            values.update(_pair(value, "mem_used_bytes", "mem_total_bytes"))
        elif key == "gpu_utilization":
            values["gpu_util"] = parse_value(value, "gpu_util")
        else:
            values["temp_c"] = parse_value(value, "temp_c")
    return {k: v for k, v in values.items() if not math.isnan(v)}


def parse_nvsmi(source: Source, issues: RowIssues) -> Parsed:
    lines = list(source.lines)
    if not lines or not lines[0][1].startswith(HEADER):
        raise no_data(source, f"the first line is not '{HEADER} <GPU name>'")
    name = lines[0][1][len(HEADER) :].strip()
    parsed = Parsed(
        format="nvsmi-scrape",
        tool="nvidia-smi table scraper (nvsmi profiling)",
        readings=[],
        rows_read=0,
        timing="file",
        power_field="average",
        default_interval_s=DEFAULT_INTERVAL_S,
        columns={
            "power_w": "power_usage (before /)",
            "power_limit_w": "power_usage (after /)",
            "mem_used_bytes": "memory_usage (before /)",
            "mem_total_bytes": "memory_usage (after /)",
            "gpu_util": "gpu_utilization",
        },
    )
    layouts: set[str] = set()
    times: list[int] = []
    for no, text in lines[1:]:
        if not text.strip():
            continue
        parsed.rows_read += 1
        try:
            record = ast.literal_eval(text.strip())
            if not isinstance(record, dict):
                raise ValueError("not a dict literal")
            raw = record.get("timestamp_raw")
            if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
                raise ValueError(f"timestamp_raw: expected epoch seconds, got {raw!r}")
            gpus = {k: v for k, v in record.items() if isinstance(k, int) and not isinstance(k, bool)}
            if gpus:
                if not all(isinstance(v, dict) for v in gpus.values()):
                    raise ValueError("a GPU entry is not a dict")
                per_gpu = {k: _gpu_values(v) for k, v in sorted(gpus.items())}
                layout = "every GPU"
            else:
                if not any(k in record for k in _GPU_KEYS):
                    raise ValueError("no power_usage, memory_usage or gpu_utilization")
                per_gpu = {0: _gpu_values(record)}
                layout = "one GPU"
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            issues.bad(no, f"not an nvsmi record: {exc}", text)
            continue
        problem = next((p for v in per_gpu.values() if (p := range_problem(v))), None)
        if problem:
            issues.bad(no, problem, text)
            continue
        layouts.add(layout)
        t_ns = round(raw * 1e9)
        times.append(t_ns)
        for index, values in per_gpu.items():
            if "temp_c" in values:
                parsed.columns["temp_c"] = "temp_celsius"
            ref = GpuRef(index=index)
            parsed.names.setdefault(ref.key, name)
            parsed.add(no, ref, values, t_ns)
    parsed.notes.append(f"layout: {' and '.join(sorted(layouts)) or 'none'}")
    if len(times) > 1 and len(set(times)) == 1:
        parsed.timing, parsed.anchor_ns = "order", times[0]
        parsed.notes.append(
            "timestamp_raw is one constant value on every line (a known fault of this recorder): "
            "samples are timed by order, --interval apart, from that value"
        )
    return parsed
