"""The store contract on both backends (SQLite and a real PostgreSQL), then what only PostgreSQL adds:
daemons sharing one database, connection and schema errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg import PgServer

import tmb.verdict.store as store_module
import tmb.verdict.store_pg as store_pg_module
from tmb.spans import Outcome, Span
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.model import Decision, Verdict, Window
from tmb.verdict.signing import Signer, load_or_create_key
from tmb.verdict.store import EvidenceRef, Store, StoreError
from tmb.verdict.store_pg import PgStore

AnyStore = Store | PgStore
PASSWORD = "Pw-s3cret-9f1c"
WAIT_S = 10.0  # bound on every wait for another thread or connection (never reached when all is well)


def rid(i: int) -> str:
    return f"{i:032x}"


def span(i: int, end_ns: int = 1000, served: bool = True, **changes: Any) -> Span:
    s = Span(
        rid(i),
        f"corr-{i}",
        "w" if served else None,
        "n" if served else None,
        ("GPU-0", "GPU-1") if served else (),
        "m",
        "m",
        "POST",
        "/v1/chat/completions?x=ü",
        end_ns - 10,
        end_ns - 5 if served else None,
        end_ns,
        200 if served else 502,
        12,
        345,
        7 if served else None,
        Outcome.OK if served else Outcome.UPSTREAM_ERROR,
        ("w0",) if served else (),
        None if served else "connect: refused «x»",
    )
    return dataclasses.replace(s, **changes)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return load_or_create_key(tmp_path / "k.pem")


def final(signer: Signer, request_id: str, decision: Decision = Decision.UNATTESTED) -> Verdict:
    v = Verdict(
        request_id,
        None,
        "w",
        "n",
        (),
        "m",
        None,
        Window(1, 2),
        {"pcr10": "ab"},
        {},
        decision,
        (),
        "synthetic",
        5,
    )
    return signer.sign(v)


def unsigned(v: Verdict) -> Verdict:
    return dataclasses.replace(v, signature="")


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], AnyStore]]:
    """``open_store()`` opens (another) store on the test's own database: a SQLite file or a PG database."""
    opened: list[AnyStore] = []
    if request.param == "sqlite":
        path = tmp_path / "s.sqlite3"

        def make() -> AnyStore:
            opened.append(Store(path))
            return opened[-1]
    else:
        url: str = request.getfixturevalue("pg_url")

        def make() -> AnyStore:
            opened.append(PgStore(url))
            return opened[-1]

    try:
        yield make
    finally:
        for s in opened:
            s.close()


@pytest.fixture
def store(open_store: Callable[[], AnyStore]) -> AnyStore:
    return open_store()


# -- the contract, on both backends -------------------------------------------------------------------------


def test_spans_round_trip(store: AnyStore) -> None:
    spans = [span(1), span(2, served=False), span(3, correlation_id=None, tokens=None, path="/\u00e9\u4e2d")]
    store.record_spans(spans)
    for s in spans:
        got = store.get_span(s.id)
        assert got == s and got == Span.from_dict(s.to_dict())
        assert store.lookup(s.id).span == s
    assert store.get_span(rid(99)) is None
    assert store.lookup(rid(99)) == store_module.VerdictRecord(rid(99), "unknown", None, None)


def test_pending_row_only_for_served_spans(store: AnyStore) -> None:
    store.record_spans([span(1), span(2, served=False), span(3, first_byte_ns=None)])
    assert store.lookup(rid(1)).state == "pending"
    assert store.lookup(rid(2)).state == "unknown" and store.lookup(rid(2)).span == span(2, served=False)
    assert store.lookup(rid(3)).state == "unknown"  # a worker was picked but sent nothing back
    assert store.pending() == [rid(1)]
    assert store.counts() == {"spans": 3, "pending": 1, "final": 0, "evidence": 0}


def test_put_verdict_replaces_pending_with_final(open_store: Callable[[], AnyStore], signer: Signer) -> None:
    store = open_store()
    store.record_spans([span(1), span(2)])
    v = final(signer, rid(1))
    store.put_verdict(v)
    rec = store.lookup(rid(1))
    assert rec.state == "final" and rec.doc == v.encode() and type(rec.doc) is bytes and rec.span == span(1)
    assert store.pending() == [rid(2)]
    again = final(signer, rid(1), Decision.VERIFIED)  # a newer verdict replaces the old one
    store.put_verdict(again)
    store.close()
    reopened = open_store()
    assert reopened.lookup(rid(1)).doc == again.encode()
    assert reopened.counts() == {"spans": 2, "pending": 1, "final": 1, "evidence": 0}
    lone = final(signer, rid(7))  # a verdict for a span this store never saw
    reopened.put_verdict(lone)
    assert reopened.lookup(rid(7)) == store_module.VerdictRecord(rid(7), "final", lone.encode(), None)


def test_evidence_keeps_its_order_and_is_replaced(store: AnyStore, signer: Signer) -> None:
    refs = [
        EvidenceRef("telemetry_batch", "bb" * 32),
        EvidenceRef("quote", "aa" * 32, "n", 7, "https://x/q/1", {"pcr": 10, "nested": {"a": [1, 2]}}),
        EvidenceRef("policy", "cc" * 32, detail={"name": "ü"}),
    ]
    store.record_spans([span(1)])
    store.put_verdict(final(signer, rid(1)), refs)
    assert store.evidence(rid(1)) == refs
    assert store.evidence(rid(2)) == []
    store.put_verdict(final(signer, rid(1)), refs[2:])
    assert store.evidence(rid(1)) == refs[2:]
    assert store.counts()["evidence"] == 1


def test_span_insert_is_idempotent(store: AnyStore, signer: Signer) -> None:
    store.record_spans([span(1), span(1)])
    store.record_spans([span(1, status=500)])  # the first write of an id wins
    assert store.get_span(rid(1)) == span(1)
    store.put_verdict(final(signer, rid(1)))
    store.record_spans([span(1)])  # a replayed span does not make a final verdict pending again
    assert store.lookup(rid(1)).state == "final"
    assert store.counts() == {"spans": 1, "pending": 0, "final": 1, "evidence": 0}


def test_write_batch_is_all_or_nothing(store: AnyStore, signer: Signer) -> None:
    store.write_batch(
        [
            ([span(1), span(2)], None),
            (None, (final(signer, rid(1)), [EvidenceRef("quote", "aa")])),
            ([], None),
        ]
    )
    assert store.counts() == {"spans": 2, "pending": 1, "final": 1, "evidence": 1}
    too_late = span(9, end_ns=2**63)  # past a 64-bit integer: the database refuses it mid-transaction
    batch = [
        ([span(3)], None),
        (None, (final(signer, rid(2)), [EvidenceRef("quote", "dd")])),
        ([too_late], None),
    ]
    with pytest.raises((OverflowError, StoreError)):  # SQLite's driver / PgStore
        store.write_batch(batch)
    assert store.counts() == {"spans": 2, "pending": 1, "final": 1, "evidence": 1}
    assert store.get_span(rid(3)) is None and store.lookup(rid(2)).state == "pending"
    assert store.evidence(rid(2)) == []


def test_unsigned_verdict_is_refused(store: AnyStore, signer: Signer) -> None:
    v = unsigned(final(signer, rid(1)))
    with pytest.raises(ValueError, match="unsigned"):
        store.put_verdict(v)
    with pytest.raises(ValueError, match="unsigned"):
        store.write_batch([([span(1)], None), (None, (v, ()))])
    assert store.counts() == {"spans": 0, "pending": 0, "final": 0, "evidence": 0}


def test_pending_oldest_first(store: AnyStore, signer: Signer) -> None:
    store.record_spans([span(5, end_ns=3000)])
    store.record_spans([span(3, end_ns=1000), span(9, end_ns=2000), span(1, end_ns=2000), span(4, end_ns=1)])
    store.put_verdict(final(signer, rid(4)))
    assert store.pending() == [rid(3), rid(1), rid(9), rid(5)]  # by end time, then id
    assert store.pending(limit=2) == [rid(3), rid(1)]


def test_counts(store: AnyStore, signer: Signer) -> None:
    assert store.counts() == {"spans": 0, "pending": 0, "final": 0, "evidence": 0}
    store.record_spans([span(i) for i in range(5)] + [span(10, served=False)])
    store.put_verdict(final(signer, rid(0)), [EvidenceRef("quote", "a"), EvidenceRef("policy", "b")])
    store.put_verdict(final(signer, rid(1)), [EvidenceRef("quote", "c")])
    assert store.counts() == {"spans": 6, "pending": 3, "final": 2, "evidence": 3}


def test_prune_removes_spans_verdicts_and_evidence_before_a_cutoff(store: AnyStore, signer: Signer) -> None:
    store.record_spans([span(1, end_ns=100), span(2, end_ns=999), span(3, end_ns=1000), span(4, end_ns=5000)])
    for i in (1, 3):
        store.put_verdict(final(signer, rid(i)), [EvidenceRef("quote", f"{i}" * 4)])
    assert store.prune(1000) == 2  # strictly before the cutoff
    assert [store.get_span(rid(i)) is not None for i in (1, 2, 3, 4)] == [False, False, True, True]
    assert store.lookup(rid(1)).state == "unknown" and store.evidence(rid(1)) == []
    assert store.lookup(rid(3)).state == "final" and len(store.evidence(rid(3))) == 1
    assert store.counts() == {"spans": 2, "pending": 1, "final": 1, "evidence": 1}
    assert store.prune(0) == 0


def test_prune_with_a_limit_takes_the_oldest(store: AnyStore, signer: Signer) -> None:
    store.record_spans([span(i, end_ns=1000 - i) for i in range(1, 6)])  # span 5 ended first
    store.put_verdict(final(signer, rid(5)), [EvidenceRef("quote", "aa")])
    assert store.prune(10_000, limit=2) == 2
    assert [store.get_span(rid(i)) is not None for i in range(1, 6)] == [True, True, True, False, False]
    assert store.counts() == {"spans": 3, "pending": 3, "final": 0, "evidence": 0}
    assert store.prune(10_000, limit=0) == 0
    assert store.prune(10_000) == 3


# -- PostgreSQL: daemons sharing one database ---------------------------------------------------------------


def test_two_pg_stores_see_each_others_writes(pg_url: str, signer: Signer) -> None:
    a, b = PgStore(pg_url), PgStore(pg_url)
    try:
        a.record_spans([span(1)])
        assert b.lookup(rid(1)).state == "pending" and b.pending() == [rid(1)]
        b.put_verdict(final(signer, rid(1)), [EvidenceRef("quote", "aa")])
        assert a.lookup(rid(1)).doc == final(signer, rid(1)).encode()
        assert a.evidence(rid(1)) == [EvidenceRef("quote", "aa")]
        b.record_spans([span(2, end_ns=10)])
        assert a.prune(100) == 1 and b.get_span(rid(2)) is None
        assert a.counts() == b.counts() == {"spans": 1, "pending": 0, "final": 1, "evidence": 1}
    finally:
        a.close()
        b.close()


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("other_commits", [True, False])
def test_same_span_from_another_daemon_mid_transaction(pg_url: str, other_commits: bool) -> None:
    """The other daemon's uncommitted insert of the same id: ours waits for it, then does not fail."""
    store = PgStore(pg_url)
    other = psycopg.connect(pg_url, application_name="other-daemon")
    monitor = psycopg.connect(pg_url, autocommit=True)
    try:
        s = span(1)
        other.execute(
            "INSERT INTO spans(id, end_ns, worker, node, outcome, pending, doc) "
            "VALUES (%s, %s, 'w', 'n', 'ok', 1, %s)",  # as a daemon records a served span
            (s.id, s.end_ns, store_pg_module._dumps(s.to_dict())),
        )
        thread, errors = _in_thread(lambda: store.record_spans([s]))

        def blocked() -> bool:
            row = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'tmb' AND wait_event_type = 'Lock'"
            ).fetchone()
            return row is not None and row[0] == 1

        _wait_until(blocked, "the store to wait on the other daemon's row lock")
        assert thread.is_alive()
        other.commit() if other_commits else other.rollback()
        thread.join(WAIT_S)
        assert not thread.is_alive() and errors == []
        assert store.get_span(s.id) == s
        assert store.counts() == {"spans": 1, "pending": 1, "final": 0, "evidence": 0}
    finally:
        other.close()
        monitor.close()
        store.close()


def test_daemons_writing_overlapping_spans_concurrently(pg_url: str) -> None:
    a, b = PgStore(pg_url), PgStore(pg_url)
    spans = [span(i) for i in range(200)]
    chunks = [spans[i : i + 20] for i in range(0, len(spans), 20)]
    start = threading.Barrier(2, timeout=WAIT_S)

    def forward() -> None:
        start.wait()
        for chunk in chunks:
            a.write_batch([(chunk, None)])

    def backward() -> None:
        start.wait()
        for chunk in reversed(chunks):
            b.write_batch([(list(reversed(chunk)), None), (chunk[:3], None)])

    try:
        (t1, e1), (t2, e2) = _in_thread(forward), _in_thread(backward)
        t1.join(WAIT_S * 3)
        t2.join(WAIT_S * 3)
        assert not t1.is_alive() and not t2.is_alive() and e1 == [] and e2 == []
        assert a.counts() == {"spans": 200, "pending": 200, "final": 0, "evidence": 0}
    finally:
        a.close()
        b.close()


def _open_together(pg_url: str, n: int) -> list[PgStore]:
    """``n`` daemons opening the store at the same moment; every one must succeed."""
    start = threading.Barrier(n, timeout=WAIT_S)
    stores: list[PgStore] = []

    def open_one() -> None:
        start.wait()
        stores.append(PgStore(pg_url))

    threads = [_in_thread(open_one) for _ in range(n)]
    for t, _ in threads:
        t.join(WAIT_S * 3)
    errors = [e for _, errs in threads for e in errs]
    for s in stores if errors else ():
        s.close()
    assert errors == [] and len(stores) == n, errors
    return stores


def test_daemons_starting_together_on_an_empty_database(pg_url: str) -> None:
    stores = _open_together(pg_url, 4)
    try:
        stores[0].record_spans([span(1)])
        assert stores[3].lookup(rid(1)).state == "pending"
    finally:
        for s in stores:
            s.close()


async def test_async_store_over_pg(pg_url: str, signer: Signer) -> None:
    """AsyncStore over PgStore: group commit on its thread, long-poll wake-up, and a second daemon's poll
    seeing the verdict the first one published."""
    one, two = AsyncStore(PgStore(pg_url)), AsyncStore(PgStore(pg_url))
    try:
        assert not one.inline
        assert isinstance(one.store, PgStore) and isinstance(two.store, PgStore)
        await asyncio.gather(*(one.record_spans([span(i)]) for i in range(1, 21)))
        assert (await two.counts())["pending"] == 20
        assert (await one.wait(rid(1), 0.01)).state == "pending"
        here = asyncio.ensure_future(one.wait(rid(1), WAIT_S))
        there = asyncio.ensure_future(two.wait(rid(1), WAIT_S))  # the other daemon re-checks the database
        await asyncio.sleep(0.05)
        assert not here.done() and not there.done()
        v = final(signer, rid(1))
        await one.publish(v, [EvidenceRef("quote", "aa")])
        assert (await asyncio.wait_for(here, WAIT_S)).doc == v.encode()
        assert (await asyncio.wait_for(there, WAIT_S * 2)).doc == v.encode()
        assert await two.evidence(rid(1)) == [EvidenceRef("quote", "aa")]
        assert await two.prune(10**6) == 20
    finally:
        await one.close()
        await two.close()


# -- PostgreSQL: errors -------------------------------------------------------------------------------------


def _assert_clean(exc: StoreError, url: str) -> None:
    text = str(exc) + "\n" + exc.diagnostics()
    assert PASSWORD not in text and PASSWORD not in repr(exc.context)
    assert "Traceback" not in text
    assert exc.__cause__ is None  # the driver's exception (its text unscrubbed) is not chained
    assert exc.__context__ is None or exc.__suppress_context__
    assert exc.context["url"] == store_pg_module.redact(url) and "***" in exc.context["url"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_down_or_unreachable_is_a_store_error(postgres: PgServer) -> None:
    with tempfile.TemporaryDirectory() as empty:
        urls = [
            f"postgresql://postgres:{PASSWORD}@/tmb?host={empty}&port=5432",  # no server on that socket
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/tmb",  # nothing listening
            f"host={empty} port=5432 user=postgres password={PASSWORD} dbname=tmb",
        ]
        for url in urls:
            with pytest.raises(StoreError, match="cannot open store") as info:
                PgStore(url)
            _assert_clean(info.value, url)
            assert info.value.hint and "running" in info.value.hint


def test_bad_url_or_database_is_a_store_error(postgres: PgServer) -> None:
    urls = [
        f"postgresql://postgres:{PASSWORD}@localhost:notaport/tmb",
        f"host=/nowhere password={PASSWORD} no_such_option=1",
        f"postgresql://postgres:{PASSWORD}@/tmb?host=/nowhere&bogus=1",
        f"postgresql://postgres:{PASSWORD}@/tmb password={PASSWORD}",
        postgres.url("no_such_database", password=PASSWORD),
    ]
    for url in urls:
        with pytest.raises(StoreError, match="cannot open store") as info:
            PgStore(url)
        _assert_clean(info.value, url)
    assert "no_such_database" in str(info.value)


def test_lost_connection_is_a_store_error_then_reconnects(pg_url: str) -> None:
    store = PgStore(pg_url)
    try:
        store.record_spans([span(1)])
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'tmb'"
            )
        with pytest.raises(StoreError, match="cannot read store") as info:
            store.counts()
        assert info.value.hint and "running" in info.value.hint
        assert store.counts()["spans"] == 1  # the next call connects again
    finally:
        store.close()
    with pytest.raises(StoreError, match="closed"):
        store.lookup(rid(1))


def test_sql_errors_are_store_errors(pg_url: str) -> None:
    store = PgStore(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("DROP TABLE verdicts")
        with pytest.raises(
            StoreError, match=r'cannot read store: relation "verdicts" does not exist'
        ) as info:
            store.evidence(rid(1))
        assert info.value.context["sqlstate"] == "42P01"
        assert store.get_span(rid(1)) is None  # the failed transaction was rolled back: the store still works
    finally:
        store.close()


def test_unknown_schema_version_is_refused(pg_url: str) -> None:
    PgStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as admin:
        assert admin.execute("SELECT version FROM tmb_meta").fetchall() == [(store_module.SCHEMA_VERSION,)]
        admin.execute("UPDATE tmb_meta SET version = 99")
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    with pytest.raises(StoreError, match="unknown schema version") as info:
        PgStore(url)
    _assert_clean(info.value, url)
    assert "got: 99" in info.value.diagnostics()


# -- PostgreSQL: schema version 1 -> 2 ----------------------------------------------------------------------

_V1_SCHEMA = (  # what PgStore created before schema version 2
    "CREATE TABLE tmb_meta(one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), version INTEGER NOT NULL)",
    """CREATE TABLE spans(
    id TEXT PRIMARY KEY, end_ns BIGINT NOT NULL, worker TEXT, node TEXT, outcome TEXT NOT NULL,
    doc TEXT NOT NULL)""",
    "CREATE INDEX spans_end ON spans(end_ns)",
    """CREATE TABLE verdicts(
    request_id TEXT PRIMARY KEY, state TEXT NOT NULL CHECK (state IN ('pending', 'final')), decision TEXT,
    created_ns BIGINT NOT NULL, updated_ns BIGINT NOT NULL, doc BYTEA)""",
    "CREATE INDEX verdicts_pending ON verdicts(created_ns) WHERE state = 'pending'",
    """CREATE TABLE evidence(
    request_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, digest TEXT NOT NULL,
    doc TEXT NOT NULL, PRIMARY KEY (request_id, seq))""",
    "INSERT INTO tmb_meta(version) VALUES (1)",
)
_V1_REFS = [
    EvidenceRef("quote", "aa" * 32, "n", 7, "https://x/q/1", {"pcr": 10, "nested": {"a": [1, 2]}}),
    EvidenceRef("policy", "cc" * 32, detail={"name": "ü"}),
]


def _make_v1(url: str, signer: Signer) -> dict[str, Any]:
    """A version-1 database as PgStore wrote it: span 1 pending, span 2 final with two evidence refs, span 3
    unserved (no verdicts row), and a final verdict for id 7 with no span and no evidence."""
    spans = {i: span(i, end_ns=1000 + i) for i in (1, 2)} | {3: span(3, served=False)}
    verdicts = {2: final(signer, rid(2), Decision.VERIFIED), 7: final(signer, rid(7))}
    with psycopg.connect(url) as db:
        for statement in _V1_SCHEMA:
            db.execute(statement)
        for s in spans.values():
            db.execute(
                "INSERT INTO spans(id, end_ns, worker, node, outcome, doc) VALUES (%s, %s, %s, %s, %s, %s)",
                (s.id, s.end_ns, s.worker, s.node, s.outcome.value, store_pg_module._dumps(s.to_dict())),
            )
        db.execute("INSERT INTO verdicts VALUES (%s, 'pending', NULL, 10, 10, NULL)", (rid(1),))
        for v in verdicts.values():
            db.execute(
                "INSERT INTO verdicts VALUES (%s, 'final', %s, 20, 30, %s)",
                (v.request_id, v.decision.value, v.encode()),
            )
        for seq in (1, 0):  # written out of order: seq is the order
            ref = _V1_REFS[seq]
            db.execute(
                "INSERT INTO evidence VALUES (%s, %s, %s, %s, %s)",
                (rid(2), seq, ref.kind, ref.digest, json.dumps(ref.to_dict())),
            )
    return {"spans": spans, "verdicts": verdicts}


def _schema(url: str) -> dict[str, Any]:
    """The tables, columns (in any order), indexes and constraints of a database, to compare two."""
    with psycopg.connect(url, autocommit=True) as db:
        columns = db.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2"
        ).fetchall()
        indexes = db.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
        constraints = db.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
        ).fetchall()
        (version,) = db.execute("SELECT version FROM tmb_meta").fetchall()
    return {"columns": columns, "indexes": indexes, "constraints": constraints, "version": version[0]}


def test_version_1_database_is_migrated(pg_url: str, signer: Signer) -> None:
    old = _make_v1(pg_url, signer)
    store = PgStore(pg_url)
    try:
        spans, verdicts = old["spans"], old["verdicts"]
        assert store.lookup(rid(1)) == store_module.VerdictRecord(rid(1), "pending", None, spans[1])
        assert store.lookup(rid(2)) == store_module.VerdictRecord(
            rid(2), "final", verdicts[2].encode(), spans[2]
        )
        assert store.lookup(rid(3)) == store_module.VerdictRecord(rid(3), "unknown", None, spans[3])
        assert store.lookup(rid(7)) == store_module.VerdictRecord(rid(7), "final", verdicts[7].encode(), None)
        assert store.evidence(rid(2)) == _V1_REFS
        assert store.evidence(rid(7)) == [] and store.evidence(rid(1)) == []
        assert store.pending() == [rid(1)]
        assert store.counts() == {"spans": 3, "pending": 1, "final": 2, "evidence": 2}
        migrated = _schema(pg_url)
        assert migrated["version"] == store_module.SCHEMA_VERSION == 2
        # The migrated store works as a new one does: the pending span gets its verdict.
        store.put_verdict(final(signer, rid(1)), _V1_REFS[1:])
        assert store.pending() == [] and store.evidence(rid(1)) == _V1_REFS[1:]
        assert store.counts() == {"spans": 3, "pending": 0, "final": 3, "evidence": 3}
    finally:
        store.close()
    PgStore(pg_url).close()  # opening it again: version 2, nothing more to do
    assert _schema(pg_url) == migrated
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("DROP TABLE spans, verdicts, tmb_meta")
    PgStore(pg_url).close()
    assert _schema(pg_url) == migrated  # the same tables, columns, indexes and names as a new database


def test_daemons_starting_together_on_a_version_1_database(pg_url: str, signer: Signer) -> None:
    _make_v1(pg_url, signer)
    stores = _open_together(pg_url, 4)
    try:
        for s in stores:  # migrated once, under the schema lock; every daemon sees version 2
            assert s.counts() == {"spans": 3, "pending": 1, "final": 2, "evidence": 2}
            assert s.evidence(rid(2)) == _V1_REFS
    finally:
        for s in stores:
            s.close()


def test_failed_migration_leaves_version_1_untouched(pg_url: str, signer: Signer) -> None:
    _make_v1(pg_url, signer)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("UPDATE verdicts SET doc = NULL WHERE request_id = %s", (rid(7),))  # v2 refuses this
    before = _schema(pg_url)
    with pytest.raises(StoreError, match="cannot open store") as info:
        PgStore(pg_url)
    assert info.value.context["sqlstate"] == "23502"  # not_null_violation
    assert _schema(pg_url) == before  # one transaction: the pending column, the new table, all rolled back
    with psycopg.connect(pg_url, autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM evidence").fetchone() == (2,)
