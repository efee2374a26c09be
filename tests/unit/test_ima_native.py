"""The replay's hot loops in C (tmb/attest/_imafast.c) against their Python twins (what runs with
``TMB_IMA_NATIVE=0`` or without the extension): the same logs, binary and ascii, give the same
``ReplayResult`` -- state, matched state, mode, entry count, every finding -- on generated, real, damaged
and incremental logs.
Also: CI fails when the extension did not build, and bad arguments to the C function raise."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vectors import VECTORS

from tmb.attest import ima, pcr
from tmb.attest.ima import iter_log
from tmb.attest.ima_build import LogBuilder
from tmb.attest.pcr import ReplayResult, ReplayState, replay_delta, replay_file
from tmb.errors import ParseError

TSS = VECTORS / "tpm2-tss"
BUILT = importlib.util.find_spec("tmb.attest._imafast") is not None

native_only = pytest.mark.skipif(
    not BUILT and os.environ.get("CI") != "true",
    reason="the C extension did not build here (no compiler or headers); CI requires it",
)

# (banks, mode): the layouts the C loop takes (SHA-1 alone, SHA-1 + one bank either way) and two it
# leaves to Python (several modes at once, three banks).
LAYOUTS: list[tuple[tuple[str, ...], str]] = [
    (("sha1",), "per-bank"),
    (("sha1", "sha256"), "per-bank"),
    (("sha1", "sha256"), "padded-sha1"),
    (("sha1", "sha384"), "per-bank"),
    (("sha1", "sha512"), "padded-sha1"),
    (("sha1", "sha256"), "auto"),
    (("sha1", "sha256", "sha384"), "per-bank"),
]


def test_the_extension_builds_in_ci() -> None:
    """CI (``CI=true``, as CI services set it) runs ``make test``, whose install builds the extension:
    a missing compiler, header or libcrypto there fails here rather than silently testing Python only."""
    if os.environ.get("CI") == "true":
        import tmb.attest._imafast  # noqa: F401 (the import is the test)
    wanted = BUILT and os.environ.get("TMB_IMA_NATIVE", "").strip() != "0"
    assert pcr.NATIVE is wanted


def test_tmb_ima_native_0_selects_the_python_loop() -> None:
    code = "from tmb.attest import pcr; print(pcr.NATIVE)"
    for value, want in (("0", "False"), ("1", str(BUILT))):
        env = {**os.environ, "TMB_IMA_NATIVE": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == want and out.stderr == ""


# ------------------------------------------------------------------------------------------ comparing


@contextmanager
def _path(native: bool, chunk: int | None) -> Iterator[None]:
    with mock.patch.object(pcr, "NATIVE", native):
        if chunk is None:
            yield
        else:
            with mock.patch.object(ima, "CHUNK", chunk):
                yield


def _summary(r: ReplayResult) -> tuple[Any, ...]:
    return (r.state, r.matched, r.mode, r.entries, r.report.to_list())


def _same(
    data: bytes,
    *,
    banks: tuple[str, ...] = ("sha1",),
    mode: str = "per-bank",
    state: ReplayState | None = None,
    expected: Mapping[str, bytes] | None = None,
    pcr_index: int = 10,
    chunk: int | None = None,
    tmp: Path | None = None,
    fmt: str | None = None,
) -> ReplayResult:
    """Replay ``data`` (the log bytes after ``state.offset``; or, with ``tmp``, the whole log as a file)
    with the C loop and with the Python loop; assert the outcomes are identical. ``fmt``: the format
    (binary or ascii) when no state says it, else read from the bytes."""
    kw: dict[str, Any] = {"banks": banks, "mode": mode, "expected": expected, "pcr_index": pcr_index}
    outcomes = []
    for native in (True, False):
        with _path(native, chunk):
            try:
                if tmp is not None:
                    tmp.write_bytes(data)
                    r: Any = replay_file(tmp, state=state, **kw)
                else:
                    r = replay_delta(data, state=state or ReplayState(fmt=fmt), **kw)
            except Exception as exc:  # both must refuse alike
                r = (type(exc), str(exc))
        outcomes.append(r)
    fast, slow = outcomes
    if isinstance(fast, tuple) or isinstance(slow, tuple):
        assert fast == slow
        pytest.fail(f"both paths refused the log: {fast}")
    assert _summary(fast) == _summary(slow)
    return fast  # type: ignore[no-any-return]


def _record(pcr_index: int, th: bytes, name: bytes, data: bytes) -> bytes:
    if name == b"ima":
        return struct.pack("<I20sI", pcr_index, th, len(name)) + name + data
    return struct.pack("<I20sI", pcr_index, th, len(name)) + name + struct.pack("<I", len(data)) + data


def _mixed(n: int, *, sha256_mode: str = "per-bank", seed: int = 0, fmt: str = "binary") -> bytes:
    """ima-ng mostly, then ima-sig and ima-buf (one name length: both hot once seen), the legacy
    template, violations, PCR 11 entries."""
    out = io.BytesIO()
    b = (
        LogBuilder(out, sha256_mode=sha256_mode)
        if fmt == "binary"
        else LogBuilder(None, out, sha256_mode=sha256_mode)
    )
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    for i in range(n):
        k = (i * 7 + seed) % 23
        digest = hashlib.sha256(b"%d:%d" % (seed, i)).digest()
        if k == 3:
            b.add("ima-sig", f"/usr/bin/s{i}", digest=digest, sig=bytes([i % 256]) * (i % 5))
        elif k == 5:
            b.add("ima-buf", f"buf{i}", digest=digest, buf=b"payload %d" % i)
        elif k == 7:
            b.add("ima", f"/legacy/{i}", digest=digest[:20])
        elif k == 11:
            b.add("ima-ng", f"/tmp/violation{i}", digest=digest, violation=True)
        elif k == 13:
            b.add("ima-ng", f"/other/pcr{i}", digest=digest, pcr=11)
        elif k == 17:
            b.add("ima-ng", f"/sha1/{i}", digest=digest[:20], alg="sha1")
        else:
            b.add("ima-ng", f"/usr/lib/x86_64-linux-gnu/lib{i}.so", digest=digest)
    return out.getvalue()


def _ends(data: bytes) -> list[int]:
    """Where each whole record of ``data`` ends (up to a damaged or partial one)."""
    ends: list[int] = []
    with suppress(ParseError):
        ends.extend(e.offset + e.size for e in iter_log(io.BytesIO(data)))
    return ends


def _values_after(data: bytes, entries: int, banks: tuple[str, ...], mode: str) -> dict[str, bytes]:
    """The PCR 10 values after the first ``entries`` entries (the general path, on the cut log)."""
    cut = _ends(data)[entries - 1]
    r = replay_delta(data[:cut], state=ReplayState(), banks=banks, mode=mode, on_entry=lambda e: None)
    return {b: r.state.value(b) for b in banks}


# --------------------------------------------------------------------------------------------- tests


@native_only
@pytest.mark.parametrize("fmt", ["binary", "ascii"])
@pytest.mark.parametrize(("banks", "mode"), LAYOUTS)
def test_generated_logs_agree_with_quotes_met_anywhere(banks: tuple[str, ...], mode: str, fmt: str) -> None:
    sha256_mode = "padded-sha1" if mode == "padded-sha1" else "per-bank"
    data = _mixed(120, sha256_mode=sha256_mode, fmt=fmt)
    full = _same(data, banks=banks, mode=mode)
    assert full.entries == 121 and full.report.ids().count("ima.violation") > 0
    _same(data, banks=banks, mode=mode, pcr_index=11)
    fixed = mode if mode != "auto" else "per-bank"
    for k in (1, 2, 17, 60, 119, 121):  # a quote that lags the log: met in the middle
        expected = _values_after(data, k, banks, fixed)
        for chunk in (None, 64, 333):
            r = _same(data, banks=banks, mode=mode, expected=expected, chunk=chunk)
            assert r.matched is not None and r.matched.index <= k
    # one bank quoted, either one: the watch on that bank alone
    for bank in banks:
        value = _values_after(data, 50, banks, fixed)[bank]
        r = _same(data, banks=banks, mode=fixed, expected={bank: value})
        assert r.matched is not None and r.matched.index <= 50
    miss = _same(data, banks=banks, mode=mode, expected={"sha1": b"\x01" * 20})
    assert miss.matched is None and "pcr.mismatch" in miss.report.ids()


@native_only
@pytest.mark.parametrize("fmt", ["binary", "ascii"])
def test_damaged_logs_agree(fmt: str, tmp_path: Path) -> None:
    data = _mixed(30, fmt=fmt)
    ends = _ends(data)
    # truncated anywhere (a trailing partial record), as a file and as a delta
    for cut in range(4, len(data) + 1, 7):
        _same(data[:cut], banks=("sha1", "sha256"))
    _same(data[: ends[9] + 30], banks=("sha1",), tmp=tmp_path / "log")
    # one byte changed anywhere: mismatched hashes, odd PCRs, lengths past the buffer, malformed records
    for at in range(ends[0], len(data), 5):  # the first entry intact: both read the log's format from it
        bad = bytearray(data)
        bad[at] ^= 0x41
        for banks, mode in LAYOUTS[:3]:
            _same(bytes(bad), banks=banks, mode=mode)
    # a record whose data length claims 4 GiB, and one past the parser's limit
    for dlen in (0xFFFFFFFF, ima.MAX_TEMPLATE_DATA + 1) if fmt == "binary" else ():
        cut = data[: ends[5]] + struct.pack("<I20sI6sI", 10, bytes(20), 6, b"ima-ng", dlen) + b"x" * 50
        r = _same(cut, banks=("sha1", "sha256"))
        assert r.state.index == 6


@native_only
def test_mismatched_hashes_violations_and_other_pcrs_are_handed_back() -> None:
    good = hashlib.sha1(b"data").digest()
    recs = [
        _record(10, good, b"ima-ng", b"data"),
        _record(10, b"\x55" * 20, b"ima-ng", b"data"),  # mismatch
        _record(10, bytes(20), b"ima-ng", b"data"),  # violation
        _record(11, good, b"ima-ng", b"data"),  # another PCR
        _record(0xFFFFFFFF, good, b"ima-ng", b"data"),
        _record(10, good, b"ima-zz", b"data"),  # a template of the same name length, not seen before
        _record(10, good, b"ima-ng", b"data"),
    ]
    for order in (recs, recs[::-1], recs[1:] + recs[:1]):
        data = b"".join(order)
        for banks, mode in LAYOUTS:
            r = _same(data, banks=banks, mode=mode)
            assert "ima.template_hash_mismatch" in r.report.ids()
        for pcr_index in (0, 11, 0xFFFFFFFF, 1 << 32, -1):
            _same(data, pcr_index=pcr_index)


@native_only
@pytest.mark.parametrize("fmt", ["binary", "ascii"])
def test_incremental_replay_from_saved_states(fmt: str, tmp_path: Path) -> None:
    data = _mixed(60, seed=5, fmt=fmt)
    ends = _ends(data)
    final = _values_after(data, len(ends), ("sha1", "sha256"), "per-bank")
    for k in (1, 10, 33, len(ends)):
        first = _same(data[: ends[k - 1]], banks=("sha1", "sha256"))
        assert first.state.offset == ends[k - 1]
        r = _same(data[first.state.offset :], banks=("sha1", "sha256"), state=first.state, expected=final)
        assert r.matched is not None and r.state.index == len(ends)
        _same(data, banks=("sha1", "sha256"), state=first.state, expected=final, tmp=tmp_path / "log")


def _vectors() -> list[Path]:
    found = sorted(TSS.glob("sml-ima*.bin"))
    assert len(found) == 6, "tests/data/vectors/tpm2-tss lost its IMA logs"
    return found


@native_only
@pytest.mark.parametrize("name", [p.name for p in sorted(TSS.glob("sml-ima*.bin"))])
def test_vendored_real_logs_agree(name: str, tmp_path: Path) -> None:
    assert name in [p.name for p in _vectors()]
    data = (TSS / name).read_bytes()
    for banks, mode in LAYOUTS:
        r = _same(data, banks=banks, mode=mode, tmp=tmp_path / "log")
        if "sha256" in banks and mode == "per-bank" and name == "sml-ima-ng-sha1.bin":
            assert r.state.value("sha1").hex() == "ef2a20de2a84a4780f92ab11d5c4934c709dff00"
            assert r.state.value("sha256").hex() == (
                "700a1bb47bc2bc005f2d8e23d80e2a1e301733c1d29023c52d1d7d149719eb64"
            )
    for k in range(1, len(_ends(data)) + 1):
        expected = _values_after(data, k, ("sha1", "sha256"), "per-bank")
        r = _same(data, banks=("sha1", "sha256"), expected=expected, tmp=tmp_path / "log")
        assert r.matched is not None


@native_only
def test_real_ascii_log_as_binary_agrees() -> None:
    """The 826-entry rust-keylime ascii log (vendored), written as a binary log."""
    with open(VECTORS / "rust-keylime/ascii_runtime_measurements", "rb") as f:
        entries = list(iter_log(f))
    data = b"".join(_record(e.pcr, e.template_hash, e.template_name.encode(), e.data) for e in entries)
    for banks, mode in LAYOUTS:
        r = _same(data, banks=banks, mode=mode)
        assert r.entries == 826 and r.report.ok
    expected = _values_after(data, 400, ("sha1", "sha256"), "per-bank")
    assert _same(data, banks=("sha1", "sha256"), expected=expected).matched is not None


_SPEC = st.tuples(
    st.sampled_from(["ima-ng", "ima-ng", "ima-sig", "ima-buf", "ima"]),
    st.sampled_from([10, 10, 10, 11]),
    st.booleans(),  # violation
    st.binary(max_size=6),
)


@native_only
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(_SPEC, max_size=25),
    layout=st.sampled_from(LAYOUTS),
    fmt=st.sampled_from(["binary", "ascii"]),
    quote_at=st.integers(0, 25),
    flip=st.one_of(st.none(), st.tuples(st.integers(0, 4000), st.integers(1, 255))),
    chunk=st.sampled_from([None, 1, 29, 200]),
)
def test_fuzz_agrees(
    specs: list[tuple[str, int, bool, bytes]],
    layout: tuple[tuple[str, ...], str],
    fmt: str,
    quote_at: int,
    flip: tuple[int, int] | None,
    chunk: int | None,
) -> None:
    binary, text = io.BytesIO(), io.BytesIO()
    b = LogBuilder(binary, text)
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    for i, (template, pcr_index, violation, blob) in enumerate(specs):
        digest = hashlib.sha256(blob + bytes([i])).digest()
        if template == "ima":
            b.add("ima", f"/f {i}", digest=digest[:20], pcr=pcr_index, violation=violation)
        else:
            b.add(template, f"/f {i}", digest=digest, sig=blob, buf=blob, pcr=pcr_index, violation=violation)
    data = binary.getvalue() if fmt == "binary" else text.getvalue()
    banks, mode = layout
    fixed = mode if mode != "auto" else "per-bank"
    expected = _values_after(data, min(quote_at, len(specs)) + 1, banks, fixed)
    if flip is not None and flip[0] < len(data):
        bad = bytearray(data)
        bad[flip[0]] ^= flip[1]
        data = bytes(bad)
    _same(data, banks=banks, mode=mode, expected=expected, chunk=chunk, fmt=fmt)


# ------------------------------------------------------------------------- the C function, called badly


@native_only
def test_bad_arguments_raise_and_never_crash() -> None:
    from tmb.attest import _imafast

    hot = _imafast.hot_binary
    rec = _record(10, hashlib.sha1(b"x").digest(), b"ima-ng", b"x")
    tag = struct.pack("<I", 6) + b"ima-ng"
    ok: list[Any] = [rec, 0, len(rec) - 38, 10, (tag,), bytes(20), bytes(20), None, False, b"", b""]
    pos, n, v1, _, hit = hot(*ok)
    assert (pos, n, hit) == (len(rec), 1, False) and v1 == hashlib.sha1(
        bytes(20) + hashlib.sha1(b"x").digest()
    ).digest()
    bad: list[tuple[int, Any, type[Exception]]] = [
        (0, "text", TypeError),
        (0, None, TypeError),
        (1, -1, ValueError),
        (1, len(rec) + 1, ValueError),
        (1, "0", TypeError),
        (1, 1 << 70, OverflowError),
        (2, None, TypeError),
        (3, -1, ValueError),
        (3, 1 << 32, ValueError),
        (4, [tag], TypeError),
        (4, ("ima-ng",), TypeError),
        (4, (tag, tag + b"x"), ValueError),
        (4, (b"ab",), ValueError),
        (4, (tag,) * (_imafast.MAX_TAGS + 1), ValueError),
        (5, bytes(19), ValueError),
        (5, None, TypeError),
        (7, "md5", ValueError),
        (7, 256, TypeError),
        (7, "sha256", ValueError),  # v2 is 20 bytes, not 32
        (9, bytes(5), ValueError),
    ]
    for index, value, exc in bad:
        args = list(ok)
        args[index] = value
        with pytest.raises(exc):
            hot(*args)
    with pytest.raises(TypeError):
        hot(*ok[:-1])
    args = list(ok)
    args[7], args[6], args[10] = "sha256", bytes(32), bytes(31)
    with pytest.raises(ValueError):
        hot(*args)
    # a limit past the buffer is bounded by the buffer; a memoryview and a bytearray are buffers too
    for buf in (memoryview(rec), bytearray(rec), rec[:-1]):
        args = list(ok)
        args[0], args[2] = buf, 1 << 40
        pos, n, *_ = hot(*args)
        assert (pos, n) == ((len(rec), 1) if len(buf) == len(rec) else (0, 0))


@native_only
@settings(max_examples=300, deadline=None)
@given(
    buf=st.binary(max_size=300),
    pos=st.integers(0, 300),
    limit=st.integers(-5, 400),
    tag_name=st.sampled_from([b"ima-ng", b"", b"x" * 40]),
)
def test_random_buffers_never_read_past_the_end(buf: bytes, pos: int, limit: int, tag_name: bytes) -> None:
    from tmb.attest import _imafast

    tag = struct.pack("<I", len(tag_name)) + tag_name
    for prefix in (b"", _record(10, hashlib.sha1(b"d").digest(), tag_name, b"d")):
        data = prefix + buf
        if pos > len(data):
            continue
        end, n, v1, v2, _ = _imafast.hot_binary(
            data, pos, limit, 10, (tag,), bytes(20), bytes(32), "sha256", True, b"", b""
        )
        assert pos <= end <= len(data) and len(v1) == 20 and len(v2) == 32 and (n == 0) == (end == pos)


_REFUSE_EXTENSION = """
import sys
from importlib.abc import MetaPathFinder

class Refuse(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tmb.attest._imafast":
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
from tmb.attest import pcr
r = pcr.replay_file(sys.argv[1], banks=["sha1", "sha256"], mode="per-bank")
print(pcr.NATIVE, r.entries, r.state.value("sha1").hex(), r.state.value("sha256").hex(), r.report.ids())
"""


def test_an_install_without_the_extension_replays_with_python(tmp_path: Path) -> None:
    """Where the extension did not build (no compiler): no error, the Python loop, the same values."""
    log = tmp_path / "log"
    log.write_bytes(_mixed(40))
    out = subprocess.run(
        [sys.executable, "-c", _REFUSE_EXTENSION, str(log)], capture_output=True, text=True, check=True
    )
    r = replay_file(log, banks=["sha1", "sha256"], mode="per-bank")
    want = [False, r.entries, r.state.value("sha1").hex(), r.state.value("sha256").hex(), r.report.ids()]
    assert out.stdout.split(" ", 4) == [str(v) for v in want[:4]] + [f"{want[4]}\n"]
    assert out.stderr == ""


@native_only
@pytest.mark.parametrize("sha256_mode", ["per-bank", "padded-sha1"])
def test_the_c_loops_take_the_common_entries(sha256_mode: str) -> None:
    """Results alone cannot tell a C loop that refuses every record (the general path would give the
    same results): on a clean log, each loop takes every entry and ends at the builder's PCR values."""
    from tmb.attest import _imafast

    binary, text = io.BytesIO(), io.BytesIO()
    b = LogBuilder(binary, text, sha256_mode=sha256_mode)
    b.add("ima-ng", "boot_aggregate", digest=bytes(32))
    for i in range(30):
        digest = hashlib.sha256(b"%d" % i).digest()
        if i % 3 == 0:
            b.add("ima-ng", f"/usr/bin/a b{i}", digest=digest)
        elif i % 3 == 1:
            b.add("ima-sig", f"/usr/bin/s{i}", digest=digest, sig=bytes(range(i)))
        else:
            b.add("ima-buf", f"buf{i}", digest=digest[:20], alg="sha1", buf=b"x" * i)
    per_bank = sha256_mode == "per-bank"
    want = (b.pcrs["sha1"], b.pcrs["sha256"])
    data = text.getvalue()
    got = _imafast.hot_ascii(
        data, 0, b"10", pcr._ASCII_ALGS, bytes(20), bytes(32), "sha256", per_bank, b"", b""
    )
    assert got == (len(data), 31, *want, False)
    data = binary.getvalue()
    tags = tuple(struct.pack("<I", len(n)) + n for n in (b"ima-sig", b"ima-buf"))
    at = _ends(data)[0]  # the boot_aggregate (ima-ng: another name length)
    v1, v2 = (_values_after(data, 1, ("sha1", "sha256"), sha256_mode)[k] for k in ("sha1", "sha256"))
    pos, n = at, 1
    while pos < len(data):  # ima-ng records run until the next ima-sig one, and so on
        before = pos
        for t in (tags, (struct.pack("<I", 6) + b"ima-ng",)):
            pos, k, v1, v2, _ = _imafast.hot_binary(
                data, pos, len(data), 10, t, v1, v2, "sha256", per_bank, b"", b""
            )
            n += k
        assert pos > before
    assert (pos, n, v1, v2) == (len(data), 31, *want)
    # a watch value stops the loop right after the entry that reaches it
    third = _values_after(text.getvalue(), 3, ("sha1",), sha256_mode)["sha1"]
    got = _imafast.hot_ascii(
        text.getvalue(), 0, b"10", pcr._ASCII_ALGS, bytes(20), bytes(20), None, False, third, b""
    )
    assert got[1:] == (3, third, bytes(20), True) and got[0] == _ends(text.getvalue())[2]


@native_only
def test_bad_arguments_to_the_ascii_loop_raise() -> None:
    from tmb.attest import _imafast

    line = b"10 " + b"0" * 40 + b" ima-ng sha1:" + b"0" * 40 + b" /x\n"
    ok: list[Any] = [line, 0, b"10", pcr._ASCII_ALGS, bytes(20), bytes(32), "sha256", True, b"", b""]
    assert _imafast.hot_ascii(*ok)[:2] == (0, 0)  # its template hash is not SHA-1 of its data
    bad: list[tuple[int, Any, type[Exception]]] = [
        (0, "text", TypeError),
        (1, -1, ValueError),
        (1, len(line) + 1, ValueError),
        (2, 10, TypeError),
        (3, [], TypeError),
        (3, ((b"sha1", b"", "40"),), TypeError),
        (3, ((b"sha1", b""),), TypeError),
        (3, ((b"sha1", b"", 41),), ValueError),
        (3, ((b"sha1", b"", -2),), ValueError),
        (3, ((b"sha1", b"", 1 << 80),), OverflowError),
        (3, ((b"sha1", b"", 40),) * 65, ValueError),
        (4, bytes(21), ValueError),
        (5, bytes(20), ValueError),
        (6, "sha3", ValueError),
    ]
    for index, value, exc in bad:
        args = list(ok)
        args[index] = value
        with pytest.raises(exc):
            _imafast.hot_ascii(*args)


@native_only
@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(
        st.one_of(
            st.binary(max_size=60),
            st.builds(
                lambda th, t, alg, d, path: b"10 %s %s %s:%s %s" % (th, t, alg, d, path),
                st.sampled_from([b"0" * 40, b"ab" * 20, b"zz"]),
                st.sampled_from([b"ima-ng", b"ima-sig", b"ima-buf", b"ima"]),
                st.sampled_from([b"sha1", b"sha256", b"md5", b""]),
                st.sampled_from([b"0" * 40, b"0" * 64, b"0" * 32, b"0", b""]),
                st.binary(max_size=20),
            ),
        ),
        max_size=6,
    ),
    pos=st.integers(0, 400),
)
def test_random_ascii_never_reads_past_the_end(lines: list[bytes], pos: int) -> None:
    from tmb.attest import _imafast

    data = b"\n".join(lines)
    if pos > len(data):
        return
    end, n, v1, v2, _ = _imafast.hot_ascii(
        data, pos, b"10", pcr._ASCII_ALGS, bytes(20), bytes(64), "sha512", False, b"", b""
    )
    assert pos <= end <= len(data) and len(v1) == 20 and len(v2) == 64 and (n == 0) == (end == pos)


@native_only
def test_carriage_returns_in_ascii_lines_agree() -> None:
    """A path that ends in CR (which the general parser strips as part of a CR LF line end) with a
    template hash over the data with the CR: a mismatch on every path; a CR inside a path is a path."""
    digest = hashlib.sha256(b"f").digest()
    head = struct.pack("<I", 8 + 32) + b"sha256:\0" + digest

    def line(path: bytes, end: bytes) -> bytes:
        th = hashlib.sha1(head + struct.pack("<I", len(path) + 1) + path + b"\0").hexdigest()
        return b"10 %s ima-ng sha256:%s %s%s" % (th.encode(), digest.hex().encode(), path, end)

    good = line(b"/ok", b"\n")
    for odd in (line(b"/x\r", b"\n"), line(b"/x\r", b"\r\n"), line(b"/a\rb", b"\n"), line(b"/a\rb", b"\r\n")):
        for data in (good + odd + good, odd + good, good + odd.rstrip(b"\n")):
            for banks, mode in LAYOUTS[:3]:
                r = _same(data, banks=banks, mode=mode, fmt="ascii")
                assert ("ima.template_hash_mismatch" in r.report.ids()) == (b"/x\r" in odd)
