"""Forged evidence against an enrolled node: how many of N forged batch posts the daemon takes, and what the
flood costs the honest probe.

An ingest on 127.0.0.1 (SQLite file, the node's EK pinned), a real probe on an swtpm (synthetic telemetry,
20 Hz, a batch every 0.2 s, a quote every 0.5 s) enrolled through the protocol; for ``--seconds`` the honest
probe runs alone, then again while ``--clients`` tasks post forged batches (a chain of their own, signed
with a guessed key) as fast as the daemon answers. Prints the forged posts sent and taken, the honest
batches attested per second in each phase, and LAST the ratio flood / alone (1.0: the flood costs nothing).

    PATH=/usr/sbin:$PATH .venv/bin/python bench/bench_forged_flood.py [--seconds 8] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "tests"),
    str(Path(__file__).resolve().parents[1] / "tests" / "integration"),
]

from test_probe_support import NODE, make_node, serve  # noqa: E402

from probes.agent import Probe  # noqa: E402
from probes.chain import Chain  # noqa: E402
from sample_infra.swtpm import Swtpm  # noqa: E402
from tmb.ingest.auth import HEADER, sign_request  # noqa: E402


async def main(seconds: float, clients: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        started: list[Swtpm] = []

        def factory(**kw: object) -> Swtpm:
            sw = Swtpm(tmp / f"tpm{len(started)}")
            started.append(sw)
            return sw

        env = make_node(tmp, factory)
        ingest = env.ingest()
        try:
            async with serve(ingest) as url:
                probe = Probe(env.probe_config(url))
                stop = asyncio.Event()
                task = asyncio.create_task(probe.run(stop))
                while ingest.pinned(NODE) is None or ingest.store.count_batches(NODE, attested=True) < 3:
                    await asyncio.sleep(0.1)
                a0 = ingest.store.count_batches(NODE, attested=True)
                await asyncio.sleep(seconds)
                alone = (ingest.store.count_batches(NODE, attested=True) - a0) / seconds
                sent = taken = 0
                forged = Chain(NODE)
                body = json.dumps({"batches": [forged.genesis("synthetic").to_wire()]}).encode()
                deadline = time.monotonic() + seconds

                async def flood(http: aiohttp.ClientSession) -> None:
                    nonlocal sent, taken
                    while time.monotonic() < deadline:
                        header = sign_request(os.urandom(32), "POST", NODE, "batches", body)
                        async with http.post(
                            f"{url}/v1/ingest/{NODE}/batches", data=body, headers={HEADER: header}
                        ) as resp:
                            await resp.read()
                            sent += 1
                            taken += resp.status == 200

                a1 = ingest.store.count_batches(NODE, attested=True)
                async with aiohttp.ClientSession() as http:
                    await asyncio.gather(*(flood(http) for _ in range(clients)))
                flooded = (ingest.store.count_batches(NODE, attested=True) - a1) / seconds
                stop.set()
                await task
            print(f"forged batch posts sent: {sent} in {seconds:g} s, taken: {taken}")
            print(f"honest batches attested per second: alone {alone:.2f}, under the flood {flooded:.2f}")
            print(f"ratio flood / alone: {flooded / alone:.2f}")
        finally:
            ingest.close()
            env.close()
            for sw in started:
                sw.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    asyncio.run(main(args.seconds, args.clients))
