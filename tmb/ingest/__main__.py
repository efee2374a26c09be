"""A standalone evidence ingest on 127.0.0.1, for tests and small deployments (``tmb serve`` mounts the same
routes in the daemon).

``python -m tmb.ingest --db FILE --policy POLICY [--port P] [--admin-token T] [--node NODE=AKFILE]...
[--require-eventlog]`` listens and prints ``listening on http://127.0.0.1:P``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from tmb.attest.policy import load_policy
from tmb.errors import TmbError
from tmb.ingest.routes import make_app
from tmb.ingest.service import Ingest

__all__ = ["main"]


async def _serve(args: argparse.Namespace) -> None:
    ingest = Ingest(
        args.db,
        policy=load_policy(args.policy),
        nonce_ttl_s=args.nonce_ttl,
        require_eventlog=args.require_eventlog,
    )
    for spec in args.node:
        node, _, path = spec.partition("=")
        try:
            ingest.register_node(node, Path(path).read_bytes())  # noqa: ASYNC240 (startup)
        except OSError as exc:
            raise TmbError(f"cannot read AK file: {exc.strerror}", path=path) from None
    runner = web.AppRunner(make_app(ingest, admin_token=args.admin_token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        ingest.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmb.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True, help="SQLite file")
    parser.add_argument("--policy", required=True, help="runtime policy TOML")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--admin-token", default=None)
    parser.add_argument("--nonce-ttl", type=float, default=120.0)
    parser.add_argument("--node", action="append", default=[], metavar="NODE=AKFILE")
    parser.add_argument(
        "--require-eventlog",
        action="store_true",
        help="a node without a UEFI event log is not attested (boot.no_eventlog is an error)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
