"""The reverse proxy in front of the inference workers: one contract (:mod:`tmb.proxy.contract`), two
engines that do the I/O (:mod:`tmb.proxy.fast`, :mod:`tmb.proxy.app`), served by :mod:`tmb.proxy.site`."""

from tmb.proxy.app import Proxy, make_proxy_routes
from tmb.proxy.contract import DAEMON_PATHS, REQUEST_ID_HEADER, SpanCallback
from tmb.proxy.site import ProxyRunner, ProxySite
from tmb.proxy.upstream import Worker, WorkerPool
from tmb.spans import Outcome, Span

__all__ = [
    "DAEMON_PATHS",
    "REQUEST_ID_HEADER",
    "Outcome",
    "Proxy",
    "ProxyRunner",
    "ProxySite",
    "Span",
    "SpanCallback",
    "Worker",
    "WorkerPool",
    "make_proxy_routes",
]
