"""Hash tree internals: geometry, superblock, the parallel path, failure modes. (Byte-for-byte agreement
with veritysetup is in tests/integration/test_verity_veritysetup.py.)"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from tmb.verity import (
    Superblock,
    VerityInputError,
    format_tree,
    parse_salt,
    read_superblock,
    root_hash,
    tree_geometry,
)
from tmb.verity import tree as tree_mod
from tmb.verity.layout import block_digest, parse_uuid

UUID = "12345678-1234-1234-1234-123456789abc"


def data_file(path: Path, blocks: int, tail: int = 0, seed: int = 0) -> Path:
    path.write_bytes(random.Random(seed).randbytes(blocks * 4096 + tail))
    return path


def reference_root(data: bytes, salt: bytes) -> bytes:
    """A naive, independent model of the format-1 sha256 tree (for cross-checking only)."""
    level = [
        hashlib.sha256(salt + data[i : i + 4096]).digest() for i in range(0, len(data) // 4096 * 4096, 4096)
    ]
    if len(level) == 1:
        return level[0]
    while True:
        blocks = [b"".join(level[i : i + 128]).ljust(4096, b"\x00") for i in range(0, len(level), 128)]
        level = [hashlib.sha256(salt + b).digest() for b in blocks]
        if len(level) == 1:
            return level[0]


@pytest.mark.parametrize(
    ("blocks", "sizes"),
    [(1, ()), (2, (1,)), (128, (1,)), (129, (2, 1)), (16384, (128, 1)), (16385, (129, 2, 1))],
)
def test_geometry_levels(blocks: int, sizes: tuple[int, ...]) -> None:
    g = tree_geometry(blocks, digest_size=32)
    assert g.level_sizes == sizes
    assert g.tree_start == 1  # after the superblock's hash block
    # top level first: the highest level starts right after the superblock, level 0 ends the device
    if sizes:
        assert g.level_starts[-1] == 1
        assert g.level_starts[0] + sizes[0] == 1 + sum(sizes)
    assert g.hash_end == (1 + sum(sizes)) * 4096


def test_geometry_slot_sizes() -> None:
    assert tree_geometry(10, digest_size=20).entry_size == 32  # sha1 padded to a power of two
    assert tree_geometry(10, digest_size=20).hashes_per_block == 128
    assert tree_geometry(10, digest_size=20, hash_type=0).entry_size == 20  # format 0 packs
    assert tree_geometry(10, digest_size=64).hashes_per_block == 64
    assert tree_geometry(10, digest_size=32, superblock=False).tree_start == 0
    assert tree_geometry(10, digest_size=32, hash_offset=8192).tree_start == 3


@pytest.mark.parametrize("blocks", [1, 2, 127, 128, 129, 1000])
@pytest.mark.parametrize("salt", [b"", b"\x01\x02\x03"])
def test_matches_naive_model(tmp_path: Path, blocks: int, salt: bytes) -> None:
    data = data_file(tmp_path / "d", blocks, tail=7, seed=blocks)
    assert root_hash(data, salt=salt) == reference_root(data.read_bytes(), salt)


def test_parallel_path_equals_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many tiny chunks over worker processes; the tree must not depend on how work is split."""
    data = data_file(tmp_path / "d", 128 * 37 + 5, seed=3)
    seq = format_tree(data, tmp_path / "seq", b"\x09", UUID, workers=1)
    monkeypatch.setattr(tree_mod, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(tree_mod, "_MIN_CHUNK_BYTES", 4096)
    monkeypatch.setattr(tree_mod, "_MAX_CHUNK_BYTES", 3 * 128 * 4096)
    monkeypatch.setattr(tree_mod, "_READ_BYTES", 5 * 4096)  # reads not aligned with hash blocks
    plan = tree_mod._plan(tree_geometry(128 * 37 + 5, digest_size=32), 3)
    assert len(plan) > 3 and all(start % 128 == 0 for start, _ in plan)
    calls: list[tuple[int, int]] = []
    par = format_tree(
        data, tmp_path / "par", b"\x09", UUID, workers=3, progress=lambda d, t: calls.append((d, t))
    )
    assert par.root_hash == seq.root_hash
    assert (tmp_path / "par").read_bytes() == (tmp_path / "seq").read_bytes()
    assert calls[-1] == (128 * 37 + 5, 128 * 37 + 5)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_spawned_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When threads exist, fork is avoided: workers are spawned and import the hashing code themselves."""
    import multiprocessing

    data = data_file(tmp_path / "d", 128 * 9 + 1, seed=4)
    expected = root_hash(data, salt=b"\x01", workers=1)
    monkeypatch.setattr(tree_mod, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(tree_mod, "_MIN_CHUNK_BYTES", 4096)
    monkeypatch.setattr(tree_mod, "_mp_context", lambda: multiprocessing.get_context("spawn"))
    assert root_hash(data, salt=b"\x01", workers=2) == expected


def test_worker_errors_reach_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_file(tmp_path / "d", 128 * 9, seed=4)
    monkeypatch.setattr(tree_mod, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(tree_mod, "_MIN_CHUNK_BYTES", 4096)
    spec, geometry, _ = tree_mod._prepare(
        data,
        salt=b"",
        algorithm="sha256",
        hash_type=1,
        data_block_size=4096,
        hash_block_size=4096,
        data_blocks=None,
        hash_offset=0,
        superblock=False,
    )
    data.write_bytes(b"")  # the file shrinks after it was measured
    with pytest.raises(VerityInputError, match="shrank") as info:
        tree_mod._build(spec, geometry, workers=2, sink=None, progress=None)
    assert info.value.context["path"] == str(data)


def test_hash_file_written_atomically_and_not_left_on_error(tmp_path: Path) -> None:
    data = data_file(tmp_path / "d", 5)
    out = tmp_path / "h"
    out.write_bytes(b"old contents that are longer than nothing" * 1000)
    result = format_tree(data, out, b"", UUID)
    assert out.stat().st_size == result.hash_device_size == 2 * 4096  # replaced, not overwritten in place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(VerityInputError):
        format_tree(tmp_path / "missing", tmp_path / "h2", b"", UUID)
    assert not (tmp_path / "h2").exists()


def test_data_blocks_option(tmp_path: Path) -> None:
    data = data_file(tmp_path / "d", 10)
    first4 = tmp_path / "first4"
    first4.write_bytes(data.read_bytes()[: 4 * 4096])
    assert root_hash(data, salt=b"", data_blocks=4) == root_hash(first4, salt=b"")
    with pytest.raises(VerityInputError, match="11 data blocks requested but the file holds 10"):
        root_hash(data, salt=b"", data_blocks=11)


def test_appended_tree_must_not_overlap_data(tmp_path: Path) -> None:
    data = data_file(tmp_path / "d", 10)
    with pytest.raises(VerityInputError, match="overlap"):
        format_tree(data, data, b"", UUID, hash_offset=4096, data_blocks=10)


def test_errors_are_tmb_errors(tmp_path: Path) -> None:
    data = data_file(tmp_path / "d", 2)
    with pytest.raises(VerityInputError, match="unsupported verity hash algorithm"):
        root_hash(data, salt=b"", algorithm="md5")
    with pytest.raises(VerityInputError, match="at most 256"):
        root_hash(data, salt=bytes(257))
    with pytest.raises(VerityInputError, match="power of two"):
        root_hash(data, salt=b"", data_block_size=3000)
    with pytest.raises(VerityInputError, match="not a regular file"):
        root_hash(tmp_path, salt=b"")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(VerityInputError, match="not a regular file"):  # and does not block opening it
        root_hash(tmp_path / "fifo", salt=b"")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(VerityInputError, match="smaller than one"):
        root_hash(empty, salt=b"")


def test_algorithm_names_case_insensitive(tmp_path: Path) -> None:
    data = data_file(tmp_path / "d", 3)
    assert root_hash(data, salt=b"", algorithm="SHA256") == root_hash(data, salt=b"")
    assert format_tree(data, None, b"", algorithm="SHA512").algorithm == "sha512"


def test_parse_salt_and_uuid() -> None:
    assert parse_salt("-") == b"" and parse_salt("") == b""
    assert parse_salt("00AbCd") == b"\x00\xab\xcd"
    for bad in ("abc", "zz", "0x00", "ab" * 257):
        with pytest.raises(VerityInputError):
            parse_salt(bad)
    assert parse_uuid(UUID.upper()) == UUID
    for bad in ("1234", "{" + UUID + "}", UUID.replace("-", "")):
        with pytest.raises(VerityInputError):
            parse_uuid(bad)


def test_superblock_round_trip(tmp_path: Path) -> None:
    sb = Superblock(uuid=UUID, algorithm="sha512", salt=b"\x01" * 40, data_blocks=123456789, hash_type=0)
    raw = sb.pack()
    assert len(raw) == 512
    assert Superblock.unpack(raw) == sb
    path = tmp_path / "sb"
    path.write_bytes(b"\x00" * 1024 + raw)
    assert read_superblock(path, 1024) == sb
    with pytest.raises(VerityInputError, match="signature"):
        read_superblock(path, 0)
    with pytest.raises(VerityInputError, match="too short"):
        Superblock.unpack(raw[:100])
    bad_version = raw[:8] + (2).to_bytes(4, "little") + raw[12:]
    with pytest.raises(VerityInputError, match="version 2"):
        Superblock.unpack(bad_version)


def test_format_without_hash_file_writes_nothing(tmp_path: Path) -> None:
    data = data_file(tmp_path / "d", 200)
    before = sorted(os.listdir(tmp_path))
    result = format_tree(data, None, b"\x01")
    assert result.hash_path is None and result.uuid is not None  # uuid drawn but unused
    assert sorted(os.listdir(tmp_path)) == before
    assert result.target_len == 200 * 8
    assert result.salt_hex == "01"


def test_block_digest_formats() -> None:
    block = b"x" * 4096
    assert block_digest("sha256", 1, b"s", block) == hashlib.sha256(b"s" + block).digest()
    assert block_digest("sha256", 0, b"s", block) == hashlib.sha256(block + b"s").digest()
