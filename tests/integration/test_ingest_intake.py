"""The evidence intake has threads of its own: a verdict engine that fills the event loop's default executor
(a backlog of window reads after a burst of requests) must not hold the probes' requests, whose answers
would time out on the probe (it would resend, and the evidence would arrive late for every verdict)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiohttp
from swtpm import SwtpmFactory
from test_probe_support import NODE, make_node, serve

WAIT_S = 30.0  # a hang, not a speed: the requests are answered at once, or never while the executor is full


async def test_a_full_default_executor_does_not_hold_the_evidence_intake(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    env = make_node(tmp_path, swtpm_factory)
    ingest = env.ingest()
    release = threading.Event()
    loop = asyncio.get_running_loop()
    # more blocked jobs than the default executor has threads: anything queued there waits for `release`
    jammed = [loop.run_in_executor(None, release.wait) for _ in range(64)]
    try:
        async with serve(ingest) as url, aiohttp.ClientSession() as http:
            async with asyncio.timeout(WAIT_S):
                # the route's authentication runs on the intake: an unsigned request is answered 401
                async with http.get(f"{url}/v1/ingest/{NODE}/nonce") as resp:
                    assert resp.status == 401 and (await resp.json())["error"]["type"].startswith("auth.")
                # and the evidence itself (the route's next step) is taken on the intake's threads
                got = await ingest.submit(NODE, lambda node, _: threading.current_thread().name)
            assert got.startswith("tmb-ingest") and not release.is_set()
    finally:
        release.set()
        await asyncio.gather(*jammed)
    env.close()
