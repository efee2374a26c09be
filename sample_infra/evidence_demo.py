"""The offline audit scenarios of the demo: a GPU node's attestation evidence, made with real parts, audited.

It commits a small model directory (``tmb commit``: EROFS image + dm-verity tree + commitment), starts a
private swtpm as the node's TPM, writes the node's IMA log the way the kernel does (boot aggregate, the
probe and the inference engine, the dm-verity mount of the model image), extends the TPM's PCR 10 with
exactly what the kernel extends, takes a quote over PCR 10 with a fresh nonce, writes an evidence bundle
and runs ``tmb audit`` on it. Then it shows the attacks an auditor catches. Everything it made is left in
one folder it names.

``tmb demo`` (sample_infra/demo.py) runs these after its live scenarios (proxy, probes, workers, verdicts).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from probes.tpm import Quote
from sample_infra.swtpm import Swtpm
from tmb.attest.evidence import AuditResult, audit_bundle, write_bundle
from tmb.attest.ima import iter_log
from tmb.attest.ima_build import LogBuilder
from tmb.verity import Commitment, commit_model, policy_toml_snippet

AK_HANDLE = 0x81010002
BINARIES = {
    "/usr/bin/tmb-probe": b"#!/usr/bin/python3\n# tmb-probe (demo build)\n",
    "/opt/engine/bin/inference-engine": b"\x7fELF demo inference engine build 2026.11\n",
    "/usr/lib/x86_64-linux-gnu/libcuda.so.1": b"\x7fELF demo libcuda\n",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    expect_pass: bool
    result: AuditResult

    @property
    def outcome(self) -> str:
        return "PASS" if self.result.ok else "FAIL"

    @property
    def reason(self) -> str:
        errors = self.result.report.errors
        if not errors:
            return f"{self.result.entries_attested} IMA entries attested, model image verified"
        # The most specific finding first: one that names an IMA entry.
        f = next((e for e in errors if "entry" in e.context), errors[0])
        ctx = f.to_dict()["context"]
        where = ", ".join(f"{k}={ctx[k]}" for k in ("entry", "path", "rule", "quote") if k in ctx)
        return f"{f.id}: {f.message}" + (f" ({where})" if where else "")


def make_model(directory: Path) -> Path:
    """A tiny stand-in model directory (config, tokenizer, weights): what ``tmb commit`` publishes."""
    model = directory / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}\n')
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    weights = hashlib.shake_256(b"demo weights").digest(3 * 4096 + 123)  # deterministic stand-in bytes
    (model / "model.safetensors").write_bytes(weights)
    return model


def policy_for(commitment: Commitment) -> str:
    allow = "\n".join(f'"{p}" = ["sha256:{hashlib.sha256(c).hexdigest()}"]' for p, c in BINARIES.items())
    return (
        "version = 1\n\n[allow]\n"
        f'"boot_aggregate" = ["sha256:{"00" * 32}"]\n{allow}\n\n'
        '[require]\npaths = ["/usr/bin/tmb-probe", "/opt/engine/bin/inference-engine"]\n\n'
        + policy_toml_snippet(commitment)
    )


class DemoNode:
    """A GPU node's measured boot state: a swtpm, its AK and an IMA log kept in step with PCR 10."""

    def __init__(self, swtpm: Swtpm) -> None:
        self.swtpm = swtpm
        self.tpm = swtpm.client().__enter__()
        self.ak = self.tpm.create_or_load_ak(AK_HANDLE, "rsa")
        self.log_path = swtpm.state_dir.parent / "binary_runtime_measurements"
        self.stream = open(self.log_path, "wb")  # noqa: SIM115 - kept open while the node runs
        self.builder = LogBuilder(self.stream)

    def measure_file(self, path: str, content: bytes) -> None:
        self._extend(self.builder.file(path, content).extends)

    def measure_buffer(self, name: str, payload: bytes) -> None:
        self._extend(self.builder.buffer(name, payload).extends)

    def _extend(self, extends: dict[str, bytes]) -> None:
        self.tpm.pcr_extend(10, {"sha1": extends["sha1"], "sha256": extends["sha256"]})

    def boot(self, commitment: Commitment, *, mount_root: str | None = None) -> None:
        self._extend(self.builder.add("ima-ng", "boot_aggregate", digest=bytes(32)).extends)
        for path, content in BINARIES.items():
            self.measure_file(path, content)
        root = mount_root or commitment.root_hex
        for built in self.builder.mount_verity(
            "model", root_digest=root, salt=commitment.salt_hex, data_blocks=commitment.data_blocks
        ):
            self._extend(built.extends)

    def quote(self, nonce: bytes) -> Quote:
        return self.tpm.quote(AK_HANDLE, {"sha256": [10]}, nonce)

    def log(self) -> bytes:
        self.stream.flush()
        return self.log_path.read_bytes()

    def close(self) -> None:
        self.stream.close()
        self.tpm.__exit__(None, None, None)
        self.swtpm.stop()


def _bundle(
    out: Path,
    name: str,
    node: DemoNode,
    quote: Quote,
    nonce: bytes,
    log: bytes,
    policy: str,
    commitment_path: Path,
) -> Path:
    return write_bundle(
        out / name,
        node="gpu-node-1",
        ak=node.ak.tpm2b_public or node.ak.pem,
        ima_log=log,
        quotes=[
            {
                "message": quote.message,
                "signature": quote.signature,
                "pcrs": quote.pcrs.to_json().encode(),
                "nonce": nonce,
            }
        ],
        policy_toml=policy,
        commitments={"model.commitment.json": commitment_path.read_bytes()},
    )


def run(out: Path) -> list[Scenario]:
    """Run every scenario, leaving models, bundles and logs under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    committed = commit_model(make_model(out), out / "commitment", model_id="demo/tiny-llama", revision="v1")
    commitment = committed.commitment
    commitment_path = Path(committed.commitment_path)
    policy = policy_for(commitment)
    scenarios: list[Scenario] = []

    honest = DemoNode(Swtpm(out / "node-honest" / "tpm"))
    try:
        honest.boot(commitment)
        nonce = os.urandom(20)
        quote = honest.quote(nonce)
        log = honest.log()
        path = _bundle(out, "bundle-honest", honest, quote, nonce, log, policy, commitment_path)
        scenarios.append(Scenario("honest node", True, audit_bundle(path)))

        with open(honest.log_path, "rb") as stream:
            entries = list(iter_log(stream))
        target = entries[2]  # the inference engine's measurement
        tampered = bytearray(log)
        tampered[target.offset + target.size - 2] ^= 0x01
        path = _bundle(
            out, "bundle-tampered-log", honest, quote, nonce, bytes(tampered), policy, commitment_path
        )
        scenarios.append(Scenario("IMA log edited after the quote", False, audit_bundle(path)))

        path = _bundle(
            out, "bundle-replayed-quote", honest, quote, os.urandom(20), log, policy, commitment_path
        )
        scenarios.append(Scenario("old quote replayed for a new challenge", False, audit_bundle(path)))

        honest.measure_file("/opt/engine/bin/debug-shell", b"not in the allowlist")
        nonce2 = os.urandom(20)
        quote2 = honest.quote(nonce2)
        path = _bundle(
            out, "bundle-unknown-binary", honest, quote2, nonce2, honest.log(), policy, commitment_path
        )
        scenarios.append(Scenario("unlisted binary loaded", False, audit_bundle(path)))
    finally:
        honest.close()

    swapped = DemoNode(Swtpm(out / "node-other-model" / "tpm"))
    try:
        other_root = hashlib.sha256(b"a cheaper quantized image").hexdigest()
        swapped.boot(commitment, mount_root=other_root)
        nonce = os.urandom(20)
        quote = swapped.quote(nonce)
        path = _bundle(
            out, "bundle-other-model", swapped, quote, nonce, swapped.log(), policy, commitment_path
        )
        scenarios.append(Scenario("node mounted another model image", False, audit_bundle(path)))
    finally:
        swapped.close()
    return scenarios


def render(scenarios: list[Scenario], out: Path) -> str:
    width = max(len(s.name) for s in scenarios)
    lines = [f"{'scenario':{width}}  expected  audit  reason", f"{'-' * width}  --------  -----  ------"]
    for s in scenarios:
        expected = "PASS" if s.expect_pass else "FAIL"
        mark = "" if (s.result.ok == s.expect_pass) else "   <-- UNEXPECTED"
        lines.append(f"{s.name:{width}}  {expected:8}  {s.outcome:5}  {s.reason}{mark}")
    lines.append("")
    lines.append(f"evidence bundles, commitment and logs: {out}")
    lines.append(f"re-check any of them offline: tmb audit {out / 'bundle-honest'}")
    return "\n".join(lines)


def main(out: Path | None = None) -> int:
    target = out or Path(tempfile.mkdtemp(prefix="tmb-demo-", dir=os.getcwd()))
    if target.exists() and any(target.iterdir()):
        shutil.rmtree(target)
    print("tmb demo: TPM-quoted IMA evidence for a GPU node serving a committed model")
    print("(real swtpm, real tpm2-pytss quotes, real mkfs.erofs + dm-verity tree; no GPU telemetry yet)\n")
    scenarios = run(target)
    print(render(scenarios, target))
    return 0 if all(s.result.ok == s.expect_pass for s in scenarios) else 1
