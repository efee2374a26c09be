"""Reproducible EROFS images and ``commit_model`` with the real ``mkfs.erofs`` (erofs-utils; a hard
requirement of the suite: missing, these tests fail rather than skip)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tmb.verity import (
    ModelTreeError,
    build_image,
    commit_model,
    derive_salt,
    load_commitment,
    mkfs_erofs_version,
    root_hash,
    verify_image,
)
from tmb.verity import image as image_mod

ID, REV = "acme/tiny-llm", "0123abcd"


@pytest.fixture(autouse=True)
def _need_tools() -> None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool in ("mkfs.erofs", "veritysetup"):
        if not shutil.which(tool, path=path):
            pytest.fail(f"{tool} not found: install erofs-utils and cryptsetup-bin (make deps)")


def make_model(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 64}\n')
    (root / "model.safetensors").write_bytes(os.urandom(3 * 4096 + 123))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty.bin").write_bytes(b"")
    return root


def commit_root(model: Path, out: Path) -> str:
    return commit_model(model, out, model_id=ID, revision=REV).commitment.root_hex


def test_same_directory_twice_gives_identical_outputs(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    a = commit_model(model, tmp_path / "a", model_id=ID, revision=REV)
    b = commit_model(model, tmp_path / "b", model_id=ID, revision=REV)
    for name in ("image.erofs", "image.verity", "commitment.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.commitment == b.commitment
    assert sorted(os.listdir(tmp_path / "a")) == ["commitment.json", "image.erofs", "image.verity"]


def test_independent_copy_with_other_metadata_gives_same_root(tmp_path: Path) -> None:
    """Owner-irrelevant metadata (times, group/other bits, creation order, path) does not matter."""
    model = make_model(tmp_path / "m")
    twin = tmp_path / "elsewhere" / "twin"
    twin.mkdir(parents=True)
    for rel in sorted(["tokenizer/vocab.txt", "run.sh", "empty.bin", "model.safetensors", "config.json"]):
        (twin / rel).parent.mkdir(exist_ok=True)
        shutil.copyfile(model / rel, twin / rel)
    (twin / "run.sh").chmod(0o700)  # still executable -> 0755
    (twin / "config.json").chmod(0o600)  # not executable -> 0644
    os.utime(twin / "config.json", (1_000_000, 1_000_000))
    assert commit_root(model, tmp_path / "o1") == commit_root(twin, tmp_path / "o2")


@pytest.mark.parametrize("change", ["byte", "added", "renamed", "exec_bit", "empty_dir", "symlink"])
def test_any_change_changes_the_root(tmp_path: Path, change: str) -> None:
    model = make_model(tmp_path / "m")
    before = commit_root(model, tmp_path / "before")
    if change == "byte":
        raw = bytearray((model / "model.safetensors").read_bytes())
        raw[5000] ^= 1
        (model / "model.safetensors").write_bytes(bytes(raw))
    elif change == "added":
        (model / "extra.txt").write_text("x")
    elif change == "renamed":
        (model / "config.json").rename(model / "config2.json")
    elif change == "exec_bit":
        (model / "config.json").chmod(0o755)
    elif change == "empty_dir":
        (model / "cache").mkdir()
    elif change == "symlink":
        (model / "link").symlink_to("config.json")
    assert commit_root(model, tmp_path / "after") != before


def test_commitment_contents(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    (model / "tokenizer" / "current").symlink_to("vocab.txt")
    result = commit_model(model, tmp_path / "out", model_id=ID, revision=REV)
    c = load_commitment(result.commitment_path)
    assert c == result.commitment
    assert c.salt == derive_salt(ID, REV) and c.salt_source == "derived"
    assert c.tools["mkfs.erofs"] == mkfs_erofs_version() and "tmb" in c.tools
    assert c.image_size == os.path.getsize(result.image_path) == c.data_blocks * 4096
    paths = [f.path for f in c.files]
    assert paths == [
        "config.json",
        "empty.bin",
        "model.safetensors",
        "run.sh",
        "tokenizer",
        "tokenizer/current",
        "tokenizer/vocab.txt",
    ]
    by_path = {f.path: f for f in c.files}
    for rel in ("config.json", "model.safetensors", "tokenizer/vocab.txt", "empty.bin"):
        assert by_path[rel].sha256 == hashlib.sha256((model / rel).read_bytes()).hexdigest()
        assert by_path[rel].size == (model / rel).stat().st_size
    assert by_path["run.sh"].mode == 0o755 and by_path["config.json"].mode == 0o644
    assert by_path["tokenizer"].type == "dir" and by_path["tokenizer/current"].target == "vocab.txt"
    # the published root is what veritysetup computes for the image, and the tree verifies with it
    assert root_hash(result.image_path, salt=c.salt) == c.root_hash
    vs = shutil.which("veritysetup", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert vs
    subprocess.run([vs, "verify", result.image_path, result.hash_path, c.root_hex], check=True)
    assert verify_image(result.image_path, c, hash_path=result.hash_path).ok


def test_image_holds_the_normalised_tree(tmp_path: Path) -> None:
    """Extracted with fsck.erofs (erofs-utils), the image holds the files with normalised metadata."""
    model = make_model(tmp_path / "m")
    (model / "config.json").chmod(0o600)
    (model / "tokenizer" / "current").symlink_to("vocab.txt")
    out = tmp_path / "img.erofs"
    built = build_image(model, out, uuid="11111111-2222-8333-8444-555555555555")
    raw = out.read_bytes()
    assert raw[1024:1028] == (0xE0F5E1E2).to_bytes(4, "little")  # EROFS superblock magic
    assert len(raw) % 4096 == 0 and built.size == len(raw)
    fsck = shutil.which("fsck.erofs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert fsck, "fsck.erofs (erofs-utils) not found"
    extracted = tmp_path / "x"
    subprocess.run(
        [fsck, f"--extract={extracted}", "--preserve-perms", str(out)], check=True, capture_output=True
    )
    for entry in built.files:
        path = extracted / entry.path
        st = path.lstat()
        assert st.st_mtime == 0, entry.path
        if entry.type == "file":
            assert path.read_bytes() == (model / entry.path).read_bytes()
            assert st.st_mode & 0o7777 == entry.mode
        elif entry.type == "symlink":
            assert os.readlink(path) == entry.target
    assert (extracted / "config.json").stat().st_mode & 0o777 == 0o644
    assert (extracted / "run.sh").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in extracted.iterdir()) == sorted(p.name for p in model.iterdir())


def _assert_no_output(out: Path) -> None:
    if out.exists():
        leftovers = [p.name for p in out.iterdir()]
        assert leftovers == [], leftovers


def _commit_fails(model: Path, out: Path, match: str, **kwargs: object) -> ModelTreeError:
    with pytest.raises(ModelTreeError, match=match) as info:
        commit_model(model, out, model_id=ID, revision=REV, **kwargs)  # type: ignore[arg-type]
    _assert_no_output(out)
    return info.value


def test_symlink_outside_is_refused(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    (tmp_path / "secret").write_text("outside")
    (model / "leak").symlink_to("../secret")
    err = _commit_fails(model, tmp_path / "out", "symlink points outside the model directory")
    assert err.context["path"].endswith("leak")
    assert "--dereference" in err.diagnostics()


def test_absolute_and_dangling_symlinks_are_refused(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    (model / "abs").symlink_to(model / "config.json")
    _commit_fails(model, tmp_path / "out", "absolute symlink")
    (model / "abs").unlink()
    (model / "dangling").symlink_to("nope")
    _commit_fails(model, tmp_path / "out", "dangling symlink")


def test_dereference_stores_the_target(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot: every file is a symlink into ../../blobs."""
    blobs = tmp_path / "cache" / "blobs"
    snap = tmp_path / "cache" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "1234").write_bytes(b"weights" * 1000)
    (snap / "model.bin").symlink_to("../../blobs/1234")
    _commit_fails(snap, tmp_path / "out", "outside")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.bin").write_bytes(b"weights" * 1000)
    deref = commit_model(snap, tmp_path / "o1", model_id=ID, revision=REV, dereference=True)
    assert (
        deref.commitment.root_hash
        == commit_model(plain, tmp_path / "o2", model_id=ID, revision=REV).commitment.root_hash
    )


def test_special_files_are_refused(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    os.mkfifo(model / "pipe")
    err = _commit_fails(model, tmp_path / "out", "FIFO")
    assert err.context["path"].endswith("pipe")
    (model / "pipe").unlink()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(model / "sock"))
        _commit_fails(model, tmp_path / "out", "socket")
    finally:
        sock.close()


def test_unreadable_file_is_refused_without_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "unrelated.txt").write_text("kept")
    if os.geteuid() != 0:
        (model / "tokenizer" / "vocab.txt").chmod(0)
    else:  # root reads a mode-000 file: make the open fail the way it would for anyone else
        real = image_mod._open_source

        def deny(path: str) -> int:
            if path.endswith("vocab.txt"):
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(image_mod, "_open_source", deny)
    with pytest.raises(ModelTreeError, match="cannot read file: Permission denied") as info:
        commit_model(model, out, model_id=ID, revision=REV)
    assert info.value.context["path"].endswith("tokenizer/vocab.txt")
    assert sorted(os.listdir(out)) == ["unrelated.txt"]


def test_empty_directories_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _commit_fails(empty, tmp_path / "out", "contains no files")
    assert err.context["path"] == str(empty)
    (empty / "sub").mkdir()
    _commit_fails(empty, tmp_path / "out", "contains no files")
    _commit_fails(tmp_path / "missing", tmp_path / "out", "does not exist")


def test_non_utf8_name_is_refused(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    (model / os.fsdecode(b"bad\xff")).write_text("x")
    _commit_fails(model, tmp_path / "out", "not valid UTF-8")


def test_failed_rebuild_keeps_the_previous_complete_set(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    out = tmp_path / "out"
    first = commit_model(model, out, model_id=ID, revision=REV)
    os.mkfifo(model / "pipe")
    with pytest.raises(ModelTreeError):
        commit_model(model, out, model_id=ID, revision=REV)
    assert sorted(os.listdir(out)) == ["commitment.json", "image.erofs", "image.verity"]
    assert load_commitment(out / "commitment.json") == first.commitment


def test_output_inside_the_model_directory_is_refused(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    _commit_fails(model, model / "out", "inside the model directory")
    assert not (model / "out").exists()
    with pytest.raises(ModelTreeError, match="inside the model directory"):
        build_image(model, model / "x.erofs", uuid="11111111-2222-8333-8444-555555555555")
