"""What the daemon tells an operator: the Prometheus registry, ``GET /metrics`` and ``GET /healthz``.

Both pages follow one rule for who sees per-worker detail: the ``[metrics]`` bearer token, or the ``[admin]``
one while admin is on (:func:`sees_worker_detail`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tmb.config import Config
from tmb.envelope import bearer_matches, error_response
from tmb.proxy.health import health_report
from tmb.proxy.upstream import WorkerPool
from tmb.spans import Span

if TYPE_CHECKING:
    from tmb.daemon.api import DaemonApi


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


class StaleCollector(Collector):
    """``tmb_nodes_stale`` and ``tmb_node_stale{node}``: nodes with no valid quote for
    ``[attestation] stale_after_s`` (their requests are ``unattested``)."""

    def __init__(self, stale: Callable[[], Mapping[str, int]]) -> None:
        self.stale = stale

    def collect(self) -> Any:
        nodes = self.stale()
        count = GaugeMetricFamily("tmb_nodes_stale", "nodes with no valid quote for stale_after_s")
        count.add_metric([], float(len(nodes)))
        each = GaugeMetricFamily("tmb_node_stale", "1 while the node is stale", labels=["node"])
        for node in sorted(nodes):
            each.add_metric([node], 1.0)
        yield count
        yield each


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
        self.notify = NotifyMetrics(self.registry)
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


class _OutboxCollector(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Any:
        counts = self.counts()
        held = GaugeMetricFamily(
            "tmb_notify_outbox",
            "notification deliveries in the outbox, by state (pending: to be attempted; dead: given up)",
            labels=["state"],
        )
        for state in ("pending", "dead"):
            held.add_metric([state], float(counts.get(state, 0)))
        yield held


class NotifyMetrics:
    """The webhook notifier's counters (``tmb.daemon.notify``), in the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.recorded = Counter(
            "tmb_notify_events", "events recorded in the outbox", ["kind"], registry=registry
        )
        self.delivered = Counter(
            "tmb_notify_delivered", "deliveries a receiver acknowledged (2xx)", registry=registry
        )
        self.retried = Counter(
            "tmb_notify_retries", "failed attempts scheduled to be retried", registry=registry
        )
        self.dead = Counter(
            "tmb_notify_dead",
            "deliveries given up: rejected (a 4xx other than 408/429), attempts, age, url_removed",
            ["reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "tmb_notify_dropped",
            "undelivered events removed because the outbox was full ([notify] max_queued)",
            registry=registry,
        )
        self.lost = Counter(
            "tmb_notify_lost", "events that could not be recorded (the outbox failed)", registry=registry
        )

    def watch(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Publish the outbox's sizes (``tmb_notify_outbox``) from ``counts`` at each scrape."""
        self.registry.register(_OutboxCollector(counts))


def metrics_mode(config: Config) -> str:
    """``off``, ``token`` or ``public``: how ``GET /metrics`` is served."""
    if not config.metrics.enabled:
        return "off"
    return "token" if config.metrics.token else "public"


def sees_worker_detail(config: Config, request: web.Request) -> bool:
    """The metrics token, or the admin token while admin is on, shows per-worker detail."""
    admin = config.admin.token if config.admin_enabled() else ""
    return bearer_matches(request, config.metrics.token) or bearer_matches(request, admin)


async def metrics_page(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: 404 with ``[metrics] enabled = false``, 401 without a token when one is set."""
    config = api.config
    if not config.metrics.enabled:
        return error_response(404, "metrics_disabled", "metrics are off (see [metrics] in docs/config.md)")
    if config.metrics.token and not sees_worker_detail(config, request):
        return error_response(
            401,
            "unauthorized",
            "/metrics needs 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    resp = web.Response(body=generate_latest(api.metrics.registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def healthz(api: DaemonApi, request: web.Request) -> web.StreamResponse:
    """``GET /healthz``: 200 when a worker is healthy, else 503; anonymous callers get the status alone."""
    status, body = health_report(api.pool)
    if not sees_worker_detail(api.config, request):  # anonymous: the overall status, no worker names
        body = {"status": body["status"]}
    return web.json_response(body, status=status)
