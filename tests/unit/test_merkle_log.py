"""RFC 9162 Merkle math of the verdict log, and C2SP signed notes / checkpoints.

Proofs are checked against an independent naive tree hash over every (index, size) and (old, new) pair
up to 40 leaves; the signed-note reader is checked against the known-answer vector of Go's
golang.org/x/mod/sumdb/note (note_test.go, BSD-3-Clause), so tmb's checkpoints read in Go's tools.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tmb.verdict.checkpoint import (
    Checkpoint,
    NoteError,
    key_id,
    open_note,
    parse_verifier_key,
    sign_note,
    verifier_key,
)
from tmb.verdict.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    merkle_tree,
    verify_consistency,
    verify_inclusion,
)

N = 40


def naive_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1 written as the recursion, on raw hashes (no shortcuts)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + naive_mth(leaves[:k]) + naive_mth(leaves[k:])).digest()


LEAVES = [leaf_hash(f"verdict {i}".encode()) for i in range(N)]
TREE = MemoryTree(LEAVES)


def test_roots_match_the_naive_recursion_and_the_batch_tree() -> None:
    assert TREE.root(0) == EMPTY_ROOT
    for n in range(1, N + 1):
        want = naive_mth(LEAVES[:n])
        assert TREE.root(n) == want
        assert merkle_tree(LEAVES[:n])[0] == want


def test_every_inclusion_proof_verifies_and_no_other_leaf_or_index_does() -> None:
    for n in range(1, N + 1):
        root = TREE.root(n)
        _, batch_paths = merkle_tree(LEAVES[:n])
        for i in range(n):
            proof = inclusion_proof(TREE, i, n)
            assert proof == batch_paths[i]
            assert verify_inclusion(LEAVES[i], i, n, proof, root)
            assert not verify_inclusion(LEAVES[(i + 1) % N], i, n, proof, root)
            if n > 1:
                assert not verify_inclusion(LEAVES[i], (i + 1) % n, n, proof, root)
            if n < N:
                assert not verify_inclusion(LEAVES[i], i, n + 1, proof, TREE.root(n + 1))


def test_every_consistency_proof_verifies_and_altered_ones_do_not() -> None:
    for new in range(1, N + 1):
        new_root = TREE.root(new)
        for old in range(1, new + 1):
            old_root = TREE.root(old)
            proof = consistency_proof(TREE, old, new)
            assert verify_consistency(old, new, old_root, new_root, proof), (old, new)
            if old < new:
                assert not verify_consistency(
                    old, new, TREE.root(old - 1) if old > 1 else b"x" * 32, new_root, proof
                )
                assert not verify_consistency(old, new, old_root, TREE.root(new - 1), proof)
                if proof:
                    bent = [bytes(32), *proof[1:]]
                    assert not verify_consistency(old, new, old_root, new_root, bent)


def test_a_rewritten_history_is_not_consistent() -> None:
    forged = MemoryTree([*LEAVES[:10], leaf_hash(b"a verdict changed after the fact"), *LEAVES[11:20]])
    old_root = TREE.root(16)
    proof = consistency_proof(forged, 16, 20)
    assert not verify_consistency(16, 20, old_root, forged.root(20), proof)


def test_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        inclusion_proof(TREE, 5, 5)
    with pytest.raises(ValueError):
        consistency_proof(TREE, 6, 5)
    assert consistency_proof(TREE, 0, 7) == [] and verify_consistency(0, 7, EMPTY_ROOT, TREE.root(7), [])
    assert not verify_consistency(5, 4, TREE.root(5), TREE.root(4), [])


# Go's sumdb/note known-answer vector (golang.org/x/mod/sumdb/note/note_test.go).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY_SEED = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
GO_SIG = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
GO_NOTE = GO_TEXT + f"\n\u2014 PeterNeumann {GO_SIG}\n"


def test_signed_note_matches_go_sumdb_note_byte_for_byte() -> None:
    private = Ed25519PrivateKey.from_private_bytes(GO_SKEY_SEED)
    public = private.public_key().public_bytes_raw()
    assert verifier_key("PeterNeumann", public) == GO_VKEY
    assert sign_note(GO_TEXT, "PeterNeumann", public, private.sign) == GO_NOTE
    text, names = open_note(GO_NOTE, [parse_verifier_key(GO_VKEY)])
    assert text == GO_TEXT and names == ["PeterNeumann"]


def test_note_refusals_name_the_problem() -> None:
    verifier = parse_verifier_key(GO_VKEY)
    with pytest.raises(NoteError, match="does not verify"):
        open_note(GO_NOTE.replace("answer", "Answer"), [verifier])
    other = Ed25519PrivateKey.generate()
    stranger = parse_verifier_key(verifier_key("Other", other.public_key().public_bytes_raw()))
    with pytest.raises(NoteError, match="no trusted key"):
        open_note(GO_NOTE, [stranger])
    with pytest.raises(NoteError, match="blank line"):
        open_note(GO_TEXT, [verifier])
    with pytest.raises(NoteError, match="em dash"):
        open_note(GO_NOTE.replace("\u2014", "--"), [verifier])
    with pytest.raises(NoteError, match="id does not match"):
        parse_verifier_key(GO_VKEY.replace("c74f20a3", "c74f20a4"))
    with pytest.raises(NoteError, match="larger than 1 MiB"):
        open_note("x" * (1 << 20) + GO_NOTE, [verifier])
    many = GO_TEXT + "\n" + "".join(f"\u2014 k{i} AAAAAAAA\n" for i in range(101))
    with pytest.raises(NoteError, match="more than 100"):
        open_note(many, [verifier])


def test_an_unknown_cosigner_is_ignored() -> None:
    extra = (
        GO_NOTE + "\u2014 SomeWitness " + base64.b64encode(b"\x01\x02\x03\x04" + bytes(64)).decode() + "\n"
    )
    assert open_note(extra, [parse_verifier_key(GO_VKEY)])[1] == ["PeterNeumann"]


def test_checkpoint_round_trip_and_refusals() -> None:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    cp = Checkpoint("tmb.example/verdicts", 40, TREE.root(), ("Timestamp: 1764806400",))
    assert cp.text().splitlines()[:2] == ["tmb.example/verdicts", "40"]
    note = cp.sign("tmb.example/verdicts", public, private.sign)
    verifier = parse_verifier_key(verifier_key("tmb.example/verdicts", public))
    assert Checkpoint.open(note, [verifier], origin="tmb.example/verdicts") == cp
    assert key_id("tmb.example/verdicts", public) == verifier.id
    with pytest.raises(NoteError, match="another log"):
        Checkpoint.open(note, [verifier], origin="other.example/log")
    with pytest.raises(NoteError, match="size"):
        Checkpoint.parse("origin\n040\n" + base64.b64encode(bytes(32)).decode() + "\n")
    with pytest.raises(NoteError, match="root"):
        Checkpoint.parse("origin\n4\nAAAA\n")
    with pytest.raises(NoteError, match="origin, a size"):
        Checkpoint.parse("origin\n4\n")
