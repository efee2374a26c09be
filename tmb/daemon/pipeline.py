"""Between the proxy's hot path and the verdict engine: the span pipeline, and the resumer of verdicts left
pending.

Span flow: the proxy calls :meth:`SpanPipeline.submit` at the end of each request, which puts the span into
the store's next group commit (:meth:`AsyncStore.add_span`: no queue, no task; a served span is ``pending``
until its verdict lands). Once that commit is done the requests waiting for it complete (store ack
``commit``), metrics are updated and the group of spans goes to the :class:`VerdictEngine` in one task. The
engine decides, signs and publishes (``store.publish_many``), which makes the requests final and wakes
long-pollers.

Spans left pending (by a previous run, an engine failure, or a daemon sharing the PostgreSQL store that
died mid-verdict) are handed to the engine again by :class:`Resumer`: all of them at start-up, then those
still pending well after they ended whenever the engine is idle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from time import time_ns
from typing import Protocol

from tmb.daemon.metrics import Metrics
from tmb.spans import Span
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.store import Cursor

__all__ = ["Resumer", "SpanPipeline", "VerdictEngine", "resume_pending"]

log = logging.getLogger("tmb.serve")

RESUME_PAGE = 500  # pending spans read (and handed to the engine together) per page
RESUME_CONCURRENCY = 4  # pages being decided at once: at most this many pages of spans in memory
RESUME_INTERVAL_S = 30.0  # how often a daemon whose engine is idle looks for spans left pending
RESUME_GRACE_S = 30.0  # beyond the engine's own wait: a span still pending that much later was left behind


class VerdictEngine(Protocol):
    """Turns finished spans into signed verdicts (:class:`tmb.verdict.engine.Engine`; tests give their
    own). Called off the hot path: once per group of spans committed together, and once per page of spans
    resumed. It publishes what it decided to the store; what it leaves undecided stays ``pending``."""

    async def on_spans(self, spans: Sequence[Span]) -> None: ...


class SpanPipeline:
    """``submit`` is the proxy's ``on_span_end``.

    A span goes straight into the store's next group commit (no queue, no task); the spans of one commit
    share its future. Once it committed, the requests waiting for it complete (``ack``: store ack
    ``commit``), metrics are updated and the group goes to the engine in one task.
    """

    def __init__(self, store: AsyncStore, metrics: Metrics, engine: VerdictEngine, *, ack: bool) -> None:
        self.store = store
        self.metrics = metrics
        self.engine = engine
        self.ack = ack
        self._engine_tasks: set[asyncio.Task[None]] = set()
        self._future: asyncio.Future[None] | None = None  # the commit the current spans ride on
        self._spans: list[Span] = []
        self._closed = False

    @property
    def idle(self) -> bool:
        """No group of spans is being decided now."""
        return not self._engine_tasks

    def submit(self, span: Span) -> asyncio.Future[None] | None:
        fut = self.store.add_span(span)
        if fut is not self._future:  # the first span of a new commit
            self._future, self._spans = fut, []
            fut.add_done_callback(functools.partial(self._stored, self._spans))
        self._spans.append(span)
        return fut if self.ack else None

    def _stored(self, spans: list[Span], fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.metrics.store_errors.inc()
            exc = None if fut.cancelled() else fut.exception()
            log.error("cannot store %d spans", len(spans), exc_info=exc)
            return
        for span in spans:
            self.metrics.observe(span)
        if self._closed:
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


class Resumer:
    """Runs in the background while the daemon serves: at start-up it resumes every span the previous run
    left pending; then, every :data:`RESUME_INTERVAL_S` while the pipeline is idle, the spans still pending
    ``grace_s`` after they ended. Store errors are logged, never fatal. :meth:`stop` cancels it; what it
    had not decided stays pending."""

    def __init__(self, pipeline: SpanPipeline, grace_s: float) -> None:
        self.pipeline = pipeline
        self.grace_s = grace_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        store, engine = self.pipeline.store, self.pipeline.engine
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
                if self.pipeline.idle:  # so every span pending now was left behind
                    break
            before_ns = time_ns() - int(self.grace_s * 1e9)
