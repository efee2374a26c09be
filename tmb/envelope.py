"""The daemon's HTTP error envelope and bearer check, shared by every room that serves routes.

Every error the daemon answers (verdict API, admin, evidence ingest) has one shape::

    {"error": {"type": "<kind or finding id>", "message": "...", ...extra},
     "findings": [{"id", "severity", "message", "context"}, ...]}

``findings`` is present only when the refusal has findings (the evidence routes always name one). A client
reads ``error.type`` to branch and ``error.message`` to show a person; the probe reads ``findings``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

__all__ = ["bearer_matches", "error_body", "error_response"]


def error_body(
    kind: str, message: str, *, findings: Sequence[Mapping[str, Any]] = (), **extra: Any
) -> dict[str, Any]:
    """The envelope as a JSON-able dict (``extra`` goes into the ``error`` object)."""
    body: dict[str, Any] = {"error": {"type": kind, "message": message, **extra}}
    if findings:
        body["findings"] = [dict(f) for f in findings]
    return body


def error_response(
    status: int,
    kind: str,
    message: str,
    *,
    findings: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """A JSON error response in the envelope."""
    return web.json_response(
        error_body(kind, message, findings=findings, **extra), status=status, headers=dict(headers or {})
    )


def bearer_matches(request: web.Request, token: str | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant time; never for no token)."""
    if not token:
        return False
    got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(got, f"Bearer {token}".encode())
