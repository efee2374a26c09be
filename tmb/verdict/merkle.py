"""RFC 9162 Merkle trees: hashes, whole-batch trees, inclusion and consistency proofs and their checks.

Hashing (RFC 9162 section 2.1.1): a leaf is ``SHA-256(0x00 || data)``, an interior node
``SHA-256(0x01 || left || right)``, and the tree of ``n`` leaves splits at the largest power of two below
``n``. Two users:

* a verdict batch (:func:`merkle_tree`: one Ed25519 signature over the root of the verdicts decided
  together, each verdict carrying its path);
* the verdict transparency log (:class:`NodeSource` over the log's stored *perfect* subtrees:
  :func:`tree_hash`, :func:`inclusion_proof`, :func:`consistency_proof`), checked by clients and auditors
  with :func:`root_from_path` / :func:`verify_inclusion` and :func:`verify_consistency`.

A perfect subtree is named ``(level, index)``: the ``2**level`` leaves from ``index * 2**level``. Every
hash a proof needs is a tree hash over a range that splits into ``O(log n)`` perfect subtrees, so a log
only has to keep those (:class:`MemoryTree` keeps them in lists; the stores keep them in a table).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "MemoryTree",
    "NodeSource",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "merkle_tree",
    "node_hash",
    "root_from_path",
    "tree_hash",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 9162: the hash of an empty tree


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


# --- whole trees (a verdict batch) -------------------------------------------------------------------


def merkle_tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The tree hash of ``leaves`` (leaf hashes) and every leaf's inclusion path (leaf level first)."""
    if not leaves:
        raise ValueError("a tree needs at least one leaf")
    paths: list[list[bytes]] = [[] for _ in leaves]
    return _subtree(leaves, paths, 0, len(leaves)), paths


def _subtree(leaves: Sequence[bytes], paths: list[list[bytes]], lo: int, hi: int) -> bytes:
    """MTH of ``leaves[lo:hi]``; appends each leaf's sibling at this level to its path. (A module
    function, not a closure: a recursive closure is a reference cycle left to the cyclic GC.)"""
    n = hi - lo
    if n == 1:
        return leaves[lo]
    k = _split(n)
    left, right = _subtree(leaves, paths, lo, lo + k), _subtree(leaves, paths, lo + k, hi)
    for i in range(lo, lo + k):
        paths[i].append(right)
    for i in range(lo + k, hi):
        paths[i].append(left)
    return node_hash(left, right)


# --- a log's tree, from its perfect subtrees --------------------------------------------------------


class NodeSource(Protocol):
    """Where a log keeps the hashes of its perfect subtrees."""

    def node(self, level: int, index: int) -> bytes:
        """The hash of perfect subtree ``(level, index)``; it must exist (the log holds its leaves)."""
        ...


def tree_hash(nodes: NodeSource, lo: int, hi: int) -> bytes:
    """MTH of leaves ``[lo, hi)`` where ``lo`` is a multiple of the largest power of two <= ``hi - lo``
    (true of every range RFC 9162's proofs and roots need)."""
    n = hi - lo
    if n <= 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0:
        level = n.bit_length() - 1
        return nodes.node(level, lo >> level)
    k = _split(n)
    return node_hash(tree_hash(nodes, lo, lo + k), tree_hash(nodes, lo + k, hi))


def inclusion_proof(nodes: NodeSource, index: int, size: int) -> list[bytes]:
    """RFC 9162 PATH(index, D[0:size]), leaf level first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:  # walk down from the root, collecting siblings, then reverse
        k = _split(hi - lo)
        if index < lo + k:
            path.append(tree_hash(nodes, lo + k, hi))
            hi = lo + k
        else:
            path.append(tree_hash(nodes, lo, lo + k))
            lo = lo + k
    path.reverse()
    return path


def consistency_proof(nodes: NodeSource, old: int, new: int) -> list[bytes]:
    """RFC 9162 PROOF(old, D[0:new]) (empty when ``old`` is 0 or equals ``new``)."""
    if not 0 <= old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    if old in (0, new):
        return []
    proof: list[bytes] = []
    _subproof(nodes, old, 0, new, True, proof)
    return proof


def _subproof(nodes: NodeSource, m: int, lo: int, hi: int, whole: bool, out: list[bytes]) -> None:
    """SUBPROOF(m, D[lo:hi], whole) of RFC 9162 section 2.1.4.1, appended to ``out`` (leaf level first)."""
    n = hi - lo
    if m == n:
        if not whole:
            out.append(tree_hash(nodes, lo, hi))
        return
    k = _split(n)
    if m <= k:
        _subproof(nodes, m, lo, lo + k, whole, out)
        out.append(tree_hash(nodes, lo + k, hi))
    else:
        _subproof(nodes, m - k, lo + k, hi, False, out)
        out.append(tree_hash(nodes, lo, lo + k))


class MemoryTree:
    """A log's perfect subtrees in memory (tests, offline tools): append leaf hashes, ask for roots and
    proofs."""

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash; completes every perfect subtree it closes."""
        level, h = 0, leaf
        while True:
            if level == len(self._levels):
                self._levels.append([])
            row = self._levels[level]
            row.append(h)
            if len(row) % 2:
                return
            h = node_hash(row[-2], row[-1])
            level += 1

    def node(self, level: int, index: int) -> bytes:
        return self._levels[level][index]

    def root(self, size: int | None = None) -> bytes:
        return tree_hash(self, 0, self.size if size is None else size)


# --- checks (clients and auditors) ------------------------------------------------------------------


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """RFC 9162 section 2.1.3.2: the root an inclusion path leads to, or None when the path cannot fit."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """Whether ``path`` proves leaf hash ``leaf`` is entry ``index`` of the tree of ``size`` with ``root``."""
    return root_from_path(leaf, index, size, path) == root


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2: whether ``proof`` shows the tree of size ``old`` with ``old_root`` is a
    prefix of the tree of size ``new`` with ``new_root``."""
    if not 0 <= old <= new:
        return False
    if old == new:
        return not proof and old_root == new_root
    if old == 0:
        return not proof  # the empty tree is a prefix of every tree
    path = list(proof)
    if old & (old - 1) == 0:  # old is a power of two: its root is the first node of the path
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
