"""rotate_key: a new key swapped in, the old one kept 0600 beside it, a missing key refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tmb.verdict.signing import KeyFileError, load_or_create_key, rotate_key


def test_rotation_swaps_in_a_new_key_and_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = load_or_create_key(path)
    old, new, retired = rotate_key(path)
    assert old.key_id == first.key_id != new.key_id
    assert load_or_create_key(path).key_id == new.key_id
    assert load_or_create_key(retired).key_id == first.key_id
    for p in (path, retired):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    again_old, _, again_retired = rotate_key(path)
    assert again_old.key_id == new.key_id and again_retired != retired


def test_nothing_to_rotate(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no verdict key to rotate"):
        rotate_key(tmp_path / "missing.pem")
    assert not (tmp_path / "missing.pem").exists()
