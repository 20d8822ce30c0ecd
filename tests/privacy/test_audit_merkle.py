"""RFC 6962 Merkle hashing and proofs against the transparency-dev/merkle test vectors.

The vectors (leaf inputs, roots of every prefix, inclusion and consistency proofs) are those of
github.com/transparency-dev/merkle (testonly/constants.go, proof/verify_test.go), which the CT and
Trillian/Tessera logs are tested with: matching them means an outside CT tool checks our proofs.
"""

from __future__ import annotations

import random

import pytest

from privacy.merkle import (
    EMPTY_ROOT,
    Frontier,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_inclusion,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

LEAF_INPUTS = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657"]] + [
    bytes.fromhex("606162636465666768696a6b6c6d6e6f")
]
ROOTS = [
    EMPTY_ROOT.hex(),
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (1-based leaf, tree size, proof) as in verify_test.go
INCLUSION = [
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        2,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]
LEAVES = [leaf_hash(d) for d in LEAF_INPUTS]


def _hex(proof: list[bytes]) -> list[str]:
    return [p.hex() for p in proof]


def _raw(proof: list[str]) -> list[bytes]:
    return [bytes.fromhex(p) for p in proof]


def test_roots_of_every_prefix_match_the_vectors() -> None:
    for size, want in enumerate(ROOTS):
        assert tree_root(LEAVES[:size]).hex() == want


def test_frontier_appends_and_round_trips_through_json() -> None:
    frontier = Frontier()
    for size, leaf in enumerate(LEAVES, start=1):
        frontier.append(leaf)
        assert frontier.root().hex() == ROOTS[size]
        assert len(frontier.hashes) == bin(size).count("1")
        assert Frontier.from_json(frontier.to_json()).root() == frontier.root()
    with pytest.raises(ValueError):
        Frontier(3, frontier.hashes[:1])  # 3 leaves need two subtree roots


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_proofs_match_and_verify(leaf: int, size: int, proof: list[str]) -> None:
    assert _hex(inclusion_proof(LEAVES, leaf - 1, size)) == proof
    root = bytes.fromhex(ROOTS[size])
    verify_inclusion(leaf - 1, size, LEAVES[leaf - 1], _raw(proof), root)
    probes = [
        (leaf - 2, size, LEAVES[leaf - 1], _raw(proof)),  # wrong index
        (leaf, size, LEAVES[leaf - 1], _raw(proof)),
        (leaf - 1, size * 2, LEAVES[leaf - 1], _raw(proof)),  # wrong size
        (leaf - 1, size, leaf_hash(b"WrongLeaf"), _raw(proof)),
        (leaf - 1, size, LEAVES[leaf - 1], [*_raw(proof), root]),  # trailing garbage
        (leaf - 1, size, LEAVES[leaf - 1], _raw(proof)[:-1]),  # removed component
    ]
    for index, tree, leaf_h, path in probes:
        with pytest.raises(ProofError):
            verify_inclusion(index, tree, leaf_h, path, root)


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_proofs_match_and_verify(old: int, new: int, proof: list[str]) -> None:
    assert _hex(consistency_proof(LEAVES, old, new)) == proof
    old_root, new_root = bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new])
    verify_consistency(old, new, old_root, new_root, _raw(proof))
    if not proof:
        return
    for args in [
        (old, new, new_root, old_root, _raw(proof)),  # swapped roots
        (old, new, old_root, new_root, []),
        (old, new, old_root, new_root, _raw(proof)[:-1]),
        (old + 1, new, old_root, new_root, _raw(proof)),
        (old, new * 2, old_root, new_root, _raw(proof)),
    ]:
        with pytest.raises(ProofError):
            verify_consistency(*args)


def test_proofs_of_random_trees_verify_and_reject_another_leaf() -> None:
    rng = random.Random(6962)
    leaves = [leaf_hash(rng.randbytes(8)) for _ in range(70)]
    for size in [1, 2, 3, 7, 16, 33, 70]:
        root = tree_root(leaves[:size])
        for index in {0, size // 2, size - 1}:
            proof = inclusion_proof(leaves, index, size)
            assert root_from_inclusion(index, size, leaves[index], proof) == root
            with pytest.raises(ProofError):
                verify_inclusion(index, size, leaves[(index + 1) % 70], proof, root)
        for old in {1, size // 3, size - 1}:
            if 0 < old < size:
                verify_consistency(old, size, tree_root(leaves[:old]), root, consistency_proof(leaves, old, size))
                forked = [*leaves[: old - 1], leaf_hash(b"forged"), *leaves[old:size]]
                with pytest.raises(ProofError):
                    verify_consistency(old, size, tree_root(forked[:old]), root, consistency_proof(leaves, old, size))
