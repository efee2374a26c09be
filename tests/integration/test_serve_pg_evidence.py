"""Two daemons on one PostgreSQL, end to end over HTTP: a node's probe (real swtpm) enrols with daemon A
and sends its signed evidence to A's management listener only; a client's request goes through daemon B's
proxy listener; B's verdict is decided on the evidence A took (shared through the database, B's engine woken
by A's NOTIFY), and A serves the same signed verdict."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
from swtpm import SwtpmFactory
from test_probe_e2e import wait_until
from test_probe_support import NODE, make_node
from test_proxy_support import WorkerState, make_config, start_daemon, workers

from probes.agent import Probe
from tmb.attest.ekcert import ek_pin
from tmb.config import AttestationConfig, IdentityConfig, StoreConfig
from tmb.verdict.signing import load_public_keys, verify_verdict

__all__ = ["workers"]


def policy_toml(doc: dict[str, Any]) -> str:
    """The node's runtime policy (test_probe_support's dict) as the TOML file the daemon reads."""
    lines = [f"version = {doc['version']}", "[allow]"]
    lines += [f"{json.dumps(path)} = {json.dumps(digests)}" for path, digests in doc["allow"].items()]
    lines += ["[require]", f"paths = {json.dumps(doc['require']['paths'])}"]
    for rule in doc["verity"]:
        lines += ["[[verity]]", *(f"{k} = {json.dumps(v)}" for k, v in rule.items())]
    return "\n".join(lines) + "\n"


async def test_evidence_at_one_daemon_decides_a_request_through_the_other(
    tmp_path: Path,
    swtpm_factory: SwtpmFactory,
    workers: dict[str, tuple[WorkerState, int]],
    pg_url: str,
) -> None:
    env = make_node(tmp_path, swtpm_factory)
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(env.policy_doc))

    base = make_config(tmp_path, [("a", workers["a"][1])])
    worker = dataclasses.replace(base.workers[0], node=NODE)
    attestation = AttestationConfig(policy=str(policy), wait_s=60.0)
    # The probe enrols with A (credential activation); this swtpm's EK has no certificate: trusted by pin.
    identity = IdentityConfig(ek_pins=(ek_pin(env.tpm.ek_public("rsa")),))
    config = dataclasses.replace(
        base,
        workers=(worker,),
        attestation=attestation,
        identity=identity,
        store=StoreConfig(path=str(tmp_path / "unused.sqlite3"), url=pg_url),
    )
    runner_a, a = await start_daemon(config)
    runner_b, b = await start_daemon(config)  # same key file, same database
    probe = Probe(env.probe_config(a.management_url))
    stop = asyncio.Event()
    task = asyncio.create_task(probe.run(stop))
    try:
        await wait_until(lambda: probe.stats.quotes_acked >= 1, timeout_s=60)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{b.url}/json", json={"model": "m-a"}) as r:
                assert r.status == 200
                rid = r.headers["X-TMB-Request-Id"]
                await r.read()
            for _ in range(4):  # pending (202) until a quote covers the window; each wait is at most 30 s
                async with s.get(f"{b.url}/v1/verdicts/{rid}?wait=30") as r:
                    status, doc = r.status, await r.json()
                if status == 200:
                    break
                assert status == 202, doc
            assert status == 200, doc
            async with s.get(f"{a.url}/v1/verdicts/{rid}") as r:
                assert r.status == 200 and await r.json() == doc  # one verdict, whichever daemon serves it
            async with s.get(f"{b.url}/v1/keys") as r:
                keys = load_public_keys(await r.read(), "b/v1/keys")
            async with s.get(f"{b.url}/v1/evidence/{rid}") as r:
                kinds = [e["kind"] for e in (await r.json())["evidence"]]
        assert verify_verdict(doc, keys).ok
        assert doc["node"] == NODE and doc["decision"] != "unattested", doc
        attestation_doc = doc["attestation"]
        assert attestation_doc["verified"] and attestation_doc["pcr_matched"], attestation_doc
        assert attestation_doc["policy_ok"] and attestation_doc["verity_ok"], attestation_doc
        assert doc["telemetry_source"] == "synthetic"  # the probe's synthetic source, labelled as such
        assert kinds == ["quote", "ak", "policy", "telemetry_window"], kinds
        families = {r["id"].split(".")[0] for r in doc["reasons"]}
        assert not families & {"attestation", "quote", "ima", "chain"}, doc["reasons"]
        assert probe.stats.refused == [], probe.stats.refused
        assert not (tmp_path / "unused.sqlite3").exists()  # neither daemon used its SQLite file
    finally:
        stop.set()
        await task
        await runner_a.cleanup()
        await runner_b.cleanup()
        env.close()
