"""Is this public area fit to be an attestation key? go-attestation's checks before it activates an AK.

An AK's quotes are worth something only if the key cannot leave the TPM, was generated inside it, and can
sign nothing but structures the TPM itself built (a restricted key refuses to sign data that starts with
``TPM_GENERATED_VALUE``, so it cannot forge a ``TPMS_ATTEST``). These properties are bits of the key's
``TPMT_PUBLIC``; credential activation (:mod:`tmb.attest.credential`) then binds the checked public area to
the TPM that holds the EK, because the credential is made for the AK's *name*, a hash of that same area.

:func:`check_ak` returns a :class:`~tmb.errors.Report`; every finding is an error:

=============================  ==============================================================================
id                             meaning
=============================  ==============================================================================
identity.ak_public_malformed   the bytes are not a ``TPM2B_PUBLIC``/``TPMT_PUBLIC`` of an RSA or ECC key
identity.ak_public_missing     the AK came as PEM/DER SubjectPublicKeyInfo: no TPM attributes to check
identity.ak_attributes         a required attribute is clear (``missing``: fixedTPM, fixedParent,
                               sensitiveDataOrigin, restricted, sign) or a forbidden one set
                               (``extra``: decrypt)
identity.ak_key                RSA shorter than 2048 bits, or an ECC curve other than P-256
identity.ak_scheme             not RSASSA/RSAPSS-SHA256 (RSA) or ECDSA-SHA256 (ECC); a NULL scheme included
identity.ak_name_alg           nameAlg is not SHA-256 (the name the credential is made for)
=============================  ==============================================================================

``sensitiveDataOrigin`` clear means the private key was made outside the TPM and imported or loaded (a
software key loaded with ``LoadExternal`` cannot have fixedTPM either); ``fixedTPM``/``fixedParent`` clear
means it can be duplicated to another TPM or to software.
"""

from __future__ import annotations

from collections.abc import Iterable

from tmb.attest import tpm2
from tmb.attest.quote import AkPublic, load_ak
from tmb.attest.tpm2 import PublicArea
from tmb.errors import ParseError, Report

__all__ = ["AK_FORBIDDEN", "AK_REQUIRED", "ATTRIBUTES", "attribute_names", "attribute_problems", "check_ak"]

#: TPMA_OBJECT bits by their Part 2 names.
ATTRIBUTES: dict[str, int] = {
    "fixedTPM": 0x00000002,
    "stClear": 0x00000004,
    "fixedParent": 0x00000010,
    "sensitiveDataOrigin": 0x00000020,
    "userWithAuth": 0x00000040,
    "adminWithPolicy": 0x00000080,
    "noDA": 0x00000400,
    "encryptedDuplication": 0x00000800,
    "restricted": 0x00010000,
    "decrypt": 0x00020000,
    "sign": 0x00040000,
}
AK_REQUIRED = ("fixedTPM", "fixedParent", "sensitiveDataOrigin", "restricted", "sign")
AK_FORBIDDEN = ("decrypt",)
MIN_RSA_BITS = 2048
_CURVE_P256 = 0x0003
_SCHEMES = {tpm2.ALG_RSA: (tpm2.ALG_RSASSA, tpm2.ALG_RSAPSS), tpm2.ALG_ECC: (tpm2.ALG_ECDSA,)}


def attribute_names(bits: int) -> list[str]:
    """The names of the TPMA_OBJECT bits set in ``bits`` (unknown bits as hex)."""
    names = [name for name, bit in ATTRIBUTES.items() if bits & bit]
    rest = bits & ~sum(ATTRIBUTES.values())
    return names + ([f"0x{rest:08x}"] if rest else [])


def attribute_problems(
    bits: int, required: Iterable[str], forbidden: Iterable[str]
) -> tuple[list[str], list[str]]:
    """``(missing, extra)``: required attributes that are clear, forbidden ones that are set."""
    missing = [name for name in required if not bits & ATTRIBUTES[name]]
    extra = [name for name in forbidden if bits & ATTRIBUTES[name]]
    return missing, extra


def check_ak(ak: bytes | AkPublic | PublicArea) -> Report:
    """Check an AK public area (``TPM2B_PUBLIC``/``TPMT_PUBLIC`` bytes, :class:`AkPublic` or
    :class:`PublicArea`) against the attestation-key requirements; never raises on bad input."""
    report = Report()
    if isinstance(ak, PublicArea):
        pub: PublicArea | None = ak
    else:
        try:
            pub = load_ak(ak).public
        except ParseError as exc:
            report.add("identity.ak_public_malformed", f"the AK is unreadable: {exc}", **exc.context)
            return report
    if pub is None:
        report.add(
            "identity.ak_public_missing",
            "the AK was given as a bare public key: its TPM attributes cannot be checked",
            hint="send the AK's TPM2B_PUBLIC (tpm2_readpublic -o, tmb-probe enroll)",
        )
        return report
    attrs = pub.object_attributes
    missing, extra = attribute_problems(attrs, AK_REQUIRED, AK_FORBIDDEN)
    if missing or extra:
        report.add(
            "identity.ak_attributes",
            "the AK is not a TPM-resident restricted signing key: "
            + "; ".join(
                part
                for part in (
                    f"{', '.join(missing)} clear" if missing else "",
                    f"{', '.join(extra)} set" if extra else "",
                )
                if part
            ),
            missing=missing,
            extra=extra,
            attributes=attribute_names(attrs),
        )
    if pub.type == tpm2.ALG_RSA and pub.key_bits < MIN_RSA_BITS:
        report.add(
            "identity.ak_key",
            f"RSA AK of {pub.key_bits} bits, at least {MIN_RSA_BITS} needed",
            bits=pub.key_bits,
        )
    if pub.type == tpm2.ALG_ECC and pub.curve != _CURVE_P256:
        report.add(
            "identity.ak_key",
            f"ECC AK on curve {tpm2.ECC_CURVES.get(pub.curve, hex(pub.curve))}, P-256 needed",
            curve=tpm2.ECC_CURVES.get(pub.curve, hex(pub.curve)),
        )
    if pub.scheme not in _SCHEMES.get(pub.type, ()) or pub.scheme_hash != tpm2.ALG_SHA256:
        want = "RSASSA or RSAPSS" if pub.type == tpm2.ALG_RSA else "ECDSA"
        report.add(
            "identity.ak_scheme",
            f"AK signing scheme {tpm2.alg_name(pub.scheme)}-{tpm2.alg_name(pub.scheme_hash)}, "
            f"{want} with SHA-256 needed",
            scheme=tpm2.alg_name(pub.scheme),
            hash=tpm2.alg_name(pub.scheme_hash),
        )
    if pub.name_alg != tpm2.ALG_SHA256:
        report.add(
            "identity.ak_name_alg",
            f"AK name algorithm {tpm2.alg_name(pub.name_alg)}, SHA-256 needed",
            name_alg=tpm2.alg_name(pub.name_alg),
        )
    return report
