"""Incremental reader of the kernel's binary IMA measurement list.

``ImaReader(path).read()`` returns ``(start_offset, data)``: the whole records appended since the last
read (``data`` may be empty). A record the kernel is still appending is left for the next read. The
production path is ``/sys/kernel/security/ima/binary_runtime_measurements`` (a seq_file: the reader seeks
to its offset, and falls back to reading and discarding where seeking is refused); tests point it at a
file written by :class:`tmb.attest.ima_build.LogBuilder`.

``check_offset(offset)`` says whether an offset the daemon sent lies on a record boundary of the local log
(the probe refuses any other: a negative one, one beyond the log, one inside a record).
"""

from __future__ import annotations

import io
from pathlib import Path

from tmb.attest.ima import Incomplete, parse_record
from tmb.errors import InputError, ParseError

__all__ = ["ImaReader"]

CHUNK = 1 << 20


class ImaReader:
    """Reads whole binary records from ``path`` starting at ``offset`` (the next byte not yet sent)."""

    def __init__(self, path: str | Path, offset: int = 0, index: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self.index = index  # entries before ``offset`` (informational)

    def rewind(self, offset: int) -> None:
        """Start the next read at ``offset`` (the daemon said it expects the log from there)."""
        self.offset = offset
        self.index = 0

    def _read_from(self, offset: int) -> bytes:
        try:
            with open(self.path, "rb", buffering=0) as fh:
                try:
                    fh.seek(offset)
                except (OSError, io.UnsupportedOperation):
                    skip = offset
                    while skip:
                        got = fh.read(min(CHUNK, skip))
                        if not got:
                            return b""
                        skip -= len(got)
                parts = []
                while True:
                    got = fh.read(CHUNK)
                    if not got:
                        break
                    parts.append(got)
                return b"".join(parts)
        except OSError as exc:
            raise InputError(
                f"cannot read the IMA log: {exc.strerror}",
                path=str(self.path),
                hint="the probe needs read access to securityfs (root or CAP_SYS_ADMIN)",
            ) from None

    def check_offset(self, offset: int) -> tuple[str | None, int]:
        """``(problem, boundary)``: problem is None when ``offset`` is the start of a record or the end of the
        last whole one, else ``"negative"``, ``"beyond_log"`` (boundary: the log's whole-record length) or
        ``"inside_record"`` (boundary: the end of the record holding ``offset``)."""
        if offset < 0:
            return "negative", 0
        buf = self._read_from(0)
        pos, index, names = 0, 0, {}  # type: int, int, dict[bytes, str]
        while pos < offset:
            try:
                _, pos = parse_record(buf, pos, 0, index, names)
            except Incomplete:
                return "beyond_log", pos
            except ParseError as exc:
                raise InputError(f"the IMA log is malformed: {exc.message}", **exc.context) from None
            index += 1
        return (None if pos == offset else "inside_record"), pos

    def read(self) -> tuple[int, bytes]:
        """``(start offset, whole records after it)``; advances the offset past them."""
        start = self.offset
        buf = self._read_from(start)
        pos, names = 0, {}  # type: int, dict[bytes, str]
        while pos < len(buf):
            try:
                _, pos = parse_record(buf, pos, start, self.index, names)
            except Incomplete:
                break
            except ParseError as exc:
                raise InputError(f"the IMA log is malformed: {exc.message}", **exc.context) from None
            self.index += 1
        self.offset = start + pos
        return start, buf[:pos]
