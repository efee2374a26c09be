"""dm-verity hash trees, byte-identical to ``veritysetup format`` (cryptsetup, hash format 1).

Layout (see docs/commitment.md for the full description):

* the data is cut into ``data_block_size`` blocks; a trailing partial block is **ignored**, exactly as
  ``veritysetup`` does (``data_blocks = size // data_block_size``), and reported in
  :attr:`VerityResult.ignored_tail_bytes`;
* level 0 holds one digest per data block, ``H(salt || block)`` (format 1; format 0, Chrome OS, hashes
  ``H(block || salt)``); each digest sits in a slot of the next power of two bytes (format 1), slots are
  packed ``2**floor(log2(hash_block_size / digest_size))`` to a hash block, the rest of the block is zero;
* each upper level hashes the blocks of the level below the same way, until one block remains;
* levels are stored top first, after a 512-byte superblock padded to a whole hash block (unless
  ``superblock=False``), starting at ``hash_offset`` on the hash device;
* the root hash is ``H(salt || top block)``; with a single data block there is no tree and the root is the
  digest of that block.

Hashing is split in chunks hashed by worker processes (one per available core), each streaming its chunk
through a small buffer, so no file is ever held in memory, and returning its level-0 blocks with their
level-1 digests; the parent writes level 0 as chunks come back, in order, and builds the upper levels on the
fly (1/16384 of the work), holding one partial block per level.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import stat
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass

from tmb.verity.errors import VerityError, VerityInputError
from tmb.verity.layout import (
    ALGORITHMS,
    DEFAULT_BLOCK_SIZE,
    Superblock,
    TreeGeometry,
    VerityNumbers,
    canonical_algorithm,
    check_block_size,
    check_salt,
    parse_uuid,
    tree_geometry,
)

ProgressFn = Callable[[int, int], None]
"""``progress(done_data_blocks, total_data_blocks)``, called from the calling thread."""

_READ_BYTES = 4 << 20  # per read in a worker
_MAX_CHUNK_BYTES = 64 << 20  # per task
_MIN_CHUNK_BYTES = 4 << 20
_PARALLEL_MIN_BYTES = 16 << 20  # below this, hash in-process (process start-up would dominate)


# ------------------------------------------------------------------------------------------------ hashing


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs to hash a range of data blocks (small and picklable)."""

    path: str
    hashlib_name: str
    hash_type: int
    salt: bytes
    data_block_size: int
    hash_block_size: int
    hashes_per_block: int
    entry_size: int


def _open_read(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise VerityInputError(f"cannot open data file: {exc.strerror}", path=path) from exc


def _hash_range(spec: _Spec, start: int, count: int) -> tuple[bytes, bytes]:
    """Hash data blocks ``[start, start + count)``.

    Returns the level-0 hash blocks for them (``start`` is a multiple of ``hashes_per_block``; the last block
    is zero padded) and the slot-padded digests of those hash blocks, i.e. their entries in level 1.
    """
    dbs = spec.data_block_size
    salt = spec.salt
    pad = bytes(spec.entry_size - len(hashlib.new(spec.hashlib_name).digest()))
    base = hashlib.new(spec.hashlib_name, salt if spec.hash_type == 1 else b"")
    per_read = max(_READ_BYTES // dbs, 1) * dbs
    buf = bytearray(min(per_read, count * dbs))
    view = memoryview(buf)
    entries = bytearray()
    fd = _open_read(spec.path)
    try:
        pos = start * dbs
        end = (start + count) * dbs
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, pos, end - pos, os.POSIX_FADV_SEQUENTIAL)
        while pos < end:
            want = min(per_read, end - pos)
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:want]], pos + got)
                if n <= 0:
                    raise VerityInputError("data file shrank while it was being hashed", path=spec.path)
                got += n
            copy = base.copy
            if spec.hash_type == 1:
                for off in range(0, want, dbs):
                    h = copy()
                    h.update(view[off : off + dbs])
                    entries += h.digest()
                    if pad:
                        entries += pad
            else:
                for off in range(0, want, dbs):
                    h = copy()
                    h.update(view[off : off + dbs])
                    h.update(salt)
                    entries += h.digest()
                    if pad:
                        entries += pad
            pos += want
    except OSError as exc:
        raise VerityInputError(f"cannot read data file: {exc.strerror}", path=spec.path) from exc
    finally:
        os.close(fd)
    blocks = _pack_blocks(spec, bytes(entries))
    upper = bytearray()
    hbs = spec.hash_block_size
    for off in range(0, len(blocks), hbs):
        upper += _entry(spec, blocks[off : off + hbs])
    return blocks, bytes(upper)


def _pack_blocks(spec: _Spec, entries: bytes) -> bytes:
    """Group digest slots into zero-padded hash blocks."""
    per = spec.hashes_per_block * spec.entry_size
    hbs = spec.hash_block_size
    if per == hbs and len(entries) % hbs == 0:
        return entries
    out = bytearray()
    for off in range(0, len(entries), per):
        part = entries[off : off + per]
        out += part
        out += bytes(hbs - len(part))
    return bytes(out)


def _digest(spec: _Spec, block: bytes | memoryview) -> bytes:
    if spec.hash_type == 1:
        h = hashlib.new(spec.hashlib_name, spec.salt)
        h.update(block)
    else:
        h = hashlib.new(spec.hashlib_name, block)
        h.update(spec.salt)
    return h.digest()


def _entry(spec: _Spec, block: bytes | memoryview) -> bytes:
    d = _digest(spec, block)
    return d + bytes(spec.entry_size - len(d))


BlockSink = Callable[[int, int, bytes], None]
"""``sink(level, first_block_index_in_level, blocks)``: receives every tree block once, in order per level."""


class _UpperLevels:
    """Builds levels 1.. as the level-1 entries stream in, emitting each block once it is full."""

    def __init__(self, spec: _Spec, geometry: TreeGeometry, sink: BlockSink | None) -> None:
        self.spec = spec
        self.geometry = geometry
        self.sink = sink
        self.pending = [bytearray() for _ in range(geometry.levels + 1)]
        self.emitted = [0] * (geometry.levels + 1)
        self.block_bytes = geometry.hashes_per_block * geometry.entry_size

    def push(self, level: int, entries: bytes) -> None:
        buf = self.pending[level]
        buf += entries
        if level == self.geometry.levels:
            return
        while len(buf) >= self.block_bytes:
            block = bytes(buf[: self.block_bytes])
            del buf[: self.block_bytes]
            self._emit(level, block)

    def _emit(self, level: int, part: bytes) -> None:
        block = part + bytes(self.geometry.hash_block_size - len(part))
        if self.sink is not None:
            self.sink(level, self.emitted[level], block)
        self.emitted[level] += 1
        self.push(level + 1, _entry(self.spec, block))

    def finish(self) -> bytes:
        top = self.geometry.levels
        for level in range(1, top):
            if self.pending[level]:
                self._emit(level, bytes(self.pending[level]))
                self.pending[level].clear()
        for level in range(1, top):
            if self.emitted[level] != self.geometry.level_sizes[level]:  # pragma: no cover - internal check
                raise VerityError(f"internal error: level {level} has {self.emitted[level]} blocks")
        root = bytes(self.pending[top])
        if len(root) != self.geometry.entry_size:  # pragma: no cover - internal check
            raise VerityError("internal error: the top level is not one block")
        return root[: self.geometry.digest_size]


def default_workers() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _plan(geometry: TreeGeometry, workers: int) -> list[tuple[int, int]]:
    unit = geometry.hashes_per_block
    dbs = geometry.data_block_size
    total = geometry.data_blocks
    most = max(_MAX_CHUNK_BYTES // dbs // unit, 1) * unit
    least = max(_MIN_CHUNK_BYTES // dbs // unit, 1) * unit
    want = -(-total // max(workers * 4, 1))
    chunk = min(max(-(-want // unit) * unit, least), most)
    return [(s, min(chunk, total - s)) for s in range(0, total, chunk)]


def _mp_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    # fork is cheapest and needs no importable __main__, but is unsafe once other threads exist.
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _results(spec: _Spec, plan: list[tuple[int, int]], workers: int) -> Iterator[tuple[bytes, bytes]]:
    total_bytes = sum(c for _, c in plan) * spec.data_block_size
    if workers <= 1 or len(plan) <= 1 or total_bytes < _PARALLEL_MIN_BYTES:
        for start, count in plan:
            yield _hash_range(spec, start, count)
        return
    executor: Executor = ProcessPoolExecutor(max_workers=min(workers, len(plan)), mp_context=_mp_context())
    try:
        yield from executor.map(_hash_range, [spec] * len(plan), [s for s, _ in plan], [c for _, c in plan])
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _build(
    spec: _Spec,
    geometry: TreeGeometry,
    *,
    workers: int,
    sink: BlockSink | None,
    progress: ProgressFn | None,
) -> bytes:
    """Hash everything, feeding tree blocks to ``sink``; returns the root hash."""
    if geometry.levels == 0:
        fd = _open_read(spec.path)
        try:
            block = os.pread(fd, spec.data_block_size, 0)
        except OSError as exc:
            raise VerityInputError(f"cannot read data file: {exc.strerror}", path=spec.path) from exc
        finally:
            os.close(fd)
        if len(block) != spec.data_block_size:
            raise VerityInputError("data file shrank while it was being hashed", path=spec.path)
        if progress:
            progress(1, 1)
        return _digest(spec, block)
    upper = _UpperLevels(spec, geometry, sink)
    plan = _plan(geometry, workers)
    done = 0
    for (start, count), (blocks, entries) in zip(plan, _results(spec, plan, workers), strict=True):
        if sink is not None:
            sink(0, start // geometry.hashes_per_block, blocks)
        upper.push(1, entries)
        done += count
        if progress:
            progress(done, geometry.data_blocks)
    return upper.finish()


# ------------------------------------------------------------------------------------------------- public


@dataclass(frozen=True)
class VerityResult(VerityNumbers):
    """What ``veritysetup format`` reports, plus where things went."""

    root_hash: bytes
    algorithm: str
    hash_type: int
    salt: bytes
    uuid: str | None  # None when no superblock was written
    data_blocks: int
    data_block_size: int
    hash_block_size: int
    hash_blocks: int  # tree blocks, superblock excluded
    levels: int
    hash_offset: int  # byte offset of the superblock (or of the tree without one) on the hash device
    tree_offset: int  # byte offset of the first (top) tree block
    superblock: bool
    hash_device_size: int  # bytes from offset 0 of the hash device to the end of the tree
    hash_path: str | None  # None: the tree was computed, not written
    data_size: int  # bytes in the data file
    ignored_tail_bytes: int  # trailing bytes past the last whole data block, not covered by the tree


def _data_size(path: str) -> int:
    try:
        mode = os.stat(path).st_mode  # before opening: opening a FIFO would block
    except OSError as exc:
        raise VerityInputError(f"cannot open data file: {exc.strerror}", path=path) from exc
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise VerityInputError("data is not a regular file or block device", path=path)
    fd = _open_read(path)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise VerityInputError("data is not a regular file or block device", path=path)
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _prepare(
    data_path: str | os.PathLike[str],
    *,
    salt: bytes,
    algorithm: str,
    hash_type: int,
    data_block_size: int,
    hash_block_size: int,
    data_blocks: int | None,
    hash_offset: int,
    superblock: bool,
) -> tuple[_Spec, TreeGeometry, int]:
    path = os.fspath(data_path)
    name = canonical_algorithm(algorithm)
    check_salt(salt)
    check_block_size("data block size", data_block_size)
    size = _data_size(path)
    available = size // data_block_size
    if data_blocks is None:
        data_blocks = available
        if data_blocks == 0:
            raise VerityInputError(
                f"data file is {size} bytes, smaller than one {data_block_size}-byte block", path=path
            )
    elif data_blocks < 1 or data_blocks > available:
        raise VerityInputError(
            f"{data_blocks} data blocks requested but the file holds {available}", path=path, size=size
        )
    hashlib_name = ALGORITHMS[name]
    geometry = tree_geometry(
        data_blocks,
        digest_size=hashlib.new(hashlib_name).digest_size,
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        hash_type=hash_type,
        hash_offset=hash_offset,
        superblock=superblock,
    )
    spec = _Spec(
        path=path,
        hashlib_name=hashlib_name,
        hash_type=hash_type,
        salt=bytes(salt),
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        hashes_per_block=geometry.hashes_per_block,
        entry_size=geometry.entry_size,
    )
    return spec, geometry, size


def root_hash(
    path: str | os.PathLike[str],
    *,
    salt: bytes,
    algorithm: str = "sha256",
    hash_type: int = 1,
    data_block_size: int = DEFAULT_BLOCK_SIZE,
    hash_block_size: int = DEFAULT_BLOCK_SIZE,
    data_blocks: int | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> bytes:
    """The dm-verity root hash of a file (``veritysetup format`` prints the same value). Writes nothing."""
    spec, geometry, _ = _prepare(
        path,
        salt=salt,
        algorithm=algorithm,
        hash_type=hash_type,
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        data_blocks=data_blocks,
        hash_offset=0,
        superblock=False,
    )
    return _build(spec, geometry, workers=workers or default_workers(), sink=None, progress=progress)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def format_tree(
    data_path: str | os.PathLike[str],
    hash_path: str | os.PathLike[str] | None,
    salt: bytes,
    uuid: str | None = None,
    *,
    algorithm: str = "sha256",
    hash_type: int = 1,
    data_block_size: int = DEFAULT_BLOCK_SIZE,
    hash_block_size: int = DEFAULT_BLOCK_SIZE,
    data_blocks: int | None = None,
    hash_offset: int = 0,
    superblock: bool = True,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> VerityResult:
    """Build the hash tree of ``data_path`` like ``veritysetup format DATA HASH``.

    ``hash_path=None`` computes without writing. A new (or replaced) hash file is written under a temporary
    name and renamed into place when complete; the hash file is written in place when it is the data file
    itself (tree appended after the data, ``hash_offset`` past its end), a block device, or an existing file
    with ``hash_offset > 0`` (what precedes the offset is kept). ``uuid=None`` picks a random one, as
    veritysetup does.
    """
    spec, geometry, size = _prepare(
        data_path,
        salt=salt,
        algorithm=algorithm,
        hash_type=hash_type,
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        data_blocks=data_blocks,
        hash_offset=hash_offset,
        superblock=superblock,
    )
    uuid_str = (parse_uuid(uuid) if uuid else str(uuidlib.uuid4())) if superblock else None
    name = canonical_algorithm(algorithm)
    nworkers = workers or default_workers()
    result_path: str | None = None
    if hash_path is None:
        root = _build(spec, geometry, workers=nworkers, sink=None, progress=progress)
    else:
        result_path = os.fspath(hash_path)
        header = b""
        if superblock:
            assert uuid_str is not None  # noqa: S101 (set with superblock)
            header = Superblock(
                uuid=uuid_str,
                algorithm=name,
                salt=spec.salt,
                data_blocks=geometry.data_blocks,
                data_block_size=data_block_size,
                hash_block_size=hash_block_size,
                hash_type=hash_type,
            ).pack()
        root = _write_tree(spec, geometry, result_path, header, hash_offset, nworkers, progress)
    return VerityResult(
        root_hash=root,
        algorithm=name,
        hash_type=hash_type,
        salt=spec.salt,
        uuid=uuid_str,
        data_blocks=geometry.data_blocks,
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        hash_blocks=geometry.hash_blocks,
        levels=geometry.levels,
        hash_offset=hash_offset,
        tree_offset=geometry.tree_start * hash_block_size,
        superblock=superblock,
        hash_device_size=geometry.hash_end,
        hash_path=result_path,
        data_size=size,
        ignored_tail_bytes=size - geometry.data_blocks * data_block_size,
    )


def _in_place(spec: _Spec, geometry: TreeGeometry, hash_path: str, hash_offset: int) -> bool:
    try:
        st = os.stat(hash_path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise VerityInputError(f"cannot access hash file: {exc.strerror}", path=hash_path) from exc
    if os.path.samefile(hash_path, spec.path):
        if hash_offset < geometry.data_blocks * geometry.data_block_size:
            raise VerityInputError(
                "hash area would overlap the data: put --hash-offset at or after the end of the data",
                path=hash_path,
                data_bytes=geometry.data_blocks * geometry.data_block_size,
            )
        return True
    if stat.S_ISBLK(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode):
        raise VerityInputError("hash file exists and is not a regular file or block device", path=hash_path)
    return hash_offset > 0


def _write_tree(
    spec: _Spec,
    geometry: TreeGeometry,
    hash_path: str,
    header: bytes,
    hash_offset: int,
    workers: int,
    progress: ProgressFn | None,
) -> bytes:
    hbs = geometry.hash_block_size
    in_place = _in_place(spec, geometry, hash_path, hash_offset)
    if in_place:
        target = hash_path
        flags = os.O_RDWR
    else:
        directory, base = os.path.split(os.path.abspath(hash_path))
        target = os.path.join(directory, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(target, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise VerityInputError(f"cannot create hash file: {exc.strerror}", path=hash_path) from exc
    ok = False
    try:

        def sink(level: int, index: int, blocks: bytes) -> None:
            _pwrite_all(fd, blocks, (geometry.level_starts[level] + index) * hbs)

        try:
            if header:
                _pwrite_all(fd, header, hash_offset)
            root = _build(spec, geometry, workers=workers, sink=sink, progress=progress)
            if os.fstat(fd).st_size < geometry.hash_end and stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, geometry.hash_end)
            os.fsync(fd)
        except OSError as exc:
            raise VerityError(f"cannot write hash file: {exc.strerror}", path=hash_path) from exc
        ok = True
    finally:
        os.close(fd)
        if not in_place and not ok:
            with contextlib.suppress(OSError):
                os.unlink(target)
    if not in_place:
        try:
            os.replace(target, hash_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise VerityError(f"cannot rename hash file into place: {exc.strerror}", path=hash_path) from exc
    return root
