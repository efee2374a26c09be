"""The reverse proxy in front of the inference workers (see tmb/proxy/app.py for the contract)."""

from tmb.proxy.app import REQUEST_ID_HEADER, Proxy, SpanCallback, make_proxy_routes
from tmb.proxy.upstream import Worker, WorkerPool
from tmb.spans import Outcome, Span

__all__ = [
    "REQUEST_ID_HEADER",
    "Outcome",
    "Proxy",
    "Span",
    "SpanCallback",
    "Worker",
    "WorkerPool",
    "make_proxy_routes",
]
