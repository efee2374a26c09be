"""The daemon's public reads, and the :class:`DaemonApi` every handler of the daemon's own routes takes.

=====================================  ==============================================================
``GET /v1/verdicts/{id}[?wait=S]``     200 signed verdict (canonical JSON), 202 pending (``Retry-After``),
                                       404 unknown or never served, 400 malformed id or wait
                                       (``Accept: application/eat+jwt``: the EAR JWT)
``GET /v1/log/...``                    the verdict transparency log (:mod:`tmb.daemon.translog`)
``GET /v1/keys``                       the verdict public keys ``{"keys": [{key_id, algorithm, ...}]}``
``GET /v1/evidence/{id}``              200 the evidence references the final verdict rests on, 202, 404
``GET /v1/evidence/{id}/bundle``       the bundle, for auditors (management listener: tmb.daemon.evidence)
``GET /v1/nodes/{node}/evidence``      a node's evidence over a range, likewise
``GET /metrics``                       Prometheus text format; 404 with ``[metrics] enabled = false``,
                                       401 without the bearer token when ``[metrics]`` has one
``GET /healthz``                       200 when a worker is healthy, else 503; ``{"status"}`` only, the
                                       per-worker detail with the metrics or admin bearer token
``GET /openapi.json``                  OpenAPI 3.0 description of all of the above
``GET|POST /admin/workers``            list / register workers (bearer token; see AdminConfig)
``POST /admin/prune``                  apply the retention setting now
``POST /admin/profiles``               install an enrolled fingerprint profile (``tmb enroll`` JSON)
=====================================  ==============================================================

The paths are under ``server.api_prefix`` (default: none). The route table, with the listener serving each
route (the admin routes only on the management listener), is :data:`tmb.daemon.app.ROUTES`; any other method
on these paths gets 405, never the proxy. Errors are the envelope of :mod:`tmb.envelope`, ``{"error":
{"type", "message"}}``. The public read routes live here; the others in :mod:`tmb.daemon.metrics`,
:mod:`tmb.daemon.admin`, :mod:`tmb.daemon.translog` and :mod:`tmb.daemon.openapi`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from tmb.config import Config
from tmb.daemon import translog
from tmb.daemon.metrics import Metrics
from tmb.envelope import error_response
from tmb.proxy.upstream import WorkerPool
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.checkpoint import verifier_key
from tmb.verdict.ear import EAR_MEDIA_TYPE, ear_jwt
from tmb.verdict.model import Verdict
from tmb.verdict.signing import PublicKey, Signer

if TYPE_CHECKING:
    from tmb.ingest.service import Ingest

__all__ = ["DaemonApi", "evidence", "keys", "verdict"]

log = logging.getLogger("tmb.serve")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class DaemonApi:
    """What the API's handlers read: the config, the verdict store and signer, the workers, the metrics."""

    config: Config
    store: AsyncStore
    signer: Signer
    pool: WorkerPool
    metrics: Metrics
    # Installs an uploaded fingerprint profile (JSON bytes) and returns its key (POST /admin/profiles);
    # None: uploads are refused (no [fingerprint] profiles directory, or an engine given by a test).
    profile_sink: Callable[[bytes], Awaitable[str]] | None = None
    ingest: Ingest | None = None  # the evidence ingest (bundles for auditors: tmb.daemon.evidence)


def _bad_id() -> web.Response:
    return error_response(400, "bad_request_id", "a tmb request id is 32 lowercase hex digits")


def _pending(rid: str) -> web.Response:
    return web.json_response(
        {"request_id": rid, "state": "pending"}, status=202, headers={"Retry-After": "1"}
    )


async def verdict(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/verdicts/{id}[?wait=S]``."""
    rid = request.match_info["id"]
    if not _ID_RE.match(rid):
        return _bad_id()
    wait = request.query.get("wait")
    timeout = 0.0
    max_wait_s = api.config.verdicts.max_wait_s
    if wait is not None:
        try:
            timeout = float(wait)
        except ValueError:
            timeout = -1.0
        if not 0.0 <= timeout <= max_wait_s:
            return error_response(400, "bad_wait", f"wait must be a number of seconds, 0..{max_wait_s}")
    rec = await (api.store.wait(rid, timeout) if timeout > 0 else api.store.lookup(rid))
    if rec.state == "final" and rec.doc is not None:
        if EAR_MEDIA_TYPE in request.headers.get("Accept", ""):
            return _ear(api, rec.doc)
        return web.Response(
            body=await translog.attach_proof(api, rid, rec.doc), content_type="application/json"
        )
    if rec.state == "pending":
        return _pending(rid)
    if rec.span is not None:
        return error_response(
            404, "not_served", f"request {rid} was not served by a worker ({rec.span.outcome.value})"
        )
    return error_response(404, "unknown_request", f"no request {rid} is known here")


def _ear(api: DaemonApi, doc: bytes) -> web.Response:
    """The verdict as an EAR attestation result (a JWT signed with the current verdict key)."""
    token = ear_jwt(Verdict.from_dict(json.loads(doc)), api.signer)
    return web.Response(text=token, content_type=EAR_MEDIA_TYPE)


async def keys(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/keys``: the signing key first, then every earlier one the store recorded, each with the
    period it was used in; and the verdict log's checkpoint verifier keys (one per verdict key)."""
    current = api.signer.public
    known = {k.key_id: k for k in await api.store.known_keys() if len(k.public_key) == 32}
    ordered = [current, *(PublicKey(k.public_key) for k in known.values() if k.key_id != current.key_id)]
    entries = []
    for key in ordered:
        entry: dict[str, object] = {**key.to_dict(), "status": "current" if key is current else "retired"}
        if key.key_id in known:
            entry["first_ns"], entry["last_ns"] = known[key.key_id].first_ns, known[key.key_id].last_ns
        entries.append(entry)
    origin = translog.log_origin(api)
    log_key = {
        "origin": origin,
        "verifier_key": translog.log_verifier_key(api),
        "verifier_keys": [verifier_key(origin, key.raw) for key in ordered],
    }
    return web.json_response({"keys": entries, "log": log_key})


async def evidence(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/evidence/{id}``: the evidence references a final verdict rests on."""
    rid = request.match_info["id"]
    if not _ID_RE.match(rid):
        return _bad_id()
    rec = await api.store.lookup(rid)
    if rec.state == "pending":
        return _pending(rid)
    if rec.state != "final":
        return error_response(404, "unknown_request", f"no verdict for request {rid}")
    refs = await api.store.evidence(rid)
    return web.json_response({"request_id": rid, "state": "final", "evidence": [r.to_dict() for r in refs]})
