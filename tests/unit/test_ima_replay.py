"""IMA parser and PCR replay on logs written the way the kernel writes them."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmb.attest import ima
from tmb.attest.ima import iter_binary, iter_log, parse_fields
from tmb.attest.ima_build import LogBuilder
from tmb.attest.pcr import ReplayState, replay_delta, replay_file
from tmb.errors import InputError, ParseError


def _log(
    n: int = 20, *, sha256_mode: str = "per-bank", violation_at: int | None = None
) -> tuple[bytes, bytes, LogBuilder]:
    binary, text = io.BytesIO(), io.BytesIO()
    b = LogBuilder(binary, text, sha256_mode=sha256_mode)
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    templates = ["ima-ng", "ima-sig", "ima-buf", "ima-modsig", "ima"]
    for i in range(1, n):
        t = templates[i % len(templates)]
        if t == "ima":
            b.add("ima", f"/usr/lib/legacy {i}.so", digest=hashlib.sha1(str(i).encode()).digest(), alg="sha1")
        elif t == "ima-buf":
            b.buffer("kexec-cmdline", f"root=/dev/vda{i}".encode())
        else:
            b.add(
                t,
                f"/usr/bin/tool {i}",  # spaces in paths must survive the ascii format
                digest=hashlib.sha256(str(i).encode()).digest(),
                sig=bytes([3, 2, i % 256]) if t != "ima-ng" else b"",
                violation=(i == violation_at),
            )
    return binary.getvalue(), text.getvalue(), b


def test_binary_and_ascii_logs_parse_to_the_same_entries() -> None:
    binary, text, _ = _log(25)
    from_bin = list(iter_log(io.BytesIO(binary)))
    from_txt = list(iter_log(io.BytesIO(text)))
    assert len(from_bin) == len(from_txt) == 25
    for a, b in zip(from_bin, from_txt, strict=True):
        assert (a.template_name, a.template_hash, a.data, a.hashed) == (
            b.template_name,
            b.template_hash,
            b.data,
            b.hashed,
        )
        assert parse_fields(a) == parse_fields(b)
    assert parse_fields(from_bin[1]).name == "/usr/bin/tool 1"


@pytest.mark.parametrize("mode", ["per-bank", "padded-sha1"])
def test_replay_matches_what_the_kernel_extended(mode: str, tmp_path: Path) -> None:
    binary, text, builder = _log(30, sha256_mode=mode, violation_at=6)
    for name, data in (("bin", binary), ("txt", text)):
        path = tmp_path / name
        path.write_bytes(data)
        result = replay_file(path, banks=["sha1", "sha256", "sha384", "sha512"], mode=mode)
        for bank in ("sha1", "sha256", "sha384", "sha512"):
            assert result.state.value(bank) == builder.pcrs[bank], (name, bank)
        assert result.report.ids() == ["ima.violation"]
        assert result.state.offset == len(data)


def test_streaming_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary, _, builder = _log(40)
    big = io.BytesIO(binary)
    big.seek(0, io.SEEK_END)
    b = LogBuilder(big)
    b.index, b.offset, b.pcrs = builder.index, builder.offset, dict(builder.pcrs)
    b.buffer("big-payload", bytes(range(256)) * 40)  # one record larger than the chunk
    monkeypatch.setattr(ima, "CHUNK", 97)
    path = tmp_path / "log"
    path.write_bytes(big.getvalue())
    for source in (path, io.BytesIO(big.getvalue())):  # memory-mapped file, then a chunked stream
        result = replay_file(source, banks=["sha1", "sha256"], mode="per-bank")
        assert result.entries == 41
        assert result.state.value("sha256") == b.pcrs["sha256"]
    with open(path, "rb") as mapped:
        assert len(list(iter_log(mapped))) == 41
    assert len(list(iter_log(io.BytesIO(big.getvalue())))) == 41


def test_incremental_replay_equals_full_replay_from_every_split(tmp_path: Path) -> None:
    binary, text, _ = _log(12)
    for data in (binary, text):
        path = tmp_path / "log"
        path.write_bytes(data)
        full = replay_file(path, mode="per-bank")
        offsets = [e.offset for e in iter_log(io.BytesIO(data))] + [len(data)]
        for cut in offsets:
            path.write_bytes(data[:cut])
            first = replay_file(path, mode="per-bank")
            path.write_bytes(data)
            second = replay_file(path, mode="per-bank", state=ReplayState.from_json(first.state.to_json()))
            assert second.state == full.state
            assert second.entries == full.entries - first.entries  # only the new entries were read


def test_quote_lagging_the_log_matches_at_the_quoted_entry(tmp_path: Path) -> None:
    binary, _, _ = _log(20)
    entries = list(iter_log(io.BytesIO(binary)))
    path = tmp_path / "log"
    path.write_bytes(binary[: entries[9].offset])
    quoted = replay_file(path, mode="per-bank").state.value("sha256")  # PCR when the quote was taken
    path.write_bytes(binary)  # the log grew afterwards
    result = replay_file(path, mode="auto", expected={"sha256": quoted})
    assert result.matched is not None and result.matched.index == 9
    assert result.matched.offset == entries[9].offset
    assert result.entries == 20
    assert result.report.ok


def test_a_quote_that_no_entry_reaches_is_a_mismatch(tmp_path: Path) -> None:
    binary, _, _ = _log(5)
    path = tmp_path / "log"
    path.write_bytes(binary)
    result = replay_file(path, expected={"sha256": b"\x01" * 32})
    assert result.matched is None
    assert "pcr.mismatch" in result.report.ids()
    finding = next(f for f in result.report if f.id == "pcr.mismatch")
    assert finding.context["bank"] == "sha256" and finding.context["entries_checked"] == 5


def test_attacks_on_the_log_are_caught(tmp_path: Path) -> None:
    binary, _, builder = _log(10)
    entries = list(iter_log(io.BytesIO(binary)))
    quoted = {"sha256": builder.pcrs["sha256"]}
    path = tmp_path / "log"

    flipped = bytearray(binary)
    flipped[entries[4].offset + entries[4].size - 3] ^= 1  # a byte in entry 4's data
    path.write_bytes(bytes(flipped))
    r = replay_file(path, expected=quoted)
    assert [f.context["entry"] for f in r.report if f.id == "ima.template_hash_mismatch"] == [4]
    assert "pcr.mismatch" in r.report.ids()

    dropped = binary[: entries[3].offset] + binary[entries[4].offset :]
    path.write_bytes(dropped)
    assert "pcr.mismatch" in replay_file(path, expected=quoted).report.ids()

    e2, e3 = entries[2], entries[3]
    swapped = (
        binary[: e2.offset]
        + binary[e3.offset : e3.offset + e3.size]
        + binary[e2.offset : e3.offset]
        + binary[e3.offset + e3.size :]
    )
    path.write_bytes(swapped)
    r = replay_file(path, expected=quoted)
    assert "pcr.mismatch" in r.report.ids()
    assert not [f for f in r.report if f.id == "ima.template_hash_mismatch"]  # each entry is intact


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("<I20sI", 10, bytes(20), 0xFFFFFFF0) + b"ima-ng", "template name length"),
        (struct.pack("<I20sI", 10, bytes(20), 6) + b"ima-ng" + struct.pack("<I", 0x7FFFFFFF), "exceeds"),
        (struct.pack("<I20sI", 10, bytes(20), 3) + b"ima" + bytes(20) + struct.pack("<I", 4096), "exceeds"),
        (struct.pack("<I20sI", 10, bytes(20), 6) + b"ima\xff\x00g" + struct.pack("<I", 0), "not printable"),
    ],
)
def test_absurd_lengths_and_garbage_are_named(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message) as info:
        list(iter_binary(io.BytesIO(data)))
    assert info.value.context["offset"] == 0


def test_not_a_log_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ParseError, match="not an IMA measurement list"):
        replay_file(path)
    with pytest.raises(InputError, match="cannot read"):
        replay_file(tmp_path / "missing")


def test_malformed_ascii_lines_are_reported_and_skipped(tmp_path: Path) -> None:
    _, text, _ = _log(4)
    lines = text.splitlines(keepends=True)
    lines.insert(2, b"10 zz ima-ng sha256:00 /bin/x\n")
    lines.insert(3, b"10 " + b"0" * 40 + b" ima-custom x y\n")
    path = tmp_path / "log"
    path.write_bytes(b"".join(lines))
    result = replay_file(path)
    bad = [f for f in result.report if f.id == "ima.malformed_entry"]
    assert [f.context["line"] for f in bad] == [3, 4]
    assert "not hex" in bad[0].message and "unknown IMA template" in bad[1].message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_never_crash(data: bytes) -> None:
    try:
        entries = list(iter_log(io.BytesIO(data)))
    except ParseError:
        return
    assert all(e.size > 0 for e in entries)


_VALID, _, _ = _log(6)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, len(_VALID)),
)
def test_fuzz_mutated_logs_give_findings_not_tracebacks(mutations: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for pos, value in mutations:
        data[pos] = value
    stream = io.BytesIO(bytes(data[:cut]))
    try:
        result = replay_file(stream, banks=["sha1", "sha256"], mode="per-bank")
    except ParseError as exc:  # only format sniffing may refuse outright
        assert "not an IMA measurement list" in exc.message
        return
    assert result.state.offset <= cut


def test_replay_delta_reads_only_the_shipped_bytes() -> None:
    binary, _, builder = _log(15)
    entries = list(iter_log(io.BytesIO(binary)))
    first = replay_delta(binary[: entries[8].offset], state=ReplayState(), mode="per-bank")
    # The probe ships the rest, cut mid-record: the partial record waits for the next delta.
    cut = entries[12].offset + 5
    second = replay_delta(binary[entries[8].offset : cut], state=first.state, mode="per-bank")
    assert second.entries == 4 and second.state.offset == entries[12].offset
    assert [f.id for f in second.report] == ["ima.trailing_partial_record"]
    assert second.report.findings[0].context["offset"] == entries[12].offset
    third = replay_delta(binary[entries[12].offset :], state=second.state, mode="per-bank")
    assert third.state.value("sha256") == builder.pcrs["sha256"] and third.state.index == 15
