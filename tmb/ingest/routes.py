"""HTTP routes of the evidence ingest (aiohttp), and a standalone runner for tests and small deployments.

:func:`add_ingest_routes` mounts, on any :class:`aiohttp.web.Application` (``tmb serve`` mounts them too)::

    GET  /v1/ingest/{node}/nonce                 -> {"nonce", "quote", "ima_offset", "head", ...}
    POST /v1/ingest/{node}/batches               {"batches": [...], "probe_findings": [...]}
    POST /v1/ingest/{node}/quotes                {"message", "signature", "pcrs", "nonce", "head", "ak_name"}
    POST /v1/ingest/{node}/ima                   {"offset", "data"}
    POST /v1/ingest/{node}/eventlog              {"data"}  (the UEFI event log, whole; at most 4 MiB)
    POST /v1/ingest/{node}/bindings              {"t_ns", "processes": [...]}
    PUT  /v1/ingest/admin/nodes/{node}         {"ak": PEM | "ak_hex": TPM2B_PUBLIC hex}  (bearer token)
    GET  /v1/ingest/admin/nodes/{node}         status: batches, attested, last quote     (bearer token)
    POST /v1/ingest/admin/nodes/{node}/quote   ask the node's probe for a quote now      (bearer token)

Every answer is JSON; errors are 4xx with ``{"error", "findings": [{"id", ...}]}``. Bad JSON is a 400 with
``ingest.malformed``; a missing or wrong admin token a 401 with ``ingest.unauthorized``.

Standalone: ``python -m tmb.attest.ingest_app --db FILE --policy POLICY [--port P] [--admin-token T]
[--node NODE=AKFILE]... [--require-eventlog]`` listens on 127.0.0.1 and prints
``listening on http://127.0.0.1:P``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from tmb.attest.ingest import Ingest, Outcome
from tmb.attest.policy import load_policy
from tmb.errors import TmbError

__all__ = ["INGEST_KEY", "add_ingest_routes", "main"]

INGEST_KEY = web.AppKey("tmb_ingest", Ingest)
ADMIN_TOKEN_KEY = web.AppKey("tmb_ingest_admin_token", str)
MAX_BODY = 16 * 1024 * 1024


def _json(outcome: Outcome) -> web.Response:
    return web.json_response(outcome.body, status=outcome.status)


def _error(status: int, fid: str, message: str, **context: Any) -> web.Response:
    finding = {"id": fid, "severity": "error", "message": message, "context": context}
    return web.json_response({"error": message, "findings": [finding]}, status=status)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"the request body is not JSON: {exc}") from None


class _BadRequest(Exception):
    pass


Handler = Callable[[Ingest, str, Any], Outcome]


def _evidence(method: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        ingest = request.app[INGEST_KEY]
        node = request.match_info["node"]
        try:
            doc = await _body(request)
            return _json(method(ingest, node, doc))
        except _BadRequest as exc:
            return _error(400, "ingest.malformed", str(exc), node=node)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "ingest.too_large", "the request body is too large", limit=MAX_BODY)
        except TmbError as exc:
            return _error(400, "ingest.malformed", exc.message, node=node, **exc.context)

    return handle


async def _nonce(request: web.Request) -> web.StreamResponse:
    return _json(request.app[INGEST_KEY].nonce(request.match_info["node"]))


def _authorised(request: web.Request) -> bool:
    token = request.app.get(ADMIN_TOKEN_KEY)
    given = request.headers.get("Authorization", "")
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def _admin(
    fn: Callable[[web.Request, Ingest, str], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if not _authorised(request):
            return _error(401, "ingest.unauthorized", "admin endpoints need 'Authorization: Bearer <token>'")
        try:
            return await fn(request, request.app[INGEST_KEY], request.match_info["node"])
        except _BadRequest as exc:
            return _error(400, "ingest.malformed", str(exc))
        except TmbError as exc:
            return _error(400, "ingest.malformed", exc.message, **exc.context)

    return handle


async def _register(request: web.Request, ingest: Ingest, node: str) -> web.StreamResponse:
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
    key = ingest.register_node(node, ak)
    return web.json_response(
        {"node": node, "ak_name": key.name.hex() if key.name else None, "algorithm": key.algorithm},
        status=201,
    )


async def _status(request: web.Request, ingest: Ingest, node: str) -> web.StreamResponse:
    status = ingest.status(node)
    if status is None:
        return _error(404, "ingest.unknown_node", "this node is not registered", node=node)
    return web.json_response(status)


async def _demand(request: web.Request, ingest: Ingest, node: str) -> web.StreamResponse:
    if ingest.status(node) is None:
        return _error(404, "ingest.unknown_node", "this node is not registered", node=node)
    ingest.request_quote(node)
    return web.json_response({"node": node, "quote": True}, status=202)


def add_ingest_routes(app: web.Application, ingest: Ingest, *, admin_token: str | None = None) -> None:
    """Mount the ingest on ``app`` (state under :data:`INGEST_KEY`); admin routes need ``admin_token``."""
    app[INGEST_KEY] = ingest
    if admin_token:
        app[ADMIN_TOKEN_KEY] = admin_token
    r = app.router
    r.add_get("/v1/ingest/{node}/nonce", _nonce)
    r.add_post("/v1/ingest/{node}/batches", _evidence(Ingest.add_batches))
    r.add_post("/v1/ingest/{node}/quotes", _evidence(Ingest.add_quote))
    r.add_post("/v1/ingest/{node}/ima", _evidence(Ingest.add_ima))
    r.add_post("/v1/ingest/{node}/eventlog", _evidence(Ingest.add_eventlog))
    r.add_post("/v1/ingest/{node}/bindings", _evidence(Ingest.add_bindings))
    r.add_put("/v1/ingest/admin/nodes/{node}", _admin(_register))
    r.add_get("/v1/ingest/admin/nodes/{node}", _admin(_status))
    r.add_post("/v1/ingest/admin/nodes/{node}/quote", _admin(_demand))


def make_app(ingest: Ingest, *, admin_token: str | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    add_ingest_routes(app, ingest, admin_token=admin_token)
    return app


async def _serve(args: argparse.Namespace) -> None:
    ingest = Ingest(
        args.db,
        policy=load_policy(args.policy),
        nonce_ttl_s=args.nonce_ttl,
        require_eventlog=args.require_eventlog,
    )
    for spec in args.node:
        node, _, path = spec.partition("=")
        try:
            ingest.register_node(node, Path(path).read_bytes())
        except OSError as exc:
            raise TmbError(f"cannot read AK file: {exc.strerror}", path=path) from None
    runner = web.AppRunner(make_app(ingest, admin_token=args.admin_token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        ingest.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tmb.attest.ingest_app", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--db", required=True, help="SQLite file")
    parser.add_argument("--policy", required=True, help="runtime policy TOML")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--admin-token", default=None)
    parser.add_argument("--nonce-ttl", type=float, default=120.0)
    parser.add_argument("--node", action="append", default=[], metavar="NODE=AKFILE")
    parser.add_argument(
        "--require-eventlog",
        action="store_true",
        help="a node without a UEFI event log is not attested (boot.no_eventlog is an error)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
