"""How the daemon listens, through aiohttp's public runner and site API.

``tmb serve`` runs its application as aiohttp's own idiom has it, with two proxy-aware pieces::

    runner = ProxyRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = ProxySite(runner, host, port, backlog=1024)
    await site.start()

:class:`ProxyRunner` is an ``AppRunner`` whose server (``runner.server``, a ``web.Server``) gets the
proxy's keep-alive timeout for the connections aiohttp holds, and logs a client's unparsable request as
one INFO line. :class:`ProxySite` is a TCP site whose listening socket's protocol is the fast engine's
dispatcher (:class:`tmb.proxy.fast.FastPath`: connection cap, header and keep-alive timeouts, heads that
are not HTTP/1.x; with ``[proxy] engine = "fast"`` it relays what it can itself); the dispatcher hands
everything else, the daemon's own paths included, to ``runner.server``. Without ``httptools`` (the fast
engine cannot load), or for an application without the proxy (:func:`tmb.proxy.app.make_proxy_routes`),
the site listens with ``runner.server`` directly, like aiohttp's ``TCPSite``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tmb.proxy.app import PROXY_KEY, Proxy

if TYPE_CHECKING:
    from tmb.proxy.fast import FastPath

log = logging.getLogger("tmb.proxy")

__all__ = ["ProxyRunner", "ProxySite"]


class _ClientErrors(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback: that is the client's mistake
    (answered 400), not the daemon's, so it becomes one INFO line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.msg}: %s"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), exc.message)
        return True


server_log = logging.getLogger("tmb.proxy.http")
server_log.addFilter(_ClientErrors())


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` with the proxy's settings for aiohttp's server (when ``app`` has the proxy):
    ``keepalive_timeout`` from ``[proxy] keepalive_timeout_s`` and the ``tmb.proxy.http`` logger. Keyword
    arguments given win."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        proxy = app.get(PROXY_KEY)
        if proxy is not None:
            kwargs.setdefault("keepalive_timeout", proxy.config.keepalive_timeout_s)
            kwargs.setdefault("logger", server_log)
        super().__init__(app, **kwargs)


class ProxySite(web.BaseSite):
    """A TCP site whose connections start in the fast engine's dispatcher (see the module docstring)."""

    __slots__ = (
        "gate",
        "host",
        "listener",
        "port",
        "reuse_address",
        "reuse_port",
        "runner",
        "size",
        "ssl_context",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int = 0,
        *,
        backlog: int = 128,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self.runner = runner
        self.host = host
        self.port = port  # the bound port once started (port 0: one the system picked)
        self.size = backlog
        self.reuse_address = reuse_address
        self.reuse_port = reuse_port
        self.ssl_context = ssl_context  # TLS: the fast engine and aiohttp both read the decrypted stream
        self.listener: asyncio.Server | None = None
        self.gate: FastPath | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host or '*'}:{self.port}"  # '*': every interface

    @property
    def addresses(self) -> list[Any]:
        """The listening sockets' addresses (``(host, port, ...)``), as ``runner.addresses`` gives them."""
        sockets = self.listener.sockets if self.listener is not None else ()
        return [sock.getsockname() for sock in sockets]

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        server = self.runner.server
        assert server is not None, "call runner.setup() first"  # noqa: S101
        factory: Callable[[], asyncio.BaseProtocol] = server
        proxy = self.runner.app.get(PROXY_KEY) if isinstance(self.runner, web.AppRunner) else None
        if proxy is not None:
            factory = self._gate(proxy, server) or server
        self.listener = await asyncio.get_running_loop().create_server(
            factory,
            self.host,
            self.port,
            backlog=self.size,
            reuse_address=self.reuse_address,
            reuse_port=self.reuse_port,
            ssl=self.ssl_context,
        )
        if self.listener.sockets:
            self.port = self.listener.sockets[0].getsockname()[1]

    def _gate(self, proxy: Proxy, server: web.Server) -> Callable[[], asyncio.Protocol] | None:
        try:
            from tmb.proxy.fast import FastPath
        except ImportError as exc:  # httptools missing: every request through aiohttp, no connection gate
            log.warning("proxy engine 'fast' unavailable (%s): using 'aiohttp' without a connection cap", exc)
            return None
        self.gate = FastPath(proxy, server)
        proxy.gates.add(self.gate)
        return self.gate.connection

    async def stop(self) -> None:
        """Stop listening; idle connections close now, busy ones once their exchange ends (what is left
        after aiohttp's server shut down is cut at the application's cleanup)."""
        if self.listener is not None:
            self.listener.close()
        if self.gate is not None:
            self.gate.close_idle()
        await super().stop()
