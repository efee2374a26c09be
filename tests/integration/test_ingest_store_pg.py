"""The evidence store on both backends (SQLite and a real PostgreSQL), then two ingests sharing one
PostgreSQL database: evidence taken by one daemon is the other's, its quote wakes the other's waiters
(LISTEN/NOTIFY, with a bounded re-check), and a chain position is taken once (real swtpm quotes)."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from swtpm import SwtpmFactory
from test_probe_support import NODE, NodeEnv, make_node

import tmb.ingest.service as service_module
from probes.chain import Chain
from tmb.attest.evidence import audit_bundle
from tmb.attest.pcr import ReplayState
from tmb.config import AttestationConfig, StoreConfig
from tmb.ingest.service import Ingest
from tmb.ingest.state import Hole, NodeState
from tmb.ingest.store import EvidenceStoreError, IngestBackend, IngestStore, open_ingest_store
from tmb.ingest.store_pg import AttestListener, PgIngestStore
from tmb.ingest.wire import TelemetryBatch
from tmb.telemetry.sample import SampleBatch
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.engine import Engine, EngineSettings
from tmb.verdict.model import Window
from tmb.verdict.signing import load_or_create_key

PASSWORD = "Pw-s3cret-7e2a"
WAIT_S = 10.0  # bound on every wait for another thread or connection (never reached when all is well)
SEG, SEG2 = b"\x01" * 16, b"\x02" * 16


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], IngestBackend]]:
    """``open_store()`` opens (another) evidence store on the test's own database."""
    opened: list[IngestBackend] = []
    if request.param == "sqlite":

        def make() -> IngestBackend:
            opened.append(IngestStore(tmp_path / "ingest.db"))
            return opened[-1]
    else:
        url: str = request.getfixturevalue("pg_url")

        def make() -> IngestBackend:
            opened.append(PgIngestStore(url))
            return opened[-1]

    try:
        yield make
    finally:
        for s in opened:
            s.close()


@pytest.fixture
def store(open_store: Callable[[], IngestBackend]) -> IngestBackend:
    return open_store()


# -- the contract, on both backends -------------------------------------------------------------------------


def test_nodes_round_trip(store: IngestBackend) -> None:
    assert store.node("n") is None
    with store.transaction():
        store.upsert_node("n", b"ak-1", 5)
        store.upsert_node("n", b"ak-2", 6)  # re-keyed
    row = store.node("n")
    assert row is not None and row.ak == b"ak-2" and row.segment is None and row.seq is None
    assert row.replay == ReplayState() and row.ima_data == b"" and row.state == NodeState()
    state = NodeState(holes=[Hole(SEG.hex(), 3, 4)], measured={"/x": True}, ima_entries=7)
    replay = ReplayState(offset=12, index=2, pcrs={"10:sha256": b"\x0a" * 32})
    with store.transaction():
        store.set_head("n", SEG, 9, b"h" * 32)
        store.set_ima("n", replay, b"\x00tail\xff")
        store.set_state("n", state)
    locked = None
    with store.transaction():
        locked = store.node("n", lock=True)
    again = store.node("n")
    assert again == locked and again is not None
    assert (again.segment, again.seq, again.head) == (SEG, 9, b"h" * 32)
    assert again.replay == replay and again.ima_data == b"\x00tail\xff" and again.ima_end == 18
    assert again.state == state


def test_identity_records_round_trip(store: IngestBackend) -> None:
    assert store.identity("n", "pinned") is None
    with store.transaction():
        store.set_identity("n", "pinned", {"ak_name": "00", "key": "ab" * 32}, 5)
        store.set_identity("n", "challenge", {"challenge": "c1", "expires_ns": 9}, 5)
        store.set_identity("n", "challenge", {"challenge": "c2", "expires_ns": 10}, 6)  # the newest replaces
    assert store.identity("n", "pinned") == {"ak_name": "00", "key": "ab" * 32}
    assert store.identity("n", "challenge") == {"challenge": "c2", "expires_ns": 10}
    assert store.identity("other", "pinned") is None
    with store.transaction():
        store.set_identity("n", "challenge", None, 7)  # consumed
    assert store.identity("n", "challenge") is None and store.identity("n", "pinned") is not None
    with store.transaction():
        store.set_identity("m", "challenge", {"challenge": "old"}, 3)
        store.set_identity("k", "challenge", {"challenge": "new"}, 30)
        assert store.drop_identities("challenge", 10) == 1  # only the expired one; pins are another kind
    assert store.identity("m", "challenge") is None and store.identity("k", "challenge") is not None
    assert store.identity("n", "pinned") is not None


def test_quote_times(store: IngestBackend) -> None:
    with store.transaction():
        store.upsert_node("a", b"ak", 5)
        store.upsert_node("b", b"ak", 6)
        store.add_quote("a", 10, True, None, {}, b"m", b"s")
        store.add_quote("a", 20, False, None, {}, b"m", b"s")  # refused: not a valid quote
        store.add_quote("b", 7, False, None, {}, b"m", b"s")
    assert store.quote_times() == [("a", 5, 10), ("b", 6, None)]


def test_a_failed_transaction_leaves_nothing(store: IngestBackend) -> None:
    with store.transaction():
        store.upsert_node("n", b"ak", 1)
    with pytest.raises(RuntimeError), store.transaction():
        store.set_head("n", SEG, 1, b"h")
        store.add_findings("n", 1, [{"id": "x"}])
        raise RuntimeError("the checks failed")
    row = store.node("n")
    assert row is not None and row.seq is None and store.findings("n") == []


def _chain(store: IngestBackend) -> None:
    """Segment SEG (batches 0..3) and SEG2 (batches 0..1) whose genesis links to SEG's batch 3."""
    with store.transaction():
        store.upsert_node("n", b"ak", 1)
        store.add_segment("n", SEG, 0, None, 1)
        for seq in range(4):
            store.add_batch("n", SEG, seq, bytes([seq]) * 32, b"p", b"payload", (seq * 10, seq * 10 + 5), 1)
        store.add_segment("n", SEG2, 0, (SEG, 3), 2)
        for seq in range(2):
            store.add_batch("n", SEG2, seq, bytes([9, seq]) * 16, b"p", b"x", (100 + seq, 101 + seq), 2)


def test_chain_rows_and_attestation_across_linked_segments(store: IngestBackend) -> None:
    _chain(store)
    seg = store.segment("n", SEG2)
    assert seg is not None and (seg.segment, seg.anchor_seq, seg.link_segment, seg.link_seq) == (
        SEG2,
        0,
        SEG,
        3,
    )
    assert store.segment("n", b"\x03" * 16) is None
    got = store.batch("n", SEG, 2)
    assert got is not None and (got.digest, got.payload, got.t0_ns, got.t1_ns, got.quote_id) == (
        b"\x02" * 32,
        b"payload",
        20,
        25,
        None,
    )
    assert store.batch("n", SEG, 9) is None
    assert store.find_digest("n", b"\x03" * 32) == (SEG, 3) and store.find_digest("n", b"?") is None
    assert store.count_batches("n") == 6 and store.count_batches("n", attested=True) == 0
    with store.transaction():
        q1 = store.add_quote("n", 3, True, (SEG, 1, b"\x01" * 32), {"ok": True, "k": 1}, b"m", b"s")
        assert store.attest("n", SEG, 1, q1) == 2
        q2 = store.add_quote("n", 4, True, (SEG2, 1, b"h"), {}, b"m2", b"s2")
        store.set_quote_summary(q2, {"ok": True, "k": 2})
        assert store.attest("n", SEG2, 1, q2) == 4  # SEG2's two, then SEG's 2..3 through the link
        store.set_anchor("n", SEG2, 1)
    assert q2 > q1 and store.quote_summary(q1) == {"ok": True, "k": 1} and store.quote_summary(999) is None
    assert store.last_quote("n") == {"ok": True, "k": 2} and store.last_quote("other") is None
    assert store.count_batches("n", attested=True) == 6 and store.count_batches("n", attested=False) == 0
    rows = store.batches_overlapping("n", 12, 101)
    assert [(r.segment, r.seq, r.quote_id) for r in rows] == [
        (SEG, 1, q1),
        (SEG, 2, q2),
        (SEG, 3, q2),
        (SEG2, 0, q2),
    ]
    seg2 = store.segment("n", SEG2)
    assert seg2 is not None and seg2.anchor_seq == 1


def test_a_chain_position_is_taken_once(store: IngestBackend) -> None:
    _chain(store)
    with pytest.raises((sqlite3.IntegrityError, EvidenceStoreError)), store.transaction():
        store.add_batch("n", SEG, 2, b"\x07" * 32, b"p", b"other", None, 3)
    with pytest.raises((sqlite3.IntegrityError, EvidenceStoreError)), store.transaction():
        store.add_segment("n", SEG, 0, None, 3)
    got = store.batch("n", SEG, 2)
    assert got is not None and got.payload == b"payload"


def test_eventlogs_and_findings(store: IngestBackend) -> None:
    with store.transaction():
        store.upsert_node("n", b"ak", 1)
    assert store.eventlog("n") is None and store.eventlog_digest("n") is None
    store.set_eventlog("n", 5, b"d1", b"log-1")
    store.set_eventlog("n", 6, b"d2", b"log-2\x00")  # replaces
    log = store.eventlog("n")
    assert log is not None and (log.received_ns, log.digest, log.data) == (6, b"d2", b"log-2\x00")
    assert store.eventlog_digest("n") == b"d2"
    store.add_findings("n", 10, [{"id": "a", "context": {"ü": 1}}, {"id": "b"}])
    store.add_findings("n", 20, [{"id": "c"}])
    store.add_findings("n", 30, [])
    assert [f["id"] for f in store.findings("n")] == ["a", "b", "c"]
    assert store.findings("n", 15, 25) == [{"id": "c"}] and store.findings("other") == []
    assert store.findings("n")[0]["context"] == {"ü": 1}


def test_evidence_trail_and_nonce_log(store: IngestBackend) -> None:
    """Blobs once per digest; records per node in order with the bounded reads the export uses (the IMA
    segments of the current log after a reboot, quotes by id range, the newest record before a time);
    a nonce consumed once."""
    with store.transaction():
        store.upsert_node("n", b"ak", 1)
        assert store.put_blob("ima", b"abc") == store.put_blob("ima", b"abc")
        for t, (offset, data) in enumerate([(0, b"boot1-"), (6, b"more"), (0, b"boot2-"), (6, b"x")]):
            store.keep("n", "ima", 10 + t, data, offset, length=len(data))
        for qid in (3, 4, 7):
            store.keep("n", "quote", 20 + qid, f"quote {qid}".encode(), qid, ok=True)
        store.keep("n", "eventlog", 30, b"log-1")
        store.keep("n", "eventlog", 40, b"log-2")
        store.keep("m", "eventlog", 50, b"other node")
    assert store.blob(hashlib.sha256(b"abc").digest()) == b"abc"
    assert [store.blob(r.digest) for r in store.ima_since_reset("n", 11, 10)] == [b"boot1-", b"more"]
    assert [store.blob(r.digest) for r in store.ima_since_reset("n", 99, 10)] == [b"boot2-", b"x"]
    assert [r.ref for r in store.quote_records("n", 4, 7, 10)] == [4, 7]
    last = store.last_record("n", "eventlog", until_ns=39)
    assert last is not None and store.blob(last.digest) == b"log-1"
    newest = store.last_record("n", "eventlog")
    assert newest is not None and store.blob(newest.digest) == b"log-2"
    assert store.last_record("n", "ak") is None
    with store.transaction():
        store.issue_nonce("n", b"\x01" * 32, 100)
        assert store.fresh_nonce("n", 100) == b"\x01" * 32 and store.fresh_nonce("n", 101) is None
        assert store.consume_nonce("n", b"\x01" * 32, 105, b"q" * 32)
        assert not store.consume_nonce("n", b"\x01" * 32, 106, b"r" * 32)
        assert store.fresh_nonce("n", 0) is None
    row = store.nonce_row("n", b"\x01" * 32)
    assert row is not None and (row.issued_ns, row.consumed_ns, row.quote_digest) == (100, 105, b"q" * 32)
    assert store.consumed_nonces("n", [b"q" * 32]) == [row]


def test_request_nonces_are_used_once_and_pruned_a_few_at_a_time(
    open_store: Callable[[], IngestBackend],
) -> None:
    """The evidence requests' replay window: an ``n`` is fresh once per node, for every store on the
    database; each insert deletes at most ``prune_limit`` rows signed before the cutoff."""
    one, two = open_store(), open_store()
    with one.transaction():
        assert one.use_request_nonce("n", b"\x01" * 16, 1_000, 0)
        assert not one.use_request_nonce("n", b"\x01" * 16, 1_000, 0)  # a replay
        assert one.use_request_nonce("m", b"\x01" * 16, 1_000, 0)  # another node's
    with two.transaction():
        assert not two.use_request_nonce("n", b"\x01" * 16, 1_000, 0)  # the other store's: a replay too
    with one.transaction():
        for k in range(20):
            assert one.use_request_nonce("n", k.to_bytes(16, "big"), 2_000 + k, 0)
    assert one.request_nonces() == 22
    with two.transaction():  # the two oldest (t 1000) and one of 2000.., 3 at most
        assert two.use_request_nonce("n", b"\x02" * 16, 9_000, 2_010, prune_limit=3)
    assert one.request_nonces() == 22 - 3 + 1
    for _ in range(10):  # idempotent: a cutoff past which nothing is left deletes nothing more
        with one.transaction():
            one.use_request_nonce("n", os.urandom(16), 9_000, 2_010)
    assert one.request_nonces() == 10 + 1 + 10  # t 2010..2019, the 9000 one, the ten new ones
    with one.transaction():  # a pruned nonce is forgotten: its request is stale by then (tmb.ingest.auth)
        assert one.use_request_nonce("n", b"\x01" * 16, 1_000, 0)


def _blob_count(store: IngestBackend) -> int:
    return len(store._rows("SELECT digest FROM ingest_blobs"))  # type: ignore[attr-defined]


def test_evidence_retention_keeps_what_later_exports_need(store: IngestBackend) -> None:
    """A node's trail over two boots and three quotes; the cutoff (35) falls after the second quote: the
    third is the first kept one (it attests the only batch ending after the cutoff), so the IMA log of its
    boot (from the reboot at 20), the event log in force then (25), the AK (1) and its nonce stay; the first
    boot's IMA, the older event log, the first two quotes with their batches, nonces and message blobs, the
    old findings go; blobs a record names from its meta (signatures, PCRs) stay; a second pass deletes
    nothing."""
    with store.transaction():
        store.upsert_node("n", b"ak", 1)
        store.keep("n", "ak", 1, b"ak-bytes")
        for t, (offset, data) in [
            (10, (0, b"boot1-")),
            (11, (6, b"more")),
            (20, (0, b"boot2-")),
            (40, (6, b"y")),
        ]:
            store.keep("n", "ima", t, data, offset, length=len(data))
        store.keep("n", "eventlog", 5, b"log-1")
        store.keep("n", "eventlog", 25, b"log-2")
        for t, doc in [(14, b"bind-1"), (29, b"bind-2"), (48, b"bind-3")]:  # each before its quote
            store.keep("n", "bindings", t, doc, processes=1)
        store.add_segment("n", SEG, 0, None, 1)
        quotes = []
        for k, t in enumerate((15, 30, 50)):
            qid = store.add_quote("n", t, True, (SEG, k, b"h"), {"ok": True}, b"m", b"s")
            sig, pcrs = (
                store.put_blob("quote.signature", b"sig-%d" % k),
                store.put_blob("quote.pcrs", b"pcrs"),
            )
            digest = store.keep(
                "n", "quote", t, b"message-%d" % k, qid, ok=True, signature=sig.hex(), pcrs=pcrs.hex()
            )
            store.issue_nonce("n", bytes([k]) * 32, t - 1)
            assert store.consume_nonce("n", bytes([k]) * 32, t, digest)
            quotes.append((qid, digest))
        store.issue_nonce("n", b"\xff" * 32, 3)  # never used
        for seq, t1, q in [(0, 12, 0), (1, 14, 0), (2, 22, 1), (3, 28, 1), (4, 45, 2), (5, 60, None)]:
            store.add_batch("n", SEG, seq, bytes([seq]) * 32, b"p", b"x", (t1 - 1, t1), t1)
            if q is not None:
                store._rows(  # type: ignore[attr-defined]
                    "UPDATE ingest_batches SET quote_id = ? WHERE node = ? AND seq = ?",
                    (quotes[q][0], "n", seq),
                )
        store.add_findings("n", 10, [{"id": "old"}])
        store.add_findings("n", 35, [{"id": "kept"}])
    blobs = _blob_count(store)
    with store.transaction():
        first = store.prune_evidence(35, 4)  # bounded: 4 rows (and the blobs of the records among them)
    assert first == 4
    total = first
    while True:
        with store.transaction():
            n = store.prune_evidence(35, 4)
        total += n
        if n < 4:
            break
    # 4 batches, 2 quote rows, 2 quote records + 2 message blobs, 2 nonces (q0, q1) + the unused one,
    # 2 IMA records + 2 blobs, 1 event log record + its blob, 2 bindings records (their blobs stay: quotes
    # name them from their meta), 1 finding
    assert total == 4 + 2 + 4 + 3 + 4 + 2 + 2 + 1
    assert [r.seq for r in store.batches_overlapping("n", 0, 100)] == [4, 5]
    assert store.quote_summary(quotes[0][0]) is None and store.quote_summary(quotes[2][0]) == {"ok": True}
    assert [r.ref for r in store.quote_records("n", 0, 1 << 40, 10)] == [quotes[2][0]]
    assert store.blob(hashlib.sha256(b"message-0").digest()) is None
    assert store.blob(hashlib.sha256(b"sig-0").digest()) == b"sig-0"  # named from meta: kept
    assert store.consumed_nonces("n", [d for _, d in quotes]) == [store.nonce_row("n", b"\x02" * 32)]
    assert store.nonce_row("n", b"\xff" * 32) is None
    assert [store.blob(r.digest) for r in store.ima_since_reset("n", 99, 10)] == [b"boot2-", b"y"]
    assert [store.blob(r.digest) for r in store.records("n", "ima")] == [b"boot2-", b"y"]
    assert [store.blob(r.digest) for r in store.records("n", "eventlog")] == [b"log-2"]
    assert [store.blob(r.digest) for r in store.records("n", "ak")] == [b"ak-bytes"]
    assert [store.blob(r.digest) for r in store.records("n", "bindings")] == [b"bind-3"]
    assert store.blob(hashlib.sha256(b"bind-1").digest()) == b"bind-1"
    assert store.findings("n") == [{"id": "kept"}]
    assert _blob_count(store) == blobs - 5
    with store.transaction():  # idempotent
        assert store.prune_evidence(35, 1000) == 0


def test_a_blob_named_from_meta_is_never_pruned(store: IngestBackend) -> None:
    """The same bytes kept as an IMA segment and named as a quote's PCR values: pruning the IMA record
    leaves the blob (its kind is the meta kind, whichever came first)."""
    with store.transaction():
        store.upsert_node("n", b"ak", 1)
        store.keep("n", "ima", 1, b"same bytes", 0)
        store.put_blob("quote.pcrs", b"same bytes")
        store.keep("n", "ima", 2, b"other", 0)  # a reboot: the first segment is no longer needed
        store.add_segment("n", SEG, 0, None, 1)
        qid = store.add_quote("n", 3, True, (SEG, 0, b"h"), {}, b"m", b"s")
        store.keep("n", "quote", 3, b"msg", qid, ok=True)
    with store.transaction():
        assert store.prune_evidence(10, 100) == 1  # the first IMA record; its blob stays
    assert store.blob(hashlib.sha256(b"same bytes").digest()) == b"same bytes"


def test_a_second_store_sees_the_first_ones_writes(open_store: Callable[[], IngestBackend]) -> None:
    one, two = open_store(), open_store()
    _chain(one)
    assert two.count_batches("n") == 6 and two.node("n") is not None


def test_open_ingest_store_follows_the_config(tmp_path: Path, pg_url: str) -> None:
    own = open_ingest_store(
        AttestationConfig(db=str(tmp_path / "e.db")), StoreConfig(path=str(tmp_path / "s"))
    )
    shared = open_ingest_store(AttestationConfig(), StoreConfig(path=str(tmp_path / "s"), url=pg_url))
    try:
        assert isinstance(own, IngestStore) and not own.shared and (tmp_path / "e.db").exists()
        assert isinstance(shared, PgIngestStore) and shared.shared
        default = open_ingest_store(AttestationConfig(), StoreConfig(path=str(tmp_path / "s")))
        assert isinstance(default, IngestStore) and (tmp_path / "s").exists()
        default.close()
    finally:
        own.close()
        shared.close()


# -- PostgreSQL: errors -------------------------------------------------------------------------------------


def test_unreachable_database_is_an_evidence_store_error_without_the_password() -> None:
    with tempfile.TemporaryDirectory() as empty:
        url = f"postgresql://postgres:{PASSWORD}@/tmb?host={empty}&port=5432"
        with pytest.raises(EvidenceStoreError, match="cannot open store") as info:
            PgIngestStore(url)
    text = str(info.value) + info.value.diagnostics() + repr(info.value.context)
    assert PASSWORD not in text and "***" in info.value.context["url"] and info.value.hint
    assert info.value.__cause__ is None


def test_lost_connection_reconnects(pg_url: str) -> None:
    store = PgIngestStore(pg_url)
    try:
        with store.transaction():
            store.upsert_node("n", b"ak", 1)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'tmb'"
            )
        with pytest.raises(EvidenceStoreError):
            store.node("n")
        assert store.node("n") is not None  # the next call reconnects
    finally:
        store.close()


def test_listener_reconnects_and_asks_for_a_recheck(pg_url: str) -> None:
    heard: list[str] = []
    resyncs: list[int] = []
    listener = AttestListener(pg_url, heard.append, lambda: resyncs.append(1), poll_s=0.05, retry_s=0.05)
    try:
        assert listener.listening.wait(WAIT_S) and resyncs == [1]
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("SELECT pg_notify('tmb_ingest_attested', 'node-a')")
            _until(lambda: heard == ["node-a"])
            other.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'tmb' AND query LIKE 'LISTEN%'"
            )
            _until(lambda: len(resyncs) == 2 and listener.listening.is_set())
            other.execute("SELECT pg_notify('tmb_ingest_attested', 'node-b')")
            _until(lambda: heard == ["node-a", "node-b"])
    finally:
        listener.close()


def _until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- two daemons on one PostgreSQL database -----------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Any:
    env = make_node(tmp_path, swtpm_factory)
    yield env
    env.close()


def _ingest(env: NodeEnv, url: str) -> Ingest:
    ingest = Ingest(PgIngestStore(url), policy=env.policy)
    assert env.ak.tpm2b_public is not None
    ingest.register_node(NODE, env.ak.tpm2b_public)  # every daemon registers the configured nodes
    return ingest


def _batches(now: int, n: int = 3) -> tuple[Chain, list[TelemetryBatch]]:
    chain = Chain(NODE)
    out = [chain.genesis("synthetic")]
    for k in range(n):
        t = now - 3_000_000_000 + k * 1_000_000_000
        samples = SampleBatch.from_columns(
            [t, t + 500_000_000], ["GPU-x"], source="synthetic", power_w=[100.0, 101.0]
        )
        out.append(chain.seal(samples.encode()))
    return chain, out


async def test_evidence_taken_by_one_daemon_wakes_and_serves_the_other(
    node: NodeEnv, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "RECHECK_S", 60.0)  # only the NOTIFY can wake B within the test
    a, b = _ingest(node, pg_url), _ingest(node, pg_url)
    assert a.store.shared and a._listener is not None and b._listener is not None
    assert isinstance(b._listener, AttestListener) and b._listener.listening.wait(WAIT_S)
    now = time.time_ns()
    _, batches = _batches(now)
    taken = await a.submit(NODE, a.add_batches, {"batches": [x.to_wire() for x in batches]})
    assert taken.accepted and taken.data["accepted"] == [0, 1, 2, 3]
    assert (await a.submit(NODE, a.add_ima, node.ima_doc())).accepted
    status = b.status(NODE)
    assert status is not None and status["batches"] == 4 and status["attested"] == 0
    assert (
        status["head"] == batches[-1].head.to_wire() and status["ima_offset"] == node.log_path.stat().st_size
    )

    store = AsyncStore(str(tmp_path / "verdicts.db"))
    engine = Engine(store, load_or_create_key(tmp_path / "k.pem"), b, [], EngineSettings(wait_s=60.0))
    window = Window(now - 2_900_000_000, now - 1_000_000_000, False)
    waiting = asyncio.create_task(engine._wait_for_evidence(NODE, window))  # daemon B's engine
    await asyncio.sleep(0.3)
    assert not waiting.done()
    nonce = bytes.fromhex((await a.submit(NODE, a.nonce)).data["nonce"])
    t = time.monotonic()
    quoted = await a.submit(NODE, a.add_quote, node.quote_doc(nonce, batches[-1].head))
    assert quoted.ok and quoted.attested == 4, quoted.findings
    got = await asyncio.wait_for(waiting, WAIT_S)
    assert time.monotonic() - t < WAIT_S
    assert got.summary is not None and got.summary.ok and got.covers_end()
    assert got.quote_id == quoted.data["quote_id"] and {x.seq for x in got.batches} == {1, 2}

    # the probe resends to B what A took: duplicates, as one daemon would answer
    more = await b.submit(NODE, b.add_batches, {"batches": [x.to_wire() for x in batches[-2:]]})
    assert more.accepted and more.data["duplicates"] == 2 and more.data["accepted"] == []
    assert a.store.count_batches(NODE) == 4
    await store.close()
    a.close()
    b.close()


async def test_a_lost_notification_only_delays(
    node: NodeEnv, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "RECHECK_S", 0.2)
    b = _ingest(node, pg_url)
    assert b._listener is not None
    b._listener.close()  # B hears nothing more: its waiters still look again every RECHECK_S
    since = b.attested_since(NODE)
    t = time.monotonic()
    assert not await b.wait_attested(NODE, since, 60.0)
    assert time.monotonic() - t < WAIT_S
    b.close()


def test_concurrent_duplicates_and_forks_are_refused_once(node: NodeEnv, pg_url: str) -> None:
    a, b = _ingest(node, pg_url), _ingest(node, pg_url)
    now = time.time_ns()
    chain, batches = _batches(now, 5)
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def send(name: str, ingest: Ingest, doc: dict[str, Any]) -> None:
        barrier.wait(WAIT_S)
        results[name] = ingest.add_batches(NODE, doc)

    doc = {"batches": [x.to_wire() for x in batches]}
    threads = [threading.Thread(target=send, args=(n, i, doc)) for n, i in (("a", a), ("b", b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT_S)
    got = sorted((r.data["accepted"], r.data["duplicates"]) for r in results.values())
    assert all(r.accepted for r in results.values())
    assert got == [([], 6), ([0, 1, 2, 3, 4, 5], 0)]  # one daemon took them, the other saw duplicates
    assert a.store.count_batches(NODE) == 6

    # two different batches for the next position, at once: one is taken, the other is a fork
    forks = [
        copy.copy(chain).seal(
            SampleBatch.from_columns([now + k], ["GPU-x"], source="synthetic", power_w=[float(k)]).encode()
        )
        for k in range(2)
    ]
    results.clear()
    barrier = threading.Barrier(2)
    threads = [
        threading.Thread(target=send, args=(n, i, {"batches": [f.to_wire()]}))
        for n, i, f in (("a", a, forks[0]), ("b", b, forks[1]))
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT_S)
    outcomes = sorted("taken" if r.refusal is None else r.refusal.id for r in results.values())
    assert outcomes == ["chain.fork", "taken"], [r.findings for r in results.values()]
    assert a.store.count_batches(NODE) == 7
    a.close()
    b.close()


def test_two_daemons_share_the_nonce_log(node: NodeEnv, pg_url: str, tmp_path: Path) -> None:
    """A nonce daemon A issued is accepted by daemon B and consumed once in all (the same quote sent to both
    at once is taken once); a quote whose signature fails burns no nonce; B's export carries the nonce log
    entries of quotes either daemon took, and the bundle audits offline."""
    a, b = _ingest(node, pg_url), _ingest(node, pg_url)
    now = time.time_ns()
    _, batches = _batches(now)
    assert a.add_batches(NODE, {"batches": [x.to_wire() for x in batches[:2]]}).accepted
    assert a.add_ima(NODE, node.ima_doc()).accepted
    nonce = bytes.fromhex(a.nonce(NODE).data["nonce"])
    doc = node.quote_doc(nonce, batches[1].head)
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def send(name: str, ingest: Ingest) -> None:
        barrier.wait(WAIT_S)
        results[name] = ingest.add_quote(NODE, doc)

    threads = [threading.Thread(target=send, args=(n, i)) for n, i in (("a", a), ("b", b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT_S)
    outcomes = sorted("taken" if r.refusal is None else r.refusal.id for r in results.values())
    assert outcomes == ["taken", "taken"], [r.findings for r in results.values()]
    # One consumed the nonce; the other, the same quote, is its duplicate (nothing kept twice).
    assert sorted(bool(r.data.get("duplicate")) for r in results.values()) == [False, True]
    assert len({r.data["quote_id"] for r in results.values()}) == 1
    replay = a.add_quote(NODE, dict(doc, signature=base64.b64encode(b"\x02" * 72).decode()))
    assert replay.refusal is not None and replay.refusal.id == "ingest.nonce_reused"

    assert b.add_batches(NODE, {"batches": [x.to_wire() for x in batches[2:]]}).accepted
    fresh = bytes.fromhex(b.nonce(NODE).data["nonce"])  # issued by B ...
    second = node.quote_doc(fresh, batches[-1].head)
    garbage = dict(second, signature=base64.b64encode(b"\x00" * 10).decode())
    assert not a.add_quote(NODE, garbage).accepted  # ... not burnt by a quote that fails ...
    out = a.add_quote(NODE, second)  # ... and taken by A
    assert out.accepted and out.data["ok"], out.findings

    signer = load_or_create_key(tmp_path / "verdict.key")
    bundle = b.export(
        tmp_path / "bundle",
        NODE,
        now - 3_000_000_000,
        now,
        sign=lambda m: (signer.public.raw, signer.sign_bytes(m)),
    )
    entries = json.loads((bundle / "nonces.json").read_text())["entries"]
    assert [e["nonce"] for e in entries] == [nonce.hex(), fresh.hex()]
    result = audit_bundle(bundle, policy_path=_policy_file(node, tmp_path), daemon_keys=[signer.public.raw])
    assert result.ok and len(result.quotes) == 2, [(f.id, f.context) for f in result.report.errors]
    a.close()
    b.close()


def _policy_file(node: NodeEnv, tmp: Path) -> Path:
    from test_evidence_export import policy_toml

    path = tmp / "policy.toml"
    path.write_text(policy_toml(node.policy_doc))
    return path


# -- evidence retention with real quotes -------------------------------------------------------------------

DAY_NS = 86400 * 10**9


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_pruned_trail_still_exports_a_kept_window_that_audits_clean(
    node: NodeEnv, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """Two attested rounds of telemetry ten days apart (the ingest's clock moved on); pruning with a cutoff
    between them deletes the first round's batches, quote and nonce, and the second round's bundle is the
    same before and after and audits clean (real swtpm quotes); a second pruning deletes nothing."""
    now = time.time_ns()
    clock = [now]
    db: Any = (
        tmp_path / "ingest.db" if backend == "sqlite" else PgIngestStore(request.getfixturevalue("pg_url"))
    )
    ingest = Ingest(db, policy=node.policy, clock_ns=lambda: clock[0])
    assert node.ak.tpm2b_public is not None
    ingest.register_node(NODE, node.ak.tpm2b_public)
    chain, batches = _batches(now)
    assert ingest.add_batches(NODE, {"batches": [x.to_wire() for x in batches]}).accepted
    assert ingest.add_ima(NODE, node.ima_doc()).accepted
    nonce = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    first = ingest.add_quote(NODE, node.quote_doc(nonce, batches[-1].head))
    assert first.accepted and first.attested == 4, first.findings

    clock[0] = later = now + 10 * DAY_NS
    more = []
    for k in range(3):
        t = later - 3_000_000_000 + k * 1_000_000_000
        samples = SampleBatch.from_columns(
            [t, t + 500_000_000], ["GPU-x"], source="synthetic", power_w=[99.0, 98.0]
        )
        more.append(chain.seal(samples.encode()))
    assert ingest.add_batches(NODE, {"batches": [x.to_wire() for x in more]}).accepted
    nonce2 = bytes.fromhex(ingest.nonce(NODE).data["nonce"])
    second = ingest.add_quote(NODE, node.quote_doc(nonce2, more[-1].head))
    assert second.accepted and second.attested == 3, second.findings

    signer = load_or_create_key(tmp_path / "verdict.key")
    policy = _policy_file(node, tmp_path)

    def export(name: str) -> tuple[Path, dict[str, bytes]]:
        bundle = ingest.export(
            tmp_path / name,
            NODE,
            later - 2_900_000_000,
            later - 1_000_000_000,
            sign=lambda m: (signer.public.raw, signer.sign_bytes(m)),
        )
        result = audit_bundle(bundle, policy_path=policy, daemon_keys=[signer.public.raw])
        assert result.ok and len(result.quotes) == 1, [(f.id, f.context) for f in result.report.errors]
        files = {str(p.relative_to(bundle)): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
        return bundle, {k: v for k, v in files.items() if k not in ("nonces.json", "manifest.json")}

    _, before = export("before")
    old_quote = ingest.store.last_record(NODE, "quote", until_ns=now)
    assert old_quote is not None
    old_findings = ingest.store.findings(NODE, 0, now + DAY_NS)
    old_nonces = ingest.store._rows(  # type: ignore[attr-defined]
        "SELECT COUNT(*) FROM ingest_nonces WHERE issued_ns < ?", (now + DAY_NS,)
    )[0][0]
    deleted = 0
    while (n := ingest.prune_evidence(now + 5 * DAY_NS, 3)) >= 3:  # bounded passes of 3 rows
        deleted += n
    deleted += n
    _, after = export("after")
    assert after == before  # the same evidence (the nonce log's signature and the manifest aside)
    assert ingest.store.count_batches(NODE) == 3
    # the first round's 4 batches, its quote row and record, the record's message blob, its nonces (the one
    # its quote consumed, and the next one the answer carried), its findings
    assert old_nonces == 2 and deleted == 4 + 1 + 1 + 1 + old_nonces + len(old_findings)
    assert ingest.store.findings(NODE, 0, now + DAY_NS) == []
    assert (
        ingest.store.blob(old_quote.digest) is None
        and ingest.store.last_record(NODE, "quote", until_ns=now) is None
    )
    assert ingest.store.nonce_row(NODE, nonce) is None and ingest.store.nonce_row(NODE, nonce2) is not None
    assert ingest.prune_evidence(now + 5 * DAY_NS, 1000) == 0  # idempotent
    ingest.close()
