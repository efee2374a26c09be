"""Sample / SampleBatch: columnar form, slicing, concat, and the canonical byte encoding."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmb.errors import InputError, ParseError
from tmb.telemetry import FLOAT_FIELDS, Sample, SampleBatch, generate

GOLDEN = Path(__file__).parent / "golden" / "telemetry_batch_v1.bin"
REGENERATE = os.environ.get("TMB_REGENERATE_GOLDEN") == "1"

GPU_A = "GPU-00000000-1111-2222-3333-444444444444"
GPU_B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def golden_batch() -> SampleBatch:
    """A small fixed batch touching every part of the encoding: two GPUs, absent fields, processes."""
    samples = [
        Sample(
            t_ns=1_700_000_000_000_000_000,
            gpu=GPU_A,
            power_w=312.5,
            energy_mj=123456789.0,
            gpu_util=100.0,
            mem_util=0.0,
            sm_active=0.625,
            tensor_active=0.25,
            temp_c=61.0,
            power_limit_w=700.0,
            processes=((4242, 8 * 2**30), (77, None)),
        ),
        Sample(t_ns=1_700_000_000_000_000_000, gpu=GPU_B, power_w=80.25, gpu_util=3.0, power_limit_w=400.0),
        Sample(
            t_ns=1_700_000_000_050_000_000,
            gpu=GPU_A,
            power_w=-0.0,
            energy_mj=123456800.0,
            gpu_util=99.0,
            temp_c=61.0,
            power_limit_w=700.0,
            processes=((4242, 8 * 2**30),),
        ),
    ]
    return SampleBatch.from_samples(samples, source="nvml", power_field="instant")


def test_samples_round_trip_keeps_absent_as_none() -> None:
    batch = golden_batch()
    back = batch.to_samples()
    assert back == sorted(golden_batch().to_samples(), key=lambda s: s.t_ns)
    assert back[1].gpu == GPU_B and back[1].sm_active is None and back[1].energy_mj is None
    assert back[0].mem_util == 0.0  # a real zero stays zero
    assert math.isnan(batch.sm_active[1]) and batch.mem_util[0] == 0.0
    assert batch.present_fields() == (
        "power_w",
        "energy_mj",
        "gpu_util",
        "mem_util",
        "sm_active",
        "tensor_active",
        "temp_c",
        "power_limit_w",
    )
    assert batch.gpus == (GPU_A, GPU_B) and batch.gpu.tolist() == [0, 1, 0]
    assert batch.processes[0] == ((4242, 8 * 2**30), (77, None))


def test_batch_is_immutable_and_validated() -> None:
    batch = golden_batch()
    with pytest.raises(ValueError):
        batch.power_w[0] = 1.0
    with pytest.raises(InputError, match="not sorted"):
        SampleBatch.from_columns([2, 1], [GPU_A], source="nvml")
    with pytest.raises(InputError, match="unknown telemetry field"):
        SampleBatch.from_columns([1], [GPU_A], source="nvml", watts=[1.0])
    with pytest.raises(InputError, match="labelled synthetic"):
        SampleBatch.from_columns([1], [GPU_A], source="synthetic", synthetic=False)
    with pytest.raises(InputError, match="out of range"):
        SampleBatch.from_columns([1], [GPU_A], gpu=[1], source="nvml")
    with pytest.raises(InputError, match="shape"):
        SampleBatch.from_columns([1, 2], [GPU_A], source="nvml", power_w=[1.0])


def test_slice_concat_and_per_gpu() -> None:
    a = generate("llama-1b/bf16/h100", "batched", 2.0, seed=1, start_ns=0)
    b = generate("llama-1b/int8/h100", "batched", 2.0, seed=2, start_ns=0)
    both = SampleBatch.concat([a, b])
    assert len(both) == len(a) + len(b) and both.synthetic and both.gpus == a.gpus + b.gpus
    assert bool(np.all(np.diff(both.t_ns) >= 0))
    assert both.for_gpu(b.gpus[0]) == b
    window = a.slice_time(500_000_000, 1_000_000_000)
    assert len(window) == 10 and int(window.t_ns[0]) == 500_000_000 and int(window.t_ns[-1]) == 950_000_000
    assert len(a.slice_time(5 * 10**9, 6 * 10**9)) == 0
    assert SampleBatch.concat([a.slice_time(0, 10**9), a.slice_time(10**9, 2 * 10**9)]) == a
    with pytest.raises(InputError):
        SampleBatch.concat([a, golden_batch()])
    with pytest.raises(InputError):
        SampleBatch.concat([])


def test_encoding_round_trip_and_determinism() -> None:
    for batch in (
        golden_batch(),
        generate("llama-1b/fp8/h100", "single", 3.0, seed=5),
        SampleBatch.empty("nvml"),
    ):
        data = batch.encode()
        assert data == batch.encode()
        back = SampleBatch.decode(data)
        assert back == batch and back.encode() == data
        assert back.source == batch.source and back.synthetic == batch.synthetic
        assert back.power_field == batch.power_field and back.processes == batch.processes
        for name in FLOAT_FIELDS:
            np.testing.assert_array_equal(back.column(name), batch.column(name))
    # -0.0 and 0.0 are different bytes (the encoding is bitwise), NaN payloads are canonicalised.
    weird = np.array([np.nan, -0.0])
    weird.view(np.uint64)[0] = 0x7FF8_0000_DEAD_BEEF
    batch = SampleBatch.from_columns([1, 2], [GPU_A], source="nvml", power_w=weird)
    assert SampleBatch.decode(batch.encode()).encode() == batch.encode()


def test_golden_bytes() -> None:
    data = golden_batch().encode()
    if REGENERATE:
        GOLDEN.write_bytes(data)
    assert GOLDEN.exists(), "golden file missing: run with TMB_REGENERATE_GOLDEN=1 once"
    assert data == GOLDEN.read_bytes(), "encoding changed: bump the version or regenerate deliberately"
    assert SampleBatch.decode(GOLDEN.read_bytes()) == golden_batch()
    assert data[:6] == b"TMBS\x01\x00"


def test_every_truncation_is_a_parse_error_with_offset() -> None:
    data = golden_batch().encode()
    for cut in range(len(data)):
        with pytest.raises(ParseError) as info:
            SampleBatch.decode(data[:cut])
        assert 0 <= info.value.context["offset"] <= cut
        assert "offset" in info.value.diagnostics()


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message", "where"),
    [
        (0, "<B", ord("X"), "bad magic", 0),
        (4, "<H", 2, "unsupported encoding version 2", 4),
        (6, "<B", 9, "unknown source", 6),
        (7, "<B", 0x81, "flag bits", 7),
        (8, "<B", 7, "power field", 8),
        (9, "<B", 1, "reserved", 9),
        (16, "<I", 1 << 20, "unknown fields", 16),
    ],
)
def test_header_fields_are_checked(offset: int, fmt: str, value: int, message: str, where: int) -> None:
    with pytest.raises(ParseError, match=message) as info:
        SampleBatch.decode(_patched(golden_batch().encode(), offset, fmt, value))
    assert info.value.context["offset"] == where


def test_non_canonical_input_is_rejected() -> None:
    data = golden_batch().encode()
    with pytest.raises(ParseError, match="trailing"):
        SampleBatch.decode(data + b"\x00")
    # Timestamps start after the header (20 bytes) and two uuid entries (2 + 40 bytes each).
    t_at = 20 + 2 * 42
    with pytest.raises(ParseError, match="not sorted") as info:
        SampleBatch.decode(_patched(data, t_at + 16, "<q", 0))
    assert info.value.context["offset"] == t_at + 16
    gpu_at = t_at + 3 * 8
    with pytest.raises(ParseError, match="GPU index out of range"):
        SampleBatch.decode(_patched(data, gpu_at + 2, "<H", 2))
    col_at = gpu_at + 3 * 2  # power_w column
    with pytest.raises(ParseError, match="non-canonical NaN"):
        SampleBatch.decode(_patched(data, col_at + 8, "<Q", 0x7FF8_0000_0000_0001))
    with pytest.raises(ParseError, match="expected bytes"):
        SampleBatch.decode("TMBS")  # type: ignore[arg-type]


def _check_decode(data: bytes) -> None:
    try:
        batch = SampleBatch.decode(data)
    except ParseError as exc:
        assert isinstance(exc.context["offset"], int)
        return
    assert batch.encode() == data  # whatever is accepted is canonical


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_never_traceback(data: bytes) -> None:
    _check_decode(data)
    _check_decode(b"TMBS\x01\x00" + data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_encodings_never_traceback(data: st.DataObject) -> None:
    raw = bytearray(golden_batch().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    _check_decode(bytes(raw))


def test_process_table_encodes_as_the_entry_by_entry_reference() -> None:
    """The process table's one-call encoding gives the bytes of the entry-by-entry one, and refuses what
    it refuses (pid or memory out of range, the reserved 'unknown' memory value) with the same error."""
    from tmb.telemetry._codec import _encode_processes, _encode_processes_checked

    rows: list[tuple[tuple[tuple[int, int | None], ...], ...]] = [
        (),
        ((), ()),
        (((1, None),), (), ((2, 3), (0xFFFF_FFFF, 2**64 - 2))),
        tuple(((pid, pid * 4096), (pid + 1, None)) for pid in range(300)),
        tuple(((pid, None if pid % 3 else 2**64 - 2 - pid),) for pid in range(200)),  # one process each
    ]
    for table in rows:
        assert _encode_processes(table) == _encode_processes_checked(table)
    assert _encode_processes(((), ())) == b"\0\0\0\0"
    for bad in (((-1, 0),), ((2**32, 0),), ((1, -1),), ((1, 2**64 - 1),)):
        with pytest.raises(InputError, match="out of range"):
            _encode_processes((((7, 7),), bad))  # one process each
        with pytest.raises(InputError, match="out of range"):
            _encode_processes((((7, 7), (8, 8)), bad))
