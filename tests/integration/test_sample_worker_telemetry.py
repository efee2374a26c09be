"""The sample worker's node telemetry follows the requests it really serves (real sockets on 127.0.0.1).

No timing asserts: busy samples are counted only as lower bounds implied by the worker's own pacing
(a request of N tokens lasts at least N token delays), waits are bounded loops on a condition.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from sample_infra.worker import WorkerConfig, WorkerNode, follow_activity
from tmb.telemetry import SampleBatch, SyntheticSource, features

CLAIM = "llama-1b/bf16/h100"


async def serve(node: WorkerNode, session: aiohttp.ClientSession, n: int, tokens: int) -> int:
    """``n`` sequential chat requests of exactly ``tokens`` tokens; the completion tokens reported."""
    total = 0
    for i in range(n):
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"Tell me about the market, part {i}."}],
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": i % 2 == 1,
        }
        async with session.post(f"{node.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            if body["stream"]:
                await resp.read()
                total += tokens
            else:
                total += (await resp.json())["usage"]["completion_tokens"]
    return total


async def test_idle_worker_stays_idle() -> None:
    node = WorkerNode(WorkerConfig(rate_hz=50.0))
    await node.start()
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/health", "/v1/models"):  # not inference: no GPU activity
                async with session.get(node.url + path) as resp:
                    assert resp.status == 200
            await asyncio.sleep(0.3)
        batch = node.source.read()
    finally:
        await node.stop()
    assert len(batch) >= 10 and batch.synthetic
    assert node.source.requests == 0 and node.source.tokens_generated == 0
    # Idle: NVML utilisation at 0 % but for the odd 1 % of noise; busy would read 80 % and more.
    assert float(np.median(batch.gpu_util)) == 0.0 and float(np.max(batch.gpu_util)) <= 5.0
    assert float(np.max(batch.power_w / batch.power_limit_w)) < 0.2


async def test_tokens_generated_make_busy_phases() -> None:
    node = WorkerNode(WorkerConfig(rate_hz=50.0, token_delay_s=0.005))
    await node.start()
    try:
        before = node.source.read()
        async with aiohttp.ClientSession() as session:
            total = await serve(node, session, 3, 60)
        during = node.source.read()
    finally:
        await node.stop()
    assert total == 180 and node.source.tokens_generated == 180 and node.source.requests == 3
    assert node.in_flight == 0
    busy = during.gpu_util >= 80.0
    # 180 tokens at >= 5 ms each is >= 0.9 s of decode, >= 45 samples at 50 Hz; leave room for edges.
    assert int(busy.sum()) >= 30
    assert float(np.mean(during.power_w[busy])) > float(np.mean(before.power_w)) + 50.0 or len(before) == 0
    assert float(np.mean(during.tensor_active[busy])) > 0.05


async def test_impostor_telemetry_follows_its_behaves_as_model() -> None:
    """Honest (bf16) and impostor (claims bf16, behaves as int8) under the same workload, same noise seed."""
    honest = WorkerNode(WorkerConfig(node_id="honest", claims=CLAIM, rate_hz=50.0, telemetry_seed=11))
    impostor = WorkerNode(
        WorkerConfig(
            node_id="impostor", claims=CLAIM, behaves_as="llama-1b/int8/h100", rate_hz=50.0, telemetry_seed=11
        )
    )
    await honest.start()
    await impostor.start()
    try:
        async with aiohttp.ClientSession() as session:
            # Both claim the same model through the same API ...
            for n in (honest, impostor):
                async with session.get(f"{n.url}/v1/models") as resp:
                    assert (await resp.json())["data"][0]["id"] == CLAIM
            await asyncio.gather(serve(honest, session, 4, 80), serve(impostor, session, 4, 80))
        batches = [honest.source.read(), impostor.source.read()]
    finally:
        await honest.stop()
        await impostor.stop()
    # ... but their telemetry is that of what they behave as.
    means = []
    for b in batches:
        f = features(b)
        busy = f["gpu_util"] >= 0.8
        assert int(busy.sum()) >= 30
        means.append({k: float(np.mean(f[k][busy])) for k in ("power_frac", "mem_util", "tensor_active")})
    h, i = means
    assert h["mem_util"] > i["mem_util"] + 0.04  # int8 weights: less memory traffic
    assert h["power_frac"] > i["power_frac"]
    assert h["tensor_active"] > i["tensor_active"]
    assert honest.source.describe()["workload"]["precision"] == "bf16"
    assert impostor.source.describe()["workload"]["precision"] == "int8"


async def test_activity_log_drives_an_out_of_process_source(tmp_path: Path) -> None:
    log = tmp_path / "activity.jsonl"
    node = WorkerNode(WorkerConfig(node_id="n1", activity_log=log, token_delay_s=0.002, rate_hz=50.0))
    probe_side = SyntheticSource("llama-1b/bf16/h100", rate_hz=50.0, seed=3)
    follower = asyncio.create_task(follow_activity(log, probe_side, poll_s=0.01))
    await node.start()
    try:
        async with aiohttp.ClientSession() as session:
            total = await serve(node, session, 2, 40)
        for _ in range(300):  # bounded wait for the follower to catch up
            if probe_side.tokens_generated == total and probe_side.requests == 2:
                break
            await asyncio.sleep(0.01)
        batch: SampleBatch = probe_side.read()
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await node.stop()
    assert probe_side.requests == 2 and probe_side.tokens_generated == total == 80
    assert int((batch.gpu_util >= 80.0).sum()) >= 5 and float(batch.gpu_util[0]) <= 5.0
    lines = log.read_text().splitlines()
    assert len(lines) == 2 + 80 + 2 and '"event":"start"' in lines[0] and '"node":"n1"' in lines[0]
