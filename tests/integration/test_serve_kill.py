"""`tmb serve` as a real subprocess: kill -9 under load, restart, every completed request still has its
(pending) verdict and span -- the store acknowledged it before the response completed (ack = "commit")."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
from test_proxy_support import HOST, WorkerState, start, worker_app

CONFIG = """
[server]
host = "127.0.0.1"
port = 0

[management]
port = 0

[[workers]]
name = "w1"
url = "http://127.0.0.1:{port}"
node = "node-1"
gpus = ["GPU-1"]
model = "m1"
max_concurrency = 64

[verdicts]
key_file = "{dir}/key.pem"

[store]
path = "{dir}/tmb.sqlite3"
ack = "commit"
"""


async def start_daemon(config: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tmb",
        "serve",
        "--config",
        str(config),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "TMB_PROXY_HEALTH_INTERVAL_S": "1"},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    m = re.search(r"listening on (http://\S+)", line)
    assert m, line
    return proc, m[1]


async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    runner, port = await start(worker_app(WorkerState("w1")))
    config = tmp_path / "tmb.toml"
    config.write_text(CONFIG.format(port=port, dir=tmp_path))
    proc, url = await start_daemon(config)
    completed: list[str] = []
    stop = asyncio.Event()

    async def client(s: aiohttp.ClientSession, i: int) -> None:
        while not stop.is_set():
            path = "/sse?n=3" if i % 2 else "/json"
            try:
                async with (
                    s.post(f"{url}{path}", json={"model": "m1"})
                    if path == "/json"
                    else s.get(url + path) as r
                ):
                    await r.read()  # raises if the response did not complete
                    if r.status == 200:
                        completed.append(r.headers["X-TMB-Request-Id"])
            except (aiohttp.ClientError, OSError):
                return

    try:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.ensure_future(client(s, i)) for i in range(8)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while len(completed) < 150 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # mid-load: requests are in flight
            await proc.wait()
            stop.set()
            await asyncio.gather(*tasks)
        assert len(completed) >= 150
        snapshot = list(completed)
        proc, url = await start_daemon(config)
        async with aiohttp.ClientSession() as s:
            for rid in snapshot:
                # Acknowledged before the kill, so known after it: decided by the engine (resumed at
                # start-up for those still pending); no attestation is configured here -> unattested.
                async with s.get(f"{url}/v1/verdicts/{rid}?wait=20") as r:
                    assert r.status == 200, (rid, r.status)
                    doc = await r.json()
                    assert doc["request_id"] == rid and doc["decision"] == "unattested"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)
        await runner.cleanup()
    assert proc.returncode == 0  # SIGTERM: clean shutdown
    assert HOST == "127.0.0.1"
