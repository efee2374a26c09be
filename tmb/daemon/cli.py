"""``tmb serve --config FILE [--init] [--new-key]``: run the daemon.

``--init`` lets the daemon make a store of an empty (0-byte) SQLite file, which is otherwise refused;
``--new-key`` lets it create a verdict key where the key file is missing although the store holds verdicts
signed with the lost key (otherwise refused, exit 2). Once both listeners listen it prints::

    tmb serve: listening on http://127.0.0.1:8080 (uvloop: yes)
    tmb serve: management on http://127.0.0.1:8701 (evidence ingest, admin)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tmb.extras import require


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the daemon: reverse proxy, verdict API, metrics")
    p.add_argument("--config", type=Path, help="TOML config file (docs/config.md); TMB_* variables override")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--init",
        action="store_true",
        help="accept an empty (0-byte) store file and create a new store in it (refused otherwise)",
    )
    p.add_argument(
        "--new-key",
        action="store_true",
        help="create a new verdict key although the key file is missing and the store holds verdicts "
        "(the old public keys stay published at /v1/keys)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import logging
    import signal

    from tmb.config import load_config
    from tmb.daemon.serve import install_uvloop, serve

    config = load_config(args.config)
    if config.store.url:
        require("pg", "a PostgreSQL store ([store] url)")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uv = install_uvloop()

    def ready(url: str, management_url: str) -> None:
        print(f"tmb serve: listening on {url} (uvloop: {'yes' if uv else 'no'})", flush=True)
        print(f"tmb serve: management on {management_url} (evidence ingest, admin)", flush=True)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 (inside asyncio.run)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(config, ready=ready, init=args.init, new_key=args.new_key)

    asyncio.run(main())
    return 0
