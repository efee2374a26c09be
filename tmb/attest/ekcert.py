"""Is this the EK of a genuine TPM? EK certificate validation on the verifier side (no TPM, only
``cryptography``).

A node sends its EK public area (``TPM2B_PUBLIC``, what credential activation encrypts to) and the EK
certificate(s) its TPM manufacturer wrote into NV (RSA ``0x01c00002``, ECC ``0x01c0000a``/``0x01c00016``).
:func:`verify_ek` checks, and collects every problem as a finding:

* the EK public area parses and is an EK: a restricted decryption key (fixedTPM, fixedParent,
  sensitiveDataOrigin, restricted, decrypt set; sign clear) with an AES-CFB symmetric part;
* a certificate's key *is* that EK (SubjectPublicKeyInfo equal), so the TPM that answers ActivateCredential is
  the one the certificate vouches for;
* the certificate chains to a root of the configured :class:`TrustStore` (a directory of TPM manufacturer
  roots and intermediates: the operator's own, or ``"builtin"``, the curated snapshot of public manufacturer
  certificates shipped in ``tmb/data/ek_roots`` with their provenance in its ``ORIGINS.md``, see
  :meth:`TrustStore.load`), each link a signature by the next certificate's key with matching names, every
  issuer a CA (basicConstraints cA, keyCertSign when keyUsage is present, pathLenConstraint kept), every
  certificate valid at the given time, no unknown critical extension;
* the TCG EK Credential Profile: keyUsage present with keyEncipherment (RSA EK) or keyAgreement (ECC EK), not
  a CA; the extendedKeyUsage, where present, names tcg-kp-EKCertificate (2.23.133.8.1); the subjectAltName
  directoryName with tcg-at-tpmManufacturer (2.23.133.2.1), tpmModel (2.23.133.2.2) and tpmVersion
  (2.23.133.2.3) is parsed and reported (:class:`TpmInfo`).

Chains are built link by link here rather than with ``cryptography.x509.verification``: that verifier
enforces the Web PKI profile (it refuses, for instance, CA certificates without an authorityKeyIdentifier and
curve/hash pairings that real TPM vendor chains use) and reports one text error, where a verdict needs to
say *which* check failed (an expired EK certificate is not a forged one).

A cloud vTPM has no manufacturer-certified EK. It is accepted only by an explicit pin in policy: the SHA-256
(hex, optionally ``sha256:``-prefixed) of the EK's DER SubjectPublicKeyInfo (:func:`ek_pin`, the same as
``openssl pkey -pubin -outform der | sha256sum``) or of its ``TPMT_PUBLIC``. Then ``ek_trust`` is ``"pinned"``
and the certificate's problems, if one was sent, are kept as warnings; a certified EK gives ``"certified"``.

=====================================  ========  ==========================================================
id                                     severity  meaning
=====================================  ========  ==========================================================
identity.ek_public_malformed           error     the EK public area does not parse (or is a bare key)
identity.ek_attributes                 error     the EK public area is not a restricted decryption key
identity.ek_cert_missing               error     no EK certificate, and no pin for this EK
identity.ek_cert_malformed             error     a certificate (or its extensions) does not parse
identity.ek_key_mismatch               error     no certificate holds the EK public area's key
identity.ek_untrusted_chain            error     no chain from the certificate to a trusted root
identity.ek_expired                    error     the EK certificate's notAfter has passed
identity.ek_not_yet_valid              error     the EK certificate's notBefore is in the future
identity.ek_issuer_expired             error     a CA certificate of the chain is outside its validity
identity.ek_issuer_not_ca              error     an issuer is no CA (basicConstraints, keyUsage, pathLen)
identity.ek_key_usage                  error     keyUsage absent, or without keyEncipherment (RSA) /
                                                 keyAgreement (ECC)
identity.ek_is_ca                      error     the EK certificate says cA=TRUE
identity.ek_unknown_critical_extension error     a critical extension this verifier does not know
identity.ek_eku                        warning   extendedKeyUsage without tcg-kp-EKCertificate
identity.ek_weak_signature             error     the only chains found have a link signed with SHA-1, which
                                                 is not accepted (pin such an EK: ``ek_pins``)
identity.ek_san_absent                 warning   no TCG subjectAltName (manufacturer, model, version)
identity.ek_san_malformed              warning   the TCG subjectAltName lacks a field or misformats it
identity.ek_tpm_info                   info      the TPM manufacturer/model/version the certificate names
identity.ek_cert_unused                info      a certificate of another EK (the node's other algorithm)
identity.ek_pinned                     info      accepted by an EK pin: not certified by a manufacturer
=====================================  ========  ==========================================================
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from tmb.attest import tpm2
from tmb.attest.akcheck import attribute_names, attribute_problems
from tmb.attest.quote import AkPublic, load_ak
from tmb.errors import ConfigError, Finding, ParseError, Report, Severity

__all__ = [
    "BUILTIN",
    "EkResult",
    "TpmInfo",
    "TrustStore",
    "builtin_roots_dir",
    "ek_pin",
    "load_certificates",
    "verify_ek",
]

OID_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
OID_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
OID_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
OID_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")
EK_REQUIRED = ("fixedTPM", "fixedParent", "sensitiveDataOrigin", "restricted", "decrypt")
EK_FORBIDDEN = ("sign",)
CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der")
MAX_CHAIN = 8
# The keyword of ``[identity] ek_roots`` (and ``--ek-roots``) for the curated store shipped with tmb.
BUILTIN = "builtin"
_MAX_PATHS = 16
# Findings a pin may downgrade to warnings: everything about the certificate, nothing about the EK itself.
_EK_OWN = {"identity.ek_public_malformed", "identity.ek_attributes"}

_E = TypeVar("_E", bound=x509.ExtensionType)


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _trim_der(data: bytes) -> bytes:
    """A DER certificate followed by NV padding (zeros or 0xff, as some TPMs store it) without the padding."""
    if len(data) < 4 or data[0] != 0x30 or data[1] & 0x80 == 0:
        return data
    n = data[1] & 0x7F
    if not 0 < n <= 3 or len(data) < 2 + n:
        return data
    end = 2 + n + int.from_bytes(data[2 : 2 + n], "big")
    rest = data[end:]
    if end < len(data) and (rest.strip(b"\x00") == b"" or rest.strip(b"\xff") == b""):
        return data[:end]
    return data


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates from DER (one) or PEM (one or more); :class:`ParseError` for anything else."""
    data = bytes(data)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs = list(x509.load_pem_x509_certificates(data))
        else:
            certs = [x509.load_der_x509_certificate(_trim_der(data))]
        for cert in certs:  # cryptography parses these lazily: fail here, not in the middle of a check
            cert.public_key()
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise ParseError(f"not a usable X.509 certificate (DER or PEM): {exc}") from None
    return certs


def builtin_roots_dir() -> Path:
    """The curated store of public TPM manufacturer certificates shipped with tmb (package data;
    ``ORIGINS.md`` there says where each came from)."""
    return Path(__file__).resolve().parent.parent / "data" / "ek_roots"


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True)
class TrustStore:
    """Trusted TPM manufacturer roots (self-signed) and the intermediates that may link an EK to them.

    An intermediate helps build a chain but is trusted only through a root. ``origins`` names the file each
    certificate came from (by SHA-256 fingerprint; ``builtin/NAME`` for the shipped store, whose
    ``ORIGINS.md`` says where NAME came from), for findings and ``tmb identity roots``.
    """

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    origins: Mapping[bytes, str] = field(default_factory=dict)

    @classmethod
    def from_certificates(cls, certs: Iterable[x509.Certificate], origin: str = "") -> TrustStore:
        roots: list[x509.Certificate] = []
        inter: list[x509.Certificate] = []
        for cert in certs:
            (roots if _self_signed(cert) else inter).append(cert)
        return cls(tuple(roots), tuple(inter), {_fingerprint(c): origin for c in (*roots, *inter)})

    @classmethod
    def from_directory(cls, path: str | Path) -> TrustStore:
        """Every ``*.pem``/``*.crt``/``*.cer``/``*.der`` file under ``path`` (recursively); a file that is not
        a certificate, or a directory with no root at all, is a :class:`ConfigError` (fail closed)."""
        store = cls._read_directory(Path(path))
        if not store.roots:
            raise ConfigError(
                f"EK trust store {path} holds no self-signed root certificate",
                hint="put the TPM manufacturers' root CA certificates (PEM or DER) there",
            )
        return store

    @classmethod
    def _read_directory(cls, root: Path, origin_prefix: str = "") -> TrustStore:
        if not root.is_dir():
            raise ConfigError(f"EK trust store {root} is not a directory")
        roots: list[x509.Certificate] = []
        inter: list[x509.Certificate] = []
        origins: dict[bytes, str] = {}
        for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in CERT_SUFFIXES):
            try:
                certs = load_certificates(file.read_bytes())
            except (OSError, ParseError) as exc:
                raise ConfigError(f"EK trust store: cannot read {file}: {exc}") from None
            part = cls.from_certificates(certs, origin_prefix + file.relative_to(root).as_posix())
            roots += part.roots
            inter += part.intermediates
            origins.update(part.origins)
        return cls(tuple(roots), tuple(inter), origins)

    @classmethod
    def load(cls, spec: str | Path) -> TrustStore:
        """The store ``[identity] ek_roots`` names: ``"builtin"`` (the curated manufacturer roots shipped with
        tmb, :func:`builtin_roots_dir`), a directory (:meth:`from_directory`), or ``"builtin:DIR"``, both
        (DIR may then hold only intermediates under a builtin root). A directory literally named
        ``builtin`` is ``./builtin``."""
        text = str(spec).strip()
        if not text:
            raise ConfigError("no EK trust store named", hint=f'name a directory or "{BUILTIN}"')
        if text != BUILTIN and not text.startswith(BUILTIN + ":"):
            return cls.from_directory(text)
        where = builtin_roots_dir()
        if not where.is_dir():
            raise ConfigError(
                f"the builtin EK trust store {where} is missing",
                hint="tmb was installed without its package data; reinstall it, or name a directory",
            )
        store = cls._read_directory(where, BUILTIN + "/")
        extra = text[len(BUILTIN) + 1 :].strip()
        if text != BUILTIN:
            if not extra:
                raise ConfigError(f"{text!r} names no directory after {BUILTIN + ':'!r}")
            store = store.merged(cls._read_directory(Path(extra)))
        if not store.roots:  # the shipped store always has roots; fail closed if a packager emptied it
            raise ConfigError(f"EK trust store {text!r} holds no self-signed root certificate")
        return store

    def merged(self, other: TrustStore) -> TrustStore:
        """Both stores' roots and intermediates (a certificate in both once, with this store's origin)."""
        seen = {_fingerprint(c) for c in (*self.roots, *self.intermediates)}
        roots = [c for c in other.roots if _fingerprint(c) not in seen]
        inter = [c for c in other.intermediates if _fingerprint(c) not in seen]
        return TrustStore(
            (*self.roots, *roots), (*self.intermediates, *inter), {**other.origins, **self.origins}
        )

    def is_root(self, cert: x509.Certificate) -> bool:
        return any(_fingerprint(cert) == _fingerprint(r) for r in self.roots)


@dataclass(frozen=True)
class TpmInfo:
    """The TCG subjectAltName fields of an EK certificate, as written (``id:49465800``) and decoded."""

    manufacturer: str | None = None
    model: str | None = None
    version: str | None = None

    @property
    def manufacturer_id(self) -> int | None:
        return _tcg_id(self.manufacturer)

    @property
    def vendor(self) -> str | None:
        """The TCG vendor id as its ASCII letters (``IFX``, ``NTC``, ``STM``, ``INTC``) where it is text."""
        vid = self.manufacturer_id
        if vid is None:
            return None
        text = vid.to_bytes(4, "big").rstrip(b"\x00 ")
        return text.decode() if text and all(0x20 < b < 0x7F for b in text) else None

    @property
    def firmware(self) -> str | None:
        """tpmVersion ``id:XXXXYYYY`` as ``X.Y`` (major.minor of the firmware)."""
        v = _tcg_id(self.version)
        return None if v is None else f"{v >> 16}.{v & 0xFFFF}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "manufacturer": self.manufacturer,
            "vendor": self.vendor,
            "model": self.model,
            "version": self.version,
            "firmware": self.firmware,
        }


def _tcg_id(value: str | None) -> int | None:
    if value is None or not value.lower().startswith("id:"):
        return None
    try:
        return int(value[3:], 16) if len(value) == 11 else None
    except ValueError:
        return None


@dataclass(frozen=True)
class EkResult:
    """What :func:`verify_ek` found: ``ek_trust`` is ``"certified"``, ``"pinned"`` or ``None`` (refused)."""

    report: Report
    ek_trust: str | None = None
    algorithm: str | None = None
    ek_sha256: str | None = None  # :func:`ek_pin` of the EK
    certificate: x509.Certificate | None = None
    chain: tuple[str, ...] = ()  # subjects, EK certificate first, root last
    tpm: TpmInfo | None = None

    @property
    def ok(self) -> bool:
        return self.ek_trust is not None and self.report.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "ek_trust": self.ek_trust,
            "algorithm": self.algorithm,
            "ek_sha256": self.ek_sha256,
            "chain": list(self.chain),
            "tpm": self.tpm.to_dict() if self.tpm else None,
            "findings": self.report.to_list(),
        }


def ek_pin(ek_public: bytes | AkPublic) -> str:
    """The pin of an EK: SHA-256 (hex) of its DER SubjectPublicKeyInfo."""
    return hashlib.sha256(_spki(load_ak(ek_public).key)).hexdigest()


def _normalise_pin(pin: str) -> str:
    text = pin.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"EK pin {pin!r} is not a SHA-256 in hex", hint="use the output of ek_pin()")
    return text


# ------------------------------------------------------------------------------------------- checks


def _extensions(cert: x509.Certificate, where: str, out: list[Finding]) -> x509.Extensions | None:
    try:
        return cert.extensions
    except ValueError as exc:
        out.append(
            Finding(
                "identity.ek_cert_malformed",
                f"the extensions of {where} do not parse: {exc}",
                context={"subject": _subject(cert)},
            )
        )
        return None


def _ext(exts: x509.Extensions | None, kind: type[_E]) -> _E | None:
    if exts is None:
        return None
    try:
        return exts.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _unknown_critical(exts: x509.Extensions | None, cert: x509.Certificate, out: list[Finding]) -> None:
    for ext in exts or ():
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            out.append(
                Finding(
                    "identity.ek_unknown_critical_extension",
                    f"{_subject(cert)} has a critical extension {ext.oid.dotted_string} unknown here",
                    context={"subject": _subject(cert), "oid": ext.oid.dotted_string},
                )
            )


def _validity(cert: x509.Certificate, at: dt.datetime, leaf: bool) -> Finding | None:
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if before <= at <= after:
        return None
    if leaf:
        fid = "identity.ek_expired" if at > after else "identity.ek_not_yet_valid"
        what = "the EK certificate"
    else:
        fid, what = "identity.ek_issuer_expired", f"the CA certificate {_subject(cert)}"
    return Finding(
        fid,
        f"{what} is valid from {before.isoformat()} to {after.isoformat()}, not at {at.isoformat()}",
        context={"subject": _subject(cert), "not_before": before.isoformat(), "not_after": after.isoformat()},
    )


def _check_issuer(cert: x509.Certificate, below: int, is_root: bool, out: list[Finding]) -> None:
    """CA checks on an issuer with ``below`` intermediate CA certificates under it in the chain."""
    exts = _extensions(cert, f"the CA certificate {_subject(cert)}", out)
    bc = _ext(exts, x509.BasicConstraints)
    ku = _ext(exts, x509.KeyUsage)
    problem = None
    if bc is None and not is_root:
        problem = "has no basicConstraints"
    elif bc is not None and not bc.ca:
        problem = "says cA=FALSE"
    elif bc is not None and bc.path_length is not None and below > bc.path_length:
        problem = f"allows {bc.path_length} intermediate CA(s) below it, the chain has {below}"
    elif ku is not None and not ku.key_cert_sign:
        problem = "has a keyUsage without keyCertSign"
    if problem:
        out.append(
            Finding(
                "identity.ek_issuer_not_ca",
                f"the issuer {_subject(cert)} {problem}",
                context={"subject": _subject(cert)},
            )
        )
    if not is_root:
        _unknown_critical(exts, cert, out)


def _check_leaf(cert: x509.Certificate, algorithm: str, out: list[Finding]) -> TpmInfo | None:
    exts = _extensions(cert, "the EK certificate", out)
    if exts is None:
        return None
    _unknown_critical(exts, cert, out)
    bc = _ext(exts, x509.BasicConstraints)
    if bc is not None and bc.ca:
        out.append(Finding("identity.ek_is_ca", "the EK certificate is a CA certificate (cA=TRUE)"))
    ku = _ext(exts, x509.KeyUsage)
    need = "keyEncipherment" if algorithm == "rsa" else "keyAgreement"
    if ku is None or not (ku.key_encipherment if algorithm == "rsa" else ku.key_agreement):
        out.append(
            Finding(
                "identity.ek_key_usage",
                f"the {algorithm.upper()} EK certificate "
                + ("has no keyUsage" if ku is None else f"keyUsage lacks {need}"),
                context={"needed": need},
            )
        )
    eku = _ext(exts, x509.ExtendedKeyUsage)
    if eku is not None and OID_EK_CERTIFICATE not in list(eku):
        out.append(
            Finding(
                "identity.ek_eku",
                "the extendedKeyUsage does not name tcg-kp-EKCertificate (2.23.133.8.1)",
                Severity.WARNING,
                {"eku": [oid.dotted_string for oid in eku]},
            )
        )
    return _tpm_info(_ext(exts, x509.SubjectAlternativeName), out)


def _tpm_info(san: x509.SubjectAlternativeName | None, out: list[Finding]) -> TpmInfo | None:
    names = [] if san is None else san.get_values_for_type(x509.DirectoryName)
    values: dict[x509.ObjectIdentifier, str] = {}
    for name in names:
        for oid in (OID_TPM_MANUFACTURER, OID_TPM_MODEL, OID_TPM_VERSION):
            for attr in name.get_attributes_for_oid(oid):
                values.setdefault(oid, attr.value if isinstance(attr.value, str) else attr.value.hex())
    if not values:
        out.append(
            Finding(
                "identity.ek_san_absent",
                "no TCG subjectAltName (tpmManufacturer, tpmModel, tpmVersion) in the EK certificate",
                Severity.WARNING,
            )
        )
        return None
    info = TpmInfo(values.get(OID_TPM_MANUFACTURER), values.get(OID_TPM_MODEL), values.get(OID_TPM_VERSION))
    problems = [
        label
        for label, bad in (
            ("tpmManufacturer is not id:XXXXXXXX", info.manufacturer_id is None),
            ("tpmModel is missing", info.model is None),
            ("tpmVersion is not id:XXXXXXXX", info.firmware is None),
        )
        if bad
    ]
    if problems:
        out.append(
            Finding(
                "identity.ek_san_malformed",
                "TCG subjectAltName: " + "; ".join(problems),
                Severity.WARNING,
                info.to_dict(),
            )
        )
    out.append(
        Finding(
            "identity.ek_tpm_info",
            f"TPM {info.vendor or info.manufacturer} {info.model or '?'} "
            f"firmware {info.firmware or info.version}",
            Severity.INFO,
            info.to_dict(),
        )
    )
    return info


# ------------------------------------------------------------------------------------------- chains


def _paths(
    leaf: x509.Certificate, store: TrustStore, extra: Sequence[x509.Certificate]
) -> tuple[list[list[x509.Certificate]], list[str]]:
    """Every chain (up to 16) from ``leaf`` to a root of ``store``: names match and each signature verifies
    with the next key. The second value says why the dead ends ended."""
    pool = [*store.roots, *store.intermediates, *extra]
    paths: list[list[x509.Certificate]] = []
    problems: list[str] = []

    def walk(path: list[x509.Certificate]) -> None:
        cert = path[-1]
        if len(path) > 1 and store.is_root(cert):
            paths.append(path)
            return
        if len(paths) >= _MAX_PATHS:
            return
        if len(path) > MAX_CHAIN:
            problems.append(f"the chain is longer than {MAX_CHAIN} certificates")
            return
        seen = {_fingerprint(c) for c in path}
        named = [c for c in pool if c.subject == cert.issuer and _fingerprint(c) not in seen]
        if not named:
            problems.append(f"no trusted certificate named {cert.issuer.rfc4514_string()!r}")
        for candidate in named:
            try:
                cert.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
                if isinstance(_signature_hash(cert), hashes.SHA1):
                    problems.append(
                        f"{SHA1_LINK}{_subject(cert)} is signed with SHA-1 by {_subject(candidate)}"
                    )
                    continue
                problems.append(
                    f"the signature of {_subject(cert)} does not verify with the key of "
                    f"{_subject(candidate)}{': ' + str(exc) if str(exc) else ''}"
                )
                continue
            walk([*path, candidate])

    walk([leaf])
    return paths, problems


SHA1_LINK = "sha1:"  # marks a dead end of :func:`_paths` that only a SHA-1 signature made


def _signature_hash(cert: x509.Certificate) -> hashes.HashAlgorithm | None:
    try:
        return cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None


def _check_path(path: list[x509.Certificate], at: dt.datetime) -> list[Finding]:
    out: list[Finding] = []
    for i, cert in enumerate(path):
        found = _validity(cert, at, leaf=i == 0)
        if found:
            out.append(found)
        if i > 0:
            _check_issuer(cert, below=i - 1, is_root=i == len(path) - 1, out=out)
    return out


def _chain(
    cert: x509.Certificate,
    store: TrustStore | None,
    extra: Sequence[x509.Certificate],
    at: dt.datetime,
) -> tuple[list[x509.Certificate], list[Finding]]:
    if store is None:
        return [cert], [Finding("identity.ek_untrusted_chain", "no EK trust store is configured")]
    paths, problems = _paths(cert, store, extra)
    weak = [p.removeprefix(SHA1_LINK) for p in problems if p.startswith(SHA1_LINK)]
    if not paths and weak:  # cryptography verifies no SHA-1 certificate signature, and neither does tmb
        return [cert], [
            Finding(
                "identity.ek_weak_signature",
                f"the EK certificate's chain needs a SHA-1 signature ({weak[0]}), which tmb does not verify; "
                "pin this EK ([identity] ek_pins) to enrol the node",
                context={"issuer": cert.issuer.rfc4514_string(), "reasons": weak[:8]},
            )
        ]
    if not paths:
        return [cert], [
            Finding(
                "identity.ek_untrusted_chain",
                f"the EK certificate does not chain to a trusted TPM manufacturer root: {problems[0]}",
                context={"issuer": cert.issuer.rfc4514_string(), "reasons": problems[:8]},
            )
        ]
    scored = [(path, _check_path(path, at)) for path in paths]
    return min(scored, key=lambda item: (sum(f.severity is Severity.ERROR for f in item[1]), len(item[0])))


# ------------------------------------------------------------------------------------------- verify


def _ek_attributes(ek: AkPublic, report: Report) -> None:
    pub = ek.public
    assert pub is not None  # noqa: S101 (parsed EKs have a public area)
    missing, extra = attribute_problems(pub.object_attributes, EK_REQUIRED, EK_FORBIDDEN)
    no_aes = pub.symmetric[0] != tpm2.ALG_AES or pub.symmetric[2] != tpm2.ALG_CFB
    if missing or extra or no_aes:
        report.add(
            "identity.ek_attributes",
            "the EK public area is not a TPM-resident restricted decryption key with AES-CFB",
            missing=missing,
            extra=extra,
            attributes=attribute_names(pub.object_attributes),
            symmetric=f"{tpm2.alg_name(pub.symmetric[0])}/{tpm2.alg_name(pub.symmetric[2])}",
        )


def verify_ek(
    ek_public: bytes,
    certificates: Sequence[bytes] = (),
    store: TrustStore | None = None,
    *,
    pins: Iterable[str] = (),
    intermediates: Sequence[bytes] = (),
    at: dt.datetime | None = None,
) -> EkResult:
    """Validate the EK ``ek_public`` (``TPM2B_PUBLIC``) with its ``certificates`` (DER or PEM each; a PEM
    bundle's first certificate is the EK's, the rest intermediates) against ``store`` at time ``at`` (now by
    default), or accept it by one of ``pins`` (see :func:`ek_pin`). Never raises on bad node input; a
    malformed pin (policy) raises :class:`ConfigError`."""
    at = at or dt.datetime.now(dt.UTC)
    pinned = {_normalise_pin(p) for p in pins}
    report = Report()
    try:
        ek = load_ak(bytes(ek_public))
        if ek.public is None:
            raise ParseError("a bare public key, not a TPM2B_PUBLIC")
    except ParseError as exc:
        report.add("identity.ek_public_malformed", f"the EK public area is unreadable: {exc}", **exc.context)
        return EkResult(report)
    _ek_attributes(ek, report)
    spki = _spki(ek.key)
    fp = hashlib.sha256(spki).hexdigest()
    result = EkResult(report, algorithm=ek.algorithm, ek_sha256=fp)

    found: list[Finding] = []
    leaves: list[x509.Certificate] = []
    extra: list[x509.Certificate] = []
    for i, blob in enumerate(certificates):
        try:
            certs = load_certificates(blob)
        except ParseError as exc:
            found.append(
                Finding("identity.ek_cert_malformed", f"EK certificate {i}: {exc}", context={"index": i})
            )
            continue
        leaves.append(certs[0])
        extra += certs[1:]
    for i, blob in enumerate(intermediates):
        try:
            extra += load_certificates(blob)
        except ParseError as exc:
            found.append(
                Finding("identity.ek_cert_malformed", f"intermediate {i}: {exc}", context={"index": i})
            )
    matching = [c for c in leaves if _spki(c.public_key()) == spki]
    for cert in leaves:
        if cert not in matching:
            found.append(
                Finding(
                    "identity.ek_cert_unused",
                    f"the certificate {_subject(cert)} is for another key than this EK",
                    Severity.INFO,
                    {
                        "subject": _subject(cert),
                        "key_sha256": hashlib.sha256(_spki(cert.public_key())).hexdigest(),
                    },
                )
            )
    if not certificates:
        found.append(Finding("identity.ek_cert_missing", "the node sent no EK certificate"))
    elif leaves and not matching:
        found.append(
            Finding(
                "identity.ek_key_mismatch",
                "no EK certificate holds the key of the EK public area the node sent",
                context={"ek_sha256": fp, "certificates": [_subject(c) for c in leaves]},
            )
        )
    best: tuple[x509.Certificate, list[x509.Certificate], list[Finding], TpmInfo | None] | None = None
    for cert in matching:
        own: list[Finding] = []
        info = _check_leaf(cert, ek.algorithm, own)
        path, chain_findings = _chain(cert, store, extra, at)
        own += chain_findings
        if best is None or _errors(own) < _errors(best[2]):
            best = (cert, path, own, info)
    if best is not None:
        found += best[2]
        result = replace(result, certificate=best[0], chain=tuple(map(_subject, best[1])), tpm=best[3])

    certified = best is not None and _errors(found) == 0
    pin_hit = pinned & {fp, hashlib.sha256(ek.public.raw if ek.public else b"").hexdigest()}
    if certified:
        trust: str | None = "certified"
        report.extend(found)
    elif pin_hit:
        trust = "pinned"
        report.extend(
            replace(f, severity=Severity.WARNING)
            if f.severity is Severity.ERROR and f.id not in _EK_OWN
            else f
            for f in found
        )
        report.add(
            "identity.ek_pinned",
            "EK accepted by its pin in policy, not by a manufacturer certificate",
            severity=Severity.INFO,
            pin=sorted(pin_hit)[0],
        )
    else:
        trust = None
        report.extend(found)
    return replace(result, ek_trust=trust if report.ok else None)


def _errors(findings: Iterable[Finding]) -> int:
    return sum(f.severity is Severity.ERROR for f in findings)
