"""Node identity against real swtpms with certified EKs (``swtpm_setup --create-ek-cert`` and its local CA):
the EK certificate chains to the local CA's root and holds the TPM's EK; the AK checks; credential activation
opens only in the TPM, for the AK, that it was made for."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store
from identity_support import AK_ATTRS, NOW, Ca, new_key, swtpm_issuer, swtpm_store, tpm2b, tpm_public
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

from probes.tpm import TpmClient
from sample_infra.swtpm import Swtpm
from tmb.attest.akcheck import check_ak
from tmb.attest.credential import make_credential
from tmb.attest.ekcert import TrustStore, ek_pin, verify_ek
from tmb.attest.quote import load_ak
from tmb.errors import TpmError


@pytest.fixture(scope="module")
def tpms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swtpm, Swtpm]]:
    base = tmp_path_factory.mktemp("identity")
    try:
        a = Swtpm(base / "a", ek_cert=True)
    except TpmError as exc:
        pytest.fail(exc.diagnostics())
    b = Swtpm(base / "b", ek_cert=True)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def store(tpms: tuple[Swtpm, Swtpm], tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    return swtpm_store(tpms[0].state_dir, tmp_path_factory.mktemp("store"))


def test_certified_ek_and_activation(tpms: tuple[Swtpm, Swtpm], store: TrustStore) -> None:
    with tpms[0].client() as tpm:
        certs = tpm.ek_certificates()
        assert set(certs) == {"rsa", "ecc384"}
        ak = tpm.create_or_load_ak()
        for alg in ("rsa", "ecc384"):
            result = verify_ek(tpm.ek_public(alg), list(certs.values()), store)
            assert result.ek_trust == "certified" and result.ok, result.report.to_list()
            assert result.chain[1:] == ("CN=swtpm-localca", "CN=swtpm-localca-rootca")
            assert result.tpm is not None and result.tpm.model == "swtpm"
            assert result.tpm.manufacturer_id == 0x1014
        assert check_ak(ak.tpm2b_public or b"").ok
        secret = os.urandom(32)
        cred = make_credential(tpm.ek_public("rsa"), ak.name or b"", secret)
        assert tpm.activate_credential(cred.id_object, cred.encrypted_secret) == secret
        # the uncertified low-range ECC EK: accepted only by a pin, and activation works through it too
        ecc = tpm.ek_public("ecc")
        assert verify_ek(ecc, list(certs.values()), store).ek_trust is None
        assert verify_ek(ecc, list(certs.values()), store, pins=[ek_pin(ecc)]).ek_trust == "pinned"
        cred = make_credential(ecc, ak.name or b"", secret)
        assert tpm.activate_credential(cred.id_object, cred.encrypted_secret, ek_alg="ecc") == secret


def test_cryptography_verifier_agrees_on_the_swtpm_chain(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore
) -> None:
    with tpms[0].client() as tpm:
        leaf = x509.load_der_x509_certificate(tpm.ek_certificates()["rsa"])
    verifier = (
        PolicyBuilder()
        .store(Store(list(store.roots)))
        .time(dt.datetime.now(dt.UTC))
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    chain = verifier.verify(leaf, list(store.intermediates)).chain
    assert [c.subject.rfc4514_string() for c in chain[1:]] == ["CN=swtpm-localca", "CN=swtpm-localca-rootca"]


def test_fake_expired_and_foreign_certificates(tpms: tuple[Swtpm, Swtpm], store: TrustStore) -> None:
    a, b = tpms
    with a.client() as tpm:
        ek = tpm.ek_public("rsa")
    key = load_ak(ek).key
    fake = Ca("swtpm-localca", Ca("swtpm-localca-rootca")).issue_ek(key)
    assert [f.id for f in verify_ek(ek, [fake], store).report.errors] == ["identity.ek_untrusted_chain"]
    expired = swtpm_issuer(a.state_dir).issue_ek(
        key, not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1)
    )
    assert [f.id for f in verify_ek(ek, [expired], store).report.errors] == ["identity.ek_expired"]
    with b.client() as other:
        foreign = other.ek_certificates()["rsa"]  # a genuine certificate, of another TPM's EK
    result = verify_ek(ek, [foreign], store)
    assert result.ek_trust is None and [f.id for f in result.report.errors] == ["identity.ek_key_mismatch"]


def test_ak_without_fixed_tpm_and_ak_from_outside(tpms: tuple[Swtpm, Swtpm]) -> None:
    with ESAPI(TCTILdr.parse(tpms[0].tcti)) as ctx:
        srk = ctx.create_primary(
            None,
            TPM2B_PUBLIC.parse(
                "rsa2048:aes128cfb",
                objectAttributes=TPMA_OBJECT.RESTRICTED
                | TPMA_OBJECT.DECRYPT
                | TPMA_OBJECT.FIXEDTPM
                | TPMA_OBJECT.FIXEDPARENT
                | TPMA_OBJECT.SENSITIVEDATAORIGIN
                | TPMA_OBJECT.USERWITHAUTH,
            ),
            ESYS_TR.OWNER,
        )[0]
        try:
            movable = AK_ATTRS & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
            template = TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=movable)
            public = ctx.create(srk, None, template)[1]
        finally:
            ctx.flush_context(srk)
        report = check_ak(bytes(public.marshal()))
        assert [f.id for f in report.errors] == ["identity.ak_attributes"]
        assert report.errors[0].context["missing"] == ["fixedTPM", "fixedParent"]
        # a software key loaded into the TPM as an external public key: not made there, not fixed there
        soft = tpm_public(
            new_key("rsa"),
            AK_ATTRS & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN),
            symmetric=False,
            scheme="rsassa",
        )
        handle = ctx.load_external(TPM2B_PUBLIC(publicArea=soft), None, ESYS_TR.RH_NULL)
        try:
            loaded = ctx.read_public(handle)[0]
        finally:
            ctx.flush_context(handle)
    report = check_ak(bytes(loaded.marshal()))
    assert report.errors[0].context["missing"] == ["fixedTPM", "fixedParent", "sensitiveDataOrigin"]
    assert bytes(loaded.marshal()) == tpm2b(soft)


def test_activation_refuses_another_ak_or_tpm(tpms: tuple[Swtpm, Swtpm]) -> None:
    a, b = tpms
    secret = os.urandom(32)
    with a.client() as tpm_a, b.client() as tpm_b:
        ak_a = tpm_a.create_or_load_ak()
        ak_b = tpm_b.create_or_load_ak()
        ek_a = tpm_a.ek_public("rsa")
        # made for TPM B's AK name but sent to TPM A: the outer HMAC over A's AK name fails
        wrong_ak = make_credential(ek_a, ak_b.name or b"", secret)
        with pytest.raises(TpmError, match="ActivateCredential"):
            tpm_a.activate_credential(wrong_ak.id_object, wrong_ak.encrypted_secret)
        # made for TPM A (its EK and AK) and replayed to TPM B: B's EK cannot open the seed
        for_a = make_credential(ek_a, ak_a.name or b"", secret)
        with pytest.raises(TpmError, match="ActivateCredential"):
            tpm_b.activate_credential(for_a.id_object, for_a.encrypted_secret)
        # each challenge is fresh: an answer to an old one is not the answer to a new one
        again = make_credential(ek_a, ak_a.name or b"", os.urandom(32))
        assert again != for_a
        assert tpm_a.activate_credential(again.id_object, again.encrypted_secret) != secret
        with pytest.raises(TpmError, match=r"malformed|trailing"):
            tpm_a.activate_credential(for_a.id_object + b"x", for_a.encrypted_secret)
        with pytest.raises(TpmError, match="not supported"):
            tpm_a.activate_credential(for_a.id_object, for_a.encrypted_secret, ek_alg="ecc384")


def test_client_without_certificate(tmp_path: Path) -> None:
    plain = Swtpm(tmp_path / "plain")
    try:
        with TpmClient(plain.tcti) as tpm:
            assert tpm.ek_certificates() == {}
    finally:
        plain.stop()
