"""The hash tree against the real ``veritysetup format`` (cryptsetup-bin), byte for byte.

veritysetup formats plain files without root. It is a hard requirement of the suite (`make deps` installs
it): a missing binary fails these tests, it does not skip them.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tmb.verity import format_tree, read_superblock, root_hash

UUID = "12345678-1234-1234-1234-123456789abc"


def veritysetup() -> str:
    found = shutil.which("veritysetup") or shutil.which("veritysetup", path="/usr/sbin:/sbin")
    if not found:
        pytest.fail("veritysetup not found: install cryptsetup-bin (make deps)")
    return found


def run_veritysetup(data: Path, hash_file: Path, *args: str) -> str:
    proc = subprocess.run(
        [veritysetup(), "format", str(data), str(hash_file), "--uuid", UUID, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"^Root hash:\s+([0-9a-f]+)$", proc.stdout, re.M)
    assert match, proc.stdout
    return match.group(1)


def write_data(path: Path, size: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, 1 << 20)
            fh.write(rng.randbytes(n))
            left -= n
    return path


def salt_arg(salt: bytes) -> str:
    return salt.hex() if salt else "-"


def check_same(tmp_path: Path, data: Path, salt: bytes, *vs_args: str, **kwargs: object) -> None:
    ref = tmp_path / "ref.hash"
    ref.unlink(missing_ok=True)
    expected = run_veritysetup(data, ref, "--salt", salt_arg(salt), *vs_args)
    mine = tmp_path / "tmb.hash"
    result = format_tree(data, mine, salt, UUID, **kwargs)  # type: ignore[arg-type]
    assert result.root_hex == expected
    assert mine.read_bytes() == ref.read_bytes()
    kw = {
        k: v
        for k, v in kwargs.items()
        if k in ("algorithm", "hash_type", "data_block_size", "hash_block_size")
    }
    assert root_hash(data, salt=salt, **kw).hex() == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("blocks", "tail"),
    [(1, 0), (2, 0), (128, 0), (129, 0), (300, 0), (1, 904), (129, 1), (3, 4095)],
    ids=["1", "2", "128", "129", "300", "1+904B", "129+1B", "3+4095B"],
)
@pytest.mark.parametrize(
    "salt", [b"", bytes.fromhex("00112233"), bytes(range(32))], ids=["none", "4B", "32B"]
)
def test_sha256_matches_veritysetup(tmp_path: Path, blocks: int, tail: int, salt: bytes) -> None:
    data = write_data(tmp_path / "data", blocks * 4096 + tail, seed=blocks + tail)
    check_same(tmp_path, data, salt)


@pytest.mark.parametrize("blocks", [16384, 16385], ids=["16384", "16385"])
def test_large_files_match_veritysetup(tmp_path: Path, blocks: int) -> None:
    """64 MiB: three levels at 16385 blocks, and big enough for the parallel (multi-process) path."""
    data = write_data(tmp_path / "data", blocks * 4096, seed=blocks)
    check_same(tmp_path, data, os.urandom(32))


def test_tail_is_ignored_like_veritysetup(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", 3 * 4096 + 100)
    result = format_tree(data, None, b"\x01")
    assert result.data_blocks == 3 and result.ignored_tail_bytes == 100
    whole = tmp_path / "whole"
    whole.write_bytes(data.read_bytes()[: 3 * 4096])
    assert root_hash(whole, salt=b"\x01") == result.root_hash
    changed = tmp_path / "changed"
    changed.write_bytes(data.read_bytes()[: 3 * 4096] + b"\xff" * 100)
    assert root_hash(changed, salt=b"\x01") == result.root_hash


def test_smaller_than_a_block_is_refused_by_both(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", 100)
    proc = subprocess.run(
        [veritysetup(), "format", str(data), str(tmp_path / "h"), "--salt", "-"], capture_output=True
    )
    assert proc.returncode != 0
    from tmb.verity import VerityInputError

    with pytest.raises(VerityInputError, match="smaller than one 4096-byte block"):
        format_tree(data, tmp_path / "mine", b"")
    assert not (tmp_path / "mine").exists()


@pytest.mark.parametrize(
    "algorithm", ["sha1", "sha224", "sha384", "sha512", "sha3-256", "sha3-512", "blake2b-512", "blake2s-256"]
)
@pytest.mark.parametrize("blocks", [1, 129, 4100])
def test_other_algorithms(tmp_path: Path, algorithm: str, blocks: int) -> None:
    data = write_data(tmp_path / "data", blocks * 4096, seed=blocks)
    check_same(tmp_path, data, b"\xab\xcd", "--hash", algorithm, algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["sha256", "sha1", "sha384"])
def test_chrome_os_format_0(tmp_path: Path, algorithm: str) -> None:
    data = write_data(tmp_path / "data", 300 * 4096)
    check_same(
        tmp_path, data, b"\x01\x02", "--format", "0", "--hash", algorithm, algorithm=algorithm, hash_type=0
    )


def test_longest_salt(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", 130 * 4096)
    check_same(tmp_path, data, bytes(range(256)))


@pytest.mark.parametrize(("dbs", "hbs"), [(512, 512), (1024, 4096), (4096, 1024), (8192, 8192)])
def test_other_block_sizes(tmp_path: Path, dbs: int, hbs: int) -> None:
    data = write_data(tmp_path / "data", 200 * 8192 + 300)
    args = ("--data-block-size", str(dbs), "--hash-block-size", str(hbs))
    check_same(tmp_path, data, b"\x42", *args, data_block_size=dbs, hash_block_size=hbs)


def test_no_superblock(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", 200 * 4096)
    check_same(tmp_path, data, b"\x07", "--no-superblock", superblock=False)


def test_single_block_no_superblock_writes_empty_hash_file(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", 4096)
    check_same(tmp_path, data, b"\x07", "--no-superblock", superblock=False)
    assert (tmp_path / "tmb.hash").stat().st_size == 0


def test_tree_appended_to_the_data_file(tmp_path: Path) -> None:
    """veritysetup format IMG IMG --hash-offset=<end of data>: superblock and tree after the data."""
    original = write_data(tmp_path / "data", 130 * 4096).read_bytes()
    ref = tmp_path / "ref.img"
    ref.write_bytes(original)
    offset = str(130 * 4096)
    proc = subprocess.run(
        [
            veritysetup(),
            "format",
            str(ref),
            str(ref),
            "--hash-offset",
            offset,
            "--salt",
            "ab",
            "--uuid",
            UUID,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    mine = tmp_path / "mine.img"
    mine.write_bytes(original)
    result = format_tree(mine, mine, b"\xab", UUID, hash_offset=130 * 4096, data_blocks=130)
    assert result.root_hex in proc.stdout
    assert mine.read_bytes() == ref.read_bytes()
    sb = read_superblock(mine, 130 * 4096)
    assert sb.data_blocks == 130 and sb.salt == b"\xab" and sb.uuid == UUID


def test_superblock_fields(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", 129 * 4096)
    result = format_tree(data, tmp_path / "h", b"\x00\x11\x22\x33", UUID)
    raw = (tmp_path / "h").read_bytes()
    assert raw[:8] == b"verity\x00\x00"
    assert raw[8:16] == b"\x01\x00\x00\x00\x01\x00\x00\x00"  # version 1, hash type 1
    assert raw[16:32] == bytes.fromhex(UUID.replace("-", ""))
    assert raw[32:64] == b"sha256".ljust(32, b"\x00")
    assert raw[64:72] == (4096).to_bytes(4, "little") * 2
    assert raw[72:80] == (129).to_bytes(8, "little")
    assert raw[80:82] == (4).to_bytes(2, "little")
    assert raw[88:92] == b"\x00\x11\x22\x33"
    assert raw[92:4096] == bytes(4096 - 92)
    assert result.tree_offset == 4096 and result.hash_blocks == 3 and result.levels == 2
    assert len(raw) == result.hash_device_size == 4 * 4096
