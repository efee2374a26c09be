"""Verdicts as IETF RATS attestation results: EAR (draft-ietf-rats-ear, "EAT Attestation Results") in a JWT.

A relying party that already reads EAR (Veraison's tooling, the `ear` libraries) can consume tmb's
verdicts without knowing tmb's verdict format. The JWT is signed with the daemon's verdict key (EdDSA,
Ed25519; ``kid`` is the verdict key id published at ``/v1/keys``), so it carries the same authority as the
verdict it is derived from, whose digest it names (``tmb.verdict-digest``: SHA-256 of the verdict's
canonical bytes as ``GET /v1/verdicts/{id}`` serves them).

The mapping of tmb decisions to the AR4SI trustworthiness vector (docs/verdict.md, "EAR") is:

============================  =============================================================================
decision                      vector (0 = no claim)
============================  =============================================================================
``verified``                  instance-identity 2, configuration 2, executables 2, file-system 2,
                              sourced-data 2 -> ``affirming``
``demo``                      as ``verified`` but sourced-data 32 (synthetic telemetry) -> ``warning``
``insufficient_telemetry``    sourced-data 32 (too little attested telemetry to judge) -> ``warning``
``unattested``                instance-identity 97 (no verified quote covers the node) -> ``contraindicated``
``model_mismatch``            instance-identity 2, configuration 2, file-system 2, sourced-data 2,
                              executables 96 (the workload contradicts the committed model)
                              -> ``contraindicated``
============================  =============================================================================

``hardware`` stays 0 (no claim) until the node's EK certificate chain is validated, and the two opaque
claims are never made: tmb does not appraise memory or storage encryption.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from tmb import __version__
from tmb.verdict.model import Decision, Verdict
from tmb.verdict.signing import Signer

__all__ = ["EAR_MEDIA_TYPE", "EAR_PROFILE", "ear_claims", "ear_jwt", "ear_status", "trust_vector"]

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
EAR_MEDIA_TYPE = "application/eat+jwt"
SUBMOD = "tmb-inference"

_VERIFIED = {
    "instance-identity": 2,
    "configuration": 2,
    "executables": 2,
    "file-system": 2,
    "sourced-data": 2,
}
_VECTORS: dict[Decision, dict[str, int]] = {
    Decision.VERIFIED: _VERIFIED,
    Decision.DEMO: {**_VERIFIED, "sourced-data": 32},
    Decision.INSUFFICIENT_TELEMETRY: {"sourced-data": 32},
    Decision.UNATTESTED: {"instance-identity": 97},
    Decision.MODEL_MISMATCH: {**_VERIFIED, "executables": 96},
}
_CLAIMS = (
    "instance-identity",
    "configuration",
    "executables",
    "file-system",
    "hardware",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
)


def trust_vector(decision: Decision) -> dict[str, int]:
    """The AR4SI trustworthiness vector for a decision (every claim present; 0 = no claim)."""
    values = _VECTORS[decision]
    return {claim: values.get(claim, 0) for claim in _CLAIMS}


def ear_status(vector: dict[str, int]) -> str:
    """The EAR status of a vector: its worst tier (``none`` when no claim is made)."""
    worst = max((abs(v) for v in vector.values()), default=0)
    if worst >= 96:
        return "contraindicated"
    if worst >= 32:
        return "warning"
    if worst >= 2:
        return "affirming"
    return "none"


def ear_claims(verdict: Verdict) -> dict[str, Any]:
    """The EAR claims set for a signed verdict."""
    vector = trust_vector(verdict.decision)
    return {
        "eat_profile": EAR_PROFILE,
        "iat": verdict.issued_ns // 1_000_000_000,
        "ear.verifier-id": {"developer": "tmb", "build": f"tmb {__version__}"},
        "submods": {
            SUBMOD: {
                "ear.status": ear_status(vector),
                "ear.trustworthiness-vector": vector,
                "ear.appraisal-policy-id": f"tmb:verdict/{verdict.format}",
                "tmb.decision": verdict.decision.value,
                "tmb.reasons": [r.id for r in verdict.reasons],
                "tmb.node": verdict.node,
                "tmb.claimed-model": verdict.claimed_model,
            }
        },
        "tmb.request-id": verdict.request_id,
        "tmb.verdict-digest": hashlib.sha256(verdict.encode()).hexdigest(),
    }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ear_jwt(verdict: Verdict, signer: Signer) -> str:
    """The EAR as a compact JWS (JWT), signed EdDSA with the verdict key."""
    header = {"alg": "EdDSA", "kid": signer.key_id, "typ": "JWT"}
    head = _b64url(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
    body = _b64url(json.dumps(ear_claims(verdict), separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{head}.{body}".encode()
    return f"{head}.{body}.{_b64url(signer.sign_bytes(signing_input))}"
