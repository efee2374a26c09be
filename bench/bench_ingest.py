"""Daemon ingest throughput: how many nodes at 20 Hz (one 20-sample batch a second, a quote every 5 s) one
daemon core verifies.

Calls :class:`tmb.ingest.service.Ingest` directly (digest, canonical decode, chain checks, SQLite commit per
request; quote: signature, nonce, qualifying data, PCR digest, incremental IMA replay, policy, verity) with
one swtpm-made quote per node re-used (its nonce re-issued before each use). HTTP parsing is not included.
Prints batches/s and quotes/s per CPU second (medians of repeats), then the ratio against the arrival rate of
one node (1 batch/s + 0.2 quote/s) LAST: the number of nodes one core keeps up with.

    .venv/bin/python bench/bench_ingest.py [--nodes 20] [--batches 40] [--quotes 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from probes.chain import Chain
from probes.tpm import AK_HANDLE
from sample_infra.swtpm import Swtpm
from tmb.attest.ima_build import LogBuilder
from tmb.attest.policy import policy_from_dict
from tmb.ingest.service import Ingest
from tmb.ingest.wire import TelemetryBatch
from tmb.telemetry.synthetic import SyntheticSource

ROOT, SALT = "ab" * 32, "cd" * 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--batches", type=int, default=40, help="batches per node per repeat")
    ap.add_argument("--quotes", type=int, default=20, help="quotes verified per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        sw = Swtpm(tmp / "tpm")
        try:
            run(args, tmp, sw)
        finally:
            sw.stop()


def run(args: argparse.Namespace, tmp: Path, sw: Swtpm) -> None:
    import base64
    import hashlib

    from tmb.ingest.wire import qualifying_data

    with sw.client() as tpm:
        ak = tpm.create_or_load_ak(AK_HANDLE)
        with open(tmp / "ima", "wb") as fh:
            lb = LogBuilder(fh)
            built = [lb.file("boot_aggregate", b"boot"), lb.file("/usr/bin/tmb-probe", b"probe")]
            built += lb.mount_verity("model", root_digest=ROOT, salt=SALT, data_blocks=16)
        for b in built:
            tpm.pcr_extend(10, {k: b.extends[k] for k in ("sha1", "sha256")})
        ima = (tmp / "ima").read_bytes()
        policy = policy_from_dict(
            {
                "version": 1,
                "allow": {
                    "boot_aggregate": ["sha256:" + hashlib.sha256(b"boot").hexdigest()],
                    "/usr/bin/tmb-probe": ["sha256:" + hashlib.sha256(b"probe").hexdigest()],
                },
                "require": {"paths": ["/usr/bin/tmb-probe"]},
                "verity": [{"name": "m", "root_digest": ROOT, "salt": SALT, "data_blocks": 16}],
            }
        )
        src = SyntheticSource(rate_hz=20.0, clock=lambda: 0)
        payloads = [src.read(until_ns=k * 10**9 + 10**9 - 1).encode() for k in range(args.batches)]
        batch_rates, quote_rates = [], []
        for rep in range(args.repeats):
            ingest = Ingest(tmp / f"ingest{rep}.db", policy=policy)
            nodes = [f"node-{i}" for i in range(args.nodes)]
            chains: dict[str, list[TelemetryBatch]] = {}
            for node in nodes:
                assert ak.tpm2b_public is not None
                ingest.register_node(node, ak.tpm2b_public)
                chain = Chain(node)
                chains[node] = [chain.genesis("synthetic"), *(chain.seal(p) for p in payloads)]
            t0 = time.process_time()
            for k in range(args.batches + 1):
                for node in nodes:
                    out = ingest.add_batches(node, {"batches": [chains[node][k].to_wire()]})
                    assert out.status == 200, out.body
            batch_rates.append(args.nodes * (args.batches + 1) / (time.process_time() - t0))
            # one swtpm quote per node, reused: its nonce is re-issued before each verification
            node = nodes[0]
            head = chains[node][-1].head
            nonce = bytes(32)
            q = tpm.quote(AK_HANDLE, {"sha256": [10]}, qualifying_data(nonce, head.digest))
            doc = {
                "message": base64.b64encode(q.message).decode(),
                "signature": base64.b64encode(q.signature).decode(),
                "pcrs": q.pcrs.to_dict(),
                "nonce": nonce.hex(),
                "head": head.to_wire(),
            }
            assert ingest.add_ima(node, {"offset": 0, "data": base64.b64encode(ima).decode()}).status == 200
            t0 = time.process_time()
            for _ in range(args.quotes):
                ingest.nonces.issued.setdefault(node, {})[nonce] = time.monotonic()
                out = ingest.add_quote(node, doc)
                assert out.status == 200 and out.body["ok"], out.body
            quote_rates.append(args.quotes / (time.process_time() - t0))
            ingest.close()
    b, q = statistics.median(batch_rates), statistics.median(quote_rates)
    per_node_cost = 1.0 / b + 0.2 / q  # CPU seconds per node per second
    print(f"batches verified per CPU second: {b:.0f} (runs: {', '.join(f'{x:.0f}' for x in batch_rates)})")
    print(f"quotes verified per CPU second:  {q:.0f} (runs: {', '.join(f'{x:.0f}' for x in quote_rates)})")
    print("one node at 20 Hz sends 1 batch/s (20 samples) and 0.2 quote/s")
    print(f"nodes x 20 Hz per daemon core (ratio to one node's arrival rate): {1.0 / per_node_cost:.0f}")


if __name__ == "__main__":
    main()
