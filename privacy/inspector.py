#!/usr/bin/env python3
"""An inspector's check of a FedSeek audit log, on its own: Python's standard library and `cryptography`.

This file is copied into every export bundle as `verify.py` and imports nothing of FedSeek, so an
inspector can read all of it and run it without the site's software. It re-implements, apart
from the code that makes them, the RFC 6962 hashing, the inclusion proof check (RFC 9162
2.1.3.2), the record hash chain and the ECDSA P-384 / SHA-384 signature over a checkpoint
(`{"kind": "audit.checkpoint", "payload": {origin, size, root, time}}`, canonical JSON).

    python verify.py proof PROOF.json --key SITE.pub    one record is in the log the site signed
    python verify.py bundle DIR                         an exported segment, from the bundle alone

Exit 0 and one `OK:` line, or exit 1 and one `FAILED:` line.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

CHECKPOINT_KIND = "audit.checkpoint"
GENESIS = "0" * 64


class Failed(Exception):
    """The one-line reason a check failed."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _leaf(line: bytes) -> bytes:
    return _h(b"\x00" + line)


def _node(left: bytes, right: bytes) -> bytes:
    return _h(b"\x01" + left + right)


def load_key(path: Path) -> ec.EllipticCurvePublicKey:
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except ValueError:
        key = serialization.load_pem_public_key(data)  # type: ignore[assignment]
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Failed(f"{path}: not an EC public key")
    return key


def check_checkpoint(statement: Any, key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The checkpoint's payload if `key` signed it."""
    if not isinstance(statement, dict) or statement.get("kind") != CHECKPOINT_KIND:
        raise Failed("not a signed audit checkpoint")
    payload = statement.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("size"), int) or not payload.get("root"):
        raise Failed("checkpoint payload malformed")
    try:
        signature = base64.b64decode(str(statement.get("signature", "")), validate=True)
        key.verify(signature, _canonical({"kind": CHECKPOINT_KIND, "payload": payload}), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise Failed(f"checkpoint of {payload.get('size')} records: signature does not verify with the key") from None
    return payload


def check_record(line: bytes, *, seq: int, prev_hash: str | None) -> dict[str, Any]:
    """The record on `line`, if it is record `seq`, hashes to its own `hash` and follows `prev_hash`."""
    try:
        record = json.loads(line)
    except ValueError:
        raise Failed(f"record {seq}: not JSON") from None
    if not isinstance(record, dict) or record.get("seq") != seq:
        raise Failed(f"record {seq}: out of sequence")
    content = {k: v for k, v in record.items() if k != "hash"}
    if hashlib.sha256(_canonical(content)).hexdigest() != record.get("hash"):
        raise Failed(f"record {seq}: its hash does not match its content (edited)")
    if prev_hash is not None and record.get("prev_hash") != prev_hash:
        raise Failed(f"record {seq}: does not follow record {seq - 1} (chain broken)")
    return record


def root_from_path(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    if not 0 <= index < size:
        raise Failed(f"leaf {index} is outside a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise Failed("inclusion proof too long")
        if fn % 2 == 1 or fn == sn:
            r = _node(p, r)
            while fn % 2 == 0 and fn != 0:
                fn //= 2
                sn //= 2
        else:
            r = _node(r, p)
        fn //= 2
        sn //= 2
    if sn != 0:
        raise Failed("inclusion proof too short")
    return r


def verify_proof(proof: dict[str, Any], key: ec.EllipticCurvePublicKey) -> str:
    payload = check_checkpoint(proof.get("checkpoint"), key)
    seq, size = proof.get("seq"), proof.get("tree_size")
    if not isinstance(seq, int) or size != payload["size"] or proof.get("leaf_index") != seq - 1:
        raise Failed("proof does not name the signed checkpoint's tree size or a record's position")
    line = str(proof.get("record", "")).encode("utf-8")
    record = check_record(line, seq=seq, prev_hash=None)
    path = [bytes.fromhex(h) for h in proof.get("proof", [])]
    if root_from_path(seq - 1, size, _leaf(line), path).hex() != payload["root"]:
        raise Failed(f"record {seq} is not in the log the site signed (proof leads to another root)")
    return (
        f"OK: record {seq} ({record.get('action')} by {record.get('actor')} at {record.get('ts')}) is in "
        f"{payload.get('origin')}'s audit log of {size} records signed at {payload.get('time')}"
    )


class _Frontier:
    """Perfect-subtree roots of a tree's left part, largest first: where the bundle's records continue."""

    def __init__(self, size: int, hashes: list[bytes]) -> None:
        if len(hashes) != bin(size).count("1"):
            raise Failed(f"frontier of {size} records malformed")
        self.size, self.hashes = size, hashes

    def add(self, leaf: bytes) -> None:
        node, size = leaf, self.size
        while size % 2 == 1:
            node = _node(self.hashes.pop(), node)
            size //= 2
        self.hashes.append(node)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return _h(b"")
        r = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            r = _node(h, r)
        return r


def verify_bundle(bundle: Path) -> str:
    """Every record of the bundle chains and hashes into the sealing checkpoint, which the bundled key signed."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    key = load_key(bundle / manifest["public_key"])
    seal = check_checkpoint(manifest["seal"], key)
    before = manifest["before"]
    frontier = _Frontier(int(before["size"]), [bytes.fromhex(h) for h in before["hashes"]])
    checks: dict[int, list[str]] = {}
    for statement in manifest.get("witnessed", []):
        payload = check_checkpoint(statement, key)
        checks.setdefault(payload["size"], []).append(payload["root"])
    segments = manifest.get("segments", [])
    ends: dict[int, dict[str, Any]] = {}  # sealed segments wholly in the bundle, by their last record
    for segment in segments:
        if segment.get("checkpoint") is not None:  # the final checkpoint the segment was sealed with
            payload = check_checkpoint(segment["checkpoint"], key)
            if payload["size"] != segment["last"]:
                raise Failed(f"segment {segment['segment']}: its seal's checkpoint is not of its last record")
            checks.setdefault(payload["size"], []).append(payload["root"])
        if segment["first"] > frontier.size:
            ends[int(segment["last"])] = segment
    prev: str | None = before["hash"]
    seq, first, last = frontier.size, manifest["first_seq"], manifest["last_seq"]
    in_range, whole = 0, 0
    digest = hashlib.sha256()
    with (bundle / manifest["records"]).open("rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\n")
            seq += 1
            record = check_record(line, seq=seq, prev_hash=prev)
            prev = record["hash"]
            frontier.add(_leaf(line))
            in_range += first <= seq <= last
            digest.update(line + b"\n")
            if seq in ends:  # a whole sealed segment: its file is these lines, byte for byte
                if digest.hexdigest() != ends[seq]["sha256"]:
                    raise Failed(f"segment {ends[seq]['segment']}: the records differ from the sealed file's sha256")
                whole += 1
            if any(int(s["last"]) == seq for s in segments):
                digest = hashlib.sha256()  # the next segment's file starts after this record
            for root in checks.get(seq, []):
                if frontier.root().hex() != root:
                    raise Failed(f"the records disagree with the checkpoint witnessed or sealed at {seq} records")
    if frontier.size != seal["size"]:
        raise Failed(f"the bundle ends at record {frontier.size}, its seal covers {seal['size']}")
    if frontier.root().hex() != seal["root"]:
        raise Failed("the records do not hash to the sealed checkpoint's root (edited, removed or added)")
    for size in checks:
        if not before["size"] < size <= seal["size"]:
            raise Failed(f"a witnessed checkpoint of {size} records is outside the bundle")
    crossed = f", {len(segments)} segment(s) crossed, {whole} whole sealed file(s) matched" if segments else ""
    return (
        f"OK: records {first}..{last} ({in_range} in {manifest['from']}..{manifest['to']}) of "
        f"{seal.get('origin')}'s audit log, sealed by a checkpoint of {seal['size']} records signed at "
        f"{seal.get('time')}, {len(manifest.get('witnessed', []))} witnessed checkpoint(s) consistent{crossed}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verify.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("proof", help="check an inclusion proof (`fedseek audit prove`)")
    p.add_argument("proof", type=Path)
    p.add_argument("--key", type=Path, required=True, help="the site's public node key (OpenSSH or PEM)")
    b = sub.add_parser("bundle", help="check an export bundle (`fedseek audit export`)")
    b.add_argument("bundle", type=Path, nargs="?", default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    try:
        if args.what == "proof":
            message = verify_proof(json.loads(args.proof.read_text(encoding="utf-8")), load_key(args.key))
        else:
            message = verify_bundle(args.bundle)
    except Failed as exc:
        print(f"FAILED: {exc}")
        return 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"FAILED: unreadable input: {type(exc).__name__}: {exc}")
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
