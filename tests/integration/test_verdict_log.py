"""The verdict transparency log in the stores (SQLite and a real PostgreSQL): every final verdict is a leaf,
proofs verify against signed checkpoints, replacing or pruning a verdict never removes a leaf, and two
daemons on one PostgreSQL append to one log."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tmb.verdict.checkpoint import Checkpoint, parse_verifier_key, verifier_key
from tmb.verdict.merkle import MemoryTree, verify_consistency, verify_inclusion
from tmb.verdict.model import Decision, Verdict, Window
from tmb.verdict.signing import Signer, load_or_create_key
from tmb.verdict.store import Store
from tmb.verdict.store_pg import PgStore
from tmb.verdict.tlog import verdict_leaf

AnyStore = Store | PgStore
ORIGIN = "tmb.test/verdicts"


def verdict(signer: Signer, i: int, decision: Decision = Decision.VERIFIED) -> Verdict:
    v = Verdict(
        f"{i:032x}", None, "w", "n", (), "m", None, Window(1, 2), {}, {}, decision, (), "synthetic", 5 + i
    )
    return signer.sign(v)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return load_or_create_key(tmp_path / "k.pem")


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], AnyStore]]:
    opened: list[AnyStore] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None

    def make() -> AnyStore:
        opened.append(PgStore(url) if url else Store(tmp_path / "s.sqlite3"))
        return opened[-1]

    try:
        yield make
    finally:
        for s in opened:
            s.close()


def checkpoint(store: AnyStore, key: Ed25519PrivateKey) -> str:
    size = store.log_size()
    root = store.log_root(size)
    note = Checkpoint(ORIGIN, size, root).sign(ORIGIN, key.public_key().public_bytes_raw(), key.sign)
    store.add_checkpoint(size, root, note)
    return note


def test_every_final_verdict_is_a_leaf_with_a_proof(
    open_store: Callable[[], AnyStore], signer: Signer
) -> None:
    store = open_store()
    key = Ed25519PrivateKey.generate()
    verifier = parse_verifier_key(verifier_key(ORIGIN, key.public_key().public_bytes_raw()))
    batch = signer.sign_batch([verdict(signer, i) for i in range(5)])
    store.write_batch([(None, (v, ())) for v in batch])
    store.write_batch([(None, (verdict(signer, 5), ()))])
    assert store.log_size() == 6
    mirror = MemoryTree([verdict_leaf(v) for v in [*batch, verdict(signer, 5)]])
    assert store.log_root(6) == mirror.root()
    entry, proof = store.log_proof(f"{3:032x}")
    assert entry is not None and entry.index == 3 and proof is None  # no checkpoint covers it yet
    note = checkpoint(store, key)
    cp = Checkpoint.open(note, [verifier], origin=ORIGIN)
    for i, v in enumerate([*batch, verdict(signer, 5)]):
        entry, proof = store.log_proof(v.request_id)
        assert proof is not None and proof.index == i and proof.tree_size == 6 and proof.checkpoint == note
        assert verify_inclusion(verdict_leaf(v), i, cp.size, proof.proof, cp.root)
    assert store.log_proof("f" * 32) == (None, None)


def test_the_same_verdict_twice_is_one_leaf_and_a_replaced_one_is_two(
    open_store: Callable[[], AnyStore], signer: Signer
) -> None:
    store = open_store()
    v = verdict(signer, 1)
    store.write_batch([(None, (v, ())), (None, (v, ()))])
    store.put_verdict(v)
    assert store.log_size() == 1
    changed = signer.sign(dataclasses.replace(v, decision=Decision.MODEL_MISMATCH, signature=""))
    store.put_verdict(changed)
    assert store.log_size() == 2
    entry, _ = store.log_proof(v.request_id)
    assert entry is not None and entry.index == 1 and entry.leaf == verdict_leaf(changed)


def test_pruning_keeps_leaves_and_old_checkpoints_stay_consistent(
    open_store: Callable[[], AnyStore], signer: Signer
) -> None:
    store = open_store()
    key = Ed25519PrivateKey.generate()
    store.write_batch([(None, (verdict(signer, i), ())) for i in range(7)])
    old_size, old_root = 7, store.log_root(7)
    checkpoint(store, key)
    assert store.prune(1 << 62) >= 0
    store.write_batch([(None, (verdict(signer, i), ())) for i in range(7, 20)])
    assert store.log_size() == 20 and store.log_root(7) == old_root
    new_root = store.log_root(20)
    proof = store.log_consistency(old_size, 20)
    assert verify_consistency(old_size, 20, old_root, new_root, proof)
    latest = store.latest_checkpoint()
    assert latest is not None and latest.size == 7
    reopened = open_store()
    assert reopened.log_size() == 20 and reopened.log_root(20) == new_root


def test_two_writers_on_one_database_append_to_one_log(
    open_store: Callable[[], AnyStore], signer: Signer
) -> None:
    a, b = open_store(), open_store()
    errors: list[BaseException] = []

    def write(store: AnyStore, start: int) -> None:
        try:
            for i in range(start, start + 15):
                store.write_batch([(None, (verdict(signer, i), ()))])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, n)) for s, n in ((a, 0), (b, 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert a.log_size() == b.log_size() == 30
    root = a.log_root(30)
    assert b.log_root(30) == root
    for i in (*range(15), *range(100, 115)):
        entry, _ = a.log_proof(f"{i:032x}")
        assert entry is not None
        assert verify_inclusion(entry.leaf, entry.index, 30, a.log_inclusion(entry.index, 30), root)
