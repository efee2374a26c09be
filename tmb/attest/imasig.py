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

**Appended signatures** (``ima-modsig``, PKCS#7) are verified in :mod:`tmb.attest.modsig`, the keys and
keyring in :mod:`tmb.attest.imakeys`; this module re-exports their public names.

Not supported (``imasig.unsupported``): signature version 1 (the pre-2013 RSA ``digsig`` format),
EVM portable signatures (type 0x05) and fs-verity signatures (type 0x06, which sign the fs-verity digest
that only the ``ima-ngv2``/``ima-sigv2`` templates record), SM2, EC-RDSA/Streebog, MD5, RSA-PSS, PKCS#7
embedded content and certificate chains (the signer must itself be in the keyring).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from tmb.attest.ima import ImaEntry, ImaFields
from tmb.attest.imakeys import (
    Keyring,
    TrustedKey,
    key_from_certificate,
    key_from_public_key,
    load_key_file,
    load_keys,
    spki_key_id,
)
from tmb.attest.modsig import (
    MODSIG_MAGIC,
    PKEY_ID_PKCS7,
    append_signature,
    split_appended_signature,
    verify_modsig,
)
from tmb.attest.sigtypes import (
    _HASHES,
    BAD,
    HASH_ALGO_IDS,
    HASH_ALGO_NAMES,
    UNKNOWN_KEY,
    UNSUPPORTED,
    VALID,
    SigningKey,
    SigResult,
    _hash,
    _verify_prehashed,
)
from tmb.errors import Report, Severity

__all__ = [
    "BAD",
    "EVM_IMA_XATTR_DIGSIG",
    "EVM_XATTR_PORTABLE_DIGSIG",
    "FILE_TEMPLATES",
    "HASH_ALGO_IDS",
    "HASH_ALGO_NAMES",
    "IMA_VERITY_DIGSIG",
    "MEASURED_KEYRING",
    "MODSIG_MAGIC",
    "PKEY_ID_PKCS7",
    "UNKNOWN_KEY",
    "UNSUPPORTED",
    "VALID",
    "Keyring",
    "SigResult",
    "SignatureChecker",
    "SigningKey",
    "TrustedKey",
    "append_signature",
    "file_id_digest",
    "key_from_certificate",
    "key_from_public_key",
    "load_key_file",
    "load_keys",
    "spki_key_id",
    "split_appended_signature",
    "verify_digsig",
    "verify_modsig",
]

EVM_IMA_XATTR_DIGSIG = 0x03
EVM_XATTR_PORTABLE_DIGSIG = 0x05
IMA_VERITY_DIGSIG = 0x06
_SIG_HDR = struct.Struct(">BBBIH")


# ------------------------------------------------------------------------------ xattr signatures


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
