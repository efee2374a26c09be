"""Write IMA measurement lists the way the kernel does (tests, the demo, benchmarks).

A :class:`LogBuilder` appends entries to a binary and/or ascii log and returns, for each entry, what the
kernel extends into each PCR bank, so a caller can extend a (software) TPM's PCR 10 with exactly those
values. The records it writes are byte-for-byte what ``binary_runtime_measurements`` and
``ascii_runtime_measurements`` contain for the same measurements.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from tmb.attest.ima import IMA_NAME_PAD, ImaEntry
from tmb.attest.pcr import BANK_SIZES, render_ascii

_U32 = struct.Struct("<I")


def _field(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def dng(alg: str, digest: bytes) -> bytes:
    return alg.encode("ascii") + b":\0" + digest


@dataclass(frozen=True)
class Built:
    """One written entry: the parsed form and the per-bank digests the kernel extends."""

    entry: ImaEntry
    record: bytes
    extends: dict[str, bytes]


def build_entry(
    template: str,
    name: str,
    *,
    digest: bytes,
    alg: str = "sha256",
    sig: bytes = b"",
    buf: bytes = b"",
    pcr: int = 10,
    violation: bool = False,
    index: int = 0,
    offset: int = 0,
    sha256_mode: str = "per-bank",
) -> Built:
    """Build one record. ``digest`` is the file (or buffer) digest in ``alg``."""
    name_b = name.encode("utf-8", "surrogateescape")
    if template == "ima":
        if len(digest) != 20:
            raise ValueError("the legacy ima template carries a 20-byte SHA-1 digest")
        data = digest + _U32.pack(len(name_b)) + name_b
        hashed = digest + name_b.ljust(IMA_NAME_PAD, b"\0")
    else:
        data = _field(dng(alg, digest)) + _field(name_b + b"\0")
        if template == "ima-sig":
            data += _field(sig)
        elif template == "ima-buf":
            data += _field(buf)
        elif template == "ima-modsig":
            data += _field(sig) + _field(b"") + _field(b"")
        elif template != "ima-ng":
            raise ValueError(f"unsupported template {template!r}")
        hashed = data
    th = bytes(20) if violation else hashlib.sha1(hashed).digest()  # noqa: S324 (the IMA template hash is SHA-1 by format)
    tname = template.encode("ascii")
    record = struct.pack("<I20sI", pcr, th, len(tname)) + tname
    if template != "ima":
        record += _U32.pack(len(data))
    record += data
    extends: dict[str, bytes] = {}
    for bank, size in BANK_SIZES.items():
        if violation:
            extends[bank] = b"\xff" * (size if sha256_mode == "per-bank" or bank == "sha1" else 20)
            extends[bank] = extends[bank].ljust(size, b"\0")
        elif bank == "sha1":
            extends[bank] = th
        elif sha256_mode == "per-bank":
            extends[bank] = hashlib.new(bank, hashed).digest()
        else:
            extends[bank] = th.ljust(size, b"\0")
    entry = ImaEntry(index, offset, len(record), 0, pcr, th, template, data, hashed)
    return Built(entry, record, extends)


class LogBuilder:
    """Append entries to an open binary log (and optionally an ascii twin), tracking PCR values."""

    def __init__(
        self,
        binary: BinaryIO | None = None,
        ascii_log: BinaryIO | None = None,
        *,
        sha256_mode: str = "per-bank",
    ) -> None:
        self.binary = binary
        self.ascii = ascii_log
        self.sha256_mode = sha256_mode
        self.index = 0
        self.offset = 0
        self.pcrs: dict[str, bytes] = {bank: bytes(size) for bank, size in BANK_SIZES.items()}

    def add(self, template: str, name: str, **kwargs: object) -> Built:
        built = build_entry(
            template,
            name,
            index=self.index,
            offset=self.offset,
            sha256_mode=self.sha256_mode,
            **kwargs,  # type: ignore[arg-type]
        )
        if self.binary is not None:
            self.binary.write(built.record)
            self.binary.flush()
        if self.ascii is not None:
            self.ascii.write(render_ascii(built.entry).encode("utf-8", "surrogateescape") + b"\n")
            self.ascii.flush()
        for bank, d in built.extends.items():
            self.pcrs[bank] = hashlib.new(bank, self.pcrs[bank] + d).digest()
        self.index += 1
        self.offset += len(built.record)
        return built

    def file(self, path: str, content: bytes, *, template: str = "ima-ng", alg: str = "sha256") -> Built:
        """Measure a file with the given content, as the kernel would on exec/mmap."""
        return self.add(template, path, digest=hashlib.new(alg, content).digest(), alg=alg)

    def buffer(self, name: str, payload: bytes, *, alg: str = "sha256") -> Built:
        """An ima-buf event (critical data such as ``dm_table_load``)."""
        return self.add("ima-buf", name, digest=hashlib.new(alg, payload).digest(), alg=alg, buf=payload)

    def mount_verity(
        self, name: str, *, root_digest: str, salt: str, data_blocks: int, **table: Any
    ) -> tuple[Built, Built]:
        """What the kernel measures when a dm-verity device is set up: the ``dm_table_load`` of a single
        verity target and the ``dm_device_resume`` that activates exactly that table. ``table`` passes
        ``algorithm``, ``uuid``, ``minor``, ``data_device``, ``hash_device`` to the load payload."""
        load = dm_table_load_verity(
            name, root_digest=root_digest, salt=salt, data_blocks=data_blocks, **table
        )
        loaded = self.buffer("dm_table_load", load)
        digest = "sha256:" + hashlib.sha256(load).hexdigest()
        resume = dm_device_resume(
            name,
            table_digest=digest,
            capacity=data_blocks * 8,
            uuid=table.get("uuid", ""),
            minor=table.get("minor", 0),
        )
        return loaded, self.buffer("dm_device_resume", resume)


# ----------------------------------------------------------------------- device-mapper payloads (dm-ima)


def _dm_device(name: str, uuid: str, minor: int) -> str:
    return f"dm_version=4.45.0;name={name},uuid={uuid},major=253,minor={minor},minor_count=1,num_targets=1;"


def dm_table_load_verity(
    name: str,
    *,
    root_digest: str,
    salt: str,
    data_blocks: int,
    algorithm: str = "sha256",
    uuid: str = "",
    minor: int = 0,
    data_device: str = "7:1",
    hash_device: str = "7:0",
) -> bytes:
    """The ``dm_table_load`` payload the kernel measures for a single-target verity table."""
    target = (
        f"target_index=0,target_begin=0,target_len={data_blocks * 8},target_name=verity,"
        f"target_version=1.9.0,hash_failed=V,verity_version=1,data_device_name={data_device},"
        f"hash_device_name={hash_device},verity_algorithm={algorithm},root_digest={root_digest},"
        f"salt={salt or '-'},ignore_zero_blocks=n,check_at_most_once=n;"
    )
    return (_dm_device(name, uuid, minor) + target).encode("ascii")


def dm_device_resume(name: str, *, table_digest: str, capacity: int, uuid: str = "", minor: int = 0) -> bytes:
    """``dm_device_resume``: ``table_digest`` is ``alg:hex`` of the activated table load event."""
    return (
        _dm_device(name, uuid, minor)
        + f"active_table_hash={table_digest};current_device_capacity={capacity};"
    ).encode("ascii")


def dm_device_remove(name: str, *, table_digest: str, capacity: int, uuid: str = "", minor: int = 0) -> bytes:
    meta = _dm_device(name, uuid, minor).replace(";name=", ";device_active_metadata=name=", 1)
    return (
        meta + f"active_table_hash={table_digest},remove_all=n;current_device_capacity={capacity};"
    ).encode("ascii")


def dm_table_clear(name: str, *, capacity: int, uuid: str = "") -> bytes:
    text = (
        f"dm_version=4.45.0;name={name},uuid={uuid};table_clear=no_data;current_device_capacity={capacity};"
    )
    return text.encode("ascii")
