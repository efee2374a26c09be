"""The verdict transparency log through the real daemon: served verdicts carry inclusion proofs against
signed checkpoints, the consistency proof between two saved checkpoints verifies (also across a restart on
the same store), `tmb verify-verdict --log-key` and `tmb log verify` check them, and the EAR JWT reads
with PyJWT."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from test_proxy_support import Daemon, WorkerState, make_config, workers
from test_serve_api import GatedEngine

from tmb.config import Config
from tmb.verdict.checkpoint import parse_verifier_key
from tmb.verdict.logverify import check_consistency, check_inclusion

__all__ = ["workers"]
WAIT_S = 20.0  # bound on each wait for the checkpoint loop (met within a few periods when all is well)


async def _daemon(config: Config) -> tuple[web.AppRunner, Daemon, GatedEngine]:
    engine = GatedEngine()
    runner, d = await engine.start(config)
    engine.gate.set()
    return runner, d, engine


@pytest.fixture
def config(tmp_path: Path, workers: dict[str, tuple[WorkerState, int]]) -> Config:
    config = make_config(tmp_path, [("a", workers["a"][1])])
    verdicts = dataclasses.replace(config.verdicts, log_origin="tmb.test/verdicts", checkpoint_s=0.05)
    return dataclasses.replace(config, verdicts=verdicts)


@pytest.fixture
async def daemon(config: Config) -> AsyncIterator[Daemon]:
    runner, d, _ = await _daemon(config)
    yield d
    await runner.cleanup()


async def _requests(s: aiohttp.ClientSession, d: Daemon, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        async with s.post(f"{d.url}/json", json={"model": "m-a"}) as r:
            ids.append(r.headers["X-TMB-Request-Id"])
            await r.read()
    return ids


async def _verdict_with_proof(s: aiohttp.ClientSession, d: Daemon, rid: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        async with s.get(f"{d.url}/v1/verdicts/{rid}?wait=5") as r:
            doc: dict[str, Any] = await r.json() if r.status == 200 else {}
        if "log" in doc or loop.time() > deadline:
            return doc
        await asyncio.sleep(0.05)


async def _log_key(s: aiohttp.ClientSession, d: Daemon) -> str:
    async with s.get(f"{d.url}/v1/keys") as r:
        key: str = (await r.json())["log"]["verifier_key"]
    assert key.startswith("tmb.test/verdicts+")
    return key


async def test_served_verdicts_carry_inclusion_proofs(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    async with aiohttp.ClientSession() as s:
        ids = await _requests(s, d, 5)
        docs = [await _verdict_with_proof(s, d, rid) for rid in ids]
        vkey = await _log_key(s, d)
        async with s.get(f"{d.url}/v1/log/checkpoint") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            note = await r.text()
        async with s.get(f"{d.url}/v1/log/proof/inclusion/{ids[0]}") as r:
            by_id = await r.json()
        async with s.get(f"{d.url}/v1/log/proof/inclusion?index=0&tree_size=1") as r:
            assert r.status == 200 and (await r.json())["proof"] == []
        for path, status, kind in [
            ("/v1/log/proof/inclusion?index=0&tree_size=999", 404, "not_in_log"),
            ("/v1/log/proof/inclusion?index=x&tree_size=1", 400, "bad_query"),
            ("/v1/log/proof/consistency?first=3&second=2", 404, "not_in_log"),
            (f"/v1/log/proof/inclusion/{'0' * 32}", 404, "not_logged"),
            ("/v1/log/proof/inclusion/NOPE", 400, "bad_request_id"),
        ]:
            async with s.get(d.url + path) as r:
                assert r.status == status and (await r.json())["error"]["type"] == kind, path
    verifiers = [parse_verifier_key(vkey)]
    assert note.startswith("tmb.test/verdicts\n")
    for doc in docs:
        report, cp = check_inclusion(doc, verifiers, "tmb.test/verdicts")
        assert report.ok, report.to_list()
        assert cp is not None and cp.size >= 5
    assert by_id["index"] == docs[0]["log"]["index"]
    # the command-line check, as a client runs it
    saved = tmp_path / "v.json"
    saved.write_text(json.dumps(docs[2]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tmb",
        "verify-verdict",
        str(saved),
        "--keys-url",
        f"{d.url}/v1/keys",
        "--log-key",
        vkey,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"in the verdict log" in out
    saved.write_text(json.dumps(dict(docs[2], log=docs[3]["log"])))  # another verdict's proof
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tmb",
        "verify-verdict",
        str(saved),
        "--keys-url",
        f"{d.url}/v1/keys",
        "--log-key",
        vkey,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"log.not_included" in err


async def test_saved_checkpoints_stay_consistent_across_a_restart(config: Config, tmp_path: Path) -> None:
    runner, d, _ = await _daemon(config)
    async with aiohttp.ClientSession() as s:
        ids = await _requests(s, d, 3)
        await _verdict_with_proof(s, d, ids[-1])
        vkey = await _log_key(s, d)
        async with s.get(f"{d.url}/v1/log/checkpoint") as r:
            old = await r.text()
    await runner.cleanup()
    runner, d, _ = await _daemon(config)  # the same store and key: the log goes on
    try:
        async with aiohttp.ClientSession() as s:
            ids = await _requests(s, d, 4)
            await _verdict_with_proof(s, d, ids[-1])
            async with s.get(f"{d.url}/v1/log/checkpoint") as r:
                new = await r.text()
            old_size, new_size = int(old.split("\n")[1]), int(new.split("\n")[1])
            assert new_size >= old_size + 4
            async with s.get(f"{d.url}/v1/log/proof/consistency?first={old_size}&second={new_size}") as r:
                proof = (await r.json())["proof"]
    finally:
        await runner.cleanup()
    report, _, _ = check_consistency(old, new, proof, [parse_verifier_key(vkey)], "tmb.test/verdicts")
    assert report.ok, report.to_list()
    # `tmb log verify` against the daemon, as an auditor runs it with two saved checkpoints
    (tmp_path / "old.note").write_text(old)
    (tmp_path / "new.note").write_text(new)
    (tmp_path / "proof.json").write_text(json.dumps({"proof": proof}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tmb",
        "log",
        "verify",
        str(tmp_path / "old.note"),
        str(tmp_path / "new.note"),
        "--log-key",
        vkey,
        "--proof",
        str(tmp_path / "proof.json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"consistent" in out
    bad = json.dumps({"proof": ["00" * 32 for _ in proof] or ["00" * 32]})
    (tmp_path / "proof.json").write_text(bad)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tmb",
        "log",
        "verify",
        str(tmp_path / "old.note"),
        str(tmp_path / "new.note"),
        "--log-key",
        vkey,
        "--proof",
        str(tmp_path / "proof.json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"log.inconsistent" in err


async def test_ear_jwt_on_accept(daemon: Daemon) -> None:
    d = daemon
    async with aiohttp.ClientSession() as s:
        (rid,) = await _requests(s, d, 1)
        await _verdict_with_proof(s, d, rid)
        async with s.get(f"{d.url}/v1/verdicts/{rid}", headers={"Accept": "application/eat+jwt"}) as r:
            assert r.status == 200 and r.content_type == "application/eat+jwt"
            token = await r.text()
        async with s.get(f"{d.url}/v1/keys") as r:
            key = (await r.json())["keys"][0]
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key["public_key_hex"]))
    claims = jwt.decode(token, public, algorithms=["EdDSA"])
    assert claims["tmb.request-id"] == rid
    assert claims["submods"]["tmb-inference"]["ear.status"] == "warning"  # the gated engine decides `demo`


async def test_key_rotation_keeps_old_verdicts_and_checkpoints_verifiable(
    config: Config, tmp_path: Path
) -> None:
    runner, d, _ = await _daemon(config)
    async with aiohttp.ClientSession() as s:
        (rid,) = await _requests(s, d, 1)
        old_doc = await _verdict_with_proof(s, d, rid)
        async with s.get(f"{d.url}/v1/log/checkpoint") as r:
            old_note = await r.text()
    await runner.cleanup()
    toml = tmp_path / "tmb.toml"
    toml.write_text(
        f'[verdicts]\nkey_file = "{config.verdicts.key_file}"\n[store]\npath = "{config.store.path}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tmb",
        "keys",
        "rotate",
        "--config",
        str(toml),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"rotated:" in out and Path(config.verdicts.key_file).exists()
    assert list(Path(config.verdicts.key_file).parent.glob("*.retired-*"))
    runner, d, _ = await _daemon(config)
    try:
        async with aiohttp.ClientSession() as s:
            (rid2,) = await _requests(s, d, 1)
            new_doc = await _verdict_with_proof(s, d, rid2)
            async with s.get(f"{d.url}/v1/keys") as r:
                keys = await r.json()
            async with s.get(f"{d.url}/v1/log/checkpoint") as r:
                new_note = await r.text()
            old_size, new_size = int(old_note.split("\n")[1]), int(new_note.split("\n")[1])
            async with s.get(f"{d.url}/v1/log/proof/consistency?first={old_size}&second={new_size}") as r:
                proof = (await r.json())["proof"]
    finally:
        await runner.cleanup()
    current, retired = keys["keys"]
    assert (current["status"], retired["status"]) == ("current", "retired")
    assert old_doc["key_id"] == retired["key_id"] != new_doc["key_id"] == current["key_id"]
    assert retired["first_ns"] <= retired["last_ns"] <= current["first_ns"]
    verifiers = [parse_verifier_key(k) for k in keys["log"]["verifier_keys"]]
    assert len(verifiers) == 2
    assert check_inclusion(old_doc, verifiers)[0].ok and check_inclusion(new_doc, verifiers)[0].ok
    report, _, _ = check_consistency(old_note, new_note, proof, verifiers)
    assert report.ok, report.to_list()
    # the current key alone does not vouch for the old checkpoint
    assert check_inclusion(old_doc, verifiers[:1])[0].ids() == ["log.checkpoint_invalid"]
