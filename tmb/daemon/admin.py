"""The admin routes (``/admin/...``): list and register workers, prune now, install a fingerprint profile.

Every route here is wrapped in :func:`admin_only`, the one guard: 404 while admin is off (see ``[admin]``
in docs/config.md), 401 without ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from time import time_ns
from typing import TYPE_CHECKING

from aiohttp import web

from tmb.config import parse_worker
from tmb.envelope import bearer_matches, error_response
from tmb.errors import ConfigError, TmbError
from tmb.proxy.health import health_report

if TYPE_CHECKING:
    from tmb.daemon.api import DaemonApi

ApiHandler = Callable[["DaemonApi", web.Request], Awaitable[web.StreamResponse]]


def admin_only(handler: ApiHandler) -> ApiHandler:
    """The bearer guard every admin route goes through."""

    @functools.wraps(handler)
    async def guarded(api: DaemonApi, request: web.Request) -> web.StreamResponse:
        if not api.config.admin_enabled():
            return error_response(
                404, "admin_disabled", "admin endpoints are off (see [admin] in docs/config.md)"
            )
        if not bearer_matches(request, api.config.admin.token):
            return error_response(
                401,
                "unauthorized",
                "admin endpoints need 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(api, request)

    return guarded


@admin_only
async def list_workers(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /admin/workers``: each worker's health with its url, node, GPUs and model."""
    _, body = health_report(api.pool)
    configs = {w.name: w.config for w in api.pool.workers}
    for name, entry in body["workers"].items():
        c = configs[name]
        entry.update({"url": c.url, "node": c.node, "gpus": list(c.gpus), "model": c.model})
    return web.json_response(body["workers"])


@admin_only
async def add_worker(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``POST /admin/workers``: register a worker (a ``[[workers]]`` entry as JSON)."""
    try:
        raw = await request.json()
    except (ValueError, UnicodeDecodeError):
        return error_response(400, "bad_json", "the body must be a JSON object")
    if not isinstance(raw, dict):
        return error_response(400, "bad_json", "the body must be a JSON object")
    try:
        worker = parse_worker(raw, "admin API")
    except ConfigError as exc:
        return error_response(400, "bad_worker", exc.diagnostics())
    try:
        api.pool.add(worker)
    except ValueError as exc:
        return error_response(409, "worker_exists", str(exc))
    return web.json_response({"name": worker.name}, status=201)


@admin_only
async def upload_profile(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``POST /admin/profiles``: install an enrolled profile (``tmb enroll`` JSON) and score with it."""
    if api.profile_sink is None:
        return error_response(409, "no_profile_directory", "set [fingerprint] profiles to a directory first")
    body = await request.read()
    try:
        key = await api.profile_sink(body)
    except TmbError as exc:
        return error_response(400, "bad_profile", exc.diagnostics())
    return web.json_response({"profile": key}, status=201)


@admin_only
async def prune(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``POST /admin/prune``: apply ``[store] retention_days`` now (spans and verdicts, then the evidence no
    kept verdict needs: ``evidence_deleted`` rows, :mod:`tmb.ingest.retention`)."""
    days = api.config.store.retention_days
    if days <= 0:
        return web.json_response({"deleted": 0, "evidence_deleted": 0, "retention_days": 0})
    cutoff = time_ns() - days * 86400 * 10**9
    deleted = await api.store.prune(cutoff)
    evidence = 0
    if api.ingest is not None:
        from tmb.daemon.app import prune_evidence

        evidence = await prune_evidence(api.ingest, cutoff)
    return web.json_response({"deleted": deleted, "evidence_deleted": evidence, "retention_days": days})
