"""Evidence bundles for auditors, on the management listener (docs/evidence-bundle.md, "The daemon's
export"):

=========================================  ==========================================================
``GET /v1/evidence/{id}/bundle``           200 a tar archive of the bundle of request ``id``'s verdict
                                           (its node, window, claimed model, the verdict itself), 202
                                           pending, 404 unknown, 400 malformed id
``GET /v1/nodes/{node}/evidence?from=&to=`` 200 a tar archive of the node's evidence over [from, to)
                                           (wall-clock ns), 400 a bad range, 404 an unknown node
=========================================  ==========================================================

Both need an auditor (``[auditors]``): ``Authorization: Bearer <token>`` with one of ``tokens``, or, with
none configured, a loopback client; 401 without a token, 403 with a wrong one. A bundle larger than
``max_bundle_bytes`` is 413 ``bundle_too_large``; a daemon without evidence ingest answers 404
``no_evidence_ingest``. On the proxy listener ``/v1/evidence/{id}/bundle`` is 404 ``management_listener_only``
(``/v1/nodes/...`` is not a daemon path there: it belongs to the workers).

:func:`export_request` is the same export for ``tmb evidence export`` (:mod:`tmb.daemon.evidence_cli`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tmb.config import Config
from tmb.envelope import error_response
from tmb.errors import ConfigError, InputError, TmbError
from tmb.verdict.model import Verdict
from tmb.verdict.signing import Signer

if TYPE_CHECKING:
    from tmb.daemon.api import DaemonApi
    from tmb.ingest.service import Ingest

__all__ = ["ON_MANAGEMENT", "export_request", "node_evidence", "request_bundle"]

ON_MANAGEMENT = web.AppKey("tmb.evidence.on_management", bool)
TAR_TYPE = "application/x-tar"
MAX_PROFILES = 256
MAX_CONTEXT_FILE = 32 * 1024 * 1024
_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def auditor_check(
    tokens: tuple[str, ...], remote: str | None, authorization: str | None
) -> tuple[int, str, str] | None:
    """None when a client at ``remote`` sending ``authorization`` is an auditor, else (status, error type,
    message): with ``tokens``, a bearer token that is one of them (401 without one, 403 another); without,
    a loopback client (403 otherwise; an IPv4-mapped IPv6 loopback address counts as loopback)."""
    if not tokens:
        try:
            ip = ipaddress.ip_address((remote or "").split("%")[0])
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip is not None and ip.is_loopback:
            return None
        return (
            403,
            "auditor_loopback_only",
            "evidence bundles are served to loopback clients only while no auditor token is configured "
            "([auditors] tokens)",
        )
    header = authorization or ""
    if not header.startswith("Bearer "):
        return 401, "auditor_token_required", "evidence bundles need an auditor token: Bearer <token>"
    given = header[len("Bearer ") :].encode()
    if not any(hmac.compare_digest(given, t.encode()) for t in tokens):
        return 403, "auditor_token_invalid", "the auditor token is not one configured"
    return None


def auditor_refusal(config: Config, request: web.Request) -> web.Response | None:
    """None when the request is an auditor's, else the 401/403 answer in the error envelope."""
    got = auditor_check(config.auditors.tokens, request.remote, request.headers.get("Authorization"))
    if got is None:
        return None
    status, kind, message = got
    headers = {"WWW-Authenticate": 'Bearer realm="tmb-auditor"'} if status == 401 else None
    return error_response(status, kind, message, headers=headers)


def _context_files(paths: tuple[str, ...], pattern: str) -> dict[str, bytes]:
    """The files named (directories: their ``pattern`` files), by file name, bounded."""
    out: dict[str, bytes] = {}
    for p in map(Path, paths):
        for f in sorted(p.glob(pattern)) if p.is_dir() else [p]:
            if len(out) >= MAX_PROFILES:
                raise InputError("too many files to export", path=str(p), limit=MAX_PROFILES)
            try:
                if f.stat().st_size > MAX_CONTEXT_FILE:
                    raise InputError("a file to export is too large", path=str(f))
                out[f.name] = f.read_bytes()
            except OSError as exc:
                raise InputError(f"cannot read {f}: {exc.strerror}", path=str(f)) from None
    return out


def read_commitments(config: Config) -> dict[str, bytes]:
    """The ``[attestation] commitments`` files, by file name (InputError for one that cannot be read)."""
    return _context_files(config.attestation.commitments, "*.json")


def _context(config: Config, verdict: bytes | None, claimed: str | None) -> Any:
    from tmb.attest.policy import policy_files
    from tmb.ingest.export import RequestContext

    a = config.attestation
    try:
        policy = Path(a.policy).read_text() if a.policy else None
        files = policy_files(a.policy, policy) if policy is not None else {}
    except OSError as exc:
        raise InputError(f"cannot read the policy: {exc.strerror}", path=a.policy) from None
    except ConfigError as exc:  # a file it references, unreadable now
        raise InputError(exc.message, **exc.context) from None
    return RequestContext(
        verdict=verdict,
        claimed=claimed,
        policy_toml=policy,
        policy_files=files,
        commitments=_context_files(a.commitments, "*.json"),
        profiles=_context_files(config.fingerprint.profiles, "*.json") if verdict is not None else {},
    )


def _sign(signer: Signer) -> Any:
    def sign(message: bytes) -> tuple[bytes, bytes]:
        return signer.public.raw, signer.sign_bytes(message)

    return sign


def export_request(config: Config, ingest: Ingest, signer: Signer, verdict_doc: bytes, out: Path) -> Path:
    """The bundle of a final verdict (its canonical JSON ``verdict_doc``) into the new directory ``out``."""
    verdict = Verdict.from_dict(json.loads(verdict_doc))
    if not verdict.node:
        raise InputError("the verdict names no node: nothing to export", request_id=verdict.request_id)
    context = _context(config, verdict_doc, verdict.claimed_model or verdict.requested_model)
    return ingest.export(
        out,
        verdict.node,
        verdict.window.t0_ns,
        verdict.window.t1_ns,
        sign=_sign(signer),
        context=context,
    )


def _tar(root: Path, dest: Path, limit: int) -> bool:
    """``root``'s files into the tar ``dest`` under ``bundle/``; False when it would exceed ``limit``."""
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    if total > limit:
        return False
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname="bundle")
    return dest.stat().st_size <= limit


async def _serve_tar(request: web.Request, api: DaemonApi, name: str, build: Any) -> web.StreamResponse:
    """Build the bundle in a temporary directory (a worker thread), then stream it as a tar archive."""
    limit = api.config.auditors.max_bundle_bytes
    with tempfile.TemporaryDirectory(prefix="tmb-bundle-") as tmp:
        root, tar = Path(tmp) / "bundle", Path(tmp) / "bundle.tar"
        try:
            await asyncio.to_thread(build, root)
        except TmbError as exc:  # a bound (its context names the limit), an unknown node, a bad window
            if "limit" in exc.context:
                return error_response(413, "bundle_too_large", exc.message)
            return error_response(404, "export_refused", exc.message)
        if not await asyncio.to_thread(_tar, root, tar, limit):
            return error_response(
                413, "bundle_too_large", f"the bundle is larger than {limit} bytes: ask for a shorter range"
            )
        response = web.StreamResponse(
            headers={
                "Content-Type": TAR_TYPE,
                "Content-Disposition": f'attachment; filename="{name}.tar"',
                "Content-Length": str(tar.stat().st_size),
            }
        )
        await response.prepare(request)
        with tar.open("rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, 1 << 20):
                await response.write(chunk)
        await response.write_eof()
        return response


def _guard(api: DaemonApi, request: web.Request) -> web.Response | None:
    if not request.app.get(ON_MANAGEMENT, False):
        return error_response(
            404,
            "management_listener_only",
            "evidence bundles are served on the management listener only ([management] in docs/config.md)",
        )
    refusal = auditor_refusal(api.config, request)
    if refusal is not None:
        return refusal
    if api.ingest is None:
        return error_response(404, "no_evidence_ingest", "this daemon has no evidence ingest ([attestation])")
    return None


async def request_bundle(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/evidence/{id}/bundle``."""
    refusal = _guard(api, request)
    if refusal is not None:
        return refusal
    rid = request.match_info["id"]
    if not _ID_RE.match(rid):
        return error_response(400, "bad_request_id", "a tmb request id is 32 lowercase hex digits")
    rec = await api.store.lookup(rid)
    if rec.state == "pending":
        return web.json_response(
            {"request_id": rid, "state": "pending"}, status=202, headers={"Retry-After": "1"}
        )
    if rec.state != "final" or rec.doc is None:
        return error_response(404, "unknown_request", f"no verdict for request {rid}")
    ingest, doc = api.ingest, rec.doc
    assert ingest is not None  # noqa: S101 (_guard refused a daemon without one)
    return await _serve_tar(
        request, api, rid, lambda root: export_request(api.config, ingest, api.signer, doc, root)
    )


async def node_evidence(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /v1/nodes/{node}/evidence?from=NS&to=NS``."""
    refusal = _guard(api, request)
    if refusal is not None:
        return refusal
    node = request.match_info["node"]
    if not 0 < len(node.encode()) <= 255:
        return error_response(400, "bad_node", "a node id is 1 to 255 bytes")
    window = _range(request.query)
    if window is None:
        return error_response(
            400, "bad_range", "from and to must be integers (wall-clock ns), 0 <= from < to, at most 7 days"
        )
    ingest = api.ingest
    assert ingest is not None  # noqa: S101 (_guard refused a daemon without one)
    context = _context(api.config, None, None)
    return await _serve_tar(
        request,
        api,
        f"{node}-{window[0]}-{window[1]}",
        lambda root: ingest.export(root, node, *window, sign=_sign(api.signer), context=context),
    )


def _range(query: Mapping[str, str]) -> tuple[int, int] | None:
    from tmb.ingest.export import MAX_WINDOW_NS

    try:
        t0, t1 = int(query.get("from", "")), int(query.get("to", ""))
    except ValueError:
        return None
    if not 0 <= t0 < t1 or t1 - t0 > MAX_WINDOW_NS:
        return None
    return t0, t1
