"""Write UEFI/TCG crypto-agile event logs the way firmware, shim and grub do (tests, the demo).

An :class:`EventLogBuilder` writes the ``Spec ID Event03`` header (legacy layout, one digest size per bank)
and then ``TCG_PCR_EVENT2`` records, byte for byte in the format :mod:`tmb.attest.eventlog` parses, and
returns for every event the digests to extend into its PCR, one per bank, so a caller can extend a
(software) TPM's PCRs 0-9 with exactly what the log says, as firmware does (like
:class:`tmb.attest.ima_build.LogBuilder` for IMA and PCR 10). ``builder.pcrs`` tracks the values a TPM
that started at zero holds afterwards.

Digests are what the measuring component hashes: the event data for separators, ``EV_EFI_ACTION`` and
``UEFI_VARIABLE_DATA``; the string after ``grub_cmd:`` / ``kernel_cmdline:`` for grub's commands; the file
for grub's files (PCR 9) and, standing in for the Authenticode hash, the image for EFI applications.
:func:`standard_boot` writes a whole Secure Boot log (CRTM, SecureBoot/PK/KEK/db/dbx, separators, shim,
grub, the kernel, its command line) and :func:`make_certificate` makes the deterministic self-signed
certificates it measures as PK, KEK and db.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from tmb.attest import tpm2
from tmb.attest.eventlog import EV_NO_ACTION, EVENT_TYPE_IDS, NUM_PCRS, SPEC_ID_03, STARTUP_LOCALITY, Event
from tmb.attest.eventlog_events import EFI_GLOBAL_VARIABLE, EFI_IMAGE_SECURITY_DATABASE, SIGNATURE_TYPES

__all__ = [
    "BuiltEvent",
    "EventLogBuilder",
    "make_certificate",
    "signature_list",
    "standard_boot",
]

_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_SIG_GUID = {name: guid for guid, name in SIGNATURE_TYPES.items()}
SHIM_OWNER = "605dab50-e046-4300-abb6-3dd810dd8b23"  # shim's GUID, the owner of the test signatures


@dataclass(frozen=True)
class BuiltEvent:
    """One written event: as the parser reads it back, its bytes, and what to extend into ``event.pcr``
    (bank -> digest; empty for ``EV_NO_ACTION``, which is not extended)."""

    event: Event
    record: bytes
    extends: dict[str, bytes]


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def _utf16(text: str, *, nul: bool = True) -> bytes:
    return (text + ("\0" if nul else "")).encode("utf-16-le")


def _type(etype: int | str) -> int:
    return EVENT_TYPE_IDS[etype] if isinstance(etype, str) else etype


class EventLogBuilder:
    """Append events to a crypto-agile log (an open binary stream, or memory: :meth:`getvalue`)."""

    def __init__(
        self,
        stream: BinaryIO | None = None,
        *,
        banks: Sequence[str] = ("sha1", "sha256"),
        startup_locality: int | None = None,
    ) -> None:
        unknown = [b for b in banks if b not in _SIZES]
        if unknown or not banks or len(set(banks)) != len(banks):
            raise ValueError(f"banks must be distinct names of {', '.join(_SIZES)}, got {list(banks)}")
        self.stream: BinaryIO = stream if stream is not None else io.BytesIO()
        self.banks = tuple(banks)
        self.offset = 0
        self.events: list[BuiltEvent] = []
        self.pcrs: dict[str, dict[int, bytes]] = {
            b: {i: (b"\xff" if 17 <= i <= 22 else b"\0") * _SIZES[b] for i in range(NUM_PCRS)} for b in banks
        }
        self._header()
        if startup_locality is not None:
            self.add(0, EV_NO_ACTION, STARTUP_LOCALITY + bytes([startup_locality]))
            for b in self.banks:
                self.pcrs[b][0] = bytes(_SIZES[b] - 1) + bytes([startup_locality])

    def getvalue(self) -> bytes:
        """The log written so far (only for a builder writing to memory)."""
        if not isinstance(self.stream, io.BytesIO):
            raise TypeError("getvalue() needs a builder that writes to memory")
        return self.stream.getvalue()

    def _write(self, record: bytes) -> None:
        self.stream.write(record)
        self.stream.flush()
        self.offset += len(record)

    def _header(self) -> None:
        algs = [(tpm2.hash_id(b), _SIZES[b]) for b in self.banks]
        data = SPEC_ID_03 + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))  # class 0, spec 2.0 errata 0
        data += b"".join(struct.pack("<HH", alg, size) for alg, size in algs) + b"\0"  # no vendor info
        record = struct.pack("<II20sI", 0, EV_NO_ACTION, bytes(20), len(data)) + data
        event = Event(0, 0, len(record), 0, EV_NO_ACTION, {"sha1": bytes(20)}, data)
        self.events.append(BuiltEvent(event, record, {}))
        self._write(record)

    # ------------------------------------------------------------------------------------------ core

    def add(
        self,
        pcr: int,
        etype: int | str,
        data: bytes,
        *,
        measured: bytes | None = None,
        digests: Mapping[str, bytes] | None = None,
    ) -> BuiltEvent:
        """Append one event. Its digests are ``digests`` when given, else each bank's hash of ``measured``
        (default: ``data``); ``EV_NO_ACTION`` events carry zero digests and are not extended."""
        code = _type(etype)
        if code == EV_NO_ACTION:
            values = {b: bytes(_SIZES[b]) for b in self.banks}
        elif digests is not None:
            values = {b: bytes(digests[b]) for b in self.banks}
        else:
            payload = data if measured is None else measured
            values = {b: hashlib.new(b, payload).digest() for b in self.banks}
        for b, d in values.items():
            if len(d) != _SIZES[b]:
                raise ValueError(f"a {b} digest has {_SIZES[b]} bytes, got {len(d)}")
        record = struct.pack("<III", pcr, code, len(values))
        record += b"".join(struct.pack("<H", tpm2.hash_id(b)) + d for b, d in values.items())
        record += struct.pack("<I", len(data)) + data
        event = Event(len(self.events), self.offset, len(record), pcr, code, values, data)
        extends = {} if code == EV_NO_ACTION else dict(values)
        for b, d in extends.items():
            self.pcrs[b][pcr] = hashlib.new(b, self.pcrs[b][pcr] + d).digest()
        built = BuiltEvent(event, record, extends)
        self.events.append(built)
        self._write(record)
        return built

    def extend_into(self, extend: Callable[[int, dict[str, bytes]], None]) -> None:
        """Call ``extend(pcr, {bank: digest})`` for every measured event written so far, in log order
        (e.g. ``TpmClient.pcr_extend``): the TPM then holds :attr:`pcrs`."""
        for built in self.events:
            if built.extends:
                extend(built.event.pcr, built.extends)

    # ------------------------------------------------------------------------------------------ firmware

    def crtm_version(self, version: str = "tmb test firmware 1.0") -> BuiltEvent:
        """``EV_S_CRTM_VERSION`` (PCR 0): the firmware version, UTF-16 with its NUL, as edk2 measures it."""
        return self.add(0, "EV_S_CRTM_VERSION", _utf16(version))

    def firmware_blob(self, base: int, content: bytes, pcr: int = 0) -> BuiltEvent:
        """``EV_EFI_PLATFORM_FIRMWARE_BLOB``: a firmware volume's base and length, the digest of its bytes."""
        return self.add(
            pcr, "EV_EFI_PLATFORM_FIRMWARE_BLOB", struct.pack("<QQ", base, len(content)), measured=content
        )

    def variable(
        self,
        name: str,
        value: bytes,
        *,
        guid: str = EFI_GLOBAL_VARIABLE,
        pcr: int = 7,
        etype: int | str = "EV_EFI_VARIABLE_DRIVER_CONFIG",
    ) -> BuiltEvent:
        """A ``UEFI_VARIABLE_DATA`` event (name without its NUL, as edk2 writes it); the digest is of the
        whole structure."""
        data = _guid(guid) + struct.pack("<QQ", len(name), len(value)) + _utf16(name, nul=False) + value
        return self.add(pcr, etype, data)

    def secure_boot(self, enabled: bool = True) -> BuiltEvent:
        return self.variable("SecureBoot", b"\x01" if enabled else b"\x00")

    def signature_db(self, name: str, lists: bytes) -> BuiltEvent:
        """``PK``/``KEK`` (EFI global variable) or ``db``/``dbx`` (image security database) into PCR 7."""
        guid = EFI_GLOBAL_VARIABLE if name in ("PK", "KEK") else EFI_IMAGE_SECURITY_DATABASE
        return self.variable(name, lists, guid=guid)

    def separator(self, pcr: int, value: int = 0) -> BuiltEvent:
        return self.add(pcr, "EV_SEPARATOR", struct.pack("<I", value))

    def action(self, pcr: int, text: str) -> BuiltEvent:
        """``EV_EFI_ACTION``: an ASCII string without NUL (``Exit Boot Services Invocation``, ...)."""
        return self.add(pcr, "EV_EFI_ACTION", text.encode("ascii"))

    def boot_application(
        self,
        path: str | None,
        image: bytes,
        *,
        pcr: int = 4,
        digests: Mapping[str, bytes] | None = None,
        location: int = 0x7D000000,
    ) -> BuiltEvent:
        """``EV_EFI_BOOT_SERVICES_APPLICATION``: a ``UEFI_IMAGE_LOAD_EVENT`` whose device path is the file
        path (``\\EFI\\debian\\shimx64.efi``), or empty (an image loaded from memory, as shim loads the
        kernel). The digest stands in for the Authenticode hash: the image's hash unless ``digests``."""
        dp = b""
        if path is not None:
            body = _utf16(path)
            dp = struct.pack("<BBH", 4, 4, 4 + len(body)) + body + struct.pack("<BBH", 0x7F, 0xFF, 4)
        data = struct.pack("<QQQQ", location, len(image), 0, len(dp)) + dp
        return self.add(pcr, "EV_EFI_BOOT_SERVICES_APPLICATION", data, measured=image, digests=digests)

    # ------------------------------------------------------------------------------------------ grub

    def grub_command(self, command: str) -> BuiltEvent:
        """grub's ``grub_cmd: ...`` (PCR 8): the digest of the command; data: the prefixed string + NUL."""
        return self.add(8, "EV_IPL", b"grub_cmd: " + command.encode() + b"\0", measured=command.encode())

    def kernel_cmdline(self, cmdline: str) -> BuiltEvent:
        """grub's ``kernel_cmdline: ...`` (PCR 8), as for :meth:`grub_command`."""
        return self.add(
            8, "EV_IPL", b"kernel_cmdline: " + cmdline.encode() + b"\0", measured=cmdline.encode()
        )

    def grub_file(self, path: str, content: bytes) -> BuiltEvent:
        """A file grub read (kernel, initrd, grub.cfg) into PCR 9: its name + NUL, the digest of its bytes."""
        return self.add(9, "EV_IPL", path.encode() + b"\0", measured=content)


# ---------------------------------------------------------------------------------------------- helpers


def signature_list(kind: str, entries: Iterable[bytes], owner: str = SHIM_OWNER) -> bytes:
    """One ``EFI_SIGNATURE_LIST`` of ``kind`` (``x509``: DER certificates, one list each as firmware keeps
    them; ``sha256``: 32-byte hashes in one list)."""
    entries = list(entries)
    sig_type = _guid(_SIG_GUID[kind])
    if kind == "x509":
        return b"".join(
            sig_type + struct.pack("<III", 28 + 16 + len(der), 0, 16 + len(der)) + _guid(owner) + der
            for der in entries
        )
    size = 16 + len(entries[0]) if entries else 16 + 32
    if any(16 + len(e) != size for e in entries):
        raise ValueError("the entries of one signature list have one size")
    body = b"".join(_guid(owner) + e for e in entries)
    return sig_type + struct.pack("<III", 28 + len(body), 0, size) + body


def make_certificate(common_name: str) -> bytes:
    """A self-signed Ed25519 certificate (DER) for ``common_name``, the same bytes on every call (key from
    the name, fixed serial and dates; Ed25519 signatures are deterministic)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(common_name.encode()).digest())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(b"serial" + common_name.encode()).digest()[:8], "big"))
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def standard_boot(
    builder: EventLogBuilder,
    *,
    secure_boot: bool = True,
    cmdline: str = "root=/dev/vda1 ro ima_policy=tcb ima_hash=sha256",
    kernel: bytes = b"tmb test kernel image (vmlinuz)",
    kernel_path: str = "/boot/vmlinuz-6.1.0-tmb",
    initrd: bytes = b"tmb test initrd",
    shim: bytes = b"tmb test shim image",
    grub: bytes = b"tmb test grub image",
    firmware: str = "tmb test firmware 1.0",
) -> EventLogBuilder:
    """A Secure Boot UEFI boot through shim and grub, in the order real firmware logs it: CRTM version and
    firmware volume (PCR 0); SecureBoot, PK, KEK, db, dbx (PCR 7) and its separator; the boot attempt
    (PCR 4) and separators 0-6; shim and grub (PCR 4); grub's commands and the kernel command line (PCR 8),
    the kernel and initrd files (PCR 9) and the kernel image (PCR 4); ExitBootServices (PCR 5)."""
    b = builder
    b.crtm_version(firmware)
    b.firmware_blob(0x820000, b"tmb test firmware volume")
    b.secure_boot(secure_boot)
    b.signature_db("PK", signature_list("x509", [make_certificate("tmb test PK")]))
    b.signature_db("KEK", signature_list("x509", [make_certificate("tmb test KEK")]))
    b.signature_db("db", signature_list("x509", [make_certificate("tmb test db")]))
    b.signature_db("dbx", signature_list("sha256", [hashlib.sha256(b"revoked shim").digest()]))
    b.separator(7)
    b.action(4, "Calling EFI Application from Boot Option")
    for pcr in range(7):
        b.separator(pcr)
    b.boot_application("\\EFI\\debian\\shimx64.efi", shim)
    b.boot_application("\\EFI\\debian\\grubx64.efi", grub)
    b.grub_command("set root=(hd0,gpt2)")
    b.grub_command(f"linux {kernel_path} {cmdline}")
    b.grub_file(kernel_path, kernel)
    b.boot_application(None, kernel)
    b.kernel_cmdline(f"{kernel_path} {cmdline}")
    initrd_path = kernel_path.replace("vmlinuz", "initrd.img")
    b.grub_command(f"initrd {initrd_path}")
    b.grub_file(initrd_path, initrd)
    b.action(5, "Exit Boot Services Invocation")
    b.action(5, "Exit Boot Services Returned with Success")
    return b
