"""The node store: proofs in O(log² n) reads, identical to the rehashing ones, never trusted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import privacy.transparency as transparency
from privacy.audit import AuditTrail, SegmentPolicy, read_line, scan
from privacy.checkpoints import CheckpointSigner
from privacy.inspector import verify_proof
from privacy.merkle import Frontier, inclusion_proof, leaf_hash, tree_root
from privacy.transparency import prove
from privacy.treestore import NodeStore, node_count, nodes_path


def test_stored_paths_equal_the_rfc6962_paths_for_every_leaf_and_size(tmp_path: Path) -> None:
    leaves = [leaf_hash(str(i).encode()) for i in range(70)]
    frontier, nodes = Frontier(), bytearray()
    for leaf in leaves:
        for node in frontier.append(leaf):
            nodes += node
    assert len(nodes) == 32 * node_count(70)
    (tmp_path / "nodes").write_bytes(bytes(nodes))
    store = NodeStore(tmp_path / "nodes")
    assert store.leaves() == 70
    for size in range(1, 71):
        for index in range(size):
            leaf, path, root = store.proof(index, size)
            assert leaf == leaves[index]
            assert path == inclusion_proof(leaves, index, size)
            assert root == tree_root(leaves[:size])


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def test_prove_reads_the_store_and_falls_back_when_it_is_wrong(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, signer=CheckpointSigner(key, "site-a"), segments=SegmentPolicy(max_bytes=5000))
    for i in range(120):
        trail.append(actor="u", action="serve", details={"i": i})
    trail.checkpoint()
    size = trail.head()[0]
    lines = {r.seq: line for r, line in scan(path)}
    assert all(read_line(path, seq) == lines[seq] for seq in (1, 2, size // 2, size - 1, size))
    assert read_line(path, size + 1) is None
    real_read_leaves = transparency.read_leaves

    def no_rehash(*args: object, **kwargs: object) -> object:
        raise AssertionError("the proof rehashed the log although the node store holds it")

    monkeypatch.setattr(transparency, "read_leaves", no_rehash)
    for seq in random.Random(1).sample(range(1, size + 1), 10):
        assert verify_proof(prove(path, seq), key.public_key()).startswith(f"OK: record {seq} ")
    # A store with the proof's sibling changed gives another root: the proof is made the slow way, and is right.
    data = bytearray(nodes_path(path).read_bytes())
    data[32 * 4] ^= 1  # leaf 3 (record 4), post-order position 4: the first sibling on record 3's path
    nodes_path(path).write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="rehashed"):
        prove(path, 3)
    monkeypatch.setattr(transparency, "read_leaves", real_read_leaves)
    assert verify_proof(prove(path, 3), key.public_key()).startswith("OK: record 3 ")
    nodes_path(path).unlink()  # a missing store: the same
    assert verify_proof(prove(path, size), key.public_key()).startswith(f"OK: record {size} ")
