"""Profile upload on the real daemon: ``POST /admin/profiles`` installs an enrolled profile the engine then
scores with; bad uploads are 400 with the reason, and the endpoint needs the admin token."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import aiohttp
from test_proxy_support import make_config, start_daemon

from sample_infra.demo_setup import enrol_profiles
from tmb.config import AdminConfig, FingerprintConfig
from tmb.fingerprint import load_profile
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
    (saved,) = enrol_profiles(["llama-1b/bf16/h100"], tmp_path / "enrolled", seconds=30)
    profile = load_profile(saved)
    runner, daemon = await start_daemon(config)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{daemon.management_url}/admin/profiles", data=saved.read_bytes()) as r:
                assert r.status == 401  # no token
            async with s.post(
                f"{daemon.management_url}/admin/profiles", data=b'{"version": 1}', headers=auth
            ) as r:
                assert r.status == 400
                assert (await r.json())["error"]["type"] == "bad_profile"
            old = json.dumps({**profile.to_dict(), "version": 1}).encode()  # format 1: not load-aware
            async with s.post(f"{daemon.management_url}/admin/profiles", data=old, headers=auth) as r:
                assert r.status == 400 and "re-enrol" in await r.text()
            assert list(profiles.iterdir()) == []  # nothing half-written is left behind
            async with s.post(
                f"{daemon.management_url}/admin/profiles", data=saved.read_bytes(), headers=auth
            ) as r:
                assert r.status == 201, await r.text()
                key = (await r.json())["profile"]
        assert key == profile.key
        stored = list(profiles.glob("*.json"))
        assert len(stored) == 1 and json.loads(stored[0].read_text())["model"] == "llama-1b"
        engine = daemon.parts.engine
        assert isinstance(engine, Engine) and [p.key for p in engine.profiles] == [key]
        assert engine.judge is not None
    finally:
        await runner.cleanup()
