"""What the IMA signature modules share: the kernel's ``enum hash_algo`` names, the hashes
``cryptography`` can verify with, the outcome of one signature check (:class:`SigResult` and its
status constants) and the prehashed RSA/ECDSA verification both signature formats end in."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

SigningKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

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
