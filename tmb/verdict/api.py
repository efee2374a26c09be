"""Temporary: the daemon's API moved to :mod:`tmb.daemon` (``api``, ``metrics``, ``admin``, ``openapi``).

This re-export keeps ``tmb/serve.py`` importing; it goes when serve.py moves into ``tmb/daemon/``.
"""

from tmb.daemon.api import DaemonApi, Metrics, add_api_routes

__all__ = ["DaemonApi", "Metrics", "add_api_routes"]
