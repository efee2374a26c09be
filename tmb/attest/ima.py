"""IMA measurement lists: streaming parser for the kernel's binary and ascii formats.

Binary record (``binary_runtime_measurements``, little-endian as exported on x86/arm64)::

    u32 pcr | 20-byte SHA-1 template hash | u32 name_len | name | [u32 data_len] | template data

``data_len`` is absent for the legacy ``ima`` template, whose data is a 20-byte digest, a u32 path length
and the path. For every other template the data is a sequence of ``u32 len | bytes`` fields.

Template hash (what the SHA-1 bank extends): SHA-1 of the *hashed data* = the template data as stored
for ``ima-ng``/``ima-sig``/``ima-buf``/``ima-modsig``; for ``ima`` the 20-byte digest followed by the path
zero-padded to 256 bytes. A violation (a file measured while open for write, ...) has an all-zero template
hash in the log and is extended as all-ones.

The parser streams: it reads the file in chunks and keeps at most one chunk plus one record in memory.
Malformed input never raises anything but :class:`tmb.errors.ParseError`, whose context names the byte
offset (binary) or the line (ascii). Absurd length fields are rejected before any allocation.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from tmb.errors import InputError, ParseError

SHA1_LEN = 20
ZERO_SHA1 = bytes(SHA1_LEN)
IMA_NAME_PAD = 256  # IMA_EVENT_NAME_LEN_MAX + 1: the legacy template pads the path to this for hashing
MAX_TEMPLATE_NAME = 64
MAX_TEMPLATE_DATA = 64 * 1024 * 1024  # the kernel caps ima-buf payloads far below this
CHUNK = 1 << 17  # read size for streams: the chunk and its copy stay in a core's L2 cache

# Field layout of the templates we interpret. Other names are reported as ``ima.unknown_template``.
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
}

# Digest sizes of the algorithms that can appear in a d-ng field (crypto API names as IMA prints them).
DIGEST_SIZES: dict[str, int] = {
    "md5": 16,
    "sha1": 20,
    "rmd160": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "wp256": 32,
    "wp384": 48,
    "wp512": 64,
    "sm3": 32,
    "sm3-256": 32,
    "streebog256": 32,
    "streebog512": 64,
    "sha3-256": 32,
    "sha3-384": 48,
    "sha3-512": 64,
}

_ALG_SIZES = {name.encode("ascii"): size for name, size in DIGEST_SIZES.items()}
_HEAD = struct.Struct("<I20sI")
_U32 = struct.Struct("<I")


class ImaEntry(NamedTuple):
    """One measurement (immutable). ``hashed`` is the byte string the kernel hashes for the template
    hash and for the per-bank digests of newer kernels; ``data`` is the template data as the binary log
    stores it. A NamedTuple rather than a frozen dataclass: a log has millions of these and tuple
    construction is several times cheaper on the replay hot path."""

    num: int  # 0-based position in the log
    offset: int  # byte offset of the record (binary) or of the line (ascii)
    size: int  # bytes the record (or the line with its newline) occupies in the log
    line: int  # 1-based line for ascii logs, 0 for binary
    pcr: int
    template_hash: bytes
    template_name: str
    data: bytes
    hashed: bytes

    @property
    def is_violation(self) -> bool:
        return self.template_hash == ZERO_SHA1

    def where(self) -> dict[str, Any]:
        """Location context for findings."""
        loc: dict[str, Any] = {"entry": self.num, "offset": self.offset}
        if self.line:
            loc["line"] = self.line
        return loc

    def fields(self) -> ImaFields:
        return parse_fields(self)


@dataclass(frozen=True, slots=True)
class ImaFields:
    """The interpreted template fields of an entry (what policies look at)."""

    digest_alg: str  # "sha1" for the legacy ``ima`` template
    digest: bytes
    name: str  # file path, or the event name for ima-buf (e.g. "dm_table_load")
    sig: bytes = b""
    buf: bytes = b""
    modsig_digest_alg: str = ""
    modsig_digest: bytes = b""
    modsig: bytes = b""


def template_hashed_data(template_name: str, data: bytes) -> bytes:
    """The bytes the template hash covers, from binary template data."""
    if template_name != "ima":
        return data
    if len(data) < SHA1_LEN + 4:
        raise ParseError("legacy ima template data too short", need=SHA1_LEN + 4, got=len(data))
    (nlen,) = _U32.unpack_from(data, SHA1_LEN)
    name = data[SHA1_LEN + 4 : SHA1_LEN + 4 + nlen]
    if len(name) != nlen or nlen >= IMA_NAME_PAD:
        raise ParseError("legacy ima template path length invalid", length=nlen)
    return data[:SHA1_LEN] + name.ljust(IMA_NAME_PAD, b"\0")


def _split_fields(data: bytes, count: int, where: dict[str, Any]) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise ParseError(f"template data ends before field {i}", **where)
        (flen,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + flen > len(data):
            raise ParseError(f"template field {i} length {flen} runs past the template data", **where)
        out.append(data[pos : pos + flen])
        pos += flen
    if pos != len(data):
        raise ParseError(f"{len(data) - pos} trailing bytes after the template fields", **where)
    return out


def _parse_dng(raw: bytes, where: dict[str, Any]) -> tuple[str, bytes]:
    sep = raw.find(b":\0")
    if sep < 0:
        raise ParseError("d-ng field has no 'algo:' prefix", **where)
    alg = raw[:sep].decode("ascii", "replace")
    digest = raw[sep + 2 :]
    size = DIGEST_SIZES.get(alg)
    if size is not None and len(digest) != size:
        raise ParseError(f"{alg} digest is {len(digest)} bytes, expected {size}", **where)
    return alg, digest


def _cstr(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "surrogateescape")


def parse_fields(entry: ImaEntry) -> ImaFields:
    """Interpret an entry's template fields; ParseError for unknown templates or malformed fields."""
    where = entry.where()
    layout = TEMPLATE_FIELDS.get(entry.template_name)
    if layout is None:
        raise ParseError(f"unknown IMA template {entry.template_name!r}", **where)
    if entry.template_name == "ima":
        digest = entry.hashed[:SHA1_LEN]
        return ImaFields("sha1", digest, _cstr(entry.hashed[SHA1_LEN:]))
    parts = _split_fields(entry.data, len(layout), where)
    alg, digest = _parse_dng(parts[0], where)
    fields = ImaFields(alg, digest, _cstr(parts[1]))
    if entry.template_name == "ima-sig":
        return ImaFields(alg, digest, fields.name, sig=parts[2])
    if entry.template_name == "ima-buf":
        return ImaFields(alg, digest, fields.name, buf=parts[2])
    if entry.template_name == "ima-modsig":
        m_alg, m_digest = _parse_dng(parts[3], where) if parts[3] else ("", b"")
        return ImaFields(alg, digest, fields.name, parts[2], b"", m_alg, m_digest, parts[4])
    return fields


# --------------------------------------------------------------------------------------------- binary


class Incomplete(Exception):
    """The record at the given position needs more bytes than the buffer holds (internal)."""

    def __init__(self, part: str) -> None:
        super().__init__(part)
        self.part = part


def parse_record(
    buf: bytes | mmap.mmap, pos: int, base: int, index: int, names: dict[bytes, str]
) -> tuple[ImaEntry, int]:
    """Parse the binary record at ``buf[pos:]`` (``base`` = file offset of ``buf[0]``, for messages).

    Returns the entry and the position after it. Raises :class:`Incomplete` when the buffer ends inside
    the record and ParseError when the record is malformed. ``names`` caches decoded template names.
    """
    avail = len(buf)
    if pos + 28 > avail:
        raise Incomplete("record header")
    pcr, th, nlen = _HEAD.unpack_from(buf, pos)
    if nlen == 0 or nlen > MAX_TEMPLATE_NAME:
        raise ParseError(
            f"template name length {nlen} is not plausible (1..{MAX_TEMPLATE_NAME})",
            offset=base + pos,
            entry=index,
        )
    p = pos + 28
    if p + nlen + 4 > avail:
        raise Incomplete("template name")
    name_b = buf[p : p + nlen]
    p += nlen
    if name_b == b"ima":
        if p + SHA1_LEN + 4 > avail:
            raise Incomplete("ima template data")
        (plen,) = _U32.unpack_from(buf, p + SHA1_LEN)
        if plen >= IMA_NAME_PAD:
            raise ParseError(
                f"legacy ima path length {plen} exceeds {IMA_NAME_PAD - 1}", offset=base + pos, entry=index
            )
        dlen = SHA1_LEN + 4 + plen
    else:
        (dlen,) = _U32.unpack_from(buf, p)
        p += 4
        if dlen > MAX_TEMPLATE_DATA:
            raise ParseError(
                f"template data length {dlen} exceeds the {MAX_TEMPLATE_DATA}-byte limit",
                offset=base + pos,
                entry=index,
            )
    end = p + dlen
    if end > avail:
        raise Incomplete("template data")
    data = buf[p:end]
    name = names.get(name_b)
    if name is None:
        if not all(33 <= c < 127 for c in name_b):
            raise ParseError("template name is not printable ASCII", offset=base + pos, entry=index)
        name = names[name_b] = name_b.decode("ascii")
    hashed = data if name != "ima" else data[:SHA1_LEN] + data[SHA1_LEN + 4 :].ljust(IMA_NAME_PAD, b"\0")
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (hot path: one call per entry).
    return tuple.__new__(ImaEntry, (index, base + pos, end - pos, 0, pcr, th, name, data, hashed)), end


def map_file(stream: BinaryIO) -> mmap.mmap | None:
    """A read-only map of a regular file behind ``stream`` (None for pipes, securityfs, BytesIO, empty
    files): the kernel pages the log in and out, so a 1 GB log is never copied into Python memory."""
    try:
        fd = stream.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_size == 0:
            return None
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None


def iter_binary(stream: BinaryIO, *, start_offset: int = 0, start_index: int = 0) -> Iterator[ImaEntry]:
    """Parse binary records from ``stream`` (positioned at ``start_offset``) until EOF.

    Regular files are memory-mapped; other streams are read in chunks of :data:`CHUNK` bytes. A trailing
    partial record raises ParseError with ``offset`` and ``trailing_bytes`` in its context, after every
    complete record before it has been yielded.
    """
    names: dict[bytes, str] = {}
    index = start_index
    mapped = map_file(stream)
    if mapped is not None:
        with mapped:
            pos, size = start_offset, len(mapped)
            while pos < size:
                try:
                    entry, pos = parse_record(mapped, pos, 0, index, names)
                except Incomplete as inc:
                    raise trailing_error(pos, size - pos, inc.part) from None
                yield entry
                index += 1
        return
    buf = b""
    base = start_offset  # file offset of buf[0]
    pos = 0
    eof = False
    while True:
        try:
            entry, pos = parse_record(buf, pos, base, index, names)
        except Incomplete as inc:
            if eof:
                if pos == len(buf):
                    return
                raise trailing_error(base + pos, len(buf) - pos, inc.part) from None
            more = stream.read(max(CHUNK, len(buf) - pos))
            eof = not more
            buf = buf[pos:] + more
            base += pos
            pos = 0
            continue
        yield entry
        index += 1


def trailing_error(offset: int, size: int, part: str) -> ParseError:
    return ParseError(
        f"log ends inside a record ({size} trailing bytes, incomplete {part})",
        offset=offset,
        trailing_bytes=size,
        hint="a log copied while the kernel was appending, or a truncated file",
    )


# ---------------------------------------------------------------------------------------------- ascii


def _field(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def _dng_from_text(text: str, where: dict[str, Any]) -> bytes:
    alg, sep, hexd = text.partition(":")
    if not sep:
        raise ParseError(f"digest {text[:80]!r} is not 'algo:hex'", **where)
    digest = _unhex(hexd, "digest", where)
    size = DIGEST_SIZES.get(alg)
    if size is not None and len(digest) != size:
        raise ParseError(f"{alg} digest is {len(digest)} bytes, expected {size}", **where)
    return alg.encode("utf-8", "surrogateescape") + b":\0" + digest  # the bytes the line carried


def _unhex(text: str, what: str, where: dict[str, Any]) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ParseError(f"{what} is not hex: {text[:80]!r}", **where) from None


_TAIL_FIELDS = {"ima-ng": 0, "ima-sig": 1, "ima-buf": 1, "ima-modsig": 3}


def entry_from_ascii(line: str, *, index: int, offset: int, lineno: int, size: int = 0) -> ImaEntry:
    """Rebuild the binary template data from one ascii line (so the template hash can be checked)."""
    where: dict[str, Any] = {"entry": index, "line": lineno, "offset": offset}
    head = line.split(" ", 3)
    if len(head) < 4:
        raise ParseError("ascii entry has fewer than 4 fields", **where)
    pcr_s, th_hex, name, rest = head
    if not pcr_s.isdecimal():  # what int() reads (isdigit() also passes superscripts)
        raise ParseError(f"PCR index {pcr_s[:20]!r} is not a number", **where)
    th = _unhex(th_hex, "template hash", where)
    if len(th) != SHA1_LEN:
        raise ParseError(f"template hash is {len(th)} bytes, expected 20", **where)
    if name == "ima":
        dig_hex, sep, path = rest.partition(" ")
        if not sep:
            raise ParseError("legacy ima entry needs a digest and a path", **where)
        digest = _unhex(dig_hex, "digest", where)
        if len(digest) != SHA1_LEN:
            raise ParseError("legacy ima digest must be 20 bytes", **where)
        path_b = path.encode("utf-8", "surrogateescape")
        if len(path_b) >= IMA_NAME_PAD:
            raise ParseError("legacy ima path longer than 255 bytes", **where)
        data = digest + _U32.pack(len(path_b)) + path_b
        hashed = digest + path_b.ljust(IMA_NAME_PAD, b"\0")
        return ImaEntry(index, offset, size, lineno, int(pcr_s), th, name, data, hashed)
    tail_count = _TAIL_FIELDS.get(name)
    if tail_count is None:
        raise ParseError(f"unknown IMA template {name!r} (cannot rebuild its data from ascii)", **where)
    dng_text, sep, after = rest.partition(" ")
    if not sep:
        raise ParseError(f"{name} entry has no path field", **where)
    parts = after.rsplit(" ", tail_count) if tail_count else [after]
    if len(parts) != tail_count + 1:
        raise ParseError(f"{name} entry has {len(parts) - 1} trailing fields, expected {tail_count}", **where)
    data = _field(_dng_from_text(dng_text, where))
    data += _field(parts[0].encode("utf-8", "surrogateescape") + b"\0")
    if name in ("ima-sig", "ima-buf"):
        data += _field(_unhex(parts[1], "sig" if name == "ima-sig" else "buf", where))
    elif name == "ima-modsig":
        data += _field(_unhex(parts[1], "sig", where))
        data += _field(_dng_from_text(parts[2], where) if parts[2] else b"")
        data += _field(_unhex(parts[3], "modsig", where))
    return ImaEntry(index, offset, size, lineno, int(pcr_s), th, name, data, data)


def ascii_entry(raw: bytes, *, index: int, offset: int, lineno: int) -> ImaEntry | None:
    """The entry on one ascii line (``raw`` as read, with its newline if it has one); None for a blank
    line or a ``#`` comment. A malformed line raises ParseError (the general parser names the problem)."""
    text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    if not text.strip() or text.lstrip().startswith("#"):
        return None
    return entry_from_ascii(text, index=index, offset=offset, lineno=lineno, size=len(raw))


# d-ng algorithm as ascii logs print it -> (the binary d-ng field up to the digest, hex digits of the digest).
ASCII_DNG: dict[bytes, tuple[bytes, int]] = {
    alg: (_U32.pack(len(alg) + 2 + size) + alg + b":\0", 2 * size) for alg, size in _ALG_SIZES.items()
}


def iter_ascii(
    stream: BinaryIO,
    *,
    start_offset: int = 0,
    start_index: int = 0,
    on_error: Callable[[ParseError], None] | None = None,
) -> Iterator[ImaEntry]:
    """Parse ascii lines; blank lines and ``#`` comments are skipped. Lines are numbered from the start
    of the stream (line 1 is the line at ``start_offset``). With ``on_error``, a malformed line is
    reported there and skipped (its index is still consumed); without it, the ParseError propagates."""
    offset = start_offset
    index = start_index
    join, pack, unhex, new_entry = b"".join, _U32.pack, binascii.a2b_hex, tuple.__new__
    for lineno, raw in enumerate(stream, 1):
        line_offset = offset
        offset += len(raw)
        # Fast path for the common ima-ng line "10 <th> ima-ng <alg>:<hex> <path>"; anything else (or
        # anything odd about it) takes the general parser, which names the problem.
        parts = raw.rstrip(b"\r\n").split(b" ", 4)
        if len(parts) == 5 and parts[2] == b"ima-ng" and parts[0] == b"10" and len(parts[1]) == 40:
            alg, sep, hexd = parts[3].partition(b":")
            dng = ASCII_DNG.get(alg)
            if sep and dng is not None and len(hexd) == dng[1] and parts[4]:
                try:
                    th, digest = unhex(parts[1]), unhex(hexd)
                except ValueError:  # binascii.Error: not hex
                    pass
                else:
                    path = parts[4]
                    data = join((dng[0], digest, pack(len(path) + 1), path, b"\0"))
                    yield new_entry(
                        ImaEntry, (index, line_offset, len(raw), lineno, 10, th, "ima-ng", data, data)
                    )
                    index += 1
                    continue
        try:
            entry = ascii_entry(raw, index=index, offset=line_offset, lineno=lineno)
        except ParseError as exc:
            if on_error is None:
                raise
            on_error(exc)
            index += 1
            continue
        if entry is not None:
            yield entry
            index += 1


# ----------------------------------------------------------------------------------------- detection


def detect_format(head: bytes) -> str | None:
    """``"binary"`` or ``"ascii"`` from the first bytes of a log, None when there are none yet (an empty
    log is valid in either format); ParseError for anything else."""
    if not head:
        return None
    first = head.split(b"\n", 1)[0]
    if first.startswith(b"#") or (first[:1].isdigit() and b" " in first[:4] and _looks_text(first)):
        return "ascii"
    if len(head) >= 4 and _U32.unpack_from(head)[0] < 64:
        return "binary"
    raise ParseError(
        "not an IMA measurement list (neither binary records nor ascii lines)",
        offset=0,
        first_bytes=head[:16].hex(),
    )


def _looks_text(line: bytes) -> bool:
    return all(32 <= b < 127 or b == 9 for b in line[:200])


def open_log(path: str | Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read IMA log: {exc.strerror}", path=str(path)) from None


def iter_log(
    stream: BinaryIO,
    *,
    fmt: str | None = None,
    start_offset: int = 0,
    start_index: int = 0,
    on_error: Callable[[ParseError], None] | None = None,
) -> Iterator[ImaEntry]:
    """Entries of a binary or ascii log (auto-detected unless ``fmt`` is given), from ``start_offset``
    (the stream must already be positioned there). ``on_error`` applies to ascii logs, where a bad line
    can be skipped; a binary log cannot be resynchronised after a malformed record."""
    if fmt is None:
        fmt = sniff_format(stream) or "binary"
    if fmt == "binary":
        return iter_binary(stream, start_offset=start_offset, start_index=start_index)
    if fmt == "ascii":
        return iter_ascii(stream, start_offset=start_offset, start_index=start_index, on_error=on_error)
    raise InputError(f"unknown IMA log format {fmt!r} (binary or ascii)")


def sniff_format(stream: BinaryIO) -> str | None:
    """Detect the format from the stream's next bytes without consuming them."""
    if not stream.seekable():
        raise InputError("cannot auto-detect the format of a non-seekable stream; name the format")
    here = stream.tell()
    fmt = detect_format(stream.read(64))
    stream.seek(here)
    return fmt


def template_hash_ok(entry: ImaEntry) -> bool:
    return entry.is_violation or hashlib.sha1(entry.hashed).digest() == entry.template_hash  # noqa: S324
