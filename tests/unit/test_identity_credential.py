"""TPM2_MakeCredential in pure Python (tmb.attest.credential), cross-checked against tpm2-pytss with software
EKs: its KDFs, its ID object for the same seed, and its encrypted seed opened the way the TPM opens it. The
TPM itself opens them in tests/integration/test_identity_swtpm.py."""

from __future__ import annotations

import os

import pytest
from identity_support import AK_ATTRS, EK_ATTRS, new_key, software_ek, tpm_public
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.internal import crypto as pytss_crypto
from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_SENSITIVE
from tpm2_pytss.utils import make_credential as pytss_make_credential

from tmb.attest import credential, tpm2
from tmb.attest.credential import kdfa, kdfe, make_credential
from tmb.errors import InputError

_secret_to_seed = pytss_crypto._secret_to_seed


def test_kdfs_match_tpm2_pytss() -> None:
    for bits in (128, 256, 264, 1024):
        key, ctx_u, ctx_v = os.urandom(32), os.urandom(34), os.urandom(5)
        assert kdfa(tpm2.ALG_SHA256, key, b"STORAGE", ctx_u, ctx_v, bits) == pytss_crypto._kdfa(
            TPM2_ALG.SHA256, key, b"STORAGE", ctx_u, ctx_v, bits
        )
        assert kdfe(tpm2.ALG_SHA384, key, b"IDENTITY", ctx_u, ctx_v, bits) == pytss_crypto.kdfe(
            TPM2_ALG.SHA384, key, b"IDENTITY\x00", ctx_u, ctx_v, bits
        )


def _sensitive(key: object) -> TPMT_SENSITIVE:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return TPMT_SENSITIVE.from_pem(pem)


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_same_as_tpm2_pytss(alg: str) -> None:
    ek_key, ek = software_ek(alg)
    public = TPM2B_PUBLIC.unmarshal(ek)[0].publicArea
    sensitive = _sensitive(ek_key)
    ak_name = tpm2.object_name(tpm2.parse_tpm2b_public(_ak_public()))
    secret = os.urandom(32)
    # tpm2-pytss's credential, opened with the EK's private key, has our ID object for its seed
    blob, enc = pytss_make_credential(public, secret, ak_name)
    seed = _secret_to_seed(sensitive, public, b"IDENTITY\x00", bytes(enc))
    ek_area = tpm2.parse_tpm2b_public(ek)
    assert credential._wrap(ek_area, ak_name, secret, seed) == bytes(blob.marshal())
    # ours opens the same way (RSA-OAEP "IDENTITY" / ECDH + KDFe), and differs every time (fresh seed)
    ours = make_credential(ek, ak_name, secret)
    assert int.from_bytes(ours.encrypted_secret[:2], "big") == len(ours.encrypted_secret) - 2
    seed = _secret_to_seed(sensitive, public, b"IDENTITY\x00", ours.encrypted_secret[2:])
    assert len(seed) == 32
    assert credential._wrap(ek_area, ak_name, secret, seed) == ours.id_object
    assert make_credential(ek, ak_name, secret) != ours


def _ak_public() -> bytes:
    return bytes(TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=AK_ATTRS).marshal())


def test_refuses_what_the_tpm_would_refuse() -> None:
    _, ek = software_ek()
    name = tpm2.object_name(tpm2.parse_tpm2b_public(_ak_public()))
    with pytest.raises(InputError, match="1 to 32 bytes"):
        make_credential(ek, name, os.urandom(33))
    with pytest.raises(InputError, match="1 to 32 bytes"):
        make_credential(ek, name, b"")
    with pytest.raises(InputError, match="AK name"):
        make_credential(ek, name[:-1], b"x")
    key = new_key("rsa")
    signing = bytes(TPM2B_PUBLIC(publicArea=tpm_public(key, AK_ATTRS, symmetric=False)).marshal())
    with pytest.raises(InputError, match="restricted decryption"):
        make_credential(signing, name, b"x")
    no_aes = bytes(TPM2B_PUBLIC(publicArea=tpm_public(key, EK_ATTRS, symmetric=False)).marshal())
    with pytest.raises(InputError, match="AES-CFB"):
        make_credential(no_aes, name, b"x")
