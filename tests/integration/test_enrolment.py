"""Node identity over HTTP against real swtpms with certified EKs (``swtpm_setup --create-ek-cert``):
enrolment, credential activation, the pin to EK and AK, re-keying by approval, and authenticated evidence.
Every attack is refused with its finding, and the honest node's evidence is taken before and after it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from identity_support import AK_ATTRS, Ca, new_key, swtpm_store, tpm2b, tpm_public
from swtpm import Swtpm, SwtpmFactory
from test_probe_e2e import wait_until
from test_probe_support import ADMIN, NODE, make_node
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

from probes.agent import Probe
from probes.chain import Chain
from probes.enrol import EnrolError, enrol, load_key
from probes.tpm import AK_HANDLE, TpmClient
from tmb.attest.ekcert import TrustStore
from tmb.attest.quote import load_ak
from tmb.events import Event
from tmb.ingest.auth import HEADER, sign_request
from tmb.ingest.identity import IdentityPolicy
from tmb.ingest.routes import ENROL_BURST, ENROL_PEER_BURST, make_app
from tmb.ingest.service import Ingest

OTHER_HANDLE = 0x81010003


@pytest.fixture(scope="module")
def tpms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swtpm, Swtpm]]:
    """The honest node's TPM and the attacker's (both genuine, both certified by the same local CA)."""
    base = tmp_path_factory.mktemp("enrol")
    honest, attacker = Swtpm(base / "honest", ek_cert=True), None
    try:
        attacker = Swtpm(base / "attacker", ek_cert=True)
        yield honest, attacker
    finally:
        honest.stop()
        if attacker is not None:
            attacker.stop()


@pytest.fixture(scope="module")
def store(tpms: tuple[Swtpm, Swtpm], tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    # one local CA per swtpm: the trust store holds the honest TPM's manufacturer only
    return swtpm_store(tpms[0].state_dir, tmp_path_factory.mktemp("roots"))


@dataclass
class Daemon:
    url: str
    ingest: Ingest
    http: aiohttp.ClientSession
    events: list[Event]

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        kw: dict[str, Any] = {"headers": headers or {}}
        if body is not None:
            kw["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.request(method, self.url + path, **kw) as resp:
            return resp.status, await resp.json()

    async def post(self, route: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        return await self.call("POST", f"/v1/ingest/{NODE}/{route}", doc)

    async def signed(
        self, key: bytes, method: str, route: str, body: bytes = b"", node: str = NODE, **kw: Any
    ) -> tuple[int, dict[str, Any], str]:
        header = sign_request(key, method, node, route, body, **kw)
        status, doc = await self.call(method, f"/v1/ingest/{node}/{route}", body or None, {HEADER: header})
        return status, doc, header


class Clock:
    """Time the test moves by hand: seconds for the rate limits, nanoseconds (from the real time at its
    creation, so the requests' signatures stay in their window) for the ingest."""

    def __init__(self) -> None:
        self.t, self.base_ns = 0.0, time.time_ns()

    def monotonic(self) -> float:
        return self.t

    def ns(self) -> int:
        return self.base_ns + int(self.t * 1e9)


@asynccontextmanager
async def daemon(
    tmp: Path, policy: IdentityPolicy, clock: Clock | None = None, **limits: Any
) -> AsyncIterator[Daemon]:
    from aiohttp import web

    from tmb.attest.policy import policy_from_dict

    events: list[Event] = []
    ingest = Ingest(
        tmp / "ingest.db",
        policy=policy_from_dict({"version": 1}),
        identity=policy,
        events=events.append,
        clock_ns=clock.ns if clock is not None else time.time_ns,
    )
    if clock is not None:
        limits["clock"] = clock.monotonic
    runner = web.AppRunner(make_app(ingest, admin_token=ADMIN, **limits), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Daemon(f"http://127.0.0.1:{runner.addresses[0][1]}", ingest, http, events)
    finally:
        await runner.cleanup()
        ingest.close()


def tpm_call(tpm: Swtpm) -> Any:
    async def call(fn: Any) -> Any:
        with TpmClient(tpm.tcti) as client:
            return await asyncio.to_thread(fn, client)

    return call


def ids(doc: dict[str, Any]) -> list[str]:
    return [f["id"] for f in doc.get("findings", []) if f.get("severity") == "error"]


async def enrolled(d: Daemon, tpm: Swtpm, handle: int = AK_HANDLE) -> bytes:
    key, answer = await enrol(NODE, handle, d.post, tpm_call(tpm))
    assert answer["enrolled"] is True and answer["ek_trust"] == "certified", answer
    return key


def identity_doc(tpm: Swtpm, handle: int = AK_HANDLE) -> dict[str, Any]:
    with tpm.client() as client:
        ak = client.create_or_load_ak(handle, "rsa")
        return {
            "ek_public": client.ek_public("rsa").hex(),
            "ek_certificates": [base64.b64encode(c).decode() for c in client.ek_certificates().values()],
            "ak_public": (ak.tpm2b_public or b"").hex(),
        }


async def honest_posts(d: Daemon, key: bytes) -> None:
    """The honest node's evidence is taken: a nonce, and a batch."""
    status, doc, _ = await d.signed(key, "GET", "nonce")
    assert status == 200 and len(bytes.fromhex(doc["nonce"])) == 32, doc


async def test_enrolment_then_authenticated_evidence(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, _ = tpms
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        key = await enrolled(d, honest)
        pin = d.ingest.pinned(NODE)
        assert pin is not None and pin.ek_trust == "certified" and pin.key == key
        with honest.client() as client:
            assert pin.ak_name == (client.read_public(AK_HANDLE).name or b"").hex()
        await honest_posts(d, key)
        chain = Chain(NODE)
        body = json.dumps({"batches": [chain.genesis("synthetic").to_wire()]}).encode()
        status, doc, _ = await d.signed(key, "POST", "batches", body)
        assert status == 200 and doc["accepted"] == [0], doc
        # the same AK and EK enrolling again (a probe that lost its key) needs no approval: a new key
        again = await enrolled(d, honest)
        assert again != key
        status, doc, _ = await d.signed(key, "GET", "nonce")
        assert status == 401 and ids(doc) == ["auth.bad_mac"]
        await honest_posts(d, again)
        assert d.events == []


async def test_fake_ek_certificate_from_another_ca(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, attacker = tpms
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        doc = identity_doc(honest)
        ek_key = load_ak(bytes.fromhex(doc["ek_public"])).key
        fake = Ca("swtpm-localca", Ca("swtpm-localca-rootca")).issue_ek(ek_key)  # same names, another key
        status, answer = await d.post("enroll", {**doc, "ek_certificates": [base64.b64encode(fake).decode()]})
        assert status == 403 and answer["error"]["type"] == "identity.ek_untrusted_chain", answer
        # a genuine TPM whose manufacturer (the other local CA) is not in the trust store
        status, answer = await d.post("enroll", identity_doc(attacker))
        assert status == 403 and "identity.ek_untrusted_chain" in ids(answer), answer
        assert d.ingest.store.identity(NODE, "challenge") is None  # no challenge was made for either
        await honest_posts(d, await enrolled(d, honest))


async def test_ak_without_fixed_tpm_and_ak_made_outside(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, _ = tpms
    doc = identity_doc(honest)
    with ESAPI(TCTILdr.parse(honest.tcti)) as ctx:
        srk = ctx.create_primary(
            None,
            TPM2B_PUBLIC.parse(
                "rsa2048:aes128cfb",
                objectAttributes=TPMA_OBJECT.RESTRICTED
                | TPMA_OBJECT.DECRYPT
                | TPMA_OBJECT.FIXEDTPM
                | TPMA_OBJECT.FIXEDPARENT
                | TPMA_OBJECT.SENSITIVEDATAORIGIN
                | TPMA_OBJECT.USERWITHAUTH,
            ),
            ESYS_TR.OWNER,
        )[0]
        try:
            movable = AK_ATTRS & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
            template = TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=movable)
            movable_ak = bytes(ctx.create(srk, None, template)[1].marshal())
        finally:
            ctx.flush_context(srk)
    outside = tpm2b(
        tpm_public(
            new_key("rsa"),
            AK_ATTRS & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN),
            symmetric=False,
            scheme="rsassa",
        )
    )
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        for ak, missing in ((movable_ak, ["fixedTPM", "fixedParent"]), (outside, None)):
            status, answer = await d.post("enroll", {**doc, "ak_public": ak.hex()})
            assert status == 403 and ids(answer) == ["identity.ak_attributes"], answer
            context = answer["findings"][-1]["context"]
            assert context["missing"] == (missing or ["fixedTPM", "fixedParent", "sensitiveDataOrigin"])
        # a bare PEM key has no attributes to check
        status, answer = await d.post("enroll", {**doc, "ak_public": "00"})
        assert status == 403 and ids(answer) == ["identity.ak_public_malformed"], answer
        await honest_posts(d, await enrolled(d, honest))


async def test_replayed_activation_and_guessed_proof(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, _ = tpms
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        seen: list[dict[str, Any]] = []

        async def recording(route: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
            seen.append({"route": route, "doc": doc})
            return await d.post(route, doc)

        key, _ = await enrol(NODE, AK_HANDLE, recording, tpm_call(honest))
        activation = next(s["doc"] for s in seen if s["route"] == "activate")
        # the recorded activation, replayed: its challenge was consumed
        status, answer = await d.post("activate", activation)
        assert status == 409 and ids(answer) == ["identity.challenge_unknown"], answer
        # an attacker with the node's public EK and AK gets a challenge but cannot open it: a replayed or
        # guessed proof does not match, and the challenge is gone after one answer
        status, challenge = await d.post("enroll", identity_doc(honest))
        assert status == 200
        status, answer = await d.post("activate", {**activation, "challenge": challenge["challenge"]})
        assert status == 403 and ids(answer) == ["identity.proof_mismatch"], answer
        status, answer = await d.post("activate", {**activation, "challenge": challenge["challenge"]})
        assert status == 409 and ids(answer) == ["identity.challenge_unknown"], answer
        # the honest node's pin and key are untouched
        pin = d.ingest.pinned(NODE)
        assert pin is not None and pin.key == key
        await honest_posts(d, key)


async def test_expired_challenge(tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path) -> None:
    honest, _ = tpms
    async with daemon(tmp_path, IdentityPolicy(store, challenge_ttl_s=0.001)) as d:
        with pytest.raises(EnrolError) as caught:
            await enrol(NODE, AK_HANDLE, d.post, tpm_call(honest))
        assert caught.value.finding.context["refusal"] == "identity.challenge_expired"
        assert d.ingest.pinned(NODE) is None


async def test_stolen_node_id_and_rekey_by_approval(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, attacker = tpms
    async with daemon(tmp_path, IdentityPolicy(store, pins=(_pin(attacker),))) as d:
        key = await enrolled(d, honest)
        # another (pinned, genuine) TPM claims the node's id: refused, recorded for an admin to look at
        with pytest.raises(EnrolError) as caught:
            await enrol(NODE, AK_HANDLE, d.post, tpm_call(attacker))
        assert caught.value.finding.context["refusal"] == "identity.rekey_unapproved"
        # without the secret, requests under the node's id are refused before they touch anything
        for header in (None, sign_request(os.urandom(32), "GET", NODE, "nonce", b"")):
            status, doc = await d.call(
                "GET", f"/v1/ingest/{NODE}/nonce", headers={HEADER: header} if header else {}
            )
            assert status == 401 and ids(doc) == ["auth.missing" if header is None else "auth.bad_mac"]
        await honest_posts(d, key)
        # the honest node's AK changes (a new AK in the same TPM): refused until an admin approves it
        status, answer = await d.post("enroll", identity_doc(honest, OTHER_HANDLE))
        assert status == 409 and answer["error"]["type"] == "identity.rekey_unapproved"
        wanted = {k: answer["findings"][-1]["context"][k] for k in ("ek_sha256", "ak_name")}
        auth = {"Authorization": f"Bearer {ADMIN}"}
        status, doc = await d.call("POST", f"/v1/ingest/admin/nodes/{NODE}/approve", wanted)
        assert status == 401
        status, doc = await d.call("GET", f"/v1/ingest/admin/nodes/{NODE}", headers=auth)
        assert doc["identity"]["rekey_request"]["ak_name"] == wanted["ak_name"]
        assert doc["identity"]["pinned"]["ak_name"] != wanted["ak_name"] and "'key'" not in str(doc)
        # the attacker slips in its own request meanwhile: the admin approves what they name, not it
        with pytest.raises(EnrolError):
            await enrol(NODE, AK_HANDLE, d.post, tpm_call(attacker))
        status, doc = await d.call("POST", f"/v1/ingest/admin/nodes/{NODE}/approve", wanted, auth)
        assert status == 200, doc
        with pytest.raises(EnrolError) as caught:
            await enrol(NODE, AK_HANDLE, d.post, tpm_call(attacker))
        assert caught.value.finding.context["refusal"] == "identity.rekey_unapproved"
        assert d.events == []
        new_key = await enrolled(d, honest, OTHER_HANDLE)
        assert [e.kind for e in d.events] == ["node.rekeyed"] and d.events[0].subject == NODE
        assert d.events[0].data["ak_name"] == wanted["ak_name"]
        status, doc, _ = await d.signed(key, "GET", "nonce")
        assert status == 401 and ids(doc) == ["auth.bad_mac"]  # the old key went with the old AK
        await honest_posts(d, new_key)
        assert [f["id"] for f in d.ingest.store.findings(NODE)] == ["identity.rekey_approved"]
        # an approval is used once: the old AK now needs one again
        with pytest.raises(EnrolError) as caught:
            await enrol(NODE, AK_HANDLE, d.post, tpm_call(honest))
        assert caught.value.finding.context["refusal"] == "identity.rekey_unapproved"
        status, doc = await d.call("POST", f"/v1/ingest/admin/nodes/{NODE}/approve", {"ak_name": 1}, auth)
        assert status == 400 and ids(doc) == ["identity.malformed"]


def _pin(tpm: Swtpm) -> str:
    from tmb.attest.ekcert import ek_pin

    with tpm.client() as client:
        return ek_pin(client.ek_public("rsa"))


async def test_forged_replayed_and_stale_requests(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, _ = tpms
    async with daemon(tmp_path, IdentityPolicy(store, auth_skew_s=30.0)) as d:
        key = await enrolled(d, honest)
        chain = Chain(NODE)
        genesis = json.dumps({"batches": [chain.genesis("synthetic").to_wire()]}).encode()
        status, doc, header = await d.signed(key, "POST", "batches", genesis)
        assert status == 200
        # the same request again, byte for byte: a replay
        status, doc = await d.call("POST", f"/v1/ingest/{NODE}/batches", genesis, {HEADER: header})
        assert status == 401 and ids(doc) == ["auth.replayed"]
        # a forged batch from the network: another chain at the same position, signed with a guess
        forged = json.dumps({"batches": [Chain(NODE).genesis("synthetic").to_wire()]}).encode()
        status, doc = await d.call("POST", f"/v1/ingest/{NODE}/batches", forged, {HEADER: header})
        assert status == 401 and ids(doc) == ["auth.bad_mac"]  # the header's MAC is over the other body
        status, doc, _ = await d.signed(os.urandom(32), "POST", "batches", forged)
        assert status == 401 and ids(doc) == ["auth.bad_mac"]
        # a signed request from too long ago, or from the future; a malformed header
        old = int(time.time() * 1000) - 60_000
        status, doc, _ = await d.signed(key, "GET", "nonce", t_ms=old)
        assert status == 401 and ids(doc) == ["auth.stale"]
        status, doc, _ = await d.signed(key, "GET", "nonce", t_ms=int(time.time() * 1000) + 60_000)
        assert status == 401 and ids(doc) == ["auth.stale"]
        status, doc = await d.call("GET", f"/v1/ingest/{NODE}/nonce", headers={HEADER: "v1 t=1 mac=00"})
        assert status == 401 and ids(doc) == ["auth.malformed"]
        # a request signed for another route is not this one
        header = sign_request(key, "GET", NODE, "nonce", b"")
        status, doc = await d.call("POST", f"/v1/ingest/{NODE}/bindings", b"", {HEADER: header})
        assert status == 401 and ids(doc) == ["auth.bad_mac"]
        # nothing of it touched the node: one batch, the honest one
        assert d.ingest.store.count_batches(NODE) == 1
        assert d.ingest.store.findings(NODE) == []
        await honest_posts(d, key)


async def test_rate_limit(tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path) -> None:
    honest, _ = tpms
    async with daemon(tmp_path, IdentityPolicy(store), rate_per_s=0.001, burst=3) as d:
        key = await enrolled(d, honest)
        # forged requests are refused before the limit: they spend nothing of the node's budget
        for _ in range(20):
            assert (await d.signed(os.urandom(32), "GET", "nonce"))[0] == 401
        statuses = [(await d.signed(key, "GET", "nonce"))[0] for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        status, doc, _ = await d.signed(key, "GET", "nonce")
        assert status == 429 and ids(doc) == ["ingest.rate_limited"]


async def test_probe_findings_are_probe_family_and_bounded(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, _ = tpms
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        key = await enrolled(d, honest)
        genesis = Chain(NODE).genesis("synthetic").to_wire()
        for bad in (
            [{"id": "policy.allowed", "severity": "info"}],
            [{"id": "binding.model_bypasses_verity", "severity": "error"}],
            [{"id": "probe.x", "context": {"blob": "x" * 20000}}],
            [{"id": "probe.x"}] * 65,
            [{"id": "probe.x", "severity": "fatal"}],
        ):
            body = json.dumps({"batches": [genesis], "probe_findings": bad}).encode()
            status, doc, _ = await d.signed(key, "POST", "batches", body)
            assert status == 400 and ids(doc) == ["ingest.malformed"], doc
        assert d.ingest.store.findings(NODE) == [] and d.ingest.store.count_batches(NODE) == 0
        good = [{"id": "probe.eventlog_empty", "message": "empty", "severity": "warning"}]
        body = json.dumps({"batches": [genesis], "probe_findings": good}).encode()
        status, doc, _ = await d.signed(key, "POST", "batches", body)
        assert status == 200 and d.ingest.store.count_batches(NODE) == 1


async def test_admin_put_of_a_bare_ak_no_longer_registers(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, _ = tpms
    with honest.client() as client:
        ak = client.create_or_load_ak(AK_HANDLE, "rsa")
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        status, doc = await d.call("PUT", f"/v1/ingest/admin/nodes/{NODE}", {"ak": ak.pem.decode()}, auth)
        assert status == 403 and doc["error"]["type"] == "identity.static_registration_disabled"
        # a node registered in-process by its AK alone (config) still cannot post without enrolling
        d.ingest.register_node(NODE, ak.tpm2b_public or b"")
        status, doc = await d.call("GET", f"/v1/ingest/{NODE}/nonce")
        assert status == 401 and ids(doc) == ["auth.not_enrolled"]
        await honest_posts(d, await enrolled(d, honest))  # the same AK: enrols without approval


async def test_probe_enrols_and_is_attested(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """The probe enrols on its own (certified EK), keeps its key 0600, and its evidence is attested."""
    env = make_node(tmp_path, lambda: swtpm_factory(ek_cert=True))
    roots = swtpm_store(env.swtpm.state_dir, tmp_path / "roots")
    ingest = env.ingest(identity=IdentityPolicy(roots))
    from test_probe_support import serve

    async with serve(ingest) as url:
        probe = Probe(env.probe_config(url))
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await wait_until(lambda: ingest.store.count_batches(NODE, attested=True) >= 3)
        stop.set()
        await task
    assert probe.stats.refused == [], probe.stats.refused
    pin = ingest.pinned(NODE)
    assert pin is not None and pin.ek_trust == "certified"
    key_file = Path(env.probe_config(url).state_dir) / "identity.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_key(key_file.parent, NODE) == pin.key
    env.close()


async def test_tmb_probe_enroll_command(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from probes.cli import main

    honest, attacker = tpms
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        for tpm, name in ((honest, "ok"), (attacker, "other")):
            config = tmp_path / f"{name}.toml"
            config.write_text(
                f'node = "{NODE}"\ndaemon_url = "{d.url}"\ntcti = "{tpm.tcti}"\n'
                f'state_dir = "{tmp_path / name}"\n'
            )
            code = await asyncio.to_thread(main, ["enroll", "--config", str(config)])
            out, err = capsys.readouterr()
            if tpm is honest:
                assert code == 0 and json.loads(out)["ek_trust"] == "certified", err
                key = load_key(tmp_path / name, NODE)
                assert key is not None
                await honest_posts(d, key)
            else:  # another manufacturer's TPM: refused, named, nothing kept
                assert code == 2 and "identity.ek_untrusted_chain" in err, err
                assert load_key(tmp_path / name, NODE) is None


async def test_enrolment_bodies_are_bounded(store: TrustStore, tmp_path: Path) -> None:
    async with daemon(tmp_path, IdentityPolicy(store)) as d:

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b" " * 8192  # no Content-Length: streamed, refused past 64 KiB

        async with d.http.post(f"{d.url}/v1/ingest/{NODE}/enroll", data=chunks()) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["type"] == "ingest.too_large"
        for body in (b"[" * 5000 + b"]" * 5000, b"{not json", b'{"ek_public": "zz", "ak_public": "00"}'):
            status, doc = await d.call("POST", f"/v1/ingest/{NODE}/enroll", body)
            assert status == 400 and ids(doc) == ["identity.malformed"], doc
        status, doc = await d.call(
            "POST", f"/v1/ingest/{NODE}/activate", {"challenge": "x" * 100, "proof": "00"}
        )
        assert status == 400 and ids(doc) == ["identity.malformed"]
        assert d.ingest.store.identity(NODE, "challenge") is None and d.ingest.pinned(NODE) is None


async def test_enrolment_flood_is_rate_limited_and_leaves_few_challenges(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    honest, _ = tpms
    doc = identity_doc(honest)
    clock = Clock()
    async with daemon(tmp_path, IdentityPolicy(store, challenge_ttl_s=0.05), clock=clock) as d:
        # invented node names, each would get a challenge: the address's burst does, the rest is refused
        statuses = [(await d.call("POST", f"/v1/ingest/invented-{i}/enroll", doc))[0] for i in range(60)]
        assert statuses == [200] * ENROL_PEER_BURST + [429] * (60 - ENROL_PEER_BURST), statuses
        clock.t += 1.0  # the challenges expire; the address's bucket refills two tokens
        status, _ = await d.call("POST", "/v1/ingest/invented-last/enroll", doc)
        assert status == 200
        conn = d.ingest.store.conn  # type: ignore[attr-defined]
        left = conn.execute("SELECT COUNT(*) FROM ingest_identity WHERE kind = 'challenge'").fetchone()[0]
        assert left == 1  # the expired ones were dropped before the last was made
        status, answer = await d.call(
            "POST", "/v1/ingest/invented-0/activate", {"challenge": "00", "proof": "00"}
        )
        assert status == 409 and ids(answer) == ["identity.challenge_unknown"], answer  # dropped


async def test_enrolment_from_many_addresses_is_still_bounded_in_all(
    store: TrustStore, tmp_path: Path
) -> None:
    """Each address has its own budget, and all of them together the global one: three addresses' bursts
    are more than it, so the last address is refused by it (the message names no address)."""
    async with daemon(tmp_path, IdentityPolicy(store), clock=Clock()) as d:
        refusals: list[str] = []
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            connector = aiohttp.TCPConnector(local_addr=(host, 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                for i in range(ENROL_PEER_BURST):
                    async with http.post(f"{d.url}/v1/ingest/n-{i}/enroll", data=b"{}") as resp:
                        doc = await resp.json()
                        if resp.status == 429:
                            refusals.append(doc["error"]["message"])
                        else:
                            assert resp.status == 400 and ids(doc) == ["identity.malformed"], doc
        assert len(refusals) == 3 * ENROL_PEER_BURST - ENROL_BURST, refusals
        assert not any("address" in m for m in refusals), refusals


async def test_one_flooding_address_does_not_lock_out_another_enrolling(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    """One client floods enrolment from 127.0.0.1 (invented node names) and is mostly refused; an honest
    node enrolling meanwhile from 127.0.0.2 is not: the flooder's refused requests spend its own address's
    bucket, not the budget all addresses share. The clock stands still: nothing refills meanwhile."""
    honest, _ = tpms
    doc = identity_doc(honest)
    async with daemon(tmp_path, IdentityPolicy(store), clock=Clock()) as d:
        statuses = [(await d.call("POST", f"/v1/ingest/flood-{i}/enroll", doc))[0] for i in range(100)]
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))  # Linux routes 127.0.0.0/8 to lo
        async with aiohttp.ClientSession(connector=other) as http:
            node = Daemon(d.url, d.ingest, http, d.events)
            await honest_posts(node, await enrolled(node, honest))  # enrol and activate: neither a 429
        assert statuses.count(429) >= 75 and set(statuses) <= {200, 429}, statuses
        status, refusal = await d.call("POST", "/v1/ingest/flood-last/enroll", doc)
        assert status == 429 and refusal["error"]["type"] == "ingest.rate_limited", refusal
        assert "client address" in refusal["error"]["message"], refusal


async def test_a_store_failure_is_503_and_the_probe_keeps_its_evidence(
    tpms: tuple[Swtpm, Swtpm], store: TrustStore, tmp_path: Path
) -> None:
    """A store that cannot be read or written is the daemon's trouble, not bad evidence: 503
    ``ingest.store_unavailable`` with Retry-After (the probe keeps a 5xx's evidence and sends it again),
    never a 400 (the probe drops what was refused as bad) nor a 500 with a traceback."""
    honest, _ = tpms
    async with daemon(tmp_path, IdentityPolicy(store)) as d:
        key = await enrolled(d, honest)
        await honest_posts(d, key)
        d.ingest.store.conn.close()  # type: ignore[attr-defined]  # the SQLite store: gone from under it
        body = json.dumps({"batches": [Chain(NODE).genesis("synthetic").to_wire()]}).encode()
        for method, route, data in (("GET", "nonce", b""), ("POST", "batches", body)):
            header = sign_request(key, method, NODE, route, data)
            async with d.http.request(
                method, f"{d.url}/v1/ingest/{NODE}/{route}", data=data or None, headers={HEADER: header}
            ) as resp:
                doc = await resp.json()
                assert resp.status == 503, (route, doc)
                assert resp.headers["Retry-After"] == "1"
                assert doc["error"]["type"] == "ingest.store_unavailable"
                assert "Traceback" not in json.dumps(doc)
