"""The auditor's checks of what a daemon exported beside the quotes (docs/evidence-bundle.md): the
telemetry hash chain as the probe sealed it, each quote's binding to a chain head and a daemon nonce, and
the daemon's signed nonce log (freshness, checked without trusting the daemon's word).

The chain digest and the quote's qualifying data are the wire format of docs/probe.md, defined here so the
verifiers need nothing of the ingest (:mod:`tmb.ingest.wire` uses these functions)::

    batch digest      = SHA-256("tmb-telemetry-batch\\0v1" ‖ u16 len(node) ‖ node ‖ segment ‖ u64 seq
                                ‖ prev ‖ u32 len(payload) ‖ payload)
    qualifying data   = SHA-256(daemon nonce ‖ chain head digest [‖ bindings digest])
    bindings digest   = SHA-256(canonical JSON of the process bindings document: sorted keys, no spaces,
                                ASCII with \\u escapes; :func:`bindings_bytes`)

A quote that names a process bindings document (the probe's ``bindings`` field) has the document's digest
in its qualifying data after the chain head; a quote that names none has the two-part form (the format
before bindings were quoted: such a quote covers no bindings document).

Nonce log (``tmb-nonce-log/1``, JSON): ``{"format", "node", "ttl_s", "entries": [{"node", "nonce",
"issued_ns", "consumed_ns", "quote"}], "key": {"algorithm": "Ed25519", "public_key_hex", "key_id"},
"signature": hex}``; the Ed25519 signature covers :func:`nonce_log_message` (the document without
``signature``, canonical JSON: sorted keys, no spaces, UTF-8).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tmb.attest.ekcert import TrustStore, ek_pin, verify_ek
from tmb.errors import Finding, InputError, ParseError, Report, Severity

__all__ = [
    "CHAIN_DOMAIN",
    "IDENTITY_FORMAT",
    "MAX_BINDINGS_BYTES",
    "NONCE_LOG_FORMAT",
    "ChainBatch",
    "IdentityFiles",
    "batch_digest",
    "bindings_bytes",
    "check_chain",
    "check_identity",
    "check_nonce_log",
    "covered",
    "identity_files",
    "nonce_log_message",
    "qualifying_data",
    "read_batches",
    "signed_message",
]

CHAIN_DOMAIN = b"tmb-telemetry-batch\x00v1"
NONCE_LOG_FORMAT = "tmb-nonce-log/1"
IDENTITY_FORMAT = "tmb-identity/1"
MAX_IDENTITY_CERTS = 8  # EK certificates one identity record names (enrolment takes at most 4)
MAX_BATCHES = 1_000_000  # lines of a bundle's batch file
MAX_BINDINGS_BYTES = 4 * 1024 * 1024  # one canonical bindings document (a few KiB per GPU process)


def batch_digest(node: str, segment: bytes, seq: int, prev: bytes, payload: bytes) -> bytes:
    """The chain digest of one telemetry batch (the encoding in the module docstring)."""
    node_b = node.encode("utf-8")
    h = hashlib.sha256(CHAIN_DOMAIN)
    h.update(struct.pack(">H", len(node_b)) + node_b + segment + struct.pack(">Q", seq) + prev)
    h.update(struct.pack(">I", len(payload)))
    h.update(payload)
    return h.digest()


def qualifying_data(nonce: bytes, head_digest: bytes, bindings: bytes | None = None) -> bytes:
    """What the probe passes to TPM2_Quote as extraData: SHA-256(daemon nonce ‖ chain head digest), with
    the quote's process bindings digest (32 bytes) appended inside when it names one."""
    if bindings is not None and len(bindings) != 32:
        raise ValueError("the bindings digest must be 32 bytes (SHA-256)")
    return hashlib.sha256(nonce + head_digest + (bindings or b"")).digest()


def bindings_bytes(doc: Any) -> bytes:
    """The canonical bytes of a process bindings document (what its digest is taken over, what the evidence
    trail keeps and a bundle holds): JSON, sorted keys, no spaces, ASCII (``\\u`` escapes). ValueError for
    what JSON cannot hold (NaN, lone surrogates are escaped, so every str is fine)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class ChainBatch:
    """One line of a bundle's batch file (the wire form of docs/probe.md)."""

    line: int
    node: str
    segment: bytes
    seq: int
    prev: bytes
    payload: bytes
    digest: bytes

    def intact(self) -> bool:
        return batch_digest(self.node, self.segment, self.seq, self.prev, self.payload) == self.digest


def _hex(doc: Mapping[str, Any], key: str, size: int | None, where: str) -> bytes:
    value = doc.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        raise InputError(f"{where}: {key} must be {size or 'some'} bytes of hex", key=key)
    return raw


def read_batches(data: bytes, where: str) -> list[ChainBatch]:
    """The batches of a JSON-lines batch file; InputError names the file and line."""
    out: list[ChainBatch] = []
    for i, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        if len(out) >= MAX_BATCHES:
            raise InputError(f"{where}: more than {MAX_BATCHES} batches", path=where)
        at = f"{where} line {i}"
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            payload = base64.b64decode(str(doc.get("payload")), validate=True)
        except (ValueError, binascii.Error) as exc:
            raise InputError(f"{at}: not a batch ({exc})", path=where, line=i) from None
        seq = doc.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InputError(f"{at}: seq must be an integer >= 0", path=where, line=i)
        out.append(
            ChainBatch(
                i,
                str(doc.get("node", "")),
                _hex(doc, "segment", 16, at),
                seq,
                _hex(doc, "prev", 32, at),
                payload,
                _hex(doc, "digest", 32, at),
            )
        )
    return out


def check_chain(batches: Sequence[ChainBatch], node: str, where: str, report: Report) -> set[bytes]:
    """Every batch's digest recomputed (``chain.digest_mismatch``: edited after sealing), each batch of a
    segment linked to the one before (``chain.link_broken``), all of ``node`` (``chain.node_mismatch``).
    Returns the digests of the intact batches (the heads a quote may name)."""
    good: set[bytes] = set()
    last: dict[bytes, ChainBatch] = {}
    for b in batches:
        ctx: dict[str, Any] = {"file": where, "line": b.line, "segment": b.segment.hex(), "seq": b.seq}
        if b.node != node:
            report.add("chain.node_mismatch", "a batch sealed for another node", got=b.node, **ctx)
            continue
        if not b.intact():
            report.add(
                "chain.digest_mismatch",
                "the batch's digest is not the digest of its fields: edited after sealing",
                **ctx,
            )
            continue
        before = last.get(b.segment)
        if before is not None and (b.seq != before.seq + 1 or b.prev != before.digest):
            report.add(
                "chain.link_broken",
                "the batch does not follow the one before it in its segment",
                previous_seq=before.seq,
                **ctx,
            )
        last[b.segment] = b
        good.add(b.digest)
    return good


def covered(batches: Sequence[ChainBatch], heads: Sequence[bytes]) -> set[bytes]:
    """The digests of the intact batches each head (a quoted chain head's digest) covers: the head and,
    walking back through ``prev`` while the bundle holds the batch, every batch before it (a quote's
    qualifying data covers its head, and the head's digest every batch before it)."""
    by_digest = {b.digest: b for b in batches if b.intact()}
    out: set[bytes] = set()
    for head in heads:
        d = head
        while d in by_digest and d not in out and len(out) <= len(by_digest):
            out.add(d)
            d = by_digest[d].prev
    return out


def signed_message(doc: Mapping[str, Any]) -> bytes:
    """What a daemon-signed document's signature covers (the nonce log, the identity record): the document
    without ``signature``, canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


nonce_log_message = signed_message


@dataclass(frozen=True)
class QuoteNonce:
    """What the audit knows of one quote for the freshness check."""

    label: str
    daemon_nonce: bytes
    digest: bytes  # SHA-256 of the TPMS_ATTEST


def check_nonce_log(
    doc: Any,
    quotes: Sequence[QuoteNonce],
    where: str,
    report: Report,
    *,
    pinned: Sequence[bytes] = (),
) -> str | None:
    """The nonce log's signature (``nonces.signature_invalid``; ``nonces.key_not_pinned`` when ``pinned``
    daemon keys were given and none is the log's, a warning ``nonces.key_unpinned`` when none were given),
    and for each quote: its daemon nonce is in the log (``nonces.not_issued``), consumed by this quote
    (``nonces.consumed_by_other``), issued before it was consumed and within the TTL (``nonces.stale``).
    Returns the signing key's id (None when the log is unusable)."""
    if not isinstance(doc, dict) or doc.get("format") != NONCE_LOG_FORMAT:
        report.add("nonces.malformed", f"the nonce log is not a {NONCE_LOG_FORMAT} document", file=where)
        return None
    key = doc.get("key")
    try:
        raw = bytes.fromhex(str(key.get("public_key_hex"))) if isinstance(key, dict) else b""
        sig = bytes.fromhex(str(doc.get("signature")))
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, nonce_log_message(doc))
    except (ValueError, InvalidSignature):
        report.add(
            "nonces.signature_invalid",
            "the nonce log's signature does not verify with its key: edited after the daemon signed it",
            file=where,
        )
        return None
    kid = hashlib.sha256(raw).hexdigest()
    if pinned and raw not in pinned:
        report.add(
            "nonces.key_not_pinned", "the nonce log is signed by a key the auditor did not name", key_id=kid
        )
    elif not pinned:
        report.add(
            "nonces.key_unpinned",
            "the nonce log's signing key was not checked against a daemon key (--daemon-key)",
            severity=Severity.WARNING,
            key_id=kid,
        )
    ttl_ns = _ttl_ns(doc.get("ttl_s"))
    entries = {e.get("nonce"): e for e in _entries(doc)}
    for q in quotes:
        ctx: dict[str, Any] = {"quote": q.label, "nonce": q.daemon_nonce.hex(), "file": where}
        entry = entries.get(q.daemon_nonce.hex())
        if entry is None:
            report.add("nonces.not_issued", "the quote's nonce is not in the daemon's nonce log", **ctx)
            continue
        if entry.get("quote") != q.digest.hex():
            report.add(
                "nonces.consumed_by_other",
                "the nonce log says another quote consumed this nonce",
                logged=entry.get("quote"),
                **ctx,
            )
        issued, consumed = entry.get("issued_ns"), entry.get("consumed_ns")
        if (
            not isinstance(issued, int)
            or not isinstance(consumed, int)
            or consumed < issued
            or ttl_ns is None
            or consumed - issued > ttl_ns
        ):
            report.add(
                "nonces.stale",
                "the quote did not arrive within the nonce's lifetime after the daemon issued it",
                issued_ns=issued,
                consumed_ns=consumed,
                ttl_s=doc.get("ttl_s"),
                **ctx,
            )
    return kid


def _ttl_ns(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        return None
    return int(value * 1e9)


def _entries(doc: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    entries = doc.get("entries")
    if isinstance(entries, list):
        yield from (e for e in entries if isinstance(e, dict))


def _signature_key(doc: Mapping[str, Any]) -> bytes | None:
    """The Ed25519 key that signed ``doc`` (its ``key.public_key_hex``) when the signature verifies."""
    key = doc.get("key")
    try:
        raw = bytes.fromhex(str(key.get("public_key_hex"))) if isinstance(key, dict) else b""
        sig = bytes.fromhex(str(doc.get("signature")))
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, signed_message(doc))
    except (ValueError, InvalidSignature):
        return None
    return raw


@dataclass(frozen=True)
class IdentityFiles:
    """What the audit read of a bundle's identity record: the EK public area and certificates by their
    bundle file names (None: unreadable), and the name of the AK the quotes were verified with."""

    public: tuple[str, bytes | None]
    certificates: tuple[tuple[str, bytes | None], ...]
    ak_name: str | None
    node: str = ""  # the bundle's node


def identity_files(doc: Any) -> tuple[str | None, list[str]]:
    """The file names an identity record names: (EK public area, certificates)."""
    if not isinstance(doc, dict):
        return None, []
    public = doc.get("public")
    certs = doc.get("certificates")
    pub = public.get("file") if isinstance(public, dict) and isinstance(public.get("file"), str) else None
    names = (
        [c["file"] for c in certs if isinstance(c, dict) and isinstance(c.get("file"), str)]
        if isinstance(certs, list)
        else []
    )
    return pub, names[:MAX_IDENTITY_CERTS]


def check_identity(
    doc: Any,
    files: IdentityFiles,
    where: str,
    report: Report,
    *,
    pinned: Sequence[bytes] = (),
    roots: TrustStore | None = None,
) -> None:
    """The identity record of a daemon's export (``tmb-identity/1``): its signature (``identity.
    signature_invalid``; ``identity.key_not_pinned`` when ``pinned`` daemon keys were given and none is its
    key), the EK public area as recorded (its SHA-256 and its EK pin, ``ek_sha256``:
    ``identity.ek_public_mismatch``), each certificate as recorded (``identity.ek_cert_mismatch``), the AK
    the quotes were verified with is the one the node was pinned with (``identity.ak_mismatch``), the record
    is the bundle's node's (``identity.node_mismatch``). With
    ``roots`` (the auditor's TPM manufacturer roots) :func:`~tmb.attest.ekcert.verify_ek` runs again on the
    certificates at the time the daemon checked them (``audit.ek_recheck_failed`` when a certified EK is not
    certified by them); without, the daemon's decision is reported as ``audit.ek_not_rechecked`` (info)."""
    if not isinstance(doc, dict) or doc.get("format") != IDENTITY_FORMAT:
        report.add(
            "identity.malformed", f"the identity record is not a {IDENTITY_FORMAT} document", file=where
        )
        return
    raw = _signature_key(doc)
    if raw is None:
        report.add(
            "identity.signature_invalid",
            "the identity record's signature does not verify with its key: edited after the daemon signed it",
            file=where,
        )
        return
    if pinned and raw not in pinned:
        report.add(
            "identity.key_not_pinned",
            "the identity record is signed by a key the auditor did not name",
            key_id=hashlib.sha256(raw).hexdigest(),
        )
    if doc.get("node") != files.node:
        report.add(
            "identity.node_mismatch",
            "the identity record is another node's",
            file=where,
            node=files.node,
            got=doc.get("node"),
        )
    trust, ek_sha256, pin = doc.get("ek_trust"), doc.get("ek_sha256"), doc.get("pin")
    public_doc: dict[str, Any] = doc["public"] if isinstance(doc.get("public"), dict) else {}
    pub_name, public = files.public
    if public is None or hashlib.sha256(public).hexdigest() != public_doc.get("sha256"):
        report.add(
            "identity.ek_public_mismatch",
            "the EK public area is not the one the daemon recorded: edited or replaced",
            file=pub_name,
        )
        public = None
    else:
        try:
            fp = ek_pin(public)
        except ParseError as exc:
            fp = f"(unreadable: {exc.message})"
        if fp != ek_sha256:
            report.add(
                "identity.ek_public_mismatch",
                "the EK public area does not hash to the recorded ek_sha256",
                file=pub_name,
                ek_sha256=ek_sha256,
                got=fp,
            )
            public = None
    recorded: list[Any] = doc["certificates"] if isinstance(doc.get("certificates"), list) else []
    certs: list[bytes] = []
    for i, (name, data) in enumerate(files.certificates):
        want = recorded[i].get("sha256") if i < len(recorded) and isinstance(recorded[i], dict) else None
        if data is None or hashlib.sha256(data).hexdigest() != want:
            report.add(
                "identity.ek_cert_mismatch",
                "an EK certificate is not the one the daemon recorded: edited or replaced",
                file=name,
            )
            continue
        certs.append(data)
    if len(files.certificates) != len(recorded):
        report.add(
            "identity.ek_cert_mismatch",
            "the bundle holds another number of EK certificates than the daemon recorded",
            file=where,
            recorded=len(recorded),
            got=len(files.certificates),
        )
    if files.ak_name != doc.get("ak_name"):
        report.add(
            "identity.ak_mismatch",
            "the AK the quotes were verified with is not the AK the node was enrolled with",
            ak_name=doc.get("ak_name"),
            got=files.ak_name,
        )
    decision: dict[str, Any] = {
        "ek_trust": trust,
        "ek_sha256": ek_sha256,
        "pin": pin,
        "chain": doc.get("chain"),
    }
    if roots is None:
        report.add(
            "audit.ek_not_rechecked",
            "the EK certificates were not checked against manufacturer roots (--ek-roots): the daemon's "
            "decision is reported as it recorded it",
            severity=Severity.INFO,
            **decision,
        )
        return
    if public is None:
        return  # the mismatch above: nothing to re-check
    checked = doc.get("checked_ns")
    at = (
        dt.datetime.fromtimestamp(checked / 1e9, dt.UTC)
        if isinstance(checked, int) and not isinstance(checked, bool) and 0 < checked < 2**63
        else None
    )
    again = verify_ek(
        public, certs, roots, pins=[pin] if trust == "pinned" and isinstance(pin, str) else (), at=at
    )
    report.extend(Finding(f.id, f.message, f.severity, {"recheck": True, **f.context}) for f in again.report)
    if trust == "certified" and again.ek_trust != "certified":
        report.add(
            "audit.ek_recheck_failed",
            "the daemon recorded a certified EK, and the certificates do not certify it with these roots",
            **decision,
        )
    elif trust == "pinned":
        report.add(
            "audit.ek_pinned",
            "the daemon accepted the EK by a pin of its configuration, not by a manufacturer certificate",
            severity=Severity.INFO,
            **decision,
        )
