"""Appended signatures (``ima-modsig``): a file that ends in ``sig | struct module_signature |
"~Module signature appended~\\n"``; IMA logs the PKCS#7 blob in ``modsig`` and, in ``d-modsig``, the
digest of the file without the appended part. The blob is CMS/PKCS#7 ``SignedData`` with detached
``id-data`` content (``sign-file`` makes it with ``openssl cms -sign -binary -nocerts -noattr``). Each
``SignerInfo`` names its key by issuer and serial number or by SKID; without signed attributes the
signature is over ``d-modsig``; with them, the ``messageDigest`` attribute must equal ``d-modsig`` and the
signature is over the DER ``SET OF`` attributes (older kernels log the digest of those attributes as
``d-modsig``, which is accepted too). ``cryptography`` has no PKCS#7 verifier, so the SignedData is
parsed with the small DER reader of :mod:`tmb.attest.der`.

Not supported: PKCS#7 embedded content and certificate chains (the signer must itself be in the keyring).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa

from tmb.attest.der import _children, _expect, _oid, _read, _Tlv
from tmb.attest.imakeys import Keyring
from tmb.attest.sigtypes import (
    _HASHES,
    BAD,
    UNKNOWN_KEY,
    UNSUPPORTED,
    VALID,
    SigResult,
    _hash,
    _verify_prehashed,
)

MODSIG_MAGIC = b"~Module signature appended~\n"
PKEY_ID_PKCS7 = 2
_MODSIG_HDR = struct.Struct(">BBBBB3xI")  # struct module_signature

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
        assert si.issuer is not None and si.serial is not None  # noqa: S101 (no skid: the parser set both)
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
