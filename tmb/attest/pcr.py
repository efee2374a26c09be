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

import hashlib
import io
import mmap
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from tmb.attest.ima import (
    _HEAD,
    _U32,
    ZERO_SHA1,
    ImaEntry,
    Incomplete,
    iter_log,
    map_file,
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
            computed = hashlib.sha1(hashed).digest()
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

    def fast_binary(self, buf: mmap.mmap, pos: int) -> int:
        """Replay records of a mapped binary log from ``pos``; returns where it stopped (the end, or a
        record it could not parse, which the caller reports)."""
        size = len(buf)
        unpack_head, unpack_u32 = _HEAD.unpack_from, _U32.unpack_from
        sha1 = hashlib.sha1
        specs, pcr_index = self.specs, self.pcr_index
        vals, shape, h2, watch = self._fast_setup()
        names: dict[bytes, str] = {}
        fast_names: set[bytes] = set()
        index = self.index
        count = 0
        try:
            while pos < size:
                if pos + 32 <= size:
                    pcr, th, nlen = unpack_head(buf, pos)
                    p = pos + 28 + nlen
                    if pcr == pcr_index and 0 < nlen <= 16 and p + 4 <= size and th != ZERO_SHA1:
                        (dlen,) = unpack_u32(buf, p)
                        end = p + 4 + dlen
                        if end <= size and buf[pos + 28 : p] in fast_names:
                            data = buf[p + 4 : end]
                            computed = sha1(data).digest()
                            if computed == th:
                                if shape == 1:  # the usual layouts, unrolled
                                    vals[0] = sha1(vals[0] + computed).digest()
                                elif shape == 2:
                                    vals[0] = sha1(vals[0] + computed).digest()
                                    vals[1] = h2(vals[1] + h2(data).digest()).digest()
                                else:
                                    _extend(vals, specs, computed, data)
                                count += 1
                                index += 1
                                if self.pending and (watch is None or vals[watch[0]] == watch[1]):
                                    self.index, self.offset = index, end
                                    self._check_match(vals)
                                pos = end
                                continue
                # Anything unusual goes through the full parser and the generic step.
                self.index, self.offset, self.count = index, pos, self.count + count
                count = 0
                entry, end = parse_record(buf, pos, 0, index, names)
                if (
                    entry.template_name != "ima"
                ):  # validated by the parser: later records may take the fast path
                    fast_names.add(entry.template_name.encode("ascii"))
                self.step(entry)
                index, pos = self.index, end
        finally:
            self.index, self.offset, self.count = index, pos, self.count + count
        return pos

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
        mapped = map_file(stream) if fmt == "binary" and on_entry is None else None
        if mapped is not None:
            with mapped:
                replayer = _Replayer(banks, mode, state, expected, pcr_index, report)
                try:
                    replayer.fast_binary(mapped, state.offset)
                except Incomplete as inc:
                    _report_parse_error(
                        report, trailing_error(replayer.offset, len(mapped) - replayer.offset, inc.part)
                    )
                except ParseError as exc:
                    _report_parse_error(report, exc)
                return replayer.finish()
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
