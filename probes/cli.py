"""``tmb-probe``: ``run --config FILE`` (the probe service) and ``enroll --config FILE`` (enrol the node with
the daemon: EK certificate, AK, credential activation; without ``--config`` it prints the AK and EK). Exit
codes as ``tmb``: 0 ok, 2 bad input, TPM failure or enrolment refused, 130 interrupted."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from urllib.parse import quote as urlquote

from probes.config import load_config
from tmb.errors import TmbError
from tmb.extras import require

# The TPM and NVML bindings (the [probe] extra) load in the commands, after require() has checked them:
# without the extra, tmb-probe says which pip install to run instead of an ImportError traceback.

__all__ = ["main"]


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, default=list))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    require("probe", "tmb-probe run", modules=("tpm2_pytss",))
    from probes.agent import Probe

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Probe(config).run(stop)

    asyncio.run(go())
    return 0


def _enroll_with_daemon(args: argparse.Namespace) -> int:
    """Enrol the node with the daemon through the protocol (docs/probe.md, "Node identity") and keep the
    evidence key in the probe's state_dir (``tmb-probe run`` also enrols on its own when it has none)."""
    import aiohttp

    from probes.enrol import EnrolError, enrol, save_key
    from probes.tpm import TpmClient

    config = load_config(args.config)
    base = f"{config.daemon_url.rstrip('/')}/v1/ingest/{urlquote(config.node, safe='')}"

    async def go() -> dict[str, object]:
        tls = config.tls_context()
        timeout = aiohttp.ClientTimeout(total=config.http_timeout_s)
        connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

            async def post(route: str, doc: dict[str, object]) -> tuple[int, dict[str, object] | None]:
                async with http.post(f"{base}/{route}", json=doc) as resp:
                    data = await resp.content.read(1 << 20)
                try:
                    answer = json.loads(data)
                except ValueError:
                    return resp.status, None
                return resp.status, answer if isinstance(answer, dict) else None

            async def tpm(fn: Callable[[TpmClient], object]) -> object:
                def call() -> object:
                    with TpmClient(config.tcti) as client:
                        return fn(client)

                return await asyncio.to_thread(call)

            key, answer = await enrol(config.node, config.ak_handle, post, tpm)
        save_key(config.state_dir, config.node, key)
        return answer

    try:
        answer = asyncio.run(go())
    except EnrolError as exc:
        print(f"enrolment refused: {exc.finding.message} {json.dumps(exc.finding.context)}", file=sys.stderr)
        return 2
    except (OSError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"error: the daemon at {config.daemon_url} is unreachable: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"enrolled": True, **answer}, indent=2))
    return 0


def _enroll(args: argparse.Namespace) -> int:
    require("probe", "tmb-probe enroll", modules=("tpm2_pytss",))
    if args.config:
        return _enroll_with_daemon(args)
    from probes.tpm import AK_HANDLE, TpmClient

    handle = int(args.handle, 0) if args.handle else AK_HANDLE
    with TpmClient(args.tcti) as tpm:
        ak = tpm.create_or_load_ak(handle, args.alg)
        ek = tpm.ek_public("rsa")
        cert = tpm.ek_certificate("rsa")
    doc = {
        "ak_handle": f"0x{handle:08x}",
        "ak_algorithm": ak.algorithm,
        "ak_name": ak.name.hex() if ak.name else None,
        "ak_pem": ak.pem.decode(),
        "ak_tpm2b_public": ak.tpm2b_public.hex() if ak.tpm2b_public else None,
        "ek_tpm2b_public": ek.hex(),
        "ek_certificate_der": cert.hex() if cert is not None else None,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"AK handle: {doc['ak_handle']} ({ak.algorithm})")
    print(f"AK name: {doc['ak_name']}")
    print(f"AK TPM2B_PUBLIC (hex): {doc['ak_tpm2b_public']}")
    print(ak.pem.decode().rstrip())
    print(f"EK TPM2B_PUBLIC (hex): {doc['ek_tpm2b_public']}")
    print(f"EK certificate (DER hex): {doc['ek_certificate_der'] or '(none in NV)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmb-probe", description="tmb node probe (see docs/probe.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser("run", help="run the probe service")
    run.add_argument(
        "--config", required=False, default=None, help="probe config TOML (TMB_PROBE_* override)"
    )
    run.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    run.set_defaults(func=_run)
    enroll = sub.add_parser(
        "enroll",
        help="enrol with the daemon (--config: EK certificate, AK, credential activation); without "
        "--config, print the AK and EK",
    )
    enroll.add_argument("--config", default=None, help="probe config TOML: enrol with its daemon_url")
    enroll.add_argument("--tcti", default="device:/dev/tpmrm0")
    enroll.add_argument("--handle", default=None, help="persistent AK handle (default: the probe's own)")
    enroll.add_argument("--alg", choices=("rsa", "ecc"), default="rsa")
    enroll.add_argument("--json", action="store_true")
    enroll.set_defaults(func=_enroll)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TmbError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
