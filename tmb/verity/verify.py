"""Check an image against a commitment: recompute its tree, compare it with the committed root and, when
the stored hash tree is at hand, block by block, to name the first data block that differs.

Outcomes are findings (stable dotted ids, see docs/commitment.md) collected in a :class:`~tmb.errors.Report`;
only unusable inputs raise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tmb.errors import Report, Severity, TmbError
from tmb.verity.commitment import Commitment
from tmb.verity.errors import VerityInputError
from tmb.verity.layout import (
    DEFAULT_BLOCK_SIZE,
    TreeGeometry,
    block_digest,
    digest_size,
    read_superblock,
    salt_hex,
    tree_geometry,
)
from tmb.verity.tree import (
    ProgressFn,
    _build,
    _data_size,
    _plan,
    _prepare,
    _results,
    default_workers,
    root_hash,
)

# ----------------------------------------------------------------------------------------- tree compare


@dataclass(frozen=True)
class TreeComparison:
    """A data file's tree recomputed and compared, block by block, with a stored hash tree."""

    root_hash: bytes | None  # computed from the data; None when the data is shorter than data_blocks
    stored_root_hash: bytes | None  # digest of the stored top block (None: no tree, or hash file too short)
    data_blocks: int  # blocks the tree covers (the committed count)
    available_blocks: int  # whole blocks present in the data file
    first_bad_data_block: int | None  # first data block whose digest differs from the stored level 0
    bad_data_blocks: int  # how many differ (missing blocks of a short file included)
    first_bad_hash_block: tuple[int, int] | None  # (level, index) of the first differing upper-level block
    hash_file_short: bool  # the stored tree ends before the geometry says it should


class _Comparator:
    """A tree block sink comparing computed blocks with the stored ones (level 0 digest by digest)."""

    def __init__(self, fd: int, layout: TreeGeometry, limit: int) -> None:
        self.fd = fd
        self.layout = layout
        self.limit = limit  # data blocks actually hashed
        self.stored_size = os.lseek(fd, 0, os.SEEK_END)
        self.first_bad: int | None = None
        self.bad = 0
        self.first_bad_upper: tuple[int, int] | None = None

    def __call__(self, level: int, index: int, blocks: bytes) -> None:
        g = self.layout
        hbs = g.hash_block_size
        stored = os.pread(self.fd, len(blocks), (g.level_starts[level] + index) * hbs)
        if stored == blocks:
            return
        if level > 0:
            if self.first_bad_upper is None:
                self.first_bad_upper = (level, index)
            return
        esize = g.entry_size
        per = g.hashes_per_block
        for i in range(len(blocks) // hbs):
            mine = blocks[i * hbs : (i + 1) * hbs]
            theirs = stored[i * hbs : (i + 1) * hbs]
            if mine == theirs:
                continue
            for j in range(per):
                block_no = (index + i) * per + j
                if block_no >= self.limit:
                    break
                if mine[j * esize : (j + 1) * esize] != theirs[j * esize : (j + 1) * esize]:
                    self.bad += 1
                    if self.first_bad is None:
                        self.first_bad = block_no


def compare_tree(
    data_path: str | os.PathLike[str],
    hash_path: str | os.PathLike[str],
    *,
    salt: bytes,
    data_blocks: int,
    algorithm: str = "sha256",
    hash_type: int = 1,
    data_block_size: int = DEFAULT_BLOCK_SIZE,
    hash_block_size: int = DEFAULT_BLOCK_SIZE,
    hash_offset: int = 0,
    superblock: bool = True,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> TreeComparison:
    """Recompute the tree of the first ``data_blocks`` blocks of ``data_path`` and compare every block with
    the tree stored in ``hash_path`` (laid out for ``data_blocks``). A data file shorter than that is
    compared as far as it goes; its missing blocks count as differing."""
    dpath = os.fspath(data_path)
    available = _data_size(dpath) // data_block_size
    hashed = min(available, data_blocks)
    layout = tree_geometry(
        data_blocks,
        digest_size=digest_size(algorithm),
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        hash_type=hash_type,
        hash_offset=hash_offset,
        superblock=superblock,
    )
    hpath = os.fspath(hash_path)
    try:
        fd = os.open(hpath, os.O_RDONLY)
    except OSError as exc:
        raise VerityInputError(f"cannot open hash file: {exc.strerror}", path=hpath) from exc
    try:
        cmp = _Comparator(fd, layout, hashed)
        computed: bytes | None = None
        if hashed:
            spec, geometry, _ = _prepare(
                dpath,
                salt=salt,
                algorithm=algorithm,
                hash_type=hash_type,
                data_block_size=data_block_size,
                hash_block_size=hash_block_size,
                data_blocks=hashed,
                hash_offset=hash_offset,
                superblock=superblock,
            )
            nworkers = workers or default_workers()
            if hashed == data_blocks:
                computed = _build(spec, geometry, workers=nworkers, sink=cmp, progress=progress)
            else:
                # Short data: compare the leaves that exist; upper levels and root are meaningless.
                plan = _plan(geometry, nworkers)
                done = 0
                for (start, count), (blocks, _) in zip(plan, _results(spec, plan, nworkers), strict=True):
                    cmp(0, start // geometry.hashes_per_block, blocks)
                    done += count
                    if progress:
                        progress(done, data_blocks)
        stored_root: bytes | None = None
        if layout.levels and cmp.stored_size >= layout.hash_end:
            top = os.pread(fd, hash_block_size, layout.tree_start * hash_block_size)
            stored_root = block_digest(algorithm, hash_type, salt, top)
    except OSError as exc:
        raise VerityInputError(f"cannot read hash file: {exc.strerror}", path=hpath) from exc
    finally:
        os.close(fd)
    first_bad = cmp.first_bad
    bad = cmp.bad
    if hashed < data_blocks:
        bad += data_blocks - hashed
        first_bad = hashed if first_bad is None else first_bad
    return TreeComparison(
        root_hash=computed,
        stored_root_hash=stored_root,
        data_blocks=data_blocks,
        available_blocks=available,
        first_bad_data_block=first_bad,
        bad_data_blocks=bad,
        first_bad_hash_block=cmp.first_bad_upper,
        hash_file_short=cmp.stored_size < layout.hash_end,
    )


# ----------------------------------------------------------------------------------- image vs commitment


@dataclass(frozen=True)
class VerifyOutcome:
    report: Report
    computed_root: bytes | None  # None when the image is shorter than the committed data blocks
    first_bad_data_block: int | None  # known when a hash file was compared, or the image is short

    @property
    def ok(self) -> bool:
        return self.report.ok


def _check_superblock(report: Report, c: Commitment, hash_path: str) -> None:
    try:
        sb = read_superblock(hash_path, c.hash_offset)
    except TmbError as exc:
        report.add("verity.superblock_invalid", exc.message, path=hash_path, offset=c.hash_offset)
        return
    expected = {
        "hash_type": c.hash_type,
        "algorithm": c.algorithm,
        "salt": c.salt_hex,
        "data_blocks": c.data_blocks,
        "data_block_size": c.data_block_size,
        "hash_block_size": c.hash_block_size,
    }
    got = {
        "hash_type": sb.hash_type,
        "algorithm": sb.algorithm,
        "salt": salt_hex(sb.salt),
        "data_blocks": sb.data_blocks,
        "data_block_size": sb.data_block_size,
        "hash_block_size": sb.hash_block_size,
    }
    for key, want in expected.items():
        if got[key] != want:
            report.add(
                "verity.superblock_mismatch",
                f"hash file superblock {key} differs from the commitment",
                field=key,
                expected=want,
                got=got[key],
            )
    if c.verity_uuid and sb.uuid != c.verity_uuid:
        report.add(
            "verity.superblock_uuid_mismatch",
            "hash file superblock UUID differs from the commitment (it does not affect the root hash)",
            severity=Severity.WARNING,
            expected=c.verity_uuid,
            got=sb.uuid,
        )


def verify_image(
    image_path: str | os.PathLike[str],
    commitment: Commitment,
    *,
    hash_path: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> VerifyOutcome:
    """Recompute the image's tree with the commitment's parameters and report every difference.

    Without ``hash_path`` a root mismatch can only be reported with the size and block counts; with it, the
    recomputed level 0 is compared digest by digest with the stored one, which names the first differing
    data block, and the stored tree itself is checked against the committed root.
    """
    c = commitment
    image = os.fspath(image_path)
    report = Report()
    size = _data_size(image)
    available = size // c.data_block_size
    if size != c.image_size:
        report.add(
            "verity.image_size_mismatch",
            "image size differs from the commitment",
            expected=c.image_size,
            got=size,
            expected_blocks=c.data_blocks,
            got_blocks=available,
        )
    if available < c.data_blocks:
        report.add(
            "verity.image_truncated",
            "image holds fewer data blocks than committed",
            expected_blocks=c.data_blocks,
            got_blocks=available,
        )
    computed: bytes | None = None
    first_bad: int | None = None
    if hash_path is not None:
        hpath = os.fspath(hash_path)
        if c.superblock:
            _check_superblock(report, c, hpath)
        cmp = compare_tree(
            image,
            hpath,
            data_blocks=c.data_blocks,
            hash_offset=c.hash_offset,
            superblock=c.superblock,
            salt=c.salt,
            algorithm=c.algorithm,
            hash_type=c.hash_type,
            data_block_size=c.data_block_size,
            hash_block_size=c.hash_block_size,
            workers=workers,
            progress=progress,
        )
        computed = cmp.root_hash
        first_bad = cmp.first_bad_data_block
        if cmp.hash_file_short:
            report.add("verity.hash_file_truncated", "hash file ends before the end of the tree", path=hpath)
        if cmp.stored_root_hash is not None and cmp.stored_root_hash != c.root_hash:
            report.add(
                "verity.hash_tree_root_mismatch",
                "the stored hash tree does not lead to the committed root hash",
                expected=c.root_hex,
                got=cmp.stored_root_hash.hex(),
            )
        if cmp.first_bad_hash_block is not None:
            level, index = cmp.first_bad_hash_block
            report.add(
                "verity.hash_tree_mismatch",
                "a stored hash block differs from the one recomputed from the image",
                level=level,
                block=index,
            )
        if first_bad is not None:
            report.add(
                "verity.block_mismatch",
                f"data block {first_bad} differs from the stored hash tree",
                first_block=first_bad,
                blocks=cmp.bad_data_blocks,
                offset=first_bad * c.data_block_size,
            )
    elif available >= c.data_blocks:
        computed = root_hash(
            image,
            salt=c.salt,
            algorithm=c.algorithm,
            hash_type=c.hash_type,
            data_block_size=c.data_block_size,
            hash_block_size=c.hash_block_size,
            data_blocks=c.data_blocks,
            workers=workers,
            progress=progress,
        )
    else:
        first_bad = available
    if computed is not None and computed != c.root_hash:
        report.add(
            "verity.root_mismatch",
            "image root hash differs from the commitment",
            expected=c.root_hex,
            got=computed.hex(),
            data_blocks=c.data_blocks,
            image_size=size,
        )
    return VerifyOutcome(report=report, computed_root=computed, first_bad_data_block=first_bad)
