"""``tmb demo``: the end-to-end demonstration (see sample_infra/demo.py and docs/demo.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo on 127.0.0.1 (workers, probes, swtpm quotes, daemon, verdicts, audit)",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for everything it makes")
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from tmb.extras import require

    require("probe", "the demo (its probes quote with a swtpm)", modules=("tpm2_pytss",))
    require("report", "the demo (its HTML audit report)")
    from sample_infra.demo import main

    return main(args.out.resolve())
