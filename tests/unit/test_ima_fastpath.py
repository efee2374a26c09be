"""The replay hot loops (``replay_file``/``replay_delta`` with nobody asking for the entries) against the
general path (the same call with an ``on_entry`` callback: the parser's ImaEntry tuples through ``step``),
entry by entry and PCR by PCR, on generated logs: every template, violations, other PCRs, both sha256
modes, every bank layout, damaged and truncated logs, odd ascii lines and chunk boundaries anywhere.
Every test runs twice: with the binary hot loop in C (tmb/attest/_imafast.c) and with its Python twin."""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vectors import VECTORS

from tmb.attest import ima
from tmb.attest import pcr as pcr_module
from tmb.attest.ima import ImaEntry, ascii_entry, iter_ascii, iter_log
from tmb.attest.ima_build import LogBuilder
from tmb.attest.pcr import ReplayResult, ReplayState, replay_delta, replay_file
from tmb.errors import ParseError

# (banks, mode): SHA-1 alone, SHA-1 + one bank both ways, and layouts the hot loops treat generically.
LAYOUTS: list[tuple[tuple[str, ...], str]] = [
    (("sha1",), "per-bank"),
    (("sha1", "sha256"), "per-bank"),
    (("sha1", "sha256"), "padded-sha1"),
    (("sha1", "sha384"), "per-bank"),
    (("sha256", "sha1"), "per-bank"),
    (("sha256",), "padded-sha1"),
    (("sha1", "sha256", "sha512"), "per-bank"),
    (("sha1", "sha256"), "auto"),
]


@pytest.fixture(autouse=True, scope="module", params=["native", "python"])
def hot_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """The binary hot loop under test: the C extension, or the Python loop (as with TMB_IMA_NATIVE=0)."""
    if request.param == "native" and pcr_module._native is None:
        pytest.skip("the C extension did not build here (test_ima_native.py fails on that in CI)")
    with mock.patch.object(pcr_module, "NATIVE", request.param == "native"):
        yield request.param


def _ignore(entry: ImaEntry) -> None:
    pass


@contextmanager
def _chunk(size: int | None) -> Iterator[None]:
    if size is None:
        yield
    else:
        with mock.patch.object(ima, "CHUNK", size):
            yield


def _summary(r: ReplayResult) -> tuple[Any, ...]:
    return (r.state, r.matched, r.mode, r.entries, r.report.to_list())


class Refused(Exception):
    """Both paths refused the input alike (format sniffing: not a log at all)."""


def _same(
    source: bytes | Path,
    *,
    banks: tuple[str, ...] = ("sha1", "sha256"),
    mode: str = "per-bank",
    state: ReplayState | None = None,
    expected: Mapping[str, bytes] | None = None,
    pcr_index: int = 10,
    chunk: int | None = None,
) -> ReplayResult:
    """Replay ``source`` (log bytes from ``state.offset``, or a file) both ways; assert every outcome is
    the same: the state and its PCRs, the matched state, mode, entry count and every finding. Raises
    :class:`Refused` when both refused the input with the same error."""
    kw: dict[str, Any] = {"banks": banks, "mode": mode, "expected": expected, "pcr_index": pcr_index}
    outcomes: list[Any] = []
    for on_entry in (None, _ignore):
        try:
            with _chunk(chunk):
                if isinstance(source, Path):
                    r = replay_file(source, state=state, on_entry=on_entry, **kw)
                else:
                    r = replay_delta(source, state=state or ReplayState(), on_entry=on_entry, **kw)
            outcomes.append(r)
        except ParseError as exc:
            outcomes.append(exc)
    fast, general = outcomes
    if isinstance(fast, ParseError) or isinstance(general, ParseError):
        assert (repr(fast), getattr(fast, "context", None)) == (
            repr(general),
            getattr(general, "context", None),
        )
        raise Refused(fast)
    assert _summary(fast) == _summary(general)
    assert isinstance(fast, ReplayResult)
    return fast


# ------------------------------------------------------------------------------------------ generation

TEMPLATES = ["ima-ng", "ima-sig", "ima-buf", "ima-modsig", "ima"]
ALGS = ["sha256", "sha1", "sha512", "md5", "sm3"]
_PATH_CHARS = "abz/._- \t:#\r\n\udcff\u00e9"


def _build(specs: list[tuple[Any, ...]], sha256_mode: str) -> tuple[bytes, bytes]:
    binary, text = io.BytesIO(), io.BytesIO()
    b = LogBuilder(binary, text, sha256_mode=sha256_mode)
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    for i, (template, alg, pcr, violation, path, blob) in enumerate(specs, 1):
        name = path or f"/usr/bin/tool {i}"
        if template == "ima":
            b.add("ima", name, digest=hashlib.sha1(blob).digest(), pcr=pcr, violation=violation)
        else:
            b.add(
                template,
                name,
                digest=hashlib.new(alg, blob).digest(),
                alg=alg,
                sig=blob if template in ("ima-sig", "ima-modsig") else b"",
                buf=blob if template == "ima-buf" else b"",
                pcr=pcr,
                violation=violation,
            )
    return binary.getvalue(), text.getvalue()


_SPEC = st.tuples(
    st.sampled_from(TEMPLATES),
    st.sampled_from(ALGS),
    st.sampled_from([10, 10, 10, 11]),
    st.sampled_from([False, False, False, True]),
    st.text(_PATH_CHARS, max_size=12),
    st.binary(max_size=8),
)


def _mixed(n: int = 36, sha256_mode: str = "per-bank") -> tuple[bytes, bytes]:
    specs = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        specs.append(
            (
                template,
                ALGS[i % 3] if template != "ima" else "sha1",
                11 if i % 7 == 3 else 10,
                i % 9 == 5,
                f"/usr/lib/x {i}.so" if i % 4 else "",
                bytes([i, 7]) if i % 3 else b"",
            )
        )
    return _build(specs, sha256_mode)


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("sha256_mode", ["per-bank", "padded-sha1"])
@pytest.mark.parametrize("fmt", ["binary", "ascii"])
def test_every_entry_and_pcr_agrees_with_the_general_path(sha256_mode: str, fmt: str, tmp_path: Path) -> None:
    binary, text = _mixed(sha256_mode=sha256_mode)
    data = binary if fmt == "binary" else text
    path = tmp_path / "log"
    path.write_bytes(data)
    ends = [e.offset + e.size for e in iter_log(io.BytesIO(data))]
    for banks, mode in LAYOUTS:
        for pcr_index in (10, 11):
            full = _same(path, banks=banks, mode=mode, pcr_index=pcr_index)
            assert full.entries == len(ends)
            assert full.report.ids().count("ima.violation") == 4
        # PCR by PCR: the values after each entry (the general path's, on the log cut there) are met by
        # the fast path at exactly that entry, from the full log.
        for k, end in enumerate(ends, 1):
            path.write_bytes(data[:end])
            prefix = replay_file(
                path, banks=banks, mode=mode if mode != "auto" else sha256_mode, on_entry=_ignore
            )
            path.write_bytes(data)
            expected = {b: prefix.state.value(b) for b in banks}
            hit = _same(path, banks=banks, mode=mode, expected=expected)
            # At entry k, or before it when entry k left PCR 10 as it was (it extended PCR 11).
            assert hit.matched is not None and hit.matched.index <= k and hit.matched.offset <= end
            assert all(hit.matched.value(b) == v for b, v in expected.items())


def test_no_quote_match_and_a_saved_state_that_already_matches(tmp_path: Path) -> None:
    binary, text = _mixed()
    for data in (binary, text):
        path = tmp_path / "log"
        path.write_bytes(data)
        miss = _same(path, banks=("sha1",), expected={"sha1": b"\x01" * 20})
        assert miss.matched is None and "pcr.mismatch" in miss.report.ids()
        full = replay_file(path, banks=["sha1", "sha256"], mode="per-bank")
        at_end = {"sha1": full.state.value("sha1"), "sha256": full.state.value("sha256")}
        again = _same(path, state=full.state, expected=at_end)
        assert again.entries == 0 and again.matched is not None


@pytest.mark.parametrize("fmt", ["binary", "ascii"])
def test_incremental_from_every_entry_and_every_byte(fmt: str, tmp_path: Path) -> None:
    binary, text = _mixed(14)
    data = binary if fmt == "binary" else text
    path = tmp_path / "log"
    for cut in range(len(data) + 1):  # truncated tails: a partial record, half a line
        path.write_bytes(data[:cut])
        try:
            first = _same(path, banks=("sha1", "sha256"))
        except Refused:
            assert cut < 4  # too short to tell a binary log from garbage
            continue
        path.write_bytes(data)
        _same(path, banks=("sha1", "sha256"), state=first.state)
        _same(data[first.state.offset :], state=first.state)  # the same bytes shipped as a delta


@pytest.mark.parametrize("chunk", [1, 2, 7, 40, 97, 300])
def test_chunk_boundaries_anywhere(chunk: int, tmp_path: Path) -> None:
    binary, text = _mixed(20)
    big_bin, big_txt = io.BytesIO(), io.BytesIO()
    LogBuilder(big_bin, big_txt).buffer("big-payload", bytes(range(256)) * 20)  # larger than most chunks
    path = tmp_path / "log"
    for data in (binary, text, binary + big_bin.getvalue(), text + big_txt.getvalue()):
        path.write_bytes(data)
        for banks, mode in LAYOUTS[:3]:
            _same(path, banks=banks, mode=mode, chunk=chunk)
        _same(data, chunk=chunk)


def test_odd_ascii_lines_take_the_general_path(tmp_path: Path) -> None:
    _, text = _mixed(10)
    lines = text.splitlines(keepends=True)
    th = lines[3].split(b" ")[1]
    odd = [
        b"\n",
        b"   \n",
        b"# a comment\n",
        b"10 zz ima-ng sha256:00 /bin/x\n",
        b"10 " + b"0" * 40 + b" ima-custom x y\n",
        lines[3].replace(b" ima-ng ", b" ima-sig ").rstrip(b"\n") + b" zz\n",  # sig not hex
        lines[3].replace(th, th.upper()),  # upper-case hex is hex
        lines[3].replace(th, th[:18] + b"\t\t" + th[20:]),  # whitespace in the hex
        lines[3].replace(b"sha256:", b"SHA256:"),
        lines[3].replace(b"sha256:", b"sha256::"),
        lines[3].replace(b"10 ", b"010 ", 1),  # the same PCR, spelled otherwise
        lines[3].replace(b"10 ", b"11 ", 1),
        lines[3].replace(b"\n", b"\r\n"),
        lines[3].rstrip(b"\n"),  # no path field at all
        lines[3].replace(b"10 ", "1\u00b2 ".encode(), 1),  # a digit int() does not read
        lines[3].replace(b"sha256:", b"\x80ha256:"),  # not ASCII
    ]
    for extra in odd:
        for where in (0, 4, len(lines)):
            data = b"".join(lines[:where]) + extra + b"".join(lines[where:])
            path = tmp_path / "log"
            path.write_bytes(data)
            try:
                for banks, mode in LAYOUTS[:3]:
                    _same(path, banks=banks, mode=mode)
                _same(data.rstrip(b"\n"))  # the last line without its newline
            except Refused:
                assert where == 0  # a blank line, a comment, odd bytes: not the start of a log


def test_odd_bytes_in_ascii_lines_are_findings_not_tracebacks(tmp_path: Path) -> None:
    _, text = _mixed(3)
    lines = text.splitlines(keepends=True)
    odd = [lines[1].replace(b"10 ", "1\u00b2 ".encode(), 1), lines[1].replace(b"sha256:", b"\x80ha256:")]
    path = tmp_path / "log"
    path.write_bytes(b"".join(lines[:2] + odd))
    r = _same(path)
    assert [f.context["line"] for f in r.report if f.id == "ima.malformed_entry"] == [3]
    assert [f.context["entry"] for f in r.report if f.id == "ima.template_hash_mismatch"] == [3]


def _f(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


@pytest.mark.parametrize("name", [b"ima-ng", b"ima-sig", b"ima-buf"])
@pytest.mark.parametrize("tail", [b"", b"\x01\x02"])
@pytest.mark.parametrize("path_len", [12, 4094, 4095, 4096, 5000])
def test_lines_whose_hash_covers_other_data_are_mismatches_on_both_paths(
    name: bytes, tail: bytes, path_len: int, tmp_path: Path
) -> None:
    """A template hash over something other than the data the general parser rebuilds (a field left
    out, a length without its bytes, no NUL, the tail in the path) is a mismatch on the fast path too."""
    dng, path = b"sha256:\0" + bytes(range(32)), (b"/usr/bin/a b" + b"x" * path_len)[:path_len]
    fields = [_f(dng), _f(path + b"\0")] + ([_f(tail)] if name != b"ima-ng" else [])
    right = b"".join(fields)
    wrong = [
        _f(dng) + _f(path + b"\0"),
        _f(dng) + _f(path + b"\0") + struct.pack("<I", len(tail)),
        _f(dng) + _f(path + b"\0") + _f(tail.hex().encode()),
        _f(dng) + _f(path) + (_f(tail) if name != b"ima-ng" else b""),
        _f(dng) + _f(path + b" " + tail.hex().encode() + b"\0"),
        _f(dng) + struct.pack("<I", len(path)) + path + b"\0" + (_f(tail) if name != b"ima-ng" else b""),
        right + b"\0",
        _f(dng) + _f(path + b"\0") + struct.pack("<I", len(tail) + 1) + tail,
        struct.pack("<I", len(dng) + 1) + dng + _f(path + b"\0") + (_f(tail) if name != b"ima-ng" else b""),
    ]
    text = b"10 %s %s sha256:%s %s" % (b"%s", name, bytes(range(32)).hex().encode(), path)
    if name != b"ima-ng":
        text += b" " + tail.hex().encode()
    head = b"10 " + hashlib.sha1(right).hexdigest().encode() + text[5:] + b"\n"
    log = tmp_path / "log"
    for data in wrong:
        if data == right:
            continue
        line = text.replace(b"%s", hashlib.sha1(data).hexdigest().encode(), 1) + b"\n"
        log.write_bytes(head + line + head)
        for banks, mode in LAYOUTS[:3]:
            r = _same(log, banks=banks, mode=mode)
            assert [f.context["entry"] for f in r.report if f.id == "ima.template_hash_mismatch"] == [1]
    # A digest one byte short under a sha256 label: the field length the label implies, or the real one.
    for field in (struct.pack("<I", len(dng)) + dng[:-1], _f(dng[:-1])):
        short = field + b"".join(fields[1:])
        line = text.replace(b"%s", hashlib.sha1(short).hexdigest().encode(), 1).replace(
            dng[8:].hex().encode(), dng[8:-1].hex().encode()
        )
        log.write_bytes(head + line + b"\n" + head)
        r = _same(log, banks=("sha1",))
        assert [f.context["line"] for f in r.report if f.id == "ima.malformed_entry"] == [2]
    if name != b"ima-ng":  # one field short: "<path>" read as an empty path and a hex tail
        short = _f(dng) + _f(b"\0") + _f(b"\xab\xcd")
        line = b"10 %s %s sha256:%s abcd\n" % (
            hashlib.sha1(short).hexdigest().encode(),
            name,
            dng[8:].hex().encode(),
        )
        log.write_bytes(head + line + head)
        r = _same(log, banks=("sha1",))
        assert [f.context["line"] for f in r.report if f.id == "ima.malformed_entry"] == [2]


@pytest.mark.parametrize("path_len", [1, 200, 254, 255, 256, 300])
def test_legacy_lines_whose_hash_covers_other_data_are_mismatches_on_both_paths(
    path_len: int, tmp_path: Path
) -> None:
    """The legacy ``ima`` template hashes the digest and the path padded to 256 bytes; paths of 256
    bytes or more are malformed. A template hash over the record's data, the unpadded path or another
    padding is a mismatch on the fast path too."""
    digest, path = bytes(range(20)), (b"/usr/lib/a b" + b"y" * path_len)[:path_len]
    right = digest + path.ljust(256, b"\0")
    wrong = [
        digest + struct.pack("<I", len(path)) + path,
        digest + path,
        digest + path.ljust(255, b"\0"),
        digest + path.ljust(257, b"\0"),
        digest + path.ljust(256, b" "),
    ]
    text = b"10 %s ima " + digest.hex().encode() + b" " + path + b"\n"
    head = text.replace(b"%s", hashlib.sha1(right).hexdigest().encode())
    log = tmp_path / "log"
    for data in [right, *wrong]:
        log.write_bytes(head + text.replace(b"%s", hashlib.sha1(data).hexdigest().encode()) + head)
        for banks, mode in LAYOUTS[:3]:
            r = _same(log, banks=banks, mode=mode)
            if path_len >= 256:
                assert r.report.ids() == ["ima.malformed_entry"] * 3
            else:
                bad = [f.context["entry"] for f in r.report if f.id == "ima.template_hash_mismatch"]
                assert bad == ([] if data == right else [1])


def test_ascii_quick_path_builds_the_general_parsers_entries() -> None:
    _, text = _mixed(30)
    extra = [
        b"10 " + b"ab" * 20 + b" ima-ng sha256:" + b"CD" * 32 + b" /p\n",
        b"10 " + b"ab" * 19 + b"\t\t ima-ng sha256:" + b"cd" * 32 + b" /p\n",  # not hex for the quick path
        b"10 " + b"ab" * 20 + b" ima-ng sha256:" + b"cd" * 31 + b"\t\t /p\n",
        b"10 " + b"ab" * 20 + b" ima-ng sha256:" + b"cd" * 32 + b" \n",
    ]
    offset = 0
    lines = text.splitlines(keepends=True) + extra
    for index, raw in enumerate(lines):
        try:
            got: list[Any] = [
                tuple(e) for e in iter_ascii(io.BytesIO(raw), start_offset=offset, start_index=index)
            ]
        except ParseError as exc:
            got = [exc.message]
        try:
            want = ascii_entry(raw, index=index, offset=offset, lineno=1)
            expect: list[Any] = [tuple(want)] if want is not None else []
        except ParseError as exc:
            expect = [exc.message]
        assert got == expect, (index, raw)
        offset += len(raw)


def _record(name: bytes, data: bytes, *, th: bytes | None = None, dlen: int | None = None) -> bytes:
    th = hashlib.sha1(data).digest() if th is None else th
    head = struct.pack("<I20sI", 10, th, len(name)) + name
    return head + struct.pack("<I", len(data) if dlen is None else dlen) + data


@pytest.mark.parametrize("chunk", [None, 3, 64])
def test_crafted_binary_records_are_the_parsers_call(chunk: int | None, tmp_path: Path) -> None:
    binary, _ = _mixed(6)
    payload = b"\x04\x00\x00\x00abcd" * 9
    # The data length runs past the end of the log, and the template hash is that of the bytes that
    # are there: a trailing partial record, not an entry.
    cut = _record(b"ima-ng", payload, dlen=len(payload) + 9)
    # A template name the parser refuses, then one it has not seen yet.
    odd = [_record(b"ima-\x01g", payload), _record(b"ima-xyz", payload) + _record(b"ima-ng", payload)]
    for tail in [cut, *odd]:
        path = tmp_path / "log"
        path.write_bytes(binary + tail)
        for banks, mode in LAYOUTS[:3]:
            _same(path, banks=banks, mode=mode, chunk=chunk)
    path.write_bytes(binary + cut)
    assert "ima.trailing_partial_record" in _same(path, chunk=chunk).report.ids()
    # The legacy template has no data length: its digest's first bytes are no length to follow, even
    # when the template hash is that of the bytes such a length would delimit.
    digest = struct.pack("<I", 8) + bytes(range(16))
    legacy = [
        struct.pack("<I20sI", 10, hashlib.sha1(data).digest(), 3) + b"ima" + digest + _f(b"/bin/x")
        for data in (digest + b"/bin/x".ljust(256, b"\0"), digest[4:12])
    ]
    path.write_bytes(binary + legacy[0] + legacy[1] + legacy[0])
    r = _same(path, banks=("sha1",), chunk=chunk)
    assert [f.context["entry"] for f in r.report if f.id == "ima.template_hash_mismatch"] == [8]


def test_records_past_the_data_limit_are_refused_however_the_buffer_grew(tmp_path: Path) -> None:
    """The parser refuses a data length over MAX_TEMPLATE_DATA even when the record is all there, which
    it is when a large record before it made the read buffer grow past that size."""
    binary, _ = _mixed(4)
    big = _record(b"ima-buf", struct.pack("<I", 280) + bytes(280))  # under the limit, over the chunk
    over = _record(b"ima-buf", struct.pack("<I", 306) + bytes(306))  # over the limit
    path = tmp_path / "log"
    path.write_bytes(binary + big + over + big)
    with mock.patch.object(ima, "MAX_TEMPLATE_DATA", 300):
        for chunk in (None, 16, 50, 100, 301):
            r = _same(path, banks=("sha1",), chunk=chunk)
            assert [f.id for f in r.report] == ["ima.malformed_record"] and r.entries == 6


def test_ascii_line_ends_are_the_general_parsers(tmp_path: Path) -> None:
    """A path that ends in CR reads, in the ascii format, as a CR LF line end: the general parser strips
    it, so the template hash (over the path with its CR) does not match there -- nor on the fast path."""
    text = io.BytesIO()
    b = LogBuilder(None, text)
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    b.add("ima-ng", "/usr/bin/x\r", digest=bytes(32))
    b.add("ima-sig", "/usr/bin/y", digest=bytes(32), sig=b"\x01\r")
    b.add("ima-ng", "/usr/bin/z", digest=bytes(32))
    data = text.getvalue()
    path = tmp_path / "log"
    for log in (data, data.replace(b"\n", b"\r\n"), data.rstrip(b"\n"), data.rstrip(b"\n") + b"\r"):
        path.write_bytes(log)
        for chunk in (None, *range(1, 80)):  # the CR and its LF in different chunks, too
            r = _same(path, banks=("sha1",), chunk=chunk)
            assert [f.context["entry"] for f in r.report if f.id == "ima.template_hash_mismatch"] == [1]


@pytest.mark.parametrize("fmt", ["binary", "ascii"])
def test_a_quote_met_by_the_last_line_without_its_newline(fmt: str, tmp_path: Path) -> None:
    binary, text = _mixed(12)
    data = binary if fmt == "binary" else text.rstrip(b"\n")
    path = tmp_path / "log"
    path.write_bytes(data)
    full = replay_file(path, banks=["sha1", "sha256"], mode="per-bank", on_entry=_ignore)
    for banks in (("sha1",), ("sha1", "sha256")):
        for chunk in (None, 5):
            expected = {b: full.state.value(b) for b in banks}
            r = _same(path, banks=banks, expected=expected, chunk=chunk)
            assert r.matched is not None and r.matched.offset == len(data) == r.state.offset


_VALID_BIN, _VALID_TXT = _mixed(8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["binary", "ascii"]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    st.integers(0, 10**6),
    st.sampled_from([None, 3, 64]),
    st.sampled_from(range(len(LAYOUTS))),
)
def test_fuzz_damaged_logs_agree(
    fmt: str, mutations: list[tuple[int, int]], cut: int, chunk: int | None, layout: int
) -> None:
    data = bytearray(_VALID_BIN if fmt == "binary" else _VALID_TXT)
    for pos, value in mutations:
        data[pos % len(data)] = value
    banks, mode = LAYOUTS[layout]
    try:
        _same(bytes(data[: cut % (len(data) + 1)]), banks=banks, mode=mode, chunk=chunk)
    except Refused as exc:  # format sniffing refuses both ways alike
        assert "not an IMA measurement list" in str(exc)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_SPEC, max_size=12),
    st.sampled_from(["per-bank", "padded-sha1"]),
    st.sampled_from(range(len(LAYOUTS))),
    st.sampled_from([None, 5, 50]),
    st.integers(0, 12),
)
def test_fuzz_generated_logs_agree(
    specs: list[tuple[Any, ...]], sha256_mode: str, layout: int, chunk: int | None, quote_at: int
) -> None:
    banks, mode = LAYOUTS[layout]
    for data in _build(specs, sha256_mode):
        entries = list(iter_log(io.BytesIO(data), on_error=lambda exc: None))
        k = min(quote_at, len(entries))
        prefix = replay_delta(
            data[: entries[k - 1].offset + entries[k - 1].size] if k else b"",
            state=ReplayState(),
            banks=banks,
            mode=mode if mode != "auto" else sha256_mode,
            on_entry=_ignore,
        )
        expected = {b: prefix.state.value(b) for b in banks}
        for log in (data, data.rstrip(b"\n")):
            _same(log, banks=banks, mode=mode, chunk=chunk)
            _same(log, banks=banks, mode=mode, chunk=chunk, expected=expected)


@pytest.mark.parametrize(
    "name",
    [
        "tpm2-tss/sml-ima-ng-sha1.bin",
        "tpm2-tss/sml-ima-sha1.bin",
        "tpm2-tss/sml-ima-sig-sha256.bin",
        "tpm2-tss/sml-ima-sig-sha256-invalidated.bin",
        "tpm2-tss/sml-ima-sha1-invalidated.bin",
        "tpm2-tss/sml-ima-ng-sha1-invalidated.bin",
        "rust-keylime/ascii_runtime_measurements",
        "rust-keylime/ima_log.txt",
        "keylime/ima/measurements.ascii",
        "keylime/ima/signatures.ascii",
        "keylime/ima/bad_signatures.ascii",
        "keylime/ima/keyrings.ascii",
        "keylime/ima_dm/dm_events.ascii",
        "keylime/create_runtime_policy/ima-log-sha256",
    ],
)
def test_real_logs_agree(name: str) -> None:
    for banks, mode in LAYOUTS:
        _same(VECTORS / name, banks=banks, mode=mode)
