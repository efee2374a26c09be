"""A reproducible EROFS image of a model directory.

The directory is first checked (no symlink leaving it, no special file, every file readable, at least one
file) and copied into a private staging tree that keeps only what the image should depend on: names, the
directory structure, file contents, symlink targets and one bit of permission (executable or not). Files get
mode 0644 or 0755 (0755 when any execute bit is set on the source), directories 0755, every timestamp the
fixed ``timestamp``; owners are forced to root by ``mkfs.erofs --all-root``. The copy is hashed (SHA-256) as
it is written, so the per-file digests describe exactly the bytes that went into the image.

``mkfs.erofs`` then runs with flags that leave nothing to chance (:func:`mkfs_args`): fixed UUID and
timestamp, all files owned by root, no extended attributes, no compression. The image is padded with zeros to
a whole number of 4096-byte blocks, so dm-verity covers every byte, and only renamed to its final name once
complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tmb.verity.errors import ModelTreeError, ToolError
from tmb.verity.layout import DEFAULT_BLOCK_SIZE, parse_uuid

FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755
_COPY_CHUNK = 1 << 20
_TOOL_PATH = os.pathsep.join(("/usr/sbin", "/sbin", "/usr/bin", "/bin"))
_VERSION_RE = re.compile(r"mkfs\.erofs(?:\s+\(erofs-utils\))?\s+v?(\d[\w.+~-]*)")

BytesProgress = Callable[[int], None]
"""``advance(nbytes)``: called (from worker threads) as file bytes are copied."""


@dataclass(frozen=True)
class FileEntry:
    """One entry of the normalised tree, as recorded in a commitment."""

    path: str  # relative, "/"-separated, UTF-8
    type: str  # "file", "dir" or "symlink"
    mode: int  # 0o644 / 0o755 (files), 0o755 (dirs), 0o777 (symlinks)
    size: int = 0  # bytes, files only
    sha256: str | None = None  # hex, files only
    target: str | None = None  # symlinks only


@dataclass(frozen=True)
class _Source:
    rel: str
    type: str
    src: str
    mode: int
    size: int = 0
    target: str | None = None


@dataclass(frozen=True)
class ImageResult:
    path: str
    size: int  # bytes, a multiple of 4096
    files: tuple[FileEntry, ...]
    mkfs_version: str
    mkfs_args: tuple[str, ...]  # the flags that fix the output, without the paths
    uuid: str
    timestamp: int


# ------------------------------------------------------------------------------------------------- scan


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file, directory or symlink"


def scan_model_dir(model_dir: str | os.PathLike[str], *, dereference: bool = False) -> list[_Source]:
    """Check a model directory and list what the image will hold, sorted by name (bytewise) per directory.

    ``dereference=True`` replaces symlinks to files by a copy of the file they point to, wherever it is
    (a Hugging Face cache snapshot links every file into ``../../blobs``); otherwise a symlink must be
    relative and resolve inside the directory, and it is kept as a symlink.
    """
    root = os.fspath(model_dir)
    if not os.path.isdir(root):
        raise ModelTreeError("model directory does not exist or is not a directory", path=root)
    root_real = os.path.realpath(root)
    out: list[_Source] = []
    _walk(root, "", root_real, dereference, out)
    if not any(e.type == "file" for e in out):
        raise ModelTreeError(
            "model directory contains no files", path=root, hint="an empty image commits to nothing"
        )
    return out


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def check_output_outside(model_dir: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Refuse an output (file or directory) inside the model directory: it would end up in the image."""
    if _inside(os.path.realpath(output), os.path.realpath(model_dir)):
        raise ModelTreeError(
            "the output would be inside the model directory",
            path=os.fspath(output),
            model_dir=os.fspath(model_dir),
            hint="write the image and commitment somewhere else",
        )


def _walk(directory: str, prefix: str, root_real: str, dereference: bool, out: list[_Source]) -> None:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError as exc:
        raise ModelTreeError(f"cannot list directory: {exc.strerror}", path=directory) from exc
    for entry in entries:
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ModelTreeError("file name is not valid UTF-8", path=entry.path) from None
        rel = prefix + entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            raise ModelTreeError(f"cannot stat: {exc.strerror}", path=entry.path) from exc
        if stat.S_ISLNK(st.st_mode):
            out.append(_symlink(entry.path, rel, root_real, dereference))
        elif stat.S_ISDIR(st.st_mode):
            out.append(_Source(rel, "dir", entry.path, DIR_MODE))
            _walk(entry.path, rel + "/", root_real, dereference, out)
        elif stat.S_ISREG(st.st_mode):
            mode = EXEC_MODE if st.st_mode & 0o111 else FILE_MODE
            out.append(_Source(rel, "file", entry.path, mode, st.st_size))
        else:
            raise ModelTreeError(
                f"special file in the model directory: {_kind(st.st_mode)}",
                path=entry.path,
                hint="only regular files, directories and symlinks can go into a model image",
            )


def _symlink(path: str, rel: str, root_real: str, dereference: bool) -> _Source:
    target = os.readlink(path)
    resolved = os.path.realpath(path)
    exists = os.path.exists(path)
    if dereference:
        if not exists:
            raise ModelTreeError("dangling symlink", path=path, target=target)
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ModelTreeError(
                "--dereference copies symlinks to files only; this one points to something else",
                path=path,
                target=target,
            )
        mode = EXEC_MODE if st.st_mode & 0o111 else FILE_MODE
        return _Source(rel, "file", resolved, mode, st.st_size)
    hint = "copy the target into the directory, or use --dereference to store the content it points to"
    if os.path.isabs(target):
        raise ModelTreeError("absolute symlink in the model directory", path=path, target=target, hint=hint)
    if not _inside(resolved, root_real):
        raise ModelTreeError(
            "symlink points outside the model directory", path=path, target=target, hint=hint
        )
    if not exists:
        raise ModelTreeError("dangling symlink", path=path, target=target)
    return _Source(rel, "symlink", path, 0o777, target=target)


# ------------------------------------------------------------------------------------------------ stage


def _open_source(path: str) -> int:
    """Open a source file for reading (a seam for tests: root can read a mode-000 file).

    ``O_NOFOLLOW | O_NONBLOCK``: a file swapped for a symlink or a FIFO after the scan fails instead of
    leaking another file or blocking; :func:`_copy_file` then checks it is still a regular file.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags)


def _copy_file(src: _Source, dst: str, advance: BytesProgress | None) -> FileEntry:
    try:
        fd_in = _open_source(src.src)
    except OSError as exc:
        raise ModelTreeError(f"cannot read file: {exc.strerror}", path=src.src) from exc
    digest = hashlib.sha256()
    size = 0
    try:
        if not stat.S_ISREG(os.fstat(fd_in).st_mode):
            raise ModelTreeError("file changed type while the model was being copied", path=src.src)
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            buf = bytearray(_COPY_CHUNK)
            view = memoryview(buf)
            while True:
                try:
                    n = os.readv(fd_in, [buf])
                except OSError as exc:
                    raise ModelTreeError(f"cannot read file: {exc.strerror}", path=src.src) from exc
                if n == 0:
                    break
                chunk = view[:n]
                digest.update(chunk)
                while chunk:
                    w = os.write(fd_out, chunk)
                    chunk = chunk[w:]
                size += n
                if advance:
                    advance(n)
            os.fchmod(fd_out, src.mode)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return FileEntry(src.rel, "file", src.mode, size=size, sha256=digest.hexdigest())


def stage_tree(
    sources: list[_Source],
    staging: str,
    *,
    timestamp: int = 0,
    workers: int | None = None,
    advance: BytesProgress | None = None,
) -> tuple[FileEntry, ...]:
    """Copy the scanned tree, normalised, into the existing empty ``staging``; returns its entries."""
    entries: dict[str, FileEntry] = {}
    try:
        for s in sources:
            dst = os.path.join(staging, *s.rel.split("/"))
            if s.type == "dir":
                os.mkdir(dst, DIR_MODE)
                os.chmod(dst, DIR_MODE)
                entries[s.rel] = FileEntry(s.rel, "dir", DIR_MODE)
            elif s.type == "symlink":
                assert s.target is not None  # noqa: S101 (symlink sources carry a target)
                os.symlink(s.target, dst)
                entries[s.rel] = FileEntry(s.rel, "symlink", 0o777, target=s.target)
        files = [s for s in sources if s.type == "file"]
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            futures = {
                s.rel: pool.submit(_copy_file, s, os.path.join(staging, *s.rel.split("/")), advance)
                for s in files
            }
            for rel, fut in futures.items():
                entries[rel] = fut.result()
        # Timestamps last, deepest first, so creating children does not bump a directory again.
        for s in reversed(sources):
            os.utime(os.path.join(staging, *s.rel.split("/")), (timestamp, timestamp), follow_symlinks=False)
        os.chmod(staging, DIR_MODE)
        os.utime(staging, (timestamp, timestamp))
    except OSError as exc:
        raise ModelTreeError(
            f"cannot write the staging copy: {exc.strerror}", path=exc.filename or staging
        ) from exc
    return tuple(entries[s.rel] for s in sources)


# ------------------------------------------------------------------------------------------------- mkfs


def find_mkfs_erofs() -> str:
    found = shutil.which("mkfs.erofs") or shutil.which("mkfs.erofs", path=_TOOL_PATH)
    if not found:
        raise ToolError(
            "mkfs.erofs not found", hint="install erofs-utils (Debian/Ubuntu: apt-get install erofs-utils)"
        )
    return found


def mkfs_erofs_version(binary: str | None = None) -> str:
    """The erofs-utils version, e.g. ``1.5`` (1.5 has no --version but prints it after its usage text)."""
    binary = binary or find_mkfs_erofs()
    try:
        proc = subprocess.run(  # noqa: S603 (argv list, no shell)
            [binary, "--version"], capture_output=True, text=True, timeout=30, env=_tool_env(0), check=False
        )
    except OSError as exc:
        raise ToolError(f"cannot run mkfs.erofs: {exc.strerror}", path=binary) from exc
    match = _VERSION_RE.search(proc.stdout + "\n" + proc.stderr)
    if not match:
        raise ToolError("cannot tell the mkfs.erofs version", path=binary, output=proc.stdout[-200:])
    return match.group(1)


def mkfs_args(uuid: str, timestamp: int) -> tuple[str, ...]:
    """The flags that make ``mkfs.erofs`` output depend on the staged tree only."""
    return (
        "-x-1",  # no extended attributes (SELinux labels, ACLs of the build host)
        f"-T{timestamp}",  # every inode time and the superblock build time
        f"-U{uuid}",  # filesystem UUID (random otherwise)
        "--all-root",  # uid/gid 0
        "--quiet",
    )


def _tool_env(timestamp: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "") + os.pathsep + _TOOL_PATH,
        "LC_ALL": "C",
        "TZ": "UTC",
        "SOURCE_DATE_EPOCH": str(timestamp),
    }


def run_mkfs_erofs(tree: str, image: str, *, uuid: str, timestamp: int, binary: str | None = None) -> None:
    binary = binary or find_mkfs_erofs()
    cmd = [binary, *mkfs_args(uuid, timestamp), image, tree]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_tool_env(timestamp), check=False)  # noqa: S603 (argv list, no shell)
    except OSError as exc:
        raise ToolError(f"cannot run mkfs.erofs: {exc.strerror}", path=binary) from exc
    if proc.returncode != 0:
        raise ToolError(
            f"mkfs.erofs failed with exit status {proc.returncode}",
            command=" ".join(cmd),
            stderr=(proc.stderr or proc.stdout).strip()[-500:],
        )


def _pad(path: str, block: int) -> int:
    size = os.path.getsize(path)
    padded = -(-size // block) * block
    if padded != size:
        os.truncate(path, padded)
    return padded


def build_image(
    model_dir: str | os.PathLike[str],
    image_path: str | os.PathLike[str],
    *,
    uuid: str,
    timestamp: int = 0,
    dereference: bool = False,
    workers: int | None = None,
    advance: BytesProgress | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> ImageResult:
    """Build the image; ``image_path`` appears only when complete (staged next to it, then renamed).

    ``on_stage(name, total_bytes)`` is told when copying (``"copy"``) and ``mkfs.erofs`` (``"mkfs"``) start.
    """
    uuid = parse_uuid(uuid)
    if timestamp < 0:
        raise ModelTreeError("timestamp must be non-negative")
    final = os.fspath(image_path)
    check_output_outside(model_dir, final)
    binary = find_mkfs_erofs()
    version = mkfs_erofs_version(binary)
    sources = scan_model_dir(model_dir, dereference=dereference)
    out_dir = os.path.dirname(os.path.abspath(final))
    try:
        staging = tempfile.mkdtemp(prefix=".tmb-image-", dir=out_dir)
    except OSError as exc:
        raise ModelTreeError(f"cannot create a staging directory: {exc.strerror}", path=out_dir) from exc
    try:
        tree = os.path.join(staging, "tree")
        os.mkdir(tree)
        if on_stage:
            on_stage("copy", sum(s.size for s in sources if s.type == "file"))
        files = stage_tree(sources, tree, timestamp=timestamp, workers=workers, advance=advance)
        if on_stage:
            on_stage("mkfs", 0)
        tmp_image = os.path.join(staging, "image.erofs")
        run_mkfs_erofs(tree, tmp_image, uuid=uuid, timestamp=timestamp, binary=binary)
        size = _pad(tmp_image, DEFAULT_BLOCK_SIZE)
        os.chmod(tmp_image, 0o644)
        os.replace(tmp_image, final)
    except OSError as exc:
        raise ModelTreeError(f"cannot build the image: {exc.strerror}", path=exc.filename or final) from exc
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return ImageResult(
        path=final,
        size=size,
        files=files,
        mkfs_version=version,
        mkfs_args=mkfs_args(uuid, timestamp),
        uuid=uuid,
        timestamp=timestamp,
    )
