"""Shared parts of the recording importers: the reading record, cells, times and bad-row bookkeeping.

Every parser turns a file into :class:`Reading` objects (one GPU at one moment, values already in tmb's
units) plus a :class:`Parsed` description of what it found; :mod:`._build` makes the batch and the metadata.
"""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final

from tmb.errors import InputError, ParseError
from tmb.telemetry.sample import PowerField

MIB: Final = 1 << 20
#: How many skipped rows the metadata and the CLI quote (all of them are counted).
QUOTE_ROWS: Final = 10

# Per field: the unit a bare number is in, the plausible range (a value outside is a bad row).
_RANGES: Final[dict[str, tuple[float, float]]] = {
    "power_w": (0.0, 10_000.0),
    "power_limit_w": (0.0, 10_000.0),
    "energy_mj": (0.0, 1e18),
    "gpu_util": (0.0, 100.0),
    "mem_util": (0.0, 100.0),
    "sm_active": (0.0, 1.0),
    "tensor_active": (0.0, 1.0),
    "tensor_hmma": (0.0, 1.0),
    "tensor_imma": (0.0, 1.0),
    "tensor_dfma": (0.0, 1.0),
    "dram_active": (0.0, 1.0),
    "mem_used_bytes": (0.0, float(1 << 50)),
    "mem_total_bytes": (0.0, float(1 << 50)),
    "sm_clock_mhz": (0.0, 20_000.0),
    "mem_clock_mhz": (0.0, 20_000.0),
    "temp_c": (-100.0, 250.0),
}
_UNIT_OF: Final[dict[str, str]] = {
    "power_w": "W",
    "power_limit_w": "W",
    "energy_mj": "mJ",
    "gpu_util": "%",
    "mem_util": "%",
    "mem_used_bytes": "MiB",
    "mem_total_bytes": "MiB",
    "sm_clock_mhz": "MHz",
    "mem_clock_mhz": "MHz",
    "temp_c": "C",
}
# unit as printed -> (canonical unit, factor to the field's tmb unit)
_FACTORS: Final[dict[str, tuple[str, float]]] = {
    "w": ("W", 1.0),
    "mw": ("W", 1e-3),
    "kw": ("W", 1e3),
    "%": ("%", 1.0),
    "b": ("MiB", 1.0 / MIB),
    "kib": ("MiB", 1.0 / 1024),
    "mib": ("MiB", 1.0),
    "mb": ("MiB", 1.0),  # nvidia-smi dmon and dcgmi say MB and mean MiB
    "gib": ("MiB", 1024.0),
    "mhz": ("MHz", 1.0),
    "ghz": ("MHz", 1000.0),
    "c": ("C", 1.0),
    "mj": ("mJ", 1.0),
    "j": ("mJ", 1000.0),
}
_NUMBER = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z%]*)$")


def is_absent(cell: str) -> bool:
    """The tools' ways of saying "no value": ``[N/A]``, ``[Not Supported]`` (any ``[...]``), ``N/A``, ``-``.

    (An empty cell too.)
    """
    text = cell.strip()
    return not text or text == "-" or text.upper() == "N/A" or (text.startswith("[") and text.endswith("]"))


def parse_value(cell: str, name: str, unit: str | None = None) -> float:
    """``cell`` as field ``name`` in tmb's units (NaN when absent); ValueError says what is wrong.

    ``unit`` is the column's unit from a header (``W``, ``MiB``, ...); a unit inside the cell wins.
    """
    if is_absent(cell):
        return math.nan
    m = _NUMBER.match(cell.strip())
    if not m:
        raise ValueError(f"{name}: not a number: {cell.strip()!r}")
    value = float(m.group(1))
    written = m.group(2) or unit or ""
    expected = _UNIT_OF.get(name)
    if written and expected is not None:
        canon = _FACTORS.get(written.lower())
        if canon is None or canon[0] != expected:
            raise ValueError(f"{name}: unit {written!r} where {expected} was expected")
        value *= canon[1]
    if name in ("mem_used_bytes", "mem_total_bytes"):
        value *= MIB
    return value


def range_problem(values: dict[str, float]) -> str | None:
    """A description of the first implausible value (negative power, power above 10 kW, ...), else None."""
    for name, value in values.items():
        lo, hi = _RANGES[name]
        if not math.isfinite(value) or not lo <= value <= hi:
            return f"{name} = {value:g} is outside the plausible range {lo:g}..{hi:g}"
    return None


# -- times ------------------------------------------------------------------------------------------------

_WALL = re.compile(
    r"^(\d{4})[-/]?(\d{2})[-/]?(\d{2})(?:[T ]+|\s*$)(?:(\d{1,2}):(\d{2})(?::(\d{2}))?(?:[.,](\d{1,9}))?)?"
    r"\s*(Z|UTC|[+-]\d{1,2}(?::?\d{2})?)?$",
    re.IGNORECASE,
)
_OFFSET = re.compile(r"^([+-])(\d{1,2})(?::?(\d{2}))?$")


def parse_utc_offset(text: str) -> int:
    """``+02:00``, ``-0530``, ``+2``, ``UTC-04:00``, ``Z`` or ``UTC`` as seconds east of UTC.

    ValueError when malformed.
    """
    t = text.strip()
    if t.upper() in ("Z", "UTC", "GMT"):
        return 0
    if t[:3].upper() in ("UTC", "GMT"):
        t = t[3:].strip()  # UTC-04:00: easier to pass on a command line than -04:00
    m = _OFFSET.match(t)
    if not m or int(m.group(2)) > 14 or int(m.group(3) or 0) > 59:
        raise ValueError(f"not a UTC offset: {text!r} (expected e.g. +02:00)")
    seconds = int(m.group(2)) * 3600 + int(m.group(3) or 0) * 60
    return seconds if m.group(1) == "+" else -seconds


def parse_wall_time(text: str, utc_offset_s: int) -> tuple[int, bool]:
    """``2024/03/29 08:43:09.805`` (or ISO 8601, ``,`` or ``.`` before the fraction) as Unix ns.

    Returns (ns, zoned): a time without a zone is local time ``utc_offset_s`` east of UTC; ``zoned`` says the
    text carried its own zone. ValueError when it is not a time.
    """
    m = _WALL.match(text.strip())
    if not m:
        raise ValueError(f"not a date and time: {text.strip()!r}")
    y, mo, d, hh, mm, ss, frac, zone = m.groups()
    if not (1 <= int(mo) <= 12 and 1 <= int(d) <= calendar.monthrange(int(y), int(mo))[1]):
        raise ValueError(f"not a valid date: {text.strip()!r}")
    hour, minute, sec = int(hh or 0), int(mm or 0), int(ss or 0)
    if hour > 23 or minute > 59 or sec > 60:
        raise ValueError(f"not a valid time of day: {text.strip()!r}")
    epoch = calendar.timegm((int(y), int(mo), int(d), hour, minute, sec, 0, 0, 0))
    offset = parse_utc_offset(zone) if zone else utc_offset_s
    return (epoch - offset) * 1_000_000_000 + int((frac or "0").ljust(9, "0")), zone is not None


def parse_instant(text: str, utc_offset_s: int) -> tuple[int, bool]:
    """A point in time given on the command line or in a marker: Unix seconds, or a date and time."""
    t = text.strip()
    if re.fullmatch(r"\d{9,11}(\.\d+)?", t):
        whole, _, frac = t.partition(".")
        return int(whole) * 1_000_000_000 + int(frac[:9].ljust(9, "0") or 0), True
    return parse_wall_time(t, utc_offset_s)


# -- the intermediate form ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuRef:
    """How a file names a GPU: any of its index, UUID and PCI bus id."""

    index: int | None = None
    uuid: str | None = None
    bus_id: str | None = None

    @property
    def key(self) -> str:
        if self.uuid:
            return f"uuid:{self.uuid.lower()}"
        if self.bus_id:
            return f"bus:{normalise_bus_id(self.bus_id)}"
        return f"index:{self.index if self.index is not None else 0}"


def normalise_bus_id(text: str) -> str:
    """``00000000:0A:00.0`` and ``0000:0a:00.0`` are the same device: ``0000:0a:00.0``."""
    m = re.fullmatch(r"(?:([0-9a-fA-F]+):)?([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F]+)", text.strip())
    if not m:
        return text.strip().lower()
    dom, bus, dev, fn = (int(g or "0", 16) for g in m.groups())
    return f"{dom:04x}:{bus:02x}:{dev:02x}.{fn:x}"


@dataclass
class Reading:
    """One GPU at one moment: values in tmb's units (absent fields are left out), where it came from."""

    line: int
    gpu: GpuRef
    values: dict[str, float]
    t_ns: int | None = None  # the file's own time (see Parsed.timing), None when the file has none
    seq: int = 0  # the sample's position for this GPU, for timing by sample order


@dataclass
class Parsed:
    """What a parser read: readings and how to interpret them."""

    format: str
    tool: str
    readings: list[Reading]
    rows_read: int
    #: "file": Reading.t_ns are the file's times (absolute unless ``relative``); "order": use ``seq``.
    timing: str
    power_field: PowerField = "none"
    relative: bool = False  # file times are relative (e.g. dmon ``-o T``): shifted to --start
    local_time: bool = False  # file times were local wall times (the UTC offset was applied)
    anchor_ns: int | None = None  # for order timing: the start the file suggests
    default_interval_s: float = 1.0
    columns: dict[str, str] = field(default_factory=dict)  # tmb field -> the file's column/metric
    ignored_columns: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # GpuRef.key -> GPU name
    driver_version: str | None = None
    notes: list[str] = field(default_factory=list)
    _seq: dict[str, int] = field(default_factory=dict, repr=False)  # readings so far per GPU

    def add(self, line: int, ref: GpuRef, values: dict[str, float], t_ns: int | None) -> None:
        """Append a reading of ``ref``, numbered in its GPU's order (what "order" timing uses)."""
        n = self._seq.get(ref.key, 0)
        self._seq[ref.key] = n + 1
        self.readings.append(Reading(line, ref, values, t_ns, n))


class RowIssues:
    """Bad rows: an error naming the file and line, or (``skip``) counted and quoted; nothing is silent.

    A final line without a newline that does not parse is a recording cut off mid-write: it is always
    skipped and reported (``truncated_final_line``). Rows the importer does not use on purpose (a MIG
    instance, a repeated header) are counted by reason in ``ignored``.
    """

    def __init__(self, name: str, skip: bool, last_line: int, last_line_partial: bool) -> None:
        self.name, self.skip = name, skip
        self.last_line, self.partial = last_line, last_line_partial
        self.bad_rows = 0
        self.truncated_final_line = False
        self.quoted: list[dict[str, Any]] = []
        self.ignored: dict[str, int] = {}

    def bad(self, line: int, reason: str, text: str) -> None:
        if line == self.last_line and self.partial:
            self.truncated_final_line = True
            self._quote(line, f"truncated final line (no newline at the end of the file): {reason}", text)
            return
        if not self.skip:
            raise ParseError(
                f"{self.name}, line {line}: {reason}",
                path=self.name,
                line=line,
                text=shorten(text),
                hint="fix the row, or pass --skip-bad-rows to skip (and count) rows like it",
            )
        self.bad_rows += 1
        self._quote(line, reason, text)

    def ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1

    def _quote(self, line: int, reason: str, text: str) -> None:
        if len(self.quoted) < QUOTE_ROWS:
            self.quoted.append({"line": line, "reason": reason, "text": shorten(text)})

    @property
    def count(self) -> int:
        return self.bad_rows + int(self.truncated_final_line)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "bad_rows": self.bad_rows,
            "truncated_final_line": self.truncated_final_line,
            "first": list(self.quoted),
        }


def shorten(text: str, limit: int = 80) -> str:
    text = text.rstrip("\r\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Source:
    """The input file: its name, text split into numbered lines, and whether its last line is complete."""

    name: str
    lines: tuple[tuple[int, str], ...]  # (1-based line number, text without the newline)
    partial_last: bool

    @property
    def last_line(self) -> int:
        return self.lines[-1][0] if self.lines else 0

    def issues(self, skip: bool) -> RowIssues:
        return RowIssues(self.name, skip, self.last_line, self.partial_last)


def no_data(source: Source, what: str) -> InputError:
    return InputError(f"{source.name}: {what}", path=source.name)
