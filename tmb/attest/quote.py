"""TPM 2.0 quote verification.

:func:`verify_quote` checks a quote (``TPMS_ATTEST`` + ``TPMT_SIGNATURE``) against an attestation key (AK)
and collects every finding in a :class:`~tmb.errors.Report`:

==================================  ========  ===============================================================
id                                  severity  meaning
==================================  ========  ===============================================================
quote.magic_mismatch                error     magic is not TPM_GENERATED_VALUE (0xff544347)
quote.type_mismatch                 error     type is not TPM_ST_ATTEST_QUOTE (0x8018)
quote.signature_scheme_unsupported  error     not RSASSA/RSAPSS/ECDSA with SHA-1/2, or unusable with the AK
quote.signature_scheme_mismatch     error     the AK's own scheme (TPMT_PUBLIC) is not the signature's
quote.hash_alg_mismatch             error     signature hash is not the AK's scheme hash / ``expected_hash``
quote.signature_invalid             error     the signature does not verify with the AK
quote.ak_not_restricted             error     AK (TPMT_PUBLIC) not a restricted signing key: could sign
                                              a forged TPMS_ATTEST
quote.nonce_mismatch                error     extraData differs from the expected nonce
quote.nonce_unchecked               warning   no nonce given: freshness not checked
quote.pcr_missing                   error     a required PCR is not in the quote's selection
quote.pcr_values_missing            error     PCR values given, but not for every selected PCR
quote.pcr_digest_mismatch           error     H_sig(selected PCR values) differs from pcrDigest
quote.pcr_digest_unchecked          warning   no PCR values given: pcrDigest not checked
quote.clock_not_monotonic           error     clock went back compared with ``previous``
quote.reset_count_decreased         error     resetCount went back compared with ``previous``
quote.restart_count_decreased       error     restartCount went back within one resetCount
quote.reset                         warning   resetCount grew: the TPM/machine rebooted since ``previous``
quote.restart                       warning   restartCount grew: a TPM restart (resume from hibernation)
quote.firmware_changed              info      firmwareVersion differs from ``previous``
quote.safe_clear                    warning   clockInfo.safe is NO: this clock value may have been seen before
quote.hash_alg_weak                 warning   the signature uses SHA-1
==================================  ========  ===============================================================

Malformed bytes (message, signature, AK) raise :class:`~tmb.errors.ParseError`; they are not findings.
The pcrDigest is H_alg(concatenation of the selected PCR values, bank by bank in selection order, PCRs
ascending), ``alg`` being the signature's hash algorithm.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tmb.attest import tpm2
from tmb.attest.tpm2 import Attest, ClockInfo, PcrValues, PublicArea, Signature
from tmb.errors import ParseError, Report, Severity

__all__ = ["AkPublic", "QuoteResult", "ak_name", "load_ak", "verify_quote"]

_CURVES: dict[int, ec.EllipticCurve] = {
    0x0003: ec.SECP256R1(),
    0x0004: ec.SECP384R1(),
    0x0005: ec.SECP521R1(),
}
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    tpm2.ALG_SHA1: hashes.SHA1,
    tpm2.ALG_SHA256: hashes.SHA256,
    tpm2.ALG_SHA384: hashes.SHA384,
    tpm2.ALG_SHA512: hashes.SHA512,
}

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class AkPublic:
    """An attestation key: the usable public key, and its TPM public area when it was given as one."""

    key: PublicKey
    public: PublicArea | None = None

    @property
    def pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def name(self) -> bytes | None:
        """TPM name (nameAlg || H(TPMT_PUBLIC)); ``None`` for a key given as PEM/DER."""
        return tpm2.object_name(self.public) if self.public is not None else None

    @property
    def tpm2b_public(self) -> bytes | None:
        """The ``TPM2B_PUBLIC`` encoding (what ``tpm2_readpublic -o`` writes); ``None`` for a PEM/DER key."""
        return len(self.public.raw).to_bytes(2, "big") + self.public.raw if self.public is not None else None

    @property
    def algorithm(self) -> str:
        return "rsa" if isinstance(self.key, rsa.RSAPublicKey) else "ecc"


def _key_from_public(pub: PublicArea) -> PublicKey:
    try:
        if pub.type == tpm2.ALG_RSA:
            return rsa.RSAPublicNumbers(pub.exponent or 65537, int.from_bytes(pub.unique, "big")).public_key()
        curve = _CURVES.get(pub.curve)
        if curve is None:
            raise ParseError(f"TPMT_PUBLIC: unsupported ECC curve 0x{pub.curve:04x}", field="curveID")
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(pub.x, "big"), int.from_bytes(pub.y, "big"), curve
        ).public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ParseError(
            f"TPMT_PUBLIC: the key is not a valid {tpm2.alg_name(pub.type)} key: {exc}"
        ) from None


def load_ak(data: bytes | AkPublic) -> AkPublic:
    """Load an AK: PEM or DER SubjectPublicKeyInfo, ``TPM2B_PUBLIC`` or ``TPMT_PUBLIC`` (auto-detected)."""
    if isinstance(data, AkPublic):
        return data
    data = bytes(data)
    if len(data) >= 2 and int.from_bytes(data[:2], "big") == len(data) - 2:
        pub = tpm2.parse_tpm2b_public(data)
        return AkPublic(_key_from_public(pub), pub)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key: Any = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ParseError(f"AK PEM does not hold a usable public key: {exc}") from None
    elif data[:2] in (b"\x00\x01", b"\x00\x23"):
        pub = tpm2.parse_public(data)
        return AkPublic(_key_from_public(pub), pub)
    else:
        try:
            key = serialization.load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ParseError(
                "AK is neither PEM, DER SubjectPublicKeyInfo, TPM2B_PUBLIC nor TPMT_PUBLIC", detail=str(exc)
            ) from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ParseError(f"AK must be an RSA or ECC key, got {type(key).__name__}")
    return AkPublic(key)


def ak_name(tpmt_public: bytes | PublicArea) -> bytes:
    """TPM name of an AK: nameAlg (u16) || H_nameAlg(TPMT_PUBLIC); takes TPMT_PUBLIC or TPM2B_PUBLIC bytes."""
    if (
        isinstance(tpmt_public, bytes | bytearray)
        and int.from_bytes(tpmt_public[:2], "big") == len(tpmt_public) - 2
    ):
        return tpm2.object_name(tpm2.parse_tpm2b_public(bytes(tpmt_public)))
    return tpm2.object_name(tpmt_public if isinstance(tpmt_public, PublicArea) else bytes(tpmt_public))


@dataclass(frozen=True)
class QuoteResult:
    """The parsed quote and every finding; ``ok`` when no finding is an error."""

    attest: Attest
    signature: Signature
    report: Report

    @property
    def ok(self) -> bool:
        return self.report.ok

    @property
    def clock_info(self) -> ClockInfo:
        return self.attest.clock_info

    def to_dict(self) -> dict[str, Any]:
        a = self.attest
        return {
            "ok": self.ok,
            "magic": f"0x{a.magic:08x}",
            "type": f"0x{a.type:04x}",
            "qualified_signer": a.qualified_signer.hex(),
            "extra_data": a.extra_data.hex(),
            "clock": a.clock_info.clock,
            "reset_count": a.clock_info.reset_count,
            "restart_count": a.clock_info.restart_count,
            "safe": a.clock_info.safe,
            "firmware_version": f"0x{a.firmware_version:016x}",
            "pcr_select": {s.bank: list(s.pcrs) for s in a.quote.pcr_select} if a.quote else None,
            "pcr_digest": a.quote.pcr_digest.hex() if a.quote else None,
            "signature": {"scheme": self.signature.scheme, "hash": tpm2.alg_name(self.signature.hash_alg)},
            "findings": self.report.to_list(),
        }


def _verify_signature(ak: AkPublic, sig: Signature, message: bytes, report: Report) -> None:
    """Scheme/hash consistency with the AK, then the signature itself."""
    scheme, halg = sig.sig_alg, sig.hash_alg
    is_rsa = isinstance(ak.key, rsa.RSAPublicKey)
    usable = scheme in ((tpm2.ALG_RSASSA, tpm2.ALG_RSAPSS) if is_rsa else (tpm2.ALG_ECDSA,))
    if not usable or halg not in _HASHES:
        report.add(
            "quote.signature_scheme_unsupported",
            f"signature scheme {tpm2.alg_name(scheme)}/{tpm2.alg_name(halg)} cannot be verified with an "
            f"{ak.algorithm} AK",
            scheme=tpm2.alg_name(scheme),
            hash=tpm2.alg_name(halg),
            ak=ak.algorithm,
        )
        return
    hash_cls = _HASHES[halg]
    try:
        if isinstance(ak.key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if scheme == tpm2.ALG_RSASSA
                else padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=padding.PSS.AUTO)
            )
            ak.key.verify(sig.rsa_sig, message, pad, hash_cls())
        else:
            der = encode_dss_signature(int.from_bytes(sig.ecc_r, "big"), int.from_bytes(sig.ecc_s, "big"))
            ak.key.verify(der, message, ec.ECDSA(hash_cls()))
    except (InvalidSignature, ValueError):
        report.add(
            "quote.signature_invalid",
            "the quote signature does not verify with the AK",
            scheme=sig.scheme,
            hash=tpm2.alg_name(halg),
        )


def _check_scheme(ak: AkPublic, sig: Signature, expected_hash: str | None, report: Report) -> None:
    pub = ak.public
    if pub is not None and pub.scheme != tpm2.ALG_NULL:
        if pub.scheme != sig.sig_alg:
            report.add(
                "quote.signature_scheme_mismatch",
                "the signature's scheme is not the AK's scheme",
                expected=tpm2.alg_name(pub.scheme),
                got=sig.scheme,
            )
        if pub.scheme_hash != sig.hash_alg:
            report.add(
                "quote.hash_alg_mismatch",
                "the signature's hash algorithm is not the AK's scheme hash",
                expected=tpm2.alg_name(pub.scheme_hash),
                got=tpm2.alg_name(sig.hash_alg),
            )
    if expected_hash is not None and tpm2.hash_id(expected_hash) != sig.hash_alg:
        report.add(
            "quote.hash_alg_mismatch",
            "the signature's hash algorithm is not the expected one",
            expected=expected_hash.lower(),
            got=tpm2.alg_name(sig.hash_alg),
        )
    if sig.hash_alg == tpm2.ALG_SHA1:
        report.add("quote.hash_alg_weak", "the quote is signed over SHA-1", severity=Severity.WARNING)
    if pub is not None and not pub.is_restricted_signing:
        report.add(
            "quote.ak_not_restricted",
            "the AK is not a restricted signing key: it can sign data that merely looks like a TPM quote",
            object_attributes=f"0x{pub.object_attributes:08x}",
        )


def _check_pcrs(
    attest: Attest, sig: Signature, pcrs: PcrValues | None, require: Iterable[int], report: Report
) -> None:
    quote = attest.quote
    if quote is None:
        return
    selected = quote.selected()
    indices = {i for _, i in selected}
    for index in sorted(set(require)):
        if index not in indices:
            report.add(
                "quote.pcr_missing",
                f"required PCR {index} is not in the quote's selection",
                pcr=index,
                selection={s.bank: list(s.pcrs) for s in quote.pcr_select},
            )
    if pcrs is None:
        report.add(
            "quote.pcr_digest_unchecked",
            "no PCR values given: the quoted pcrDigest was not checked",
            severity=Severity.WARNING,
        )
        return
    missing = [(tpm2.alg_name(alg), i) for alg, i in selected if pcrs.get(alg, i) is None]
    if missing:
        report.add(
            "quote.pcr_values_missing",
            f"no value given for {len(missing)} selected PCR(s): pcrDigest cannot be recomputed",
            missing=[f"{bank}:{i}" for bank, i in missing],
        )
        return
    if sig.hash_alg not in tpm2.DIGEST_SIZES:
        return  # already reported as an unsupported scheme
    concat = b"".join(pcrs.get(alg, i) or b"" for alg, i in selected)
    computed = tpm2.digest(sig.hash_alg, concat)
    if not hmac.compare_digest(computed, quote.pcr_digest):
        report.add(
            "quote.pcr_digest_mismatch",
            "the PCR values do not hash to the quoted pcrDigest",
            expected=quote.pcr_digest,
            got=computed,
            hash=tpm2.alg_name(sig.hash_alg),
            pcrs=[f"{tpm2.alg_name(alg)}:{i}" for alg, i in selected],
        )


def _delta32(now: int, before: int) -> int:
    """Signed difference of two u32 counters modulo 2**32: keys outside the endorsement and platform
    hierarchies see resetCount/restartCount shifted by a per-key constant, which may wrap."""
    d = (now - before) % (1 << 32)
    return d - (1 << 32) if d >= 1 << 31 else d


def _check_clock(attest: Attest, previous: Attest | ClockInfo | QuoteResult | None, report: Report) -> None:
    now = attest.clock_info
    if not now.safe:
        report.add(
            "quote.safe_clear",
            "clockInfo.safe is NO: the TPM may have reported this clock value before",
            severity=Severity.WARNING,
        )
    if previous is None:
        return
    if isinstance(previous, QuoteResult):
        previous = previous.attest
    before = previous.clock_info if isinstance(previous, Attest) else previous
    if now.clock < before.clock:
        report.add(
            "quote.clock_not_monotonic",
            "the TPM clock went back since the previous quote",
            previous=before.clock,
            got=now.clock,
        )
    reset = _delta32(now.reset_count, before.reset_count)
    restart = _delta32(now.restart_count, before.restart_count)
    if reset < 0:
        report.add(
            "quote.reset_count_decreased",
            "resetCount went back: not the same TPM, or a replayed quote",
            previous=before.reset_count,
            got=now.reset_count,
        )
    elif reset > 0:
        report.add(
            "quote.reset",
            "the TPM was reset (the machine rebooted) since the previous quote",
            severity=Severity.WARNING,
            previous=before.reset_count,
            got=now.reset_count,
        )
    elif restart < 0:
        report.add(
            "quote.restart_count_decreased",
            "restartCount went back within one reset cycle",
            previous=before.restart_count,
            got=now.restart_count,
        )
    elif restart > 0:
        report.add(
            "quote.restart",
            "the TPM was restarted (resumed) since the previous quote",
            severity=Severity.WARNING,
            previous=before.restart_count,
            got=now.restart_count,
        )
    if isinstance(previous, Attest) and previous.firmware_version != attest.firmware_version:
        report.add(
            "quote.firmware_changed",
            "the TPM firmware version changed since the previous quote",
            severity=Severity.INFO,
            previous=f"0x{previous.firmware_version:016x}",
            got=f"0x{attest.firmware_version:016x}",
        )


def verify_quote(
    ak: AkPublic | bytes,
    message: bytes,
    signature: bytes | Signature,
    *,
    nonce: bytes | None,
    pcrs: PcrValues | None,
    expected_hash: str | None = None,
    require_pcrs: Iterable[int] = (),
    previous: Attest | ClockInfo | QuoteResult | None = None,
) -> QuoteResult:
    """Verify a TPM quote and report every finding (see the module docstring for the ids).

    ``message`` is the raw ``TPMS_ATTEST`` that was signed, ``signature`` a ``TPMT_SIGNATURE``; ``nonce`` the
    expected extraData (``None`` skips the check with a warning); ``pcrs`` the claimed PCR values (``None``
    skips the pcrDigest check with a warning); ``expected_hash`` a hash name the signature must use;
    ``require_pcrs`` PCR indices that must be quoted; ``previous`` an earlier quote (or its clock) of the same
    AK for the clock/reset checks. Raises :class:`~tmb.errors.ParseError` on malformed input.
    """
    key = load_ak(ak)
    message = bytes(message)
    attest = tpm2.parse_attest(message)
    sig = signature if isinstance(signature, Signature) else tpm2.parse_signature(bytes(signature))
    report = Report()
    if attest.magic != tpm2.TPM_GENERATED_VALUE:
        report.add(
            "quote.magic_mismatch",
            "TPMS_ATTEST.magic is not TPM_GENERATED_VALUE: the TPM did not produce this structure",
            expected=f"0x{tpm2.TPM_GENERATED_VALUE:08x}",
            got=f"0x{attest.magic:08x}",
        )
    if attest.type != tpm2.TPM_ST_ATTEST_QUOTE:
        report.add(
            "quote.type_mismatch",
            "TPMS_ATTEST.type is not TPM_ST_ATTEST_QUOTE",
            expected=f"0x{tpm2.TPM_ST_ATTEST_QUOTE:04x}",
            got=f"0x{attest.type:04x}",
        )
    _check_scheme(key, sig, expected_hash, report)
    _verify_signature(key, sig, message, report)
    if nonce is None:
        report.add(
            "quote.nonce_unchecked", "no nonce given: freshness not checked", severity=Severity.WARNING
        )
    elif not hmac.compare_digest(bytes(nonce), attest.extra_data):
        report.add(
            "quote.nonce_mismatch",
            "extraData is not the expected nonce (stale or replayed quote)",
            expected=bytes(nonce),
            got=attest.extra_data,
        )
    _check_pcrs(attest, sig, pcrs, require_pcrs, report)
    _check_clock(attest, previous, report)
    return QuoteResult(attest, sig, report)
