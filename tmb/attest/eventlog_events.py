"""Event data of a UEFI/TCG event log: decoders, data-to-digest checks and the boot summary.

Layouts (UEFI spec, TCG PC Client PFP, little-endian): ``UEFI_VARIABLE_DATA`` (GUID, name length u64 in
characters, data length u64, UTF-16 name, data) with PK/KEK/db/dbx as ``EFI_SIGNATURE_LIST`` sequences (type
GUID, list size u32, header size u32, signature size u32, header, {owner GUID, data}...);
``UEFI_IMAGE_LOAD_EVENT`` (location, length, link-time address, device path length: u64 each; device path);
``UEFI_GPT_DATA`` (92-byte header, u64 partition count, entries); separators, grub and systemd-boot strings.
The digest, not the data, is what a PCR binds: :func:`summarize` reads only events whose data hash to their
digests where the specification (or grub) says they must. The table of what is decoded is in docs/boot.md.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tmb.attest.eventlog import EV_NO_ACTION, EV_SEPARATOR, EVENT_TYPE_IDS, STARTUP_LOCALITY, Event, bank_hash
from tmb.errors import ParseError, Report, Severity

__all__ = [
    "BootApp",
    "BootSummary",
    "ImageLoad",
    "Signature",
    "VariableData",
    "check_event_data",
    "decode_event",
    "parse_gpt",
    "parse_image_load",
    "parse_signature_lists",
    "parse_variable",
    "summarize",
]

EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
SIGNATURE_TYPES = {
    "a5c059a1-94e4-4aa7-87b5-ab155c2bf072": "x509",
    "c1c41626-504c-4092-aca9-41f936934328": "sha256",
    "826ca512-cf10-4ac9-b187-be01496631bd": "sha1",
    "3c5766e8-269c-4e34-aa14-ed776e85b3b6": "rsa2048",
    "3bd2a492-96c0-4079-b420-fcf98ef103ed": "x509_sha256",
    "ff3e5307-9fd0-48c9-85f1-8ad56c701e01": "sha384",
    "093e0fae-a6c4-4f50-9f1b-d41e2b89c19a": "sha512",
}
_SECURE_BOOT_KEYS = {"PK": EFI_GLOBAL_VARIABLE, "KEK": EFI_GLOBAL_VARIABLE}
_SECURE_BOOT_KEYS |= {"db": EFI_IMAGE_SECURITY_DATABASE, "dbx": EFI_IMAGE_SECURITY_DATABASE}
_T = EVENT_TYPE_IDS
_VARIABLE_TYPES = {_T[n] for n in ("EV_EFI_VARIABLE_DRIVER_CONFIG", "EV_EFI_VARIABLE_BOOT")}
_VARIABLE_TYPES |= {_T["EV_EFI_VARIABLE_AUTHORITY"], _T["EV_EFI_VARIABLE_BOOT2"]}
_IMAGE_TYPES = {_T[n] for n in ("EV_EFI_BOOT_SERVICES_APPLICATION", "EV_EFI_BOOT_SERVICES_DRIVER")}
_IMAGE_TYPES.add(_T["EV_EFI_RUNTIME_SERVICES_DRIVER"])
_TEXT_TYPES = {
    _T[n] for n in ("EV_IPL", "EV_EFI_ACTION", "EV_POST_CODE", "EV_S_CRTM_VERSION", "EV_EFI_HCRTM_EVENT")
}
_GRUB_PREFIXES = (b"grub_cmd: ", b"kernel_cmdline: ")
_GPT_HEADER = 92
_DEFAULT_LOADERS = {f"boot{arch}.efi" for arch in ("x64", "ia32", "aa64", "arm", "riscv64", "loongarch64")}


def guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=bytes(raw)))


def _bad(event: Event, message: str) -> ParseError:
    return ParseError(f"{event.type_name} data: {message}", **event.where())


def text_of(data: bytes) -> str:
    """A string event's text: UTF-16LE when it looks like it (systemd-boot, EV_S_CRTM_VERSION), else UTF-8;
    NULs at the end dropped, undecodable bytes replaced."""
    if len(data) >= 2 and data[0] and not data[1]:
        data = data[: len(data) & ~1]
        return data.decode("utf-16-le", "replace").rstrip("\0")
    return data.decode("utf-8", "replace").rstrip("\0")


# ----------------------------------------------------------------------------------------- variables


@dataclass(frozen=True)
class VariableData:
    guid: str
    name: str
    data: bytes
    struct_size: int  # bytes of UEFI_VARIABLE_DATA; event data beyond it are trailing bytes


def parse_variable(event: Event) -> VariableData:
    raw = event.data
    if len(raw) < 32:
        raise _bad(event, f"UEFI_VARIABLE_DATA needs 32 bytes, has {len(raw)}")
    name_len, data_len = struct.unpack_from("<QQ", raw, 16)
    end = 32 + 2 * name_len + data_len
    if name_len > len(raw) or end > len(raw):
        raise _bad(event, f"name ({name_len} chars) and data ({data_len} bytes) run past the event")
    name = raw[32 : 32 + 2 * name_len].decode("utf-16-le", "replace").rstrip("\0")
    return VariableData(guid(raw[:16]), name, raw[32 + 2 * name_len : end], end)


@dataclass(frozen=True)
class Signature:
    """One EFI_SIGNATURE_DATA: ``kind`` (x509, sha256, ...), the owner GUID, the data; for a certificate its
    subject, issuer and SHA-256 fingerprint (``sha256``); for a hash, the hash (hex) in ``sha256``."""

    kind: str
    owner: str
    data: bytes
    subject: str | None = None
    issuer: str | None = None
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "owner": self.owner, "sha256": self.sha256}
        if self.subject is not None:
            out |= {"subject": self.subject, "issuer": self.issuer}
        return out


def _certificate(kind: str, owner: str, der: bytes) -> Signature:
    from cryptography import x509

    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. negative serial numbers in old firmware certificates
            cert = x509.load_der_x509_certificate(der)
            subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
    except ValueError:
        subject = issuer = "(not a parsable X.509 certificate)"
    return Signature(kind, owner, der, subject, issuer, fingerprint)


def _signature(kind: str, owner: str, data: bytes) -> Signature:
    if kind == "x509":
        return _certificate(kind, owner, data)
    return Signature(kind, owner, data, sha256=data.hex() if kind == "sha256" else "")


def parse_signature_lists(data: bytes, event: Event) -> list[Signature]:
    """Every signature of a sequence of EFI_SIGNATURE_LISTs (PK, KEK, db, dbx, MokList contents)."""
    out: list[Signature] = []
    pos = 0
    while pos < len(data):
        if pos + 28 > len(data):
            raise _bad(event, f"signature list at {pos} shorter than its 28-byte header")
        list_size, header_size, sig_size = struct.unpack_from("<III", data, pos + 16)
        kind = SIGNATURE_TYPES.get(guid(data[pos : pos + 16]), guid(data[pos : pos + 16]))
        body = 28 + header_size
        if list_size < body or pos + list_size > len(data) or sig_size < 16:
            raise _bad(event, f"signature list at {pos}: size {list_size} / signature size {sig_size}")
        if (list_size - body) % sig_size:
            raise _bad(event, f"signature list at {pos} is not a whole number of {sig_size}-byte entries")
        for p in range(pos + body, pos + list_size, sig_size):
            out.append(_signature(kind, guid(data[p : p + 16]), data[p + 16 : p + sig_size]))
        pos += list_size
    return out


def _authority(var: VariableData) -> Signature:
    """An authority event's data: EFI_SIGNATURE_DATA (owner + certificate) or a bare DER certificate."""
    if var.data[:1] == b"\x30":
        return _certificate("x509", "", var.data)
    if len(var.data) > 16 and var.data[16:17] == b"\x30":
        return _certificate("x509", guid(var.data[:16]), var.data[16:])
    return Signature("unknown", "", var.data, sha256=hashlib.sha256(var.data).hexdigest())


# --------------------------------------------------------------------------------- images and paths


@dataclass(frozen=True)
class ImageLoad:
    location: int
    length: int
    link_time_address: int
    device_path: bytes
    path: str | None  # the media file path nodes' text, if any
    device_path_text: str


def _node(ntype: int, sub: int, body: bytes) -> tuple[str, str | None]:
    """(text of one device path node, its file path text if a media file path node)."""
    if (ntype, sub) == (4, 4):
        text = body.decode("utf-16-le", "replace").rstrip("\0")
        return text, text
    if (ntype, sub) == (4, 1) and len(body) >= 38:
        number, _, _ = struct.unpack_from("<IQQ", body)
        if body[37] == 2:
            return f"HD({number},GPT,{guid(body[20:36])})", None
        return f"HD({number},MBR,0x{int.from_bytes(body[20:24], 'little'):08x})", None
    if (ntype, sub) == (1, 1) and len(body) >= 2:
        return f"Pci(0x{body[1]:x},0x{body[0]:x})", None
    if (ntype, sub) == (2, 1) and len(body) >= 8:
        hid, uid = struct.unpack_from("<II", body)
        return (f"PciRoot(0x{uid:x})" if hid == 0x0A0341D0 else f"Acpi(0x{hid:08x},0x{uid:x})"), None
    if (ntype, sub) == (3, 2) and len(body) >= 4:
        return "Scsi({},{})".format(*struct.unpack_from("<HH", body)), None
    vendor = {(4, 6): "FvFile", (4, 7): "Fv", (4, 3): "VenMedia", (1, 4): "VenHw", (3, 10): "VenMsg"}
    if (ntype, sub) in vendor and len(body) >= 16:
        return f"{vendor[ntype, sub]}({guid(body[:16])})", None
    return f"Path({ntype},{sub},{body.hex()})", None


def device_path(raw: bytes) -> tuple[str, str | None]:
    """UEFI text-like rendering of a device path and the file path it names (None without one)."""
    parts: list[str] = []
    files: list[str] = []
    pos = 0
    while pos + 4 <= len(raw):
        ntype, sub, length = struct.unpack_from("<BBH", raw, pos)
        if length < 4 or pos + length > len(raw):
            parts.append(f"<bad node at {pos}>")
            break
        if ntype == 0x7F:
            if sub == 0xFF:
                break
            parts.append(",")
        else:
            text, file = _node(ntype, sub, raw[pos + 4 : pos + length])
            parts.append(text)
            if file is not None:
                files.append(file)
        pos += length
    joined = "\\".join(f.strip("\\") for f in files if f.strip("\\"))
    return "/".join(parts).replace("/,/", ","), (("\\" + joined) if files else None)


def parse_image_load(event: Event) -> ImageLoad:
    raw = event.data
    if len(raw) < 32:
        raise _bad(event, f"UEFI_IMAGE_LOAD_EVENT needs 32 bytes, has {len(raw)}")
    location, length, link, dp_len = struct.unpack_from("<QQQQ", raw)
    if 32 + dp_len > len(raw):
        raise _bad(event, f"device path length {dp_len} runs past the event")
    dp = raw[32 : 32 + dp_len]
    text, path = device_path(dp)
    return ImageLoad(location, length, link, dp, path, text)


def parse_gpt(event: Event) -> dict[str, Any]:
    raw = event.data
    if len(raw) < _GPT_HEADER + 8 or raw[:8] != b"EFI PART":
        raise _bad(event, "not a GPT header ('EFI PART' and 92 bytes) followed by a partition count")
    entry_size = struct.unpack_from("<I", raw, 84)[0]
    (count,) = struct.unpack_from("<Q", raw, _GPT_HEADER)
    if entry_size < 128 or count * entry_size != len(raw) - _GPT_HEADER - 8:
        raise _bad(event, f"{count} partitions of {entry_size} bytes do not fill the event")
    names = [
        raw[p + 56 : p + 128].decode("utf-16-le", "replace").split("\0")[0]
        for p in range(_GPT_HEADER + 8, len(raw), entry_size)
    ]
    return {"disk_guid": guid(raw[56:72]), "partitions": count, "names": names}


# ------------------------------------------------------------------------------------------- decode


def decode_event(event: Event) -> dict[str, Any]:
    """A JSON-able view of what an event's data says; ParseError when a decoded type is malformed."""
    t, data = event.type, event.data
    if t in _VARIABLE_TYPES:
        var = parse_variable(event)
        out: dict[str, Any] = {"guid": var.guid, "name": var.name, "data_size": len(var.data)}
        if var.struct_size != len(data):
            out["trailing_bytes"] = len(data) - var.struct_size
        if var.name in ("SecureBoot", "SetupMode", "AuditMode", "DeployedMode") and len(var.data) == 1:
            out["value"] = var.data[0]
        elif t == _T["EV_EFI_VARIABLE_AUTHORITY"]:
            out["signature"] = _authority(var).to_dict()
        elif var.name in ("PK", "KEK", "db", "dbx", "dbt", "dbr") or var.name.startswith("MokList"):
            out["signatures"] = [s.to_dict() for s in parse_signature_lists(var.data, event)]
        elif len(var.name) == 8 and var.name.startswith("Boot") and var.name != "BootNext":
            out |= _boot_option(var.data)
        return out
    if t in _IMAGE_TYPES:
        img = parse_image_load(event)
        out = {"location": img.location, "length": img.length, "device_path": img.device_path_text}
        if img.path is not None:
            out["path"] = img.path
        if 32 + len(img.device_path) != len(data):
            out["trailing_bytes"] = len(data) - 32 - len(img.device_path)
        return out
    if t == _T["EV_EFI_GPT_EVENT"]:
        return parse_gpt(event)
    if t == EV_SEPARATOR:
        return {"value": int.from_bytes(data, "little")} if len(data) == 4 else {"data": data.hex()}
    if t in (_T["EV_POST_CODE"], _T["EV_EFI_PLATFORM_FIRMWARE_BLOB"]) and len(data) == 16:
        base, length = struct.unpack("<QQ", data)
        return {"blob_base": base, "blob_length": length}
    if t == _T["EV_EFI_PLATFORM_FIRMWARE_BLOB2"] and data and len(data) == 1 + data[0] + 16:
        base, length = struct.unpack_from("<QQ", data, 1 + data[0])
        return {"description": text_of(data[1 : 1 + data[0]]), "blob_base": base, "blob_length": length}
    if t == EV_NO_ACTION:
        sig = data[:16].split(b"\0")[0].decode("ascii", "replace")
        out = {"signature": sig}
        if data.startswith(STARTUP_LOCALITY) and len(data) >= 17:
            out["locality"] = data[16]
        return out
    if t in _TEXT_TYPES:
        return {"text": text_of(data)}
    return {"data": data[:64].hex() + ("..." if len(data) > 64 else ""), "data_size": len(data)}


def _boot_option(raw: bytes) -> dict[str, Any]:
    """Boot#### (EFI_LOAD_OPTION): attributes u32, path list length u16, UTF-16 description, device path."""
    if len(raw) < 6:
        return {}
    end = next((i for i in range(6, len(raw) - 1, 2) if raw[i : i + 2] == b"\0\0"), len(raw))
    text, path = device_path(raw[end + 2 : end + 2 + struct.unpack_from("<H", raw, 4)[0]])
    return {"description": raw[6:end].decode("utf-16-le", "replace"), "device_path": text, "path": path}


# ------------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class BootApp:
    """An EFI application the firmware (or shim) loaded: event, PCR, path, role, Authenticode digests."""

    event: int
    pcr: int
    path: str | None
    role: str  # shim, grub, systemd-boot, default-loader, second-stage, kernel, application
    digests: dict[str, str]


@dataclass(frozen=True)
class KernelCmdline:
    event: int
    pcr: int
    source: str  # grub or systemd-boot
    text: str


@dataclass(frozen=True)
class BootSummary:
    """What the log says about the boot, read only from events whose data match their digests.

    ``secure_boot``: the SecureBoot variable's value (None: not measured), read at ``secure_boot_event``.
    ``variables``: PK, KEK, db, dbx signatures as measured into PCR 7. ``authorities``: the
    certificates that verified images (EV_EFI_VARIABLE_AUTHORITY), by event index."""

    secure_boot: bool | None
    secure_boot_event: int | None
    boot_apps: tuple[BootApp, ...]
    kernel_cmdlines: tuple[KernelCmdline, ...]
    variables: Mapping[str, tuple[Signature, ...]]
    authorities: tuple[tuple[int, Signature], ...]
    report: Report

    def to_dict(self) -> dict[str, Any]:
        return {
            "secure_boot": self.secure_boot,
            "secure_boot_event": self.secure_boot_event,
            "boot_apps": [vars(a) for a in self.boot_apps],
            "kernel_cmdlines": [vars(c) for c in self.kernel_cmdlines],
            "variables": {k: [s.to_dict() for s in v] for k, v in self.variables.items()},
            "authorities": [{"event": i, **s.to_dict()} for i, s in self.authorities],
            "findings": self.report.to_list(),
        }


def _candidates(event: Event) -> tuple[list[bytes], Severity] | None:
    """What the digest must be a hash of (any one of), and how bad a mismatch is; None: not checkable."""
    t = event.type
    if t in (EV_SEPARATOR, _T["EV_EFI_ACTION"], _T["EV_EFI_VARIABLE_DRIVER_CONFIG"], _T["EV_EFI_GPT_EVENT"]):
        return [event.data], Severity.ERROR
    if t in (_T["EV_EFI_VARIABLE_BOOT"], _T["EV_EFI_VARIABLE_BOOT2"], _T["EV_EFI_VARIABLE_AUTHORITY"]):
        try:
            var = parse_variable(event).data
        except ParseError:
            var = event.data
        # Firmware hashes the whole UEFI_VARIABLE_DATA or (Boot####) only the variable's data; shim hashes
        # its own authority entries in other ways, so authority mismatches are only warnings.
        strict = t != _T["EV_EFI_VARIABLE_AUTHORITY"]
        return [event.data, var], (Severity.ERROR if strict else Severity.WARNING)
    prefix = next((p for p in _GRUB_PREFIXES if event.data.startswith(p)), None)
    if t == _T["EV_IPL"] and prefix is not None:
        return [event.data[len(prefix) :].rstrip(b"\0")], Severity.ERROR
    return None


def check_event_data(event: Event, report: Report) -> bool:
    """Whether the event's data is what its digests hash (True when that cannot be checked)."""
    spec = _candidates(event)
    if spec is None:
        return True
    candidates, severity = spec
    bad = []
    for bank, digest in event.digests.items():
        h = bank_hash(bank)
        if h is not None and not any(h(c).digest() == digest for c in candidates):
            bad.append(bank)
    if bad:
        report.add(
            "eventlog.event_data_mismatch",
            f"the event data is not what its {', '.join(bad)} digest measured: left out of the summary",
            severity=severity,
            **event.where(),
            banks=bad,
        )
    return not bad


def _role(path: str | None, before: list[BootApp]) -> str:
    name = (path or "").lower().replace("/", "\\").rsplit("\\", 1)[-1]
    for key in ("shim", "grub", "systemd-boot"):
        if key in name:
            return key
    if "vmlinuz" in name or name.startswith(("linux", "kernel")):
        return "kernel"
    if name in _DEFAULT_LOADERS:
        return "default-loader"  # \EFI\BOOT\BOOTX64.EFI: shim or a boot loader on removable media
    previous = before[-1].role if before and path is None else None
    if previous in ("shim", "default-loader"):
        return "second-stage"  # what shim loaded from memory (grub, or a kernel it booted directly)
    if previous in ("grub", "systemd-boot", "second-stage", "kernel"):
        return "kernel"  # loaded from memory by the boot loader (grub through shim, systemd-stub)
    return "application"


def summarize(events: Iterable[Event], report: Report | None = None) -> BootSummary:
    """Decode the events that matter and collect anomalies as findings, each naming the event (index, type).
    Events whose data do not match their digests are left out (``eventlog.event_data_mismatch``)."""
    summary = _Summary(report if report is not None else Report())
    for event in events:
        if event.type == EV_SEPARATOR:
            summary.separators.add(event.pcr)
        if event.type != EV_NO_ACTION and check_event_data(event, summary.report):
            try:
                summary.add(event)
            except ParseError as exc:
                summary.report.add("eventlog.malformed_event", exc.message, **event.where())
    return summary.finish()


class _Summary:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.secure_boot: bool | None = None
        self.secure_boot_event: int | None = None
        self.apps: list[BootApp] = []
        self.cmdlines: list[KernelCmdline] = []
        self.variables: dict[str, tuple[Signature, ...]] = {}
        self.authorities: list[tuple[int, Signature]] = []
        self.separators: set[int] = set()

    def add(self, event: Event) -> None:
        t, data = event.type, event.data
        if t == EV_SEPARATOR:
            value = int.from_bytes(data, "little") if len(data) == 4 else None
            if value in (1, 0xFFFFFFFF):
                self.report.add(
                    "eventlog.separator_error", "EV_SEPARATOR signals a firmware error", **event.where()
                )
            elif value != 0 and event.pcr < 8:  # Windows closes PCRs 12-14 with "WBCL"
                self.report.add(
                    "eventlog.separator_unusual",
                    f"EV_SEPARATOR data {data.hex()} is neither 0 nor 1",
                    severity=Severity.WARNING,
                    **event.where(),
                )
        elif t == _T["EV_EFI_BOOT_SERVICES_APPLICATION"]:
            path = parse_image_load(event).path
            digests = {b: d.hex() for b, d in event.digests.items()}
            self.apps.append(BootApp(event.index, event.pcr, path, _role(path, self.apps), digests))
        elif t == _T["EV_EFI_VARIABLE_DRIVER_CONFIG"]:
            self._variable(event, parse_variable(event))
        elif t == _T["EV_EFI_VARIABLE_AUTHORITY"]:
            self.authorities.append((event.index, _authority(parse_variable(event))))
        elif t == _T["EV_IPL"] and data.startswith(b"kernel_cmdline: "):
            self.cmdlines.append(KernelCmdline(event.index, event.pcr, "grub", text_of(data[16:])))
        elif t == _T["EV_IPL"] and event.pcr in (8, 12) and len(data) >= 2 and data[0] and not data[1]:
            text = text_of(data).strip()
            self.cmdlines.append(KernelCmdline(event.index, event.pcr, "systemd-boot", text))

    def _variable(self, event: Event, var: VariableData) -> None:
        """SecureBoot, PK, KEK, db, dbx as the firmware measures them: into PCR 7, under their GUIDs."""
        if event.pcr != 7:
            return
        if var.name == "SecureBoot" and var.guid == EFI_GLOBAL_VARIABLE:
            value = var.data == b"\x01"
            if self.secure_boot_event is not None and value != self.secure_boot:
                self.report.add(
                    "eventlog.secure_boot_conflict",
                    "SecureBoot measured twice, with different values",
                    **event.where(),
                    first_event=self.secure_boot_event,
                )
            self.secure_boot, self.secure_boot_event = value, event.index
        elif _SECURE_BOOT_KEYS.get(var.name) == var.guid:
            self.variables[var.name] = tuple(parse_signature_lists(var.data, event))

    def finish(self) -> BootSummary:
        warn = Severity.WARNING
        if self.secure_boot is None:
            self.report.add(
                "eventlog.secure_boot_unmeasured", "no SecureBoot variable: state unknown", severity=warn
            )
        elif not self.secure_boot:
            self.report.add(
                "eventlog.secure_boot_disabled",
                "Secure Boot is disabled",
                severity=warn,
                event=self.secure_boot_event,
            )
        missing = sorted(set(range(8)) - self.separators)
        if missing:
            self.report.add(
                "eventlog.separator_missing",
                "no EV_SEPARATOR for these PCRs: the pre-OS phase was not closed (or the log is cut short)",
                severity=warn,
                pcrs=missing,
            )
        return BootSummary(
            self.secure_boot,
            self.secure_boot_event,
            tuple(self.apps),
            tuple(self.cmdlines),
            self.variables,
            tuple(self.authorities),
            self.report,
        )
