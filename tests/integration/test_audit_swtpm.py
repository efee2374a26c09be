"""End to end with a real swtpm: an IMA log written as the kernel writes it, PCR 10 extended with exactly
what the kernel extends, a quote from tpm2-pytss, an evidence bundle, ``tmb audit``; then the attacks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from probes.tpm import Quote, TpmClient
from sample_infra.swtpm import Swtpm
from tmb.attest.evidence import audit_bundle, write_bundle
from tmb.attest.ima import iter_log
from tmb.attest.ima_build import Built, LogBuilder, dm_table_load_verity

ROOT = hashlib.sha256(b"model image root").hexdigest()
SALT = hashlib.sha256(b"salt").hexdigest()
BLOCKS = 2048
AK_HANDLE = 0x81010002


@dataclass
class Node:
    swtpm: Swtpm
    tpm: TpmClient
    ak: bytes
    log: io.BytesIO
    builder: LogBuilder

    def measure(self, built: Built) -> None:
        self.tpm.pcr_extend(10, {"sha1": built.extends["sha1"], "sha256": built.extends["sha256"]})

    def quote(self, nonce: bytes, pcrs: tuple[int, ...] = (10,)) -> Quote:
        return self.tpm.quote(AK_HANDLE, {"sha256": list(pcrs)}, nonce)


def policy_toml(root: str = ROOT, blocks: int = BLOCKS) -> str:
    allow = "\n".join(f'"{p}" = ["sha256:{hashlib.sha256(c).hexdigest()}"]' for p, c in FILES.items())
    return f"""version = 1
[allow]
"boot_aggregate" = ["sha256:{"00" * 32}"]
{allow}
[require]
paths = ["/usr/bin/vllm", "/usr/bin/tmb-probe"]
[[verity]]
name = "llama-1b@main"
root_digest = "{root}"
salt = "{SALT}"
data_blocks = {blocks}
"""


FILES = {
    "/usr/bin/tmb-probe": b"probe binary",
    "/usr/bin/vllm": b"engine binary",
    "/usr/lib/libcuda.so": b"cuda",
}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    instance = Swtpm(tmp_path / "tpm")
    try:
        with instance.client() as tpm:
            ak = tpm.create_or_load_ak(AK_HANDLE, "rsa")
            assert ak.tpm2b_public is not None
            log = io.BytesIO()
            n = Node(instance, tpm, ak.tpm2b_public, log, LogBuilder(log))
            n.measure(n.builder.add("ima-ng", "boot_aggregate", digest=bytes(32)))
            for path, content in FILES.items():
                n.measure(n.builder.file(path, content))
            for built in n.builder.mount_verity("model", root_digest=ROOT, salt=SALT, data_blocks=BLOCKS):
                n.measure(built)
            yield n
    finally:
        instance.stop()


def bundle(
    tmp_path: Path,
    node: Node,
    quotes: list[tuple[Quote, bytes | None]],
    *,
    log: bytes | None = None,
    policy: str | None = None,
    name: str = "bundle",
) -> Path:
    return write_bundle(
        tmp_path / name,
        node="gpu-node-1",
        ak=node.ak,
        ima_log=node.log.getvalue() if log is None else log,
        quotes=[
            {
                "message": q.message,
                "signature": q.signature,
                "pcrs": q.pcrs.to_json().encode(),
                "nonce": nonce,
            }
            for q, nonce in quotes
        ],
        policy_toml=policy or policy_toml(),
    )


def test_honest_node_passes_and_the_cli_agrees(node: Node, tmp_path: Path) -> None:
    nonce = os.urandom(20)
    path = bundle(tmp_path, node, [(node.quote(nonce), nonce)])
    result = audit_bundle(path)
    assert result.ok, result.report.to_list()
    assert result.entries_attested == result.entries_total == 6
    assert result.verity == {"llama-1b@main": 5}

    proc = subprocess.run(
        [sys.executable, "-m", "tmb", "audit", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("RESULT: PASS")
    proc = subprocess.run(
        [sys.executable, "-m", "tmb", "audit", str(path), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(proc.stdout)["ok"] is True


def _ids(path: Path) -> set[str]:
    return {f.id for f in audit_bundle(path).report.errors}


def test_log_tampering_is_caught(node: Node, tmp_path: Path) -> None:
    nonce = os.urandom(20)
    quote = node.quote(nonce)
    data = node.log.getvalue()
    entries = list(iter_log(io.BytesIO(data)))

    flipped = bytearray(data)
    flipped[entries[2].offset + entries[2].size - 1] ^= 0x40
    ids = _ids(bundle(tmp_path, node, [(quote, nonce)], log=bytes(flipped), name="flip"))
    assert {"ima.template_hash_mismatch", "pcr.mismatch"} <= ids

    dropped = data[: entries[3].offset] + data[entries[4].offset :]
    assert "pcr.mismatch" in _ids(bundle(tmp_path, node, [(quote, nonce)], log=dropped, name="drop"))

    a, b = entries[1], entries[2]
    swapped = (
        data[: a.offset]
        + data[b.offset : b.offset + b.size]
        + data[a.offset : b.offset]
        + data[b.offset + b.size :]
    )
    ids = _ids(bundle(tmp_path, node, [(quote, nonce)], log=swapped, name="swap"))
    assert "pcr.mismatch" in ids and "ima.template_hash_mismatch" not in ids


def test_entry_appended_after_the_quote_is_not_an_error(node: Node, tmp_path: Path) -> None:
    nonce = os.urandom(20)
    quote = node.quote(nonce)
    node.measure(node.builder.file("/usr/bin/late", b"loaded after the quote"))
    result = audit_bundle(bundle(tmp_path, node, [(quote, nonce)]))
    assert result.ok, result.report.to_list()
    assert result.entries_total == 7 and result.entries_attested == 6
    assert "ima.unattested_entries" in result.report.ids()


def test_forged_stale_and_incomplete_quotes(node: Node, tmp_path: Path) -> None:
    nonce = os.urandom(20)
    good = node.quote(nonce)

    # Forged: signed by another TPM's AK, presented with this node's AK.
    other = Swtpm(tmp_path / "other-tpm")
    try:
        with other.client() as tpm:
            tpm.create_or_load_ak(AK_HANDLE, "rsa")
            for e in iter_log(io.BytesIO(node.log.getvalue())):
                extends = {
                    "sha1": hashlib.sha1(e.hashed).digest(),
                    "sha256": hashlib.sha256(e.hashed).digest(),
                }
                tpm.pcr_extend(10, extends)
            forged = tpm.quote(AK_HANDLE, {"sha256": [10]}, nonce)
    finally:
        other.stop()
    assert "quote.signature_invalid" in _ids(bundle(tmp_path, node, [(forged, nonce)], name="forged"))

    # Replayed: an old quote presented for a new challenge.
    fresh = os.urandom(20)
    assert "quote.nonce_mismatch" in _ids(bundle(tmp_path, node, [(good, fresh)], name="stale"))

    # PCR 10 left out of the selection.
    partial = node.quote(nonce, pcrs=(0, 1))
    ids = _ids(bundle(tmp_path, node, [(partial, nonce)], name="nopcr10"))
    assert "quote.pcr_missing" in ids


def test_verity_root_differs_from_the_commitment(node: Node, tmp_path: Path) -> None:
    nonce = os.urandom(20)
    other_root = hashlib.sha256(b"another model").hexdigest()
    path = bundle(tmp_path, node, [(node.quote(nonce), nonce)], policy=policy_toml(root=other_root))
    assert {"dm.verity_root_mismatch", "dm.verity_missing"} <= _ids(path)
    path = bundle(
        tmp_path, node, [(node.quote(nonce), nonce)], policy=policy_toml(blocks=BLOCKS // 2), name="size"
    )
    assert "dm.verity_param_mismatch" in _ids(path)


def test_device_reloaded_after_resume_across_two_quotes(node: Node, tmp_path: Path) -> None:
    n1 = os.urandom(20)
    first = node.quote(n1)
    evil = dm_table_load_verity(
        "model", root_digest=hashlib.sha256(b"x").hexdigest(), salt=SALT, data_blocks=BLOCKS
    )
    node.measure(node.builder.buffer("dm_table_load", evil))
    n2 = os.urandom(20)
    second = node.quote(n2)
    result = audit_bundle(bundle(tmp_path, node, [(first, n1), (second, n2)]))
    assert [q.matched_entry for q in result.quotes] == [6, 7]
    assert "dm.device_modified_after_resume" in {f.id for f in result.report.errors}


def test_audit_cli_on_bad_bundles(tmp_path: Path) -> None:
    tmb = [sys.executable, "-m", "tmb", "audit"]
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([*tmb, str(tmp_path / "empty")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(
        '{"format": "tmb-evidence/1", "quotes": [{"message": "../../etc/passwd"}]}'
    )
    proc = subprocess.run([*tmb, str(tmp_path / "bad")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "outside the bundle" in proc.stderr
    assert shutil.which("swtpm")  # the suite depends on it: fail loudly rather than skip
