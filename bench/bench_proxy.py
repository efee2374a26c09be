"""Proxy overhead: direct to a worker vs through nginx vs through `tmb serve`, in one run, on 127.0.0.1.

For small JSON responses and for SSE streams of 200 events, the same load generator (wrk, Debian package
``wrk``) drives each target for ``--seconds`` per repeat; medians over ``--repeats``. Printed per target:
requests/s, p50/p99 latency and the added p50/p99 over direct, and the proxy's CPU microseconds per request
(utime+stime deltas of the proxy's processes from /proc/<pid>/stat, divided by requests completed).
nginx (Debian ``nginx``) runs one worker process with ``proxy_buffering off`` and upstream keep-alive;
tmb runs with its defaults (uvloop when installed, ``[proxy] engine`` as given by ``--engine``, store ack
``commit``: every span is in SQLite before its response completes; ``sync = "normal"``: committed means
written to the WAL, which survives ``kill -9``) three times: ``tmb`` is ``tmb serve`` with its verdict
engine (every request gets a signed verdict; no evidence ingest is configured here, so verdicts are
``unattested`` and decided at once, without telemetry scoring: bench_verdicts.py measures that part),
``tmb-proxy`` the same daemon with the engine left out (spans still committed before each response
completes): the proxy's own cost, and ``tmb-full`` like ``tmb`` with ``sync = "full"`` (every group commit
fsynced before its responses complete: survives power loss). Then a fixed-rate run (``--rate`` req/s,
open loop) for the added latency when the proxy is not saturated (under wrk's closed loop every target
is saturated and latency is queueing), and the verdict rate of one core: sign + store (one transaction
each). The last lines are the ratios: tmb (and tmb-proxy) CPU per request / nginx CPU per request (small
JSON).

With ``--baseline DIR`` (a tree of another revision, e.g. ``git archive REV | tar -x -C DIR``), that
revision's ``tmb`` and ``tmb-proxy`` run too (``base``, ``base-proxy``: the same configs, ``PYTHONPATH=DIR``),
interleaved with the others, so before and after are measured side by side in one run.

    .venv/bin/python bench/bench_proxy.py [--seconds 4] [--repeats 3] [--connections 16] [--engine fast]
                                          [--rate 500] [--rate-seconds 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")

WORKER = textwrap.dedent(
    """
    import asyncio, json, logging, sys
    from aiohttp import web
    logging.disable(logging.CRITICAL)  # wrk closing its connections mid-response is not news
    try:
        import uvloop; uvloop.install()
    except ImportError:
        pass
    BODY = json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
    EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\\n\\n'
    async def js(request):
        return web.Response(body=BODY, content_type="application/json")
    async def sse(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(200):
            await resp.write(EVENT)
        await resp.write(b"data: [DONE]\\n\\n")
        await resp.write_eof()
        return resp
    async def health(request):
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_get("/json", js); app.router.add_get("/sse", sse); app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
    """
)

NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream worker {{ server 127.0.0.1:{worker}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""

TMB = """
[server]
host = "127.0.0.1"
port = {port}
[management]
port = 0
[[workers]]
name = "w1"
url = "http://127.0.0.1:{worker}"
node = "node-1"
gpus = ["GPU-bench"]
model = "m"
max_concurrency = 1024
[proxy]
health_interval_s = 30
engine = "{engine}"
[verdicts]
key_file = "{dir}/key.pem"
[store]
path = "{dir}/tmb{port}.sqlite3"
retention_days = 0
sync = "{sync}"
"""

NO_VERDICTS = textwrap.dedent(
    """
    import asyncio, sys
    from tmb.config import load_config
    from tmb.proxy.site import ProxyRunner, ProxySite
    from tmb.daemon.app import build_app
    from tmb.daemon.serve import freeze_startup_heap, install_uvloop
    class NoVerdicts:  # every verdict stays pending
        async def on_spans(self, spans):
            pass
    async def main():
        config = load_config(sys.argv[1])
        app = await build_app(config, engine=NoVerdicts())
        runner = ProxyRunner(app, handler_cancellation=True, access_log=None)  # as tmb serve does
        await runner.setup()
        await ProxySite(runner, "127.0.0.1", config.server.port, backlog=1024).start()
        freeze_startup_heap()  # as tmb serve does
        await asyncio.Event().wait()
    install_uvloop()
    asyncio.run(main())
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (the bench's own 127.0.0.1 daemon)
                r.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]


def wrk(url: str, seconds: int, connections: int) -> tuple[int, float, float, float]:
    """(requests, requests/s, p50 ms, p99 ms)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    reqs = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = to_ms(re.search(r"^\s*50%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    p99 = to_ms(re.search(r"^\s*99%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    if "Non-2xx" in out or "Socket errors" in out:
        print(
            "   wrk reported errors:",
            " ".join(line.strip() for line in out.splitlines() if "rror" in line or "Non-2xx" in line),
        )
    return reqs, rps, p50, p99


def measure(url: str, pids: list[int], seconds: int, connections: int) -> tuple[float, float, float, float]:
    """(requests/s, p50 ms, p99 ms, proxy CPU us per request) for one repeat."""
    before = cpu_ticks(pids) if pids else 0
    reqs, rps, p50, p99 = wrk(url, seconds, connections)
    after = cpu_ticks(pids) if pids else 0
    cpu_us = (after - before) / TICK * 1e6 / max(reqs, 1) if pids else 0.0
    return rps, p50, p99, cpu_us


async def _get(pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], port: int, path: str) -> None:
    reused = bool(pool)
    conn = pool.pop() if pool else await asyncio.open_connection(HOST, port)
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        if not reused:
            raise
        # the server closed an idle keep-alive connection (nginx: keepalive_requests): a fresh one
        return await _get([], port, path) if not pool else await _get(pool, port, path)
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if not head.startswith(b"HTTP/1.1 200") or m is None:
        raise RuntimeError(f"unexpected response from port {port}: {head[:200]!r}")
    await reader.readexactly(int(m[1]))
    if not re.search(rb"(?i)\r\nconnection:\s*close", head):
        pool.append(conn)
    else:
        writer.close()


def fixed_rate(port: int, path: str, rate: int, seconds: float) -> tuple[float, float]:
    """Open-loop load: one GET every 1/rate s (on idle keep-alive connections, new ones when none is
    idle); latency counted from each request's scheduled time, so a stall is not hidden. (p50, p99) ms."""

    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        lat: list[float] = []

        async def one(at: float) -> None:
            await _get(pool, port, path)
            lat.append(loop.time() - at)

        t0 = loop.time() + 0.05
        tasks = []
        for i in range(int(rate * seconds)):
            at = t0 + i / rate
            await asyncio.sleep(max(0.0, at - loop.time()))
            tasks.append(asyncio.ensure_future(one(at)))
        await asyncio.gather(*tasks)
        for _, writer in pool:
            writer.close()
        return lat

    lat = sorted(asyncio.run(run()))
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def verdict_rate(tmp: Path, n: int) -> tuple[float, float]:
    """(signatures/s, sign+store/s) on this core."""
    from tmb.verdict.model import Decision, Reason, Verdict, Window
    from tmb.verdict.signing import load_or_create_key
    from tmb.verdict.store import EvidenceRef, Store

    signer = load_or_create_key(tmp / "rate-key.pem")
    store = Store(tmp / "rate.sqlite3")
    base = Verdict(
        "0" * 32,
        None,
        "w1",
        "node-1",
        ("GPU-1",),
        "m",
        "m",
        Window(1, 2, True),
        {"policy_ok": True, "pcr10": "00" * 32},
        {"p_value": "0.5", "samples": 40},
        Decision.DEMO,
        (Reason("telemetry.synthetic", "synthetic"),),
        "synthetic",
        1,
    )
    import dataclasses

    t0 = time.perf_counter()
    for i in range(n):
        signer.sign(dataclasses.replace(base, request_id=f"{i:032x}"))
    sign_rate = n / (time.perf_counter() - t0)
    refs = [EvidenceRef("quote", "ab" * 32, "node-1"), EvidenceRef("telemetry_batch", "cd" * 32, "node-1")]
    t0 = time.perf_counter()
    for i in range(n):
        store.put_verdict(signer.sign(dataclasses.replace(base, request_id=f"{n + i:032x}")), refs)
    store_rate = n / (time.perf_counter() - t0)
    store.close()
    return sign_rate, store_rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--verdicts", type=int, default=2000)
    ap.add_argument("--engine", choices=("fast", "aiohttp"), default="fast", help="[proxy] engine of tmb")
    ap.add_argument("--rate", type=int, default=500, help="requests/s of the fixed-rate latency run")
    ap.add_argument("--rate-seconds", type=float, default=3.0)
    ap.add_argument("--baseline", metavar="DIR", help="a tree of another revision: its tmb runs alongside")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing: apt-get install -y {tool}", file=sys.stderr)
            return 2
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tmb-bench-") as d:
        tmp = Path(d)
        try:
            wport, nport, tport, pport = free_port(), free_port(), free_port(), free_port()
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(wport)]))
            wait_http(f"http://{HOST}:{wport}/health")
            (tmp / "nginx.conf").write_text(NGINX.format(dir=tmp, worker=wport, port=nport))
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            procs.append(
                subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")])
            )
            fport = free_port()
            for name, port, sync in (
                ("tmb", tport, "normal"),
                ("proxy", pport, "normal"),
                ("full", fport, "full"),
            ):
                (tmp / f"{name}.toml").write_text(
                    TMB.format(dir=tmp, worker=wport, port=port, engine=args.engine, sync=sync)
                )
            procs.append(
                subprocess.Popen(
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
            )
            procs.append(subprocess.Popen([sys.executable, "-c", NO_VERDICTS, str(tmp / "proxy.toml")]))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tmb", "serve", "--config", str(tmp / "full.toml")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_http(f"http://{HOST}:{nport}/health")
            wait_http(f"http://{HOST}:{tport}/health")
            wait_http(f"http://{HOST}:{pport}/health")
            wait_http(f"http://{HOST}:{fport}/health")
            nginx_pids = [procs[1].pid, *children(procs[1].pid)]
            targets = {
                "direct": (wport, []),
                "nginx": (nport, nginx_pids),
                "tmb": (tport, [procs[2].pid]),
                "tmb-proxy": (pport, [procs[3].pid]),
                "tmb-full": (fport, [procs[4].pid]),
            }
            if args.baseline:
                env = {**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve())}
                bport, bpport = free_port(), free_port()
                for name, port in (("base", bport), ("base-proxy", bpport)):
                    (tmp / f"{name}.toml").write_text(
                        TMB.format(dir=tmp, worker=wport, port=port, engine=args.engine, sync="normal")
                    )
                base_cmd = [sys.executable, "-m", "tmb", "serve", "--config", str(tmp / "base.toml")]
                procs.append(subprocess.Popen([*base_cmd, "--log-level", "WARNING"], env=env, cwd=tmp))
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", NO_VERDICTS, str(tmp / "base-proxy.toml")], env=env, cwd=tmp
                    )
                )
                wait_http(f"http://{HOST}:{bport}/health")
                wait_http(f"http://{HOST}:{bpport}/health")
                targets["base"] = (bport, [procs[-2].pid])
                targets["base-proxy"] = (bpport, [procs[-1].pid])
            results: dict[tuple[str, str], tuple[float, float, float, float]] = {}
            for workload, path in (("json", "/json"), ("sse200", "/sse")):
                for port, _ in targets.values():
                    wrk(f"http://{HOST}:{port}{path}", 1, args.connections)  # warm-up
                runs: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in targets}
                for _ in range(args.repeats):  # interleaved, so drift hits every target alike
                    for name, (port, pids) in targets.items():
                        runs[name].append(
                            measure(f"http://{HOST}:{port}{path}", pids, args.seconds, args.connections)
                        )
                for name, rs in runs.items():
                    med = tuple(statistics.median(r[i] for r in rs) for i in range(4))
                    results[(workload, name)] = med  # type: ignore[assignment]
            print(
                f"wrk -t1 -c{args.connections}, {args.seconds}s x {args.repeats} repeats (medians); "
                f"127.0.0.1; {os.cpu_count()} cores shared by load generator, worker and proxy; "
                f"tmb engine {args.engine}; load average before: {load_before:.2f}"
            )
            print(
                f"{'workload':8} {'target':9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
                f"{'+p99 ms':>8} {'proxy CPU us/req':>17}"
            )
            for workload in ("json", "sse200"):
                _, d50, d99, _ = results[(workload, "direct")]
                for name in targets:
                    rps, p50, p99, cpu = results[(workload, name)]
                    extra = (
                        f"{p50 - d50:8.3f} {p99 - d99:8.3f} {cpu:17.1f}"
                        if name != "direct"
                        else f"{'':8} {'':8} {'':>17}"
                    )
                    print(f"{workload:8} {name:9} {rps:9.0f} {p50:8.3f} {p99:8.3f} {extra}")
            fixed: dict[str, list[tuple[float, float]]] = {n: [] for n in targets}
            for _ in range(args.repeats):
                for name, (port, _) in targets.items():
                    fixed[name].append(fixed_rate(port, "/json", args.rate, args.rate_seconds))
            print(
                f"fixed rate {args.rate} req/s for {args.rate_seconds:g}s x {args.repeats} (open loop, "
                "Python client; latency from each request's scheduled time; medians):"
            )
            d50 = statistics.median(r[0] for r in fixed["direct"])
            d99 = statistics.median(r[1] for r in fixed["direct"])
            for name in targets:
                p50 = statistics.median(r[0] for r in fixed[name])
                p99 = statistics.median(r[1] for r in fixed[name])
                added = f"  +p50 {p50 - d50:.3f} ms  +p99 {p99 - d99:.3f} ms" if name != "direct" else ""
                print(f"  {name:9} p50 {p50:.3f} ms  p99 {p99:.3f} ms{added}")
            sign_rate, store_rate = verdict_rate(tmp, args.verdicts)
            print(
                f"verdicts on one core: sign {sign_rate:.0f}/s, sign + store "
                f"(one SQLite FULL-sync transaction each) {store_rate:.0f}/s"
            )
            sse_ratio = results[("sse200", "tmb")][3] / max(results[("sse200", "nginx")][3], 1e-9)
            print(f"SSE-200 ratio tmb/nginx CPU per request: {sse_ratio:.2f}")
            ratio = results[("json", "tmb")][3] / max(results[("json", "nginx")][3], 1e-9)
            proxy_ratio = results[("json", "tmb-proxy")][3] / max(results[("json", "nginx")][3], 1e-9)
            full_ratio = results[("json", "tmb-full")][3] / max(results[("json", "nginx")][3], 1e-9)
            for name in ("base", "base-proxy"):
                if name in targets:
                    base_ratio = results[("json", name)][3] / max(results[("json", "nginx")][3], 1e-9)
                    print(f"ratio {name} (baseline)/nginx CPU per request (small JSON): {base_ratio:.2f}")
            print(f"ratio tmb-full (sync full)/nginx CPU per request (small JSON): {full_ratio:.2f}")
            print(f"ratio tmb-proxy (no verdicts)/nginx CPU per request (small JSON): {proxy_ratio:.2f}")
            print(f"ratio tmb/nginx CPU per request (small JSON): {ratio:.2f}")
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
