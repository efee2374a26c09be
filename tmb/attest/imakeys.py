"""Keys trusted for IMA signatures and the keyring that finds them the ways signatures name them.

* ``keyid`` of a v2/v3 xattr signature: the last 4 bytes of the key's subjectKeyIdentifier (the kernel
  looks keys up by the tail of their X.509 SKID); for a certificate without that extension and for bare
  public keys it is the last 4 bytes of SHA-1 over the subjectPublicKey bits, which is how ``evmctl`` and
  OpenSSL derive it.
* PKCS#7 ``SignerInfo``: by SKID, or by the certificate's DER issuer name and serial number.

Keys load from PEM (``CERTIFICATE`` / ``PUBLIC KEY`` / ``RSA PUBLIC KEY`` blocks) or one DER certificate
or SubjectPublicKeyInfo; RSA and EC keys only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tmb.attest.der import _children, _read
from tmb.attest.sigtypes import SigningKey


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


def spki_key_id(public_key: SigningKey) -> bytes:
    """SHA-1 over the subjectPublicKey bits (RFC 5280 method 1 SKID; ``evmctl``'s key id source)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        raw = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    else:
        raw = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return hashlib.sha1(raw).digest()  # noqa: S324 (IMA key ids are SHA-1 by format)


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


def _issuer_and_serial(cert: x509.Certificate) -> tuple[bytes, int]:
    tbs = cert.tbs_certificate_bytes
    fields = _children(tbs, _read(tbs, 0, len(tbs)))
    if fields and fields[0].tag == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    issuer = fields[2]
    return tbs[issuer.start : issuer.end], cert.serial_number
