"""The end-to-end demo (``tmb demo`` / ``make demo``): tmb's main job on 127.0.0.1, with real parts.

One process runs it all in one event loop, except the TPMs (one ``swtpm`` process per node)::

    client ──> load balancer ──> tmb serve proxy listener (verdict engine) ──> 5 sample workers
                                 tmb serve management listener (TLS, ingest)       │ SyntheticSource
                                        ^                                          │
                                        └──── probe per node (swtpm quotes, IMA log, telemetry chain)

Nodes: ``node-1`` and ``node-2`` honest; ``node-3`` an impostor (claims llama-1b/bf16/h100, behaves as
int8); ``node-4`` whose IMA log had an entry edited after it was extended into PCR 10; ``node-5`` that
mounted another model image than the commitment. Rounds of one request per worker (the daemon's round
robin gives each worker one), long enough for a fingerprint (``ignore_eos``, ``max_tokens`` x per-token
delay); in the second round node-1's probe is killed mid-request and restarted. Then evidence bundles and
HTML reports for round 1's requests, and the offline audit scenarios (:mod:`sample_infra.evidence_demo`).
Everything it started is stopped on the way out, also on Ctrl-C or SIGTERM.

The telemetry is SYNTHETIC (no GPU): the best decision is ``demo``, never ``verified``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from probes.agent import Probe
from probes.config import ProbeConfig
from sample_infra import demo_setup
from sample_infra.client import Client, Outcome
from sample_infra.demo_setup import BootedNode
from sample_infra.load_balancer import LoadBalancer
from sample_infra.notify_receiver import NotifyReceiver
from sample_infra.worker import WorkerConfig, WorkerNode
from tmb.errors import TmbError
from tmb.proxy.site import ProxyRunner, ProxySite

CLAIM = "llama-1b/bf16/h100"
IMPOSTOR = "llama-1b/int8/h100"
PROMPTS = (
    "Tell me about the workshop by the river.",
    "What does the ledger record at the end of the day?",
    "Describe the kitchen in the morning.",
    "Where did the old road lead?",
    "What did the keeper write about the rain?",
)


class DemoError(TmbError):
    """The demo could not be set up or did not get what it waited for."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    story: str  # what this node is, in the table
    expect: str  # the decision its requests should get
    behaves_as: str | None = None
    attack: str | None = None


NODES = (
    NodeSpec("node-1", "honest", "demo"),
    NodeSpec("node-2", "honest", "demo"),
    NodeSpec("node-3", "model substitution (int8 behind a bf16 claim)", "model_mismatch", IMPOSTOR),
    NodeSpec("node-4", "IMA log entry edited after the fact", "unattested", attack="tampered_log"),
    NodeSpec("node-5", "verity root != commitment (another image)", "unattested", attack="other_image"),
)


@dataclass(frozen=True)
class Settings:
    max_tokens: int = 200
    token_delay_s: float = 0.025  # 200 tokens: ~5 s of generation per request
    batch_interval_s: float = 0.5
    quote_period_s: float = 1.0
    wait_s: float = 20.0
    ready_timeout_s: float = 45.0
    kill_after_s: float = 2.0  # into round 2, node-1's probe is killed ...
    down_s: float = 1.0  # ... and restarted this much later
    offline: bool = True  # also run the offline audit scenarios (evidence_demo)


@dataclass(frozen=True)
class Row:
    """One request as the demo's table shows it."""

    round: str
    scenario: str
    expect: str
    outcome: Outcome

    @property
    def decision(self) -> str:
        return self.outcome.decision or self.outcome.verdict_state

    @property
    def reasons(self) -> list[dict[str, str]]:
        verdict = self.outcome.verdict or {}
        return [r for r in verdict.get("reasons", []) if r.get("id") != "window.widened"]

    @property
    def ok(self) -> bool:
        return self.outcome.signature == "ok" and self.decision == self.expect


@dataclass
class DemoResult:
    out: Path
    rows: list[Row] = field(default_factory=list)
    bundles: dict[str, Path] = field(default_factory=dict)  # label -> bundle directory
    reports: dict[str, Path] = field(default_factory=dict)  # label -> HTML report
    audits: dict[str, int] = field(default_factory=dict)  # label -> `tmb audit` exit status
    restart: dict[str, Any] = field(default_factory=dict)
    offline_table: str = ""
    offline_ok: bool = True
    notifications: list[dict[str, Any]] = field(default_factory=list)  # verified webhook events received
    notifications_refused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows) and self.offline_ok


class _ProbeRunner:
    """One node's probe as an asyncio task; ``kill`` cancels it abruptly (unsent evidence stays in its disk
    buffer), ``start`` runs a fresh Probe on the same state directory (it resumes the chain)."""

    def __init__(self, config: ProbeConfig, worker: WorkerNode) -> None:
        self.config, self.worker = config, worker
        self.probe: Probe | None = None
        self.task: asyncio.Task[None] | None = None
        self.generation = 0

    def start(self) -> Probe:
        self.probe = Probe(self.config, source=self.worker.source)
        self.task = asyncio.get_running_loop().create_task(self.probe.run(), name=f"probe-{self.config.node}")
        self.generation += 1
        return self.probe

    async def kill(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Demo:
    """Sets everything up in ``start`` (each part registered for teardown on ``stack``), runs rounds."""

    def __init__(self, out: Path, settings: Settings, say: Callable[[str], None]) -> None:
        self.out, self.settings, self.say = out, settings, say
        self.stack = AsyncExitStack()
        self.nodes: dict[str, BootedNode] = {}
        self.workers: dict[str, WorkerNode] = {}
        self.probes: dict[str, _ProbeRunner] = {}
        self.profiles: list[Path] = []
        self.daemon_url = self.lb_url = ""  # the proxy listener (customers, verdicts) and the balancer
        self.management_url = self.daemon_ca = ""  # where the probes send evidence, and the CA they pin
        self.client: Client | None = None
        self.notify = NotifyReceiver()  # the operator's webhook receiver: signed notifications

    async def start(self) -> None:
        out, s = self.out, self.settings
        commitment, self.commitment_path = demo_setup.commit_demo_model(out / "commitment")
        self.say(f"  model committed: llama-1b@sample-ngram-v1, verity root {commitment.root_hex[:16]}...")
        self.profiles = demo_setup.enrol_profiles([CLAIM, IMPOSTOR], out / "profiles")
        self.say(f"  fingerprint profiles enrolled from SYNTHETIC traces: {CLAIM}, {IMPOSTOR}")
        self.policy = demo_setup.policy_toml(commitment)
        (out / "policy.toml").write_text(self.policy)
        for spec in NODES:
            node = await asyncio.to_thread(
                demo_setup.boot_node, spec.name, out / "nodes" / spec.name, commitment, attack=spec.attack
            )
            self.stack.callback(node.swtpm.stop)
            self.nodes[spec.name] = node
            worker = WorkerNode(
                WorkerConfig(
                    node_id=spec.name,
                    claims=CLAIM,
                    behaves_as=spec.behaves_as,
                    token_delay_s=s.token_delay_s,
                    shutdown_grace_s=0.2,
                )
            )
            await worker.start()
            self.stack.push_async_callback(worker.stop)
            self.workers[spec.name] = worker
        self.say(
            f"  {len(NODES)} nodes booted: swtpm + AK + UEFI event log (PCRs 0-9 extended as firmware does)"
            " + IMA log (PCR 10 extended as the kernel does)"
        )
        await self.notify.start()  # the operator's webhook receiver ([notify] urls)
        self.stack.push_async_callback(self.notify.stop)
        await self._start_daemon()
        await self.notify.fetch_keys(self.daemon_url + "/v1/keys")
        for spec in NODES:
            self._start_probe(spec.name)
        await self._wait_ready()
        lb = LoadBalancer([self.daemon_url], health_path="/healthz", health_interval_s=1.0)
        self.lb_url = await lb.start()
        self.stack.push_async_callback(lb.stop)
        self.client = Client(
            self.lb_url,
            self.daemon_url,
            wait_s=10.0,
            deadline_s=s.wait_s + 40.0,
            extra_body={"ignore_eos": True},
        )
        await self.client.start()
        self.stack.push_async_callback(self.client.stop)
        await self.client.keys()
        self.say(f"  daemon {self.daemon_url}, load balancer {self.lb_url}, probes attested\n")

    async def _start_daemon(self) -> None:
        from sample_infra.tls import make_server_cert
        from tmb.config import load_config
        from tmb.daemon.app import DAEMON_KEY, build_app

        d = self.out / "daemon"
        d.mkdir(parents=True, exist_ok=True)
        s = self.settings
        tls = make_server_cert(d / "tls")  # the management listener's certificate; the probes pin the CA
        self.daemon_ca = str(tls.ca)
        lines = [
            "# tmb serve config written by the demo",
            '[server]\nhost = "127.0.0.1"\nport = 0\n',
            f'[management]\nhost = "127.0.0.1"\nport = 0\ntls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n',
            f'[verdicts]\ndemo = true\nkey_file = "{d / "verdict-key.pem"}"\n',
            f'[store]\npath = "{d / "tmb.sqlite3"}"\n',
            '[proxy]\nhealth_interval_s = 1.0\nhealth_path = "/health"\n',
            f'[attestation]\npolicy = "{self.out / "policy.toml"}"\ndb = "{d / "ingest.sqlite3"}"',
            f'commitments = ["{self.commitment_path}"]',
            f"wait_s = {s.wait_s}",
            "",
            f'[identity]\nek_roots = "{self._ek_roots(d / "ek-roots")}"\n',
            f'[fingerprint]\nprofiles = ["{self.out / "profiles"}"]\n',
            f'[notify]\nurls = ["{self.notify.url}"]\nbackoff_s = 0.2\nmax_backoff_s = 2.0\n',
        ]
        for name, w in self.workers.items():
            lines.append(
                f'[[workers]]\nname = "w-{name}"\nurl = "{w.url}"\nnode = "{name}"\n'
                f'gpus = ["{w.gpu_uuid}"]\nmodel = "{CLAIM}"\n'
            )
        path = self.out / "tmb.toml"
        path.write_text("\n".join(lines))
        self.config = load_config(path, env={})
        app: web.Application = await build_app(self.config)
        runner = ProxyRunner(app, handler_cancellation=True, access_log=None)  # as tmb serve: the fast engine
        await runner.setup()
        self.stack.push_async_callback(runner.cleanup)
        site = ProxySite(runner, "127.0.0.1", 0)
        await site.start()
        self.daemon_url = f"http://127.0.0.1:{site.addresses[0][1]}"
        self.management_url = app[DAEMON_KEY].management_url  # evidence ingest, over TLS

    def _ek_roots(self, into: Path) -> Path:
        """The trust store of the nodes' TPM "manufacturers": each swtpm's local CA (root and intermediate),
        so the probes enrol through the real protocol (EK certificate, credential activation)."""
        for name, node in self.nodes.items():
            ca = node.swtpm.state_dir.parent / (node.swtpm.state_dir.name + "-ca")
            (into / name).mkdir(parents=True, exist_ok=True)
            for cert in ("swtpm-localca-rootca-cert.pem", "issuercert.pem"):
                (into / name / cert).write_bytes((ca / cert).read_bytes())
        return into

    def _start_probe(self, name: str) -> None:
        node, s = self.nodes[name], self.settings
        config = ProbeConfig(
            node=name,
            daemon_url=self.management_url,
            daemon_ca=self.daemon_ca,
            tcti=node.swtpm.tcti,
            source="synthetic",
            batch_interval_s=s.batch_interval_s,
            quote_period_s=s.quote_period_s,
            ima_log=str(node.ima_log),
            eventlog=str(node.eventlog or ""),
            state_dir=str(node.ima_log.parent / "probe-state"),
            buffer_fsync=False,
            bind_pids=(os.getpid(),),  # the workers' process: the node's "GPU process"
            tpm_timeout_s=5.0,
            http_timeout_s=5.0,
        )
        runner = _ProbeRunner(config, self.workers[name])
        runner.start()
        self.stack.push_async_callback(lambda: runner.kill())
        self.probes[name] = runner

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while True:
            pending = [n for n, r in self.probes.items() if r.probe is None or r.probe.stats.quotes_acked < 1]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise DemoError("probes did not get a quote accepted in time", nodes=pending)
            for name, r in self.probes.items():
                if r.task is not None and r.task.done() and not r.task.cancelled() and r.task.exception():
                    raise DemoError(f"the probe of {name} stopped: {r.task.exception()}")
            await asyncio.sleep(0.1)

    async def round(self, label: str, scenario: Callable[[NodeSpec], str]) -> list[Row]:
        """One request per worker, all at once (the daemon's round robin spreads them)."""
        assert self.client is not None
        client = self.client
        jobs = [
            client.run_one(PROMPTS[i % len(PROMPTS)], stream=i % 2 == 1, max_tokens=self.settings.max_tokens)
            for i in range(len(NODES))
        ]
        outcomes = await asyncio.gather(*jobs)
        by_node = {spec.name: spec for spec in NODES}
        rows = []
        for o in outcomes:
            spec = by_node.get(o.node or "")
            if spec is None:
                rows.append(Row(label, "no verdict", "demo", o))
                continue
            rows.append(Row(label, scenario(spec), spec.expect, o))
        return sorted(rows, key=lambda r: r.outcome.node or "")

    async def restart_round(self, name: str) -> tuple[list[Row], dict[str, Any]]:
        """A round during which ``name``'s probe is killed mid-request and restarted."""
        s = self.settings
        runner = self.probes[name]
        before = runner.probe.stats if runner.probe else None

        async def chaos() -> dict[str, Any]:
            await asyncio.sleep(s.kill_after_s)
            await runner.kill()
            await asyncio.sleep(s.down_s)
            probe = runner.start()
            deadline = time.monotonic() + s.ready_timeout_s
            while probe.stats.quotes_acked < 1 and time.monotonic() < deadline:  # noqa: ASYNC110 (stats of a child)
                await asyncio.sleep(0.05)
            return {
                "node": name,
                "segments_before": before.segments if before else 0,
                "sealed_before": before.sealed if before else 0,
                "new_segment_quoted": probe.stats.quotes_acked >= 1,
                "refused_after": list(probe.stats.refused),
            }

        def scenario(spec: NodeSpec) -> str:
            return f"probe killed mid-request + restarted ({spec.story})" if spec.name == name else spec.story

        rows, info = await asyncio.gather(self.round("2", scenario), chaos())
        return rows, info


async def run_demo(
    out: Path, settings: Settings | None = None, say: Callable[[str], None] = print
) -> DemoResult:
    """Run the whole demo, leaving everything under ``out``; stops all it started before returning."""
    from sample_infra.demo_report import offline_scenarios, write_bundles

    s = settings or Settings()
    result = DemoResult(out)
    demo = Demo(out, s, say)
    async with demo.stack:
        say("setting up (everything on 127.0.0.1):")
        await demo.start()
        say("round 1: one request per worker")
        result.rows += await demo.round("1", lambda spec: spec.story)
        say("round 2: the same, and node-1's probe is killed mid-request and restarted")
        rows, result.restart = await demo.restart_round("node-1")
        result.rows += rows
        say("round 3: after the restart")
        result.rows += await demo.round("3", _after_restart)
        mismatches = {r.outcome.request_id for r in result.rows if r.decision == "model_mismatch"}
        await demo.notify.wait_for("verdict.model_mismatch", {m for m in mismatches if m}, 15.0)
        result.notifications, result.notifications_refused = demo.notify.events, demo.notify.refused
        say(f"webhook: {len(result.notifications)} signed notifications received and verified")
        say("writing evidence bundles (the daemon's export) and HTML reports")
        await write_bundles(demo, result)
        say("")
    if s.offline:
        say("offline audit scenarios")
        offline_scenarios(out / "offline", result)
    return result


def _after_restart(spec: NodeSpec) -> str:
    return spec.story + (" (after its probe restarted)" if spec.name == "node-1" else "")


def _install_signal_handlers(task: asyncio.Task[Any]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)


async def _main_async(out: Path, settings: Settings) -> DemoResult:
    from sample_infra.demo_report import render

    task = asyncio.current_task()
    assert task is not None
    _install_signal_handlers(task)
    result = await run_demo(out, settings)
    print(render(result))
    return result


def main(out: Path, settings: Settings | None = None) -> int:
    """``tmb demo --out DIR``: 0 when every request got the decision it should, else 1; 130 interrupted."""
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    print("tmb demo: per-request verdicts for AI inference on 127.0.0.1")
    print("(real swtpm quotes, IMA logs, dm-verity commitments, probes, daemon, load balancer and workers;")
    print(
        " GPU telemetry is SYNTHETIC -- there is no GPU -- so the best verdict is `demo`, never `verified`)\n"
    )
    try:
        result = asyncio.run(_main_async(out, replace(settings or Settings())))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"\ninterrupted: everything the demo started was stopped; partial output in {out}")
        return 130
    return 0 if result.ok else 1
