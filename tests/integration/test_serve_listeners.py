"""The daemon's two listeners on real sockets of 127.0.0.1: the evidence ingest and the admin routes answer on
the management listener only; on the proxy listener every spelling of their paths is a 404 with the error
envelope and never reaches a worker (both proxy engines). TLS on either listener with a CA made here, a
probe's connection pinning it (and refusing another CA), and the config errors for unusable TLS files.

Decided: a path is a management path when its normal form (percent escapes decoded once, repeated slashes
merged, dot segments resolved, lower case: :func:`tmb.proxy.contract.normal_form`) lies under
``/v1/ingest`` or ``/admin``; whole segments only (``/v1/ingestion``, ``/administrator`` are workers').
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from test_proxy_fast import read_response
from test_proxy_support import HOST, Daemon, WorkerState, engine, make_config, start_daemon, workers

from probes.config import ProbeConfig
from sample_infra.tls import make_server_cert
from tmb.config import AdminConfig, AttestationConfig, Config, ManagementConfig, ServerConfig
from tmb.daemon.app import build_app
from tmb.errors import ConfigError

__all__ = ["engine", "workers"]
TOKEN = "admin-token-for-listener-tests"
W = dict[str, tuple[WorkerState, int]]

# Every spelling of the management paths tried on the proxy listener (method, request target).
ATTACKS = [
    ("GET", "/v1/ingest/node-a/nonce"),
    ("POST", "/v1/ingest/node-a/batches"),
    ("POST", "/v1/ingest/node-a/ima?offset=0"),
    ("PUT", "/v1/ingest/admin/nodes/node-a"),
    ("GET", "/v1/ingest"),
    ("GET", "/v1/ingest/"),
    ("GET", "/v1/ingest/node%2Da/nonce"),
    ("GET", "/v1/ingest%2Fnode-a/nonce"),
    ("GET", "/v1%2Fingest/node-a/nonce"),
    ("GET", "/%76%31/%69ngest/node-a/nonce"),
    ("GET", "//v1/ingest/node-a/nonce"),
    ("GET", "/v1//ingest/node-a/nonce"),
    ("GET", "///v1///ingest"),
    ("GET", "/./v1/ingest/node-a/nonce"),
    ("GET", "/v1/./ingest/node-a/nonce"),
    ("GET", "/x/../v1/ingest/node-a/nonce"),
    ("GET", "/x/%2E%2E/v1/ingest/node-a/nonce"),
    ("GET", "/V1/ingest/node-a/nonce"),
    ("GET", "/v1/INGEST/node-a/nonce"),
    ("POST", "/V1/Ingest/node-a/quotes"),
    ("GET", "/admin/workers"),
    ("POST", "/admin/workers"),
    ("POST", "/admin/prune"),
    ("GET", "/admin"),
    ("GET", "/admin/"),
    ("GET", "/%61dmin/workers"),
    ("GET", "//admin/workers"),
    ("GET", "/ADMIN/workers"),
    ("POST", "/Admin/profiles"),
    ("GET", "/x/../admin/workers"),
    ("DELETE", "/admin/anything"),
]


def policy(tmp_path: Path) -> str:
    path = tmp_path / "policy.toml"
    path.write_text('version = 1\n[allow]\n"boot_aggregate" = ["sha256:' + "00" * 32 + '"]\n')
    return str(path)


def config_for(tmp_path: Path, workers: W, engine: str = "fast") -> Config:
    config = make_config(tmp_path, [("a", workers["a"][1])], engine=engine)
    return dataclasses.replace(
        config,
        admin=AdminConfig(token=TOKEN),
        attestation=AttestationConfig(policy=policy(tmp_path)),
    )


@pytest.fixture
async def daemon(tmp_path: Path, workers: W, engine: str) -> AsyncIterator[Daemon]:
    runner, d = await start_daemon(config_for(tmp_path, workers, engine))
    yield d
    await runner.cleanup()


async def raw(url: str, method: str, target: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request with ``target`` sent exactly as written (an HTTP client would normalise it)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"Content-Type: application/json\r\nConnection: close\r\n\r\n" + body)
        return await read_response(reader)
    finally:
        writer.close()


@pytest.mark.parametrize(("method", "target"), ATTACKS)
async def test_management_paths_are_404_on_the_proxy_listener_in_every_spelling(
    daemon: Daemon, workers: W, method: str, target: str
) -> None:
    hits = workers["a"][0].hits
    status, headers, body = await raw(daemon.url, method, target, b"{}")
    assert status == 404, (target, status, body)
    assert json.loads(body)["error"]["type"] == "management_listener_only", body
    assert "x-tmb-request-id" not in headers  # the daemon answered: no exchange with a worker began
    await asyncio.sleep(0.05)
    assert daemon.spans == [] and workers["a"][0].hits == hits


@pytest.mark.parametrize("target", ["/v1/ingestion", "/administrator", "/echo/v1/ingest", "/x/admin"])
async def test_paths_that_only_look_alike_are_relayed(daemon: Daemon, target: str) -> None:
    status, headers, _ = await raw(daemon.url, "GET", target)
    assert status == 404 and len(headers["x-tmb-request-id"]) == 32  # the worker's own 404


async def test_ingest_and_admin_answer_on_the_management_listener(daemon: Daemon) -> None:
    mgmt = daemon.management_url
    assert mgmt.startswith("http://127.0.0.1:") and mgmt != daemon.url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{mgmt}/v1/ingest/node-a/nonce") as r:  # the ingest's own refusal: unknown node
            doc = await r.json()
            assert r.status in (401, 403, 404) and doc["error"]["type"] != "management_listener_only", doc
        async with s.get(f"{mgmt}/admin/workers", headers=auth) as r:
            assert r.status == 200 and set(await r.json()) == {"a"}
        async with s.get(f"{mgmt}/admin/workers") as r:
            assert r.status == 401
        for url in (daemon.url, mgmt):  # the public reads on both
            async with s.get(f"{url}/v1/keys") as r:
                assert r.status == 200
            async with s.get(f"{url}/healthz") as r:
                assert r.status in (200, 503)
        async with s.get(f"{daemon.url}/openapi.json") as r:
            assert not [p for p in (await r.json())["paths"] if p.startswith("/admin")]
        async with s.get(f"{mgmt}/openapi.json") as r:
            assert "/admin/workers" in (await r.json())["paths"]
        async with s.post(f"{daemon.url}/json", json={"model": "m-a"}) as r:  # customers still get through
            assert r.status == 200 and len(r.headers["X-TMB-Request-Id"]) == 32
        async with s.post(
            f"{mgmt}/json", json={"model": "m-a"}
        ) as r:  # the management listener proxies nothing
            assert r.status == 404 and "X-TMB-Request-Id" not in r.headers


# -- TLS -----------------------------------------------------------------------------------------------
def tls_config(tmp_path: Path, workers: W, *, server: bool) -> tuple[Config, Path]:
    cert = make_server_cert(tmp_path / "tls", HOST)
    config = config_for(tmp_path, workers)
    management = ManagementConfig(host=HOST, port=0, tls_cert=str(cert.cert), tls_key=str(cert.key))
    config = dataclasses.replace(config, management=management)
    if server:
        config = dataclasses.replace(
            config, server=ServerConfig(host=HOST, port=0, tls_cert=str(cert.cert), tls_key=str(cert.key))
        )
    return config, cert.ca


async def probe_get(config: ProbeConfig, path: str) -> int:
    """A GET the way the probe's session makes its requests (tmb-probe's connector and TLS context)."""
    tls = config.tls_context()
    connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(config.daemon_url + path) as r:
        await r.read()
        return r.status


async def test_probe_pins_the_management_listeners_ca_and_refuses_another(tmp_path: Path, workers: W) -> None:
    config, ca = tls_config(tmp_path, workers, server=False)
    other = make_server_cert(tmp_path / "other", HOST, name="someone else").ca
    runner, d = await start_daemon(config)
    try:
        mgmt = d.management_url
        assert mgmt.startswith("https://127.0.0.1:")
        pinned = ProbeConfig(node="node-a", daemon_url=mgmt, daemon_ca=str(ca))
        assert await probe_get(pinned, "/healthz") in (200, 503)
        other_ca = ProbeConfig(node="node-a", daemon_url=mgmt, daemon_ca=str(other))
        system_cas = ProbeConfig(node="node-a", daemon_url=mgmt)  # which do not know this CA
        for wrong in (other_ca, system_cas):
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await probe_get(wrong, "/healthz")
        plain = ProbeConfig(node="node-a", daemon_url=mgmt.replace("https", "http"))
        with pytest.raises(aiohttp.ClientError):  # no plain HTTP on a TLS listener
            await probe_get(plain, "/healthz")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("engine", ["fast", "aiohttp"])
async def test_tls_on_the_proxy_listener(tmp_path: Path, workers: W, engine: str) -> None:
    from tmb.daemon.app import DAEMON_KEY
    from tmb.proxy.site import ProxyRunner, ProxySite

    config, ca = tls_config(tmp_path, workers, server=True)
    config = dataclasses.replace(config, proxy=dataclasses.replace(config.proxy, engine=engine))
    app = await build_app(config)
    runner = ProxyRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = ProxySite(runner, HOST, 0, ssl_context=app[DAEMON_KEY].server_tls)
    await site.start()
    try:
        assert site.name.startswith("https://")
        url = f"https://{HOST}:{site.port}"
        context = ssl.create_default_context(cafile=str(ca))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as s:
            for _ in range(2):  # the fast engine relays over TLS; the connection is kept
                async with s.post(f"{url}/json", json={"model": "m-a"}) as r:
                    assert r.status == 200 and len(r.headers["X-TMB-Request-Id"]) == 32
            async with s.get(f"{url}/healthz") as r:  # handed to aiohttp over the TLS transport
                assert r.status in (200, 503)
            async with s.get(f"{url}/v1/ingest/node%2Da/nonce") as r:
                assert r.status == 404
    finally:
        await runner.cleanup()


async def test_unusable_tls_files_are_config_errors_naming_the_key(tmp_path: Path, workers: W) -> None:
    from tmb.config import load_config

    mine = make_server_cert(tmp_path / "mine", HOST)
    theirs = make_server_cert(tmp_path / "theirs", HOST)
    base = config_for(tmp_path, workers)

    async def error(**tls: str) -> ConfigError:
        config = dataclasses.replace(base, management=ManagementConfig(host=HOST, port=0, **tls))
        with pytest.raises(ConfigError) as info:
            await build_app(config)
        return info.value

    e = await error(tls_cert=str(mine.cert), tls_key=str(theirs.key))
    assert e.context["key"] == "tls_key" and "does not belong" in e.message
    e = await error(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(mine.key))
    assert e.context["key"] == "tls_cert" and "cannot read management.tls_cert" in e.message
    (tmp_path / "junk.pem").write_text("not a certificate")
    e = await error(tls_cert=str(mine.cert), tls_key=str(tmp_path / "junk.pem"))
    assert e.context["key"] == "tls_key" and "not a PEM file" in e.message
    toml = tmp_path / "half.toml"
    toml.write_text(f'[management]\ntls_cert = "{mine.cert}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(toml, env={})
    assert info.value.context["key"] == "tls_key" and info.value.context["section"] == "management"
    with pytest.raises(ConfigError) as info:
        ProbeConfig(node="n", daemon_url="http://127.0.0.1:8701", daemon_ca=str(mine.ca))
    assert info.value.context["key"] == "daemon_ca"
    with pytest.raises(ConfigError) as info:
        ProbeConfig(node="n", daemon_url="https://127.0.0.1:8701", daemon_ca=str(tmp_path / "junk.pem"))
    assert info.value.context["key"] == "daemon_ca"
