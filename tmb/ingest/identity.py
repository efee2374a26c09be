"""Node identity on the daemon: enrolment (EK certificate, AK checks, a credential challenge), activation
(the node proves it opened the credential), the node's pin to its EK and AK, re-keying by admin approval.

The protocol (docs/probe.md, "Node identity"), on the management listener, unauthenticated by nature:

1. ``POST /v1/ingest/{node}/enroll`` ``{"ek_public": hex TPM2B_PUBLIC, "ek_certificates": [base64 DER],
   "ak_public": hex TPM2B_PUBLIC}``: :func:`tmb.attest.ekcert.verify_ek` against the trust store and pins,
   :func:`tmb.attest.akcheck.check_ak`, then, if the node is new or comes back with the EK and AK it is
   pinned to (or an admin approved the new ones), a fresh 32-byte secret is made into a credential
   (:func:`tmb.attest.credential.make_credential`) for the AK's name under the EK; the challenge (one per
   node, the newest replaces an older one) is kept in the store with its expiry. Answer: ``{"challenge",
   "id_object": base64, "encrypted_secret": base64, "expires_in_s", "ek_trust", "ak_name"}``.
2. The probe's TPM opens it (ActivateCredential) and the probe answers ``POST /v1/ingest/{node}/activate``
   ``{"challenge", "proof"}`` with ``proof`` = :func:`tmb.ingest.auth.enrol_proof` (an HMAC keyed by the
   secret; the secret never travels). Any answer consumes the challenge (a wrong proof gets no second try).
3. On a match the node is pinned: its EK (``ek_sha256``), AK (public area and name), EK trust, and its
   evidence key (:func:`tmb.ingest.auth.derive_key`); the AK becomes the node's quote key.

A node pinned to one EK and AK that enrols with another is refused (``identity.rekey_unapproved``, naming
both) and the request is recorded (the admin status shows it); ``POST /v1/ingest/admin/nodes/{node}/approve``
``{"ek_sha256", "ak_name"}`` (admin token) approves exactly that EK and AK for one activation, is logged (an
``identity.rekey_approved`` finding, a warning in the log) and ``node.rekeyed`` is raised when the node
then activates with them.

=============================  ======  =======================================================================
id                             status  the enrolment or activation is refused because
=============================  ======  =======================================================================
identity.ek_* / identity.ak_*  403     the EK or AK checks failed (tables in :mod:`tmb.attest.ekcert`,
                                       :mod:`tmb.attest.akcheck`)
identity.rekey_unapproved      409     the node is pinned to another EK or AK; an admin must approve
identity.challenge_unknown     409     no outstanding challenge of that id (never made, already answered:
                                       a replayed activation, or replaced by a newer enrolment)
identity.challenge_expired     409     the challenge is older than ``challenge_ttl_s``
identity.proof_mismatch        403     the proof is not the secret's: the node's TPM did not open it
identity.malformed             400     the request does not follow the format above
=============================  ======  =======================================================================
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tmb.attest.akcheck import check_ak
from tmb.attest.credential import make_credential
from tmb.attest.ekcert import TrustStore, verify_ek
from tmb.attest.quote import load_ak
from tmb.errors import Finding, InputError, ParseError, Report, Severity
from tmb.ingest.auth import derive_key, enrol_proof
from tmb.ingest.results import IngestResult, refused, taken
from tmb.ingest.store import IngestBackend

__all__ = ["IdentityPolicy", "Pinned", "activate", "approve", "begin", "pinned", "status"]

log = logging.getLogger("tmb.ingest")

MAX_CERTS = 4
MAX_CERT_BYTES = 8192
MAX_PUBLIC_BYTES = 1024
PINNED, CHALLENGE, REKEY, REQUEST = "pinned", "challenge", "rekey", "rekey_request"


@dataclass(frozen=True)
class IdentityPolicy:
    """What the daemon trusts an EK by, and the protocol's bounds.

    ``trust``: the TPM manufacturer roots (None: no EK is certified, only pins admit one); ``pins``: EK
    pins (:func:`tmb.attest.ekcert.ek_pin`) of vTPMs without a manufacturer certificate; ``challenge_ttl_s``:
    how long a challenge may be answered; ``auth_skew_s``: the evidence requests' time window
    (:mod:`tmb.ingest.auth`); ``insecure_static_nodes``: nodes registered by AK alone (admin PUT,
    ``[attestation] nodes``) may post evidence unauthenticated, for tests and development only.
    """

    trust: TrustStore | None = None
    pins: tuple[str, ...] = ()
    challenge_ttl_s: float = 60.0
    auth_skew_s: float = 300.0
    insecure_static_nodes: bool = False

    @classmethod
    def load(
        cls,
        ek_roots: str = "",
        ek_pins: tuple[str, ...] = (),
        *,
        challenge_ttl_s: float = 60.0,
        auth_skew_s: float = 300.0,
        insecure_static_nodes: bool = False,
    ) -> IdentityPolicy:
        """From config values: ``ek_roots`` a directory of manufacturer roots, ``"builtin"`` (the curated
        store shipped with tmb) or ``"builtin:DIR"`` (both; :meth:`TrustStore.load`); empty: none."""
        verify_ek(b"", pins=ek_pins)  # a malformed pin is a ConfigError now, not at the first enrolment
        trust = TrustStore.load(ek_roots) if ek_roots else None
        return cls(trust, tuple(ek_pins), challenge_ttl_s, auth_skew_s, insecure_static_nodes)


@dataclass(frozen=True)
class Pinned:
    """An enrolled node: the EK and AK it is pinned to and its evidence key."""

    node: str
    ek_sha256: str
    ek_trust: str
    ak_public: bytes
    ak_name: str
    key: bytes
    enrolled_ns: int

    def to_public(self) -> dict[str, Any]:
        """What the admin status shows (never the key)."""
        return {
            "ek_sha256": self.ek_sha256,
            "ek_trust": self.ek_trust,
            "ak_name": self.ak_name,
            "enrolled_ns": self.enrolled_ns,
        }


def pinned(store: IngestBackend, node: str) -> Pinned | None:
    doc = store.identity(node, PINNED)
    if doc is None:
        return None
    return Pinned(
        node,
        str(doc["ek_sha256"]),
        str(doc["ek_trust"]),
        bytes.fromhex(doc["ak_public"]),
        str(doc["ak_name"]),
        bytes.fromhex(doc["key"]),
        int(doc["enrolled_ns"]),
    )


def status(store: IngestBackend, node: str) -> dict[str, Any]:
    """What the admin status shows of the node's identity (never a key or secret)."""
    pin = pinned(store, node)
    return {
        "pinned": pin.to_public() if pin is not None else None,
        "rekey_request": store.identity(node, REQUEST),
        "rekey_approved": store.identity(node, REKEY),
    }


def _err(fid: str, message: str, **context: Any) -> Finding:
    return Finding(fid, message, Severity.ERROR, context)


def _hex(doc: Mapping[str, Any], name: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str) or len(value) > 2 * MAX_PUBLIC_BYTES:
        raise ParseError(f"{name} must be hex of at most {MAX_PUBLIC_BYTES} bytes", field=name)
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ParseError(f"{name} is not hex", field=name) from None


def _certs(doc: Mapping[str, Any]) -> list[bytes]:
    raw = doc.get("ek_certificates", [])
    if not isinstance(raw, list) or len(raw) > MAX_CERTS:
        raise ParseError(f"ek_certificates must be a list of at most {MAX_CERTS}", field="ek_certificates")
    out = []
    for item in raw:
        if not isinstance(item, str) or len(item) > MAX_CERT_BYTES * 4 // 3 + 4:
            raise ParseError(f"an EK certificate must be base64 of at most {MAX_CERT_BYTES} bytes")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise ParseError("an EK certificate is not valid base64", field="ek_certificates") from None
    return out


def _malformed(exc: ParseError) -> IngestResult:
    return refused(Finding("identity.malformed", exc.message, Severity.ERROR, dict(exc.context)))


def begin(
    store: IngestBackend, policy: IdentityPolicy, node: str, doc: Any, now_ns: int, static_ak: bytes | None
) -> IngestResult:
    """Step 1 (in the caller's transaction): check the EK and AK, make and keep a challenge.
    ``static_ak``: the AK the node was registered with by AK alone, if any (it counts as its pin)."""
    try:
        if not isinstance(doc, Mapping):
            raise ParseError('expected {"ek_public", "ek_certificates", "ak_public"}')
        ek_public = _hex(doc, "ek_public")
        ak_public = _hex(doc, "ak_public")
        certs = _certs(doc)
    except ParseError as exc:
        return _malformed(exc)
    report = Report()
    ek = verify_ek(ek_public, certs, policy.trust, pins=policy.pins)
    report.extend(ek.report.findings)
    report.extend(check_ak(ak_public).findings)
    if not report.ok or ek.ek_trust is None or ek.ek_sha256 is None:
        untrusted = Finding("identity.ek_untrusted_chain", "the EK is neither certified nor pinned")
        refusal = next((f for f in report.findings if f.severity is Severity.ERROR), untrusted)
        return refused(refusal, report.findings, message="the node's EK or AK was refused")
    key = load_ak(ak_public)
    assert key.name is not None  # noqa: S101 (check_ak passed: a TPM public area)
    ak_name = key.name.hex()
    held = pinned(store, node)
    held_ak = held.ak_name if held is not None else None
    if held is None and static_ak is not None:
        try:
            static = load_ak(static_ak)
            held_ak = static.name.hex() if static.name is not None else "(a bare key)"
        except ParseError:
            held_ak = "(unreadable)"
    changed = (held is not None and held.ek_sha256 != ek.ek_sha256) or (
        held_ak is not None and held_ak != ak_name
    )
    if changed:
        approval = store.identity(node, REKEY)
        wanted = {"ek_sha256": ek.ek_sha256, "ak_name": ak_name}
        if approval is None or approval.get("want") != wanted:
            store.set_identity(
                node, REQUEST, {**wanted, "ek_trust": ek.ek_trust, "requested_ns": now_ns}, now_ns
            )
            f = _err(
                "identity.rekey_unapproved",
                "the node is pinned to another EK or AK; an admin must approve the new ones "
                f"(POST /v1/ingest/admin/nodes/{node}/approve with this ek_sha256 and ak_name)",
                pinned_ek_sha256=held.ek_sha256 if held is not None else None,
                pinned_ak_name=held_ak,
                ek_sha256=ek.ek_sha256,
                ak_name=ak_name,
            )
            return refused(f, [*report.findings, f])
    secret = os.urandom(32)
    challenge = os.urandom(16).hex()
    try:
        cred = make_credential(ek_public, key.name, secret)
    except InputError as exc:  # an EK verify_ek admitted but MakeCredential cannot use (P-384)
        f = _err("identity.ek_attributes", f"no credential can be made for this EK: {exc.message}")
        return refused(f, [*report.findings, f])
    store.set_identity(
        node,
        CHALLENGE,
        {
            "challenge": challenge,
            "secret": secret.hex(),
            "expires_ns": now_ns + int(policy.challenge_ttl_s * 1e9),
            "ek_sha256": ek.ek_sha256,
            "ek_trust": ek.ek_trust,
            "ak_public": ak_public.hex(),
            "ak_name": ak_name,
            "rekey": changed,
            # the EK material as received and the decision, for the evidence trail once activated
            "ek_public": ek_public.hex(),
            "ek_certificates": [base64.b64encode(c).decode() for c in certs],
            "ek_pin": _pin_used(ek.report.findings),
            "ek_chain": list(ek.chain),
            "ek_tpm": ek.tpm.to_dict() if ek.tpm is not None else None,
            "checked_ns": now_ns,
        },
        now_ns,
    )
    return taken(
        report.findings,
        {
            "challenge": challenge,
            "id_object": base64.b64encode(cred.id_object).decode(),
            "encrypted_secret": base64.b64encode(cred.encrypted_secret).decode(),
            "expires_in_s": policy.challenge_ttl_s,
            "ek_trust": ek.ek_trust,
            "ek_sha256": ek.ek_sha256,
            "ak_name": ak_name,
        },
    )


def activate(
    store: IngestBackend, node: str, doc: Any, now_ns: int
) -> tuple[IngestResult, Pinned | None, bool]:
    """Step 2 (in the caller's transaction): check the proof, consume the challenge, pin the node.
    ``(result, the pin on success, whether it was a re-keying)``."""
    if (
        not isinstance(doc, Mapping)
        or not isinstance(doc.get("challenge"), str)
        or not isinstance(doc.get("proof"), str)
        or len(doc["challenge"]) > 64
        or len(doc["proof"]) > 128
    ):
        return _malformed(ParseError('expected {"challenge": hex, "proof": hex}')), None, False
    held = store.identity(node, CHALLENGE)
    if held is None or not hmac.compare_digest(str(held["challenge"]), doc["challenge"]):
        f = _err(
            "identity.challenge_unknown",
            "no outstanding enrolment challenge of this id for this node (answered already, replaced, or "
            "never made)",
            challenge=doc["challenge"],
        )
        return refused(f), None, False
    store.set_identity(node, CHALLENGE, None, now_ns)  # one answer per challenge, right or wrong
    if now_ns > int(held["expires_ns"]):
        return refused(_err("identity.challenge_expired", "the enrolment challenge expired")), None, False
    secret = bytes.fromhex(held["secret"])
    want = enrol_proof(secret, node, held["challenge"], held["ek_sha256"], held["ak_name"])
    if not hmac.compare_digest(want, doc["proof"].lower()):
        f = _err(
            "identity.proof_mismatch",
            "the proof is not made with the challenge's secret: "
            "the TPM holding the EK and AK did not open it",
        )
        return refused(f), None, False
    pin = Pinned(
        node,
        held["ek_sha256"],
        held["ek_trust"],
        bytes.fromhex(held["ak_public"]),
        held["ak_name"],
        derive_key(secret, node),
        now_ns,
    )
    store.set_identity(
        node,
        PINNED,
        {
            "ek_sha256": pin.ek_sha256,
            "ek_trust": pin.ek_trust,
            "ak_public": pin.ak_public.hex(),
            "ak_name": pin.ak_name,
            "key": pin.key.hex(),
            "enrolled_ns": now_ns,
        },
        now_ns,
    )
    rekey = bool(held.get("rekey"))
    _keep_identity(store, node, held, pin, rekey, now_ns)
    if rekey:
        store.set_identity(node, REKEY, None, now_ns)
        store.set_identity(node, REQUEST, None, now_ns)
    store.upsert_node(node, pin.ak_public, now_ns)
    return taken([], {"node": node, "enrolled": True, **pin.to_public()}), pin, rekey


def _pin_used(findings: Sequence[Finding]) -> str | None:
    """The EK pin :func:`~tmb.attest.ekcert.verify_ek` accepted the EK by (its ``identity.ek_pinned``)."""
    for f in findings:
        if f.id == "identity.ek_pinned" and isinstance(f.context.get("pin"), str):
            return str(f.context["pin"])
    return None


def _keep_identity(
    store: IngestBackend, node: str, held: Mapping[str, Any], pin: Pinned, rekey: bool, now_ns: int
) -> None:
    """The evidence trail (append-only) records what the node was pinned by, as received and checked: the
    EK public area (``ek`` record; its blob is the TPM2B_PUBLIC), each EK certificate (``ek.cert`` blobs,
    DER, in the order sent; the record names their digests) and the decision (``ek_trust``, ``ek_sha256``,
    the pin, the chain, the TPM the certificate names, when it was checked); and the AK, when it is not
    the node's last recorded one. A re-keying adds records; the old ones stay."""
    if not isinstance(held.get("ek_public"), str):  # a challenge made before the trail kept EKs
        return
    certs = [store.put_blob("ek.cert", base64.b64decode(c)).hex() for c in held.get("ek_certificates", [])]
    store.keep(
        node,
        "ek",
        now_ns,
        bytes.fromhex(held["ek_public"]),
        ek_trust=pin.ek_trust,
        ek_sha256=pin.ek_sha256,
        pin=held.get("ek_pin"),
        chain=held.get("ek_chain", []),
        tpm=held.get("ek_tpm"),
        checked_ns=held.get("checked_ns"),
        certificates=certs,
        ak_name=pin.ak_name,
        rekey=rekey,
    )
    last = store.last_record(node, "ak")
    if last is None or last.digest != hashlib.sha256(pin.ak_public).digest():
        store.keep(node, "ak", now_ns, pin.ak_public)


def approve(
    store: IngestBackend, node: str, doc: Any, now_ns: int, who: str
) -> dict[str, Any] | IngestResult:
    """The admin approves the EK and AK ``doc`` names (``{"ek_sha256", "ak_name"}``, as the node's refused
    request showed them) for the node's next enrolment (in the caller's transaction). Naming them, rather
    than approving "the pending request", means a request an attacker slips in meanwhile is not approved."""
    want = {k: doc.get(k) for k in ("ek_sha256", "ak_name")} if isinstance(doc, Mapping) else {}
    if not all(isinstance(v, str) and 0 < len(v) <= 132 for v in want.values()) or len(want) != 2:
        return _malformed(
            ParseError('expected {"ek_sha256": hex, "ak_name": hex} of the EK and AK to approve')
        )
    approval = {"want": want, "approved_ns": now_ns, "approved_by": who}
    store.set_identity(node, REKEY, approval, now_ns)
    finding = Finding(
        "identity.rekey_approved",
        "an admin approved a new EK or AK for this node",
        Severity.WARNING,
        {**want, "approved_by": who},
    )
    store.add_findings(node, now_ns, [finding.to_dict()])
    log.warning("node %s: re-keying approved by %s: %s", node, who, want)
    return approval
