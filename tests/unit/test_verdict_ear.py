"""Verdicts as EAR attestation results (a JWT), checked with an independent JWT library (PyJWT)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tmb.verdict.ear import EAR_PROFILE, SUBMOD, ear_jwt, ear_status, trust_vector
from tmb.verdict.model import Decision, Reason, Verdict, Window
from tmb.verdict.signing import Signer, load_or_create_key


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return load_or_create_key(tmp_path / "k.pem")


def verdict(signer: Signer, decision: Decision) -> Verdict:
    v = Verdict(
        "ab" * 16,
        None,
        "w",
        "node-1",
        ("GPU-0",),
        "llama-7b",
        None,
        Window(1, 2),
        {},
        {},
        decision,
        (Reason("fingerprint.inconsistent", "x"),),
        "nvml",
        1_764_806_400_123_456_789,
    )
    return signer.sign(v)


@pytest.mark.parametrize(
    ("decision", "status"),
    [
        (Decision.VERIFIED, "affirming"),
        (Decision.DEMO, "warning"),
        (Decision.INSUFFICIENT_TELEMETRY, "warning"),
        (Decision.UNATTESTED, "contraindicated"),
        (Decision.MODEL_MISMATCH, "contraindicated"),
    ],
)
def test_ear_jwt_verifies_with_pyjwt_and_maps_the_decision(
    signer: Signer, decision: Decision, status: str
) -> None:
    v = verdict(signer, decision)
    token = ear_jwt(v, signer)
    public = Ed25519PublicKey.from_public_bytes(signer.public.raw)
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": signer.key_id, "typ": "JWT"}
    claims = jwt.decode(token, public, algorithms=["EdDSA"])
    assert claims["eat_profile"] == EAR_PROFILE and claims["iat"] == 1_764_806_400
    sub = claims["submods"][SUBMOD]
    assert sub["ear.status"] == status and sub["tmb.decision"] == decision.value
    assert sub["ear.trustworthiness-vector"] == trust_vector(decision)
    assert claims["tmb.verdict-digest"] == hashlib.sha256(v.encode()).hexdigest()
    assert claims["tmb.request-id"] == v.request_id


def test_a_changed_token_or_another_key_fails(signer: Signer, tmp_path: Path) -> None:
    token = ear_jwt(verdict(signer, Decision.VERIFIED), signer)
    public = Ed25519PublicKey.from_public_bytes(signer.public.raw)
    head, body, sig = token.split(".")
    forged = f"{head}.{body[:-2]}AA.{sig}"
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(forged, public, algorithms=["EdDSA"])
    other = load_or_create_key(tmp_path / "other.pem")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, Ed25519PublicKey.from_public_bytes(other.public.raw), algorithms=["EdDSA"])


def test_status_is_the_worst_tier() -> None:
    assert ear_status({"a": 0, "b": 0}) == "none"
    assert ear_status({"a": 2, "b": 0}) == "affirming"
    assert ear_status({"a": 2, "b": 33}) == "warning"
    assert ear_status({"a": 97, "b": 33}) == "contraindicated"
