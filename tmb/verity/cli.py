"""Subcommands ``tmb verity format|verify|policy`` and ``tmb commit``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import ClassVar, TextIO

from tmb.verity.build import COMMITMENT_NAME, HASH_NAME, IMAGE_NAME, commit_model
from tmb.verity.commitment import load_commitment, policy_rule_from_commitment, policy_toml_snippet
from tmb.verity.layout import ALGORITHMS, DEFAULT_BLOCK_SIZE, canonical_algorithm, parse_salt, salt_hex
from tmb.verity.progress import Progress, human_bytes
from tmb.verity.tree import ProgressFn, format_tree
from tmb.verity.verify import verify_image


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verity = sub.add_parser(
        "verity",
        help="dm-verity hash trees (veritysetup-compatible) and image checks",
        description="dm-verity hash trees, byte-identical to veritysetup format, and image verification.",
    )
    vsub = verity.add_subparsers(dest="verity_command", metavar="ACTION")
    vsub.required = True

    fmt = vsub.add_parser(
        "format",
        help="build the hash tree of a file, like veritysetup format",
        description="Compute (and with --hash-file, write) the dm-verity hash tree of DATA. The last line "
        "is 'Root hash: <hex>', the value veritysetup format prints for the same input. A trailing "
        "partial block is ignored, as veritysetup does.",
    )
    fmt.add_argument("data", metavar="DATA", help="data file or block device")
    fmt.add_argument("--salt", help="hex salt, or - for none (default: 32 random bytes, like veritysetup)")
    fmt.add_argument("--hash-file", metavar="OUT", help="write the hash device (superblock + tree) here")
    fmt.add_argument("--uuid", help="superblock UUID (default: random)")
    fmt.add_argument("--hash", default="sha256", help="hash algorithm: " + ", ".join(ALGORITHMS))
    fmt.add_argument("--format", type=int, default=1, choices=(0, 1), dest="hash_type", help="hash format")
    fmt.add_argument("--data-block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="BYTES")
    fmt.add_argument("--hash-block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="BYTES")
    fmt.add_argument("--data-blocks", type=int, metavar="N", help="hash only the first N blocks")
    fmt.add_argument("--hash-offset", type=int, default=0, metavar="BYTES", help="offset on the hash file")
    fmt.add_argument("--no-superblock", action="store_true", help="do not write the verity superblock")
    fmt.add_argument("--workers", type=int, metavar="N", help="hashing processes (default: all cores)")
    fmt.set_defaults(func=_cmd_format)

    ver = vsub.add_parser(
        "verify",
        help="check an image against a commitment",
        description="Recompute the image's hash tree with the commitment's parameters. Exit 0 when it "
        "matches, 1 on any difference (with the first differing data block when --hash-file is given "
        "or the image is short).",
    )
    ver.add_argument("image", metavar="IMAGE")
    ver.add_argument("--commitment", required=True, metavar="FILE", help="commitment.json")
    ver.add_argument("--hash-file", metavar="F", help="stored hash tree to compare block by block")
    ver.add_argument("--json", action="store_true", help="print the outcome as JSON")
    ver.add_argument("--workers", type=int, metavar="N")
    ver.set_defaults(func=_cmd_verify)

    pol = vsub.add_parser(
        "policy",
        help="print the verifier's dm-verity rule for a commitment",
        description="Print the [[verity]] policy rule (TOML, or JSON with --json) made from a commitment.",
    )
    pol.add_argument("commitment", metavar="COMMITMENT")
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(func=_cmd_policy)

    com = sub.add_parser(
        "commit",
        help="model directory -> reproducible EROFS image, hash tree and commitment",
        description=f"Write {IMAGE_NAME}, {HASH_NAME} and {COMMITMENT_NAME} to --out and print the root "
        "hash. The same directory, id and revision always give the same files.",
    )
    com.add_argument("model_dir", metavar="MODEL_DIR")
    com.add_argument("--model-id", required=True, metavar="ID")
    com.add_argument("--revision", required=True, metavar="REV")
    com.add_argument("--out", required=True, metavar="DIR")
    com.add_argument("--salt", help="hex salt or - (default: derived from the model id and revision)")
    com.add_argument("--hash", default="sha256", help="verity hash algorithm")
    com.add_argument(
        "--dereference",
        action="store_true",
        help="store the content of symlinked files (e.g. a Hugging Face cache snapshot) instead of failing",
    )
    com.add_argument("--workers", type=int, metavar="N")
    com.set_defaults(func=_cmd_commit)


# ------------------------------------------------------------------------------------------------ format


def _block_progress(label: str, block_size: int, stream: TextIO) -> tuple[Progress, ProgressFn]:
    bar = Progress(label, 0, stream=stream)

    def update(done: int, total: int) -> None:
        bar.update(done * block_size, total * block_size)

    return bar, update


def _cmd_format(args: argparse.Namespace) -> int:
    salt = parse_salt(args.salt) if args.salt is not None else os.urandom(32)
    bar, update = _block_progress("hashing", args.data_block_size, sys.stderr)
    with bar:
        result = format_tree(
            args.data,
            args.hash_file,
            salt,
            args.uuid,
            algorithm=canonical_algorithm(args.hash),
            hash_type=args.hash_type,
            data_block_size=args.data_block_size,
            hash_block_size=args.hash_block_size,
            data_blocks=args.data_blocks,
            hash_offset=args.hash_offset,
            superblock=not args.no_superblock,
            workers=args.workers,
            progress=update,
        )
    if result.ignored_tail_bytes and args.data_blocks is None:
        print(
            f"warning: the last {result.ignored_tail_bytes} bytes of {args.data} are not a whole "
            f"{result.data_block_size}-byte block and are not covered by the hash tree",
            file=sys.stderr,
        )
    out = sys.stdout
    if result.hash_path is not None:
        out.write(f"VERITY header information for {result.hash_path}\n")
    else:
        out.write(f"VERITY hash tree of {args.data} (not written: no --hash-file)\n")
    if result.hash_path is not None and result.uuid is not None:
        out.write(f"UUID:            \t{result.uuid}\n")
    out.write(f"Hash type:       \t{result.hash_type}\n")
    out.write(f"Data blocks:     \t{result.data_blocks}\n")
    out.write(f"Data block size: \t{result.data_block_size}\n")
    out.write(f"Hash blocks:     \t{result.hash_blocks}\n")
    out.write(f"Hash block size: \t{result.hash_block_size}\n")
    out.write(f"Hash algorithm:  \t{result.algorithm}\n")
    out.write(f"Salt:            \t{result.salt_hex}\n")
    if result.hash_path is not None:
        out.write(f"Hash device size: \t{result.hash_device_size} [bytes]\n")
    out.write(f"Root hash: {result.root_hex}\n")
    return 0


# ------------------------------------------------------------------------------------------------ verify


def _cmd_verify(args: argparse.Namespace) -> int:
    commitment = load_commitment(args.commitment)
    bar, update = _block_progress("verifying", commitment.data_block_size, sys.stderr)
    with bar:
        outcome = verify_image(
            args.image, commitment, hash_path=args.hash_file, workers=args.workers, progress=update
        )
    if args.json:
        doc = {
            "ok": outcome.ok,
            "model": commitment.name,
            "root_hash": commitment.root_hex,
            "computed_root_hash": outcome.computed_root.hex() if outcome.computed_root else None,
            "first_bad_data_block": outcome.first_bad_data_block,
            "findings": outcome.report.to_list(),
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0 if outcome.ok else 1
    print(f"commitment: {commitment.name} root {commitment.root_hex}")
    print(f"image:      {args.image}")
    for item in outcome.report:
        print(str(item))
    if outcome.ok:
        print(f"OK: root hash {commitment.root_hex} matches ({commitment.data_blocks} data blocks)")
        return 0
    print(f"FAILED: {len(outcome.report.errors)} problem(s)")
    if outcome.first_bad_data_block is not None:
        print(f"First differing data block: {outcome.first_bad_data_block}")
    return 1


def _cmd_policy(args: argparse.Namespace) -> int:
    commitment = load_commitment(args.commitment)
    if args.json:
        print(json.dumps(policy_rule_from_commitment(commitment), indent=2))
    else:
        sys.stdout.write(policy_toml_snippet(commitment))
    return 0


# ------------------------------------------------------------------------------------------------ commit


class _StageBars:
    """One progress bar per stage of ``tmb commit``, on stderr, terminals only."""

    LABELS: ClassVar[dict[str, str]] = {"copy": "copying ", "hash": "hashing "}

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.stage: str | None = None
        self.bar: Progress | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            if stage == "mkfs":
                if getattr(self.stream, "isatty", lambda: False)():
                    self.stream.write("building the EROFS image (mkfs.erofs)...\n")
                    self.stream.flush()
            else:
                self.bar = Progress(self.LABELS.get(stage, stage), total, stream=self.stream)
        if self.bar is not None:
            self.bar.update(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_commit(args: argparse.Namespace) -> int:
    salt = parse_salt(args.salt) if args.salt is not None else None
    bars = _StageBars(sys.stderr)
    try:
        result = commit_model(
            args.model_dir,
            args.out,
            model_id=args.model_id,
            revision=args.revision,
            salt=salt,
            algorithm=canonical_algorithm(args.hash),
            dereference=args.dereference,
            workers=args.workers,
            progress=bars,
        )
    finally:
        bars.close()
    c = result.commitment
    files = sum(1 for f in c.files if f.type == "file")
    print(f"model:      {c.name} ({files} files)")
    print(f"image:      {result.image_path} ({human_bytes(c.image_size)}, {c.data_blocks} data blocks)")
    print(f"hash tree:  {result.hash_path}")
    print(f"commitment: {result.commitment_path}")
    print(f"salt:       {salt_hex(c.salt)} ({c.salt_source})")
    print(f"Root hash: {c.root_hex}")
    return 0
