"""A standalone evidence ingest on 127.0.0.1, for tests and small deployments (``tmb serve`` mounts the same
routes in the daemon).

``python -m tmb.ingest --db FILE --policy POLICY [--port P] [--admin-token T] [--node NODE=AKFILE]...
[--require-eventlog] [--ek-roots DIR|builtin] [--ek-pin PIN]... [--insecure-static-nodes]`` listens and prints
``listening on http://127.0.0.1:P``. Nodes enrol (docs/probe.md, "Node identity") with an EK certified by a
root in ``--ek-roots`` or pinned by ``--ek-pin``; a ``--node`` AK is the AK that node must enrol with.
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
from tmb.ingest.identity import IdentityPolicy
from tmb.ingest.routes import make_app
from tmb.ingest.service import Ingest

__all__ = ["main"]


async def _serve(args: argparse.Namespace) -> None:
    ingest = Ingest(
        args.db,
        policy=load_policy(args.policy),
        nonce_ttl_s=args.nonce_ttl,
        require_eventlog=args.require_eventlog,
        identity=IdentityPolicy.load(
            args.ek_roots, tuple(args.ek_pin), insecure_static_nodes=args.insecure_static_nodes
        ),
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
    parser.add_argument(
        "--ek-roots",
        default="",
        help="TPM manufacturer root certificates: a directory, 'builtin' or 'builtin:DIR'",
    )
    parser.add_argument("--ek-pin", action="append", default=[], help="SHA-256 pin of an EK (vTPMs)")
    parser.add_argument(
        "--insecure-static-nodes",
        action="store_true",
        help="INSECURE (tests, development): --node and admin-registered nodes post evidence unauthenticated",
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
