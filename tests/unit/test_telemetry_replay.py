"""Trace files: round trip, labels, corrupt and foreign files, the replay source."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tmb.errors import InputError, ParseError
from tmb.telemetry import SampleBatch, generate
from tmb.telemetry.replay import ReplaySource, Trace, decode_trace, encode_trace, read_trace, write_trace
from tmb.telemetry.source import TelemetrySource, open_source

WORKLOAD = {
    "model": "llama-1b",
    "precision": "bf16",
    "regime": "single",
    "tokens_generated": 123,
    "batch_size": 1,
}


def trace_file(tmp_path: Path, seconds: float = 5.0) -> tuple[Path, SampleBatch]:
    batch = generate("llama-1b/bf16/h100", "single", seconds, seed=2, start_ns=10**18)
    path = write_trace(tmp_path / "t.trace", batch, {"gpu_name": "NVIDIA H100", "workload": WORKLOAD})
    return path, batch


def test_round_trip_with_metadata(tmp_path: Path) -> None:
    path, batch = trace_file(tmp_path)
    trace = read_trace(path)
    assert trace.batch == batch and trace.synthetic
    meta = trace.meta
    assert meta["synthetic"] is True and meta["source"] == "synthetic" and meta["samples"] == 100
    assert meta["workload"] == WORKLOAD and meta["gpu_name"] == "NVIDIA H100"
    assert meta["rate_hz_achieved"] == pytest.approx(20.0) and "tensor_active" in meta["fields_present"]
    assert path.read_bytes() == encode_trace(batch, {"gpu_name": "NVIDIA H100", "workload": WORKLOAD})
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary behind


def test_synthetic_label_cannot_be_lost(tmp_path: Path) -> None:
    _, batch = trace_file(tmp_path)
    with pytest.raises(InputError, match="synthetic"):
        write_trace(tmp_path / "x.trace", batch, {"synthetic": False})
    # A crafted file whose metadata says "measured" over synthetic samples is refused on read too.
    data = encode_trace(batch)
    meta_len = struct.unpack_from("<I", data, 12)[0]
    meta = json.loads(data[16 : 16 + meta_len])
    meta["synthetic"] = False
    raw = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body = data[16 + meta_len : -32]
    forged = data[:12] + struct.pack("<I", len(raw)) + raw + body
    forged += hashlib.sha256(forged).digest()
    with pytest.raises(ParseError, match="synthetic label"):
        decode_trace(forged, "forged.trace")


def _resealed(data: bytes) -> bytes:
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


def test_corrupt_and_foreign_files_name_file_and_offset(tmp_path: Path) -> None:
    path, _ = trace_file(tmp_path, 1.0)
    data = path.read_bytes()
    cases = {
        "empty": (b"", "truncated header"),
        "short": (data[:40], "truncated"),
        "cut": (data[:-1], "does not match the file size"),
        "flipped": (data[:200] + bytes([data[200] ^ 1]) + data[201:], "checksum mismatch"),
        "version": (_resealed(data[:8] + struct.pack("<H", 9) + data[10:]), "unsupported trace version 9"),
        "magic": (b"NOTTRACE" + data[8:], "not a tmb trace"),
        "json": (_resealed(data[:16] + b"#" + data[17:]), "not JSON"),
    }
    for name, (raw, message) in cases.items():
        target = tmp_path / f"{name}.trace"
        target.write_bytes(raw)
        with pytest.raises(ParseError, match=message) as info:
            read_trace(target)
        assert info.value.context["file"] == str(target), name
        assert isinstance(info.value.context["offset"], int), name
        assert str(target) in info.value.diagnostics()
    # A bad batch inside a well-sealed file: the offset is the absolute file offset.
    meta_len = struct.unpack_from("<I", data, 12)[0]
    body_at = 16 + meta_len + 8
    bad = _resealed(data[:body_at] + b"XXXX" + data[body_at + 4 :])
    with pytest.raises(ParseError, match="bad magic") as info:
        decode_trace(bad, "inner.trace")
    assert info.value.context["offset"] == body_at
    with pytest.raises(InputError, match="cannot read trace"):
        read_trace(tmp_path / "missing.trace")


async def test_replay_source_cuts_windows_and_keeps_labels(tmp_path: Path) -> None:
    path, batch = trace_file(tmp_path, 5.0)
    src = open_source("replay", path=path)
    assert isinstance(src, TelemetrySource) and src.kind == "replay"
    parts = [b async for b in src.batches(1.0)]
    assert [len(p) for p in parts] == [20] * 5
    assert all(p.source == "replay" and p.synthetic for p in parts)
    whole = SampleBatch.concat(parts)
    np.testing.assert_array_equal(whole.power_w, batch.power_w)
    assert whole == batch.with_source("replay") and src.describe()["synthetic"] is True


async def test_paced_replay_and_retiming() -> None:
    batch = generate("tiny-160m/bf16/h100", "batched", 3.0, seed=1)
    now = [0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += round(seconds * 1e9)
        await asyncio.sleep(0)

    src = ReplaySource(
        Trace({}, batch), paced=True, speed=2.0, start_ns=42, clock=lambda: now[0], sleep=sleep
    )
    parts = [b async for b in src.batches(1.0)]
    assert slept == [0.5, 0.5, 0.5] and [len(p) for p in parts] == [20, 20, 20]
    assert int(parts[0].t_ns[0]) == 42 and parts[0].synthetic
    with pytest.raises(InputError):
        ReplaySource(Trace({}, batch), speed=0.0)
    with pytest.raises(InputError):
        ReplaySource()
