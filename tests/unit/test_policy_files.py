"""The files a runtime policy references ([keyrings] ima, [[import]] keylime): found, read, renamed into a
bundle with the policy rewritten so it loads the same, and bounded."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import tmb.attest.policy as policy_module
from tmb.attest.policy import load_policy, policy_files, policy_references, rewrite_references
from tmb.errors import ConfigError

TEXT = """# a comment the rewrite drops
version = 1
[allow]
"/usr/bin/a b" = ["sha256:{d}"]
[exclude]
paths = ["^/tmp/"]
[keyrings]
ima = ["keys/vendor.pem", "/abs/other.pem", "keys/vendor.pem"]
accept_signed = true
[[import]]
keylime = "rp.json"
[[verity]]
name = "m@1"
root_digest = "{d}"
salt = "00"
data_blocks = 16
""".replace("{d}", "ab" * 32)


def test_references_in_order_once() -> None:
    assert policy_references(TEXT) == ["keys/vendor.pem", "/abs/other.pem", "rp.json"]
    assert policy_references("version = 1\n") == []
    with pytest.raises(ConfigError, match="not valid TOML"):
        policy_references("version = = 1")


def test_rewrite_keeps_the_document_but_the_names() -> None:
    names = {"keys/vendor.pem": "policy-files/0-v.pem", "/abs/other.pem": "policy-files/1-o.pem"}
    names["rp.json"] = "policy-files/2-rp.json"
    out = rewrite_references(TEXT, names)
    want = tomllib.loads(TEXT)
    want["keyrings"]["ima"] = ["policy-files/0-v.pem", "policy-files/1-o.pem", "policy-files/0-v.pem"]
    want["import"][0]["keylime"] = "policy-files/2-rp.json"
    assert tomllib.loads(out) == want
    with pytest.raises(ConfigError, match="no new name"):
        rewrite_references(TEXT, {"rp.json": "x"})
    with pytest.raises(ConfigError, match="cannot be written back"):  # a TOML date: refused, not mangled
        rewrite_references('version = 1\nwhen = 1979-05-27\n[keyrings]\nima = ["k.pem"]\n', {"k.pem": "x"})


def test_a_rewritten_policy_loads_the_same_from_the_bundle(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    keylime = {"meta": {"version": 1}, "digests": {"/usr/bin/k": ["cd" * 32]}}
    conf = tmp_path / "etc"
    (conf / "keys").mkdir(parents=True)
    (conf / "keys" / "vendor.pem").write_bytes(pem)
    (conf / "rp.json").write_text(json.dumps(keylime))
    text = TEXT.replace(', "/abs/other.pem"', "")
    (conf / "policy.toml").write_text(text)
    files = policy_files(conf / "policy.toml")
    assert files == {"keys/vendor.pem": pem, "rp.json": json.dumps(keylime).encode()}
    bundle = tmp_path / "bundle"
    names = {n: f"policy-files/{i}-{Path(n).name}" for i, n in enumerate(sorted(files))}
    for name, data in files.items():
        (bundle / names[name]).parent.mkdir(parents=True, exist_ok=True)
        (bundle / names[name]).write_bytes(data)
    (bundle / "policy.toml").write_text(rewrite_references(text, names))
    original, copy = load_policy(conf / "policy.toml"), load_policy(bundle / "policy.toml")
    assert copy.allow == original.allow and "/usr/bin/k" in copy.allow
    assert [k.public_key for k in copy.ima_keys] == [k.public_key for k in original.ima_keys]
    assert copy.accept_signed and copy.verity == original.verity


def test_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    many = "version = 1\n[keyrings]\nima = [" + ", ".join(f'"k{i}.pem"' for i in range(65)) + "]\n"
    with pytest.raises(ConfigError, match="more than 64 files"):
        policy_references(many)
    (tmp_path / "big.pem").write_bytes(b"x" * 101)
    (tmp_path / "p.toml").write_text('version = 1\n[keyrings]\nima = ["big.pem"]\n')
    monkeypatch.setattr(policy_module, "MAX_POLICY_FILE_BYTES", 100)
    with pytest.raises(ConfigError, match="too large"):
        policy_files(tmp_path / "p.toml")
    (tmp_path / "q.toml").write_text('version = 1\n[keyrings]\nima = ["missing.pem"]\n')
    with pytest.raises(ConfigError, match="cannot read a file the policy references"):
        policy_files(tmp_path / "q.toml")
