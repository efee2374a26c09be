"""Workers as the proxy sees them: one pooled client session each, in-flight counts, health, selection.

A worker is healthy until an active check (``GET proxy.health_path`` answered with a status below 500)
or a failed connection says otherwise; unhealthy workers are tried only after every healthy one.
Selection is round-robin over the workers that serve the requested model (all workers when none does or
the model is unknown), skipping workers at their ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from time import time_ns
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from tmb.config import ProxyConfig, WorkerConfig
from tmb.telemetry.load import LoadRecorder

if TYPE_CHECKING:
    from tmb.proxy.fast_upstream import FastUpstream

log = logging.getLogger("tmb.proxy")


class Worker:
    """Runtime state of one configured worker. Create inside a running event loop."""

    __slots__ = (
        "_inflight",
        "config",
        "healthy",
        "host",
        "host_header",
        "idle",
        "last_error",
        "load",
        "origin",
        "plain",
        "port",
        "session",
    )

    def __init__(self, config: WorkerConfig, proxy: ProxyConfig) -> None:
        self.config = config
        self.origin = config.url.rstrip("/")
        self._inflight = 0
        self.load = LoadRecorder()  # requests in flight over time: the fingerprint's load
        self.healthy = True
        self.last_error: str | None = None
        url = URL(self.origin)
        self.plain = url.scheme == "http"  # the fast engine speaks plain HTTP/1.1 only
        self.host = url.host or ""
        self.port = url.port or 80
        self.host_header = url.raw_authority.encode("ascii")  # what aiohttp's client sends as Host
        self.idle: list[FastUpstream] = []  # keep-alive connections of the fast engine, most recent last
        timeout = aiohttp.ClientTimeout(
            total=proxy.total_timeout_s or None,
            sock_connect=proxy.connect_timeout_s,
            sock_read=proxy.read_timeout_s,
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0, enable_cleanup_closed=False),
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            read_bufsize=1 << 17,
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def inflight(self) -> int:
        return self._inflight

    @inflight.setter
    def inflight(self, value: int) -> None:
        self._inflight = value
        self.load.set(time_ns(), value)

    @property
    def full(self) -> bool:
        return self.inflight >= self.config.max_concurrency

    def url(self, raw_path: str) -> URL:
        return URL(self.origin + raw_path, encoded=True)

    def mark_down(self, error: str) -> None:
        if self.healthy:
            log.warning("worker %s marked unhealthy: %s", self.name, error)
        self.healthy = False
        self.last_error = error

    async def check(self, path: str, timeout_s: float) -> bool:
        """One active health check; updates and returns ``healthy``."""
        try:
            async with self.session.get(
                self.url(path), timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
            ) as resp:
                await resp.read()
                ok = resp.status < 500
                error = None if ok else f"health check status {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok, error = False, f"health check failed: {type(exc).__name__}: {exc}"
        if ok:
            if not self.healthy:
                log.info("worker %s healthy again", self.name)
            self.healthy, self.last_error = True, None
        else:
            self.mark_down(error or "unhealthy")
        return ok

    def close_idle(self) -> None:
        """Close the fast engine's idle keep-alive connections."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    async def close(self) -> None:
        self.close_idle()
        await self.session.close()


class WorkerPool:
    """The configured workers; selection, health-check loop and shutdown."""

    def __init__(self, workers: Iterable[WorkerConfig], proxy: ProxyConfig) -> None:
        self.proxy = proxy
        self.workers: list[Worker] = [Worker(w, proxy) for w in workers]
        self._by_model: dict[str, list[Worker]] = {}
        self._rebuild()
        self._rr = 0
        self.all_plain = True
        self._health_task: asyncio.Task[None] | None = None

    def _rebuild(self) -> None:
        self.all_plain = all(w.plain for w in self.workers)
        self._by_model = {}
        for w in self.workers:
            if w.config.model:
                self._by_model.setdefault(w.config.model, []).append(w)

    def add(self, config: WorkerConfig) -> Worker:
        """Register a worker at run time (admin API); names are unique."""
        if any(w.name == config.name for w in self.workers):
            raise ValueError(f"worker {config.name!r} already exists")
        worker = Worker(config, self.proxy)
        self.workers.append(worker)
        self._rebuild()
        return worker

    def get(self, name: str) -> Worker | None:
        return next((w for w in self.workers if w.name == name), None)

    def candidates(self, model: str | None) -> list[Worker]:
        """Workers to try in order: healthy before unhealthy, round-robin, full ones left out."""
        pool = (self._by_model.get(model) if model else None) or self.workers
        n = len(pool)
        if n == 0:
            return []
        self._rr = start = (self._rr + 1) % n
        if n == 1:
            w = pool[0]
            return [] if w.full else [w]
        ordered = pool[start:] + pool[:start]
        healthy = [w for w in ordered if w.healthy and not w.full]
        if len(healthy) == n:
            return healthy
        return healthy + [w for w in ordered if not w.healthy and not w.full]

    def start_health_checks(self) -> None:
        if self._health_task is None and self.workers:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(
                *(w.check(self.proxy.health_path, self.proxy.health_timeout_s) for w in list(self.workers)),
                return_exceptions=True,
            )
            await asyncio.sleep(self.proxy.health_interval_s)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)
