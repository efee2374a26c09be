"""``tmb serve --config FILE``: the daemon -- proxy, span pipeline, store, verdict API on one aiohttp server.

Span flow: the proxy calls :meth:`SpanPipeline.submit` at the end of each request, which puts the span
into the store's next group commit (:meth:`AsyncStore.add_span`: no queue, no task; a served span is
``pending`` until its verdict lands). Once that commit is done the requests waiting for it complete
(store ack ``commit``), metrics are updated and the group of spans goes to the :class:`VerdictEngine` in
one task. The engine decides, signs and publishes (``ctx.store.publish_many``), which makes the requests
final and wakes long-pollers.

The seam for what comes next is :func:`attach_engine_and_ingest`: it is where the real verdict engine
(replacing :class:`PendingEngine`) and the evidence-ingest routes get attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import time_ns
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from tmb.config import Config
from tmb.daemon.translog import sign_checkpoint
from tmb.errors import ConfigError, InputError
from tmb.proxy.app import Proxy, make_proxy_routes
from tmb.proxy.upstream import WorkerPool
from tmb.spans import Span
from tmb.verdict.api import DaemonApi, Metrics, add_api_routes
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.signing import Signer, load_verdict_key
from tmb.verdict.store import Cursor, Store

log = logging.getLogger("tmb.serve")

if TYPE_CHECKING:
    from tmb.fingerprint.loadprofile import LoadProfile as Profile
    from tmb.verdict.engine import Engine
    from tmb.verdict.model import Window


class VerdictEngine(Protocol):
    """Turns finished spans into signed verdicts. Called off the hot path: one task per group of spans
    committed together (``on_spans``), and one per page of spans resumed (``on_spans`` too: spans left
    pending by a previous run, or by an engine failure, see :func:`resume_pending`)."""

    async def on_span(self, span: Span) -> None: ...

    async def on_spans(self, spans: Sequence[Span]) -> None: ...


class PendingEngine:
    """The placeholder engine: leaves every verdict ``pending`` (the span pipeline already stored it so)."""

    async def on_span(self, span: Span) -> None:
        return None

    async def on_spans(self, spans: Sequence[Span]) -> None:
        return None


@dataclass(frozen=True)
class DaemonContext:
    """What the engine and the ingest routes get to work with."""

    config: Config
    store: AsyncStore  # engine writes: await store.publish(signer.sign(verdict), evidence_refs)
    signer: Signer
    pool: WorkerPool
    metrics: Metrics


EngineFactory = Callable[[web.Application, DaemonContext], VerdictEngine]


def attach_engine_and_ingest(app: web.Application, ctx: DaemonContext) -> VerdictEngine:
    """The verdict engine and the evidence ingest (``[attestation]``, ``[fingerprint]`` in the config).

    Mounts the ingest routes (before the proxy's catch-all, which is added after this returns), registers
    the configured nodes' AKs, loads the enrolled profiles, and returns the engine. Without a policy there
    is no ingest and every verdict says ``unattested``. Verdicts left pending by a previous run are
    decided again at start-up.
    """
    from tmb.attest.policy import load_policy
    from tmb.ingest.routes import add_ingest_routes
    from tmb.ingest.service import Ingest
    from tmb.verdict.engine import Engine, EngineSettings

    cfg = ctx.config
    a = cfg.attestation
    ingest = None
    if a.policy:
        ingest = Ingest(
            a.db or cfg.store.path,
            policy=load_policy(a.policy),
            nonce_ttl_s=a.nonce_ttl_s,
            pcr_bank=a.pcr_bank,
            require_eventlog=a.require_eventlog,
        )
        for entry in a.nodes:
            node, _, ak_path = entry.partition("=")
            ingest.register_node(node, _read_ak(ak_path, node))
        add_ingest_routes(app, ingest, admin_token=cfg.admin.token if cfg.admin_enabled() else None)
    settings = EngineSettings(
        wait_s=a.wait_s,
        min_window_s=cfg.verdicts.min_window_ms / 1000,
        demo=cfg.verdicts.demo,
        target_far=cfg.fingerprint.target_far or None,
    )
    engine = Engine(
        ctx.store,
        ctx.signer,
        ingest,
        load_profiles(cfg.fingerprint.profiles),
        settings,
        load_of=lambda span, window: _worker_load(ctx, span, window),
    )
    app[ENGINE_KEY] = engine
    upload_dir = next((Path(p) for p in cfg.fingerprint.profiles if Path(p).is_dir()), None)
    if upload_dir is not None and API_KEY in app:
        app[API_KEY].profile_sink = lambda body: install_profile(engine, upload_dir, body)

    grace_s = a.wait_s + RESUME_GRACE_S
    app[RESUMED_KEY] = set()
    app.on_startup.append(functools.partial(_start_resuming, engine=engine, grace_s=grace_s))
    app.on_shutdown.append(_stop_resuming)
    if ingest is not None:
        app.on_cleanup.append(lambda _app: asyncio.to_thread(ingest.close))
    return engine


def _worker_load(ctx: DaemonContext, span: Span, window: Window) -> float | None:
    """Requests in flight on the span's worker over the window, as this daemon's proxy counted them."""
    worker = next((w for w in ctx.pool.workers if w.name == span.worker), None)
    return worker.load.mean(window.t0_ns, window.t1_ns) if worker is not None else None


RESUMED_KEY = web.AppKey("tmb.resumed", set)  # the resumer task (see _start_resuming)
RESUME_PAGE = 500  # pending spans read (and handed to the engine together) per page
RESUME_CONCURRENCY = 4  # pages being decided at once: at most this many pages of spans in memory
RESUME_INTERVAL_S = 30.0  # how often a daemon whose engine is idle looks for spans left pending
RESUME_GRACE_S = 30.0  # beyond the engine's own wait: a span still pending that much later was left behind


async def resume_pending(
    store: AsyncStore,
    engine: VerdictEngine,
    *,
    before_ns: int | None = None,
    page: int | None = None,
    concurrency: int | None = None,
) -> int:
    """Hand every span still pending (that ended before ``before_ns``) to ``engine.on_spans``, a page of
    ``page`` spans at a time (keyset pagination over ``(end_ns, id)``), with at most ``concurrency`` pages
    being decided at once: a million pending spans never become a million tasks or a million spans in
    memory. Returns how many spans were handed over; an engine failure on one page is logged, the other
    pages go on. Cancelled, it cancels the pages in flight (they stay pending for the next pass)."""
    page = page or RESUME_PAGE
    slots = asyncio.Semaphore(concurrency or RESUME_CONCURRENCY)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    after: Cursor | None = None
    total = 0

    async def decide(spans: list[Span]) -> None:
        try:
            await engine.on_spans(spans)
        except Exception:
            log.exception("verdict engine failed on %d resumed spans (first %s)", len(spans), spans[0].id)
        finally:
            slots.release()

    try:
        while True:
            await slots.acquire()
            try:
                spans, after = await store.pending_spans(after, before_ns=before_ns, limit=page)
            except BaseException:
                slots.release()
                raise
            if spans:
                total += len(spans)
                task = loop.create_task(decide(spans))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                slots.release()
            if after is None:
                break
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return total


async def _resume_loop(app: web.Application, engine: VerdictEngine, grace_s: float) -> None:
    """At start-up: resume every span the previous run left pending. Then, every ``RESUME_INTERVAL_S``
    while the engine is idle: resume spans still pending ``grace_s`` after they ended (an engine failure,
    a daemon sharing the PostgreSQL store that died mid-verdict). Store errors are logged, never fatal."""
    store = app[CTX_KEY].store
    before_ns = time_ns()  # spans ending later are this run's: the pipeline hands them to the engine
    while True:
        try:
            n = await resume_pending(store, engine, before_ns=before_ns)
            if n:
                log.info("resumed %d pending spans that ended before %d", n, before_ns)
        except Exception as exc:
            log.error("cannot resume pending verdicts: %s", exc)
        while True:
            await asyncio.sleep(RESUME_INTERVAL_S)
            if _engine_idle(app):
                break
        before_ns = time_ns() - int(grace_s * 1e9)


def _engine_idle(app: web.Application) -> bool:
    """No group of spans from the proxy is being decided (so every span pending now was left behind)."""
    pipeline = app.get(PIPELINE_KEY)
    return pipeline is None or pipeline.idle


async def _start_resuming(app: web.Application, *, engine: VerdictEngine, grace_s: float) -> None:
    """on_startup: the resumer runs in the background (the daemon serves while it works)."""
    app[RESUMED_KEY].add(asyncio.get_running_loop().create_task(_resume_loop(app, engine, grace_s)))


async def _stop_resuming(app: web.Application) -> None:
    """on_shutdown (before the store closes): stop the resumer; what it had not decided stays pending."""
    tasks = app[RESUMED_KEY]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


API_KEY = web.AppKey("tmb.api", DaemonApi)
ENGINE_KEY = web.AppKey("tmb.engine", object)


async def install_profile(engine: Engine, directory: Path, body: bytes) -> str:
    """Validate an uploaded profile, store it in ``directory`` (replacing one with the same key) and make
    the engine score with it. Written under a temporary name, renamed when it loaded cleanly."""
    from tmb.fingerprint.loadprofile import load_profile

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


MAX_PROFILE_BYTES = 32 * 1024 * 1024


def _read_ak(path: str, node: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the AK of node {node}: {exc.strerror}", path=path) from None


def load_profiles(paths: Sequence[str]) -> list[Profile]:
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


class SpanPipeline:
    """Between the proxy's hot path and the store/engine. ``submit`` is the proxy's ``on_span_end``.

    A span goes straight into the store's next group commit (:meth:`AsyncStore.add_span`: no queue, no
    task); the spans of one commit share its future. Once it committed, the requests waiting for it
    complete (store ack ``commit``), metrics are updated and every span goes to the :class:`VerdictEngine`.
    """

    def __init__(self, ctx: DaemonContext, engine: VerdictEngine, *, ack: bool) -> None:
        self.ctx = ctx
        self.engine = engine
        self.ack = ack
        self._engine_tasks: set[asyncio.Task[None]] = set()
        self._idle_engine = type(engine) is PendingEngine  # nothing to run: no task per span
        self._future: asyncio.Future[None] | None = None  # the commit the current spans ride on
        self._spans: list[Span] = []
        self._closed = False

    @property
    def idle(self) -> bool:
        """No group of spans is being decided now."""
        return not self._engine_tasks

    def submit(self, span: Span) -> asyncio.Future[None] | None:
        fut = self.ctx.store.add_span(span)
        if fut is not self._future:  # the first span of a new commit
            self._future, self._spans = fut, []
            fut.add_done_callback(functools.partial(self._stored, self._spans))
        self._spans.append(span)
        return fut if self.ack else None

    def _stored(self, spans: list[Span], fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.ctx.metrics.store_errors.inc()
            exc = None if fut.cancelled() else fut.exception()
            log.error("cannot store %d spans", len(spans), exc_info=exc)
            return
        for span in spans:
            self.ctx.metrics.observe(span)
        if self._idle_engine or self._closed:
            return
        task = fut.get_loop().create_task(self._run_engine(spans))
        self._engine_tasks.add(task)
        task.add_done_callback(self._engine_tasks.discard)

    async def _run_engine(self, spans: list[Span]) -> None:
        try:
            await self.engine.on_spans(spans)
        except Exception:
            log.exception("verdict engine failed on %d spans (first %s)", len(spans), spans[0].id)

    async def close(self) -> None:
        """Stop the engine's tasks (the store's close commits spans still queued; their verdicts are
        resumed as pending at the next start)."""
        self._closed = True
        for task in list(self._engine_tasks):
            task.cancel()
        await asyncio.gather(*self._engine_tasks, return_exceptions=True)


CTX_KEY = web.AppKey("tmb.ctx", DaemonContext)
PIPELINE_KEY = web.AppKey("tmb.pipeline", SpanPipeline)


async def build_app(
    config: Config, *, engine_factory: EngineFactory | None = None, init: bool = False, new_key: bool = False
) -> web.Application:
    """The daemon's application (call inside the running loop). ``engine_factory`` overrides the hook;
    ``init`` accepts an empty SQLite file as a new store, ``new_key`` a new verdict key where the key file
    is missing but the store holds verdicts (``tmb serve --init``, ``--new-key``)."""
    store = open_store(config, init=init)
    try:
        signer = await load_key(config, store, new_key=new_key)
    except BaseException:
        await store.close()
        raise
    pool = WorkerPool(config.workers, config.proxy)
    metrics = Metrics(pool)
    ctx = DaemonContext(config, store, signer, pool, metrics)
    app = web.Application(client_max_size=config.proxy.max_body_bytes)
    app[CTX_KEY] = ctx
    api = DaemonApi(config, store, signer, pool, metrics)
    app[API_KEY] = api
    add_api_routes(app, api)
    engine = (engine_factory or attach_engine_and_ingest)(app, ctx)
    pipeline = SpanPipeline(ctx, engine, ack=config.store.ack == "commit")
    app[PIPELINE_KEY] = pipeline
    make_proxy_routes(app, Proxy(pool, config.proxy, pipeline.submit))

    async def lifecycle(app: web.Application) -> object:
        pool.start_health_checks()
        retention = asyncio.get_running_loop().create_task(_retention_loop(ctx))
        yield
        retention.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retention
        await pool.close()
        await pipeline.close()
        with contextlib.suppress(Exception):  # the verdicts decided last get a checkpoint (best effort)
            await sign_checkpoint(api)
        await store.close()

    app.cleanup_ctx.append(lifecycle)  # type: ignore[arg-type]
    return app


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
    signed_by = [] if os.path.lexists(path) else await store.verdict_signers()
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


async def _retention_loop(ctx: DaemonContext) -> None:
    days = ctx.config.store.retention_days
    if days <= 0:
        return
    while True:
        try:
            n = await ctx.store.prune(time_ns() - days * 86400 * 10**9)
            if n:
                log.info("retention: deleted %d spans older than %d days", n, days)
        except Exception:
            log.exception("retention prune failed")
        await asyncio.sleep(3600)


def freeze_startup_heap() -> None:
    """Move everything allocated while starting (modules, config, profiles, the app) out of the cyclic
    GC's reach. Full collections otherwise walk that whole heap while the proxy waits: under load they
    were most of the p99 latency (about 45 ms instead of about 11 ms in bench/bench_proxy.py)."""
    gc.collect()
    gc.freeze()


def install_uvloop() -> bool:
    """Use uvloop when it is installed; returns whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(
    config: Config,
    *,
    ready: Callable[[str], None] | None = None,
    init: bool = False,
    new_key: bool = False,
) -> None:
    """Run until cancelled. ``ready`` gets ``host:port`` once listening (port 0 = pick one); ``init`` and
    ``new_key`` as for :func:`build_app`."""
    from tmb.proxy.site import ProxyRunner, ProxySite

    app = await build_app(config, init=init, new_key=new_key)
    runner = ProxyRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = ProxySite(runner, config.server.host, config.server.port, backlog=1024)
    await site.start()
    freeze_startup_heap()
    addrs = site.addresses
    host, port = addrs[0][0], addrs[0][1]
    log.info("tmb serving on %s:%s with %d workers", host, port, len(config.workers))
    if ready is not None:
        ready(f"{host}:{port}")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
