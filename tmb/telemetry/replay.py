"""Recorded telemetry traces: the file format, reading and writing, and a replay source.

A trace file (format version 1, little-endian; see docs/telemetry.md)::

    magic "TMBTRACE" | u16 version | u16 reserved (0) | u32 M | M bytes metadata JSON (UTF-8 object)
    | u64 B | B bytes canonical SampleBatch encoding | 32 bytes SHA-256 of everything before

The metadata records where the samples came from (source, synthetic flag, GPU name, driver version,
supported fields, rate achieved) and the workload (model, precision, regime, tokens generated, batch size,
wall times). A trace of synthetic samples stays labelled synthetic whatever its metadata says: writing
one that claims otherwise is refused, and so is reading one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tmb import __version__
from tmb.errors import Finding, InputError, ParseError
from tmb.telemetry.sample import SampleBatch

MAGIC: Final = b"TMBTRACE"
VERSION: Final = 1
_HEAD = struct.Struct("<8sHHI")
_DIGEST = 32
MAX_META: Final = 1 << 20


@dataclass(frozen=True)
class Trace:
    """A recorded trace: metadata (JSON object) and the samples."""

    meta: Mapping[str, Any]
    batch: SampleBatch

    @property
    def synthetic(self) -> bool:
        return self.batch.synthetic


def _canonical_json(meta: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InputError(f"trace metadata is not JSON-serialisable: {exc}") from None


def trace_meta(batch: SampleBatch, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``meta`` completed with what the batch says about itself (samples, fields, rate, labels)."""
    summary = batch.summary()
    base: dict[str, Any] = {
        "format": "tmb-trace",
        "tmb_version": __version__,
        "source": batch.source,
        "samples": summary["samples"],
        "gpus": summary["gpus"],
        "fields_present": summary["fields"],
        "rate_hz_achieved": summary["rate_hz"],
        "span_s": summary["span_s"],
        "power_field": batch.power_field,
        "t_first_ns": int(batch.t_ns[0]) if len(batch) else None,
        "t_last_ns": int(batch.t_ns[-1]) if len(batch) else None,
    }
    merged = {**base, **(meta or {})}
    claimed = merged.setdefault("synthetic", batch.synthetic)
    if claimed is not batch.synthetic:
        raise InputError(
            "trace metadata contradicts the samples' synthetic label",
            meta_synthetic=claimed,
            batch_synthetic=batch.synthetic,
        )
    return merged


def encode_trace(batch: SampleBatch, meta: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of a trace file (see the module docstring)."""
    meta_raw = _canonical_json(trace_meta(batch, meta))
    body = batch.encode()
    data = _HEAD.pack(MAGIC, VERSION, 0, len(meta_raw)) + meta_raw + struct.pack("<Q", len(body)) + body
    return data + hashlib.sha256(data).digest()


def write_trace(
    path: str | os.PathLike[str], batch: SampleBatch, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a trace atomically (temporary file + rename); returns the path."""
    target = Path(path)
    data = encode_trace(batch, meta)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write trace: {exc.strerror}", path=str(target)) from None
    return target


def decode_trace(data: bytes, name: str = "<bytes>") -> Trace:
    """Parse trace bytes; :class:`ParseError` names ``name`` and the byte offset of the problem."""

    def fail(message: str, offset: int, **extra: Any) -> ParseError:
        return ParseError(f"trace {name}: {message}", file=name, offset=offset, **extra)

    if len(data) < _HEAD.size:
        raise fail(f"truncated header ({len(data)} bytes, need {_HEAD.size})", len(data))
    magic, version, reserved, meta_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise fail(f"not a tmb trace (magic {magic!r})", 0)
    if version != VERSION:
        raise fail(f"unsupported trace version {version} (this tmb reads {VERSION})", 8)
    if reserved:
        raise fail("reserved field is not zero", 10)
    if meta_len > MAX_META:
        raise fail(f"metadata length {meta_len} exceeds {MAX_META}", 12)
    pos = _HEAD.size
    if pos + meta_len + 8 + _DIGEST > len(data):
        raise fail(f"truncated: metadata of {meta_len} bytes runs past the end", pos)
    meta_raw = data[pos : pos + meta_len]
    pos += meta_len
    (body_len,) = struct.unpack_from("<Q", data, pos)
    if pos + 8 + body_len + _DIGEST != len(data):
        raise fail(f"batch length {body_len} does not match the file size {len(data)}", pos)
    body_at = pos + 8
    digest_at = body_at + body_len
    if hashlib.sha256(data[:digest_at]).digest() != data[digest_at:]:
        raise fail("checksum mismatch: the file is corrupt or was edited", digest_at)
    try:
        meta = json.loads(meta_raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise fail("metadata is not UTF-8", _HEAD.size + exc.start) from None
    except json.JSONDecodeError as exc:
        raise fail(f"metadata is not JSON: {exc.msg}", _HEAD.size + exc.pos) from None
    if not isinstance(meta, dict):
        raise fail("metadata is not a JSON object", _HEAD.size)
    try:
        batch = SampleBatch.decode(data[body_at:digest_at])
    except ParseError as exc:
        raise fail(exc.message, body_at + int(exc.context.get("offset", 0))) from None
    if meta.get("synthetic", batch.synthetic) is not batch.synthetic:
        raise fail("metadata contradicts the samples' synthetic label", _HEAD.size)
    return Trace(meta=meta, batch=batch)


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and check a trace file (see :func:`decode_trace`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read trace: {exc.strerror}", path=str(path)) from None
    return decode_trace(data, str(path))


class ReplaySource:
    """A recorded trace as a telemetry source: batches cut by sample time, every ``interval_s`` of trace.

    ``paced`` sleeps so batches arrive at the trace's own pace divided by ``speed``; otherwise as fast as
    the consumer takes them. ``start_ns`` moves the trace so its first sample is at that wall time.
    Batches say ``source="replay"`` and keep the trace's synthetic label.
    """

    kind = "replay"

    def __init__(
        self,
        trace: Trace | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        paced: bool = False,
        speed: float = 1.0,
        start_ns: int | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if trace is None:
            if path is None:
                raise InputError("a replay source needs a trace or a path")
            trace = read_trace(path)
        if not (math.isfinite(speed) and speed > 0):
            raise InputError("replay speed must be positive", speed=speed)
        batch = trace.batch.with_source("replay")
        if start_ns is not None and len(batch):
            batch = batch.shift_time(start_ns - int(batch.t_ns[0]))
        self.trace = trace
        self.batch = batch
        self.paced, self.speed = paced, speed
        self._clock, self._sleep = clock, sleep

    def read(self) -> SampleBatch:
        """The whole trace as one batch."""
        return self.batch

    async def batches(self, interval_s: float = 1.0) -> AsyncGenerator[SampleBatch, None]:
        """Consecutive windows ``[t0 + k*interval, t0 + (k+1)*interval)`` until the trace ends."""
        if len(self.batch) == 0:
            return
        step = max(1, round(interval_s * 1e9))
        t0, t_end = int(self.batch.t_ns[0]), int(self.batch.t_ns[-1])
        started = self._clock()
        k = 0
        while t0 + k * step <= t_end:
            if self.paced:
                due = started + round((k + 1) * step / self.speed)
                await self._sleep(max(0.0, (due - self._clock()) / 1e9))
            else:
                await self._sleep(0)
            yield self.batch.slice_time(t0 + k * step, t0 + (k + 1) * step)
            k += 1

    @property
    def findings(self) -> list[Finding]:
        return []

    def describe(self) -> dict[str, Any]:
        return {**self.trace.meta, "source": "replay", "replayed_source": self.trace.batch.source}

    def close(self) -> None:
        """Nothing to release."""
