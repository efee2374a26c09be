"""The OpenAPI 3.0 document of the daemon's API, served at ``GET /openapi.json``.

It describes what the listener it is fetched from serves: ``/metrics`` as configured, the admin routes only
while admin is on and only on the management listener, the auditors' evidence bundles only there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from tmb.config import WORKER_NAME_PATTERN, WORKER_URL_PATTERN
from tmb.daemon.evidence import ON_MANAGEMENT
from tmb.daemon.metrics import metrics_mode
from tmb.verdict.model import Decision

if TYPE_CHECKING:
    from tmb.daemon.api import DaemonApi


# Whether the application's listener serves the admin routes (the proxy listener does not: they are on
# the management listener only); absent: it does.
ADMIN_SERVED = web.AppKey("tmb.openapi.admin_served", bool)


async def openapi(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /openapi.json``."""
    config = api.config
    return web.json_response(
        openapi_document(
            config.server.api_prefix,
            config.admin_enabled() and request.app.get(ADMIN_SERVED, True),
            config.verdicts.max_wait_s,
            metrics=metrics_mode(config),
            auditors=request.app.get(ON_MANAGEMENT, False),
        )
    )


def _resp(
    description: str, schema: dict[str, Any] | None = None, ctype: str = "application/json"
) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {ctype: {"schema": schema}}
    return out


def openapi_document(
    prefix: str, admin: bool, max_wait_s: float, metrics: str = "public", auditors: bool = False
) -> dict[str, Any]:
    """The document served at ``/openapi.json``; ``metrics`` is :func:`~tmb.daemon.metrics.metrics_mode`;
    ``auditors``: the listener serves evidence bundles (the management listener)."""
    ref = {
        k: {"$ref": f"#/components/schemas/{k}"}
        for k in ("Error", "Pending", "Verdict", "Keys", "Evidence", "Health", "LogProof", "LogConsistency")
    }
    err = _resp("error", ref["Error"])
    rid = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "tmb request id (X-TMB-Request-Id)",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    }
    size = {"type": "integer", "minimum": 0, "maximum": 2**62 - 1}
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
                    "200": {
                        "description": "signed verdict (canonical JSON, with its unsigned log proof once a "
                        "checkpoint covers it); Accept: application/eat+jwt gives the EAR JWT",
                        "content": {
                            "application/json": {"schema": ref["Verdict"]},
                            "application/eat+jwt": {"schema": {"type": "string"}},
                        },
                    },
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
        "/v1/log/checkpoint": {
            "get": {
                "summary": "the newest signed checkpoint of the verdict log (C2SP signed note)",
                "responses": {
                    "200": _resp("signed checkpoint", {"type": "string"}, "text/plain"),
                    "404": err,
                },
            }
        },
        "/v1/log/proof/inclusion/{id}": {
            "get": {
                "summary": "a verdict's inclusion proof to the newest checkpoint covering it",
                "parameters": [rid],
                "responses": {
                    "200": _resp("inclusion proof", ref["LogProof"]),
                    "202": _resp("not covered by a checkpoint yet", {"type": "object"}) | {"headers": retry},
                    "400": err,
                    "404": err,
                },
            }
        },
        "/v1/log/proof/inclusion": {
            "get": {
                "summary": "the inclusion proof of a leaf in a tree size",
                "parameters": [
                    {"name": "index", "in": "query", "required": True, "schema": size},
                    {"name": "tree_size", "in": "query", "required": True, "schema": size},
                ],
                "responses": {"200": _resp("inclusion proof", ref["LogProof"]), "400": err, "404": err},
            }
        },
        "/v1/log/proof/consistency": {
            "get": {
                "summary": "the consistency proof between two tree sizes",
                "parameters": [
                    {"name": "first", "in": "query", "required": True, "schema": size},
                    {"name": "second", "in": "query", "required": True, "schema": size},
                ],
                "responses": {
                    "200": _resp("consistency proof", ref["LogConsistency"]),
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
    if auditors:
        tar = _resp(
            "the bundle as a tar archive (docs/evidence-bundle.md)", {"type": "string"}, "application/x-tar"
        )
        audit_err = {"400": err, "401": err, "403": err, "404": err, "413": err}
        paths["/v1/evidence/{id}/bundle"] = {
            "get": {
                "summary": "the evidence bundle of a request's verdict (auditors)",
                "parameters": [rid],
                "security": [{"bearer": []}],
                "responses": {"200": tar, "202": pending, **audit_err},
            }
        }
        ns = {"type": "integer", "minimum": 0}
        paths["/v1/nodes/{node}/evidence"] = {
            "get": {
                "summary": "a node's evidence over [from, to) as a bundle (auditors)",
                "parameters": [
                    {"name": "node", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "from", "in": "query", "required": True, "schema": ns},
                    {"name": "to", "in": "query", "required": True, "schema": ns},
                ],
                "security": [{"bearer": []}],
                "responses": {"200": tar, **audit_err},
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
                "log": {"type": "object", "description": "unsigned: the verdict's place in the log"},
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
                "log": {
                    "type": "object",
                    "description": "the verdict log's origin and checkpoint verifier key",
                    "properties": {
                        "origin": {"type": "string"},
                        "verifier_key": {"type": "string"},
                        "verifier_keys": {"type": "array", "items": {"type": "string"}},
                    },
                },
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
                            "status": {"type": "string", "enum": ["current", "retired"]},
                            "first_ns": {"type": "integer"},
                            "last_ns": {"type": "integer"},
                        },
                    },
                },
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
        "LogProof": {
            "type": "object",
            "required": ["index", "tree_size", "proof"],
            "properties": {
                "request_id": {"type": "string"},
                "index": {"type": "integer"},
                "tree_size": {"type": "integer"},
                "leaf": {"type": "string"},
                "proof": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                "checkpoint": {"type": "string"},
            },
        },
        "LogConsistency": {
            "type": "object",
            "required": ["first", "second", "proof"],
            "properties": {
                "first": {"type": "integer"},
                "second": {"type": "integer"},
                "proof": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
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
