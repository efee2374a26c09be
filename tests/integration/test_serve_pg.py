"""Two daemons sharing one PostgreSQL store (``[store] url``): a request proxied by one has its verdict
served by the other, pending first, then final and verifiable with the shared key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import aiohttp
from test_proxy_support import WorkerState, make_config, workers
from test_serve_api import GatedEngine

from tmb.config import StoreConfig
from tmb.verdict.signing import load_public_keys, verify_verdict

__all__ = ["workers"]


async def test_two_daemons_share_verdicts_through_postgresql(
    tmp_path: Path, workers: dict[str, tuple[WorkerState, int]], pg_url: str
) -> None:
    engines = [GatedEngine(), GatedEngine()]

    base = make_config(tmp_path, [("a", workers["a"][1])])
    config = dataclasses.replace(base, store=StoreConfig(path=str(tmp_path / "unused.sqlite3"), url=pg_url))
    runner_a, a = await engines[0].start(config)
    runner_b, b = await engines[1].start(config)  # same key file, same database
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{a.url}/json", json={"model": "m-a"}) as r:
                rid = r.headers["X-TMB-Request-Id"]
                await r.read()
            async with s.get(f"{b.url}/v1/verdicts/{rid}") as r:  # B never saw the request
                assert r.status == 202
            engines[0].gate.set()  # A's engine publishes
            async with s.get(f"{b.url}/v1/verdicts/{rid}?wait=20") as r:
                assert r.status == 200
                body = await r.read()
            async with s.get(f"{b.url}/v1/keys") as r:
                keys = load_public_keys(await r.read(), "b/v1/keys")
            async with s.get(f"{b.url}/v1/evidence/{rid}") as r:
                assert [e["kind"] for e in (await r.json())["evidence"]] == ["quote", "telemetry_batch"]
        doc = json.loads(body)
        assert doc["request_id"] == rid and doc["worker"] == "a"
        assert verify_verdict(doc, keys).ok
        assert not (tmp_path / "unused.sqlite3").exists()  # the SQLite file was not used
    finally:
        for e in engines:
            e.gate.set()
        await runner_a.cleanup()
        await runner_b.cleanup()
