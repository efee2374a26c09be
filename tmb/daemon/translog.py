"""The verdict transparency log over HTTP, and the loop that signs its checkpoints.

* ``GET /v1/log/checkpoint``: the newest signed checkpoint (a C2SP signed note, ``text/plain``); 404
  before the first.
* ``GET /v1/log/proof/inclusion/{id}``: the verdict's leaf index and RFC 9162 path to the newest
  checkpoint covering it (404 not in the log, 202 no checkpoint covers it yet).
* ``GET /v1/log/proof/inclusion?index=I&tree_size=N``: the path of leaf I in the tree of N leaves.
* ``GET /v1/log/proof/consistency?first=M&second=N``: the RFC 9162 consistency proof between two sizes.

A leaf or tree size the log does not have is a 404 (``not_in_log``); a parameter that is not an integer a
400. Served verdicts carry their proof as an unsigned ``log`` member
(:func:`attach_proof`), so a client checks inclusion without another request (``tmb verify-verdict``).

Checkpoints are signed with the verdict key (the note's key name is the log's origin, ``[verdicts]
log_origin``) every ``[verdicts] checkpoint_s`` seconds when the log grew; several daemons on one
PostgreSQL append to one log and each may sign a checkpoint for a size (the first stored wins; every one
verifies, as all sign the same root).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from tmb.envelope import error_response
from tmb.verdict.checkpoint import Checkpoint, verifier_key

if TYPE_CHECKING:
    from tmb.config import Config
    from tmb.daemon.api import DaemonApi

log = logging.getLogger("tmb.serve")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_SIZE = 1 << 62


def log_origin(api: DaemonApi) -> str:
    """The log's origin line (and checkpoint key name): configured, else ``tmb-verdicts/<host name>``."""
    return origin_of(api.config)


def origin_of(config: Config) -> str:
    """:func:`log_origin` from the config alone (also the daemon's name in its notifications)."""
    return config.verdicts.log_origin or f"tmb-verdicts/{socket.gethostname() or 'localhost'}"


def log_verifier_key(api: DaemonApi) -> str:
    """The verifier key (``<origin>+<id>+<key>``) an auditor passes to witnesses and ``tmb log verify``."""
    return verifier_key(log_origin(api), api.signer.public.raw)


async def sign_checkpoint(api: DaemonApi) -> int:
    """Sign and store a checkpoint of the log as it is now (if it grew); returns the size covered."""
    latest = await api.store.latest_checkpoint()
    size, root = await api.store.log_head()
    if latest is not None and latest.size >= size:
        return latest.size
    origin = log_origin(api)
    note = Checkpoint(origin, size, root).sign(origin, api.signer.public.raw, api.signer.sign_bytes)
    await api.store.add_checkpoint(size, root, note)
    return size


async def checkpoint_loop(api: DaemonApi, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        try:
            await sign_checkpoint(api)
        except Exception as exc:
            log.warning("could not sign a log checkpoint: %s", exc)


def checkpoint_context(api: DaemonApi, period_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """An ``app.cleanup_ctx`` entry running :func:`checkpoint_loop` for the app's lifetime (the daemon
    signs a last one at shutdown, after the engine's last verdicts and before the store closes)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(checkpoint_loop(api, period_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


def _int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or not raw.isdigit() or len(raw) > 19:
        return None
    value = int(raw)
    return value if value < MAX_SIZE else None


async def checkpoint(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/log/checkpoint``."""
    latest = await api.store.latest_checkpoint()
    if latest is None:
        return error_response(404, "no_checkpoint", "the log has no signed checkpoint yet")
    return web.Response(text=latest.note, content_type="text/plain", charset="utf-8")


async def inclusion_of(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/log/proof/inclusion/{id}``: the verdict's proof to the newest checkpoint covering it."""
    rid = request.match_info["id"]
    if not _ID_RE.match(rid):
        return error_response(400, "bad_request_id", "a tmb request id is 32 lowercase hex digits")
    entry, proof = await api.store.log_proof(rid)
    if entry is None:
        return error_response(404, "not_logged", f"no verdict for request {rid} is in the log")
    if proof is None:
        body = {"request_id": rid, "index": entry.index, "state": "pending"}
        return web.json_response(body, status=202, headers={"Retry-After": "1"})
    return web.json_response({"request_id": rid, **proof.to_dict()})


async def inclusion(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/log/proof/inclusion?index=I&tree_size=N``."""
    index, size = _int(request, "index"), _int(request, "tree_size")
    if index is None or size is None:
        return error_response(400, "bad_query", "index and tree_size must be integers 0..2^62")
    current, _ = await api.store.log_head()
    if not index < size <= current:  # a schema-valid question about a tree the log does not have
        return error_response(
            404, "not_in_log", "the log has no such leaf in a tree of that size", size=current
        )
    path = await api.store.log_inclusion(index, size)
    return web.json_response({"index": index, "tree_size": size, "proof": [h.hex() for h in path]})


async def consistency(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/log/proof/consistency?first=M&second=N``."""
    first, second = _int(request, "first"), _int(request, "second")
    if first is None or second is None:
        return error_response(400, "bad_query", "first and second must be integers 0..2^62")
    current, _ = await api.store.log_head()
    if not first <= second <= current:
        return error_response(404, "not_in_log", "the log has no such pair of tree sizes", size=current)
    proof = await api.store.log_consistency(first, second)
    return web.json_response({"first": first, "second": second, "proof": [h.hex() for h in proof]})


async def attach_proof(api: DaemonApi, rid: str, doc: bytes) -> bytes:
    """The served verdict with its unsigned ``log`` member when a checkpoint covers it (else as stored)."""
    _, proof = await api.store.log_proof(rid)
    if proof is None or not doc.endswith(b"}"):
        return doc
    member = json.dumps(proof.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()
    return doc[:-1] + b',"log":' + member + b"}"
