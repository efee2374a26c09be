"""Client and auditor checks of the verdict transparency log (no trust in the daemon).

* :func:`check_inclusion`: a served verdict's ``log`` member (its leaf index, the tree size, the RFC 9162
  inclusion path and the signed checkpoint) proves the verdict, exactly as signed, is in the log the
  daemon committed to.
* :func:`check_consistency`: a newer checkpoint extends an older one an auditor saved: no verdict in the
  old tree was removed or changed since.

Findings (stable ids): ``log.malformed``, ``log.checkpoint_invalid``, ``log.not_included``,
``log.inconsistent``, ``log.rollback``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tmb.errors import InputError, Report
from tmb.verdict.checkpoint import Checkpoint, NoteVerifier
from tmb.verdict.merkle import leaf_hash, verify_consistency, verify_inclusion
from tmb.verdict.model import canonical_bytes
from tmb.verdict.signing import UNSIGNED_MEMBERS

__all__ = ["UNSIGNED_MEMBERS", "check_consistency", "check_inclusion", "verdict_leaf_of"]


def verdict_leaf_of(doc: Mapping[str, Any]) -> bytes:
    """A served verdict document's leaf hash (what the signature and the log cover)."""
    return leaf_hash(canonical_bytes({k: v for k, v in doc.items() if k not in UNSIGNED_MEMBERS}))


def _hashes(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(h, str) and len(h) == 64 for h in value):
        raise InputError(f"{what} must be a list of 64-digit hex hashes")
    try:
        return [bytes.fromhex(h) for h in value]
    except ValueError:
        raise InputError(f"{what} must be a list of 64-digit hex hashes") from None


def _open(
    note: Any, verifiers: Sequence[NoteVerifier], origin: str | None, report: Report
) -> Checkpoint | None:
    if not isinstance(note, str):
        report.add("log.malformed", "the checkpoint must be a signed note (text)")
        return None
    try:
        return Checkpoint.open(note, verifiers, origin)
    except InputError as exc:
        report.add("log.checkpoint_invalid", f"the checkpoint does not verify: {exc.message}", **exc.context)
        return None


def check_inclusion(
    doc: Mapping[str, Any], verifiers: Sequence[NoteVerifier], origin: str | None = None
) -> tuple[Report, Checkpoint | None]:
    """Check the verdict's ``log`` member; returns the findings and the checkpoint it was proven against."""
    report = Report()
    entry = doc.get("log")
    if not isinstance(entry, Mapping):
        report.add("log.malformed", "the verdict carries no log inclusion proof (member 'log')")
        return report, None
    checkpoint = _open(entry.get("checkpoint"), verifiers, origin, report)
    if checkpoint is None:
        return report, None
    try:
        index, size = entry.get("index"), entry.get("tree_size")
        if not isinstance(index, int) or not isinstance(size, int):
            raise InputError("log.index and log.tree_size must be integers")
        proof = _hashes(entry.get("proof"), "log.proof")
    except InputError as exc:
        report.add("log.malformed", exc.message)
        return report, checkpoint
    if size != checkpoint.size:
        report.add(
            "log.malformed",
            "the proof is for another tree size than its checkpoint's",
            proof_size=size,
            checkpoint_size=checkpoint.size,
        )
        return report, checkpoint
    if not verify_inclusion(verdict_leaf_of(doc), index, size, proof, checkpoint.root):
        report.add(
            "log.not_included",
            "the verdict, as served, is not at the claimed place in the log",
            index=index,
            tree_size=size,
        )
    return report, checkpoint


def check_consistency(
    old_note: str, new_note: str, proof_hex: Any, verifiers: Sequence[NoteVerifier], origin: str | None = None
) -> tuple[Report, Checkpoint | None, Checkpoint | None]:
    """Check that the log of ``new_note`` extends the log of ``old_note`` (``proof_hex``: the daemon's
    consistency proof between their sizes, hex strings)."""
    report = Report()
    old = _open(old_note, verifiers, origin, report)
    new = _open(new_note, verifiers, origin, report)
    if old is None or new is None:
        return report, old, new
    if old.origin != new.origin:
        report.add(
            "log.inconsistent", "the checkpoints are of two different logs", old=old.origin, new=new.origin
        )
        return report, old, new
    if new.size < old.size:
        report.add(
            "log.rollback",
            "the newer checkpoint has fewer verdicts than the saved one",
            saved=old.size,
            now=new.size,
        )
        return report, old, new
    try:
        proof = _hashes(proof_hex, "the consistency proof")
    except InputError as exc:
        report.add("log.malformed", exc.message)
        return report, old, new
    if not verify_consistency(old.size, new.size, old.root, new.root, proof):
        report.add(
            "log.inconsistent",
            "the newer log does not extend the saved one: verdicts were removed or changed",
            saved=old.size,
            now=new.size,
        )
    return report, old, new
