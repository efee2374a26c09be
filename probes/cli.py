"""``tmb-probe``: ``run --config FILE`` (the probe service) and ``enroll`` (create or load the AK, print what
the operator registers with the daemon). Exit codes as ``tmb``: 0 ok, 2 bad input or TPM failure, 130
interrupted."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence

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


def _enroll(args: argparse.Namespace) -> int:
    require("probe", "tmb-probe enroll", modules=("tpm2_pytss",))
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
    enroll = sub.add_parser("enroll", help="create or load the AK and print what to register with the daemon")
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
