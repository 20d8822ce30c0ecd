"""Every node of the audit log's Merkle tree in one append-only file, so a proof costs O(log² n) reads.

Without it an inclusion proof rehashes every record (O(n): about 0.1 s per 2,000 records here).
The trail appends each leaf and the parents it completes (`privacy.merkle.Frontier.append`) in
post-order, the layout of a Merkle mountain range: the node over leaves `[k·2^h, (k+1)·2^h)`
sits at position `2j - popcount(j) + h` with `j = (k+1)·2^h - 1`, and `n` leaves take
`2n - popcount(n)` nodes (64 bytes a record). Every range a proof needs (RFC 6962 splits at
powers of two) is a stored perfect subtree or the fold of O(log n) of them.

The file is a cache, written without fsync and never trusted: a proof made from it is used only
if the record's line hashes to its stored leaf and the path leads from that leaf to the signed
checkpoint's root, else the caller falls back to rehashing the log (`privacy.transparency.prove`).
"""

from __future__ import annotations

import os
from pathlib import Path

from privacy.merkle import inclusion_path, node_hash

__all__ = ["NODE", "NodeStore", "node_count", "nodes_path"]

NODE = 32


def nodes_path(log: Path) -> Path:
    return log.with_suffix(log.suffix + ".nodes")


def node_count(leaves: int) -> int:
    """How many nodes a tree of `leaves` leaves has stored in post-order."""
    return 2 * leaves - bin(leaves).count("1")


def _position(level: int, index: int) -> int:
    last = ((index + 1) << level) - 1
    return node_count(last) + level


def _leaves_for(nodes: int) -> int | None:
    """The leaf count whose tree has exactly `nodes` nodes, or None (a torn or foreign file)."""
    guess = nodes // 2
    for n in range(guess, guess + 66):
        if node_count(n) == nodes:
            return n
    return None


class NodeStore:
    """The post-order node file beside the log; callers hold the log's lock while appending."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def leaves(self) -> int | None:
        """How many leaves the file covers; None when it is missing a part (a reader rebuilds)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size % NODE:
            return None
        return _leaves_for(size // NODE)

    def extend(self, first: int, nodes: bytes) -> None:
        """Add the nodes of leaves `first`, `first + 1`, ... (what `Frontier.append` returned, joined).

        Another writer process may have stored some of them already; a gap (the file behind
        `first`) leaves the file as it is, to be rebuilt by the next proof that needs it."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            have = os.fstat(fd).st_size
            start = node_count(first) * NODE
            if have < start or have % NODE:
                return
            skip = have - start
            if skip < len(nodes):
                view = memoryview(nodes)[skip:]
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def truncate(self, leaves: int) -> None:
        """Drop nodes past `leaves` leaves (written for records a crash kept off the log)."""
        want = node_count(leaves) * NODE
        try:
            if self.path.stat().st_size > want:
                os.truncate(self.path, want)
        except FileNotFoundError:
            pass

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def proof(self, index: int, size: int) -> tuple[bytes, list[bytes], bytes]:
        """(stored leaf `index`, its inclusion path in the tree of `size`, that tree's root from the file).

        ValueError if the file does not hold the tree of `size` leaves."""
        have = self.leaves()
        if have is None or have < size:
            raise ValueError(f"{self.path}: holds {have} leaves, not {size}")
        with self.path.open("rb") as fh:

            def node(level: int, start: int) -> bytes:
                fh.seek(_position(level, start >> level) * NODE)
                data = fh.read(NODE)
                if len(data) != NODE:
                    raise ValueError(f"{self.path}: short read")
                return data

            def mth(lo: int, hi: int) -> bytes:
                width = hi - lo
                if width & (width - 1) == 0 and lo % width == 0:  # a perfect subtree: stored
                    return node(width.bit_length() - 1, lo)
                k = 1 << ((width - 1).bit_length() - 1)
                return node_hash(mth(lo, lo + k), mth(lo + k, hi))

            return node(0, index), inclusion_path(mth, index, size), mth(0, size)
