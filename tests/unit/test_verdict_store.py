"""The SQLite store: spans, pending and final verdicts, evidence, retention, reopen, long-poll."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tmb.spans import Outcome, Span
from tmb.verdict.async_store import AsyncStore
from tmb.verdict.model import Decision, Verdict, Window
from tmb.verdict.signing import load_or_create_key
from tmb.verdict.store import EvidenceRef, Store, StoreError


def span(i: int, end_ns: int = 1000, served: bool = True) -> Span:
    return Span(
        f"{i:032x}",
        None,
        "w" if served else None,
        "n" if served else None,
        (),
        None,
        None,
        "GET",
        "/",
        end_ns - 10,
        end_ns - 5 if served else None,
        end_ns,
        200 if served else 502,
        0,
        1,
        None,
        Outcome.OK if served else Outcome.UPSTREAM_ERROR,
    )


def final(tmp_path: Path, rid: str) -> Verdict:
    v = Verdict(
        rid, None, "w", "n", (), "m", None, Window(1, 2), {}, {}, Decision.UNATTESTED, (), "synthetic", 5
    )
    return load_or_create_key(tmp_path / "k.pem").sign(v)


def test_spans_pending_final_evidence_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    store = Store(db)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.record_spans([span(1), span(2, served=False)])
    store.record_spans([span(1)])  # idempotent
    assert store.lookup(f"{1:032x}").state == "pending"
    assert store.lookup(f"{2:032x}").state == "unknown" and store.lookup(f"{2:032x}").span is not None
    v = final(tmp_path, f"{1:032x}")
    refs = [
        EvidenceRef("quote", "aa" * 32, "n", 7, None, {"pcr": 10}),
        EvidenceRef("telemetry_batch", "bb" * 32),
    ]
    store.put_verdict(v, refs)
    store.close()
    again = Store(db)
    rec = again.lookup(f"{1:032x}")
    assert rec.state == "final" and rec.doc == v.encode() and rec.span == span(1)
    assert again.evidence(f"{1:032x}") == refs
    assert again.counts() == {"spans": 2, "pending": 0, "final": 1, "evidence": 2}
    with pytest.raises(ValueError, match="unsigned"):
        again.put_verdict(dataclasses.replace(v, signature=""))


def test_retention_prunes_old_spans_with_their_verdicts(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.record_spans([span(1, end_ns=100), span(2, end_ns=5000)])
    store.put_verdict(final(tmp_path, f"{1:032x}"), [EvidenceRef("quote", "cc")])
    assert store.prune(1000) == 1
    assert store.counts() == {"spans": 1, "pending": 1, "final": 0, "evidence": 0}


def test_unusable_store_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot open store"):
        Store(tmp_path / "bad.sqlite3")
    db = sqlite3.connect(tmp_path / "future.sqlite3")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="schema version"):
        Store(tmp_path / "future.sqlite3")


async def test_long_poll_wakes_on_publish(tmp_path: Path) -> None:
    store = AsyncStore(tmp_path / "s.sqlite3")
    rid = f"{1:032x}"
    await store.record_spans([span(1)])
    assert (await store.wait(rid, 0.05)).state == "pending"
    waiter = asyncio.ensure_future(store.wait(rid, 30))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await store.publish(final(tmp_path, rid))
    assert (await asyncio.wait_for(waiter, 10)).state == "final"
    assert (await store.wait("f" * 32, 0.01)).state == "unknown"
    await store.close()


@pytest.mark.parametrize("sync", ["normal", "full"])
async def test_async_store_group_commits_and_survives_reopen(tmp_path: Path, sync: str) -> None:
    store = AsyncStore(tmp_path / "s.sqlite3", sync=sync)
    assert store.inline is (sync == "normal")
    db = store.store.db  # type: ignore[attr-defined]
    assert db.execute("PRAGMA synchronous").fetchone()[0] == {"normal": 1, "full": 2}[sync]
    commits: list[str] = []
    db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    # Writes queued in the same loop iteration land in one transaction (inline: the spans at once, the
    # verdicts, which no response waits for, together once they gathered).
    await asyncio.gather(
        *(store.record_spans([span(i)]) for i in range(20)),
        *(store.publish(final(tmp_path, f"{i:032x}")) for i in range(10)),
    )
    if sync == "normal":
        assert len(commits) == 2
    else:
        assert 1 <= len(commits) <= 30
    counts = await store.counts()
    assert counts == {"spans": 20, "pending": 10, "final": 10, "evidence": 0}
    # A write that fails alone does not take the batch down with it.
    bad = dataclasses.replace(span(99), end_ns=2**70)  # no SQLite integer holds it
    results = await asyncio.gather(
        store.record_spans([span(30)]), store.record_spans([bad]), return_exceptions=True
    )
    assert results[0] is None and isinstance(results[1], OverflowError)
    await store.close()
    again = Store(tmp_path / "s.sqlite3")
    assert again.counts()["spans"] == 21 and again.lookup(f"{5:032x}").state == "final"
    again.close()


async def test_inline_store_checkpoints_in_the_background_and_prunes_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tmb.verdict.async_store as store_mod

    monkeypatch.setattr(store_mod, "CHECKPOINT_INTERVAL_S", 0.01)
    monkeypatch.setattr(store_mod, "PRUNE_SLICE", 7)
    path = tmp_path / "s.sqlite3"
    store = AsyncStore(path)
    db = store.store.db  # type: ignore[attr-defined]
    assert store.inline and db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    # the checkpointer (its own connection) copies the WAL into the database file, which grows
    before = path.stat().st_size
    await store.record_spans([span(i, end_ns=1000 + i) for i in range(50)])
    for _ in range(1000):
        if path.stat().st_size > before:
            break
        await asyncio.sleep(0.01)
    assert path.stat().st_size > before
    assert await store.prune(1000 + 30) == 30  # five slices of 7 and one of 2, all committed
    assert (await store.counts())["spans"] == 20
    await store.close()
    wal = path.with_name("s.sqlite3-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed and truncated (or removed) on close


async def test_inline_checkpointer_starts_the_wal_over_when_a_commit_lands_during_its_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady load a commit lands during every passive checkpoint, so the WAL was never copied whole
    and never started over (it grew by gigabytes in a benchmark). A round that leaves a long WAL behind
    holds the loop's commits for a second pass; the next commit then writes the WAL from its start."""
    import tmb.verdict.async_store as store_mod

    monkeypatch.setattr(store_mod, "CHECKPOINT_INTERVAL_S", 3600.0)  # the test runs the round itself
    monkeypatch.setattr(store_mod, "WAL_RESTART_FRAMES", 1)
    monkeypatch.setattr(store_mod, "CATCH_UP_PASSES", 1)
    path = tmp_path / "s.sqlite3"
    store = AsyncStore(path)
    for i in range(20):
        await store.record_spans([span(i, end_ns=1000 + i)])
    # A reader's snapshot stops the passes short of the WAL's end, as a commit landing during each pass
    # does under load (a pass copies what was committed when it began); it is gone after the unheld ones.
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM spans").fetchall()
    for i in range(20, 40):
        await store.record_spans([span(i, end_ns=1000 + i)])
    ck = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    real = store_mod._passive_checkpoint
    passes: list[tuple[int, int, bool]] = []

    def passive(db: sqlite3.Connection) -> tuple[int, int]:
        got = real(db)
        if db is not ck:  # another store's checkpointer thread (if one runs) calls this function too
            return got
        passes.append((*got, store._held))
        if len(passes) == 2:
            reader.execute("COMMIT")
        return got

    monkeypatch.setattr(store_mod, "_passive_checkpoint", passive)
    await asyncio.to_thread(store._checkpoint_round, ck)
    assert passes[0][1] < passes[0][0] and passes[1][1] < passes[1][0]  # these left frames behind
    held = [p[2] for p in passes]
    assert held == [False, False, True]  # the last pass ran with the loop's commits held
    assert not store._held
    wal = path.with_name("s.sqlite3-wal")
    size = wal.stat().st_size
    await store.record_spans([span(100, end_ns=2000)])
    assert wal.stat().st_size == size  # the commit wrote from the WAL's start (appended, it would grow)
    await store.close()
    ck.close()
    reader.close()


async def test_commits_held_for_the_checkpointer_wait_and_then_commit(tmp_path: Path) -> None:
    store = AsyncStore(tmp_path / "s.sqlite3")
    await store.record_spans([span(1)])
    commits: list[str] = []
    store.store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)  # type: ignore[attr-defined]
    held = threading.Event()
    store._hold(held)
    assert held.is_set()
    acked = store.add_span(span(2))
    published = asyncio.ensure_future(store.publish(final(tmp_path, f"{1:032x}")))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not acked.done() and not published.done() and commits == []  # held: not committed, not acked
    store._release()
    await acked
    await published
    assert commits  # committed once released
    assert (await store.lookup(f"{2:032x}")).state == "pending"
    assert (await store.lookup(f"{1:032x}")).state == "final"
    await store.close()


async def test_verdict_writes_gather_for_the_linger_and_commit_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tmb.verdict.async_store as store_mod

    monkeypatch.setattr(store_mod, "LINGER_S", 60.0)  # verdicts would gather for a minute
    store = AsyncStore(tmp_path / "s.sqlite3")
    commits: list[str] = []
    store.store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)  # type: ignore[attr-defined]
    await store.record_spans([span(1), span(2), span(3)])
    assert len(commits) == 1
    published = asyncio.ensure_future(store.publish(final(tmp_path, f"{1:032x}")))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not published.done() and len(commits) == 1  # gathering: no response waits for it
    await store.record_spans([span(4)])  # a response waits for this one: it does not wait for the verdict
    assert len(commits) == 2 and not published.done()
    assert (await store.lookup(f"{1:032x}")).state == "pending"
    second = asyncio.ensure_future(store.publish(final(tmp_path, f"{2:032x}")))
    await asyncio.sleep(0)
    assert store._later_handle is not None
    store._later_handle.cancel()
    store._flush_later()  # the linger is over: both verdicts in one transaction
    await asyncio.wait_for(asyncio.gather(published, second), 5)
    assert len(commits) == 3 and (await store.lookup(f"{2:032x}")).state == "final"
    late = asyncio.ensure_future(store.publish(final(tmp_path, f"{3:032x}")))
    await asyncio.sleep(0)
    await store.close()  # closing commits what gathers
    assert late.done() and late.exception() is None
    assert Store(tmp_path / "s.sqlite3").lookup(f"{3:032x}").state == "final"


async def test_a_burst_of_gathered_verdicts_commits_in_chunks_with_spans_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tmb.verdict.async_store as store_mod

    monkeypatch.setattr(store_mod, "LINGER_S", 60.0)  # the test says when the linger is over
    chunk = store_mod.VERDICT_CHUNK
    n = 2 * chunk + 10
    store = AsyncStore(tmp_path / "s.sqlite3")
    await store.record_spans([span(i) for i in range(n)])
    commits: list[tuple[int, list[str]]] = []  # per transaction: verdicts, ids of the spans
    real = store.store.write_batch

    def counting(writes: Any) -> None:
        real(writes)
        spans = [s.id for got, _ in writes if got is not None for s in got]
        commits.append((sum(1 for _, f in writes if f is not None), spans))

    monkeypatch.setattr(store.store, "write_batch", counting)
    signer = load_or_create_key(tmp_path / "k.pem")
    verdicts = [final(tmp_path, f"{i:032x}") for i in range(n)]
    assert all(v.key_id == signer.key_id for v in verdicts)
    published = [asyncio.ensure_future(store.publish(v)) for v in verdicts]
    await asyncio.sleep(0)
    assert commits == [] and store._later_handle is not None  # gathering
    store._later_handle.cancel()
    store._flush_later()  # the linger is over: the first chunk commits at once, the rest later
    assert commits == [(chunk, [])]
    late = span(n)  # a response that ends while the verdicts drain
    await store.add_span(late)
    # its span commits with the next chunk, not behind the whole burst
    assert commits[1] == (chunk, [late.id])
    await asyncio.wait_for(asyncio.gather(*published), 5)
    assert [c[0] for c in commits] == [chunk, chunk, 10]
    assert [(await store.lookup(v.request_id)).state for v in verdicts] == ["final"] * n

    # closing commits every gathered verdict, chunk by chunk, before the store closes
    more = [final(tmp_path, f"{i:032x}") for i in range(n, 2 * n)]
    await store.record_spans([span(i) for i in range(n + 1, 2 * n)])
    commits.clear()
    pending = [asyncio.ensure_future(store.publish(v)) for v in more]
    await asyncio.sleep(0)
    await store.close()
    assert all(p.done() and p.exception() is None for p in pending)
    assert [c[0] for c in commits] == [chunk, chunk, 10]
    reopened = Store(tmp_path / "s.sqlite3")
    assert all(reopened.lookup(v.request_id).state == "final" for v in more)
    reopened.close()


_V1 = """
CREATE TABLE spans(id TEXT PRIMARY KEY, end_ns INTEGER NOT NULL, worker TEXT, node TEXT,
    outcome TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX spans_end ON spans(end_ns);
CREATE TABLE verdicts(request_id TEXT PRIMARY KEY, state TEXT NOT NULL, decision TEXT,
    created_ns INTEGER NOT NULL, updated_ns INTEGER NOT NULL, doc BLOB);
CREATE TABLE evidence(request_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    digest TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (request_id, seq));
PRAGMA user_version=1;
"""


def test_a_version_1_store_is_migrated_on_open(tmp_path: Path) -> None:
    import json

    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_V1)
    v = final(tmp_path, f"{1:032x}")
    refs = [EvidenceRef("quote", "ab" * 32, "n", 5, None, {"pcr": 10}), EvidenceRef("profile", "cd" * 32)]
    for s in (span(1), span(2, end_ns=900), span(3, served=False)):
        db.execute(
            "INSERT INTO spans VALUES (?,?,?,?,?,?)",
            (s.id, s.end_ns, s.worker, s.node, s.outcome.value, json.dumps(s.to_dict())),
        )
    db.execute("INSERT INTO verdicts VALUES (?, 'final', 'unattested', 1, 1, ?)", (v.request_id, v.encode()))
    db.execute("INSERT INTO verdicts VALUES (?, 'pending', NULL, 2, 2, NULL)", (f"{2:032x}",))
    for seq, ref in reversed(list(enumerate(refs))):  # stored out of order: seq decides
        db.execute(
            "INSERT INTO evidence VALUES (?,?,?,?,?)",
            (v.request_id, seq, ref.kind, ref.digest, json.dumps(ref.to_dict())),
        )
    db.commit()
    db.close()
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == 2
    rec = store.lookup(f"{1:032x}")
    assert rec.state == "final" and rec.doc == v.encode() and rec.span == span(1)
    assert store.evidence(f"{1:032x}") == refs
    assert store.lookup(f"{2:032x}").state == "pending" and store.pending() == [f"{2:032x}"]
    assert store.lookup(f"{3:032x}").state == "unknown"
    assert store.counts() == {"spans": 3, "pending": 1, "final": 1, "evidence": 2}
    store.put_verdict(final(tmp_path, f"{2:032x}"))
    assert store.pending() == [] and store.lookup(f"{2:032x}").state == "final"
    store.close()


@pytest.mark.parametrize("sync", ["normal", "full"])
async def test_add_span_gathers_one_iterations_spans_into_one_write(tmp_path: Path, sync: str) -> None:
    store = AsyncStore(tmp_path / "s.sqlite3", sync=sync)
    commits: list[str] = []
    store.store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)  # type: ignore[attr-defined]
    futures = [store.add_span(span(i)) for i in range(25)]
    assert len({id(f) for f in futures}) == 1  # one write, one future for all of them
    await futures[0]
    assert len(commits) == 1 and (await store.counts())["spans"] == 25
    later = store.add_span(span(99))  # a new iteration's span: a new write
    assert later is not futures[0]
    await later
    bad = store.add_span(dataclasses.replace(span(100), end_ns=2**70))  # no SQLite integer holds it
    with pytest.raises(OverflowError):
        await bad
    pending = store.add_span(span(101))
    await store.close()  # commits what was gathered
    assert pending.done() and pending.exception() is None
    again = Store(tmp_path / "s.sqlite3")
    assert again.counts()["spans"] == 27 and again.lookup(f"{101:032x}").state == "pending"
    again.close()
