"""PCR replay of an IMA measurement list, full or incremental.

For each entry the kernel extends ``PCR[bank] = H_bank(PCR[bank] || d_bank)`` where

* ``d_sha1`` is the SHA-1 template hash;
* ``d_bank`` for a non-SHA-1 bank is, on newer kernels (``per-bank``), ``H_bank(template data)``; on
  older ones (``padded-sha1``) the SHA-1 template hash zero-padded to the bank's size;
* a violation (all-zero template hash in the log) extends all-ones of the bank's size.

tmb extends with the digest *computed from the entry's data*, so the PCR binds the data the policy
reads; a template hash that does not match its data is reported as ``ima.template_hash_mismatch``.

Incremental use: a :class:`ReplayState` (byte offset, entry count, running PCRs, mode) is saved after a
verified quote; the next call reads only the bytes after that offset. Because the quote can lag the log,
a quoted value matches at *any* entry at or past the saved state; the state at the first match becomes
the new verified state, entries after it stay pending.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from tmb.attest import ima as _ima
from tmb.attest.ima import (
    _U32,
    ASCII_DNG,
    IMA_NAME_PAD,
    ZERO_SHA1,
    ImaEntry,
    Incomplete,
    ascii_entry,
    iter_log,
    open_log,
    parse_fields,
    parse_record,
    sniff_format,
    trailing_error,
)
from tmb.errors import InputError, ParseError, Report, Severity

BANK_SIZES: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
MODES = ("per-bank", "padded-sha1")
IMA_PCR = 10


# The C hot loops (tmb/attest/_imafast.c, their signatures in _imafast.pyi).
_HotBinary = Callable[
    [bytes, int, int, int, tuple[bytes, ...], bytes, bytes, str | None, bool, bytes, bytes],
    tuple[int, int, bytes, bytes, bool],
]
_HotAscii = Callable[
    [bytes, int, bytes, tuple[tuple[bytes, bytes, int], ...], bytes, bytes, str | None, bool, bytes, bytes],
    tuple[int, int, bytes, bytes, bool],
]


class _Native(NamedTuple):
    binary: _HotBinary
    ascii: _HotAscii
    max_tags: int  # the most template tags ``binary`` takes


def _load_native() -> _Native | None:
    """The C loops, unless ``TMB_IMA_NATIVE=0`` or they did not build (no compiler or headers at install
    time): then the Python loops run, with the same results."""
    if os.environ.get("TMB_IMA_NATIVE", "").strip() == "0":
        return None
    try:
        from tmb.attest import _imafast
    except ImportError:
        return None
    return _Native(_imafast.hot_binary, _imafast.hot_ascii, _imafast.MAX_TAGS)


_native = _load_native()
#: Which hot loops the replay runs: True = the C extension, False = the Python loops.
NATIVE: bool = _native is not None


def check_bank(bank: str) -> str:
    if bank not in BANK_SIZES:
        raise InputError(f"unsupported PCR bank {bank!r}", hint=f"one of {', '.join(BANK_SIZES)}")
    return bank


@dataclass(frozen=True)
class ReplayState:
    """Where a replay stands: resume reading at ``offset`` with ``index`` entries already consumed.

    ``pcrs`` maps ``"<pcr>:<bank>"`` keys (e.g. ``"10:sha256"``) to running values, so entries a policy
    sends to another PCR are tracked too. ``mode`` is the non-SHA-1 bank behaviour (None until known).
    """

    offset: int = 0
    index: int = 0
    pcrs: Mapping[str, bytes] = field(default_factory=dict)
    mode: str | None = None
    fmt: str | None = None

    def value(self, bank: str, pcr: int = IMA_PCR) -> bytes:
        return self.pcrs.get(f"{pcr}:{bank}", bytes(BANK_SIZES[bank]))

    def to_json(self) -> dict[str, object]:
        return {
            "offset": self.offset,
            "index": self.index,
            "pcrs": {k: v.hex() for k, v in sorted(self.pcrs.items())},
            "mode": self.mode,
            "fmt": self.fmt,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> ReplayState:
        try:
            pcrs_doc = doc.get("pcrs", {})
            if not isinstance(pcrs_doc, Mapping):
                raise TypeError("pcrs")
            offset, index = doc.get("offset", 0), doc.get("index", 0)
            if not isinstance(offset, int) or not isinstance(index, int) or offset < 0 or index < 0:
                raise TypeError("offset/index")
            mode, fmt = doc.get("mode"), doc.get("fmt")
            if mode is not None and mode not in MODES:
                raise TypeError("mode")
            pcrs = {str(k): bytes.fromhex(str(v)) for k, v in pcrs_doc.items()}
            return cls(
                offset, index, pcrs, mode if isinstance(mode, str) else None, str(fmt) if fmt else None
            )
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid saved replay state ({exc})") from None


@dataclass(frozen=True)
class ReplayResult:
    """``state``: after every entry read. ``matched``: the state where the expected values were met
    (None if no expectation was given or none matched). ``report``: every finding."""

    state: ReplayState
    matched: ReplayState | None
    mode: str
    entries: int
    report: Report


class _Replayer:
    """Running state of one replay. ``step`` takes one entry; ``fast_binary`` walks a mapped binary log
    with the common case (an intact, non-violation record for ``pcr_index``) inlined."""

    def __init__(
        self,
        banks: Iterable[str],
        mode: str,
        state: ReplayState,
        expected: Mapping[str, bytes] | None,
        pcr_index: int,
        report: Report,
    ) -> None:
        bank_list = [check_bank(b) for b in banks]
        if mode != "auto" and mode not in MODES:
            raise InputError(f"unknown sha256 mode {mode!r}", hint="per-bank, padded-sha1 or auto")
        if state.mode is not None and mode == "auto":
            mode = state.mode
        self.exp = dict(expected or {})
        for bank, value in self.exp.items():
            check_bank(bank)
            if len(value) != BANK_SIZES[bank]:
                raise InputError(f"expected {bank} value is {len(value)} bytes, not {BANK_SIZES[bank]}")
            if bank not in bank_list:
                bank_list.append(bank)
        has_other = any(b != "sha1" for b in bank_list)
        if mode == "auto":
            self.modes = list(MODES) if (has_other and self.exp) else ["per-bank"]
        else:
            self.modes = [mode]
        # One slot per (mode, bank): kind 0 = SHA-1 template hash, 1 = per-bank hash of the data,
        # 2 = SHA-1 template hash zero-padded. ``running[pcr]`` holds one value per slot.
        self.slots = [(m, b) for m in self.modes for b in bank_list]
        self.specs = [
            (
                0 if b == "sha1" else 1 if m == "per-bank" else 2,
                getattr(hashlib, b),
                bytes(BANK_SIZES[b] - 20),
            )
            for m, b in self.slots
        ]
        self.ones = [
            (b"\xff" * 20 + (b"\xff" if m == "per-bank" else b"\0") * (BANK_SIZES[b] - 20))
            for m, b in self.slots
        ]
        self.zeros = [bytes(BANK_SIZES[b]) for _, b in self.slots]
        self.running: dict[int, list[bytes]] = {}
        for key, value in state.pcrs.items():
            pcr_s, _, bank = key.partition(":")
            vals = self.running.setdefault(int(pcr_s), list(self.zeros))
            for i, (_, b) in enumerate(self.slots):
                if b == bank:
                    vals[i] = value
        self.exp_slots = {
            m: [(i, self.exp[b]) for i, (mm, b) in enumerate(self.slots) if mm == m and b in self.exp]
            for m in self.modes
        }
        self.state = state
        self.pcr_index = pcr_index
        self.report = report
        self.matched: dict[str, ReplayState] = {}
        if self.exp:
            for m in self.modes:
                if self._matches(m, self.running.get(pcr_index)):
                    self.matched[m] = replace(state, mode=m)
        self.pending = bool(self.exp) and len(self.matched) < len(self.modes)
        self.offset, self.index, self.count = state.offset, state.index, 0

    def _matches(self, m: str, vals: list[bytes] | None) -> bool:
        return all((vals[i] if vals else self.zeros[i]) == v for i, v in self.exp_slots[m])

    def _check_match(self, vals: list[bytes]) -> None:
        for m in self.modes:
            if m not in self.matched and self._matches(m, vals):
                pcrs = _state_pcrs(self.running, self.slots, m)
                self.matched[m] = ReplayState(self.offset, self.index, pcrs, m, self.state.fmt)
        self.pending = len(self.matched) < len(self.modes)

    def step(self, entry: ImaEntry) -> None:
        """Check and extend one entry (any template, violation or not, any PCR)."""
        e_index, e_offset, e_size, _, pcr, th, _, _, hashed = entry
        self.count += 1
        vals = self.running.get(pcr) or self.running.setdefault(pcr, list(self.zeros))
        if th == ZERO_SHA1:
            self.report.add(
                "ima.violation",
                "measurement violation (all-zero template hash), extended as all-ones",
                severity=Severity.WARNING,
                **entry.where(),
                path=_path_of(entry),
            )
            for i, (_, ctor, _) in enumerate(self.specs):
                vals[i] = ctor(vals[i] + self.ones[i]).digest()
        else:
            computed = hashlib.sha1(hashed).digest()  # noqa: S324 (SHA-1 by format)
            if computed != th:
                self.report.add(
                    "ima.template_hash_mismatch",
                    "template hash does not match the entry's data",
                    **entry.where(),
                    path=_path_of(entry),
                    expected=computed.hex(),
                    got=th.hex(),
                )
            _extend(vals, self.specs, computed, hashed)
        self.index = e_index + 1
        self.offset = e_offset + e_size
        if self.pending and pcr == self.pcr_index:
            self._check_match(vals)

    def _fast_setup(self) -> tuple[list[bytes], int, Any, tuple[int, bytes] | None]:
        """For the inlined common case: PCR ``pcr_index``'s running values, the bank layout (1: SHA-1
        only, 2: SHA-1 + one per-bank hash, 0: anything else), the second bank's hash, and a cheap
        first test (one slot's expected value) that gates the full match check when there is one mode."""
        vals = self.running.get(self.pcr_index) or self.running.setdefault(self.pcr_index, list(self.zeros))
        kinds = [k for k, _, _ in self.specs]
        shape = 1 if kinds == [0] else 2 if kinds == [0, 1] else 0
        h2 = self.specs[1][1] if shape == 2 else hashlib.sha1
        first = self.exp_slots[self.modes[0]][:1] if len(self.modes) == 1 else []
        return vals, shape, h2, (first[0] if first else None)

    def run(self, entries: Iterable[ImaEntry], on_entry: Callable[[ImaEntry], None] | None) -> None:
        """``step`` over ``entries`` with the intact-record case for ``pcr_index`` inlined."""
        sha1 = hashlib.sha1
        specs, pcr_index = self.specs, self.pcr_index
        vals, shape, h2, watch = self._fast_setup()
        index, offset, count = self.index, self.offset, self.count
        for entry in entries:
            if on_entry is not None:
                on_entry(entry)
            num, off, size, _, pcr, th, _, _, hashed = entry
            if pcr == pcr_index and th != ZERO_SHA1:
                computed = sha1(hashed).digest()
                if computed == th:
                    if shape == 1:
                        vals[0] = sha1(vals[0] + computed).digest()
                    elif shape == 2:
                        vals[0] = sha1(vals[0] + computed).digest()
                        vals[1] = h2(vals[1] + h2(hashed).digest()).digest()
                    else:
                        _extend(vals, specs, computed, hashed)
                    count, index, offset = count + 1, num + 1, off + size
                    if self.pending and (watch is None or vals[watch[0]] == watch[1]):
                        self.index, self.offset = index, offset
                        self._check_match(vals)
                    continue
            self.index, self.offset, self.count = index, offset, count
            self.step(entry)
            index, offset, count = self.index, self.offset, self.count
        self.index, self.offset, self.count = index, offset, count

    # The hot loops below replay the common record (an intact record for ``pcr_index`` in a template
    # they can read) without building an ImaEntry: running values in locals, one SHA-1 of the template
    # data (the template hash check) and one per bank. Anything else -- another PCR, a violation, a
    # template hash that does not match, the legacy ``ima`` template, a record cut by the buffer -- is
    # handed to the general parser and ``step``, so findings and results are those of the general path.
    # Between "syncs" only hot entries pass, which is how the loops know positions without tracking them.
    # For shapes 1 and 2 the hot records are also replayed in C when ``NATIVE``: ``_imafast.hot_binary``
    # in place of the binary loop's inner ``while`` (the same records and stop conditions), and
    # ``_imafast.hot_ascii`` in ``_fast_ascii_native`` (ima-ng, ima-sig and ima-buf lines; anything else
    # goes to the general parser). tests/unit/test_ima_native.py holds them to the Python loops' results.

    def _hot_setup(self) -> tuple[int, list[bytes], Any, bool, bytes]:
        """PCR ``pcr_index``'s running values and the bank layout: shape 1 = SHA-1 only, 2 = SHA-1 and
        one other bank (``h2``; ``per_bank``: its hash of the data, else the template hash + ``pad``),
        0 = anything else (``_extend`` over every slot)."""
        vals = self.running.get(self.pcr_index) or self.running.setdefault(self.pcr_index, list(self.zeros))
        kinds = [k for k, _, _ in self.specs]
        if kinds == [0]:
            return 1, vals, hashlib.sha1, False, b""
        if kinds in ([0, 1], [0, 2]):
            return 2, vals, self.specs[1][1], kinds[1] == 1, self.specs[1][2]
        return 0, vals, hashlib.sha1, False, b""

    def _watch(self) -> tuple[bytes, bytes, int, bytes]:
        """What the hot loops compare after each extend to spot a possible match of the quoted values:
        ``t1``/``t2`` against the two running values (shapes 1, 2), ``vals[wi] == wv`` for shape 0 with
        ``wi == -1`` meaning every entry. ``b""`` never equals a PCR value (nothing left to match)."""
        if not self.pending:
            return b"", b"", 0, b""
        if len(self.modes) > 1:
            return b"", b"", -1, b""
        i, v = self.exp_slots[self.modes[0]][0]  # any one expected slot gates the full check
        return (v if i == 0 else b""), (v if i == 1 else b""), i, v

    def _cold(
        self, entry: ImaEntry, vals: list[bytes], shape: int, h2: Any, per_bank: bool, pad: bytes
    ) -> None:
        """One entry from the general parser, taken as ``run`` takes it: an intact entry for
        ``pcr_index`` extended here (the layouts of ``_hot_setup``), anything else through ``step``."""
        num, off, size, _, pcr, th, _, _, hashed = entry
        if pcr == self.pcr_index and th != ZERO_SHA1:
            d = hashlib.sha1(hashed).digest()  # noqa: S324 (SHA-1 by format)
            if d == th:
                if shape == 1:
                    vals[0] = hashlib.sha1(vals[0] + d).digest()  # noqa: S324 (SHA-1 by format)
                elif shape == 2:
                    vals[0] = hashlib.sha1(vals[0] + d).digest()  # noqa: S324 (SHA-1 by format)
                    vals[1] = h2(vals[1] + (h2(hashed).digest() if per_bank else d + pad)).digest()
                else:
                    _extend(vals, self.specs, d, hashed)
                self.index, self.offset, self.count = num + 1, off + size, self.count + 1
                if self.pending:
                    self._check_match(vals)
                return
        self.step(entry)

    def fast_binary(self, read: Callable[[int], bytes], offset: int) -> None:
        """Replay binary records read with ``read`` (from file offset ``offset``) until EOF, in chunks of
        :data:`tmb.attest.ima.CHUNK` bytes. A malformed record or a trailing partial one raises
        ParseError (as :func:`tmb.attest.ima.iter_binary` does) after every record before it counts."""
        sha1, unpack_u32 = hashlib.sha1, _U32.unpack_from
        pcr_index, specs = self.pcr_index, self.specs
        shape, vals, h2, per_bank, pad = self._hot_setup()
        v1, v2 = vals[0], vals[-1]
        t1, t2, wi, wv = self._watch()
        names: dict[bytes, str] = {}
        # u32 name length + name of every template seen (not ``ima``) -> the head struct for its length
        tags: dict[bytes, struct.Struct] = {}
        tag = b""  # the template the hot loop expects (u32 name length + name); none yet
        head = _head(0)
        unpack, hlen = head.unpack_from, head.size
        buf, base, pos, size, eof = b"", offset, 0, 0, False
        num = synced = self.index
        # The C loop (shapes 1 and 2) takes the same records as the Python loops below: the templates of
        # ``tags`` with the expected tag's name length (``hot``, the expected tag first).
        native = _native.binary if NATIVE and _native is not None and 0 <= pcr_index < 1 << 32 else None
        bank2 = self.slots[1][1] if shape == 2 else None
        hot: tuple[bytes, ...] = ()
        while True:
            # Past MAX_TEMPLATE_DATA bytes of buffer the parser's length limit could matter: no hot loop.
            limit = size - hlen if size <= _ima.MAX_TEMPLATE_DATA else -1
            hit = False  # stopped after an entry that may meet the quoted values
            if native is not None and shape:
                pos, taken, v1, v2, hit = native(
                    buf, pos, limit, pcr_index, hot, v1, v2, bank2, per_bank, t1, t2
                )
                num += taken
            elif shape == 1:  # the SHA-1 bank alone: its own loop, the commonest layout
                while pos <= limit:
                    pcr, th, name, dlen = unpack(buf, pos)
                    start = pos + hlen
                    end = start + dlen
                    if pcr != pcr_index or end > size or (name != tag and name not in tags):
                        break
                    d = sha1(buf[start:end]).digest()
                    if d != th:  # a mismatch, or a violation (no data hashes to zeros): general path
                        break
                    pos = end
                    num += 1
                    v1 = sha1(v1 + d).digest()
                    if v1 == t1:
                        hit = True
                        break
            else:
                while pos <= limit:
                    pcr, th, name, dlen = unpack(buf, pos)
                    start = pos + hlen
                    end = start + dlen
                    if pcr != pcr_index or end > size or (name != tag and name not in tags):
                        break
                    data = buf[start:end]
                    d = sha1(data).digest()
                    if d != th:
                        break
                    pos = end
                    num += 1
                    if shape == 2:
                        v1 = sha1(v1 + d).digest()
                        v2 = h2(v2 + (h2(data).digest() if per_bank else d + pad)).digest()
                        if v1 != t1 and v2 != t2:
                            continue
                    else:
                        _extend(vals, specs, d, data)
                        if wi >= 0 and vals[wi] != wv:
                            continue
                    hit = True
                    break
            # Sync, then: check a possible match, or see why the record at ``pos`` is not for the hot
            # loop (the buffer ends, or it needs the general path).
            if num != synced:
                self.index, self.offset, self.count = num, base + pos, self.count + num - synced
                synced = num
            if shape:
                vals[-1], vals[0] = v2, v1  # v1 last: shape 1 has one slot
            if hit:
                self._check_match(vals)
                t1, t2, wi, wv = self._watch()
                continue
            if pos + 28 <= size:
                (n,) = unpack_u32(buf, pos + 24)
                name = buf[pos + 24 : pos + 28 + n]
                if name != tag and name in tags:  # a template seen before, another name length
                    tag, head = name, tags[name]
                    unpack, hlen = head.unpack_from, head.size
                    hot = _hot_tags(tag, tags)
                    continue
            try:
                entry, end = parse_record(buf, pos, base, num, names)
            except Incomplete as inc:
                if eof:
                    if pos == size:
                        return
                    raise trailing_error(base + pos, size - pos, inc.part) from None
                more = read(max(_ima.CHUNK, size - pos))
                eof = not more
                buf = buf[pos:] + more
                base, pos, size = base + pos, 0, len(buf)
                continue
            name = buf[pos + 24 : pos + 28 + len(entry.template_name)]
            if name not in tags and entry.template_name != "ima":  # validated by the parser: may be hot
                tags[name] = _head(len(entry.template_name))
                hot = _hot_tags(tag, tags)
            pending = self.pending
            self._cold(entry, vals, shape, h2, per_bank, pad)
            num = synced = num + 1
            pos = end
            v1, v2 = vals[0], vals[-1]
            if self.pending != pending:
                t1, t2, wi, wv = self._watch()

    def fast_ascii(
        self, read: Callable[[int], bytes], offset: int, on_error: Callable[[ParseError], None]
    ) -> None:
        """Replay ascii lines read with ``read`` (from file offset ``offset``) until EOF, as
        :func:`tmb.attest.ima.iter_ascii` with ``on_error`` would deliver them to ``step``."""
        if NATIVE and _native is not None and self._hot_setup()[0]:
            self._fast_ascii_native(_native.ascii, read, offset, on_error)
            return
        sha1, unhex, pack, join = hashlib.sha1, binascii.a2b_hex, _U32.pack, b"".join
        pcr_index, specs, dngs = self.pcr_index, self.specs, ASCII_DNG
        pcr_tag = str(pcr_index).encode("ascii")
        shape, vals, h2, per_bank, pad = self._hot_setup()
        v1, v2 = vals[0], vals[-1]
        t1, t2, wi, wv = self._watch()
        num = synced = self.index
        th = b""
        lens = _PATH_LENS
        # Sync point: lines[at] starts at file offset ``off`` and is line number ``lineno + 1``.
        off, lineno, carry, read_off = offset, 0, b"", offset
        while True:
            chunk = read(_ima.CHUNK)
            if chunk:
                lines = chunk.split(b"\n")
                cr = b"\r" in chunk or b"\r" in carry
                lines[0] = carry + lines[0]
                carry, nl = lines.pop(), 1
                read_off += len(chunk)
            elif carry:  # a last line without its newline
                lines, carry, nl = [carry], b"", 0
                cr = b"\r" in lines[0]
            else:
                return
            at = 0
            # CR LF line ends: the hot loop reads the lines without their CRs, as the general parser does
            # (``lines`` keeps the bytes as they are, for positions and for the general parser).
            for line in [line.rstrip(b"\r") for line in lines] if cr else lines:
                try:
                    pcr_b, th_hex, name, dng_text, path = line.split(b" ", 4)
                except ValueError:  # fewer fields: a comment, a blank or malformed line
                    pcr_b = b""
                if pcr_b == pcr_tag:
                    alg, _, digest_hex = dng_text.partition(b":")
                    dng = dngs.get(alg)
                    d: bytes | None = None
                    if dng is not None and len(digest_hex) == dng[1]:
                        try:
                            th = unhex(th_hex)
                            if name == b"ima-ng":
                                n = len(path)
                                plen = lens[n] if n < 4096 else pack(n + 1)
                                data = join((dng[0], unhex(digest_hex), plen, path, b"\0"))
                            elif (name == b"ima-sig" or name == b"ima-buf") and b" " in path:
                                path, _, tail_hex = path.rpartition(b" ")  # one more field: sig or buf
                                tail = unhex(tail_hex)
                                data = join(
                                    (
                                        dng[0],
                                        unhex(digest_hex),
                                        pack(len(path) + 1),
                                        path,
                                        b"\0",
                                        pack(len(tail)),
                                        tail,
                                    )
                                )
                            else:
                                raise ValueError(name)  # ima-modsig, unknown: the general parser
                            d = sha1(data).digest()
                        except ValueError:  # binascii.Error: not hex
                            d = None
                    elif name == b"ima" and len(dng_text) == 40 and len(path) < IMA_NAME_PAD:
                        try:  # the legacy template: what is hashed is the digest and the padded path
                            th = unhex(th_hex)
                            data = unhex(dng_text) + path.ljust(IMA_NAME_PAD, b"\0")
                            d = sha1(data).digest()
                        except ValueError:
                            d = None
                    if d == th:  # so ``th`` is 20 bytes: 40 hex digits
                        num += 1
                        if shape == 1:
                            v1 = sha1(v1 + d).digest()
                            if v1 != t1:
                                continue
                        elif shape == 2:
                            v1 = sha1(v1 + d).digest()
                            v2 = h2(v2 + (h2(data).digest() if per_bank else d + pad)).digest()
                            if v1 != t1 and v2 != t2:
                                continue
                        else:
                            _extend(vals, specs, d, data)
                            if wi >= 0 and vals[wi] != wv:
                                continue
                        # Possibly the quoted value: sync after this line, check every bank.
                        end = at + num - synced
                        off, lineno = off + _span(lines, at, end, nl), lineno + end - at
                        self.index, self.offset, self.count = num, off, self.count + num - synced
                        at, synced = end, num
                        if shape:
                            vals[-1], vals[0] = v2, v1  # v1 last: shape 1 has one slot
                        self._check_match(vals)
                        t1, t2, wi, wv = self._watch()
                        continue
                # Not a hot line: sync up to it, then the general parser and ``step``.
                i = at + num - synced  # lines[at:i] were hot entries
                lineno += i - at + 1
                if num != synced:
                    off += _span(lines, at, i, nl)
                    self.index, self.offset, self.count = num, off, self.count + num - synced
                if shape:
                    vals[-1], vals[0] = v2, v1  # v1 last: shape 1 has one slot
                raw = lines[i] + b"\n" if nl else lines[i]
                try:
                    entry = ascii_entry(raw, index=num, offset=off, lineno=lineno)
                except ParseError as exc:
                    on_error(exc)
                    num += 1
                else:
                    if entry is not None:
                        pending = self.pending
                        self._cold(entry, vals, shape, h2, per_bank, pad)
                        num += 1
                        v1, v2 = vals[0], vals[-1]
                        if self.pending != pending:
                            t1, t2, wi, wv = self._watch()
                off, at, synced = off + len(raw), i + 1, num
            # End of the chunk: every line after the sync point was a hot entry.
            if num != synced:
                off, lineno = read_off - len(carry), lineno + len(lines) - at
                self.index, self.offset, self.count = num, off, self.count + num - synced
                synced = num
                if shape:
                    vals[-1], vals[0] = v2, v1  # v1 last: shape 1 has one slot

    def _fast_ascii_native(
        self,
        hot: _HotAscii,
        read: Callable[[int], bytes],
        offset: int,
        on_error: Callable[[ParseError], None],
    ) -> None:
        """``fast_ascii`` for shapes 1 and 2 with the C loop taking the hot lines: ``buf`` holds the log
        from file offset ``base``; a line the C loop does not take goes to the general parser and
        ``_cold``, as in ``fast_ascii`` (lines are numbered from ``offset``)."""
        shape, vals, h2, per_bank, pad = self._hot_setup()
        v1, v2 = vals[0], vals[-1]
        t1, t2, _, _ = self._watch()
        bank2 = self.slots[1][1] if shape == 2 else None
        pcr_tag = str(self.pcr_index).encode("ascii")
        num, lineno = self.index, 0
        buf, base, pos, eof = b"", offset, 0, False
        while True:
            pos, taken, v1, v2, hit = hot(buf, pos, pcr_tag, _ASCII_ALGS, v1, v2, bank2, per_bank, t1, t2)
            if taken:
                num, lineno = num + taken, lineno + taken
                self.index, self.offset, self.count = num, base + pos, self.count + taken
            vals[-1], vals[0] = v2, v1  # v1 last: shape 1 has one slot
            if hit:
                self._check_match(vals)
                t1, t2, _, _ = self._watch()
                continue
            end = buf.find(b"\n", pos) + 1
            if not end:  # the buffer ends inside the line
                if not eof:
                    more = read(_ima.CHUNK)
                    if more:
                        buf, base, pos = buf[pos:] + more, base + pos, 0
                        continue
                    eof = True
                if pos == len(buf):
                    return
                end = len(buf)  # a last line without its newline
            raw, lineno = buf[pos:end], lineno + 1
            try:
                entry = ascii_entry(raw, index=num, offset=base + pos, lineno=lineno)
            except ParseError as exc:
                on_error(exc)
                num += 1
            else:
                if entry is not None:
                    pending = self.pending
                    self._cold(entry, vals, shape, h2, per_bank, pad)
                    num += 1
                    v1, v2 = vals[0], vals[-1]
                    if self.pending != pending:
                        t1, t2, _, _ = self._watch()
            pos = end

    def finish(self) -> ReplayResult:
        chosen = self.modes[0]
        if len(self.modes) > 1:
            hits = [m for m in self.modes if m in self.matched]
            if hits:
                chosen = hits[0]
                self.report.add(
                    "pcr.mode_detected",
                    f"non-SHA-1 banks follow the {chosen} behaviour",
                    severity=Severity.INFO,
                    mode=chosen,
                )
        pcrs = _state_pcrs(self.running, self.slots, chosen)
        final = ReplayState(self.offset, self.index, pcrs, chosen, self.state.fmt)
        hit = self.matched.get(chosen)
        if self.exp and hit is None:
            for bank, value in self.exp.items():
                self.report.add(
                    "pcr.mismatch",
                    f"no entry from {self.state.index} to {self.index} replays PCR {self.pcr_index} "
                    "to the quoted value",
                    pcr=self.pcr_index,
                    bank=bank,
                    expected=value.hex(),
                    got=final.value(bank, self.pcr_index).hex(),
                    entries_checked=self.count,
                    mode=chosen,
                )
        return ReplayResult(final, hit, chosen, self.count, self.report)


# The d-ng algorithms of ascii lines for the C loop: (name, d-ng field up to the digest, hex digits).
_ASCII_ALGS = tuple((alg, head, digits) for alg, (head, digits) in ASCII_DNG.items())
# The u32 length of a path field (path + NUL) for paths up to PATH_MAX, as the ascii hot loop builds them.
_PATH_LENS = [_U32.pack(n + 1) for n in range(4096)]


def _hot_tags(tag: bytes, tags: Mapping[bytes, object]) -> tuple[bytes, ...]:
    """The template tags the C loop takes: ``tag`` first, then the others of its length (as many as it
    takes; a record of any other is left to the general path, as the Python loop may leave it)."""
    if not tag or _native is None:
        return ()
    same = [t for t in tags if len(t) == len(tag) and t != tag]
    return (tag, *same)[: _native.max_tags]


def _span(lines: list[bytes], start: int, stop: int, nl: int) -> int:
    """Bytes that ``lines[start:stop]`` occupy in the log, ``nl`` newline byte(s) after each."""
    return sum(map(len, lines[start:stop])) + (stop - start) * nl


def _head(nlen: int) -> struct.Struct:
    """The record head for a template name of ``nlen`` bytes: pcr, template hash, u32 name length +
    name (one bytes field, compared whole), u32 data length."""
    return struct.Struct(f"<I20s{nlen + 4}sI")


def _extend(vals: list[bytes], specs: list[tuple[int, Any, bytes]], computed: bytes, hashed: bytes) -> None:
    for i, (kind, ctor, pad) in enumerate(specs):
        if kind == 0:
            vals[i] = ctor(vals[i] + computed).digest()
        elif kind == 1:
            vals[i] = ctor(vals[i] + ctor(hashed).digest()).digest()
        else:
            vals[i] = ctor(vals[i] + computed + pad).digest()


def replay(
    entries: Iterable[ImaEntry],
    *,
    banks: Iterable[str] = ("sha1", "sha256"),
    mode: str = "auto",
    state: ReplayState | None = None,
    expected: Mapping[str, bytes] | None = None,
    pcr_index: int = IMA_PCR,
    report: Report | None = None,
    on_entry: Callable[[ImaEntry], None] | None = None,
) -> ReplayResult:
    """Check every template hash and replay ``entries`` into the given banks.

    ``expected`` maps bank -> quoted value of PCR ``pcr_index``; the first entry (or the saved state
    itself) at which every expected bank matches becomes ``matched``. ``mode`` is ``per-bank``,
    ``padded-sha1`` or ``auto`` (tries both, keeps the one that matches; ``per-bank`` when nothing is
    expected). ``on_entry`` sees each entry (policy evaluation in the same pass).
    """
    report = report if report is not None else Report()
    replayer = _Replayer(banks, mode, state or ReplayState(), expected, pcr_index, report)
    replayer.run(entries, on_entry)
    return replayer.finish()


def _state_pcrs(
    running: Mapping[int, list[bytes]], slots: list[tuple[str, str]], mode: str
) -> dict[str, bytes]:
    return {
        f"{pcr}:{bank}": vals[i]
        for pcr, vals in running.items()
        for i, (m, bank) in enumerate(slots)
        if m == mode
    }


def render_ascii(entry: ImaEntry) -> str:
    """The ascii line the kernel prints for ``entry`` (without newline)."""
    f = parse_fields(entry)
    head = f"{entry.pcr} {entry.template_hash.hex()} {entry.template_name}"
    if entry.template_name == "ima":
        return f"{head} {f.digest.hex()} {f.name}"
    parts = [f"{f.digest_alg}:{f.digest.hex()}", f.name]
    if entry.template_name == "ima-sig":
        parts.append(f.sig.hex())
    elif entry.template_name == "ima-buf":
        parts.append(f.buf.hex())
    elif entry.template_name == "ima-modsig":
        dm = f"{f.modsig_digest_alg}:{f.modsig_digest.hex()}" if f.modsig_digest_alg else ""
        parts += [f.sig.hex(), dm, f.modsig.hex()]
    return f"{head} {' '.join(parts)}"


def _path_of(entry: ImaEntry) -> str:
    try:
        return parse_fields(entry).name
    except ParseError:
        return "?"


def _report_parse_error(report: Report, exc: ParseError) -> None:
    if "trailing_bytes" in exc.context:
        report.add("ima.trailing_partial_record", exc.message, severity=Severity.WARNING, **exc.context)
    else:
        report.add("ima.malformed_record", exc.message, **exc.context)


def replay_file(
    source: str | Path | BinaryIO,
    *,
    banks: Iterable[str] = ("sha1", "sha256"),
    mode: str = "auto",
    state: ReplayState | None = None,
    expected: Mapping[str, bytes] | None = None,
    pcr_index: int = IMA_PCR,
    on_entry: Callable[[ImaEntry], None] | None = None,
) -> ReplayResult:
    """Replay a log file (or open, seekable binary stream) from ``state.offset``; parse errors become
    findings.

    A trailing partial record (a log read while the kernel appends, or cut short) is a warning and is
    left out of the state, so the next incremental read starts at its first byte. A malformed record
    in a binary log stops the replay there (``ima.malformed_record``); a malformed ascii line is
    reported (``ima.malformed_entry``) and skipped.
    """
    report = Report()
    state = state or ReplayState()
    stream = open_log(source) if isinstance(source, str | Path) else source
    try:
        stream.seek(state.offset)
        fmt = state.fmt or sniff_format(stream)
        state = replace(state, fmt=fmt)
        return _replay_stream(stream, state, banks, mode, expected, pcr_index, report, on_entry)
    finally:
        if isinstance(source, str | Path):
            stream.close()


def replay_delta(
    delta: bytes,
    *,
    state: ReplayState,
    banks: Iterable[str] = ("sha1", "sha256"),
    mode: str = "auto",
    expected: Mapping[str, bytes] | None = None,
    pcr_index: int = IMA_PCR,
    on_entry: Callable[[ImaEntry], None] | None = None,
) -> ReplayResult:
    """Replay the log bytes that follow ``state.offset`` (what a probe ships): only the new entries are
    parsed and extended. Offsets and entry numbers in findings are those of the whole log."""
    stream = io.BytesIO(delta)
    fmt = state.fmt or sniff_format(stream)
    return _replay_stream(
        stream, replace(state, fmt=fmt), banks, mode, expected, pcr_index, Report(), on_entry
    )


def _replay_stream(
    stream: BinaryIO,
    state: ReplayState,
    banks: Iterable[str],
    mode: str,
    expected: Mapping[str, bytes] | None,
    pcr_index: int,
    report: Report,
    on_entry: Callable[[ImaEntry], None] | None,
) -> ReplayResult:
    """Replay from the stream's position, which holds the log byte at ``state.offset``."""

    def bad_line(exc: ParseError) -> None:
        report.add("ima.malformed_entry", exc.message, **exc.context)

    if on_entry is None and state.fmt in ("binary", "ascii"):  # nobody needs the entries: hot loops
        replayer = _Replayer(banks, mode, state, expected, pcr_index, report)
        try:
            if state.fmt == "binary":
                replayer.fast_binary(stream.read, state.offset)
            else:
                replayer.fast_ascii(stream.read, state.offset, bad_line)
        except ParseError as exc:
            _report_parse_error(report, exc)
        return replayer.finish()

    def guarded() -> Iterator[ImaEntry]:
        if state.fmt is None:  # no bytes past the saved offset: nothing new
            return
        try:
            yield from iter_log(
                stream, fmt=state.fmt, start_offset=state.offset, start_index=state.index, on_error=bad_line
            )
        except ParseError as exc:
            _report_parse_error(report, exc)

    return replay(
        guarded(),
        banks=banks,
        mode=mode,
        state=state,
        expected=expected,
        pcr_index=pcr_index,
        report=report,
        on_entry=on_entry,
    )
