"""A real aiohttp worker whose node telemetry (synthetic source) follows the requests it serves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

from tmb.telemetry import SampleBatch, SyntheticSource
from tmb.telemetry.record import record_async
from tmb.telemetry.replay import read_trace


def worker_app(source: SyntheticSource, spans: list[tuple[int, int]]) -> web.Application:
    async def generate(request: web.Request) -> web.Response:
        tokens = int(request.query.get("tokens", "16"))
        start = time.time_ns()
        source.request_started(tokens_expected=tokens, prompt_tokens=512)
        for _ in range(tokens):
            await asyncio.sleep(0.02)
            source.token_generated()
        source.request_finished()
        spans.append((start, time.time_ns()))
        return web.json_response({"tokens": tokens})

    app = web.Application()
    app.router.add_get("/generate", generate)
    return app


async def test_worker_telemetry_follows_requests() -> None:
    source = SyntheticSource("llama-1b/bf16/h100", seed=4)
    spans: list[tuple[int, int]] = []
    runner = web.AppRunner(worker_app(source, spans))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    parts: list[SampleBatch] = []
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(0.3)
            parts.append(source.read())
            for _ in range(2):
                async with session.get(f"http://127.0.0.1:{port}/generate?tokens=15") as resp:
                    assert resp.status == 200
                await asyncio.sleep(0.4)
                parts.append(source.read())
    finally:
        await runner.cleanup()
    batch = SampleBatch.concat(parts)
    assert batch.synthetic and source.tokens_generated == 30 and source.requests == 2
    inside = np.zeros(len(batch), dtype=bool)
    near = np.zeros(len(batch), dtype=bool)
    for start, end in spans:
        inside |= (batch.t_ns >= start + 60_000_000) & (batch.t_ns < end)  # past prefill, before finish
        near |= (batch.t_ns >= start - 60_000_000) & (batch.t_ns < end + 300_000_000)  # incl. power lag
    assert inside.sum() >= 4
    assert float(batch.gpu_util[inside].min()) >= 80.0  # decode: a kernel is nearly always running
    assert float(np.median(batch.gpu_util[~near])) == 0.0  # no request: idle
    assert float(batch.power_w[inside].mean()) > float(batch.power_w[~near].mean()) + 80.0


async def test_record_a_live_synthetic_source(tmp_path: Path) -> None:
    source = SyntheticSource("tiny-160m/bf16/h100", seed=1, rate_hz=50.0)
    source.request_started()
    trace = await record_async(source, 0.4, tmp_path / "live.trace", interval_s=0.2)
    back = read_trace(tmp_path / "live.trace")
    assert back.batch == trace.batch and back.synthetic and back.meta["source"] == "synthetic"
    assert back.meta["workload"]["workload_model"] == "tiny-160m/bf16/h100" and back.meta["findings"] == []
    assert len(back.batch) >= 15  # ~0.4 s at 50 Hz, however slow the machine: samples follow the clock
