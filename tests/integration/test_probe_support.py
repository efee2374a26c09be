"""Shared setup for the probe/ingest tests (no tests here): a node with a fresh swtpm, its AK, an IMA log
file written like the kernel's while PCR 10 is extended with exactly the same digests, a runtime policy,
an :class:`~tmb.ingest.service.Ingest` on a SQLite file and an in-process daemon on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web
from swtpm import Swtpm, SwtpmFactory

from probes.config import ProbeConfig
from probes.tpm import AK_HANDLE, TpmClient
from tmb.attest.ekcert import ek_pin
from tmb.attest.ima_build import LogBuilder, dm_device_resume, dm_table_load_verity
from tmb.attest.policy import RuntimePolicy, policy_from_dict
from tmb.attest.quote import AkPublic
from tmb.ingest.identity import IdentityPolicy
from tmb.ingest.routes import make_app
from tmb.ingest.service import Ingest
from tmb.ingest.wire import Head, qualifying_data

PROBE_PATH = "/usr/bin/tmb-probe"
PROBE_BYTES = b"tmb-probe binary v1"
ENGINE_EXE = os.path.realpath(sys.executable)
ROOT = "ab" * 32
SALT = "cd" * 32
NODE = "gpu-node-1"
ADMIN = "s3cret-admin"


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@dataclass
class NodeEnv:
    swtpm: Swtpm
    tpm: TpmClient
    ak: AkPublic
    log_path: Path
    log: BinaryIO
    builder: LogBuilder
    policy_doc: dict[str, Any]
    tmp: Path
    verity_dev: tuple[int, int] = (253, 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def measure(self, path: str, content: bytes) -> None:
        self._extend(self.builder.file(path, content).extends)

    def buffer(self, name: str, payload: bytes) -> None:
        self._extend(self.builder.buffer(name, payload).extends)

    def _extend(self, extends: dict[str, bytes]) -> None:
        self.tpm.pcr_extend(10, {b: extends[b] for b in ("sha1", "sha256")})

    def mount_model(self, dev: tuple[int, int] | None = None, data_dev: str = "7:1") -> None:
        major, minor = dev or self.verity_dev
        load = dm_table_load_verity(
            "model", root_digest=ROOT, salt=SALT, data_blocks=16, data_device=data_dev
        )
        load = load.replace(b"major=253,minor=0", f"major={major},minor={minor}".encode())
        self.buffer("dm_table_load", load)
        resume = dm_device_resume("model", table_digest=_sha(load), capacity=128)
        resume = resume.replace(b"major=253,minor=0", f"major={major},minor={minor}".encode())
        self.buffer("dm_device_resume", resume)

    @property
    def policy(self) -> RuntimePolicy:
        return policy_from_dict(self.policy_doc)

    def ingest(self, db: Path | None = None, **kw: Any) -> Ingest:
        """An ingest trusting this node's EK by its pin (this swtpm has no EK certificate), the node
        registered with its AK (the probe then enrols with the same AK)."""
        kw.setdefault("identity", IdentityPolicy(pins=(ek_pin(self.tpm.ek_public("rsa")),)))
        ingest = Ingest(db or self.tmp / "ingest.db", policy=self.policy, **kw)
        assert self.ak.tpm2b_public is not None
        ingest.register_node(NODE, self.ak.tpm2b_public)
        return ingest

    def quote_doc(self, nonce: bytes, head: Head, bindings: bytes | None = None) -> dict[str, Any]:
        """A quote over ``head`` with ``nonce``, covering the bindings document of digest ``bindings``."""
        q = self.tpm.quote(AK_HANDLE, {"sha256": [10]}, qualifying_data(nonce, head.digest, bindings))
        doc = {
            "message": base64.b64encode(q.message).decode(),
            "signature": base64.b64encode(q.signature).decode(),
            "pcrs": q.pcrs.to_dict(),
            "nonce": nonce.hex(),
            "head": head.to_wire(),
        }
        if bindings is not None:
            doc["bindings"] = bindings.hex()
        return doc

    def ima_doc(self, offset: int = 0) -> dict[str, Any]:
        data = self.log_path.read_bytes()[offset:]
        return {"offset": offset, "data": base64.b64encode(data).decode()}

    def probe_config(self, url: str, **kw: Any) -> ProbeConfig:
        values: dict[str, Any] = {
            "node": NODE,
            "daemon_url": url,
            "tcti": self.swtpm.tcti,
            "source": "synthetic",
            "source_options": {"seed": 1},
            "batch_interval_s": 0.2,
            "quote_period_s": 0.5,
            "ima_log": str(self.log_path),
            "eventlog": "",  # never the host's own securityfs log: these nodes boot without one
            "state_dir": str(self.tmp / "probe-state"),
            "buffer_fsync": False,
            "bind_pids": (os.getpid(),),
            "tpm_timeout_s": 5.0,
            "http_timeout_s": 2.0,
        }
        values.update(kw)
        return ProbeConfig(**values)

    def close(self) -> None:
        self.log.close()
        self.tpm.close()


def make_node(
    tmp: Path, factory: SwtpmFactory, *, probe: bool = True, probe_allowed: bool = True, model: bool = True
) -> NodeEnv:
    """A node whose IMA log has the boot aggregate, the probe (unless ``probe`` is false; measured with a
    digest the policy does not allow when ``probe_allowed`` is false), the inference engine (this Python
    interpreter) and, with ``model``, the dm-verity activation of the committed model image."""
    sw = factory()
    tpm = sw.client()
    ak = tpm.create_or_load_ak(AK_HANDLE, "rsa")
    log_path = tmp / "binary_runtime_measurements"
    fh = open(log_path, "wb")  # noqa: SIM115 - closed by NodeEnv.close
    policy_doc: dict[str, Any] = {
        "version": 1,
        "allow": {
            "boot_aggregate": [_sha(b"boot")],
            PROBE_PATH: [_sha(PROBE_BYTES)],
            ENGINE_EXE: [_sha(b"engine")],
        },
        "require": {"paths": [PROBE_PATH]},
        "verity": [{"name": "model@1", "root_digest": ROOT, "salt": SALT, "data_blocks": 16}],
    }
    env = NodeEnv(sw, tpm, ak, log_path, fh, LogBuilder(fh), policy_doc, tmp)
    env.measure("boot_aggregate", b"boot")
    if probe:
        env.measure(PROBE_PATH, PROBE_BYTES if probe_allowed else b"patched probe")
    env.measure(ENGINE_EXE, b"engine")
    if model:
        env.mount_model()
    return env


@asynccontextmanager
async def serve(ingest: Ingest, port: int = 0) -> AsyncIterator[str]:
    """The ingest app on 127.0.0.1 (a free port unless given); yields its base URL."""
    runner = web.AppRunner(make_app(ingest, admin_token=ADMIN), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
