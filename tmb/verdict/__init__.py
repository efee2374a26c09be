"""Signed per-request verdicts: the record (:mod:`.model`), the key (:mod:`.signing`), store, API.

The names below are loaded on first use (PEP 562), so importing a submodule (``tmb.verdict.cli``) does not
load Ed25519 and the rest of :mod:`.signing` with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tmb.lazy import lazy_names

if TYPE_CHECKING:
    from tmb.verdict.model import VERDICT_FORMAT, Decision, Reason, Verdict, Window, canonical_bytes
    from tmb.verdict.signing import PublicKey, Signer, load_or_create_key, verify_verdict

_WHERE = {
    "VERDICT_FORMAT": "tmb.verdict.model",
    "Decision": "tmb.verdict.model",
    "Reason": "tmb.verdict.model",
    "Verdict": "tmb.verdict.model",
    "Window": "tmb.verdict.model",
    "canonical_bytes": "tmb.verdict.model",
    "PublicKey": "tmb.verdict.signing",
    "Signer": "tmb.verdict.signing",
    "load_or_create_key": "tmb.verdict.signing",
    "verify_verdict": "tmb.verdict.signing",
}

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
