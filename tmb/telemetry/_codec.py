"""The canonical byte encoding of a :class:`~tmb.telemetry.sample.SampleBatch` (format version 1).

Little-endian throughout; the layout is documented in ``docs/telemetry.md``. Encoding is a pure function of
the batch, and decoding accepts only canonical input, so ``encode(decode(b)) == b`` for every accepted ``b``:
the probe hash-chains these bytes, and two encodings of one batch would be two digests of one truth.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

from tmb.errors import InputError, ParseError
from tmb.telemetry.sample import FLOAT_FIELDS, SOURCES, PowerField, Process, SampleBatch, SourceKind

MAGIC: Final = b"TMBS"
VERSION: Final = 1
_HEADER = struct.Struct("<4sHBBBBHII")  # magic, version, source, flags, power_field, reserved, G, N, mask
_POWER_FIELDS: Final[tuple[PowerField, ...]] = ("none", "instant", "average")
_SOURCES: Final[tuple[SourceKind, ...]] = SOURCES
_FLAG_SYNTHETIC: Final = 0x01
_MEM_UNKNOWN: Final = 0xFFFF_FFFF_FFFF_FFFF
_CANON_NAN: Final = 0x7FF8_0000_0000_0000
_PROC = struct.Struct("<IQ")
_ONE = struct.Struct("<HIQ")  # a sample with one process: count, pid, used bytes
_FMAX = np.fmax.reduce


def encode_batch(batch: SampleBatch) -> bytes:
    """Bytes of ``batch`` in format version 1."""
    n = len(batch)
    if len(batch.gpus) > 0xFFFF:
        raise InputError("too many GPUs in one batch for the encoding", gpus=len(batch.gpus))
    # The float columns as one fields x samples matrix: batch.present_fields() in one reduction (fmax
    # ignores NaN, so it is NaN only for an all-NaN row) and one NaN bit pattern in one assignment.
    m = np.stack([batch.column(name) for name in FLOAT_FIELDS]) if n else np.empty((len(FLOAT_FIELDS), 0))
    keep = np.flatnonzero(~np.isnan(_FMAX(m, axis=1))) if n else np.empty(0, dtype=np.intp)
    mask = sum(1 << int(j) for j in keep.tolist())
    out = [
        _HEADER.pack(
            MAGIC,
            VERSION,
            _SOURCES.index(batch.source),
            _FLAG_SYNTHETIC if batch.synthetic else 0,
            _POWER_FIELDS.index(batch.power_field),
            0,
            len(batch.gpus),
            n,
            mask,
        )
    ]
    for uuid in batch.gpus:
        raw = uuid.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise InputError("GPU uuid too long for the encoding", length=len(raw))
        out.append(struct.pack("<H", len(raw)) + raw)
    out.append(batch.t_ns.astype("<i8").tobytes())
    out.append(batch.gpu.astype("<u2").tobytes())
    cols = np.asarray(m[keep], dtype="<f8")  # a copy (fancy indexing): the present columns in order
    cols[np.isnan(cols)] = np.nan  # one NaN bit pattern
    out.append(cols.tobytes())
    out.append(_encode_processes(batch.processes))
    return b"".join(out)


def _encode_processes(rows: tuple[tuple[Process, ...], ...]) -> bytes:
    """Per sample: the process count (u16), then (pid u32, used bytes u64) per process; one ``struct`` call
    for the whole table when every value is in range, else :func:`_encode_processes_checked` says which
    is not."""
    counts = [len(row) for row in rows]
    if not any(counts):
        return bytes(2 * len(rows))
    if counts[0] == 1 and counts.count(1) == len(counts):  # the usual table: one GPU process a sample
        if _MEM_UNKNOWN not in [mem for ((_, mem),) in rows]:
            try:
                return b"".join(
                    [_ONE.pack(1, pid, _MEM_UNKNOWN if mem is None else mem) for ((pid, mem),) in rows]
                )
            except struct.error:  # a value out of range
                pass
        return _encode_processes_checked(rows)
    values: list[int] = []
    fmt = ["<"]
    for row, count in zip(rows, counts, strict=True):
        values.append(count)
        fmt.append("H" + "IQ" * count)
        for pid, mem in row:
            values.append(pid)
            values.append(_MEM_UNKNOWN if mem is None else mem)
    mems = [mem for row in rows for _, mem in row if mem is not None]
    if max(counts) > 0xFFFF or (mems and not (min(mems) >= 0 and max(mems) < _MEM_UNKNOWN)):
        return _encode_processes_checked(rows)
    try:
        return struct.pack("".join(fmt), *values)
    except struct.error:  # a pid out of range (or not an integer)
        return _encode_processes_checked(rows)


def _encode_processes_checked(rows: tuple[tuple[Process, ...], ...]) -> bytes:
    """:func:`_encode_processes` one entry at a time, raising on the first value out of range."""
    out = []
    for row in rows:
        if len(row) > 0xFFFF:
            raise InputError("too many GPU processes in one sample for the encoding", processes=len(row))
        out.append(struct.pack("<H", len(row)))
        for pid, mem in row:
            if not 0 <= pid <= 0xFFFF_FFFF or (mem is not None and not 0 <= mem < _MEM_UNKNOWN):
                raise InputError("GPU process pid or memory out of range", pid=pid, used_bytes=mem)
            out.append(_PROC.pack(pid, _MEM_UNKNOWN if mem is None else mem))
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, message: str, offset: int | None = None) -> ParseError:
        return ParseError(f"telemetry batch: {message}", offset=self.pos if offset is None else offset)

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.pos:
            raise self.fail(f"truncated {what}: need {size} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[int, ...]:
        values: tuple[int, ...] = fmt.unpack(self.take(fmt.size, what))
        return values


def decode_batch(data: bytes) -> SampleBatch:
    """Parse a version-1 encoding; any deviation raises :class:`ParseError` with the offset."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ParseError("telemetry batch: expected bytes", got=type(data).__name__)
    r = _Reader(bytes(data))
    magic_raw = r.take(4, "magic")
    if magic_raw != MAGIC:
        raise r.fail(f"bad magic {magic_raw!r}, expected {MAGIC!r}", 0)
    r.pos = 0
    _, version, src, flags, pfield, reserved, n_gpus, n, mask = r.unpack(_HEADER, "header")
    if version != VERSION:
        raise r.fail(f"unsupported encoding version {version} (this tmb reads {VERSION})", 4)
    if src >= len(_SOURCES):
        raise r.fail(f"unknown source code {src}", 6)
    if flags & ~_FLAG_SYNTHETIC:
        raise r.fail(f"unknown flag bits 0x{flags:02x}", 7)
    if pfield >= len(_POWER_FIELDS):
        raise r.fail(f"unknown power field code {pfield}", 8)
    if reserved:
        raise r.fail("reserved byte is not zero", 9)
    if mask >> len(FLOAT_FIELDS):
        raise r.fail(f"field mask 0x{mask:08x} names unknown fields", 16)
    source = _SOURCES[src]
    synthetic = bool(flags & _FLAG_SYNTHETIC)
    if source == "synthetic" and not synthetic:
        raise r.fail("synthetic source without the synthetic flag", 7)
    gpus: list[str] = []
    for _ in range(n_gpus):
        at = r.pos
        (length,) = r.unpack(struct.Struct("<H"), "GPU uuid length")
        raw = r.take(length, "GPU uuid")
        try:
            uuid = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise r.fail("GPU uuid is not UTF-8", at) from None
        if uuid in gpus:
            raise r.fail(f"duplicate GPU uuid {uuid!r}", at)
        gpus.append(uuid)
    present = [name for i, name in enumerate(FLOAT_FIELDS) if mask >> i & 1]
    minimum = n * (8 + 2 + 8 * len(present) + 2)
    if minimum > len(r.data) - r.pos:
        raise r.fail(f"truncated: {n} samples need at least {minimum} more bytes, {len(r.data) - r.pos} left")
    at = r.pos
    t_ns = np.frombuffer(r.take(8 * n, "timestamps"), dtype="<i8").astype(np.int64)
    if n > 1 and bool(np.any(np.diff(t_ns) < 0)):
        raise r.fail("timestamps are not sorted", at + 8 * (int(np.argmax(np.diff(t_ns) < 0)) + 1))
    at = r.pos
    gpu = np.frombuffer(r.take(2 * n, "GPU indices"), dtype="<u2").astype(np.int64)
    if n and int(gpu.max()) >= n_gpus:
        raise r.fail(f"GPU index out of range (table has {n_gpus})", at + 2 * int(np.argmax(gpu >= n_gpus)))
    cols: dict[str, np.ndarray] = {}
    for name in present:
        at = r.pos
        raw = r.take(8 * n, f"column {name}")
        bits = np.frombuffer(raw, dtype="<u8")
        col = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        nan = np.isnan(col)
        if bool(nan.all()):
            raise r.fail(f"column {name} is flagged present but all absent", at)
        bad = nan & (bits != _CANON_NAN)
        if bool(bad.any()):
            raise r.fail(f"non-canonical NaN in column {name}", at + 8 * int(np.argmax(bad)))
        cols[name] = col
    processes: list[tuple[Process, ...]] = []
    for _ in range(n):
        (count,) = r.unpack(struct.Struct("<H"), "process count")
        row: list[Process] = []
        for _ in range(count):
            pid, mem = r.unpack(_PROC, "process entry")
            row.append((pid, None if mem == _MEM_UNKNOWN else mem))
        processes.append(tuple(row))
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} trailing bytes after the batch")
    return SampleBatch.from_columns(
        t_ns,
        gpus,
        gpu=gpu,
        processes=processes,
        source=source,
        synthetic=synthetic,
        power_field=_POWER_FIELDS[pfield],
        **cols,
    )
