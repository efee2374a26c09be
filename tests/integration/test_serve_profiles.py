"""Profile upload on the real daemon: ``POST /admin/profiles`` installs an enrolled profile the engine then
scores with; bad uploads are 400 with the reason, and the endpoint needs the admin token."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import aiohttp
from test_proxy_support import make_config, start_daemon

from tmb.config import AdminConfig, FingerprintConfig
from tmb.fingerprint import enroll
from tmb.serve import ENGINE_KEY
from tmb.telemetry.synthetic import generate
from tmb.verdict.engine import Engine

TOKEN = "admin-token-for-tests"


async def test_upload_installs_a_profile_the_engine_uses(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    config = dataclasses.replace(
        make_config(tmp_path, []),
        admin=AdminConfig(enabled="true", token=TOKEN),
        fingerprint=FingerprintConfig(profiles=(str(profiles),)),
    )
    profile, _ = enroll(
        "llama-1b",
        [generate("llama-1b/bf16/h100", "batched", 40, seed=s) for s in range(3)],
        precision="bf16",
        gpu_type="h100",
        regime="batched",
        window_s=5,
    )
    saved = tmp_path / "upload.json"
    profile.save(saved)
    runner, daemon = await start_daemon(config)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{daemon.url}/admin/profiles", data=saved.read_bytes()) as r:
                assert r.status == 401  # no token
            async with s.post(f"{daemon.url}/admin/profiles", data=b'{"version": 1}', headers=auth) as r:
                assert r.status == 400
                assert (await r.json())["error"]["type"] == "bad_profile"
            assert list(profiles.iterdir()) == []  # nothing half-written is left behind
            async with s.post(f"{daemon.url}/admin/profiles", data=saved.read_bytes(), headers=auth) as r:
                assert r.status == 201, await r.text()
                key = (await r.json())["profile"]
        assert key == profile.key
        stored = list(profiles.glob("*.json"))
        assert len(stored) == 1 and json.loads(stored[0].read_text())["model"] == "llama-1b"
        engine = daemon.app[ENGINE_KEY]
        assert isinstance(engine, Engine) and [p.key for p in engine.profiles] == [key]
        assert engine.scorer is not None
    finally:
        await runner.cleanup()
