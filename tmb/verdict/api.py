"""The daemon's own HTTP API, served beside the proxy under ``server.api_prefix`` (default: none).

=====================================  ==============================================================
``GET /v1/verdicts/{id}[?wait=S]``     200 signed verdict (canonical JSON), 202 pending (``Retry-After``),
                                       404 unknown or never served, 400 malformed id or wait
``GET /v1/keys``                       the verdict public keys ``{"keys": [{key_id, algorithm, ...}]}``
``GET /v1/evidence/{id}``              200 the evidence references the final verdict rests on, 202, 404
``GET /metrics``                       Prometheus text format; 404 with ``[metrics] enabled = false``,
                                       401 without the bearer token when ``[metrics]`` has one
``GET /healthz``                       200 when a worker is healthy, else 503; ``{"status"}`` only, the
                                       per-worker detail with the metrics or admin bearer token
``GET /openapi.json``                  OpenAPI 3.0 description of all of the above
``GET|POST /admin/workers``            list / register workers (bearer token; see AdminConfig)
``POST /admin/prune``                  apply the retention setting now
``POST /admin/profiles``               install an enrolled fingerprint profile (``tmb enroll`` JSON)
=====================================  ==============================================================

These paths are reserved: any other method on them gets 405, never the proxy. Errors are JSON
``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import time_ns
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tmb.config import WORKER_NAME_PATTERN, WORKER_URL_PATTERN, Config, parse_worker
from tmb.errors import ConfigError, TmbError
from tmb.proxy.health import health_report
from tmb.proxy.upstream import WorkerPool
from tmb.spans import Span
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.model import Decision
from tmb.verdict.signing import PublicKey, Signer

log = logging.getLogger("tmb.serve")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bearer(request: web.Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time; never for no token)."""
    got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return bool(token) and hmac.compare_digest(got, f"Bearer {token}".encode())


def _error(status: int, kind: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status, headers=headers)


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Any:
        healthy = GaugeMetricFamily(
            "tmb_worker_healthy", "1 when the worker passed its last check", labels=["worker"]
        )
        inflight = GaugeMetricFamily(
            "tmb_worker_inflight", "requests in flight to the worker", labels=["worker"]
        )
        for w in self.pool.workers:
            healthy.add_metric([w.name], 1.0 if w.healthy else 0.0)
            inflight.add_metric([w.name], float(w.inflight))
        yield healthy
        yield inflight


class Metrics:
    """Per-daemon Prometheus registry. Spans are observed off the hot path (by the span pipeline)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tmb_requests",
            "requests through the proxy",
            ["worker", "outcome", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tmb_request_duration_seconds",
            "request duration, start to end",
            ["worker"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "tmb_generated_tokens", "generated tokens counted", ["worker"], registry=self.registry
        )
        self.verdicts = Counter(
            "tmb_verdicts", "final verdicts published", ["decision"], registry=self.registry
        )
        self.store_errors = Counter("tmb_store_errors", "failed store writes", registry=self.registry)
        self.registry.register(_PoolCollector(pool))
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def observe(self, span: Span) -> None:
        key = (span.worker or "-", span.outcome.value, span.status)
        children = self._children.get(key)
        if children is None:
            worker = key[0]
            children = self._children[key] = (
                self.requests.labels(worker, key[1], str(key[2])),
                self.duration.labels(worker),
                self.tokens.labels(worker),
            )
        children[0].inc()
        children[1].observe((span.end_ns - span.start_ns) / 1e9)
        if span.tokens:
            children[2].inc(span.tokens)


@dataclass
class DaemonApi:
    config: Config
    store: AsyncStore
    signer: Signer
    pool: WorkerPool
    metrics: Metrics
    # Installs an uploaded fingerprint profile (JSON bytes) and returns its key; set by the engine's hook.
    profile_sink: Callable[[bytes], Awaitable[str]] | None = None

    # -- public -------------------------------------------------------------------------------------
    async def verdict(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["id"]
        if not _ID_RE.match(rid):
            return _error(400, "bad_request_id", "a tmb request id is 32 lowercase hex digits")
        wait = request.query.get("wait")
        timeout = 0.0
        if wait is not None:
            try:
                timeout = float(wait)
            except ValueError:
                timeout = -1.0
            if not 0.0 <= timeout <= self.config.verdicts.max_wait_s:
                return _error(
                    400, "bad_wait", f"wait must be a number of seconds, 0..{self.config.verdicts.max_wait_s}"
                )
        rec = await (self.store.wait(rid, timeout) if timeout > 0 else self.store.lookup(rid))
        if rec.state == "final" and rec.doc is not None:
            return web.Response(body=rec.doc, content_type="application/json")
        if rec.state == "pending":
            return web.json_response(
                {"request_id": rid, "state": "pending"}, status=202, headers={"Retry-After": "1"}
            )
        if rec.span is not None:
            return _error(
                404, "not_served", f"request {rid} was not served by a worker ({rec.span.outcome.value})"
            )
        return _error(404, "unknown_request", f"no request {rid} is known here")

    async def keys(self, request: web.Request) -> web.StreamResponse:
        # The signing key first, then every earlier one the store recorded: old verdicts keep verifying.
        current = self.signer.public
        older = [
            PublicKey(k.public_key)
            for k in await self.store.known_keys()
            if k.key_id != current.key_id and len(k.public_key) == 32
        ]
        return web.json_response({"keys": [current.to_dict(), *(k.to_dict() for k in older)]})

    async def evidence(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["id"]
        if not _ID_RE.match(rid):
            return _error(400, "bad_request_id", "a tmb request id is 32 lowercase hex digits")
        rec = await self.store.lookup(rid)
        if rec.state == "pending":
            return web.json_response(
                {"request_id": rid, "state": "pending"}, status=202, headers={"Retry-After": "1"}
            )
        if rec.state != "final":
            return _error(404, "unknown_request", f"no verdict for request {rid}")
        refs = await self.store.evidence(rid)
        return web.json_response(
            {"request_id": rid, "state": "final", "evidence": [r.to_dict() for r in refs]}
        )

    def _may_see_workers(self, request: web.Request) -> bool:
        """The metrics token, or the admin token while admin is on, shows per-worker detail."""
        admin = self.config.admin.token if self.config.admin_enabled() else ""
        return _bearer(request, self.config.metrics.token) or _bearer(request, admin)

    async def metrics_page(self, request: web.Request) -> web.StreamResponse:
        if not self.config.metrics.enabled:
            return _error(404, "metrics_disabled", "metrics are off (see [metrics] in docs/config.md)")
        if self.config.metrics.token and not self._may_see_workers(request):
            return _error(
                401,
                "unauthorized",
                "/metrics needs 'Authorization: Bearer <token>'",
                **{"WWW-Authenticate": "Bearer"},
            )
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        status, body = health_report(self.pool)
        if not self._may_see_workers(request):  # anonymous: the overall status, no worker names
            body = {"status": body["status"]}
        return web.json_response(body, status=status)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            openapi_document(
                self.config.server.api_prefix,
                self.config.admin_enabled(),
                self.config.verdicts.max_wait_s,
                metrics=_metrics_mode(self.config),
            )
        )

    # -- admin --------------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        got = request.headers.get("Authorization", "")
        want = f"Bearer {self.config.admin.token}"
        return bool(self.config.admin.token) and hmac.compare_digest(got.encode(), want.encode())

    def _admin(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.config.admin_enabled():
                return _error(
                    404, "admin_disabled", "admin endpoints are off (see [admin] in docs/config.md)"
                )
            if not self._authorized(request):
                return _error(
                    401,
                    "unauthorized",
                    "admin endpoints need 'Authorization: Bearer <token>'",
                    **{"WWW-Authenticate": "Bearer"},
                )
            return await handler(request)

        return guarded

    async def list_workers(self, request: web.Request) -> web.StreamResponse:
        _, body = health_report(self.pool)
        configs = {w.name: w.config for w in self.pool.workers}
        for name, entry in body["workers"].items():
            c = configs[name]
            entry.update({"url": c.url, "node": c.node, "gpus": list(c.gpus), "model": c.model})
        return web.json_response(body["workers"])

    async def add_worker(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "bad_json", "the body must be a JSON object")
        if not isinstance(raw, dict):
            return _error(400, "bad_json", "the body must be a JSON object")
        try:
            worker = parse_worker(raw, "admin API")
        except ConfigError as exc:
            return _error(400, "bad_worker", exc.diagnostics())
        try:
            self.pool.add(worker)
        except ValueError as exc:
            return _error(409, "worker_exists", str(exc))
        return web.json_response({"name": worker.name}, status=201)

    async def upload_profile(self, request: web.Request) -> web.StreamResponse:
        """Install an enrolled profile (the JSON ``tmb enroll`` writes) and score with it from now on."""
        if self.profile_sink is None:
            return _error(409, "no_profile_directory", "set [fingerprint] profiles to a directory first")
        body = await request.read()
        try:
            key = await self.profile_sink(body)
        except TmbError as exc:
            return _error(400, "bad_profile", exc.diagnostics())
        return web.json_response({"profile": key}, status=201)

    async def prune(self, request: web.Request) -> web.StreamResponse:
        days = self.config.store.retention_days
        if days <= 0:
            return web.json_response({"deleted": 0, "retention_days": 0})
        deleted = await self.store.prune(time_ns() - days * 86400 * 10**9)
        return web.json_response({"deleted": deleted, "retention_days": days})


def _not_allowed(allowed: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        msg = f"{request.method} is not allowed on {request.path}"
        return _error(405, "method_not_allowed", msg, Allow=allowed)

    return handler


def _metrics_mode(config: Config) -> str:
    """``off``, ``token`` or ``public``: how ``GET /metrics`` is served."""
    if not config.metrics.enabled:
        return "off"
    return "token" if config.metrics.token else "public"


def add_api_routes(app: web.Application, api: DaemonApi) -> None:
    """Register the daemon's routes (before the proxy's catch-all); log whether admin is on, and why not."""
    served, why = api.config.admin_status()
    if not served:
        (log.warning if api.config.admin.token else log.info)("admin endpoints are off: %s", why)
    p = api.config.server.api_prefix
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/v1/verdicts/{id:.+}", api.verdict),
        ("GET", "/v1/keys", api.keys),
        ("GET", "/v1/evidence/{id:.+}", api.evidence),
        ("GET", "/metrics", api.metrics_page),
        ("GET", "/healthz", api.healthz),
        ("GET", "/openapi.json", api.openapi),
        ("GET", "/admin/workers", api._admin(api.list_workers)),
        ("POST", "/admin/workers", api._admin(api.add_worker)),
        ("POST", "/admin/prune", api._admin(api.prune)),
        ("POST", "/admin/profiles", api._admin(api.upload_profile)),
    ]
    methods: dict[str, set[str]] = {}
    for method, path, handler in routes:
        app.router.add_route(method, p + path, handler)
        methods.setdefault(path, set()).add(method)
    for path, allowed in methods.items():
        app.router.add_route("*", p + path, _not_allowed(", ".join(sorted(allowed))))


def _resp(
    description: str, schema: dict[str, Any] | None = None, ctype: str = "application/json"
) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {ctype: {"schema": schema}}
    return out


def openapi_document(prefix: str, admin: bool, max_wait_s: float, metrics: str = "public") -> dict[str, Any]:
    """The OpenAPI 3.0 document served at ``/openapi.json`` (``metrics``: see :func:`_metrics_mode`)."""
    ref = {
        k: {"$ref": f"#/components/schemas/{k}"}
        for k in ("Error", "Pending", "Verdict", "Keys", "Evidence", "Health")
    }
    err = _resp("error", ref["Error"])
    rid = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "tmb request id (X-TMB-Request-Id)",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    }
    retry = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
    pending = _resp("verdict pending", ref["Pending"]) | {"headers": retry}
    wait = {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "long-poll up to this many seconds",
        "schema": {"type": "number", "minimum": 0, "maximum": max_wait_s},
    }
    paths: dict[str, Any] = {
        "/v1/verdicts/{id}": {
            "get": {
                "summary": "the signed verdict for a request",
                "parameters": [rid, wait],
                "responses": {
                    "200": _resp("signed verdict (canonical JSON)", ref["Verdict"]),
                    "202": pending,
                    "400": err,
                    "404": err,
                },
            }
        },
        "/v1/keys": {
            "get": {"summary": "verdict public keys", "responses": {"200": _resp("keys", ref["Keys"])}}
        },
        "/v1/evidence/{id}": {
            "get": {
                "summary": "evidence references of a final verdict",
                "parameters": [rid],
                "responses": {
                    "200": _resp("evidence", ref["Evidence"]),
                    "202": pending,
                    "400": err,
                    "404": err,
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": _resp("metrics", {"type": "string"}, "text/plain")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "daemon health (per-worker detail with the metrics or admin bearer token)",
                "responses": {
                    "200": _resp("a worker is healthy", ref["Health"]),
                    "503": _resp("no worker healthy", ref["Health"]),
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "this document", "responses": {"200": _resp("OpenAPI", {"type": "object"})}}
        },
    }
    if metrics == "off":
        del paths["/metrics"]
    elif metrics == "token":
        paths["/metrics"]["get"]["security"] = [{"bearer": []}]
        paths["/metrics"]["get"]["responses"]["401"] = err
    if admin:
        sec: list[dict[str, list[str]]] = [{"bearer": []}]
        admin_err = {"401": err, "404": err}
        worker = {
            "type": "object",
            "required": ["name", "url", "node"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": WORKER_NAME_PATTERN},
                "url": {"type": "string", "pattern": WORKER_URL_PATTERN},
                "node": {"type": "string", "minLength": 1},
                "gpus": {"type": "array", "items": {"type": "string"}},
                "model": {"type": "string"},
                "max_concurrency": {"type": "integer", "minimum": 1},
            },
        }
        paths["/admin/workers"] = {
            "get": {
                "summary": "workers",
                "security": sec,
                "responses": {"200": _resp("workers", {"type": "object"}), **admin_err},
            },
            "post": {
                "summary": "register a worker",
                "security": sec,
                "requestBody": {"required": True, "content": {"application/json": {"schema": worker}}},
                "responses": {
                    "201": _resp("registered", {"type": "object"}),
                    "400": err,
                    "409": err,
                    **admin_err,
                },
            },
        }
        paths["/admin/profiles"] = {
            "post": {
                "summary": "install an enrolled fingerprint profile (tmb enroll output)",
                "security": sec,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "201": _resp("installed", {"type": "object"}),
                    "400": err,
                    "409": err,
                    **admin_err,
                },
            }
        }
        paths["/admin/prune"] = {
            "post": {
                "summary": "apply retention now",
                "security": sec,
                "responses": {"200": _resp("pruned", {"type": "object"}), **admin_err},
            }
        }
    nullable_str = {"type": "string", "nullable": True}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["type", "message"],
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
        "Pending": {
            "type": "object",
            "required": ["request_id", "state"],
            "properties": {
                "request_id": {"type": "string"},
                "state": {"type": "string", "enum": ["pending"]},
            },
        },
        "Verdict": {
            "type": "object",
            "required": ["format", "request_id", "decision", "window", "key_id", "signature"],
            "properties": {
                "format": {"type": "string"},
                "request_id": {"type": "string"},
                "correlation_id": nullable_str,
                "worker": {"type": "string"},
                "node": {"type": "string"},
                "gpus": {"type": "array", "items": {"type": "string"}},
                "claimed_model": nullable_str,
                "requested_model": nullable_str,
                "window": {"type": "object"},
                "attestation": {"type": "object"},
                "fingerprint": {"type": "object"},
                "decision": {"type": "string", "enum": [d.value for d in Decision]},
                "reasons": {"type": "array", "items": {"type": "object"}},
                "telemetry_source": {"type": "string"},
                "issued_ns": {"type": "integer"},
                "key_id": {"type": "string"},
                "signature": {"type": "string"},
                "signature_batch": {
                    "type": "object",
                    "description": "present when the signature covers a batch root (docs/verdict.md)",
                    "required": ["index", "size", "path"],
                    "properties": {
                        "index": {"type": "integer"},
                        "size": {"type": "integer"},
                        "path": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
        "Keys": {
            "type": "object",
            "required": ["keys"],
            "properties": {
                "keys": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key_id", "algorithm", "public_key_hex", "pem"],
                        "properties": {
                            "key_id": {"type": "string"},
                            "algorithm": {"type": "string"},
                            "public_key_hex": {"type": "string"},
                            "pem": {"type": "string"},
                        },
                    },
                }
            },
        },
        "Evidence": {
            "type": "object",
            "required": ["request_id", "state", "evidence"],
            "properties": {
                "request_id": {"type": "string"},
                "state": {"type": "string"},
                "evidence": {"type": "array", "items": {"type": "object", "required": ["kind", "digest"]}},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}, "workers": {"type": "object"}},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "tmb daemon API", "version": "1"},
        "servers": [{"url": prefix or "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
