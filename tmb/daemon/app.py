"""The daemon assembled in one place: what each listener serves, the span pipeline, the engine and the
evidence ingest, and the order things start and stop in.

Two listeners (docs/architecture.md has the map):

* the **proxy listener** (``[server] host``/``port``, optional TLS): every customer request, relayed to a
  worker, and the public reads of :data:`ROUTES` (verdicts, keys, evidence references, the verdict log,
  ``/healthz``, ``/metrics``, ``/openapi.json``). The management paths (``/v1/ingest/...`` and ``/admin/...``,
  :data:`tmb.proxy.contract.MANAGEMENT_PATHS`) answer 404 there in every spelling and never reach a worker
  (:func:`management_only`);
* the **management listener** (``[management] host``/``port``, loopback by default, optional TLS): the
  evidence ingest (:func:`tmb.ingest.routes.add_ingest_routes`), the admin routes and the public reads.

:func:`build_app` returns the proxy listener's application; the parts (store, signer, engine, ingest,
pipeline, the management application) are :class:`Daemon` under ``app[DAEMON_KEY]``. Serving the application
(:func:`tmb.daemon.serve.serve`, or any runner in tests) runs :func:`_lifecycle`:

start   management listener -> worker health checks, retention, resumer of pending verdicts, checkpoints
stop    (aiohttp first stops the proxy listener and its connections) -> management listener stops ->
        background tasks and worker sessions stop -> the span pipeline drains -> last signed log
        checkpoint (:func:`tmb.daemon.translog.sign_checkpoint`) -> ingest closes -> store closes
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import time_ns
from typing import TYPE_CHECKING

from aiohttp import web

from tmb.config import Config
from tmb.daemon import admin, translog
from tmb.daemon import evidence as evidence_bundles
from tmb.daemon.admin import ApiHandler
from tmb.daemon.api import DaemonApi, evidence, keys, verdict
from tmb.daemon.metrics import Metrics, StaleCollector, healthz, metrics_page
from tmb.daemon.notify import Notifier, notify_db_path
from tmb.daemon.openapi import ADMIN_SERVED, openapi
from tmb.daemon.pipeline import RESUME_GRACE_S, Resumer, SpanPipeline, VerdictEngine
from tmb.daemon.tls import server_context
from tmb.envelope import error_response
from tmb.errors import ConfigError, InputError
from tmb.events import EventSink, discard
from tmb.proxy.app import Proxy, make_proxy_routes
from tmb.proxy.contract import MANAGEMENT_PATHS, normal_form, under
from tmb.proxy.upstream import WorkerPool
from tmb.spans import Span
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.signing import Signer, load_verdict_key
from tmb.verdict.store import Store

if TYPE_CHECKING:
    from tmb.fingerprint.loadprofile import LoadProfile
    from tmb.ingest.identity import IdentityPolicy
    from tmb.ingest.service import Ingest
    from tmb.verdict.engine import Engine
    from tmb.verdict.model import Window

__all__ = ["DAEMON_KEY", "ROUTES", "Daemon", "build_app", "load_key", "load_profiles", "open_store"]

log = logging.getLogger("tmb.serve")

PROXY, MANAGEMENT, BOTH = "proxy", "management", "both"

# The daemon's own routes: (method, path under [server] api_prefix, handler, listener). Any other method on
# one of these paths gets 405, never a worker. The evidence ingest's routes (/v1/ingest/{node}/...) are
# added beside these on the management listener when [attestation] policy is set.
ROUTES: tuple[tuple[str, str, ApiHandler, str], ...] = (
    ("GET", "/v1/verdicts/{id:.+}", verdict, BOTH),
    ("GET", "/v1/keys", keys, BOTH),
    ("GET", "/v1/evidence/{id:[^/]+}/bundle", evidence_bundles.request_bundle, BOTH),
    ("GET", "/v1/evidence/{id:.+}", evidence, BOTH),
    ("GET", "/v1/nodes/{node}/evidence", evidence_bundles.node_evidence, MANAGEMENT),
    ("GET", "/v1/log/checkpoint", translog.checkpoint, BOTH),
    ("GET", "/v1/log/proof/inclusion", translog.inclusion, BOTH),
    ("GET", "/v1/log/proof/inclusion/{id:.+}", translog.inclusion_of, BOTH),
    ("GET", "/v1/log/proof/consistency", translog.consistency, BOTH),
    ("GET", "/metrics", metrics_page, BOTH),
    ("GET", "/healthz", healthz, BOTH),
    ("GET", "/openapi.json", openapi, BOTH),
    ("GET", "/admin/workers", admin.list_workers, MANAGEMENT),
    ("POST", "/admin/workers", admin.add_worker, MANAGEMENT),
    ("POST", "/admin/prune", admin.prune, MANAGEMENT),
    ("POST", "/admin/profiles", admin.upload_profile, MANAGEMENT),
)

MAX_PROFILE_BYTES = 32 * 1024 * 1024
MANAGEMENT_MAX_BODY = 32 * 1024 * 1024  # evidence posts (the ingest's own limits are lower) and profiles


@dataclass
class Daemon:
    """The daemon's parts as :func:`build_app` assembled them (``app[DAEMON_KEY]``)."""

    config: Config
    store: AsyncStore
    signer: Signer
    pool: WorkerPool
    metrics: Metrics
    api: DaemonApi
    engine: VerdictEngine
    ingest: Ingest | None
    pipeline: SpanPipeline
    management: web.Application  # the management listener's application
    server_tls: ssl.SSLContext | None = None  # for the proxy listener's site (tmb.daemon.serve)
    management_tls: ssl.SSLContext | None = None
    management_url: str = ""  # "http(s)://host:port" once the management listener is up
    notifier: Notifier = field(kw_only=True)  # the EventSink (notifier.emit) for the ingest and the engine


DAEMON_KEY = web.AppKey("tmb.daemon", Daemon)


async def build_app(
    config: Config, *, engine: VerdictEngine | None = None, init: bool = False, new_key: bool = False
) -> web.Application:
    """The proxy listener's application, with the daemon's parts under ``app[DAEMON_KEY]`` (call inside
    the running loop). ``engine`` replaces the verdict engine the config describes (tests); ``init``
    accepts an empty SQLite file as a new store, ``new_key`` a new verdict key where the key file is
    missing but the store holds verdicts (``tmb serve --init``, ``--new-key``)."""
    server_tls = server_context("server", config.server.tls_cert, config.server.tls_key)
    management_tls = server_context("management", config.management.tls_cert, config.management.tls_key)
    store = open_store(config, init=init)
    ingest: Ingest | None = None
    pool: WorkerPool | None = None
    profile_sink = None
    notifier: Notifier | None = None
    try:
        signer = await load_key(config, store, new_key=new_key)
        notifier = open_notifier(config, signer)
        ingest = open_ingest(config, events=notifier.emit)  # node events become signed webhooks
        pool = WorkerPool(config.workers, config.proxy)
        if engine is None:
            own = _engine(config, store, signer, ingest, pool, notifier)
            upload_dir = next((Path(p) for p in config.fingerprint.profiles if Path(p).is_dir()), None)  # noqa: ASYNC240
            if upload_dir is not None:
                profile_sink = _profile_sink(own, upload_dir)
            engine = own
    except BaseException:
        if pool is not None:
            await pool.close()
        if ingest is not None:
            ingest.close()
        await store.close()
        if notifier is not None:
            notifier.close()
        raise
    metrics = Metrics(pool)
    notifier.set_metrics(metrics.notify)
    if ingest is not None and config.attestation.stale_after_s > 0:
        metrics.registry.register(StaleCollector(ingest.stale_nodes))
    api = DaemonApi(config, store, signer, pool, metrics, profile_sink=profile_sink, ingest=ingest)
    pipeline = SpanPipeline(store, metrics, engine, ack=config.store.ack == "commit")
    management = _management_app(config, api, ingest)
    daemon = Daemon(
        config,
        store,
        signer,
        pool,
        metrics,
        api,
        engine,
        ingest,
        pipeline,
        management,
        server_tls,
        management_tls,
        notifier=notifier,
    )

    app = web.Application(client_max_size=config.proxy.max_body_bytes, middlewares=[management_only])
    app[DAEMON_KEY] = daemon
    app[ADMIN_SERVED] = False
    _add_routes(app, api, PROXY)
    for path in (*MANAGEMENT_PATHS[:1], config.server.api_prefix + "/admin"):  # 404 here (management_only)
        app.router.add_route("*", path, _not_here)
        app.router.add_route("*", path + "/{tail:.*}", _not_here)
    make_proxy_routes(app, Proxy(pool, config.proxy, pipeline.submit))  # the catch-all, last
    app.cleanup_ctx.append(_lifecycle)
    return app


def _management_app(config: Config, api: DaemonApi, ingest: Ingest | None) -> web.Application:
    app = web.Application(client_max_size=max(MANAGEMENT_MAX_BODY, config.proxy.max_body_bytes))
    app[evidence_bundles.ON_MANAGEMENT] = True  # evidence bundles are served here only
    _add_routes(app, api, MANAGEMENT)
    if ingest is not None:
        from tmb.ingest.routes import add_ingest_routes

        add_ingest_routes(
            app,
            ingest,
            admin_token=config.admin.token if config.admin_enabled() else None,
            rate_per_s=config.identity.rate_per_s,
            burst=config.identity.burst,
        )
    return app


def _add_routes(app: web.Application, api: DaemonApi, listener: str) -> None:
    """The routes of :data:`ROUTES` this listener serves, under ``[server] api_prefix``."""
    p = api.config.server.api_prefix
    methods: dict[str, set[str]] = {}
    for method, path, handler, where in ROUTES:
        if where in (BOTH, listener):
            app.router.add_route(method, p + path, _bind(api, handler))
            methods.setdefault(path, set()).add(method)
    for path, allowed in methods.items():
        app.router.add_route("*", p + path, _not_allowed(", ".join(sorted(allowed))))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bind(api: DaemonApi, handler: ApiHandler) -> Handler:
    async def bound(request: web.Request) -> web.StreamResponse:
        return await handler(api, request)

    return bound


def _not_allowed(allowed: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        msg = f"{request.method} is not allowed on {request.path}"
        return error_response(405, "method_not_allowed", msg, headers={"Allow": allowed})

    return handler


async def _not_here(request: web.Request) -> web.StreamResponse:
    return error_response(
        404,
        "management_listener_only",
        "evidence ingest and admin are served on the management listener only "
        "([management] in docs/config.md)",
    )


@web.middleware
async def management_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On the proxy listener: a request whose path, in its :func:`~tmb.proxy.contract.normal_form`, lies
    under a management path (``/v1/ingest/node%2D1/nonce``, ``//v1/ingest``, ``/V1/Ingest``,
    ``/x/../admin``) is answered 404, whichever route it matched (the proxy's catch-all included)."""
    prefixes = (MANAGEMENT_PATHS[0], request.app[DAEMON_KEY].config.server.api_prefix.lower() + "/admin")
    if under(normal_form(request.raw_path), prefixes):
        return await _not_here(request)
    return await handler(request)


# -- lifecycle -----------------------------------------------------------------------------------------
async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The daemon's start and stop, in order (see the module docstring)."""
    d = app[DAEMON_KEY]
    served, why = d.config.admin_status()
    if not served:
        (log.warning if d.config.admin.token else log.info)("admin endpoints are off: %s", why)
    runner = web.AppRunner(d.management, handler_cancellation=True, access_log=None)
    await runner.setup()
    m = d.config.management
    site = web.TCPSite(runner, m.host, m.port, ssl_context=d.management_tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await _close(d)
        raise ConfigError(
            f"cannot listen on the management address: {exc.strerror}",
            section="management",
            host=m.host,
            port=m.port,
        ) from None
    host, port = runner.addresses[0][:2]
    d.management_url = f"{'https' if d.management_tls else 'http'}://{_host(host)}:{port}"
    log.info("management listener (evidence ingest, admin) on %s", d.management_url)

    d.pool.start_health_checks()
    resumer = Resumer(d.pipeline, d.config.attestation.wait_s + RESUME_GRACE_S)
    resumer.start()
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(_retention_loop(d.store, d.config.store.retention_days, d.ingest)),
        loop.create_task(translog.checkpoint_loop(d.api, d.config.verdicts.checkpoint_s)),
    ]
    await d.notifier.start()
    if d.ingest is not None and d.ingest.stale_after_s > 0:
        tasks.append(loop.create_task(_stale_loop(d.ingest)))
    yield
    await runner.cleanup()  # the management listener stops: no evidence or admin request is in flight
    await resumer.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await d.notifier.stop()  # what it had not delivered stays in its outbox for the next start
    await d.pool.close()
    await d.pipeline.close()
    with contextlib.suppress(Exception):  # the verdicts decided last get a checkpoint (best effort)
        await translog.sign_checkpoint(d.api)
    await _close(d)


async def _close(d: Daemon) -> None:
    """The last two steps: the ingest closes (its SQLite state), then the store (committing what is
    queued)."""
    if d.ingest is not None:
        await asyncio.to_thread(d.ingest.close)
    await d.store.close()
    d.notifier.close()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _stale_loop(ingest: Ingest) -> None:
    """Which nodes are stale (``node.stale`` events, the metrics gauge), every few seconds."""
    every = min(5.0, max(0.2, ingest.stale_after_s / 5))
    while True:
        try:
            await asyncio.to_thread(ingest.check_stale)
        except Exception:
            log.exception("stale node check failed")
        await asyncio.sleep(every)


async def _retention_loop(store: AsyncStore, days: int, ingest: Ingest | None = None) -> None:
    """Every hour: spans and verdicts older than ``days``, then the ingest's evidence older than that and
    the longest export window (:mod:`tmb.ingest.retention`), in bounded passes."""
    if days <= 0:
        return
    while True:
        cutoff = time_ns() - days * 86400 * 10**9
        try:
            n = await store.prune(cutoff)
            if n:
                log.info("retention: deleted %d spans older than %d days", n, days)
        except Exception:
            log.exception("retention prune failed")
        if ingest is not None:
            try:
                n = await prune_evidence(ingest, cutoff)
                if n:
                    log.info("retention: deleted %d rows of evidence older than %d days", n, days)
            except Exception:
                log.exception("evidence retention failed")
        await asyncio.sleep(3600)


async def prune_evidence(ingest: Ingest, verdict_cutoff_ns: int, limit: int | None = None) -> int:
    """The evidence no kept verdict's export needs, in passes of ``limit`` rows (the ingest's requests take
    turns between them); returns the rows deleted."""
    from tmb.ingest.export import MAX_WINDOW_NS
    from tmb.ingest.service import PRUNE_SLICE

    limit = PRUNE_SLICE if limit is None else limit
    cutoff = verdict_cutoff_ns - MAX_WINDOW_NS  # a kept verdict's window may start that long before it ends
    total = 0
    while True:
        n = await asyncio.to_thread(ingest.prune_evidence, cutoff, limit)
        total += n
        if n < limit:
            return total
        await asyncio.sleep(0)


# -- the parts -----------------------------------------------------------------------------------------
def open_store(config: Config, *, init: bool = False) -> AsyncStore:
    """The verdict store the config names: PostgreSQL when ``[store] url`` is set, else the SQLite file
    (checked first: a damaged file, or an empty one without ``init``, is a one-line StoreError)."""
    if config.store.url:
        from tmb.verdict.store_pg import PgStore

        return AsyncStore(PgStore(config.store.url))
    return AsyncStore(config.store.path, sync=config.store.sync, init=init)


async def load_key(config: Config, store: AsyncStore, *, new_key: bool = False) -> Signer:
    """The verdict key, never created silently over the store's verdicts (:func:`load_verdict_key`);
    its public key is recorded in the store, so ``/v1/keys`` keeps publishing it after a key change."""
    path = Path(config.verdicts.key_file)
    signed_by = [] if os.path.lexists(path) else await store.verdict_signers()  # noqa: ASYNC240 (startup)
    label = str(store.store.path) if isinstance(store.store, Store) else str(getattr(store.store, "url", ""))
    signer = load_verdict_key(path, signed_by=signed_by, store=label, new_key=new_key)
    if signed_by and signer.key_id not in signed_by:
        log.warning(
            "--new-key: created verdict key %s; the store's earlier verdicts (keys %s) verify with the "
            "public keys it recorded, which GET /v1/keys keeps publishing",
            signer.key_id,
            ", ".join(signed_by),
        )
    await store.remember_key(signer.public.raw, signer.key_id)
    return signer


def _identity_policy(config: Config) -> IdentityPolicy:
    from tmb.ingest.identity import IdentityPolicy

    i = config.identity
    return IdentityPolicy.load(
        i.ek_roots,
        i.ek_pins,
        challenge_ttl_s=i.challenge_ttl_s,
        auth_skew_s=i.auth_skew_s,
        insecure_static_nodes=i.insecure_static_nodes,
    )


def open_ingest(config: Config, events: EventSink = discard) -> Ingest | None:
    """The evidence ingest (``[attestation]``) with the configured nodes' AKs registered, its evidence in the
    SQLite file or, with ``[store] url``, the PostgreSQL database of the verdicts; None without a policy (no
    ingest: every verdict says ``unattested``)."""
    a = config.attestation
    if not a.policy:
        return None
    from tmb.attest.policy import load_policy, policy_files
    from tmb.ingest.service import Ingest
    from tmb.ingest.store import open_ingest_store

    ingest = Ingest(
        open_ingest_store(a, config.store),  # PostgreSQL on [store] url: daemons share evidence
        policy=load_policy(a.policy),
        nonce_ttl_s=a.nonce_ttl_s,
        pcr_bank=a.pcr_bank,
        require_eventlog=a.require_eventlog,
        identity=_identity_policy(config),
        events=events,
        stale_after_s=a.stale_after_s,
    )
    try:
        # the policy and commitments in force, in the evidence trail: every quote names the policy it was
        # checked against, and bundles carry that one (tmb.ingest.export)
        from tmb.daemon.evidence import read_commitments

        ingest.keep_policy(Path(a.policy).read_bytes(), read_commitments(config), policy_files(a.policy))
        for entry in a.nodes:
            node, _, ak_path = entry.partition("=")
            ingest.register_node(node, _read_ak(ak_path, node))
    except BaseException:
        ingest.close()
        raise
    return ingest


def open_notifier(config: Config, signer: Signer) -> Notifier:
    """The webhook notifier (``[notify]``; inert without urls), signing with the verdict key."""
    return Notifier(config.notify, notify_db_path(config), signer, translog.origin_of(config))


def _engine(
    config: Config,
    store: AsyncStore,
    signer: Signer,
    ingest: Ingest | None,
    pool: WorkerPool,
    notifier: Notifier,
) -> Engine:
    """The verdict engine the config describes, scoring with the enrolled profiles (``[fingerprint]``)."""
    from tmb.verdict.engine import Engine, EngineSettings

    settings = EngineSettings(
        wait_s=config.attestation.wait_s,
        min_window_s=config.verdicts.min_window_ms / 1000,
        grid_s=config.verdicts.window_grid_ms / 1000,
        demo=config.verdicts.demo,
        target_far=config.fingerprint.target_far or None,
    )

    def load_of(span: Span, window: Window) -> float | None:
        """Requests in flight on the span's worker over the window, as this daemon's proxy counted them."""
        worker = next((w for w in pool.workers if w.name == span.worker), None)
        return worker.load.mean(window.t0_ns, window.t1_ns) if worker is not None else None

    profiles = load_profiles(config.fingerprint.profiles)
    return Engine(store, signer, ingest, profiles, settings, load_of=load_of, events=notifier.emit)


def _profile_sink(engine: Engine, directory: Path) -> Callable[[bytes], Awaitable[str]]:
    """``POST /admin/profiles``: validate an uploaded profile, store it in ``directory`` (replacing one with
    the same key) and make the engine score with it. Written under a temporary name, renamed once it
    loaded cleanly."""
    from tmb.fingerprint.loadprofile import load_profile

    async def install(body: bytes) -> str:
        if len(body) > MAX_PROFILE_BYTES:
            raise InputError(f"profile larger than {MAX_PROFILE_BYTES} bytes")
        tmp = directory / f".upload-{os.getpid()}-{id(body)}.json"
        try:
            await asyncio.to_thread(tmp.write_bytes, body)
            profile = await asyncio.to_thread(load_profile, tmp)
            target = directory / (re.sub(r"[^A-Za-z0-9_.-]+", "_", profile.key) + ".json")
            await asyncio.to_thread(os.replace, tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        engine.set_profiles([*(p for p in engine.profiles if p.key != profile.key), profile])
        return profile.key

    return install


def _read_ak(path: str, node: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the AK of node {node}: {exc.strerror}", path=path) from None


def load_profiles(paths: Sequence[str]) -> list[LoadProfile]:
    """Profiles from files and directories (every ``*.json`` in a directory), in a stable order."""
    from tmb.fingerprint.loadprofile import load_profile

    files: list[Path] = []
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError("fingerprint profile path does not exist", path=entry)
    return [load_profile(f) for f in files]
