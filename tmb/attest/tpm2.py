"""TPM 2.0 structures, marshalled and unmarshalled in pure Python.

Everything on the wire is big-endian (TPM 2.0 Library, Part 2). Structures parsed here, each a frozen
dataclass with ``marshal()`` giving back the canonical bytes:

* ``TPMS_ATTEST`` (:class:`Attest`): magic u32 (``0xff544347``), type u16 (``0x8018`` for a quote),
  qualifiedSigner ``TPM2B_NAME``, extraData ``TPM2B_DATA``, clockInfo ``TPMS_CLOCK_INFO`` (clock u64,
  resetCount u32, restartCount u32, safe u8), firmwareVersion u64, then the type-specific part; for a quote
  ``TPMS_QUOTE_INFO`` (:class:`QuoteInfo`): ``TPML_PCR_SELECTION`` + pcrDigest ``TPM2B_DIGEST``.
* ``TPML_PCR_SELECTION``: u32 count, then ``TPMS_PCR_SELECTION`` (hash u16, sizeofSelect u8, bitmap; bit j of
  byte i selects PCR 8*i+j).
* ``TPMT_SIGNATURE`` (:class:`Signature`): sigAlg u16, hash u16, then RSASSA/RSAPSS ``TPM2B`` signature or
  ECDSA ``TPM2B`` r and s.
* ``TPMT_PUBLIC`` / ``TPM2B_PUBLIC`` (:class:`PublicArea`) for RSA and ECC keys; the object name is
  ``nameAlg || H_nameAlg(TPMT_PUBLIC)`` (:func:`object_name`).

PCR values (:class:`PcrValues`) are read from the tpm2-tools PCR files (``tpm2_quote -o``, ``-F serialized``
or ``-F values``) or from a small JSON text form, see :func:`load_pcr_values`. Any input that does not follow
the format raises :class:`~tmb.errors.ParseError` naming the structure, the field and the byte offset;
nothing else escapes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from tmb.errors import ParseError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_HMAC = 0x0005
ALG_AES = 0x0006
ALG_KEYEDHASH = 0x0008
ALG_XOR = 0x000A
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAES = 0x0015
ALG_RSAPSS = 0x0016
ALG_OAEP = 0x0017
ALG_ECDSA = 0x0018
ALG_ECDH = 0x0019
ALG_ECDAA = 0x001A
ALG_ECSCHNORR = 0x001C
ALG_ECC = 0x0023
ALG_SYMCIPHER = 0x0025
ALG_CFB = 0x0043

HASH_NAMES: dict[int, str] = {
    ALG_SHA1: "sha1",
    ALG_SHA256: "sha256",
    ALG_SHA384: "sha384",
    ALG_SHA512: "sha512",
}
HASH_IDS: dict[str, int] = {name: alg for alg, name in HASH_NAMES.items()}
DIGEST_SIZES: dict[int, int] = {ALG_SHA1: 20, ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64}
SIG_SCHEME_NAMES: dict[int, str] = {ALG_RSASSA: "rsassa", ALG_RSAPSS: "rsapss", ALG_ECDSA: "ecdsa"}
ECC_CURVES: dict[int, str] = {0x0003: "P-256", 0x0004: "P-384", 0x0005: "P-521"}
ECC_COORD_SIZES: dict[int, int] = {0x0003: 32, 0x0004: 48, 0x0005: 66}

MAX_PCRS = 32  # sizeofSelect is at most 4 bytes on every real TPM
MAX_BANKS = 16  # TPM2_NUM_PCR_BANKS
MAX_SIZEOF_SELECT = 4


def alg_name(alg: int) -> str:
    """A readable name for a TPM_ALG_ID (``sha256``, ``rsassa``, ``0x0099`` when unknown)."""
    known = {**HASH_NAMES, **SIG_SCHEME_NAMES, ALG_RSA: "rsa", ALG_ECC: "ecc", ALG_NULL: "null"}
    return known.get(alg, f"0x{alg:04x}")


def hash_id(name: str) -> int:
    """TPM_ALG_ID of a hash name (``sha256``); :class:`ParseError` for an unsupported one."""
    alg = HASH_IDS.get(name.lower().replace("-", ""))
    if alg is None:
        raise ParseError(f"unsupported hash algorithm {name!r}", hint=f"use one of {', '.join(HASH_IDS)}")
    return alg


def digest(alg: int, data: bytes) -> bytes:
    """H_alg(data) for a supported TPM hash algorithm."""
    return hashlib.new(HASH_NAMES[alg], data).digest()


class Reader:
    """Bounds-checked big-endian cursor; every failure names structure, field and offset."""

    __slots__ = ("data", "pos", "structure")

    def __init__(self, data: bytes, structure: str, pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.structure = structure

    def fail(self, field: str, message: str, offset: int | None = None) -> ParseError:
        at = self.pos if offset is None else offset
        return ParseError(
            f"{self.structure}.{field}: {message} at offset {at}",
            structure=self.structure,
            field=field,
            offset=at,
        )

    def take(self, n: int, field: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise self.fail(field, f"truncated: need {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, max_size: int = 0xFFFF) -> bytes:
        at = self.pos
        size = self.u16(field + ".size")
        if size > max_size:
            raise self.fail(field, f"size {size} exceeds the maximum {max_size}", at)
        return self.take(size, field)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail("(end)", f"{len(self.data) - self.pos} trailing bytes")


def _tpm2b(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


# ------------------------------------------------------------------------------------------------ PCRs


@dataclass(frozen=True)
class PcrSelection:
    """``TPMS_PCR_SELECTION``: one bank and the PCR indices selected in it (ascending)."""

    hash_alg: int
    pcrs: tuple[int, ...]
    size_of_select: int = 3

    @property
    def bank(self) -> str:
        return HASH_NAMES.get(self.hash_alg, alg_name(self.hash_alg))

    def bitmap(self) -> bytes:
        bits = bytearray(self.size_of_select)
        for i in self.pcrs:
            bits[i // 8] |= 1 << (i % 8)
        return bytes(bits)

    def marshal(self) -> bytes:
        return struct.pack(">HB", self.hash_alg, self.size_of_select) + self.bitmap()


def pcrs_from_bitmap(bits: bytes) -> tuple[int, ...]:
    return tuple(8 * i + j for i, byte in enumerate(bits) for j in range(8) if byte >> j & 1)


def read_pcr_selection(r: Reader, field: str = "pcrSelect") -> tuple[PcrSelection, ...]:
    prefix = field + "." if field else ""
    at = r.pos
    count = r.u32(prefix + "count")
    if count > MAX_BANKS:
        raise r.fail(prefix + "count", f"{count} banks exceeds the maximum {MAX_BANKS}", at)
    out = []
    for n in range(count):
        f = f"{prefix}pcrSelections[{n}]"
        alg = r.u16(f + ".hash")
        at = r.pos
        size = r.u8(f + ".sizeofSelect")
        if size > MAX_SIZEOF_SELECT:
            raise r.fail(f + ".sizeofSelect", f"{size} exceeds the maximum {MAX_SIZEOF_SELECT}", at)
        out.append(PcrSelection(alg, pcrs_from_bitmap(r.take(size, f + ".pcrSelect")), size))
    return tuple(out)


def marshal_pcr_selection(selection: tuple[PcrSelection, ...]) -> bytes:
    return len(selection).to_bytes(4, "big") + b"".join(s.marshal() for s in selection)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """Unmarshal a complete ``TPML_PCR_SELECTION``."""
    r = Reader(data, "TPML_PCR_SELECTION")
    out = read_pcr_selection(r, "")
    r.end()
    return out


# ---------------------------------------------------------------------------------------------- attest


@dataclass(frozen=True)
class ClockInfo:
    """``TPMS_CLOCK_INFO``: milliseconds the TPM has run, reboots, restarts, and whether clock is safe."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool

    def marshal(self) -> bytes:
        return struct.pack(">QIIB", self.clock, self.reset_count, self.restart_count, int(self.safe))


@dataclass(frozen=True)
class QuoteInfo:
    """``TPMS_QUOTE_INFO``: the PCR selection quoted and the digest of those PCRs' values."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes

    def marshal(self) -> bytes:
        return marshal_pcr_selection(self.pcr_select) + _tpm2b(self.pcr_digest)

    def selected(self) -> list[tuple[int, int]]:
        """(hash alg, PCR index) pairs in the order their values enter the pcrDigest."""
        return [(s.hash_alg, i) for s in self.pcr_select for i in s.pcrs]


@dataclass(frozen=True)
class Attest:
    """``TPMS_ATTEST``. ``quote`` is set when ``type`` is TPM_ST_ATTEST_QUOTE, else ``attested`` holds the
    type-specific bytes unparsed."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    quote: QuoteInfo | None
    attested: bytes = b""

    def marshal(self) -> bytes:
        body = self.quote.marshal() if self.quote is not None else self.attested
        return (
            struct.pack(">IH", self.magic, self.type)
            + _tpm2b(self.qualified_signer)
            + _tpm2b(self.extra_data)
            + self.clock_info.marshal()
            + self.firmware_version.to_bytes(8, "big")
            + body
        )


def parse_attest(data: bytes) -> Attest:
    """Unmarshal a ``TPMS_ATTEST`` (what ``tpm2_quote -m`` writes); trailing bytes are an error.

    A wrong magic is not a parse error (the verifier reports it as a finding); a type other than a quote
    leaves ``quote=None``.
    """
    r = Reader(bytes(data), "TPMS_ATTEST")
    magic = r.u32("magic")
    typ = r.u16("type")
    signer = r.tpm2b("qualifiedSigner", 2 + 64)
    extra = r.tpm2b("extraData", 66)  # TPM2B_DATA: up to sizeof(TPMT_HA)
    clock = ClockInfo(
        r.u64("clockInfo.clock"), r.u32("clockInfo.resetCount"), r.u32("clockInfo.restartCount"), False
    )
    at = r.pos
    safe = r.u8("clockInfo.safe")
    if safe > 1:
        raise r.fail("clockInfo.safe", f"TPMI_YES_NO value {safe} is neither 0 nor 1", at)
    clock = ClockInfo(clock.clock, clock.reset_count, clock.restart_count, bool(safe))
    firmware = r.u64("firmwareVersion")
    if typ == TPM_ST_ATTEST_QUOTE:
        select = read_pcr_selection(r, "attested.quote.pcrSelect")
        pcr_digest = r.tpm2b("attested.quote.pcrDigest", 64)
        r.end()
        return Attest(magic, typ, signer, extra, clock, firmware, QuoteInfo(select, pcr_digest))
    return Attest(magic, typ, signer, extra, clock, firmware, None, r.data[r.pos :])


# ------------------------------------------------------------------------------------------- signature


@dataclass(frozen=True)
class Signature:
    """``TPMT_SIGNATURE`` for RSASSA / RSAPSS (``rsa_sig``) and ECDSA (``ecc_r``, ``ecc_s``)."""

    sig_alg: int
    hash_alg: int
    rsa_sig: bytes = b""
    ecc_r: bytes = b""
    ecc_s: bytes = b""

    @property
    def scheme(self) -> str:
        return alg_name(self.sig_alg)

    def marshal(self) -> bytes:
        head = struct.pack(">HH", self.sig_alg, self.hash_alg)
        if self.sig_alg == ALG_ECDSA:
            return head + _tpm2b(self.ecc_r) + _tpm2b(self.ecc_s)
        return head + _tpm2b(self.rsa_sig)


def parse_signature(data: bytes) -> Signature:
    """Unmarshal a ``TPMT_SIGNATURE`` (what ``tpm2_quote -s`` writes by default)."""
    r = Reader(bytes(data), "TPMT_SIGNATURE")
    alg = r.u16("sigAlg")
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        sig = Signature(alg, r.u16("signature.hash"), rsa_sig=r.tpm2b("signature.sig", 512))
    elif alg in (ALG_ECDSA, ALG_ECDAA, 0x001B, ALG_ECSCHNORR):
        h = r.u16("signature.hash")
        sig = Signature(
            alg, h, ecc_r=r.tpm2b("signature.signatureR", 128), ecc_s=r.tpm2b("signature.signatureS", 128)
        )
    else:
        raise r.fail("sigAlg", f"unsupported signature algorithm {alg_name(alg)}", 0)
    r.end()
    return sig


# ---------------------------------------------------------------------------------------------- public


@dataclass(frozen=True)
class PublicArea:
    """``TPMT_PUBLIC`` of an RSA or ECC key. ``raw`` is the exact marshalled bytes (the name covers them).

    RSA: ``key_bits``, ``exponent`` (0 on the wire means 65537; stored as given), ``unique`` = modulus.
    ECC: ``curve``, ``x``, ``y``.
    """

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]  # (algorithm, keyBits, mode); (ALG_NULL, 0, 0) when none
    scheme: int
    scheme_hash: int  # ALG_NULL when the scheme has none
    key_bits: int = 0
    exponent: int = 0
    unique: bytes = b""
    curve: int = 0
    kdf: tuple[int, int] = (ALG_NULL, ALG_NULL)
    x: bytes = b""
    y: bytes = b""
    raw: bytes = b""

    RESTRICTED = 0x00010000
    SIGN_ENCRYPT = 0x00040000
    FIXED_TPM = 0x00000002

    @property
    def is_restricted_signing(self) -> bool:
        want = self.RESTRICTED | self.SIGN_ENCRYPT
        return self.object_attributes & want == want

    def name(self) -> bytes:
        return object_name(self)


def _read_symmetric(r: Reader, field: str) -> tuple[int, int, int]:
    alg = r.u16(field + ".algorithm")
    if alg == ALG_NULL:
        return (ALG_NULL, 0, 0)
    if alg == ALG_XOR:
        return (alg, r.u16(field + ".keyBits(hash)"), 0)
    return (alg, r.u16(field + ".keyBits"), r.u16(field + ".mode"))


def _read_scheme(r: Reader, field: str) -> tuple[int, int]:
    scheme = r.u16(field + ".scheme")
    if scheme == ALG_NULL:
        return (ALG_NULL, ALG_NULL)
    if scheme == ALG_ECDAA:
        h = r.u16(field + ".details.hashAlg")
        r.u16(field + ".details.count")
        return (scheme, h)
    return (scheme, r.u16(field + ".details.hashAlg"))


def read_public(r: Reader) -> PublicArea:
    start = r.pos
    typ = r.u16("type")
    name_alg = r.u16("nameAlg")
    attrs = r.u32("objectAttributes")
    policy = r.tpm2b("authPolicy", 64)
    if typ == ALG_RSA:
        sym = _read_symmetric(r, "parameters.rsaDetail.symmetric")
        scheme, scheme_hash = _read_scheme(r, "parameters.rsaDetail.scheme")
        bits = r.u16("parameters.rsaDetail.keyBits")
        exponent = r.u32("parameters.rsaDetail.exponent")
        modulus = r.tpm2b("unique.rsa", 512)
        return PublicArea(
            typ, name_alg, attrs, policy, sym, scheme, scheme_hash, bits, exponent, modulus,
            raw=r.data[start : r.pos],
        )  # fmt: skip
    if typ == ALG_ECC:
        sym = _read_symmetric(r, "parameters.eccDetail.symmetric")
        scheme, scheme_hash = _read_scheme(r, "parameters.eccDetail.scheme")
        curve = r.u16("parameters.eccDetail.curveID")
        kdf = r.u16("parameters.eccDetail.kdf.scheme")
        kdf_hash = r.u16("parameters.eccDetail.kdf.hashAlg") if kdf != ALG_NULL else ALG_NULL
        x = r.tpm2b("unique.ecc.x", 128)
        y = r.tpm2b("unique.ecc.y", 128)
        return PublicArea(
            typ, name_alg, attrs, policy, sym, scheme, scheme_hash, curve=curve, kdf=(kdf, kdf_hash),
            x=x, y=y, raw=r.data[start : r.pos],
        )  # fmt: skip
    raise r.fail("type", f"unsupported key type {alg_name(typ)} (only rsa and ecc keys sign quotes)", start)


def parse_public(data: bytes) -> PublicArea:
    """Unmarshal a complete ``TPMT_PUBLIC``."""
    r = Reader(bytes(data), "TPMT_PUBLIC")
    pub = read_public(r)
    r.end()
    return pub


def parse_tpm2b_public(data: bytes) -> PublicArea:
    """Unmarshal a ``TPM2B_PUBLIC`` (what ``tpm2_createak -u`` / ``tpm2_readpublic -o`` write)."""
    r = Reader(bytes(data), "TPM2B_PUBLIC")
    size = r.u16("size")
    if size != len(data) - 2:
        raise r.fail("size", f"declares {size} bytes but {len(data) - 2} follow", 0)
    r.structure = "TPM2B_PUBLIC.publicArea"
    pub = read_public(r)
    r.end()
    return pub


def object_name(public: PublicArea | bytes) -> bytes:
    """TPM object name: nameAlg (u16) || H_nameAlg(marshalled TPMT_PUBLIC)."""
    pub = public if isinstance(public, PublicArea) else parse_public(public)
    if pub.name_alg not in HASH_NAMES:
        raise ParseError(f"TPMT_PUBLIC.nameAlg: unsupported name algorithm {alg_name(pub.name_alg)}")
    return pub.name_alg.to_bytes(2, "big") + digest(pub.name_alg, pub.raw)


# ------------------------------------------------------------------------------------------ PCR values


@dataclass(frozen=True)
class PcrValues:
    """PCR values by bank: ``banks[hash alg id][pcr index] = value``.

    Text form (:meth:`to_json`, :meth:`from_json`): ``{"sha256": {"10": "<hex>", ...}, "sha1": {...}}``.
    """

    banks: Mapping[int, Mapping[int, bytes]] = field(default_factory=dict)

    def get(self, bank: int | str, index: int) -> bytes | None:
        alg = hash_id(bank) if isinstance(bank, str) else bank
        return self.banks.get(alg, {}).get(index)

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {
            HASH_NAMES.get(alg, f"0x{alg:04x}"): {str(i): v.hex() for i, v in sorted(vals.items())}
            for alg, vals in self.banks.items()
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, obj: object) -> PcrValues:
        """Build from ``{"sha256": {"10": "hex"}}``; :class:`ParseError` on anything else."""
        if not isinstance(obj, dict):
            raise ParseError("PCR values JSON: the top level must be an object {bank: {index: hex}}")
        banks: dict[int, dict[int, bytes]] = {}
        for bank, vals in obj.items():
            alg = hash_id(str(bank))
            if not isinstance(vals, dict):
                raise ParseError(f"PCR values JSON: bank {bank!r} must map PCR indices to hex strings")
            out: dict[int, bytes] = {}
            for key, value in vals.items():
                try:
                    index = int(key)
                    text = value.removeprefix("0x") if isinstance(value, str) else None
                    raw = bytes.fromhex(text) if text is not None else None
                except ValueError:
                    raw = None
                    index = -1
                if raw is None or not 0 <= index < MAX_PCRS:
                    raise ParseError(f"PCR values JSON: bad entry {key!r}: {value!r}", bank=bank)
                if len(raw) != DIGEST_SIZES[alg]:
                    raise ParseError(
                        f"PCR values JSON: {bank} PCR {index} has {len(raw)} bytes, "
                        f"expected {DIGEST_SIZES[alg]}"
                    )
                out[index] = raw
            banks[alg] = out
        return cls(banks)

    @classmethod
    def from_json(cls, text: str) -> PcrValues:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ParseError(f"PCR values JSON does not parse: {exc}") from None
        return cls.from_dict(obj)


def _assign(selection: tuple[PcrSelection, ...], digests: list[bytes], structure: str) -> PcrValues:
    wanted = [(s.hash_alg, i) for s in selection for i in s.pcrs]
    if len(wanted) != len(digests):
        raise ParseError(
            f"{structure}: the selection names {len(wanted)} PCRs but {len(digests)} values follow",
            structure=structure,
        )
    banks: dict[int, dict[int, bytes]] = {}
    for (alg, index), value in zip(wanted, digests, strict=True):
        if alg not in DIGEST_SIZES:
            raise ParseError(f"{structure}: unsupported PCR bank {alg_name(alg)}", structure=structure)
        if len(value) != DIGEST_SIZES[alg]:
            raise ParseError(
                f"{structure}: {alg_name(alg)} PCR {index} value has {len(value)} bytes, "
                f"expected {DIGEST_SIZES[alg]}",
                structure=structure,
            )
        banks.setdefault(alg, {})[index] = value
    return PcrValues(banks)


_SEL_SIZE = 4 + 16 * 8  # in-memory TPML_PCR_SELECTION: u32 count + 16 x (u16, u8, 4 bytes, 1 pad)
_TPML_DIGEST_SIZE = 4 + 8 * (2 + 64)  # u32 count + 8 x TPM2B_DIGEST (u16 size + 64-byte buffer)


def parse_tools_serialized_pcrs(data: bytes) -> tuple[tuple[PcrSelection, ...], PcrValues]:
    """Parse the tpm2-tools serialized PCR file (``tpm2_quote -o FILE``, default ``-F serialized``).

    Layout (little-endian, the C structs' in-memory image): ``TPML_PCR_SELECTION`` (u32 count, 16 slots of
    u16 hash, u8 sizeofSelect, 4-byte bitmap, 1 pad byte), then a u32 count (u64 in old releases) of
    ``TPML_DIGEST`` (u32 count, 8 slots of u16 size + 64-byte buffer). The values are those of the selected
    PCRs in selection order (bank by bank, ascending index), 8 to a ``TPML_DIGEST``.
    """
    name = "tpm2-tools serialized PCRs"
    n = len(data)
    if n >= _SEL_SIZE + 4 and (n - _SEL_SIZE - 4) % _TPML_DIGEST_SIZE == 0:
        count_size = 4
    elif n >= _SEL_SIZE + 8 and (n - _SEL_SIZE - 8) % _TPML_DIGEST_SIZE == 0:
        count_size = 8
    else:
        raise ParseError(
            f"{name}: {n} bytes is not 132 + 4 + k*532 (or 132 + 8 + k*532)", structure=name, offset=n
        )
    count = int.from_bytes(data[0:4], "little")
    if count > MAX_BANKS:
        raise ParseError(f"{name}: pcrSelect.count {count} exceeds {MAX_BANKS}", structure=name, offset=0)
    selection = []
    for i in range(count):
        off = 4 + 8 * i
        alg = int.from_bytes(data[off : off + 2], "little")
        size = data[off + 2]
        if size > MAX_SIZEOF_SELECT:
            raise ParseError(f"{name}: sizeofSelect {size} exceeds 4", structure=name, offset=off + 2)
        selection.append(PcrSelection(alg, pcrs_from_bitmap(data[off + 3 : off + 3 + size]), size))
    lists = int.from_bytes(data[_SEL_SIZE : _SEL_SIZE + count_size], "little")
    base = _SEL_SIZE + count_size
    if lists != (n - base) // _TPML_DIGEST_SIZE:
        raise ParseError(
            f"{name}: declares {lists} TPML_DIGEST lists, the file holds {(n - base) // _TPML_DIGEST_SIZE}",
            structure=name,
            offset=_SEL_SIZE,
        )
    digests: list[bytes] = []
    for k in range(lists):
        off = base + k * _TPML_DIGEST_SIZE
        m = int.from_bytes(data[off : off + 4], "little")
        if m > 8:
            raise ParseError(f"{name}: TPML_DIGEST count {m} exceeds 8", structure=name, offset=off)
        for j in range(m):
            d = off + 4 + j * 66
            size = int.from_bytes(data[d : d + 2], "little")
            if size > 64:
                raise ParseError(f"{name}: TPM2B_DIGEST size {size} exceeds 64", structure=name, offset=d)
            digests.append(data[d + 2 : d + 2 + size])
    sel = tuple(selection)
    return sel, _assign(sel, digests, name)


def marshal_tools_serialized_pcrs(selection: tuple[PcrSelection, ...], values: PcrValues) -> bytes:
    """Write the tpm2-tools serialized PCR file for ``selection`` (what ``tpm2_checkquote -f`` reads)."""
    if len(selection) > MAX_BANKS:
        raise ParseError(f"tpm2-tools serialized PCRs: at most {MAX_BANKS} banks")
    out = bytearray(len(selection).to_bytes(4, "little"))
    for s in selection:
        out += struct.pack("<HB", s.hash_alg, s.size_of_select) + s.bitmap().ljust(4, b"\0") + b"\0"
    out += bytes(_SEL_SIZE - len(out))
    digests = []
    for alg, index in [(s.hash_alg, i) for s in selection for i in s.pcrs]:
        value = values.get(alg, index)
        if value is None:
            raise ParseError(f"tpm2-tools serialized PCRs: no value for {alg_name(alg)} PCR {index}")
        digests.append(value)
    chunks = [digests[k : k + 8] for k in range(0, len(digests), 8)]
    out += len(chunks).to_bytes(4, "little")
    for chunk in chunks:
        block = bytearray(len(chunk).to_bytes(4, "little"))
        for value in chunk:
            block += len(value).to_bytes(2, "little") + value.ljust(64, b"\0")
        out += block.ljust(_TPML_DIGEST_SIZE, b"\0")
    return bytes(out)


def parse_tools_values_pcrs(data: bytes, selection: tuple[PcrSelection, ...]) -> PcrValues:
    """Parse ``tpm2_quote -o FILE -F values``: the selected PCR values concatenated in selection order."""
    digests: list[bytes] = []
    pos = 0
    for alg, _index in [(s.hash_alg, i) for s in selection for i in s.pcrs]:
        size = DIGEST_SIZES.get(alg, 0)
        digests.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        raise ParseError(
            f"tpm2-tools PCR values: {len(data)} bytes, the selection needs {pos}", structure="pcr values"
        )
    return _assign(selection, digests, "tpm2-tools PCR values")


def load_pcr_values(data: bytes, selection: tuple[PcrSelection, ...] | None = None) -> PcrValues:
    """Read PCR values in any supported form, auto-detected: JSON text, tpm2-tools serialized, or (given the
    quote's ``selection``) tpm2-tools raw values."""
    if data.lstrip()[:1] == b"{":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError("PCR values JSON is not UTF-8") from None
        return PcrValues.from_json(text)
    try:
        return parse_tools_serialized_pcrs(data)[1]
    except ParseError:
        if selection is None:
            raise
    return parse_tools_values_pcrs(data, selection)
