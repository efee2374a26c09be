"""AK public area checks (tmb.attest.akcheck), as go-attestation's checks before activation."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from identity_support import AK_ATTRS, new_key, tpm2b, tpm_public
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

from tmb.attest.akcheck import attribute_names, check_ak


def template(spec: str, attrs: int = AK_ATTRS) -> bytes:
    """A tpm2-tools style template with a real key of its size in ``unique``."""
    public = TPM2B_PUBLIC.parse(spec, objectAttributes=attrs)
    area = public.publicArea
    if spec.startswith("rsa"):
        n = rsa.generate_private_key(65537, int(spec[3:7])).public_key().public_numbers().n
        area.unique.rsa = n.to_bytes((n.bit_length() + 7) // 8, "big")
    else:
        curve = ec.SECP256R1() if spec.startswith("ecc256") else ec.SECP384R1()
        numbers = ec.generate_private_key(curve).public_key().public_numbers()
        size = curve.key_size // 8
        area.unique.ecc.x = numbers.x.to_bytes(size, "big")
        area.unique.ecc.y = numbers.y.to_bytes(size, "big")
    return bytes(public.marshal())


@pytest.mark.parametrize(
    "spec", ["rsa2048:rsassa-sha256:null", "rsa2048:rsapss-sha256:null", "ecc256:ecdsa-sha256:null"]
)
def test_good_aks(spec: str) -> None:
    report = check_ak(template(spec))
    assert report.ok and not report.findings


@pytest.mark.parametrize(
    ("clear", "missing"),
    [
        (TPMA_OBJECT.FIXEDTPM, ["fixedTPM"]),
        (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT, ["fixedTPM", "fixedParent"]),
        (TPMA_OBJECT.SENSITIVEDATAORIGIN, ["sensitiveDataOrigin"]),
        (TPMA_OBJECT.RESTRICTED, ["restricted"]),
    ],
)
def test_missing_attributes(clear: int, missing: list[str]) -> None:
    spec = "rsa2048:rsassa-sha256:null" if clear != TPMA_OBJECT.RESTRICTED else "rsa2048:null:null"
    report = check_ak(template(spec, AK_ATTRS & ~clear))
    found = [f for f in report if f.id == "identity.ak_attributes"]
    assert found and found[0].context["missing"] == missing and found[0].context["extra"] == []


def test_decrypt_set_and_sign_clear() -> None:
    attrs = (AK_ATTRS & ~TPMA_OBJECT.SIGN_ENCRYPT) | TPMA_OBJECT.DECRYPT
    report = check_ak(template("rsa2048:null:aes128cfb", attrs))
    found = next(f for f in report if f.id == "identity.ak_attributes")
    assert found.context["missing"] == ["sign"] and found.context["extra"] == ["decrypt"]


@pytest.mark.parametrize(
    ("spec", "fid"),
    [
        ("rsa2048:rsassa-sha1:null", "identity.ak_scheme"),
        ("ecc256:ecdsa-sha384:null", "identity.ak_scheme"),
        ("rsa1024:rsassa-sha256:null", "identity.ak_key"),
        ("ecc384:ecdsa-sha256:null", "identity.ak_key"),
    ],
)
def test_weak_parameters(spec: str, fid: str) -> None:
    assert [f.id for f in check_ak(template(spec))] == [fid]


def test_null_scheme_and_name_alg() -> None:
    key = new_key("rsa")
    pub = tpm_public(key, AK_ATTRS, symmetric=False)  # scheme NULL
    assert [f.id for f in check_ak(tpm2b(pub))] == ["identity.ak_scheme"]
    pub = tpm_public(key, AK_ATTRS, symmetric=False, scheme="rsassa")
    pub.nameAlg = TPM2_ALG.SHA1
    assert [f.id for f in check_ak(tpm2b(pub))] == ["identity.ak_name_alg"]


def test_software_key_and_bad_input() -> None:
    for key in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())):
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert [f.id for f in check_ak(pem)] == ["identity.ak_public_missing"]
    for junk in (b"", b"\x00\x01", b"\x00\x03abc", bytes(range(40))):
        assert [f.id for f in check_ak(junk)] == ["identity.ak_public_malformed"]


def test_attribute_names() -> None:
    assert attribute_names(int(AK_ATTRS)) == [
        "fixedTPM", "fixedParent", "sensitiveDataOrigin", "userWithAuth", "restricted", "sign",
    ]  # fmt: skip
    assert attribute_names(0x80000000) == ["0x80000000"]
