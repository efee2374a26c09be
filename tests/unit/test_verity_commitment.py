"""The commitment format: derived salt, canonical JSON round trip, clear errors, the verifier rule."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest

from tmb.errors import TmbError
from tmb.verity import (
    Commitment,
    CommitmentError,
    FileEntry,
    derive_salt,
    derive_uuid,
    load_commitment,
    policy_rule_from_commitment,
    policy_toml_snippet,
    write_commitment,
)
from tmb.verity.commitment import FORMAT_VERSION, POLICY_RULE_KEYS

ID, REV = "acme/tiny-llm", "0123abcd"


def sample(**changes: Any) -> Commitment:
    fields: dict[str, Any] = {
        "model_id": ID,
        "revision": REV,
        "files": (
            FileEntry("config.json", "file", 0o644, size=3, sha256=hashlib.sha256(b"{}\n").hexdigest()),
            FileEntry("bin", "dir", 0o755),
            FileEntry("bin/run", "file", 0o755, size=0, sha256=hashlib.sha256(b"").hexdigest()),
            FileEntry("latest", "symlink", 0o777, target="config.json"),
        ),
        "image_path": "image.erofs",
        "image_size": 51200 * 4096,
        "root_hash": bytes(range(32)),
        "salt": derive_salt(ID, REV),
        "data_blocks": 51200,
        "hash_blocks": 405,  # 400 + 4 + 1 for 51200 blocks
        "verity_uuid": derive_uuid(ID, REV, "verity"),
        "image_uuid": derive_uuid(ID, REV, "erofs"),
        "mkfs_args": ("-x-1", "-T0"),
        "tools": {"tmb": "0.1.0", "mkfs.erofs": "1.5"},
    }
    fields.update(changes)
    return Commitment(**fields)


def test_derived_salt_is_documented_construction() -> None:
    def field(s: str) -> bytes:
        return struct.pack(">I", len(s.encode())) + s.encode()

    expected = hashlib.sha256(b"tmb/verity/salt/v1\x00" + field(ID) + field(REV)).digest()
    assert derive_salt(ID, REV) == expected
    assert len(expected) == 32
    # unambiguous: moving characters between id and revision changes the salt
    assert derive_salt("a/b", "cd") != derive_salt("a/bc", "d")
    assert derive_salt(ID, REV) != derive_salt(ID, REV + "x")


def test_derived_uuids_are_stable_v8_and_distinct() -> None:
    a = uuid.UUID(derive_uuid(ID, REV, "verity"))
    b = uuid.UUID(derive_uuid(ID, REV, "erofs"))
    assert a != b and a.version == 8 and a.variant == uuid.RFC_4122
    assert derive_uuid(ID, REV, "verity") == str(a)


@pytest.mark.parametrize(
    ("model_id", "revision"), [("", "r"), ("a", ""), ("a@b", "r"), ("a\nb", "r"), (" a", "r")]
)
def test_bad_model_references(model_id: str, revision: str) -> None:
    with pytest.raises(CommitmentError):
        derive_salt(model_id, revision)


def test_round_trip_is_canonical(tmp_path: Path) -> None:
    c = sample()
    path = tmp_path / "commitment.json"
    write_commitment(c, path)
    text = path.read_text()
    assert text == c.to_json() and text.endswith("}\n")
    assert load_commitment(path) == c
    doc = json.loads(text)
    assert doc["format"] == "tmb-model-commitment" and doc["format_version"] == FORMAT_VERSION
    assert doc["verity"]["salt"] == derive_salt(ID, REV).hex()
    assert doc["files"][3] == {"mode": "0777", "path": "latest", "target": "config.json", "type": "symlink"}
    # re-encoding what was read gives the same bytes
    assert load_commitment(path).to_json() == text


def test_no_salt_is_a_dash(tmp_path: Path) -> None:
    c = sample(salt=b"", salt_source="explicit")
    assert c.to_dict()["verity"]["salt"] == "-"
    write_commitment(c, tmp_path / "c.json")
    assert load_commitment(tmp_path / "c.json").salt == b""
    assert policy_rule_from_commitment(c)["salt"] == "-"


def _write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    return path


def _mutated(mutate: Any) -> dict[str, Any]:
    doc = copy.deepcopy(sample().to_dict())
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format_version=2), "unsupported commitment format version 2"),
        (lambda d: d.update(format="something-else"), "not a tmb model commitment"),
        (lambda d: d.pop("verity"), "missing field commitment.verity"),
        (lambda d: d["verity"].update(root_hash="abcd"), "root_hash"),
        (lambda d: d["verity"].update(root_hash="XY" * 32), "root_hash"),
        (lambda d: d["verity"].update(hash_algorithm="md5"), "hash_algorithm"),
        (lambda d: d["verity"].update(salt="00"), "differs from the salt of this model"),
        (lambda d: d["verity"].update(salt="0g"), "salt"),
        (lambda d: d["verity"].update(data_blocks="51200"), "wrong type"),
        (lambda d: d["verity"].update(data_blocks=True), "wrong type"),
        (lambda d: d["verity"].update(data_blocks=0), "at least 1"),
        (lambda d: d["verity"].update(hash_blocks=1), "hash_blocks does not match"),
        (lambda d: d["image"].update(size=4096), "image.size is smaller"),
        (lambda d: d["files"][0].update(sha256="00"), "sha256"),
        (lambda d: d["files"][0].update(mode="644"), "mode"),
        (lambda d: d["files"][0].update(type="fifo"), "type must be"),
        (lambda d: d["model"].update(id="a@b"), "'@'"),
        (lambda d: d.update(tools={"tmb": 1}), "tools"),
    ],
)
def test_corrupt_commitments_give_clear_errors(tmp_path: Path, mutate: Any, message: str) -> None:
    path = _write(tmp_path, _mutated(mutate))
    with pytest.raises(CommitmentError, match=message) as info:
        load_commitment(path)
    assert info.value.context["path"] == str(path)
    assert isinstance(info.value, TmbError) and str(path) in info.value.diagnostics()


def test_unparseable_files(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"format": ')
    with pytest.raises(CommitmentError, match="not valid JSON"):
        load_commitment(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CommitmentError, match="not UTF-8"):
        load_commitment(path)
    path.write_text("[]")
    with pytest.raises(CommitmentError, match="must be an object"):
        load_commitment(path)
    with pytest.raises(CommitmentError, match="cannot read commitment"):
        load_commitment(tmp_path / "missing.json")


def test_policy_rule() -> None:
    c = sample()
    rule = policy_rule_from_commitment(c)
    assert tuple(rule) == POLICY_RULE_KEYS
    assert rule == {
        "name": f"{ID}@{REV}",
        "root_digest": bytes(range(32)).hex(),
        "verity_algorithm": "sha256",
        "salt": derive_salt(ID, REV).hex(),
        "data_blocks": 51200,
        "data_block_size": 4096,
        "hash_block_size": 4096,
    }
    # the dm target length IMA's dm_table_load reports for this image, in 512-byte sectors
    assert rule["data_blocks"] * rule["data_block_size"] // 512 == c.target_len == 409600
    assert policy_rule_from_commitment(c.to_dict()) == rule  # a loaded JSON document works too


def test_policy_toml_snippet_parses_back() -> None:
    c = sample(model_id='we"ird\\id', salt=b"\x01", salt_source="explicit")
    text = policy_toml_snippet(c)
    assert "[[verity]]" in text and "target_len must be 409600 sectors" in text
    doc = tomllib.loads(text)
    assert doc == {"verity": [policy_rule_from_commitment(c)]}
