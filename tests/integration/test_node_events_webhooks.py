"""Node events reach the webhooks, end to end: a daemon built as ``tmb serve`` builds it (build_app), a real
swtpm node whose probe enrols through the protocol (EK pin, credential activation) and ships signed evidence
to the management listener, and an aiohttp receiver on 127.0.0.1 that checks every delivery's Ed25519
signature with `cryptography` against the daemon's ``GET /v1/keys`` (and with ``verify_notification``).

What the ingest sees becomes one signed notification per transition, its subject the node id: a silent node
goes stale (``node.stale``), a quote that breaks the policy or the IMA chain (``node.unattested``), a TPM
reset (``node.rebooted``), an admin-approved re-key (``node.rekeyed``); ``[notify] kinds`` drops the rest.
Every wait is on a condition, bounded generously; nothing depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from swtpm import SwtpmFactory
from test_probe_support import ENGINE_EXE, NODE, PROBE_BYTES, PROBE_PATH, NodeEnv, make_node
from test_proxy_support import Daemon, make_config, start_daemon
from test_serve_pg_evidence import policy_toml

from probes.agent import Probe
from probes.enrol import EnrolError, enrol
from probes.tpm import AK_HANDLE, Quote, TpmClient
from tmb.attest.ekcert import ek_pin
from tmb.attest.ima_build import LogBuilder
from tmb.config import AdminConfig, AttestationConfig, Config, IdentityConfig, NotifyConfig
from tmb.daemon.notify import keys_from_document, verify_notification
from tmb.events import Event
from tmb.ingest.service import Ingest

HOST = "127.0.0.1"
ADMIN = "webhook-test-admin-token"
OTHER_HANDLE = 0x81010003  # a second AK in the node's TPM (the re-key)
FAST = {"backoff_s": 0.05, "max_backoff_s": 0.5, "timeout_s": 10.0}
BOUND_S = 90.0  # generous bound on every wait


async def until(cond: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        await asyncio.sleep(0.05)


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every request (body and headers, as received)."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, dict[str, str]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hooks/tmb", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, 0).start()
        self.url = f"http://{HOST}:{self.runner.addresses[0][1]}/hooks/tmb"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def kinds(self) -> list[str]:
        return [json.loads(body)["event"]["kind"] for body, _ in self.got]


@dataclass
class Setup:
    env: NodeEnv
    daemon: Daemon
    receiver: Receiver
    http: aiohttp.ClientSession
    runner: web.AppRunner
    raised: list[Event] = field(default_factory=list)  # what the ingest raised, before the notifier's filter
    keys: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    async def start(cls, env: NodeEnv, receiver: Receiver, config: Config) -> Setup:
        runner, daemon = await start_daemon(config)
        s = cls(env, daemon, receiver, aiohttp.ClientSession(), runner)
        await s.watch()
        return s

    async def watch(self) -> None:
        """Spy on what the daemon's ingest raises (then on to its notifier); fetch its keys."""
        ingest = self.daemon.parts.ingest
        assert ingest is not None and ingest.events == self.daemon.parts.notifier.emit  # the wiring
        emit = ingest.events

        def spy(event: Event) -> None:
            self.raised.append(event)
            emit(event)

        ingest.events = spy
        await self.fetch_keys()

    async def restart(self) -> None:
        """The daemon stops and starts again on the same files, as after ``systemctl restart tmb``."""
        await self.runner.cleanup()
        self.runner, self.daemon = await start_daemon(self.daemon.config)
        await self.watch()

    async def close(self) -> None:
        await self.http.close()
        await self.runner.cleanup()

    async def fetch_keys(self) -> None:
        """The daemon's public keys as a receiver gets them: ``GET /v1/keys`` on the proxy listener."""
        async with self.http.get(self.daemon.url + "/v1/keys") as r:
            assert r.status == 200
            self.keys = keys_from_document(await r.json())

    def verified(self) -> list[dict[str, Any]]:
        """Every delivery so far, each checked: the Ed25519 signature with `cryptography` alone over the
        exact body bytes, with the key ``/v1/keys`` published under ``Tmb-Key-Id``; then the whole of
        ``verify_notification`` (format, ids, time, addressed to this receiver). Their bodies, in order."""
        docs = []
        for body, headers in self.receiver.got:
            raw = self.keys[headers["Tmb-Key-Id"]]
            sig = headers["Tmb-Signature"].removeprefix("ed25519=")
            Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(sig), body)  # raises if forged
            doc = verify_notification(body, headers, self.keys, url=self.receiver.url)
            assert doc["event"]["subject"] == NODE, doc
            assert doc["daemon"]["key_id"] == self.daemon.parts.signer.key_id
            docs.append(doc)
        assert len({d["id"] for d in docs}) == len(docs), "a notification delivered twice"
        return docs

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d["event"] for d in self.verified() if d["event"]["kind"] == kind]

    def last_quote(self) -> dict[str, Any]:
        ingest = self.daemon.parts.ingest
        assert ingest is not None
        status = ingest.status(NODE)
        return (status or {}).get("last_quote") or {}

    def probe(self, **kw: Any) -> Probe:
        return Probe(self.env.probe_config(self.daemon.management_url, **kw))

    async def post(self, route: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """An unsigned enrolment request to the management listener, as the probe makes it."""
        url = f"{self.daemon.management_url}/v1/ingest/{NODE}/{route}"
        async with self.http.post(url, json=doc) as r:
            return r.status, await r.json()


@asynccontextmanager
async def running(probe: Probe) -> AsyncIterator[Probe]:
    stop = asyncio.Event()
    task = asyncio.create_task(probe.run(stop))
    try:
        yield probe
    finally:
        stop.set()
        await task


@asynccontextmanager
async def node_daemon(
    tmp_path: Path, factory: SwtpmFactory, *, stale_after_s: float = 0.0, kinds: tuple[str, ...] = ()
) -> AsyncIterator[Setup]:
    """A swtpm node (not registered: its probe enrols by EK pin) and a daemon from build_app whose
    ``[notify] urls`` is the test's receiver."""
    env = make_node(tmp_path, factory)
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(env.policy_doc))
    receiver = Receiver()
    url = await receiver.start()
    config = dataclasses.replace(
        make_config(tmp_path, []),
        attestation=AttestationConfig(policy=str(policy), stale_after_s=stale_after_s),
        identity=IdentityConfig(ek_pins=(ek_pin(env.tpm.ek_public("rsa")),)),
        notify=NotifyConfig(urls=(url,), kinds=kinds, **FAST),
        admin=AdminConfig(token=ADMIN),  # on the loopback management listener
    )
    setup = await Setup.start(env, receiver, config)
    try:
        yield setup
    finally:
        await setup.close()
        await receiver.stop()
        env.close()


async def attested(s: Setup, probe: Probe, quotes: int = 1) -> None:
    """Until the probe enrolled and ``quotes`` more of its quotes were taken, the last one attesting."""
    start = probe.stats.quotes_acked
    await until(
        lambda: probe.stats.quotes_acked >= start + quotes and s.last_quote().get("ok") is True,
        "an attesting quote",
    )


def raised(s: Setup, kind: str) -> list[Event]:
    return [e for e in s.raised if e.kind == kind]


# -- node.unattested ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("breaks", ["policy", "chain"])
async def test_a_quote_that_breaks_the_policy_or_the_chain_is_one_unattested_webhook(
    tmp_path: Path, swtpm_factory: SwtpmFactory, breaks: str
) -> None:
    async with node_daemon(tmp_path, swtpm_factory) as s, running(s.probe()) as probe:
        await attested(s, probe, quotes=2)
        assert s.raised == [] and s.receiver.got == []
        if breaks == "policy":  # a binary the policy does not allow runs: logged and extended, as IMA does
            s.env.measure("/usr/bin/evil", b"not in the policy")
        else:  # PCR 10 extended with no log entry: the log no longer replays to the quoted PCR
            s.env.tpm.pcr_extend(10, {"sha1": b"\x01" * 20, "sha256": b"\x01" * 32})
        await until(lambda: s.of("node.unattested") != [], "the node.unattested webhook")
        # more quotes, still failing: the transition was told once
        acked = probe.stats.quotes_acked
        await until(lambda: probe.stats.quotes_acked >= acked + 3, "three more quotes")
        assert s.last_quote().get("ok") is False
    events = s.of("node.unattested")
    assert len(events) == 1 and [e.kind for e in s.raised] == ["node.unattested"], s.raised
    data = events[0]["data"]
    wanted = "policy." if breaks == "policy" else "pcr.mismatch"
    assert any(why.startswith(wanted) for why in data["why"]), data
    assert data["quote_id"] == s.raised[0].data["quote_id"] and isinstance(data["quote_id"], int)
    assert events[0]["t_ns"] == s.raised[0].t_ns
    assert s.receiver.kinds() == ["node.unattested"]


class FlakyTpm(TpmClient):
    """The node's TPM, whose quotes' signatures are damaged while ``broken`` is set (as a TPM or AK that
    went bad would sign): the daemon refuses each such quote (422 ``quote.signature_invalid``)."""

    broken = False

    def quote(self, ak_handle: int, pcrs: Any, qualifying_data: bytes) -> Quote:
        q = super().quote(ak_handle, pcrs, qualifying_data)
        if not FlakyTpm.broken:
            return q
        sig = bytearray(q.signature)
        sig[-1] ^= 0x01
        return dataclasses.replace(q, signature=bytes(sig))


def flaky_probe(s: Setup) -> Probe:
    return Probe(s.env.probe_config(s.daemon.management_url), tpm=lambda: FlakyTpm(s.env.swtpm.tcti))


async def test_refused_quotes_are_one_unattested_webhook_and_recovery_one_attested(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """Quotes refused for failing verification (``quote.*``) turn the node unattested: one
    ``node.unattested`` webhook for the episode however many are refused, not again after a restart; the
    first attesting quote after it is one ``node.attested``, and the quotes after that tell nothing."""
    async with node_daemon(tmp_path, swtpm_factory) as s:
        FlakyTpm.broken = False
        probe = flaky_probe(s)
        async with running(probe):
            await attested(s, probe, quotes=2)
            assert s.raised == []
            FlakyTpm.broken = True
            refused = len(probe.stats.refused)
            await until(lambda: len(probe.stats.refused) >= refused + 3, "three refused quotes")
            await until(lambda: s.of("node.unattested") != [], "the node.unattested webhook")
        await s.restart()  # the episode is recorded in the store: a restarted daemon does not tell it again
        probe = flaky_probe(s)
        async with running(probe):
            refused = len(probe.stats.refused)
            await until(lambda: len(probe.stats.refused) >= refused + 2, "two more refused quotes")
            FlakyTpm.broken = False
            await until(lambda: raised(s, "node.attested") != [], "the ingest raising node.attested")
            await attested(s, probe, quotes=3)  # more attesting quotes: not told again
        await until(lambda: len(s.receiver.got) == 2, "both webhooks delivered")
    kinds = [e.kind for e in s.raised]  # by both daemons, the one before the restart and the one after
    assert kinds == ["node.unattested", "node.attested"], s.raised
    assert s.receiver.kinds() == ["node.unattested", "node.attested"]
    down, up = s.of("node.unattested")[0]["data"], s.of("node.attested")[0]["data"]
    assert down["refused"] is True and "quote.signature_invalid" in down["why"], down
    assert isinstance(down["quote_id"], int)
    assert up["after"] == "unattested" and up["quote_id"] > down["quote_id"], up
    assert all(r["kind"] == "quote" for r in probe.stats.refused), probe.stats.refused


# -- node.stale --------------------------------------------------------------------------------------------
async def test_a_silent_node_becomes_stale_once_and_the_kinds_filter_holds(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """``[notify] kinds = ["node.stale"]``: the node's policy break is raised by the ingest but not sent;
    once its probe stops, the node goes stale: one ``node.stale`` webhook, not repeated while it stays
    silent."""
    async with node_daemon(tmp_path, swtpm_factory, stale_after_s=3.0, kinds=("node.stale",)) as s:
        async with running(s.probe()) as probe:
            await attested(s, probe)
            s.env.measure("/usr/bin/evil", b"not in the policy")
            await until(lambda: raised(s, "node.unattested") != [], "the ingest raising node.unattested")
            ingest = s.daemon.parts.ingest
            assert ingest is not None
            quiet_since = len(raised(s, "node.stale"))  # a machine slow enough to miss 3 s of quotes
        await until(lambda: len(raised(s, "node.stale")) > quiet_since, "the ingest raising node.stale")
        await until(lambda: len(s.of("node.stale")) > quiet_since, "the node.stale webhook")
        assert NODE in ingest.stale_nodes()
        # still silent for several more checks (each at most 0.6 s apart here): not raised again
        checks = [0]
        check = ingest.check_stale

        def counted(now_ns: int | None = None) -> list[str]:
            checks[0] += 1
            return check(now_ns)

        ingest.check_stale = counted  # type: ignore[method-assign]
        await until(lambda: checks[0] >= 4, "four more stale checks")
        # a restart, the node still silent: the episode is recorded, not raised again
        await s.restart()
        ingest = s.daemon.parts.ingest
        assert ingest is not None
        await until(lambda: NODE in ingest.stale_nodes(), "the restarted daemon's stale check")
        checks = [0]
        check = ingest.check_stale
        ingest.check_stale = counted  # type: ignore[method-assign]
        await until(lambda: checks[0] >= 4, "four stale checks after the restart")
        async with s.http.get(s.daemon.url + "/metrics") as r:
            metrics = await r.text()
    stale = s.of("node.stale")
    assert len(stale) == len(raised(s, "node.stale")) == quiet_since + 1, stale
    assert len({e["data"]["since_ns"] for e in stale}) == len(stale)  # each a new transition
    data = stale[-1]["data"]
    assert data["last_quote_ns"] is not None and data["since_ns"] == data["last_quote_ns"] + 3 * 10**9
    # the filter: node.unattested was raised and recorded nowhere; only node.stale reached the receiver
    assert raised(s, "node.unattested") and set(s.receiver.kinds()) == {"node.stale"}
    assert 'tmb_notify_events_total{kind="node.unattested"}' not in metrics
    assert f'tmb_node_stale{{node="{NODE}"}} 1.0' in metrics


async def test_a_stale_node_that_quotes_again_is_one_attested_webhook(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    async with node_daemon(tmp_path, swtpm_factory, stale_after_s=3.0) as s:
        async with running(s.probe()) as probe:
            await attested(s, probe)
        await until(lambda: s.of("node.stale") != [], "the node.stale webhook")
        async with running(s.probe()) as probe:
            await until(lambda: s.of("node.attested") != [], "the node.attested webhook")
            await attested(s, probe, quotes=3)
            ingest = s.daemon.parts.ingest
            assert ingest is not None
            await until(lambda: NODE not in ingest.stale_nodes(), "the stale check seeing the node again")
    # one node.attested per stale episode (a machine slow enough to miss 3 s of quotes has two)
    kinds = [e.kind for e in s.raised]
    assert kinds and kinds == ["node.stale", "node.attested"] * (len(kinds) // 2), s.raised
    attested_events = s.of("node.attested")
    assert len(attested_events) == len(kinds) // 2, attested_events
    assert all(e["data"]["after"] == "stale" for e in attested_events), attested_events


# -- node.rebooted -----------------------------------------------------------------------------------------
async def test_a_tpm_reset_is_one_rebooted_webhook(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    async with node_daemon(tmp_path, swtpm_factory) as s:
        async with running(s.probe()) as probe:
            await attested(s, probe, quotes=2)
            # the old boot's log runs on: longer than the new one will be when its probe starts (a new
            # log that has reached the old one's length exactly is not re-sent: see the report of
            # this test's commit, a probe issue)
            s.env.measure(ENGINE_EXE, b"engine")
            await attested(s, probe, quotes=2)
        before = s.last_quote()
        assert s.raised == []
        env = s.env
        # the reboot: the TPM resets (resetCount + 1, PCRs restart), the kernel starts a new IMA log
        env.tpm.close()
        env.swtpm.reboot(orderly=True)
        env.tpm = env.swtpm.client()
        env.log.close()
        env.log = open(env.log_path, "wb")  # noqa: SIM115 - closed by env.close
        env.builder = LogBuilder(env.log)
        env.measure("boot_aggregate", b"boot")
        env.measure(PROBE_PATH, PROBE_BYTES)
        env.measure(ENGINE_EXE, b"engine")
        env.mount_model()
        async with running(s.probe()) as probe:
            await until(
                lambda: (
                    s.last_quote().get("ok") is True and s.last_quote()["reset_count"] > before["reset_count"]
                ),
                "an attesting quote of the new boot",
            )
            await attested(s, probe, quotes=2)  # and more after it: the reboot is not told again
        await until(lambda: s.of("node.rebooted") != [], "the node.rebooted webhook")
        await until(lambda: len(s.receiver.got) == len(s.raised), "every raised event delivered")
    rebooted = s.of("node.rebooted")
    assert len(rebooted) == 1 and len(raised(s, "node.rebooted")) == 1, s.raised
    first = rebooted[0]["data"]["quote_id"]
    assert isinstance(first, int) and first > before["quote_id"]
    # the new boot's first quote, which starts its epoch, comes before the new boot's IMA log (the probe
    # ships it once the answer says offset 0): it cannot replay, and is not told as node.unattested; the
    # first attesting quote of the new boot is told once as node.attested (after "rebooted"). The process
    # bindings a quote covers are checked after its own IMA replay: no transient binding failure either.
    others = [e for e in s.raised if e.kind != "node.rebooted"]
    assert [e.kind for e in others] == ["node.attested"], s.raised
    back = others[0].data
    assert back["after"] == "rebooted" and back["quote_id"] > first, back
    assert s.receiver.kinds().count("node.rebooted") == 1
    assert s.receiver.kinds().count("node.attested") == 1


# -- node.rekeyed ------------------------------------------------------------------------------------------
async def test_an_approved_rekey_is_one_rekeyed_webhook(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    async with node_daemon(tmp_path, swtpm_factory) as s:
        async with running(s.probe()) as probe:  # enrols with AK_HANDLE (EK pin, credential activation)
            await attested(s, probe)

        async def tpm(fn: Any) -> Any:
            def call() -> Any:
                with TpmClient(s.env.swtpm.tcti) as client:
                    return fn(client)

            return await asyncio.to_thread(call)

        # a new AK in the same TPM: refused until an admin approves it, and nothing is told
        with pytest.raises(EnrolError) as caught:
            await enrol(NODE, OTHER_HANDLE, s.post, tpm)
        assert caught.value.finding.context["refusal"] == "identity.rekey_unapproved"
        status, answer = await s.post("enroll", await tpm(lambda c: identity_doc(c, OTHER_HANDLE)))
        assert status == 409 and answer is not None
        wanted = {k: answer["findings"][-1]["context"][k] for k in ("ek_sha256", "ak_name")}
        approve = f"{s.daemon.management_url}/v1/ingest/admin/nodes/{NODE}/approve"
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with s.http.post(approve, json=wanted, headers=headers) as r:
            assert r.status == 200, await r.text()
        assert s.raised == []  # an approval alone changes no key
        await enrol(NODE, OTHER_HANDLE, s.post, tpm)
        await until(lambda: s.of("node.rekeyed") != [], "the node.rekeyed webhook")
        # the approval was used once: the old AK is refused again, nothing more is told
        with pytest.raises(EnrolError):
            await enrol(NODE, AK_HANDLE, s.post, tpm)
    rekeyed = s.of("node.rekeyed")
    assert len(rekeyed) == 1 and [e.kind for e in s.raised] == ["node.rekeyed"], s.raised
    data = rekeyed[0]["data"]
    assert data["ak_name"] == wanted["ak_name"] and data["ek_sha256"] == wanted["ek_sha256"], data
    assert data["ek_trust"] == "pinned" and isinstance(data["enrolled_ns"], int)
    assert "key" not in data  # never the evidence key


def identity_doc(client: TpmClient, handle: int) -> dict[str, Any]:
    ak = client.create_or_load_ak(handle, "rsa")
    return {
        "ek_public": client.ek_public("rsa").hex(),
        "ek_certificates": [],
        "ak_public": (ak.tpm2b_public or b"").hex(),
    }


# -- two daemons on one database ---------------------------------------------------------------------------
def test_two_daemons_on_one_database_raise_node_stale_once(pg_url: str) -> None:
    """Daemons sharing ``[store] url`` each run the stale check; when both find the node stale at the same
    moment, only one raises ``node.stale`` (each daemon's notifier would otherwise send its own). Daemon A
    is held between reading the node's stale record and writing it until B has read it too (or 10 s,
    when B cannot: it waits for A's transaction), the interleaving that raised it twice."""
    import threading

    from identity_support import AK_ATTRS, new_key, tpm2b, tpm_public

    from tmb.attest.policy import policy_from_dict
    from tmb.ingest.store_pg import PgIngestStore

    now = [10**18]
    raised: list[tuple[str, Event]] = []
    ingests = {
        name: Ingest(
            PgIngestStore(pg_url),
            policy=policy_from_dict({"version": 1}),
            stale_after_s=5.0,
            clock_ns=lambda: now[0],
            events=lambda e, name=name: raised.append((name, e)),
        )
        for name in ("a", "b")
    }
    try:
        ak = tpm2b(tpm_public(new_key(), AK_ATTRS, symmetric=False, scheme="rsassa"))
        ingests["a"].register_node(NODE, ak)
        b_read = threading.Event()
        for name, ingest in ingests.items():
            read = ingest.store.identity

            def identity(node: str, kind: str, read: Any = read, name: str = name) -> dict[str, Any] | None:
                got = read(node, kind)
                if kind == "stale" and name == "b":
                    b_read.set()
                elif kind == "stale" and name == "a":
                    b_read.wait(10.0)  # B's check reads the record now too, unless it must wait for A
                return got

            ingest.store.identity = identity  # type: ignore[method-assign]
        now[0] += 6 * 10**9
        checks = [threading.Thread(target=i.check_stale) for i in ingests.values()]
        for t in checks:
            t.start()
        for t in checks:
            t.join(60.0)
        assert not any(t.is_alive() for t in checks)
        assert [e.kind for _, e in raised] == ["node.stale"], raised
        assert all(i.stale_nodes() == {NODE: 10**18 + 5 * 10**9} for i in ingests.values())
    finally:
        for ingest in ingests.values():
            ingest.close()


def test_two_daemons_on_one_database_raise_node_unattested_once(
    pg_url: str, tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """Two failing quotes of one node taken at once by two daemons sharing ``[store] url``: the node turned
    unattested once. Daemon A is held after reading whether the node is unattested until B has read it
    too (or 5 s, when B cannot: it waits for A's transaction), the interleaving that raised
    ``node.unattested`` twice."""
    import threading
    import time

    from test_ingest_attacks import post, quote, sealed

    from tmb.ingest.store_pg import PgIngestStore

    env = make_node(tmp_path, swtpm_factory)
    raised: list[tuple[str, Event]] = []
    a = env.ingest(db=PgIngestStore(pg_url), events=lambda e: raised.append(("a", e)))
    b = Ingest(  # its clock 61 s ahead: a nonce of its own (A's is older than half the nonce lifetime)
        PgIngestStore(pg_url),
        policy=env.policy,
        identity=a.identity,
        clock_ns=lambda: time.time_ns() + 61 * 10**9,
        events=lambda e: raised.append(("b", e)),
    )
    try:
        _, bs = sealed(1)
        post(a, *bs)
        assert quote(env, a, bs[-1].head).data["ok"] and raised == []
        env.measure("/usr/bin/evil", b"not in the policy")
        assert a.add_ima(NODE, env.ima_doc(a.store.node(NODE).ima_end)).accepted  # type: ignore[union-attr]
        docs = {}
        nonces = {n: bytes.fromhex(i.nonce(NODE).data["nonce"]) for n, i in (("a", a), ("b", b))}
        for name in ("b", "a"):  # A's quote later: a TPM clock above B's
            docs[name] = env.quote_doc(nonces[name], bs[-1].head)
        assert docs["a"]["nonce"] != docs["b"]["nonce"]
        b_read = threading.Event()
        for name, ingest in (("a", a), ("b", b)):
            read = ingest.store.identity

            def identity(node: str, kind: str, read: Any = read, name: str = name) -> dict[str, Any] | None:
                got = read(node, kind)
                if kind == "unattested" and name == "b":
                    b_read.set()
                elif kind == "unattested":
                    b_read.wait(5.0)  # B reads it now too, unless it must wait for A's transaction
                return got

            ingest.store.identity = identity  # type: ignore[method-assign]
        results: dict[str, Any] = {}
        threads = [
            threading.Thread(target=lambda n=n, i=i: results.setdefault(n, i.add_quote(NODE, docs[n])))
            for n, i in (("a", a), ("b", b))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60.0)
        assert not any(t.is_alive() for t in threads)
        # B's quote is taken first, then A's (with the lock, A's may go first: B's, with its lower TPM
        # clock, is then refused); the node turned unattested once
        taken = [r for r in results.values() if r.accepted]
        assert taken and all(r.data["ok"] is False for r in taken), results
        assert [e.kind for _, e in raised] == ["node.unattested"], raised
    finally:
        a.close()
        b.close()
        env.close()


def test_a_refused_quote_is_told_once_with_the_episode_it_starts(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    """A quote that fails verification (here PCR values that are not the quoted ones) is refused, attests
    nothing, and turns the node unattested: ``node.unattested`` with ``refused`` and the ``quote.*`` ids.
    The episode is told once: neither the next refused quote nor a verified quote that breaks the policy
    tells it again; the first ``ok`` quote ends it with one ``node.attested``."""
    from test_ingest_attacks import post, quote, sealed

    env = make_node(tmp_path, swtpm_factory)
    raised: list[Event] = []
    ingest = env.ingest(events=raised.append)
    try:
        _, bs = sealed(1)
        post(ingest, *bs)
        assert quote(env, ingest, bs[-1].head).data["ok"]
        assert raised == []  # a node's first attesting quote is no transition

        def forged_quote() -> None:
            nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
            forged = env.quote_doc(nonce, bs[-1].head)
            forged["pcrs"]["sha256"]["10"] = "00" * 32
            out = ingest.add_quote(NODE, forged)
            assert out.refusal is not None and out.refusal.id.startswith("quote."), out.findings

        forged_quote()
        assert [e.kind for e in raised] == ["node.unattested"], raised
        data = raised[0].data
        assert data["refused"] is True and data["why"] and all(w.startswith("quote.") for w in data["why"])
        assert isinstance(data["quote_id"], int) and data["quote_id"] > 0
        forged_quote()  # still unattested: not told again
        env.measure("/usr/bin/evil", b"not in the policy")
        assert quote(env, ingest, bs[-1].head).data["ok"] is False
        assert [e.kind for e in raised] == ["node.unattested"], raised
        ingest.close()
        ingest = env.ingest(events=raised.append)  # a restart: the episode is in the store
        forged_quote()
        assert [e.kind for e in raised] == ["node.unattested"], raised
        # policy errors are sticky until the PCRs reset: a new boot; its first quote starts the epoch (the
        # log is sent again from offset 0 after it), the next one replays the new log and attests
        env.tpm.close()
        env.swtpm.reboot(orderly=True)
        env.tpm = env.swtpm.client()
        env.log.close()
        env.log = open(env.log_path, "wb")  # noqa: SIM115 - closed by env.close
        env.builder = LogBuilder(env.log)
        env.measure("boot_aggregate", b"boot")
        env.measure(PROBE_PATH, PROBE_BYTES)
        env.measure(ENGINE_EXE, b"engine")
        env.mount_model()
        _, bs = sealed(1)
        post(ingest, *bs)
        first = quote(env, ingest, bs[-1].head)
        assert first.data.get("rebooted") and not first.data["ok"], first.findings
        assert [e.kind for e in raised] == ["node.unattested", "node.rebooted"], raised
        second = quote(env, ingest, bs[-1].head)
        assert second.data["ok"], second.findings
        assert [e.kind for e in raised] == ["node.unattested", "node.rebooted", "node.attested"], raised
        assert raised[-1].data == {"quote_id": second.data["quote_id"], "after": "unattested"}
        assert quote(env, ingest, bs[-1].head).data["ok"]  # attested already: nothing more
        assert len(raised) == 3, raised
    finally:
        ingest.close()
        env.close()
