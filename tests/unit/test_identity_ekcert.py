"""EK certificate validation (tmb.attest.ekcert) against CAs made here: chains, validity, key usage, the TCG
subjectAltName, key match, pins, malformed input. The swtpm-issued certificates are in
tests/integration/test_identity_swtpm.py."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from identity_support import DAY, NOW, Ca, key_usage, software_ek, tpm2b, tpm_public

from tmb.attest.ekcert import TrustStore, ek_pin, load_certificates, verify_ek
from tmb.errors import ConfigError, Severity


@pytest.fixture(scope="module")
def pki() -> tuple[Ca, Ca, TrustStore]:
    root = Ca("Test TPM Root CA")
    inter = Ca("Test TPM EK Intermediate", root)
    return root, inter, TrustStore.from_certificates([root.cert, inter.cert])


def errors(result: object) -> list[str]:
    return [f.id for f in result.report.errors]  # type: ignore[attr-defined]


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_certified_ek(pki: tuple[Ca, Ca, TrustStore], alg: str) -> None:
    _, inter, store = pki
    key, ek = software_ek(alg)
    cert = inter.issue_ek(key.public_key())
    result = verify_ek(ek, [cert], store)
    assert result.ek_trust == "certified" and result.ok, result.report.to_list()
    assert result.chain == ("(empty subject)", "CN=Test TPM EK Intermediate", "CN=Test TPM Root CA")
    assert result.tpm is not None and result.tpm.vendor == "IFX" and result.tpm.model == "SLB9670"
    assert result.tpm.firmware == "7.85"
    assert result.algorithm == alg and result.ek_sha256 == ek_pin(ek)
    assert "identity.ek_tpm_info" in result.report.ids()
    # PEM works as DER does, and the dict form is JSON-ready
    pem = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM)
    assert verify_ek(ek, [pem], store).ek_trust == "certified"
    assert result.to_dict()["tpm"]["manufacturer"] == "id:49465800"


def test_certificate_from_another_ca(pki: tuple[Ca, Ca, TrustStore]) -> None:
    _, _, store = pki
    rogue = Ca("Test TPM EK Intermediate", Ca("Test TPM Root CA"))  # same names, other keys
    key, ek = software_ek()
    result = verify_ek(ek, [rogue.issue_ek(key.public_key())], store)
    assert result.ek_trust is None and errors(result) == ["identity.ek_untrusted_chain"]
    assert "does not verify" in result.report.errors[0].message


def test_intermediate_sent_by_the_node_must_still_reach_a_root(pki: tuple[Ca, Ca, TrustStore]) -> None:
    root, _, _ = pki
    other = Ca("Node-supplied CA", root)
    key, ek = software_ek()
    cert = other.issue_ek(key.public_key())
    store_roots_only = TrustStore.from_certificates([root.cert])
    assert verify_ek(ek, [cert], store_roots_only).ek_trust is None
    ok = verify_ek(ek, [cert], store_roots_only, intermediates=[other.pem])
    assert ok.ek_trust == "certified" and len(ok.chain) == 3
    selfmade = Ca("Self-made root")
    assert (
        verify_ek(
            ek, [selfmade.issue_ek(key.public_key())], store_roots_only, intermediates=[selfmade.pem]
        ).ek_trust
        is None
    )


def test_expired_and_not_yet_valid(pki: tuple[Ca, Ca, TrustStore]) -> None:
    _, inter, store = pki
    key, ek = software_ek()
    old = inter.issue_ek(key.public_key(), not_before=NOW - 900 * DAY, not_after=NOW - 2 * DAY)
    assert errors(verify_ek(ek, [old], store)) == ["identity.ek_expired"]
    assert verify_ek(ek, [old], store, at=NOW - 10 * DAY).ek_trust == "certified"
    future = inter.issue_ek(key.public_key(), not_before=NOW + 2 * DAY)
    assert errors(verify_ek(ek, [future], store)) == ["identity.ek_not_yet_valid"]


def test_expired_issuer() -> None:
    root = Ca("Root")
    inter = Ca("Old intermediate", root, not_before=NOW - 900 * DAY, not_after=NOW - DAY)
    key, ek = software_ek()
    result = verify_ek(
        ek, [inter.issue_ek(key.public_key())], TrustStore.from_certificates([root.cert, inter.cert])
    )
    assert errors(result) == ["identity.ek_issuer_expired"]


def test_issuer_that_is_no_ca() -> None:
    root = Ca("Root")
    leafish = Ca("Not a CA", root, is_ca=False)
    key, ek = software_ek()
    result = verify_ek(
        ek, [leafish.issue_ek(key.public_key())], TrustStore.from_certificates([root.cert, leafish.cert])
    )
    assert errors(result) == ["identity.ek_issuer_not_ca"]


def test_key_mismatch(pki: tuple[Ca, Ca, TrustStore]) -> None:
    _, inter, store = pki
    other_key, _ = software_ek()
    _, ek = software_ek()
    result = verify_ek(ek, [inter.issue_ek(other_key.public_key())], store)
    assert result.ek_trust is None and "identity.ek_key_mismatch" in errors(result)
    assert "identity.ek_cert_unused" in result.report.ids()


def test_a_second_certificate_for_the_other_algorithm_is_not_a_mismatch(
    pki: tuple[Ca, Ca, TrustStore],
) -> None:
    _, inter, store = pki
    rsa_key, rsa_ek = software_ek("rsa")
    ecc_key, _ = software_ek("ecc")
    certs = [inter.issue_ek(ecc_key.public_key()), inter.issue_ek(rsa_key.public_key())]
    result = verify_ek(rsa_ek, certs, store)
    assert result.ek_trust == "certified" and result.report.ids().count("identity.ek_cert_unused") == 1


@pytest.mark.parametrize(
    ("alg", "usage"),
    [
        ("rsa", {"key_agreement": True}),
        ("ecc", {"key_encipherment": True}),
        ("rsa", {"key_cert_sign": True}),
    ],
)
def test_key_usage(pki: tuple[Ca, Ca, TrustStore], alg: str, usage: dict[str, bool]) -> None:
    _, inter, store = pki
    key, ek = software_ek(alg)
    cert = inter.issue_ek(key.public_key(), key_usage=key_usage(**usage))
    assert errors(verify_ek(ek, [cert], store)) == ["identity.ek_key_usage"]


def test_san_absent_is_a_warning_and_unknown_critical_extension_an_error(
    pki: tuple[Ca, Ca, TrustStore],
) -> None:
    _, inter, store = pki
    key, ek = software_ek()
    result = verify_ek(ek, [inter.issue_ek(key.public_key(), san=False)], store)
    assert result.ek_trust == "certified" and "identity.ek_san_absent" in result.report.ids()
    assert result.tpm is None
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    cert = inter.issue_ek(key.public_key(), extra=[(odd, True)])
    assert errors(verify_ek(ek, [cert], store)) == ["identity.ek_unknown_critical_extension"]
    cert = inter.issue_ek(key.public_key(), manufacturer="Infineon")
    found = verify_ek(ek, [cert], store)
    assert found.ek_trust == "certified" and "identity.ek_san_malformed" in found.report.ids()


def test_ek_public_area_must_be_an_ek(pki: tuple[Ca, Ca, TrustStore]) -> None:
    _, inter, store = pki
    key, _ = software_ek()
    from identity_support import AK_ATTRS

    signing = tpm2b(tpm_public(key, AK_ATTRS, symmetric=False))
    result = verify_ek(signing, [inter.issue_ek(key.public_key())], store)
    assert result.ek_trust is None and errors(result) == ["identity.ek_attributes"]
    ctx = result.report.errors[0].context
    assert "decrypt" in ctx["missing"] and ctx["extra"] == ["sign"]


def test_pins(pki: tuple[Ca, Ca, TrustStore]) -> None:
    _, _, store = pki
    key, ek = software_ek()
    assert errors(verify_ek(ek, [], store)) == ["identity.ek_cert_missing"]
    pinned = verify_ek(ek, [], store, pins=[ek_pin(ek)])
    assert pinned.ek_trust == "pinned" and pinned.ok
    assert "identity.ek_pinned" in pinned.report.ids()
    assert (
        pinned.report.findings[0].severity is Severity.WARNING
    )  # the missing certificate, kept as a warning
    # a certificate from an unknown CA does not spoil a pinned EK, and says so
    rogue = Ca("Cloud vTPM CA").issue_ek(key.public_key())
    both = verify_ek(ek, [rogue], None, pins=["SHA256:" + ek_pin(ek).upper()])
    assert both.ek_trust == "pinned" and "identity.ek_untrusted_chain" in both.report.ids()
    # a pin of another EK does nothing
    _, other = software_ek()
    assert verify_ek(ek, [], store, pins=[ek_pin(other)]).ek_trust is None
    with pytest.raises(ConfigError):
        verify_ek(ek, [], store, pins=["not-a-pin"])


def test_malformed_input_is_a_finding_never_a_traceback(pki: tuple[Ca, Ca, TrustStore]) -> None:
    _, inter, store = pki
    key, ek = software_ek()
    cert = inter.issue_ek(key.public_key())
    assert errors(verify_ek(b"\x00\x05junk!", [cert], store)) == ["identity.ek_public_malformed"]
    pem_key = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert errors(verify_ek(pem_key, [cert], store)) == ["identity.ek_public_malformed"]
    assert "identity.ek_cert_malformed" in errors(verify_ek(ek, [b"garbage"], store))
    rng = random.Random(14)
    for _ in range(300):
        blob = bytearray(cert)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        cut = bytes(blob[: rng.randint(0, len(blob))]) if rng.random() < 0.3 else bytes(blob)
        result = verify_ek(ek, [cut, os.urandom(rng.randint(0, 64))], store)
        assert result.ek_trust in (None, "certified")
    for _ in range(300):
        area = bytearray(ek)
        area[rng.randrange(len(area))] = rng.randrange(256)
        assert verify_ek(bytes(area), [cert], store).ek_trust in (None, "certified")
    # NV padding after the DER is tolerated
    assert verify_ek(ek, [cert + b"\xff" * 40], store).ek_trust == "certified"


def test_trust_store_directory(tmp_path: Path, pki: tuple[Ca, Ca, TrustStore]) -> None:
    root, inter, _ = pki
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "root.pem").write_bytes(root.pem)
    (tmp_path / "inter.der").write_bytes(inter.cert.public_bytes(serialization.Encoding.DER))
    (tmp_path / "README.md").write_text("origins")
    store = TrustStore.from_directory(tmp_path)
    assert len(store.roots) == 1 and len(store.intermediates) == 1
    assert sorted(store.origins.values()) == ["inter.der", "vendor/root.pem"]
    (tmp_path / "bad.pem").write_text("nonsense")
    with pytest.raises(ConfigError, match=r"bad\.pem"):
        TrustStore.from_directory(tmp_path)
    only_inter = tmp_path / "only"
    only_inter.mkdir()
    (only_inter / "i.pem").write_bytes(inter.pem)
    with pytest.raises(ConfigError, match="no self-signed root"):
        TrustStore.from_directory(only_inter)
    assert len(load_certificates(root.pem + inter.pem)) == 2


def test_a_sha1_link_is_named_and_refused(tmp_path: Path) -> None:
    """An intermediate signed with SHA-1 (older manufacturer chains): cryptography verifies no SHA-1
    certificate signature, so the chain cannot be checked; the refusal says so and how to enrol such a node
    (a pin), rather than a bare "does not verify". The intermediate is signed by the real ``openssl``."""
    import subprocess

    from cryptography.hazmat.primitives.asymmetric import ec

    root = Ca("Old TPM Root CA", alg="rsa")
    (tmp_path / "root.pem").write_bytes(root.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "root.key").write_bytes(
        root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "int.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "ext").write_text("basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign\n")
    run = {"cwd": tmp_path, "check": True, "capture_output": True}
    subprocess.run(
        ["openssl", "req", "-new", "-key", "int.key", "-subj", "/CN=Old TPM EK CA", "-out", "int.csr"],
        **run,  # type: ignore[arg-type]
    )
    subprocess.run(
        [
            "openssl", "x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key",
            "-set_serial", "7", "-days", "30", "-sha1", "-extfile", "ext", "-out", "int.pem",
        ],
        **run,  # type: ignore[arg-type]
    )  # fmt: skip
    inter = Ca.existing(x509.load_pem_x509_certificate((tmp_path / "int.pem").read_bytes()), key)
    assert inter.cert.signature_hash_algorithm is not None
    assert inter.cert.signature_hash_algorithm.name == "sha1"
    store = TrustStore.from_certificates([root.cert, inter.cert])
    ek_key, ek = software_ek()
    result = verify_ek(ek, [inter.issue_ek(ek_key.public_key())], store)
    assert result.ek_trust is None and errors(result) == ["identity.ek_weak_signature"]
    message = result.report.errors[0].message
    assert "SHA-1" in message and "ek_pins" in message and "Old TPM EK CA" in message
    # the same EK pinned is taken (the pin is the operator's word, not the chain's)
    pinned = verify_ek(ek, [inter.issue_ek(ek_key.public_key())], store, pins=frozenset({ek_pin(ek)}))
    assert pinned.ek_trust == "pinned"
