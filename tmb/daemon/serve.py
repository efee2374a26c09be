"""Running the daemon: :func:`serve` (what ``tmb serve`` runs), uvloop, and the start-up heap freeze."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from tmb.config import Config
from tmb.daemon.app import DAEMON_KEY, build_app

__all__ = ["freeze_startup_heap", "install_uvloop", "serve"]

log = logging.getLogger("tmb.serve")


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
    ready: Callable[[str, str], None] | None = None,
    init: bool = False,
    new_key: bool = False,
) -> None:
    """Run until cancelled. ``ready`` gets the proxy listener's and the management listener's URLs
    (``http(s)://host:port``) once both listen (port 0 = pick one); ``init`` and ``new_key`` as for
    :func:`tmb.daemon.app.build_app`. Stopping runs the shutdown order of :mod:`tmb.daemon.app`."""
    from tmb.proxy.site import ProxyRunner, ProxySite

    app = await build_app(config, init=init, new_key=new_key)
    daemon = app[DAEMON_KEY]
    runner = ProxyRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()  # starts the management listener (the application's lifecycle)
    try:
        site = ProxySite(
            runner, config.server.host, config.server.port, backlog=1024, ssl_context=daemon.server_tls
        )
        await site.start()
        freeze_startup_heap()
        host, port = site.addresses[0][:2]
        scheme = "https" if daemon.server_tls is not None else "http"
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("tmb serving on %s with %d workers", url, len(config.workers))
        if ready is not None:
            ready(url, daemon.management_url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
