"""Evidence bundles over HTTP from a daemon built as ``tmb serve`` builds it, on real sockets of 127.0.0.1,
with a swtpm node's evidence taken by its ingest: who may read them ([auditors] tokens, or loopback when
none is set), on which listener, the tar archive ``tmb audit`` checks, and the refusals in the envelope."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from identity_support import swtpm_store
from swtpm import SwtpmFactory
from test_evidence_export import policy_toml
from test_probe_support import NODE, NodeEnv, make_node
from test_proxy_support import Daemon, make_config, start_daemon

from probes.chain import Chain
from probes.enrol import enrol
from probes.tpm import AK_HANDLE
from tmb.attest.ekcert import TrustStore
from tmb.attest.evidence import audit_bundle
from tmb.config import AttestationConfig, AuditorsConfig, IdentityConfig
from tmb.telemetry.sample import SampleBatch

TOKEN = "9f2c4e6a8b0d1f3a5c7e9b1d3f5a7c9e"
OTHER = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
RID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def node(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Any:
    env = make_node(tmp_path, swtpm_factory)
    yield env
    env.close()


async def daemon(tmp: Path, node: NodeEnv, auditors: AuditorsConfig) -> tuple[Any, Daemon, int]:
    """A daemon with an ingest, the node's evidence over the last seconds taken and quoted."""
    policy = tmp / "policy.toml"
    policy.write_text(policy_toml(node.policy_doc))
    config = dataclasses.replace(
        make_config(tmp, []), attestation=AttestationConfig(policy=str(policy)), auditors=auditors
    )
    runner, d = await start_daemon(config)
    ingest = d.parts.ingest
    assert ingest is not None and node.ak.tpm2b_public is not None
    ingest.register_node(NODE, node.ak.tpm2b_public)
    chain = Chain(NODE)
    now = time.time_ns()
    batches = [chain.genesis("synthetic")]
    for k in range(3):
        t = now - 3_000_000_000 + k * 1_000_000_000
        samples = SampleBatch.from_columns([t], ["GPU-x"], source="synthetic", power_w=[100.0])
        batches.append(chain.seal(samples.encode()))
    assert ingest.add_batches(NODE, {"batches": [b.to_wire() for b in batches]}).accepted
    assert ingest.add_ima(NODE, node.ima_doc()).accepted
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    assert ingest.add_quote(NODE, node.quote_doc(nonce, batches[-1].head)).data["ok"]
    return runner, d, now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def get(session: aiohttp.ClientSession, url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as resp:
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, (await resp.json())
        return resp.status, body


def unpack(data: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert all(n == "bundle" or n.startswith("bundle/") for n in names), names
        tar.extractall(dest, filter="data")
    return dest / "bundle"


async def test_auditor_tokens_listeners_and_the_node_range(
    node: NodeEnv, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    runner, d, now = await daemon(tmp_path, node, AuditorsConfig(tokens=(TOKEN, OTHER)))
    try:
        m = d.management_url
        rng = f"{m}/v1/nodes/{NODE}/evidence?from={now - 3_000_000_000}&to={now}"
        # the proxy listener never serves a bundle, token or not
        status, doc = await get(session, f"{d.url}/v1/evidence/{RID}/bundle", TOKEN)
        assert status == 404 and doc["error"]["type"] == "management_listener_only"
        status, doc = await get(session, rng)
        assert status == 401 and doc["error"]["type"] == "auditor_token_required"
        status, doc = await get(session, rng, "not-" + TOKEN)
        assert status == 403 and doc["error"]["type"] == "auditor_token_invalid"
        status, doc = await get(session, f"{m}/v1/evidence/{RID}/bundle", OTHER)  # the second token works
        assert status == 404 and doc["error"]["type"] == "unknown_request"
        status, doc = await get(session, f"{m}/v1/evidence/NOT-AN-ID/bundle", TOKEN)
        assert status == 400 and doc["error"]["type"] == "bad_request_id"
        for query in ("from=5&to=5", "from=x&to=9", f"from=0&to={8 * 24 * 3600 * 10**9}", "to=9"):
            status, doc = await get(session, f"{m}/v1/nodes/{NODE}/evidence?{query}", TOKEN)
            assert status == 400 and doc["error"]["type"] == "bad_range", query
        status, doc = await get(session, f"{m}/v1/nodes/no-such-node/evidence?from=1&to=2", TOKEN)
        assert status == 404 and doc["error"]["type"] == "export_refused"

        status, body = await get(session, rng, TOKEN)
        assert status == 200, body
        bundle = unpack(body, tmp_path / "got")
        signer = d.parts.signer
        result = audit_bundle(bundle, daemon_keys=[signer.public.raw])
        assert result.ok and len(result.quotes) == 1, [(f.id, f.context) for f in result.report.errors]
    finally:
        await runner.cleanup()


async def test_loopback_only_without_tokens_and_the_size_bound(
    node: NodeEnv, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    runner, d, now = await daemon(tmp_path, node, AuditorsConfig(max_bundle_bytes=1024))
    try:
        rng = f"{d.management_url}/v1/nodes/{NODE}/evidence?from={now - 3_000_000_000}&to={now}"
        status, doc = await get(session, rng)  # a loopback client, no token configured: allowed ...
        assert status == 413 and doc["error"]["type"] == "bundle_too_large"  # ... but over the bound
    finally:
        await runner.cleanup()


async def test_openapi_documents_the_bundles_on_the_management_listener_only(
    node: NodeEnv, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    runner, d, _ = await daemon(tmp_path, node, AuditorsConfig(tokens=(TOKEN,)))
    try:
        _, proxy_doc = await get(session, f"{d.url}/openapi.json")
        _, mgmt_doc = await get(session, f"{d.management_url}/openapi.json")
        bundles = {"/v1/evidence/{id}/bundle", "/v1/nodes/{node}/evidence"}
        assert bundles <= set(mgmt_doc["paths"]) and not bundles & set(proxy_doc["paths"])
    finally:
        await runner.cleanup()


async def test_two_daemons_on_postgresql_share_the_nonce_log_over_http(
    node: NodeEnv, tmp_path: Path, session: aiohttp.ClientSession, pg_url: str
) -> None:
    """Daemon A hands out a nonce on its management listener; the probe's quote over it is taken by daemon
    B, and refused as a replay by A; either daemon's bundle carries the nonce log entry, signed with the
    shared verdict key, and audits offline."""
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(node.policy_doc))
    base = make_config(tmp_path, [])
    config = dataclasses.replace(
        base,
        attestation=AttestationConfig(policy=str(policy)),
        # the node is registered by its AK and posts unsigned (the enrolled, signed path across two daemons
        # is test_serve_pg_evidence's): this test is about the shared nonce log
        identity=IdentityConfig(insecure_static_nodes=True),
        auditors=AuditorsConfig(tokens=(TOKEN,)),
        store=dataclasses.replace(base.store, url=pg_url),
    )
    runner_a, a = await start_daemon(config)
    runner_b, b = await start_daemon(config)  # the same database and key file
    try:
        assert a.parts.ingest is not None and node.ak.tpm2b_public is not None
        a.parts.ingest.register_node(NODE, node.ak.tpm2b_public)
        chain = Chain(NODE)
        now = time.time_ns()
        batches = [chain.genesis("synthetic")]
        for k in range(2):
            t = now - 2_000_000_000 + k * 1_000_000_000
            samples = SampleBatch.from_columns([t], ["GPU-x"], source="synthetic", power_w=[100.0])
            batches.append(chain.seal(samples.encode()))

        async def post(d: Daemon, what: str, doc: Any) -> tuple[int, Any]:
            async with session.post(f"{d.management_url}/v1/ingest/{NODE}/{what}", json=doc) as resp:
                return resp.status, await resp.json()

        assert (await post(a, "batches", {"batches": [x.to_wire() for x in batches]}))[0] == 200
        assert (await post(b, "ima", node.ima_doc()))[0] == 200
        status, doc = await get(session, f"{a.management_url}/v1/ingest/{NODE}/nonce")
        assert status == 200, doc
        quote = node.quote_doc(bytes.fromhex(doc["nonce"]), batches[-1].head)
        status, doc = await post(b, "quotes", quote)
        assert status == 200 and doc["ok"], doc
        status, doc = await post(a, "quotes", quote)  # delivered again, to the other daemon: the same quote
        assert status == 200 and doc["duplicate"] is True, doc
        replay = dict(quote, signature=base64.b64encode(b"\x01" * 72).decode())  # not that quote
        status, doc = await post(a, "quotes", replay)
        assert status == 409 and doc["error"]["type"] == "ingest.nonce_reused", doc

        rng = f"/v1/nodes/{NODE}/evidence?from={now - 2_000_000_000}&to={now}"
        for d, name in ((a, "from-a"), (b, "from-b")):
            status, body = await get(session, d.management_url + rng, TOKEN)
            assert status == 200, body
            bundle = unpack(body, tmp_path / name)
            entries = json.loads((bundle / "nonces.json").read_text())["entries"]
            assert [e["nonce"] for e in entries] == [quote["nonce"]]
            result = audit_bundle(bundle, daemon_keys=[a.parts.signer.public.raw])
            assert result.ok, [(f.id, f.context) for f in result.report.errors]
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()


async def test_an_enrolled_node_with_a_keyring_policy_audits_from_the_daemons_tar(
    tmp_path: Path, swtpm_factory: SwtpmFactory, session: aiohttp.ClientSession
) -> None:
    """End to end as ``tmb serve`` builds it: [identity] ek_roots of the swtpm's manufacturer, a policy
    naming a [keyrings] ima certificate; the probe enrols over HTTP with its certified EK, the node range's
    tar holds the EK record and the keyring, and ``tmb audit --ek-roots`` passes on it alone."""
    node = make_node(tmp_path, lambda: swtpm_factory(ek_cert=True))
    try:
        roots = tmp_path / "roots"
        swtpm_store(node.swtpm.state_dir, roots)
        conf = tmp_path / "etc"
        (conf / "keys").mkdir(parents=True)
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (conf / "keys" / "vendor.pem").write_bytes(pem)
        policy = conf / "policy.toml"
        policy.write_text(policy_toml(node.policy_doc) + '[keyrings]\nima = ["keys/vendor.pem"]\n')
        config = dataclasses.replace(
            make_config(tmp_path, []),
            attestation=AttestationConfig(policy=str(policy)),
            auditors=AuditorsConfig(tokens=(TOKEN,)),
            identity=IdentityConfig(ek_roots=str(roots)),
        )
        runner, d = await start_daemon(config)
        try:
            m = d.management_url

            async def post(route: str, doc: dict[str, Any]) -> tuple[int, Any]:
                async with session.post(f"{m}/v1/ingest/{NODE}/{route}", json=doc) as resp:
                    return resp.status, await resp.json()

            async def tpm(fn: Any) -> Any:
                return fn(node.tpm)

            _, answer = await enrol(NODE, AK_HANDLE, post, tpm)
            assert answer["ek_trust"] == "certified"
            ingest = d.parts.ingest
            assert ingest is not None
            chain = Chain(NODE)
            now = time.time_ns()
            batches = [chain.genesis("synthetic")]
            for k in range(2):
                t = now - 2_000_000_000 + k * 1_000_000_000
                samples = SampleBatch.from_columns([t], ["GPU-x"], source="synthetic", power_w=[100.0])
                batches.append(chain.seal(samples.encode()))
            assert ingest.add_batches(NODE, {"batches": [b.to_wire() for b in batches]}).accepted
            assert ingest.add_ima(NODE, node.ima_doc()).accepted
            nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
            assert ingest.add_quote(NODE, node.quote_doc(nonce, batches[-1].head)).data["ok"]

            status, body = await get(
                session, f"{m}/v1/nodes/{NODE}/evidence?from={now - 3 * 10**9}&to={now}", TOKEN
            )
            assert status == 200, body
            bundle = unpack(body, tmp_path / "got")
            assert (bundle / "ek" / "public.bin").read_bytes() == node.tpm.ek_public("rsa")
            assert (bundle / "policy-files" / "0-vendor.pem").read_bytes() == pem
            keys = [d.parts.signer.public.raw]
            result = audit_bundle(bundle, daemon_keys=keys, ek_roots=TrustStore.from_directory(roots))
            assert result.ok, [(f.id, f.context) for f in result.report.errors]
            assert "audit.ek_not_rechecked" not in [f.id for f in result.report]
            assert "identity.key_not_pinned" not in [f.id for f in result.report]
        finally:
            await runner.cleanup()
    finally:
        node.close()
