"""The probe's side of enrolment (docs/probe.md, "Node identity"): send the EK public area, the EK
certificates and the AK, open the daemon's credential in the TPM, prove it, keep the evidence key.

:func:`enrol` runs the two exchanges through the caller's ``post`` (the probe's bounded HTTP client) and
``tpm`` (its TPM worker thread); the key it derives (:func:`tmb.ingest.auth.derive_key`) is kept in
``state_dir/identity.json`` (mode 0600) by :func:`save_key` and signs every evidence request after.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from probes.tpm import TpmClient
from tmb.errors import Finding, Severity, TpmError, finding
from tmb.ingest.auth import derive_key, enrol_proof

__all__ = ["EnrolError", "enrol", "load_key", "save_key"]

Post = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any] | None]]]
TpmCall = Callable[[Callable[[TpmClient], Any]], Awaitable[Any]]


class EnrolError(Exception):
    """The daemon refused the enrolment, or its answer was unusable: ``finding`` says which."""

    def __init__(self, refusal: Finding) -> None:
        super().__init__(refusal.message)
        self.finding = refusal


def _refused(step: str, status: int, doc: dict[str, Any] | None) -> EnrolError:
    error = (doc or {}).get("error")
    fid = error.get("type") if isinstance(error, dict) else None
    ids = [f.get("id") for f in (doc or {}).get("findings", []) if isinstance(f, dict)][:8]
    return EnrolError(
        finding(
            "probe.enrol_refused",
            f"the daemon refused the {step} ({status}): {fid}",
            severity=Severity.WARNING,
            step=step,
            status=status,
            refusal=str(fid)[:80],
            findings=[str(i)[:80] for i in ids],
        )
    )


def _b64(doc: dict[str, Any], key: str) -> bytes:
    value = doc.get(key)
    try:
        if not isinstance(value, str) or len(value) > 4096:
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnrolError(
            finding(
                "probe.answer_bad_value",
                f"the daemon's enrolment answer has no usable {key!r}",
                severity=Severity.WARNING,
                field=key,
            )
        ) from None


async def enrol(node: str, ak_handle: int, post: Post, tpm: TpmCall) -> tuple[bytes, dict[str, Any]]:
    """Enrol ``node``: ``(evidence key, the daemon's activation answer)``; :class:`EnrolError` when refused,
    :class:`~tmb.errors.TpmError` when the TPM fails."""

    def identity(client: TpmClient) -> dict[str, Any]:
        ak = client.create_or_load_ak(ak_handle, "rsa")
        if ak.tpm2b_public is None:
            raise TpmError("the AK's public area could not be read", handle=f"0x{ak_handle:08x}")
        return {
            "ek_public": client.ek_public("rsa").hex(),
            "ek_certificates": [base64.b64encode(c).decode() for c in client.ek_certificates().values()],
            "ak_public": ak.tpm2b_public.hex(),
        }

    request = await tpm(identity)
    status, doc = await post("enroll", request)
    if status != 200 or doc is None:
        raise _refused("enrolment", status, doc)
    challenge = doc.get("challenge")
    ek_sha256, ak_name = doc.get("ek_sha256"), doc.get("ak_name")
    if not all(isinstance(v, str) and len(v) <= 128 for v in (challenge, ek_sha256, ak_name)):
        raise _refused("enrolment", status, {"error": {"type": "probe.answer_bad_value"}})
    id_object, encrypted = _b64(doc, "id_object"), _b64(doc, "encrypted_secret")
    secret: bytes = await tpm(lambda c: c.activate_credential(id_object, encrypted, ak_handle))
    proof = enrol_proof(secret, node, str(challenge), str(ek_sha256), str(ak_name))
    status, answer = await post("activate", {"challenge": challenge, "proof": proof})
    if status != 200 or answer is None:
        raise _refused("activation", status, answer)
    return derive_key(secret, node), answer


def load_key(state_dir: str | Path, node: str) -> bytes | None:
    """The evidence key kept for ``node`` (None when there is none, or it is unreadable)."""
    try:
        doc = json.loads((Path(state_dir) / "identity.json").read_text())
        key = bytes.fromhex(doc["key"])
        return key if doc.get("node") == node and len(key) == 32 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_key(state_dir: str | Path, node: str, key: bytes | None) -> None:
    """Keep (or, with None, forget) the evidence key: written 0600, atomically."""
    path = Path(state_dir) / "identity.json"
    if key is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"node": node, "key": key.hex()}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
