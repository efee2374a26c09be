"""What a client and an auditor check of the verdict log: a served verdict's inclusion proof, and that a
newer checkpoint extends a saved one (no verdict removed or changed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tmb.verdict.checkpoint import Checkpoint, NoteVerifier, parse_verifier_key, verifier_key
from tmb.verdict.logverify import check_consistency, check_inclusion, verdict_leaf_of
from tmb.verdict.merkle import MemoryTree, consistency_proof, inclusion_proof
from tmb.verdict.model import Decision, Verdict, Window
from tmb.verdict.signing import Signer, load_or_create_key, verify_verdict
from tmb.verdict.tlog import verdict_leaf

ORIGIN = "tmb.test/verdicts"
KEY = Ed25519PrivateKey.generate()
VERIFIERS: list[NoteVerifier] = [
    parse_verifier_key(verifier_key(ORIGIN, KEY.public_key().public_bytes_raw()))
]


def note(tree: MemoryTree, size: int, key: Ed25519PrivateKey = KEY) -> str:
    return Checkpoint(ORIGIN, size, tree.root(size)).sign(
        ORIGIN, key.public_key().public_bytes_raw(), key.sign
    )


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return load_or_create_key(tmp_path / "k.pem")


def served(signer: Signer, n: int = 9) -> tuple[list[dict[str, Any]], MemoryTree]:
    verdicts = signer.sign_batch(
        [
            Verdict(
                f"{i:032x}",
                None,
                "w",
                "n",
                (),
                "m",
                None,
                Window(1, 2),
                {},
                {},
                Decision.VERIFIED,
                (),
                "nvml",
                10 + i,
            )
            for i in range(n)
        ]
    )
    tree = MemoryTree([verdict_leaf(v) for v in verdicts])
    cp = note(tree, n)
    docs = []
    for i, v in enumerate(verdicts):
        doc = json.loads(v.encode())
        doc["log"] = {
            "index": i,
            "tree_size": n,
            "leaf": verdict_leaf(v).hex(),
            "proof": [h.hex() for h in inclusion_proof(tree, i, n)],
            "checkpoint": cp,
        }
        docs.append(doc)
    return docs, tree


def test_served_verdicts_verify_and_are_included(signer: Signer) -> None:
    docs, _ = served(signer)
    for doc in docs:
        assert verify_verdict(doc, [signer.public]).ok  # the log member is not part of what is signed
        assert verdict_leaf_of(doc).hex() == doc["log"]["leaf"]
        report, cp = check_inclusion(doc, VERIFIERS, ORIGIN)
        assert report.ok and cp is not None and cp.size == 9


def test_a_changed_verdict_or_proof_is_not_included(signer: Signer) -> None:
    docs, _ = served(signer)
    changed = dict(docs[4], decision="model_mismatch")
    assert check_inclusion(changed, VERIFIERS)[0].ids() == ["log.not_included"]
    moved = dict(docs[4], log=dict(docs[4]["log"], index=5))
    assert check_inclusion(moved, VERIFIERS)[0].ids() == ["log.not_included"]
    other = Ed25519PrivateKey.generate()
    _, tree = served(signer)
    forged = dict(docs[4], log=dict(docs[4]["log"], checkpoint=note(tree, 9, other)))
    assert check_inclusion(forged, VERIFIERS)[0].ids() == ["log.checkpoint_invalid"]
    assert check_inclusion(dict(docs[4], log=None), VERIFIERS)[0].ids() == ["log.malformed"]
    bad = dict(docs[4], log=dict(docs[4]["log"], proof=["zz"]))
    assert check_inclusion(bad, VERIFIERS)[0].ids() == ["log.malformed"]


def test_consistency_between_saved_checkpoints() -> None:
    leaves = [bytes([i]) * 32 for i in range(30)]
    tree = MemoryTree(leaves)
    old, new = note(tree, 13), note(tree, 30)
    proof = [h.hex() for h in consistency_proof(tree, 13, 30)]
    report, a, b = check_consistency(old, new, proof, VERIFIERS, ORIGIN)
    assert report.ok and a is not None and b is not None and (a.size, b.size) == (13, 30)
    # a verdict removed from the middle: the daemon's new tree no longer extends the saved one
    rewritten = MemoryTree([*leaves[:5], *leaves[6:]])
    new2 = note(rewritten, 29)
    proof2 = [h.hex() for h in consistency_proof(rewritten, 13, 29)]
    assert check_consistency(old, new2, proof2, VERIFIERS)[0].ids() == ["log.inconsistent"]
    assert check_consistency(new, old, proof, VERIFIERS)[0].ids() == ["log.rollback"]
    assert check_consistency(old, new, ["00" * 32], VERIFIERS)[0].ids() == ["log.inconsistent"]
