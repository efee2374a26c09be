"""UEFI/TCG event logs (``/sys/kernel/security/tpm0/binary_bios_measurements``): streaming parser, replay.

Two formats, little-endian, told apart by the first event (which is always in the legacy layout):

* **legacy SHA-1** (TCG 1.2, EFI 1.x ``TCG_PCClientPCREvent``): pcrIndex u32 | eventType u32 | SHA-1[20] |
  eventDataSize u32 | event data, for every event.
* **crypto-agile** (TCG PC Client PFP): event 0 is an ``EV_NO_ACTION`` whose data is ``Spec ID Event03``
  (signature[16], platformClass u32, specVersionMinor/Major u8, specErrata u8, uintnSize u8,
  numberOfAlgorithms u32, {algorithmId u16, digestSize u16} each, vendorInfoSize u8, vendorInfo); every
  later event is a ``TCG_PCR_EVENT2``: pcrIndex u32 | eventType u32 | digest count u32 |
  {hashAlg u16, digest} each | eventSize u32 | event data.

The parser reads field by field and holds one event at a time; lengths are bounded before anything is
allocated. Malformed input raises only :class:`~tmb.errors.ParseError` naming the file, byte offset and event.

:func:`replay` extends every event but ``EV_NO_ACTION`` into each bank's PCRs 0-23 (starting at zero, 17-22
at all-ones as after TPM2_Startup). PCR 0 starts at the locality in its last byte after a ``StartupLocality``
``EV_NO_ACTION`` (startup from locality 3 or 4) or before an ``EV_EFI_HCRTM_EVENT`` (H-CRTM: locality 4).
:func:`check_pcrs` compares with quoted or read values. Event data decoding and the boot summary are in
:mod:`tmb.attest.eventlog_events`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tmb.attest import tpm2
from tmb.errors import InputError, ParseError, Report, Severity

__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventLog",
    "Replay",
    "SpecId",
    "check_pcrs",
    "event_type_name",
    "iter_events",
    "read_eventlog",
    "replay",
    "replay_file",
]

MAX_EVENT_DATA = 16 * 1024 * 1024  # the largest real events (dbx, GPT) are tens of KiB
MAX_ALGORITHMS = tpm2.MAX_BANKS
MAX_DIGEST_SIZE = 128
NUM_PCRS = 24
SHA1_LEN = 20
_READ_CHUNK = 1 << 20

EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_EFI_HCRTM_EVENT = 0x80000010
_EFI = 0x80000000
_TCG_TYPES = """PREBOOT_CERT POST_CODE UNUSED NO_ACTION SEPARATOR ACTION EVENT_TAG S_CRTM_CONTENTS
    S_CRTM_VERSION CPU_MICROCODE PLATFORM_CONFIG_FLAGS TABLE_OF_DEVICES COMPACT_HASH IPL IPL_PARTITION_DATA
    NONHOST_CODE NONHOST_CONFIG NONHOST_INFO OMIT_BOOT_DEVICE_EVENTS POST_CODE2"""  # 0x00-0x13, in order
_EFI_TYPES = {
    0x1: "VARIABLE_DRIVER_CONFIG", 0x2: "VARIABLE_BOOT", 0x3: "BOOT_SERVICES_APPLICATION",
    0x4: "BOOT_SERVICES_DRIVER", 0x5: "RUNTIME_SERVICES_DRIVER", 0x6: "GPT_EVENT", 0x7: "ACTION",
    0x8: "PLATFORM_FIRMWARE_BLOB", 0x9: "HANDOFF_TABLES", 0xA: "PLATFORM_FIRMWARE_BLOB2",
    0xB: "HANDOFF_TABLES2", 0xC: "VARIABLE_BOOT2", 0xD: "GPT_EVENT2", 0x10: "HCRTM_EVENT",
    0xE0: "VARIABLE_AUTHORITY", 0xE1: "SPDM_FIRMWARE_BLOB", 0xE2: "SPDM_FIRMWARE_CONFIG",
    0xE3: "SPDM_DEVICE_POLICY", 0xE4: "SPDM_DEVICE_AUTHORITY",
}  # fmt: skip
EVENT_TYPES: dict[int, str] = {i: f"EV_{name}" for i, name in enumerate(_TCG_TYPES.split())}
EVENT_TYPES |= {_EFI + i: f"EV_EFI_{name}" for i, name in _EFI_TYPES.items()}
EVENT_TYPE_IDS: dict[str, int] = {name: code for code, name in EVENT_TYPES.items()}

# Hash algorithms a crypto-agile log may name: bank name, digest size, hashlib name (None: cannot replay).
_ALGS: dict[int, tuple[str, int, str | None]] = {
    tpm2.ALG_SHA1: ("sha1", 20, "sha1"),
    tpm2.ALG_SHA256: ("sha256", 32, "sha256"),
    tpm2.ALG_SHA384: ("sha384", 48, "sha384"),
    tpm2.ALG_SHA512: ("sha512", 64, "sha512"),
    0x0012: ("sm3_256", 32, "sm3"),
    0x0027: ("sha3_256", 32, "sha3_256"),
    0x0028: ("sha3_384", 48, "sha3_384"),
    0x0029: ("sha3_512", 64, "sha3_512"),
}
SPEC_ID_03 = b"Spec ID Event03\0"
_LEGACY_SPEC_IDS = (b"Spec ID Event00\0", b"Spec ID Event02\0")
STARTUP_LOCALITY = b"StartupLocality\0"
_U32 = struct.Struct("<I")
_LEGACY_HEAD = struct.Struct("<II20sI")


def event_type_name(code: int) -> str:
    """``EV_IPL`` for 0xd; ``EV_0x........`` for a type the specification does not name."""
    return EVENT_TYPES.get(code, f"EV_0x{code:08x}")


def bank_name(alg: int) -> str:
    known = _ALGS.get(alg)
    return known[0] if known else f"0x{alg:04x}"


def bank_hash(bank: str) -> Callable[[bytes], Any] | None:
    """The hash constructor of a bank (``hashlib.new`` bound to its name); None when this Python's
    OpenSSL lacks it (SM3) or the algorithm is unknown."""
    hname = next((h for name, _, h in _ALGS.values() if name == bank), None)
    if hname is None:
        return None
    try:
        hashlib.new(hname)
    except ValueError:
        return None
    return lambda data: hashlib.new(hname, data)


@dataclass(frozen=True)
class SpecId:
    """The ``Spec ID Event03`` header of a crypto-agile log: the banks and their digest sizes."""

    platform_class: int
    spec_version: tuple[int, int, int]  # major, minor, errata
    uintn_size: int
    algorithms: tuple[tuple[int, int], ...]  # (TPM_ALG_ID, digest size)
    vendor_info: bytes = b""

    @property
    def banks(self) -> tuple[str, ...]:
        return tuple(bank_name(alg) for alg, _ in self.algorithms)


@dataclass(frozen=True)
class Event:
    """One event: where it is (``index`` from 0, byte ``offset``, ``size`` in the log), the PCR, the
    event type, one digest per bank (``{"sha256": ...}``) and the raw event data."""

    index: int
    offset: int
    size: int
    pcr: int
    type: int
    digests: Mapping[str, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return event_type_name(self.type)

    def where(self) -> dict[str, Any]:
        """Location context for findings."""
        return {"event": self.index, "type": self.type_name, "pcr": self.pcr, "offset": self.offset}


@dataclass(frozen=True)
class EventLog:
    """A whole parsed log: ``fmt`` is ``crypto-agile`` or ``sha1``; ``spec`` the Spec ID header (crypto-agile
    logs only); ``events`` includes the header event as event 0."""

    fmt: str
    spec: SpecId | None
    events: tuple[Event, ...]

    @property
    def banks(self) -> tuple[str, ...]:
        return self.spec.banks if self.spec is not None else ("sha1",)


# ---------------------------------------------------------------------------------------------- parse


class _Reader:
    """Exact reads from a stream (looping over short reads, as securityfs gives), counting the offset."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self.stream = stream
        self.name = name
        self.offset = 0
        self.pushed = b""  # one byte read ahead by at_end

    def error(self, message: str, index: int, offset: int, **extra: Any) -> ParseError:
        return ParseError(message, file=self.name, offset=offset, event=index, **extra)

    def read(self, n: int, what: str, index: int, start: int) -> bytes:
        """``n`` bytes (``n`` already bounded by the caller); ParseError naming the event if the log ends."""
        parts = [self.pushed]
        got = len(self.pushed)
        self.pushed = b""
        while got < n:
            chunk = self.stream.read(min(n - got, _READ_CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self.offset += len(data)
        if len(data) < n:
            raise self.error(
                f"event log ends inside event {index} ({what}: {len(data)} of {n} bytes)",
                index,
                start,
                truncated=True,
                trailing_bytes=self.offset - start,
                hint="a truncated copy of the log, or bytes that are not an event log",
            )
        return data

    def u32(self, what: str, index: int, start: int) -> int:
        value: int = _U32.unpack(self.read(4, what, index, start))[0]
        return value

    def at_end(self) -> bool:
        """True at a clean end of the stream; otherwise the next byte is kept for the next read."""
        if not self.pushed:
            self.pushed = self.stream.read(1)
        return not self.pushed


def _data_size(reader: _Reader, index: int, start: int) -> int:
    size = reader.u32("event data size", index, start)
    if size > MAX_EVENT_DATA:
        raise reader.error(
            f"event data size {size} exceeds the {MAX_EVENT_DATA}-byte limit", index, start, size=size
        )
    return size


def _legacy_event(reader: _Reader, index: int) -> Event:
    start = reader.offset
    head = reader.read(_LEGACY_HEAD.size - 4, "event header", index, start)
    pcr, etype, digest = struct.unpack("<II20s", head)
    data = reader.read(_data_size(reader, index, start), "event data", index, start)
    return Event(index, start, reader.offset - start, pcr, etype, {"sha1": digest}, data)


def _agile_event(reader: _Reader, index: int, spec: SpecId) -> Event:
    start = reader.offset
    pcr = reader.u32("PCR index", index, start)
    etype = reader.u32("event type", index, start)
    count = reader.u32("digest count", index, start)
    if count > len(spec.algorithms):
        raise reader.error(
            f"digest count {count} exceeds the {len(spec.algorithms)} algorithms of the Spec ID event",
            index,
            start,
            count=count,
        )
    sizes = dict(spec.algorithms)
    digests: dict[str, bytes] = {}
    for _ in range(count):
        alg: int = struct.unpack("<H", reader.read(2, "digest algorithm", index, start))[0]
        size = sizes.get(alg)
        if size is None:
            raise reader.error(f"digest algorithm 0x{alg:04x} is not in the Spec ID event", index, start)
        name = bank_name(alg)
        if name in digests:
            raise reader.error(f"two {name} digests in one event", index, start)
        digests[name] = reader.read(size, f"{name} digest", index, start)
    data = reader.read(_data_size(reader, index, start), "event data", index, start)
    return Event(index, start, reader.offset - start, pcr, etype, digests, data)


def parse_spec_id(event: Event, *, file: str = "<log>") -> SpecId | None:
    """The Spec ID Event03 header in event 0's data; None for a legacy (SHA-1) log's first event."""
    data = event.data
    if event.type != EV_NO_ACTION or not data.startswith(SPEC_ID_03):
        return None

    def bad(message: str) -> ParseError:
        return ParseError(f"Spec ID Event03: {message}", file=file, offset=event.offset, event=event.index)

    if len(data) < 29:
        raise bad("shorter than its fixed fields")
    platform_class, minor, major, errata, uintn, count = struct.unpack_from("<IBBBBI", data, 16)
    if not 1 <= count <= MAX_ALGORITHMS:
        raise bad(f"{count} algorithms (1..{MAX_ALGORITHMS})")
    pos = 28
    if pos + 4 * count + 1 > len(data):
        raise bad(f"too short for {count} algorithms")
    algorithms: list[tuple[int, int]] = []
    for i in range(count):
        alg, size = struct.unpack_from("<HH", data, pos + 4 * i)
        known = _ALGS.get(alg)
        if (known is not None and known[1] != size) or not 1 <= size <= MAX_DIGEST_SIZE:
            raise bad(f"algorithm 0x{alg:04x} with digest size {size}")
        if any(a == alg for a, _ in algorithms):
            raise bad(f"algorithm 0x{alg:04x} listed twice")
        algorithms.append((alg, size))
    pos += 4 * count
    vendor_size = data[pos]
    vendor = data[pos + 1 : pos + 1 + vendor_size]
    if len(vendor) != vendor_size:
        raise bad("vendorInfo runs past the event data")
    return SpecId(platform_class, (major, minor, errata), uintn, tuple(algorithms), vendor)


def iter_events(stream: BinaryIO, *, name: str = "<stream>") -> Iterator[Event]:
    """Events of a log in either format, header first. ``name`` is the file named in errors.

    An empty stream or one that ends inside an event raises ParseError (``truncated`` in its context)
    after every complete event before it has been yielded."""
    reader = _Reader(stream, name)
    if reader.at_end():
        raise reader.error("the event log is empty", 0, 0, truncated=True, trailing_bytes=0)
    first = _legacy_event(reader, 0)
    spec = parse_spec_id(first, file=name)
    if spec is None and first.data.startswith(SPEC_ID_03[:8]) and not first.data.startswith(_LEGACY_SPEC_IDS):
        sig = first.data[:16].rstrip(b"\0").decode("ascii", "replace")
        raise reader.error(f"unknown Spec ID signature {sig!r}", 0, 0)
    yield first
    index = 1
    while not reader.at_end():
        yield _legacy_event(reader, index) if spec is None else _agile_event(reader, index, spec)
        index += 1


def open_eventlog(path: str | Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read the event log: {exc.strerror}", path=str(path)) from None


def read_eventlog(source: str | Path | BinaryIO, *, name: str | None = None) -> EventLog:
    """Parse a whole log (a path or an open binary stream); ParseError on any malformed or cut event."""
    if isinstance(source, str | Path):
        with open_eventlog(source) as stream:
            return read_eventlog(stream, name=name or str(source))
    events = tuple(iter_events(source, name=name or str(getattr(source, "name", "<stream>"))))
    spec = parse_spec_id(events[0])
    return EventLog("crypto-agile" if spec else "sha1", spec, events)


# --------------------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class Replay:
    """Replayed PCRs: ``pcrs[bank][pcr]`` for every bank of the log and PCR 0-23; ``last_event[pcr]`` the
    index of the last event extended into it; ``locality`` the StartupLocality (None if not logged);
    ``events`` how many events were read; ``report`` every finding."""

    banks: tuple[str, ...]
    pcrs: Mapping[str, Mapping[int, bytes]]
    last_event: Mapping[int, int]
    locality: int | None
    events: int
    report: Report = field(default_factory=Report)

    def value(self, bank: str, pcr: int) -> bytes:
        return self.pcrs[bank][pcr]


def replay(
    events: Iterable[Event], *, report: Report | None = None, on_event: Callable[[Event], None] | None = None
) -> Replay:
    """Extend every event (but ``EV_NO_ACTION``) into each bank's PCRs; the banks come from event 0 (the
    Spec ID header, or SHA-1 alone for a legacy log). A ParseError from ``events`` propagates."""
    report = report if report is not None else Report()
    sizes: dict[str, int] = {}
    pcrs: dict[str, dict[int, bytes]] = {}
    hashers: dict[str, Callable[[bytes], Any]] = {}
    incomplete: set[str] = set()
    last: dict[int, int] = {}
    locality: int | None = None
    count = 0
    for event in events:
        if count == 0:
            if event.index != 0:
                raise InputError("an event log is replayed from its first event", event=event.index)
            spec = parse_spec_id(event)
            for alg, size in spec.algorithms if spec else ((tpm2.ALG_SHA1, SHA1_LEN),):
                name = bank_name(alg)
                sizes[name] = size
                pcrs[name] = {i: (b"\xff" if 17 <= i <= 22 else b"\0") * size for i in range(NUM_PCRS)}
                ctor = bank_hash(name)
                if ctor is not None:
                    hashers[name] = ctor
                else:
                    report.add(
                        "eventlog.bank_unsupported",
                        f"cannot compute {name} here: bank not replayed",
                        severity=Severity.WARNING,
                        bank=name,
                    )
        count += 1
        if on_event is not None:
            on_event(event)
        start = _start_locality(event)
        if start is not None:
            if locality is not None or 0 in last or event.pcr != 0:
                report.add(
                    "eventlog.startup_locality_late",
                    f"{event.type_name} after PCR 0 was extended, repeated or not for PCR 0: PCR 0 not reset",
                    **event.where(),
                    locality=start,
                )
            else:
                locality = start
                for bank, size in sizes.items():
                    pcrs[bank][0] = bytes(size - 1) + bytes([start])
        if event.type == EV_NO_ACTION:
            continue
        if not 0 <= event.pcr < NUM_PCRS:
            report.add(
                "eventlog.pcr_out_of_range", f"event for PCR {event.pcr}: not replayed", **event.where()
            )
            continue
        for bank in sizes.keys() - event.digests.keys() - incomplete:
            incomplete.add(bank)
            report.add(
                "eventlog.digest_missing",
                f"event without a {bank} digest: the {bank} values are not the platform's",
                severity=Severity.WARNING,
                bank=bank,
                **event.where(),
            )
        for bank, digest in event.digests.items():
            if bank in hashers:
                pcrs[bank][event.pcr] = hashers[bank](pcrs[bank][event.pcr] + digest).digest()
        last[event.pcr] = event.index
    return Replay(tuple(sizes), pcrs, last, locality, count, report)


def _start_locality(event: Event) -> int | None:
    """The locality PCR 0 starts from, if this event says: a StartupLocality ``EV_NO_ACTION`` (TPM2_Startup
    from locality 3, or 4 after an H-CRTM), or an ``EV_EFI_HCRTM_EVENT`` (``_TPM_Hash_Start``, locality 4)."""
    if event.type == EV_NO_ACTION and event.data.startswith(STARTUP_LOCALITY) and len(event.data) > 16:
        return event.data[16]
    return 4 if event.type == EV_EFI_HCRTM_EVENT else None


def check_pcrs(result: Replay, expected: Mapping[str, Mapping[int, bytes]], report: Report) -> bool:
    """Compare replayed values with ``expected[bank][pcr]``; one finding per differing PCR, PCRs in
    ascending order (so the first finding names the first diverging PCR of its bank). True if all match."""
    ok = True
    for bank in sorted(expected, key=lambda b: (b not in result.banks, b)):
        values = expected[bank]
        if bank not in result.pcrs:
            report.add(
                "eventlog.bank_missing",
                f"PCR values for the {bank} bank were given but the log has no {bank} digests",
                bank=bank,
                log_banks=list(result.banks),
            )
            ok = False
            continue
        for pcr in sorted(values):
            got = result.pcrs[bank].get(pcr)
            if got is None:
                report.add("eventlog.pcr_out_of_range", f"PCR {pcr} is not 0-23", bank=bank, pcr=pcr)
                ok = False
            elif got != values[pcr]:
                report.add(
                    "eventlog.pcr_mismatch",
                    f"replaying the log does not give the {bank} value of PCR {pcr}",
                    bank=bank,
                    pcr=pcr,
                    expected=values[pcr].hex(),
                    got=got.hex(),
                    last_event=result.last_event.get(pcr),
                )
                ok = False
    return ok


def replay_file(
    source: str | Path | BinaryIO,
    *,
    expected: Mapping[str, Mapping[int, bytes]] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> Replay:
    """Parse and replay a log (a path or an open stream). A log that cannot even start (empty, a first event
    that is not one) raises ParseError; one that breaks off later is replayed up to there with an
    ``eventlog.truncated`` or ``eventlog.malformed`` error finding. ``expected``: also :func:`check_pcrs`."""
    if isinstance(source, str | Path):
        with open_eventlog(source) as stream:
            return replay_file(stream, expected=expected, on_event=on_event)
    report = Report()
    events = iter_events(source, name=str(getattr(source, "name", "<stream>")))
    head = next(events)  # raises for a log that is not one

    def guarded() -> Iterator[Event]:
        yield head
        try:
            yield from events
        except ParseError as exc:
            fid = "eventlog.truncated" if exc.context.get("truncated") else "eventlog.malformed"
            report.add(fid, exc.message, **{k: v for k, v in exc.context.items() if k != "truncated"})

    result = replay(guarded(), report=report, on_event=on_event)
    if expected is not None:
        check_pcrs(result, expected, report)
    return result
