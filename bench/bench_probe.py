"""Probe CPU cost at 20 Hz sampling, 1 s batches, a 5 s quote period (synthetic source), as a share of one
core: process CPU time / wall time of this process running the probe (the daemon runs in a subprocess and
swtpm in its own process, neither counted), side by side with the peer: a bare loop doing only the source
reads for the same time. Medians of repeats; the ratio (probe share / bare share) is printed LAST.

    .venv/bin/python bench/bench_probe.py [--seconds 15] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from probes.agent import Probe
from probes.config import ProbeConfig
from probes.tpm import AK_HANDLE
from sample_infra.swtpm import Swtpm
from tmb.attest.ekcert import ek_pin
from tmb.attest.ima_build import LogBuilder
from tmb.telemetry.synthetic import SyntheticSource


async def bare(seconds: float) -> float:
    src = SyntheticSource(rate_hz=20.0)
    w0, c0 = time.monotonic(), time.process_time()
    async for _ in src.batches(1.0):
        if time.monotonic() - w0 >= seconds:
            break
    return (time.process_time() - c0) / (time.monotonic() - w0)


async def probe(cfg: ProbeConfig, seconds: float) -> tuple[float, int, int]:
    p = Probe(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop))
    w0, c0 = time.monotonic(), time.process_time()
    await asyncio.sleep(seconds)
    share = (time.process_time() - c0) / (time.monotonic() - w0)
    stop.set()
    await task
    return share, p.stats.batches_acked, p.stats.quotes_acked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        sw = Swtpm(tmp / "tpm")
        with sw.client() as tpm:
            ak = tpm.create_or_load_ak(AK_HANDLE)
            pin = ek_pin(tpm.ek_public("rsa"))  # this swtpm has no EK certificate: the daemon pins its EK
            with open(tmp / "ima", "wb") as fh:
                b = LogBuilder(fh).file("/usr/bin/tmb-probe", b"probe")
            tpm.pcr_extend(10, {k: b.extends[k] for k in ("sha1", "sha256")})
        assert ak.tpm2b_public is not None
        (tmp / "ak").write_bytes(ak.tpm2b_public)
        digest = hashlib.sha256(b"probe").hexdigest()
        (tmp / "policy.toml").write_text(
            f'version = 1\n[allow]\n"/usr/bin/tmb-probe" = ["sha256:{digest}"]\n'
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "tmb.ingest", "--db", str(tmp / "d.db"), "--port", str(port)]
        cmd += ["--policy", str(tmp / "policy.toml"), "--node", f"bench={tmp / 'ak'}", "--ek-pin", pin]
        daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert daemon.stdout is not None and daemon.stdout.readline().startswith("listening")
            probe_shares, bare_shares = [], []
            for rep in range(args.repeats):
                cfg = ProbeConfig(
                    node="bench",
                    daemon_url=f"http://127.0.0.1:{port}",
                    tcti=sw.tcti,
                    source="synthetic",
                    sample_rate_hz=20.0,
                    batch_interval_s=1.0,
                    quote_period_s=5.0,
                    ima_log=str(tmp / "ima"),
                    state_dir=str(tmp / f"state{rep}"),
                )
                share, batches, quotes = asyncio.run(probe(cfg, args.seconds))
                probe_shares.append(share)
                bare_shares.append(asyncio.run(bare(args.seconds)))
                print(
                    f"run {rep}: probe {share:.4f} core ({batches} batches, {quotes} quotes acked), "
                    f"bare sampling {bare_shares[-1]:.4f} core"
                )
        finally:
            daemon.terminate()
            daemon.wait()
            sw.stop()
    p, b = statistics.median(probe_shares), statistics.median(bare_shares)
    print(f"probe CPU share of one core (median): {p * 100:.2f} %")
    print(f"bare sampling loop CPU share (median): {b * 100:.2f} %")
    print(f"ratio probe / bare sampling: {p / b:.1f}x")


if __name__ == "__main__":
    main()
