"""Test helpers for node identity: a small X.509 CA, EK certificates in the TCG profile's shape, software EKs
and AKs as TPM public areas (tpm2-pytss types, marshalled), and the trust store of an swtpm's local CA."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC, TPMT_SYM_DEF_OBJECT

from tmb.attest.ekcert import TrustStore

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
EK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)
AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(alg: str = "rsa") -> Key:
    return rsa.generate_private_key(65537, 2048) if alg == "rsa" else ec.generate_private_key(ec.SECP256R1())


class Ca:
    """A CA certificate and its key; ``issue_ek`` signs EK certificates."""

    cert: x509.Certificate
    key: Key

    def __init__(
        self,
        name: str,
        parent: Ca | None = None,
        *,
        not_before: dt.datetime = NOW - 1000 * DAY,
        not_after: dt.datetime = NOW + 3650 * DAY,
        is_ca: bool = True,
        alg: str = "ecc",
    ) -> None:
        self.key = new_key(alg)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(parent.cert.subject if parent else subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=is_ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        )
        signer = parent.key if parent else self.key
        self.cert = builder.sign(signer, hashes.SHA256())

    @classmethod
    def existing(cls, cert: x509.Certificate, key: Any) -> Ca:
        """A CA from a certificate and key made elsewhere (the swtpm local CA)."""
        self = cls.__new__(cls)
        self.cert, self.key = cert, key
        return self

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_ek(
        self,
        public_key: Any,
        *,
        not_before: dt.datetime = NOW - DAY,
        not_after: dt.datetime = NOW + 3650 * DAY,
        key_usage: x509.KeyUsage | None = None,
        san: bool = True,
        manufacturer: str = "id:49465800",
        extra: list[tuple[x509.ExtensionType, bool]] | None = None,
    ) -> bytes:
        """An EK certificate (DER) in the TCG shape: empty subject, critical SAN directoryName, EKU
        tcg-kp-EKCertificate, keyUsage keyEncipherment (RSA) or keyAgreement (ECC)."""
        if key_usage is None:
            rsa_key = isinstance(public_key, rsa.RSAPublicKey)
            key_usage = _key_usage(key_encipherment=rsa_key, key_agreement=not rsa_key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier("2.23.133.8.1")]), critical=False)
        )
        if san:
            tpm = x509.Name(
                [
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), manufacturer),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "SLB9670"),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:00070055"),
                ]
            )
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DirectoryName(tpm)]), critical=True
            )
        for ext, critical in extra or []:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _key_usage(
    *, key_cert_sign: bool = False, key_encipherment: bool = False, key_agreement: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def key_usage(**flags: bool) -> x509.KeyUsage:
    return _key_usage(**flags)


def tpm_public(key: Key, attrs: int, *, symmetric: bool = True, scheme: str | None = None) -> TPMT_PUBLIC:
    """A TPMT_PUBLIC for a software key (EK: AES-128-CFB symmetric; AK: ``scheme`` like ``rsassa``)."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    if symmetric:
        sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES)
        sym.keyBits.aes = 128
        sym.mode.aes = TPM2_ALG.CFB
    pub = TPMT_PUBLIC.from_pem(pem, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs, symmetric=sym)
    if scheme is not None:
        pub.parameters.asymDetail.scheme.scheme = getattr(TPM2_ALG, scheme.upper())
        pub.parameters.asymDetail.scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
    return pub


def tpm2b(pub: TPMT_PUBLIC) -> bytes:
    return bytes(TPM2B_PUBLIC(publicArea=pub).marshal())


def software_ek(alg: str = "rsa") -> tuple[Key, bytes]:
    """A software key shaped like an EK: its private key and its TPM2B_PUBLIC."""
    key = new_key(alg)
    return key, tpm2b(tpm_public(key, EK_ATTRS))


def swtpm_store(state_dir: Path, into: Path) -> TrustStore:
    """The trust store of an swtpm provisioned by :func:`sample_infra.swtpm.provision_ek_cert`: its local
    CA's root and intermediate, copied into ``into`` (the CA directory also holds private keys)."""
    ca = state_dir.parent / (state_dir.name + "-ca")
    into.mkdir(parents=True, exist_ok=True)
    for name in ("swtpm-localca-rootca-cert.pem", "issuercert.pem"):
        (into / name).write_bytes((ca / name).read_bytes())
    return TrustStore.from_directory(into)


def swtpm_issuer(state_dir: Path) -> Ca:
    """The swtpm local CA's intermediate certificate and key, to sign EK certificates it would not."""
    ca = state_dir.parent / (state_dir.name + "-ca")
    cert = x509.load_pem_x509_certificate((ca / "issuercert.pem").read_bytes())
    key = serialization.load_pem_private_key((ca / "signkey.pem").read_bytes(), None)
    return Ca.existing(cert, key)
