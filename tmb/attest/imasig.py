"""IMA file signatures: the ``sig`` field of ``ima-sig``/``ima-modsig`` entries and the appended module
signature (``modsig``) of ``ima-modsig`` entries, verified against a keyring of X.509 certificates or
public keys.

**xattr signatures** (``security.ima``, what ``evmctl ima_sign`` writes and the kernel copies into the
``sig`` field): ``struct signature_v2_hdr``, big-endian, packed::

    u8 type (0x03 EVM_IMA_XATTR_DIGSIG) | u8 version | u8 hash_algo | u32 keyid | u16 sig_size | sig

* version 2: the signature is over the file digest itself (the entry's ``d-ng`` digest) with
  ``hash_algo``; RSA is PKCS#1 v1.5 with the DigestInfo of that hash, ECDSA a DER ``ECDSA-Sig-Value``.
* version 3 (``sigv3``): the signature is over ``hash_algo(struct ima_file_id)`` where ``ima_file_id`` =
  ``u8 type | u8 hash_algo | digest`` (only the digest's own length, not the 64-byte maximum).
* ``keyid`` is the last 4 bytes of the key's subjectKeyIdentifier (the kernel looks keys up by the tail
  of their X.509 SKID); for a certificate without that extension and for bare public keys it is the
  last 4 bytes of SHA-1 over the subjectPublicKey bits, which is how ``evmctl`` and OpenSSL derive it.

**Appended signatures** (``ima-modsig``): a file that ends in ``sig | struct module_signature |
"~Module signature appended~\\n"``; IMA logs the PKCS#7 blob in ``modsig`` and, in ``d-modsig``, the
digest of the file without the appended part. The blob is CMS/PKCS#7 ``SignedData`` with detached
``id-data`` content (``sign-file`` makes it with ``openssl cms -sign -binary -nocerts -noattr``). Each
``SignerInfo`` names its key by issuer and serial number or by SKID; without signed attributes the
signature is over ``d-modsig``; with them, the ``messageDigest`` attribute must equal ``d-modsig`` and the
signature is over the DER ``SET OF`` attributes (older kernels log the digest of those attributes as
``d-modsig``, which is accepted too). ``cryptography`` has no PKCS#7 verifier, so the SignedData is
parsed here with a small DER reader.

Not supported (``imasig.unsupported``): signature version 1 (the pre-2013 RSA ``digsig`` format),
EVM portable signatures (type 0x05) and fs-verity signatures (type 0x06, which sign the fs-verity digest
that only the ``ima-ngv2``/``ima-sigv2`` templates record), SM2, EC-RDSA/Streebog, MD5, RSA-PSS, PKCS#7
embedded content and certificate chains (the signer must itself be in the keyring).
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tmb.attest.ima import ImaEntry, ImaFields
from tmb.errors import Report, Severity

SigningKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

EVM_IMA_XATTR_DIGSIG = 0x03
EVM_XATTR_PORTABLE_DIGSIG = 0x05
IMA_VERITY_DIGSIG = 0x06
MODSIG_MAGIC = b"~Module signature appended~\n"
PKEY_ID_PKCS7 = 2
_SIG_HDR = struct.Struct(">BBBIH")
_MODSIG_HDR = struct.Struct(">BBBBB3xI")  # struct module_signature

# enum hash_algo (include/uapi/linux/hash_info.h), named as IMA names them in d-ng fields.
HASH_ALGO_NAMES: dict[int, str] = {
    0: "md4",
    1: "md5",
    2: "sha1",
    3: "rmd160",
    4: "sha256",
    5: "sha384",
    6: "sha512",
    7: "sha224",
    8: "rmd128",
    9: "rmd256",
    10: "rmd320",
    11: "wp256",
    12: "wp384",
    13: "wp512",
    14: "tgr128",
    15: "tgr160",
    16: "tgr192",
    17: "sm3",
    18: "streebog256",
    19: "streebog512",
    20: "sha3-256",
    21: "sha3-384",
    22: "sha3-512",
}
HASH_ALGO_IDS = {name: num for num, name in HASH_ALGO_NAMES.items()} | {"sm3-256": 17}

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3-256": hashes.SHA3_256,
    "sha3-384": hashes.SHA3_384,
    "sha3-512": hashes.SHA3_512,
}

# Result states.
VALID = "valid"
BAD = "bad_signature"
UNKNOWN_KEY = "unknown_key"
UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class TrustedKey:
    """A public key the verifier trusts for IMA signatures, with the identifiers signatures use to name
    it: ``key_ids`` (4-byte v2 key ids), ``skid`` (full subjectKeyIdentifier) and, for certificates,
    the DER issuer name and serial number (PKCS#7 ``IssuerAndSerialNumber``)."""

    public_key: SigningKey
    key_ids: frozenset[bytes]
    skid: bytes
    source: str
    subject: str = ""
    issuer: bytes | None = None
    serial: int | None = None


@dataclass(frozen=True)
class SigResult:
    """The outcome of verifying one signature: ``status`` is one of ``valid``, ``bad_signature``,
    ``unknown_key``, ``unsupported``; ``kind`` says which signature (``ima-sig v2``, ``modsig``, ...)."""

    status: str
    kind: str
    reason: str = ""
    key_id: str = ""
    key: str = ""

    @property
    def ok(self) -> bool:
        return self.status == VALID


# ------------------------------------------------------------------------------------------- keys


def spki_key_id(public_key: SigningKey) -> bytes:
    """SHA-1 over the subjectPublicKey bits (RFC 5280 method 1 SKID; ``evmctl``'s key id source)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        raw = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    else:
        raw = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return hashlib.sha1(raw).digest()


def _signing_key(key: object, source: str) -> SigningKey:
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return key
    raise ValueError(f"{source}: unsupported key type {type(key).__name__} (RSA or EC keys only)")


def key_from_certificate(cert: x509.Certificate, source: str) -> TrustedKey:
    pub = _signing_key(cert.public_key(), source)
    try:
        skid = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        skid = spki_key_id(pub)
    issuer, serial = _issuer_and_serial(cert)
    return TrustedKey(
        pub, frozenset({skid[-4:]}), skid, source, cert.subject.rfc4514_string(), issuer, serial
    )


def key_from_public_key(key: object, source: str, key_id: bytes | None = None) -> TrustedKey:
    """A bare public key; ``key_id`` (4 bytes) overrides the computed one (Keylime's ``keyids``)."""
    pub = _signing_key(key, source)
    skid = spki_key_id(pub)
    ids = {skid[-4:]} | ({key_id} if key_id is not None else set())
    return TrustedKey(pub, frozenset(ids), skid, source)


_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)


def load_keys(data: bytes, source: str) -> list[TrustedKey]:
    """Every certificate or public key in ``data``: PEM (any number of ``CERTIFICATE`` / ``PUBLIC KEY``
    blocks; other blocks are ignored) or one DER certificate or SubjectPublicKeyInfo. ValueError when
    nothing usable is found or a key is not RSA/EC."""
    out: list[TrustedKey] = []
    blocks = list(_PEM.finditer(data))
    if blocks:
        for i, m in enumerate(blocks):
            kind, where = m.group(1), f"{source}[{i}]" if len(blocks) > 1 else source
            if kind in (b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"):
                out.append(key_from_certificate(x509.load_pem_x509_certificate(m.group(0)), where))
            elif kind in (b"PUBLIC KEY", b"RSA PUBLIC KEY"):
                pem = m.group(0)
                key = (
                    serialization.load_pem_public_key(pem)
                    if kind == b"PUBLIC KEY"
                    else serialization.load_der_public_key(_rsa_spki(pem))
                )
                out.append(key_from_public_key(key, where))
        if not out:
            raise ValueError(f"{source}: no CERTIFICATE or PUBLIC KEY block")
        return out
    try:
        return [key_from_certificate(x509.load_der_x509_certificate(data), source)]
    except ValueError:
        pass
    try:
        return [key_from_public_key(serialization.load_der_public_key(data), source)]
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{source}: not a PEM/DER X.509 certificate or public key") from None


def _rsa_spki(pem: bytes) -> bytes:
    """A PKCS#1 ``RSA PUBLIC KEY`` PEM block wrapped as SubjectPublicKeyInfo DER."""
    body = b"".join(pem.splitlines()[1:-1])
    pkcs1 = base64.b64decode(body)
    alg = bytes.fromhex("300d06092a864886f70d0101010500")
    bits = _tlv(0x03, b"\0" + pkcs1)
    return _tlv(0x30, alg + bits)


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def load_key_file(path: str | Path) -> list[TrustedKey]:
    """Keys from a PEM or DER file; OSError/ValueError as the callers report them."""
    return load_keys(Path(path).read_bytes(), str(path))


class Keyring:
    """Trusted keys indexed the ways signatures name them. Not thread-safe; one per evaluation."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: list[TrustedKey] = []
        self._by_id: dict[bytes, list[TrustedKey]] = {}
        for key in keys:
            self.add(key)

    def add(self, key: TrustedKey) -> None:
        if any(k.public_key == key.public_key and k.key_ids >= key.key_ids for k in self._keys):
            return
        self._keys.append(key)
        for kid in key.key_ids:
            self._by_id.setdefault(kid, []).append(key)

    def by_key_id(self, key_id: bytes) -> list[TrustedKey]:
        return list(self._by_id.get(key_id, ()))

    def by_skid(self, skid: bytes) -> list[TrustedKey]:
        return [k for k in self._keys if k.skid == skid]

    def by_issuer_serial(self, issuer: bytes, serial: int) -> list[TrustedKey]:
        return [k for k in self._keys if k.issuer == issuer and k.serial == serial]

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._keys)


# ------------------------------------------------------------------------------ xattr signatures


def _verify_prehashed(key: SigningKey, sig: bytes, digest: bytes, alg: hashes.HashAlgorithm) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, digest, padding.PKCS1v15(), Prehashed(alg))
        else:
            key.verify(sig, digest, ec.ECDSA(Prehashed(alg)))
    except (InvalidSignature, ValueError):
        return False
    return True


def _hash(alg: str, data: bytes) -> bytes:
    h = hashes.Hash(_HASHES[alg]())
    h.update(data)
    return h.finalize()


def file_id_digest(xattr_type: int, alg: str, digest: bytes) -> bytes:
    """The sigv3 signed digest: ``alg(u8 type | u8 hash_algo | digest)`` (``struct ima_file_id``)."""
    return _hash(alg, bytes([xattr_type, HASH_ALGO_IDS[alg]]) + digest)


def verify_digsig(sig: bytes, alg: str, digest: bytes, keyring: Keyring) -> SigResult:
    """Verify an IMA xattr signature (the ``sig`` field, starting with its type byte) over a file digest
    of algorithm ``alg`` (the entry's ``d-ng``), the way the kernel's ``integrity_digsig_verify`` does."""
    if len(sig) < 2:
        return SigResult(BAD, "ima-sig", "signature shorter than its type and version bytes")
    xtype, version = sig[0], sig[1]
    kind = f"ima-sig v{version}"
    if xtype != EVM_IMA_XATTR_DIGSIG:
        what = {EVM_XATTR_PORTABLE_DIGSIG: "an EVM portable signature", IMA_VERITY_DIGSIG: "an fs-verity"}
        return SigResult(UNSUPPORTED, kind, f"xattr type 0x{xtype:02x} ({what.get(xtype, 'unknown')})")
    if version not in (2, 3):
        return SigResult(UNSUPPORTED, kind, f"signature format version {version}")
    if len(sig) <= _SIG_HDR.size:
        return SigResult(BAD, kind, "signature header truncated")
    _, _, algo_id, keyid, size = _SIG_HDR.unpack_from(sig)
    body = sig[_SIG_HDR.size :]
    kid = f"{keyid:08x}"
    if size != len(body):
        return SigResult(BAD, kind, f"header says {size} signature bytes, {len(body)} follow", kid)
    sig_alg = HASH_ALGO_NAMES.get(algo_id)
    if sig_alg is None:
        return SigResult(BAD, kind, f"hash algorithm id {algo_id} is not a kernel hash_algo", kid)
    hash_cls = _HASHES.get(sig_alg)
    if hash_cls is None:
        return SigResult(UNSUPPORTED, kind, f"hash algorithm {sig_alg}", kid)
    keys = keyring.by_key_id(keyid.to_bytes(4, "big"))
    if not keys:
        return SigResult(UNKNOWN_KEY, kind, "no key with this key id in the keyring", kid)
    if HASH_ALGO_IDS.get(alg) != algo_id:
        return SigResult(BAD, kind, f"signature is over a {sig_alg} digest, the entry has {alg}", kid)
    signed = digest if version == 2 else file_id_digest(xtype, sig_alg, digest)
    for key in keys:
        if _verify_prehashed(key.public_key, body, signed, hash_cls()):
            return SigResult(VALID, kind, "", kid, key.source)
    return SigResult(BAD, kind, "signature does not verify", kid, ", ".join(k.source for k in keys))


# ------------------------------------------------------------------------------------ DER reading


class _Tlv(NamedTuple):
    tag: int
    start: int  # first byte of the tag
    body: int  # first byte of the contents
    body_end: int  # end of the contents (before an end-of-contents marker)
    end: int  # first byte after the element


def _read(buf: bytes, pos: int, limit: int) -> _Tlv:
    if pos + 2 > limit:
        raise ValueError("DER element runs past its container")
    tag, first = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used by PKCS#7")
    p = pos + 2
    if first == 0x80:  # BER indefinite length (constructed only): children up to 00 00
        if not tag & 0x20:
            raise ValueError("indefinite length on a primitive element")
        q = p
        while True:
            if q + 2 > limit:
                raise ValueError("indefinite-length element has no end-of-contents")
            if buf[q] == 0 and buf[q + 1] == 0:
                return _Tlv(tag, pos, p, q, q + 2)
            q = _read(buf, q, limit).end
    if first & 0x80:
        n = first & 0x7F
        if n > 4 or p + n > limit:
            raise ValueError("DER length field invalid")
        length = int.from_bytes(buf[p : p + n], "big")
        p += n
    else:
        length = first
    if p + length > limit:
        raise ValueError("DER element runs past its container")
    return _Tlv(tag, pos, p, p + length, p + length)


def _children(buf: bytes, node: _Tlv) -> list[_Tlv]:
    out, pos = [], node.body
    while pos < node.body_end:
        child = _read(buf, pos, node.body_end)
        out.append(child)
        pos = child.end
    return out


def _expect(node: _Tlv, tag: int, what: str) -> _Tlv:
    if node.tag != tag:
        raise ValueError(f"{what}: expected tag 0x{tag:02x}, got 0x{node.tag:02x}")
    return node


def _oid(buf: bytes, node: _Tlv) -> str:
    raw = buf[_expect(node, 0x06, "OBJECT IDENTIFIER").body : node.body_end]
    if not raw:
        raise ValueError("empty OBJECT IDENTIFIER")
    parts, value = [], 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    first = min(parts[0] // 40, 2)
    return ".".join(str(p) for p in [first, parts[0] - 40 * first, *parts[1:]])


def _issuer_and_serial(cert: x509.Certificate) -> tuple[bytes, int]:
    tbs = cert.tbs_certificate_bytes
    fields = _children(tbs, _read(tbs, 0, len(tbs)))
    if fields and fields[0].tag == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    issuer = fields[2]
    return tbs[issuer.start : issuer.end], cert.serial_number


# ----------------------------------------------------------------------- PKCS#7 (appended) signatures

_OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
_OID_DATA = "1.2.840.113549.1.7.1"
_OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_DIGEST_OIDS = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.8": "sha3-256",
    "2.16.840.1.101.3.4.2.9": "sha3-384",
    "2.16.840.1.101.3.4.2.10": "sha3-512",
}
_RSA_SIG_OIDS = {"1.2.840.113549.1.1.1"} | {f"1.2.840.113549.1.1.{n}" for n in (5, 11, 12, 13, 14)}
_RSA_SIG_OIDS |= {f"2.16.840.1.101.3.4.3.{n}" for n in (13, 14, 15, 16)}  # RSA with SHA-3
_EC_SIG_OIDS = {"1.2.840.10045.2.1", "1.2.840.10045.4.1"} | {f"1.2.840.10045.4.3.{n}" for n in (1, 2, 3, 4)}
_EC_SIG_OIDS |= {f"2.16.840.1.101.3.4.3.{n}" for n in (9, 10, 11, 12)}  # ECDSA with SHA-3


@dataclass(frozen=True)
class _SignerInfo:
    issuer: bytes | None
    serial: int | None
    skid: bytes | None
    digest_alg: str  # "" when unknown
    digest_oid: str
    sig_oid: str
    signed_attrs: bytes | None  # DER SET OF, tag already turned into 0x31
    message_digest: bytes | None
    content_type: str | None
    signature: bytes


def _parse_signed_data(blob: bytes) -> tuple[str, bool, list[_SignerInfo]]:
    """(encapsulated content type, content present?, signer infos) of a PKCS#7/CMS SignedData blob."""
    top = _read(blob, 0, len(blob))
    if top.end != len(blob):
        raise ValueError(f"{len(blob) - top.end} bytes after the PKCS#7 ContentInfo")
    ci = _children(blob, _expect(top, 0x30, "ContentInfo"))
    if len(ci) < 2 or _oid(blob, ci[0]) != _OID_SIGNED_DATA:
        raise ValueError("not a PKCS#7 SignedData ContentInfo")
    (sd,) = _children(blob, _expect(ci[1], 0xA0, "ContentInfo content"))
    parts = _children(blob, _expect(sd, 0x30, "SignedData"))
    if len(parts) < 4:
        raise ValueError("SignedData has too few fields")
    encap = _children(blob, _expect(parts[2], 0x30, "EncapsulatedContentInfo"))
    content_type = _oid(blob, encap[0])
    signer_set = _expect(parts[-1], 0x31, "SignerInfos")
    return content_type, len(encap) > 1, [_signer_info(blob, s) for s in _children(blob, signer_set)]


def _signer_info(blob: bytes, node: _Tlv) -> _SignerInfo:
    f = _children(blob, _expect(node, 0x30, "SignerInfo"))
    if len(f) < 5:
        raise ValueError("SignerInfo has too few fields")
    issuer = serial = skid = None
    sid = f[1]
    if sid.tag == 0x30:  # IssuerAndSerialNumber
        name, num = _children(blob, sid)
        issuer = blob[name.start : name.end]
        serial = int.from_bytes(
            blob[_expect(num, 0x02, "serialNumber").body : num.body_end], "big", signed=True
        )
    elif sid.tag == 0x80:  # [0] IMPLICIT SubjectKeyIdentifier
        skid = blob[sid.body : sid.body_end]
    else:
        raise ValueError(f"unknown SignerIdentifier tag 0x{sid.tag:02x}")
    digest_oid = _oid(blob, _children(blob, _expect(f[2], 0x30, "digestAlgorithm"))[0])
    rest = f[3:]
    attrs = message_digest = content_type = None
    if rest[0].tag == 0xA0:  # [0] IMPLICIT signedAttrs: signed as a DER SET OF
        node_attrs = rest[0]
        attrs = b"\x31" + blob[node_attrs.start + 1 : node_attrs.end]
        for attr in _children(blob, node_attrs):
            a_oid, values = _children(blob, _expect(attr, 0x30, "Attribute"))
            vals = _children(blob, _expect(values, 0x31, "AttributeValues"))
            oid = _oid(blob, a_oid)
            if oid == _OID_MESSAGE_DIGEST and len(vals) == 1:
                message_digest = blob[_expect(vals[0], 0x04, "messageDigest").body : vals[0].body_end]
            elif oid == _OID_CONTENT_TYPE and len(vals) == 1:
                content_type = _oid(blob, vals[0])
        rest = rest[1:]
    if len(rest) < 2:
        raise ValueError("SignerInfo lacks its signature")
    sig_oid = _oid(blob, _children(blob, _expect(rest[0], 0x30, "signatureAlgorithm"))[0])
    signature = blob[_expect(rest[1], 0x04, "signature").body : rest[1].body_end]
    return _SignerInfo(
        issuer,
        serial,
        skid,
        _DIGEST_OIDS.get(digest_oid, ""),
        digest_oid,
        sig_oid,
        attrs,
        message_digest,
        content_type,
        signature,
    )


def _verify_signer(si: _SignerInfo, alg: str, digest: bytes, keyring: Keyring) -> SigResult:
    kind = "modsig"
    kid = si.skid.hex() if si.skid is not None else f"serial={si.serial}"
    if not si.digest_alg:
        return SigResult(UNSUPPORTED, kind, f"digest algorithm {si.digest_oid}", kid)
    rsa_sig, ec_sig = si.sig_oid in _RSA_SIG_OIDS, si.sig_oid in _EC_SIG_OIDS
    if not (rsa_sig or ec_sig):
        return SigResult(UNSUPPORTED, kind, f"signature algorithm {si.sig_oid}", kid)
    if si.skid is not None:
        keys = keyring.by_skid(si.skid)
    else:
        assert si.issuer is not None and si.serial is not None
        keys = keyring.by_issuer_serial(si.issuer, si.serial)
    if not keys:
        return SigResult(UNKNOWN_KEY, kind, "the signer is not in the keyring", kid)
    if alg != si.digest_alg:
        return SigResult(BAD, kind, f"signer digests with {si.digest_alg}, the entry has {alg}", kid)
    hash_alg = _HASHES[si.digest_alg]()
    signed = digest
    if si.signed_attrs is not None:
        attrs_digest = _hash(si.digest_alg, si.signed_attrs)
        if si.message_digest is None:
            return SigResult(BAD, kind, "signed attributes lack a messageDigest", kid)
        if digest not in (si.message_digest, attrs_digest):
            return SigResult(BAD, kind, "messageDigest does not match the measured d-modsig", kid)
        if si.content_type is not None and si.content_type != _OID_DATA:
            return SigResult(BAD, kind, f"contentType attribute {si.content_type}", kid)
        signed = attrs_digest
    for key in keys:
        if isinstance(key.public_key, rsa.RSAPublicKey) != rsa_sig:
            continue
        if _verify_prehashed(key.public_key, si.signature, signed, hash_alg):
            return SigResult(VALID, kind, "", kid, key.source)
    return SigResult(BAD, kind, "signature does not verify", kid, ", ".join(k.source for k in keys))


def verify_modsig(pkcs7: bytes, alg: str, digest: bytes, keyring: Keyring) -> SigResult:
    """Verify the PKCS#7 blob of an ``ima-modsig`` entry over its ``d-modsig`` digest (algorithm
    ``alg``). Every SignerInfo whose key is in the keyring must verify; at least one must be known."""
    try:
        content_type, embedded, signers = _parse_signed_data(pkcs7)
    except (ValueError, IndexError) as exc:
        return SigResult(BAD, "modsig", f"malformed PKCS#7: {exc}")
    if content_type != _OID_DATA:
        return SigResult(BAD, "modsig", f"PKCS#7 content type {content_type} is not id-data")
    if embedded:
        return SigResult(UNSUPPORTED, "modsig", "PKCS#7 with embedded content (expected detached)")
    if not signers:
        return SigResult(BAD, "modsig", "PKCS#7 has no SignerInfo")
    results = [_verify_signer(si, alg, digest, keyring) for si in signers]
    for status in (BAD, VALID, UNKNOWN_KEY):
        for r in results:
            if r.status == status:
                return r
    return results[0]


def split_appended_signature(data: bytes) -> tuple[bytes, bytes]:
    """Split a file carrying an appended signature into (content, PKCS#7 blob), checking
    ``struct module_signature`` the way the kernel's ``mod_check_sig`` does. ValueError if malformed."""
    if not data.endswith(MODSIG_MAGIC):
        raise ValueError("no '~Module signature appended~' marker")
    end = len(data) - len(MODSIG_MAGIC) - _MODSIG_HDR.size
    if end < 0:
        raise ValueError("file too short for struct module_signature")
    algo, hash_, id_type, signer_len, key_id_len, sig_len = _MODSIG_HDR.unpack_from(data, end)
    if id_type != PKEY_ID_PKCS7:
        raise ValueError(f"module signature id_type {id_type} is not PKCS#7")
    if algo or hash_ or signer_len or key_id_len or any(data[end + 5 : end + 8]):
        raise ValueError("struct module_signature has non-zero fields a PKCS#7 signature leaves empty")
    if sig_len == 0 or sig_len > end:
        raise ValueError(f"signature length {sig_len} does not fit the file")
    return data[: end - sig_len], data[end - sig_len : end]


def append_signature(content: bytes, pkcs7: bytes) -> bytes:
    """``content`` with ``pkcs7`` appended in the kernel module signature format (what sign-file does)."""
    return content + pkcs7 + _MODSIG_HDR.pack(0, 0, PKEY_ID_PKCS7, 0, 0, len(pkcs7)) + MODSIG_MAGIC


# ----------------------------------------------------------------------------------- log evaluation

MEASURED_KEYRING = ".ima"  # keys the kernel accepted onto the trusted IMA keyring (ima-buf entries)
FILE_TEMPLATES = frozenset({"ima", "ima-ng", "ima-sig", "ima-modsig"})


class SignatureChecker:
    """Checks the signatures of IMA entries one at a time, as a :class:`~tmb.attest.policy.PolicyChecker`
    sees them, and reports ``imasig.*`` findings into ``report``:

    * ``imasig.bad_signature`` (error): a signature that is malformed, or that names a key of the
      keyring and does not verify over the measured digest;
    * ``imasig.unknown_key`` / ``imasig.unsupported``: the signing key is not in the keyring / the format
      or algorithm is not supported. Errors for files under a required prefix; elsewhere the signature
      is simply not counted (the allowlist decides about the file);
    * ``imasig.missing`` (error): a file under a required prefix has no signature at all.

    Keys measured onto the ``.ima`` keyring are added with :meth:`add_measured_key` (the policy decides
    when); they count for the entries after them, as they did in the kernel."""

    def __init__(self, keys: Iterable[TrustedKey], require_prefixes: Iterable[str], report: Report) -> None:
        self.keyring = Keyring(keys)
        self.prefixes = tuple(require_prefixes)
        self.report = report

    def required(self, path: str) -> bool:
        return any(path.startswith(p) for p in self.prefixes)

    def check(self, entry: ImaEntry, fields: ImaFields) -> bool:
        """Verify what the entry carries; True when it has a valid signature and no bad one."""
        if entry.template_name not in FILE_TEMPLATES:
            return False
        required = self.required(fields.name)
        results: list[SigResult] = []
        if fields.sig:
            results.append(verify_digsig(fields.sig, fields.digest_alg, fields.digest, self.keyring))
        if fields.modsig:
            results.append(
                verify_modsig(fields.modsig, fields.modsig_digest_alg, fields.modsig_digest, self.keyring)
            )
        where = {**entry.where(), "path": fields.name}
        if not results:
            if required:
                bare = entry.template_name in ("ima", "ima-ng")
                what = "its template has no signature field" if bare else "its signature field is empty"
                self.report.add(
                    "imasig.missing",
                    f"a file under a prefix that requires a signature is not signed ({what})",
                    **where,
                    template=entry.template_name,
                    prefix=next(p for p in self.prefixes if fields.name.startswith(p)),
                )
            return False
        bad = [r for r in results if r.status == BAD]
        for r in bad:
            self.report.add(
                "imasig.bad_signature", f"{r.kind} signature invalid: {r.reason}", **where, **_ctx(r)
            )
        if bad:
            return False
        if any(r.ok for r in results):
            return True
        if required:
            for r in results:
                if r.status == UNKNOWN_KEY:
                    self.report.add(
                        "imasig.unknown_key",
                        f"{r.kind} signature by a key that is not in the keyring",
                        **where,
                        **_ctx(r),
                    )
                else:
                    self.report.add(
                        "imasig.unsupported",
                        f"{r.kind} signature cannot be verified: {r.reason}",
                        **where,
                        **_ctx(r),
                    )
        return False

    def add_measured_key(self, entry: ImaEntry, fields: ImaFields) -> None:
        """Trust the key in an ``ima-buf`` ``.ima`` keyring measurement (its DER certificate)."""
        source = f"{MEASURED_KEYRING} key measured at entry {entry.num}"
        try:
            keys = load_keys(fields.buf, source)
        except ValueError as exc:
            self.report.add(
                "imasig.unsupported",
                f"measured {MEASURED_KEYRING} key not usable: {exc}",
                severity=Severity.WARNING,
                **entry.where(),
                path=fields.name,
            )
            return
        for key in keys:
            self.keyring.add(key)


def _ctx(r: SigResult) -> dict[str, Any]:
    ctx: dict[str, Any] = {"kind": r.kind}
    if r.key_id:
        ctx["key_id"] = r.key_id
    if r.key:
        ctx["key"] = r.key
    if r.reason and r.status != VALID:
        ctx["reason"] = r.reason
    return ctx
