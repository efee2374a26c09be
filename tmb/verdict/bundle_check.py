"""``tmb audit`` of a bundle the daemon exported with a request's verdict: the decision re-derived from the
bundle alone and compared with the daemon's, and the signed verdict tied to the bundle's parts
(docs/evidence-bundle.md, "What tmb audit re-derives").

No trust in the daemon: the decision comes from the offline audit (:func:`tmb.attest.evidence.audit_bundle`:
quotes, IMA, policy, verity, chain, nonce log) and the fingerprint judged on the window's samples as cut
from the bundle's sealed telemetry batches; the verdict is only compared with it. Findings (errors):

============================  ==========================================================================
verdict.*                     the verdict's signature with the daemon's keys (``--daemon-key``, else the
                              key that signed the nonce log): :func:`tmb.verdict.signing.verify_verdict`
audit.decision_differs        the decision re-derived from the bundle is not the verdict's
audit.quote_not_in_verdict    an attested verdict's quote reference names no quote of the bundle
audit.telemetry_not_in_verdict  the window's samples are not the ones the verdict was judged on
audit.commitment_not_in_verdict  a bundled commitment's root is not a root the verdict saw mounted
audit.evidence_not_in_verdict  the bundle's AK, event log or policy is not the one the verdict names
telemetry.window_mismatch     ``telemetry.bin`` is not the window cut from the sealed batches
chain.window_unattested       a sealed batch with samples in the window is not behind a verified head
============================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tmb.attest.evidence import AuditResult, Bundle
from tmb.errors import Report, TmbError
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.signing import PublicKey, verify_verdict

__all__ = ["check_bundle_verdict", "derive_decision", "window_from_batches"]


def window_from_batches(bundle: Bundle, heads: Sequence[bytes]) -> tuple[bytes | None, int]:
    """The window's samples (``SampleBatch.encode()``) cut, as the daemon's engine cuts them, from the
    bundle's sealed batches that ``heads`` (the verified quotes' chain heads) cover; and how many batches
    with samples in the window no head covers. ``(None, 0)`` when the bundle has no batches or window."""
    if bundle.batches is None or bundle.window is None:
        return None, 0
    from tmb.attest.trail import covered, read_batches

    t0, t1 = bundle.window
    batches = read_batches(bundle.batches.read_bytes(), bundle.batches.name)
    attested = covered(batches, heads)
    parts, uncovered = [], 0
    for b in batches:
        if not b.intact() or not b.payload:
            continue
        try:
            part = SampleBatch.decode(b.payload).slice_time(t0, t1)
        except (TmbError, ValueError):
            continue
        if not len(part):
            continue
        if b.digest not in attested:
            uncovered += 1
            continue
        parts.append(part)
    if not parts:
        return None, uncovered
    parts.sort(key=lambda p: int(p.t_ns[0]))
    try:
        return SampleBatch.concat(parts).encode(), uncovered
    except Exception:  # mixed sources: the engine keeps the first source's
        return SampleBatch.concat([p for p in parts if p.source == parts[0].source]).encode(), uncovered


def derive_decision(audit: AuditResult, telemetry: str | None, synthetic: bool, demo: bool) -> str:
    """The daemon's decision rule (docs/verdict.md) applied to what the auditor checked: a failed audit is
    ``unattested``; no judged window ``insufficient_telemetry``; ``inconsistent`` ``model_mismatch``;
    otherwise ``verified``, or on synthetic telemetry ``demo`` (a demo deployment) else
    ``insufficient_telemetry``."""
    if not audit.ok:
        return "unattested"
    if telemetry not in ("consistent", "inconsistent", "inconclusive"):
        return "insufficient_telemetry"
    if telemetry == "inconsistent":
        return "model_mismatch"
    if synthetic:
        return "demo" if demo else "insufficient_telemetry"
    return "verified"


def check_bundle_verdict(
    bundle: Bundle,
    audit: AuditResult,
    telemetry: str | None,
    synthetic: bool,
    daemon_keys: Sequence[bytes],
) -> tuple[str, str | None, Report]:
    """``(re-derived decision, the verdict's decision, findings)`` for a bundle with a verdict."""
    report = Report()
    assert bundle.verdict is not None  # noqa: S101 (callers pass bundles with a verdict)
    try:
        doc: dict[str, Any] = json.loads(bundle.verdict.read_bytes())
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        report.add("verdict.malformed", f"verdict.json is not a verdict: {exc}")
        return derive_decision(audit, telemetry, synthetic, False), None, report
    keys = [PublicKey(k) for k in daemon_keys] or _nonce_log_key(bundle)
    report.extend(verify_verdict(doc, keys))
    claimed = str(doc.get("decision"))
    derived = derive_decision(audit, telemetry, synthetic, claimed == "demo")
    if derived != claimed:
        report.add(
            "audit.decision_differs",
            "the decision re-derived from the bundle is not the daemon's",
            derived=derived,
            verdict=claimed,
        )
    refs = set(doc.get("attestation_evidence") or ())
    att = doc.get("attestation") or {}
    if att.get("verified"):
        digests = {hashlib.sha256(q.message).hexdigest() for q in bundle.quotes}
        if not refs & digests:
            report.add("audit.quote_not_in_verdict", "the verdict rests on a quote the bundle does not hold")
        trail = {
            "ak_digest": hashlib.sha256(bundle.ak).hexdigest(),
            "eventlog_digest": (
                hashlib.sha256(bundle.eventlog.read_bytes()).hexdigest() if bundle.eventlog else ""
            ),
            "policy_digest": (
                hashlib.sha256(bundle.policy.read_bytes()).hexdigest()
                if bundle.policy is not None and bundle.policy.is_file()
                else ""
            ),
        }
        for key, digest in trail.items():  # verdicts signed before these fields existed lack them
            named = att.get(key)
            if isinstance(named, str) and named and named != digest:
                report.add(
                    "audit.evidence_not_in_verdict",
                    "the bundle holds another AK, event log or policy than the verdict names",
                    field=key,
                    verdict=named,
                    bundle=digest or None,
                )
        roots = set((att.get("verity_roots") or {}).values())
        for path in bundle.commitments:
            root = _root(path)
            if root not in roots:
                report.add(
                    "audit.commitment_not_in_verdict",
                    "the commitment's root is not a dm-verity root the verdict saw mounted",
                    file=path.name,
                    root=root,
                )
    verified = {q.label for q in audit.quotes if q.ok}
    heads = [q.head for q in bundle.quotes if q.head is not None and q.label in verified]
    cut, uncovered = window_from_batches(bundle, heads)
    if uncovered:
        report.add(
            "chain.window_unattested",
            "telemetry batches in the window are not covered by any verified quote's chain head",
            batches=uncovered,
        )
    if bundle.batches is not None and bundle.window is not None and cut is None and bundle.telemetry:
        report.add(
            "telemetry.window_mismatch",
            "telemetry.bin holds samples no attested sealed batch of the bundle holds",
            file=bundle.telemetry.name,
        )
    if cut is not None and bundle.telemetry is not None:
        held = bundle.telemetry.read_bytes()
        if held != cut:
            report.add(
                "telemetry.window_mismatch",
                "telemetry.bin is not the window cut from the sealed telemetry batches",
                file=bundle.telemetry.name,
            )
        if hashlib.sha256(cut).hexdigest() not in refs and doc.get("fingerprint", {}).get(
            "decision", "not_scored"
        ) not in ("not_scored",):
            report.add(
                "audit.telemetry_not_in_verdict",
                "the verdict was judged on other samples than the bundle's window",
            )
    return derived, claimed, report


def _root(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_bytes())
        return str(doc["verity"]["root_hash"]) if isinstance(doc, dict) else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _nonce_log_key(bundle: Bundle) -> list[PublicKey]:
    """The key that signed the bundle's nonce log (checked by the audit), when no daemon key was given."""
    if bundle.nonce_log is None:
        return []
    try:
        doc = json.loads(bundle.nonce_log.read_bytes())
        raw = bytes.fromhex(doc["key"]["public_key_hex"])
    except (ValueError, KeyError, TypeError):
        return []
    return [PublicKey(raw)] if len(raw) == 32 else []
