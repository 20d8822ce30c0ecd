"""RFC 6962 (RFC 9162 section 2.1) Merkle tree hashing, a compact frontier, and log proofs.

The audit trail is a Certificate-Transparency-style log: leaf `i` is the `i`-th record's line,
hashed `SHA-256(0x00 || line)`, interior nodes `SHA-256(0x01 || left || right)`, and the root
of `n` leaves splits at the largest power of two below `n`. A signed checkpoint names
`(size, root)`; an inclusion proof shows one record is in it, a consistency proof shows a
later checkpoint extends an earlier one (so the log only grew).

`Frontier` holds the roots of the perfect subtrees a tree of `n` leaves splits into (one per
set bit of `n`, at most 64): appending is O(log n) amortised O(1), the root O(log n), and the
frontier is small enough to persist, so a restart does not rehash the history.

Proof generation works over a list of leaf hashes (the verifier needs none: only the proof).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from federation.errors import InvalidInput

__all__ = [
    "EMPTY_ROOT",
    "Frontier",
    "ProofError",
    "consistency_proof",
    "inclusion_path",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree (RFC 6962: the hash of the empty string)."""


class ProofError(InvalidInput, ValueError):
    """A proof does not verify, or was asked for with indices outside the tree (one line for the CLI)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below `n` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes, without recursion (a Frontier fold)."""
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


class Frontier:
    """The right edge of an append-only tree: perfect-subtree roots, largest first."""

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(hashes) != bin(size).count("1") or any(len(h) != 32 for h in hashes):
            raise ValueError(f"not a frontier of a tree of {size} leaves")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes) -> list[bytes]:
        """Add one leaf hash: merge equal-sized subtrees as a binary counter carries.

        Returns the nodes this leaf completes, the leaf first and then each merged parent: in
        that order they are the tree's nodes in post-order (a Merkle mountain range), which
        `privacy.treestore` appends to its file."""
        node, size = leaf, self.size
        made = [leaf]
        while size & 1:
            node = node_hash(self.hashes.pop(), node)
            made.append(node)
            size >>= 1
        self.hashes.append(node)
        self.size += 1
        return made

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        root = self.hashes[-1]
        for node in reversed(self.hashes[:-1]):
            root = node_hash(node, root)
        return root

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "hashes": [h.hex() for h in self.hashes]}

    @classmethod
    def from_json(cls, raw: object) -> Frontier:
        """Raises ValueError for anything but a well-formed frontier."""
        if not isinstance(raw, dict) or not isinstance(raw.get("size"), int) or not isinstance(raw.get("hashes"), list):
            raise ValueError("not a frontier")
        return cls(raw["size"], [bytes.fromhex(str(h)) for h in raw["hashes"]])


# ---- proofs (RFC 6962 section 2.1.1 and 2.1.2) ---------------------------------------------------
def _mth(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    return tree_root(leaves[lo:hi])


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int | None = None) -> list[bytes]:
    """PATH(index, D[size]): the sibling hashes from leaf `index` up to the root of the first `size` leaves."""
    size = len(leaves) if size is None else size
    if not 0 <= index < size <= len(leaves):
        raise ProofError(f"no leaf {index} in a tree of {size}")
    return inclusion_path(lambda lo, hi: _mth(leaves, lo, hi), index, size)


def inclusion_path(mth: Callable[[int, int], bytes], index: int, size: int) -> list[bytes]:
    """PATH(index, D[size]) with `mth(lo, hi)` giving the hash of leaves [lo, hi): over leaf hashes in
    memory, or over stored nodes (`privacy.treestore`), where each such range is O(log n) reads."""
    if not 0 <= index < size:
        raise ProofError(f"no leaf {index} in a tree of {size}")
    proof: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:  # walk down, collecting the other half at each split (root-side first)
        k = _split(hi - lo)
        if index < lo + k:
            proof.append(mth(lo + k, hi))
            hi = lo + k
        else:
            proof.append(mth(lo, lo + k))
            lo += k
    proof.reverse()  # the proof lists siblings leaf-side first
    return proof


def consistency_proof(leaves: Sequence[bytes], old_size: int, new_size: int | None = None) -> list[bytes]:
    """PROOF(old_size, D[new_size]): shows the tree of `new_size` leaves extends the one of `old_size`."""
    new_size = len(leaves) if new_size is None else new_size
    if not 0 <= old_size <= new_size <= len(leaves):
        raise ProofError(f"no consistency proof from {old_size} to {new_size} leaves")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    lo, hi, m, complete = 0, new_size, old_size, True
    while m != hi:  # SUBPROOF(m - lo, D[lo:hi], complete), unrolled
        k = _split(hi - lo)
        if m - lo <= k:
            proof.append(_mth(leaves, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_mth(leaves, lo, lo + k))
            lo, complete = lo + k, False
    if not complete:
        proof.append(_mth(leaves, lo, hi))
    proof.reverse()
    return proof


# ---- verification (RFC 9162 section 2.1.3.2 and 2.1.4.2) --------------------------------------
def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` makes of `leaf` at `index` in a tree of `size`; ProofError if malformed."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is outside a tree of {size}")
    if len(leaf) != 32 or any(len(p) != 32 for p in proof):
        raise ProofError("proof hashes must be 32 bytes")
    fn, sn, node = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            raise ProofError("proof is longer than the tree is high")
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = node_hash(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("proof is shorter than the tree is high")
    return node


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raise ProofError unless `leaf` is leaf `index` of the tree of `size` with `root`."""
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise ProofError(f"inclusion proof of leaf {index} does not lead to the root of {size} leaves")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """Raise ProofError unless the tree (`new_size`, `new_root`) extends (`old_size`, `old_root`)."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"a tree of {new_size} cannot extend one of {old_size}")
    if old_size == new_size:
        if proof or old_root != new_root:
            raise ProofError(f"two different roots for {old_size} leaves")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    if not proof or any(len(p) != 32 for p in proof):
        raise ProofError("malformed consistency proof")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a perfect old tree is its own first node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for node in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(node, fr), node_hash(node, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, node)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise ProofError(f"the tree of {new_size} leaves does not extend the one of {old_size}")
