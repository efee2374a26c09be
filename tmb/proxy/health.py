"""The daemon's own health (``GET /healthz``): up when at least one worker is healthy."""

from __future__ import annotations

from typing import Any

from tmb.proxy.upstream import WorkerPool


def health_report(pool: WorkerPool) -> tuple[int, dict[str, Any]]:
    """``(http_status, body)``: 200 ``{"status": "ok", ...}`` or 503 ``{"status": "degraded", ...}``.

    ``workers`` maps each worker name to ``{"healthy", "inflight", "max_concurrency", "error"}``.
    """
    workers = {
        w.name: {
            "healthy": w.healthy,
            "inflight": w.inflight,
            "max_concurrency": w.config.max_concurrency,
            "error": w.last_error,
        }
        for w in pool.workers
    }
    ok = any(w.healthy for w in pool.workers)
    return (200 if ok else 503), {"status": "ok" if ok else "degraded", "workers": workers}
