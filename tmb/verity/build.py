"""``tmb commit``: model directory -> EROFS image + dm-verity hash tree + commitment.json.

Everything is produced in a private staging directory inside the output directory and renamed into place
at the end, the commitment last (an old commitment.json is removed first), so an interrupted run never
leaves a set of files that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tmb import __version__
from tmb.verity.commitment import Commitment, check_model_ref, derive_salt, derive_uuid, write_commitment
from tmb.verity.errors import VerityInputError
from tmb.verity.image import build_image, check_output_outside
from tmb.verity.tree import format_tree

IMAGE_NAME = "image.erofs"
HASH_NAME = "image.verity"
COMMITMENT_NAME = "commitment.json"

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done_bytes, total_bytes)`` with stage ``copy``, ``mkfs`` or ``hash``; may be called
from worker threads during ``copy``."""


@dataclass(frozen=True)
class CommitResult:
    commitment: Commitment
    out_dir: str
    image_path: str
    hash_path: str
    commitment_path: str


def commit_model(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_id: str,
    revision: str,
    salt: bytes | None = None,
    algorithm: str = "sha256",
    dereference: bool = False,
    timestamp: int = 0,
    workers: int | None = None,
    progress: StageProgress | None = None,
) -> CommitResult:
    """Build the image, its hash tree and the commitment. ``salt=None`` derives it from id and revision."""
    check_model_ref(model_id, revision)
    out = os.fspath(out_dir)
    check_output_outside(model_dir, out)
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise VerityInputError(f"cannot create output directory: {exc.strerror}", path=out) from exc
    salt_source = "derived" if salt is None else "explicit"
    salt = derive_salt(model_id, revision) if salt is None else salt
    image_uuid = derive_uuid(model_id, revision, "erofs")
    verity_uuid = derive_uuid(model_id, revision, "verity")
    staging = tempfile.mkdtemp(prefix=".tmb-commit-", dir=out)
    complete = False
    try:
        image = os.path.join(staging, IMAGE_NAME)
        hash_file = os.path.join(staging, HASH_NAME)
        copy_total = [0]
        copied = [0]
        lock = threading.Lock()

        def on_stage(stage: str, total: int) -> None:
            copy_total[0] = total if stage == "copy" else copy_total[0]
            if progress:
                progress(stage, 0, total)

        def advance(n: int) -> None:
            with lock:
                copied[0] += n
                done = copied[0]
            if progress:
                progress("copy", done, copy_total[0])

        built = build_image(
            model_dir,
            image,
            uuid=image_uuid,
            timestamp=timestamp,
            dereference=dereference,
            advance=advance,
            on_stage=on_stage,
        )

        def on_hash(done: int, total: int) -> None:
            if progress:
                progress("hash", done * 4096, total * 4096)

        tree = format_tree(
            image, hash_file, salt, verity_uuid, algorithm=algorithm, workers=workers, progress=on_hash
        )
        commitment = Commitment(
            model_id=model_id,
            revision=revision,
            files=built.files,
            image_path=IMAGE_NAME,
            image_size=built.size,
            root_hash=tree.root_hash,
            salt=tree.salt,
            data_blocks=tree.data_blocks,
            hash_blocks=tree.hash_blocks,
            algorithm=tree.algorithm,
            salt_source=salt_source,
            hash_type=tree.hash_type,
            data_block_size=tree.data_block_size,
            hash_block_size=tree.hash_block_size,
            hash_path=HASH_NAME,
            hash_offset=tree.hash_offset,
            superblock=tree.superblock,
            verity_uuid=tree.uuid,
            image_format="erofs",
            image_uuid=built.uuid,
            mkfs_args=built.mkfs_args,
            tools={"tmb": __version__, "mkfs.erofs": built.mkfs_version},
        )
        staged_commitment = os.path.join(staging, COMMITMENT_NAME)
        write_commitment(commitment, staged_commitment)
        final = {name: os.path.join(out, name) for name in (IMAGE_NAME, HASH_NAME, COMMITMENT_NAME)}
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final[COMMITMENT_NAME])
            os.replace(image, final[IMAGE_NAME])
            os.replace(hash_file, final[HASH_NAME])
            os.replace(staged_commitment, final[COMMITMENT_NAME])
        except OSError as exc:
            raise VerityInputError(
                f"cannot move the outputs into place: {exc.strerror}", path=exc.filename or out
            ) from exc
        complete = True
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        if created and not complete:
            with contextlib.suppress(OSError):
                os.rmdir(out)  # only if still empty
    return CommitResult(
        commitment=commitment,
        out_dir=out,
        image_path=final[IMAGE_NAME],
        hash_path=final[HASH_NAME],
        commitment_path=final[COMMITMENT_NAME],
    )
