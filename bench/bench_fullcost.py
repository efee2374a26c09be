"""The full cost per request of a deployment: proxy + evidence ingest + scored, signed, stored verdicts.

bench_proxy.py measures the proxy with verdicts decided without telemetry (no ingest configured: every
verdict is ``unattested`` at once). Here the daemon has what a real deployment has: one node booted like
the demo's (swtpm, AK, measured boot, IMA log, the committed demo model's dm-verity rule), its probe in
another process posting SYNTHETIC telemetry (20 Hz, one batch a second) and a quote every 5 s over TLS to
the management listener, and the demo's two enrolled load-aware profiles (``[verdicts] demo = true``), so
every request's verdict waits for the evidence covering its window, then is scored against the claimed
profile and the alternatives, signed and stored.

Targets, side by side in one run (the same worker, the same wrk load, medians over ``--repeats``):
``nginx`` (the peer), ``tmb-full-cost`` (the daemon above). The daemon's CPU is counted from the start of a
wrk run until every span of it has its verdict (pending count 0 in its store, read from the SQLite file),
so the verdicts decided after wrk stopped are paid for. The probe's evidence costs the daemon CPU whether
requests come or not: the idle rate (CPU per second with no requests, measured first) is shown, and the
figure with that share taken off too. Prints the decisions the verdicts got, then the ratio LAST: daemon
CPU per request (everything included) / nginx CPU per request (small JSON).

With ``--grid-ms 0`` the daemon scores every request on its own window (``[verdicts] window_grid_ms = 0``),
as tmb did before windows were aligned; run it and the default alternately to compare the two.

    .venv/bin/python bench/bench_fullcost.py [--seconds 4] [--repeats 3] [--connections 16] [--grid-ms MS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_proxy import NGINX, TICK, WORKER, children, cpu_ticks, free_port, wait_http, wrk

from sample_infra import demo_setup
from sample_infra.demo import CLAIM, IMPOSTOR
from sample_infra.tls import make_server_cert
from tmb.config import VerdictsConfig

GPU = "GPU-bench-fullcost-0"
NODE = "node-1"

TMB = """
[server]
host = "127.0.0.1"
port = {port}
[management]
host = "127.0.0.1"
port = {mport}
tls_cert = "{cert}"
tls_key = "{key}"
[[workers]]
name = "w1"
url = "http://127.0.0.1:{worker}"
node = "{node}"
gpus = ["{gpu}"]
model = "{claim}"
max_concurrency = 1024
[proxy]
health_interval_s = 30
[verdicts]
demo = true
key_file = "{dir}/key.pem"
window_grid_ms = {grid_ms}
[store]
path = "{dir}/tmb.sqlite3"
retention_days = 0
[attestation]
policy = "{dir}/policy.toml"
db = "{dir}/ingest.sqlite3"
# wait_s: the default 20 s; 5 s (one quote period) left the windows that end just after a quote unattested
nodes = ["{node}={ak}"]
[identity]
ek_roots = "{dir}/ek-roots"
[fingerprint]
profiles = ["{dir}/profiles"]
"""

# The node's probe, in its own process (its CPU is the node's, not the daemon's). Its synthetic GPU serves
# one request at a time from start to end, like a busy inference worker.
PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from probes.agent import Probe
    from probes.config import ProbeConfig
    from tmb.telemetry.synthetic import SyntheticSource
    cfg = json.loads(sys.argv[1])
    source = SyntheticSource(cfg.pop("claim"), rate_hz=20.0, seed=7, gpu=cfg.pop("gpu"))
    source.request_started(tokens_expected=10**9, prompt_tokens=32)
    cfg["bind_pids"] = tuple(cfg["bind_pids"])
    asyncio.run(Probe(ProbeConfig(**cfg), source=source).run())
    """
)


def pending(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM spans WHERE pending IS NOT NULL").fetchone()[0])


def decisions(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT decision, count(*) FROM verdicts GROUP BY decision").fetchall()
    return {str(d): int(n) for d, n in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="longest wait for the verdicts")
    ap.add_argument(
        "--grid-ms",
        type=int,
        default=None,
        help="[verdicts] window_grid_ms of the daemon (default: tmb's default; 0: each window its own)",
    )
    ap.add_argument(
        "--py-spy", metavar="FILE", help="record the daemon with py-spy (raw) during the first run"
    )
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing: apt-get install -y {tool}", file=sys.stderr)
            return 2
    load_before = os.getloadavg()[0]
    grid_ms = args.grid_ms if args.grid_ms is not None else VerdictsConfig().window_grid_ms
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tmb-fullcost-") as d:
        tmp = Path(d)
        commitment, _ = demo_setup.commit_demo_model(tmp / "commitment")
        demo_setup.enrol_profiles([CLAIM, IMPOSTOR], tmp / "profiles")
        (tmp / "policy.toml").write_text(demo_setup.policy_toml(commitment))
        node = demo_setup.boot_node(NODE, tmp / "nodes" / NODE, commitment)
        # the TPM "manufacturer": the swtpm's local CA, so the probe enrols (EK certificate, credential)
        ca = node.swtpm.state_dir.parent / (node.swtpm.state_dir.name + "-ca")
        (tmp / "ek-roots").mkdir()
        for cert in ("swtpm-localca-rootca-cert.pem", "issuercert.pem"):
            (tmp / "ek-roots" / cert).write_bytes((ca / cert).read_bytes())
        try:
            wport, nport, tport, mport = free_port(), free_port(), free_port(), free_port()
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(wport)]))
            wait_http(f"http://127.0.0.1:{wport}/health")
            (tmp / "nginx.conf").write_text(NGINX.format(dir=tmp, worker=wport, port=nport))
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            procs.append(
                subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")])
            )
            tls = make_server_cert(tmp / "tls")
            (tmp / "tmb.toml").write_text(
                TMB.format(
                    dir=tmp,
                    port=tport,
                    mport=mport,
                    worker=wport,
                    node=NODE,
                    gpu=GPU,
                    claim=CLAIM,
                    ak=node.ak_path,
                    cert=tls.cert,
                    key=tls.key,
                    grid_ms=grid_ms,
                )
            )
            tmb = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tmb",
                    "serve",
                    "--config",
                    str(tmp / "tmb.toml"),
                    "--log-level",
                    "WARNING",
                ],
                stdout=subprocess.DEVNULL,
            )
            procs.append(tmb)
            wait_http(f"http://127.0.0.1:{nport}/health")
            wait_http(f"http://127.0.0.1:{tport}/health")
            probe_cfg = {
                "node": NODE, "daemon_url": f"https://127.0.0.1:{mport}", "daemon_ca": str(tls.ca),
                "tcti": node.swtpm.tcti, "source": "synthetic", "ima_log": str(node.ima_log),
                "eventlog": str(node.eventlog or ""), "state_dir": str(tmp / "probe-state"),
                "buffer_fsync": False, "bind_pids": [procs[0].pid], "claim": CLAIM, "gpu": GPU,
            }  # fmt: skip
            procs.append(subprocess.Popen([sys.executable, "-c", PROBE, json.dumps(probe_cfg)]))
            db = tmp / "tmb.sqlite3"
            time.sleep(7.0)  # the probe's first quote and batches land
            pids = [tmb.pid]
            t0, c0 = time.monotonic(), cpu_ticks(pids)
            time.sleep(4.0)
            idle_per_s = (cpu_ticks(pids) - c0) / TICK / (time.monotonic() - t0)  # ingest alone, no requests
            nginx_pids = [procs[1].pid, *children(procs[1].pid)]
            url_n, url_t = f"http://127.0.0.1:{nport}/json", f"http://127.0.0.1:{tport}/json"
            wrk(url_n, 1, args.connections)
            wrk(url_t, 1, args.connections)  # warm-up (its verdicts drain before the first repeat)
            nginx_us, full_us, net_us, rps_n, rps_t, drains = [], [], [], [], [], []
            for _ in range(args.repeats):
                deadline = time.monotonic() + args.drain_timeout
                while pending(db) and time.monotonic() < deadline:
                    time.sleep(0.2)
                before = cpu_ticks(nginx_pids)
                reqs, rps, _, _ = wrk(url_n, args.seconds, args.connections)
                nginx_us.append((cpu_ticks(nginx_pids) - before) / TICK * 1e6 / max(reqs, 1))
                rps_n.append(rps)
                spy = None
                if args.py_spy and not full_us:
                    spy = subprocess.Popen(
                        [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(tmb.pid),
                         "-r", "100", "-f", "raw", "-o", args.py_spy, "--threads", "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                t0, before = time.monotonic(), cpu_ticks(pids)
                reqs, rps, _, _ = wrk(url_t, args.seconds, args.connections)
                done = time.monotonic()
                while pending(db) and time.monotonic() < deadline:
                    time.sleep(0.1)
                left = pending(db)
                if left:
                    print(f"   {left} verdicts still pending after {args.drain_timeout:g} s", file=sys.stderr)
                cpu_s = (cpu_ticks(pids) - before) / TICK
                elapsed = time.monotonic() - t0
                drains.append(time.monotonic() - done)
                full_us.append(cpu_s * 1e6 / max(reqs, 1))
                net_us.append(max(cpu_s - idle_per_s * elapsed, 0.0) * 1e6 / max(reqs, 1))
                rps_t.append(rps)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
            got = decisions(db)
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            node.swtpm.stop()
    med = statistics.median
    print(
        f"wrk -t1 -c{args.connections}, {args.seconds}s x {args.repeats} repeats (medians); 127.0.0.1; "
        f"{os.cpu_count()} cores shared by load generator, worker, probe and proxy; load average before: "
        f"{load_before:.2f}"
    )
    print(
        "one node, probe at 20 Hz + a quote every 5 s; daemon CPU with no requests: "
        f"{idle_per_s * 1e3:.1f} ms/s; window grid: {grid_ms} ms"
    )
    print(f"verdict decisions (warm-up included): {got}")
    print(f"  nginx          {med(rps_n):8.0f} req/s  {med(nginx_us):8.1f} us CPU per request")
    print(
        f"  tmb-full-cost  {med(rps_t):8.0f} req/s  {med(full_us):8.1f} us CPU per request "
        f"({med(net_us):.1f} without the idle ingest share); verdicts drained {med(drains):.1f} s after wrk"
    )
    print(f"ratio tmb-full-cost (ingest + scored verdicts)/nginx CPU per request (small JSON): "
          f"{med(full_us) / max(med(nginx_us), 1e-9):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
