"""Record a telemetry source into a trace file (no CLI needed; ``tmb telemetry record`` wraps it)."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from tmb.errors import InputError
from tmb.telemetry.replay import Trace, trace_meta, write_trace
from tmb.telemetry.sample import SampleBatch
from tmb.telemetry.source import TelemetrySource


async def record_async(
    source: TelemetrySource,
    seconds: float,
    path: str | os.PathLike[str],
    *,
    interval_s: float = 1.0,
    workload: Mapping[str, Any] | None = None,
) -> Trace:
    """Take ``ceil(seconds / interval_s)`` batches from ``source`` and write them as one trace.

    The metadata joins the source's own description, the workload given, the wall times of the recording
    and the source's findings (a GPU lost mid-recording is recorded, not hidden).
    """
    if not (math.isfinite(seconds) and seconds > 0 and interval_s > 0):
        raise InputError(
            "recording length and interval must be positive", seconds=seconds, interval_s=interval_s
        )
    wanted = max(1, math.ceil(seconds / interval_s - 1e-9))
    parts: list[SampleBatch] = []
    wall_start = time.time_ns()
    stream = source.batches(interval_s)
    try:
        async for batch in stream:
            parts.append(batch)
            if len(parts) >= wanted:
                break
    finally:
        await stream.aclose()
    wall_end = time.time_ns()
    if not parts:
        raise InputError("the telemetry source produced no batches", source=source.kind)
    batch = SampleBatch.concat(parts)
    described = source.describe()
    meta = {
        **described,
        "workload": {**described.get("workload", {}), **(workload or {})},
        "recording": {"wall_start_ns": wall_start, "wall_end_ns": wall_end, "seconds": seconds},
        "findings": [f.to_dict() for f in source.findings],
    }
    meta = trace_meta(batch, meta)
    write_trace(path, batch, meta)
    return Trace(meta=meta, batch=batch)


def record(
    source: TelemetrySource,
    seconds: float,
    path: str | os.PathLike[str],
    *,
    interval_s: float = 1.0,
    workload: Mapping[str, Any] | None = None,
) -> Trace:
    """Synchronous :func:`record_async` (for scripts; inside an event loop await the async form)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(record_async(source, seconds, path, interval_s=interval_s, workload=workload))
    raise InputError("record() called inside a running event loop", hint="await record_async(...) instead")
