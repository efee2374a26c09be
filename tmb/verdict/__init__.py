"""Signed per-request verdicts: the record (:mod:`.model`), the key (:mod:`.signing`), store, API."""

from tmb.verdict.model import VERDICT_FORMAT, Decision, Reason, Verdict, Window, canonical_bytes
from tmb.verdict.signing import PublicKey, Signer, load_or_create_key, verify_verdict

__all__ = [
    "VERDICT_FORMAT",
    "Decision",
    "PublicKey",
    "Reason",
    "Signer",
    "Verdict",
    "Window",
    "canonical_bytes",
    "load_or_create_key",
    "verify_verdict",
]
