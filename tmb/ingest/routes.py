"""HTTP routes of the evidence ingest (aiohttp).

:func:`add_ingest_routes` mounts, on any :class:`aiohttp.web.Application` (``tmb serve`` mounts them too)::

    GET  /v1/ingest/{node}/nonce                 -> {"nonce", "quote", "ima_offset", "head", ...}
    POST /v1/ingest/{node}/batches               {"batches": [...], "probe_findings": [...]}
    POST /v1/ingest/{node}/quotes                {"message", "signature", "pcrs", "nonce", "head", "ak_name"}
    POST /v1/ingest/{node}/ima                   {"offset", "data"}
    POST /v1/ingest/{node}/eventlog              {"data"}  (the UEFI event log, whole; at most 4 MiB)
    POST /v1/ingest/{node}/bindings              {"t_ns", "processes": [...]}
    POST /v1/ingest/{node}/enroll                {"ek_public", "ek_certificates", "ak_public"}  (no key yet)
    POST /v1/ingest/{node}/activate              {"challenge", "proof"}                         (no key yet)
    POST /v1/ingest/admin/nodes/{node}/approve   {"ek_sha256", "ak_name"}: approve a re-keying  (bearer token)
    PUT  /v1/ingest/admin/nodes/{node}         {"ak": PEM | "ak_hex": TPM2B_PUBLIC hex}  (bearer token)
    GET  /v1/ingest/admin/nodes/{node}         status: batches, attested, last quote     (bearer token)
    POST /v1/ingest/admin/nodes/{node}/quote   ask the node's probe for a quote now      (bearer token)

The evidence routes (nonce to bindings) answer only requests authenticated by the node's key
(:mod:`tmb.ingest.auth`: 401 ``auth.*`` otherwise, checked before the body is parsed or the node touched), at
most ``rate_per_s``/``burst`` a node (429 ``ingest.rate_limited``), JSON at most 32 deep (400
``ingest.too_deep``); enrolment and activation are :mod:`tmb.ingest.identity`'s, at most
``ENROL_PEER_RATE_PER_S``/``ENROL_PEER_BURST`` from one client address (an IPv6 one by its /64), then
``ENROL_RATE_PER_S``/``ENROL_BURST`` from all together (429 ``ingest.rate_limited``). Every answer is JSON.
Evidence taken: 200 with the result's data, ``findings`` and ``ok``. Refused: the
daemon's error envelope (:mod:`tmb.envelope`): ``{"error": {"type": <finding id>, "message"}, "findings":
[...]}`` plus the answer's data (``nonce``, ``ima_offset``, ... which the probe reads from refusals too),
with the status :data:`STATUS` gives the refusing finding. Bad JSON is a 400 ``ingest.malformed``; a missing
or wrong admin token a 401 ``ingest.unauthorized``. A store that cannot be read or written (SQLite or
PostgreSQL down, locked or full) is a 503 ``ingest.store_unavailable`` with ``Retry-After``, never a 400 or
500: the probe keeps its evidence and sends it again.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from tmb.envelope import bearer_matches, error_body
from tmb.errors import Finding, Severity, TmbError
from tmb.ingest.auth import HEADER
from tmb.ingest.limits import RateLimit, loads_bounded, peer_key
from tmb.ingest.results import IngestResult
from tmb.ingest.service import Ingest
from tmb.ingest.store import EvidenceStoreError

__all__ = ["INGEST_KEY", "MAX_BODY", "STATUS", "add_ingest_routes", "make_app", "status_of"]

log = logging.getLogger("tmb.ingest")

INGEST_KEY = web.AppKey("tmb_ingest", Ingest)
LIMIT_KEY = web.AppKey("tmb_ingest_rate", RateLimit)
MAX_ENROL_BODY = 64 * 1024
DEFAULT_RATE_PER_S = 50.0  # evidence requests a node may make a second, sustained
DEFAULT_BURST = 200
ENROL_RATE_PER_S = 5.0  # enrolment and activation requests, all nodes together (unauthenticated by nature)
ENROL_BURST = 50
ENROL_LIMIT_KEY = web.AppKey("tmb_ingest_enrol_rate", RateLimit)
ENROL_PEER_RATE_PER_S = 2.0  # ... and from one client address (an IPv6 one by its /64), spent first
ENROL_PEER_BURST = 20  # (two requests an enrolment: ten nodes behind one address at once)
ENROL_PEERS = 4096  # client addresses whose enrolment buckets are held (the least recently used goes first)
ENROL_PEER_LIMIT_KEY = web.AppKey("tmb_ingest_enrol_peer_rate", RateLimit)
ADMIN_TOKEN_KEY = web.AppKey("tmb_ingest_admin_token", str)
MAX_BODY = 16 * 1024 * 1024

STATUS: Mapping[str, int] = {  # the refusing finding's id -> HTTP status ("family.*": every id of a family)
    "ingest.malformed": 400,
    "ingest.unauthorized": 401,
    "auth.*": 401,
    "identity.*": 403,
    "identity.malformed": 400,
    "identity.rekey_unapproved": 409,
    "identity.challenge_unknown": 409,
    "identity.challenge_expired": 409,
    "identity.static_registration_disabled": 403,
    "ingest.too_deep": 400,
    "epoch.old_boot": 409,
    "ingest.rate_limited": 429,
    "ingest.ak_unregistered": 403,
    "ingest.unknown_node": 404,
    "ingest.nonce_unknown": 409,
    "ingest.nonce_expired": 409,
    "ingest.nonce_reused": 409,
    "ingest.quote_head_unknown": 409,
    "chain.*": 409,
    "ima.delta_gap": 409,
    "ima.delta_conflict": 409,
    "ingest.too_large": 413,
    "ima.pending_too_large": 413,
    "eventlog.too_large": 413,
    "binding.too_large": 413,
    "eventlog.malformed": 422,
    "eventlog.truncated": 422,
    "quote.*": 422,
    "ingest.store_unavailable": 503,
}
STORE_RETRY_AFTER_S = 1  # what a 503 ``ingest.store_unavailable`` tells the probe to wait


def status_of(fid: str) -> int:
    """The HTTP status of a refusal for finding ``fid`` (400 for an id the table does not name)."""
    return STATUS.get(fid) or STATUS.get(fid.split(".", 1)[0] + ".*", 400)


def _answer(result: IngestResult) -> web.Response:
    findings = [f.to_dict() for f in result.findings]
    if result.refusal is None:
        body = {**result.data, "findings": findings, "ok": result.data.get("ok", result.ok)}
        return web.json_response(body)
    fid = result.refusal.id
    body = {**result.data, **error_body(fid, result.message, findings=findings)}
    return web.json_response(body, status=status_of(fid))


def _error(fid: str, message: str, **context: Any) -> web.Response:
    finding = Finding(fid, message, Severity.ERROR, context)
    return _answer(IngestResult(False, (finding,), {}, finding, message))


class _BadRequest(Exception):
    pass


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _store_guard(handler: Handler) -> Handler:
    """``handler``, answering a store failure (:class:`EvidenceStoreError`, any :mod:`sqlite3` error) with a
    503 ``ingest.store_unavailable`` and logging it, where the handler's own ``TmbError`` clause would call
    it bad input (400) or nothing would catch it (500). The handlers re-raise it (:func:`_store_failure`)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (EvidenceStoreError, sqlite3.Error) as exc:
            node = request.match_info.get("node", "")
            log.error("evidence store failure on %s %s: %s", request.method, request.path, exc)
            response = _error(
                "ingest.store_unavailable",
                "the evidence store cannot be read or written now; send the evidence again later",
                node=node,
            )
            response.headers["Retry-After"] = str(STORE_RETRY_AFTER_S)
            return response

    return guarded


def _store_failure(exc: TmbError) -> bool:
    return isinstance(exc, EvidenceStoreError)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"the request body is not JSON: {exc}") from None


Method = Callable[[Ingest], Callable[[str, Any], IngestResult]]


async def _authentic(request: web.Request, ingest: Ingest, node: str, route: str) -> bytes | web.Response:
    """The request's body once its ``X-Tmb-Auth`` proved it the node's (:mod:`tmb.ingest.auth`) and the
    node's rate allows it; else the 401/429 answer. Nothing of the node's evidence is touched before."""
    body = await request.read()
    header = request.headers.get(HEADER)
    problem = await ingest.off_loop(ingest.authenticate, node, request.method, route, header, body)
    if problem is not None:
        return _answer(IngestResult(False, (problem,), {}, problem, problem.message))
    if not request.app[LIMIT_KEY].take(node):
        return _error("ingest.rate_limited", "too many evidence requests from this node", node=node)
    return body


def _evidence(method: Method, route: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        ingest = request.app[INGEST_KEY]
        node = request.match_info["node"]
        try:
            body = await _authentic(request, ingest, node, route)
            if isinstance(body, web.Response):
                return body
            doc = loads_bounded(body)
            return _answer(await ingest.submit(node, method(ingest), doc))
        except web.HTTPRequestEntityTooLarge:
            return _error("ingest.too_large", "the request body is too large", limit=MAX_BODY)
        except TmbError as exc:
            if _store_failure(exc):
                raise
            fid = "ingest.too_deep" if exc.context.get("too_deep") else "ingest.malformed"
            context = {k: v for k, v in exc.context.items() if k != "too_deep"}
            return _error(fid, exc.message, node=node, **context)

    return handle


async def _nonce(request: web.Request) -> web.StreamResponse:
    ingest = request.app[INGEST_KEY]
    node = request.match_info["node"]
    body = await _authentic(request, ingest, node, "nonce")
    if isinstance(body, web.Response):
        return body
    return _answer(await ingest.submit(node, ingest.nonce))


def _enrolment(method: Method) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Enrolment and activation: unauthenticated by nature (the node has no key yet), bounded."""

    async def handle(request: web.Request) -> web.StreamResponse:
        ingest = request.app[INGEST_KEY]
        node = request.match_info["node"]
        peer = peer_key(request.remote)
        if not request.app[ENROL_PEER_LIMIT_KEY].take(peer):  # first: a flood spends its own address's budget
            return _error(
                "ingest.rate_limited",
                "too many enrolment requests from this client address; try again later",
                node=node,
                address=peer,
            )
        if not request.app[ENROL_LIMIT_KEY].take("*"):
            return _error("ingest.rate_limited", "too many enrolment requests; try again later", node=node)
        try:
            if request.content_length is not None and request.content_length > MAX_ENROL_BODY:
                return _error("ingest.too_large", "the enrolment request is too large", limit=MAX_ENROL_BODY)
            body = bytearray()
            async for chunk in request.content.iter_chunked(8192):  # a chunked body has no declared length
                body += chunk
                if len(body) > MAX_ENROL_BODY:
                    return _error(
                        "ingest.too_large", "the enrolment request is too large", limit=MAX_ENROL_BODY
                    )
            doc = loads_bounded(bytes(body), 4)
            return _answer(await ingest.submit(node, method(ingest), doc))
        except TmbError as exc:
            if _store_failure(exc):
                raise
            context = {k: v for k, v in exc.context.items() if k != "too_deep"}
            return _error("identity.malformed", exc.message, node=node, **context)

    return handle


def _admin(
    fn: Callable[[web.Request, Ingest, str], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if not bearer_matches(request, request.app.get(ADMIN_TOKEN_KEY)):
            return _error("ingest.unauthorized", "admin endpoints need 'Authorization: Bearer <token>'")
        try:
            return await fn(request, request.app[INGEST_KEY], request.match_info["node"])
        except _BadRequest as exc:
            return _error("ingest.malformed", str(exc))
        except TmbError as exc:
            if _store_failure(exc):
                raise
            return _error("ingest.malformed", exc.message, **exc.context)

    return handle


async def _register(request: web.Request, ingest: Ingest, node: str) -> web.StreamResponse:
    if not ingest.identity.insecure_static_nodes:
        return _error(
            "identity.static_registration_disabled",
            "a node is registered by enrolment (tmb-probe enroll: EK certificate and credential activation), "
            "not by its AK alone; [identity] insecure_static_nodes = true allows it "
            "for tests and development",
            node=node,
        )
    doc = await _body(request)
    if isinstance(doc, dict) and isinstance(doc.get("ak"), str):
        ak: bytes = doc["ak"].encode()
    elif isinstance(doc, dict) and isinstance(doc.get("ak_hex"), str):
        try:
            ak = bytes.fromhex(doc["ak_hex"])
        except ValueError:
            raise _BadRequest("ak_hex is not hex") from None
    else:
        raise _BadRequest('expected {"ak": "<PEM>"} or {"ak_hex": "<TPM2B_PUBLIC hex>"}')
    key = await ingest.submit(node, ingest.register_node, ak)
    return web.json_response(
        {"node": node, "ak_name": key.name.hex() if key.name else None, "algorithm": key.algorithm},
        status=201,
    )


async def _status(request: web.Request, ingest: Ingest, node: str) -> web.StreamResponse:
    status = await ingest.submit(node, ingest.status)
    if status is None:
        return _error("ingest.unknown_node", "this node is not registered", node=node)
    return web.json_response(status)


async def _approve(request: web.Request, ingest: Ingest, node: str) -> web.StreamResponse:
    doc = await _body(request)
    who = f"admin token from {request.remote or '?'}"
    result = await ingest.submit(node, lambda n, d: ingest.approve_rekey(n, d, who), doc)
    return _answer(result)


async def _demand(request: web.Request, ingest: Ingest, node: str) -> web.StreamResponse:
    if await ingest.submit(node, ingest.status) is None:
        return _error("ingest.unknown_node", "this node is not registered", node=node)
    ingest.request_quote(node)
    return web.json_response({"node": node, "quote": True}, status=202)


def add_ingest_routes(
    app: web.Application,
    ingest: Ingest,
    *,
    admin_token: str | None = None,
    rate_per_s: float = DEFAULT_RATE_PER_S,
    burst: int = DEFAULT_BURST,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Mount the ingest on ``app`` (state under :data:`INGEST_KEY`); the admin routes answer only requests
    bearing ``admin_token`` (none without one: the caller decides whether its admin API is on). ``clock``
    (seconds) refills the rate limits' buckets."""
    app[INGEST_KEY] = ingest
    if admin_token:
        app[ADMIN_TOKEN_KEY] = admin_token
    r = app.router
    app[LIMIT_KEY] = RateLimit(rate_per_s, burst, clock)
    app[ENROL_LIMIT_KEY] = RateLimit(ENROL_RATE_PER_S, ENROL_BURST, clock)
    app[ENROL_PEER_LIMIT_KEY] = RateLimit(ENROL_PEER_RATE_PER_S, ENROL_PEER_BURST, clock, ENROL_PEERS)
    r.add_get("/v1/ingest/{node}/nonce", _store_guard(_nonce))
    r.add_post("/v1/ingest/{node}/batches", _store_guard(_evidence(lambda i: i.add_batches, "batches")))
    r.add_post("/v1/ingest/{node}/quotes", _store_guard(_evidence(lambda i: i.add_quote, "quotes")))
    r.add_post("/v1/ingest/{node}/ima", _store_guard(_evidence(lambda i: i.add_ima, "ima")))
    r.add_post("/v1/ingest/{node}/eventlog", _store_guard(_evidence(lambda i: i.add_eventlog, "eventlog")))
    r.add_post("/v1/ingest/{node}/bindings", _store_guard(_evidence(lambda i: i.add_bindings, "bindings")))
    r.add_post("/v1/ingest/{node}/enroll", _store_guard(_enrolment(lambda i: i.enroll)))
    r.add_post("/v1/ingest/{node}/activate", _store_guard(_enrolment(lambda i: i.activate)))
    r.add_post("/v1/ingest/admin/nodes/{node}/approve", _store_guard(_admin(_approve)))
    r.add_put("/v1/ingest/admin/nodes/{node}", _store_guard(_admin(_register)))
    r.add_get("/v1/ingest/admin/nodes/{node}", _store_guard(_admin(_status)))
    r.add_post("/v1/ingest/admin/nodes/{node}/quote", _store_guard(_admin(_demand)))


def make_app(ingest: Ingest, *, admin_token: str | None = None, **limits: Any) -> web.Application:
    """An application serving only the ingest (the standalone runner and tests)."""
    app = web.Application(client_max_size=MAX_BODY)
    add_ingest_routes(app, ingest, admin_token=admin_token, **limits)
    return app
