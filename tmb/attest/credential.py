"""TPM2_MakeCredential in pure Python: a secret only the TPM holding both the EK and the AK can recover.

TPM 2.0 Library Part 1, section 24 (credential protection), and Part 3 ``TPM2_MakeCredential``. The verifier
(no TPM needed) does, for the EK public area ``ek`` and the AK name ``name`` (nameAlg || H(TPMT_PUBLIC)):

1. a **seed**, protected to the EK (``nameAlg`` = the EK's name algorithm, ``|H|`` its digest size):

   * RSA EK: ``seed`` = ``|H|`` random bytes; the encrypted secret is RSA-OAEP(hash ``nameAlg``, label
     ``"IDENTITY\\0"``) of it;
   * ECC EK: an ephemeral key ``(d, Q)`` on the EK's curve; ``Z`` = x of ``d * EK``; ``seed`` =
     KDFe(nameAlg, Z, ``"IDENTITY"``, Q.x, EK.x, 8|H|); the encrypted secret is ``TPMS_ECC_POINT`` Q;

2. ``symKey`` = KDFa(nameAlg, seed, ``"STORAGE"``, name, ``""``, the EK's symmetric key bits);
3. ``encIdentity`` = the EK's symmetric cipher (AES-CFB, zero IV) over ``TPM2B_DIGEST(credential)``;
4. ``HMACkey`` = KDFa(nameAlg, seed, ``"INTEGRITY"``, ``""``, ``""``, 8|H|) and ``outerHMAC`` =
   HMAC_nameAlg(HMACkey, encIdentity || name);
5. ``TPM2B_ID_OBJECT`` = size || ``TPM2B_DIGEST(outerHMAC)`` || encIdentity, and ``TPM2B_ENCRYPTED_SECRET`` =
   size || the encrypted seed.

TPM2_ActivateCredential(AK, EK, idObject, secret) recovers the seed with the EK's private key, checks the
outer HMAC over the *loaded* AK's name and gives back the credential: proof that the AK with exactly that
public area is loaded in the TPM whose EK the verifier chose. KDFa is SP 800-108 in counter mode with
HMAC_nameAlg: ``HMAC(key, i || label || 0x00 || contextU || contextV || bits)`` (i and bits u32); KDFe is
SP 800-56A's concatenation KDF: ``H(i || Z || label || 0x00 || partyU || partyV)``.

Malformed or unusable EK public areas raise :class:`~tmb.errors.ParseError` / :class:`~tmb.errors.InputError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tmb.attest import tpm2
from tmb.attest.quote import load_ak
from tmb.attest.tpm2 import PublicArea
from tmb.errors import InputError

__all__ = ["Credential", "kdfa", "kdfe", "make_credential"]

_OAEP_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    tpm2.ALG_SHA1: hashes.SHA1,
    tpm2.ALG_SHA256: hashes.SHA256,
    tpm2.ALG_SHA384: hashes.SHA384,
    tpm2.ALG_SHA512: hashes.SHA512,
}
_IDENTITY = b"IDENTITY"


@dataclass(frozen=True)
class Credential:
    """What TPM2_MakeCredential returns, each in its TPM2B wire form (2-byte size first)."""

    id_object: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET


def _label(label: bytes) -> bytes:
    return label if label.endswith(b"\x00") else label + b"\x00"


def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """TPM KDFa (SP 800-108 counter mode, HMAC_hash); ``bits`` a multiple of 8."""
    if bits <= 0 or bits % 8:
        raise InputError(f"KDFa: {bits} bits is not a positive multiple of 8")
    name = tpm2.HASH_NAMES[hash_alg]
    fixed = _label(label) + context_u + context_v + struct.pack(">I", bits)
    out, counter = b"", 0
    while len(out) < bits // 8:
        counter += 1
        out += hmac.new(key, struct.pack(">I", counter) + fixed, name).digest()
    return out[: bits // 8]


def kdfe(hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """TPM KDFe (SP 800-56A concatenation KDF with H_hash); ``bits`` a multiple of 8."""
    if bits <= 0 or bits % 8:
        raise InputError(f"KDFe: {bits} bits is not a positive multiple of 8")
    other = _label(label) + party_u + party_v
    out, counter = b"", 0
    while len(out) < bits // 8:
        counter += 1
        out += hashlib.new(tpm2.HASH_NAMES[hash_alg], struct.pack(">I", counter) + z + other).digest()
    return out[: bits // 8]


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _seed_rsa(ek: rsa.RSAPublicKey, name_alg: int) -> tuple[bytes, bytes]:
    seed = os.urandom(tpm2.DIGEST_SIZES[name_alg])
    h = _OAEP_HASHES[name_alg]
    encrypted = ek.encrypt(seed, padding.OAEP(padding.MGF1(h()), h(), _IDENTITY + b"\x00"))
    return seed, encrypted


def _seed_ecc(ek: ec.EllipticCurvePublicKey, name_alg: int, coord: int) -> tuple[bytes, bytes]:
    ephemeral = ec.generate_private_key(ek.curve)
    q = ephemeral.public_key().public_numbers()
    qx, qy = q.x.to_bytes(coord, "big"), q.y.to_bytes(coord, "big")
    z = ephemeral.exchange(ec.ECDH(), ek)
    ek_x = ek.public_numbers().x.to_bytes(coord, "big")
    seed = kdfe(name_alg, z, _IDENTITY, qx, ek_x, 8 * tpm2.DIGEST_SIZES[name_alg])
    return seed, _tpm2b(qx) + _tpm2b(qy)


def _ek_area(ek_public: bytes | PublicArea) -> PublicArea:
    pub = ek_public if isinstance(ek_public, PublicArea) else load_ak(bytes(ek_public)).public
    if pub is None:
        raise InputError("MakeCredential needs the EK's TPM public area (TPM2B_PUBLIC), not a bare key")
    restricted_decrypt = 0x00010000 | 0x00020000
    if pub.object_attributes & restricted_decrypt != restricted_decrypt:
        raise InputError("the EK is not a restricted decryption key: the TPM would refuse ActivateCredential")
    if pub.symmetric[0] != tpm2.ALG_AES or pub.symmetric[2] != tpm2.ALG_CFB:
        raise InputError(
            "the EK's symmetric algorithm is not AES-CFB",
            symmetric=f"{tpm2.alg_name(pub.symmetric[0])}/{tpm2.alg_name(pub.symmetric[2])}",
        )
    if pub.name_alg not in tpm2.HASH_NAMES:
        raise InputError(f"unsupported EK name algorithm {tpm2.alg_name(pub.name_alg)}")
    return pub


def make_credential(ek_public: bytes | PublicArea, ak_name: bytes, credential: bytes) -> Credential:
    """Protect ``credential`` (1 to |H_nameAlg(EK)| bytes) for the AK named ``ak_name`` in the TPM holding
    the EK ``ek_public`` (``TPM2B_PUBLIC``/``TPMT_PUBLIC`` bytes or a parsed :class:`PublicArea`)."""
    pub = _ek_area(ek_public)
    name_alg = pub.name_alg
    size = tpm2.DIGEST_SIZES[name_alg]
    if not 0 < len(credential) <= size:
        raise InputError(f"the credential must have 1 to {size} bytes, got {len(credential)}")
    name_size = tpm2.DIGEST_SIZES.get(int.from_bytes(ak_name[:2], "big"), -1)
    if len(ak_name) != 2 + name_size:
        raise InputError("the AK name must be nameAlg (2 bytes) || digest", name=ak_name.hex())
    key = load_ak(pub.raw).key
    if isinstance(key, rsa.RSAPublicKey):
        seed, encrypted = _seed_rsa(key, name_alg)
    else:
        seed, encrypted = _seed_ecc(key, name_alg, tpm2.ECC_COORD_SIZES[pub.curve])
    return Credential(_wrap(pub, ak_name, credential, seed), _tpm2b(encrypted))


def _wrap(pub: PublicArea, ak_name: bytes, credential: bytes, seed: bytes) -> bytes:
    """The ``TPM2B_ID_OBJECT`` for ``credential`` under ``seed`` (steps 2 to 5)."""
    name_alg = pub.name_alg
    sym_key = kdfa(name_alg, seed, b"STORAGE", ak_name, b"", pub.symmetric[1])
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_tpm2b(credential)) + encryptor.finalize()
    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", b"", 8 * tpm2.DIGEST_SIZES[name_alg])
    outer = hmac.new(hmac_key, enc_identity + ak_name, tpm2.HASH_NAMES[name_alg]).digest()
    return _tpm2b(_tpm2b(outer) + enc_identity)
