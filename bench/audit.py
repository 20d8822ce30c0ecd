"""Audit trail throughput on this machine's CPU and disk: signed, fsynced records per second with
group commit, append latency, and inclusion-proof time.

    python -m bench.audit [--seconds 3] [--repeats 5] [--out bench/results/audit_cpu_<date>.json]

Each run opens a fresh trail (on the same filesystem as the repository, in a temporary
directory next to it) with a P-384 checkpoint signer, as a node does, and has N threads append
serving-sized records for `--seconds`: every `append` returns only after the fsync that covers
its record (`privacy.audit.AuditTrail`'s group commit), and the background signer signs a
checkpoint each second. Reported per concurrency: acknowledged records/s, p50 and p99 append
latency (median over the repeats, with min..max), fsyncs per record, checkpoints signed, and the
disk's own fsync time measured just before each run (other jobs share the disk). A last row has
64 appenders seal 1 MiB segments as they go (the seal's sha256 and signature land on some appends).
Then two logs of 10^4 and 10^5 records (built with fsync switched off, which proof time does
not depend on) give proof time from the node store and from a full rehash, and start-up
verification time (active segment only) against a deep verification.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

import privacy.audit as audit_mod
from privacy.audit import AuditTrail, SegmentPolicy, verify
from privacy.checkpoints import CheckpointSigner
from privacy.inspector import verify_proof
from privacy.transparency import prove
from privacy.treestore import nodes_path

REPO = Path(__file__).resolve().parents[1]
TESSERA_WRITES_PER_S = 2900  # Tessera, POSIX storage, 12 cores (the reference)
DETAILS = {
    "adapter_sha256": "ab" * 32,
    "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256},
    "prompt_hmac": "cd" * 32,
    "response_hmac": "ef" * 32,
}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def _counting_fsync() -> Iterator[dict[str, int]]:
    counts = {"fsync": 0}
    real = os.fsync

    def counted(fd: Any) -> None:
        counts["fsync"] += 1
        real(fd)

    audit_mod.os.fsync = counted
    try:
        yield counts
    finally:
        audit_mod.os.fsync = real


def run_once(
    workdir: Path, *, threads: int, seconds: float, key: ec.EllipticCurvePrivateKey, segment_bytes: int | None = None
) -> dict[str, Any]:
    path = workdir / "audit.jsonl"
    policy = SegmentPolicy() if segment_bytes is None else SegmentPolicy(max_bytes=segment_bytes)
    trail = AuditTrail(path, signer=CheckpointSigner(key, "bench-site"), segments=policy)
    signed: list[int] = []
    real_sign = trail._signer.sign  # type: ignore[union-attr]

    def sign(checkpoint: Any) -> dict[str, Any]:
        signed.append(checkpoint.size)
        return real_sign(checkpoint)

    object.__setattr__(trail._signer, "sign", sign)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start_gate = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def work(k: int) -> None:
        mine = latencies[k]
        start_gate.wait()
        i = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            trail.append(actor="api", action="serve", resource="model-v1", details={**DETAILS, "i": i, "k": k})
            mine.append(time.perf_counter() - t0)
            i += 1

    with _counting_fsync() as counts:
        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        begin = time.perf_counter()
        stop_at[0] = begin + seconds
        start_gate.wait()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - begin
        fsyncs = counts["fsync"]
    trail.close()
    flat = [x for per in latencies for x in per]
    result = verify(path)
    assert result.ok and result.records >= len(flat), result
    return {
        "records": len(flat),
        "seconds": elapsed,
        "records_per_s": len(flat) / elapsed,
        "p50_ms": _quantile(flat, 0.50) * 1e3,
        "p99_ms": _quantile(flat, 0.99) * 1e3,
        "fsyncs_per_record": fsyncs / max(1, len(flat)),
        "checkpoints_signed": len(signed),
        "segments_sealed": len(list((workdir / "audit.jsonl.segments").glob("*.seal.json"))),
    }


def disk_fsync_ms(workdir: Path, count: int = 30) -> float:
    """Median time of one 400-byte append + fsync on this filesystem now: the disk's share of an append,
    which other jobs on the machine change from minute to minute."""
    fd = os.open(workdir / "probe", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 399 + b"\n")
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times) * 1e3


def _summary(runs: list[dict[str, Any]], field: str) -> dict[str, float]:
    values = [r[field] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}


def build_log(workdir: Path, records: int, key: ec.EllipticCurvePrivateKey) -> AuditTrail:
    """A log of `records` records in 4 MiB segments; fsync off while building (proofs do not depend on it)."""
    real = os.fsync
    audit_mod.os.fsync = lambda fd: None
    try:
        trail = AuditTrail(
            workdir / "audit.jsonl", signer=CheckpointSigner(key, "bench-site"), segments=SegmentPolicy(4 << 20)
        )

        def work(k: int) -> None:
            for i in range(records // 50):
                trail.append(actor="api", action="serve", resource="model-v1", details={**DETAILS, "i": i, "k": k})

        workers = [threading.Thread(target=work, args=(k,)) for k in range(50)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        audit_mod.os.fsync = real
    trail.checkpoint()
    return trail


def proof_bench(workdir: Path, records: int, key: ec.EllipticCurvePrivateKey, repeats: int) -> dict[str, Any]:
    trail = build_log(workdir, records, key)
    path = trail.path
    size = trail.head()[0]
    rng = random.Random(records)
    seqs = [rng.randint(1, size) for _ in range(repeats)]
    picks = iter(seqs * 2)
    public = key.public_key()
    store = _timed(lambda: verify_proof(prove(path, next(picks)), public), repeats)
    aside = nodes_path(path).with_suffix(".aside")
    shutil.move(nodes_path(path), aside)
    try:  # no node store: the proof rehashes the whole log (what every proof cost before)
        rehash = _timed(lambda: verify_proof(prove(path, next(picks)), public), max(3, repeats // 2))
    finally:
        shutil.move(aside, nodes_path(path))
    quick = _timed(lambda: verify(path), 3)
    deep = _timed(lambda: verify(path, deep=True), 3)
    active = len(path.read_bytes().splitlines())
    trail.close()
    return {
        "records": size,
        "segments": len(list((path.parent / "audit.jsonl.segments").glob("*.seal.json"))),
        "proof_from_node_store": store,
        "proof_by_rehashing_the_log": rehash,
        "startup_verify_active_segment_only": {**quick, "lines_parsed": active},
        "verify_deep_every_line": {**deep, "lines_parsed": size},
        "node_store_bytes": nodes_path(path).stat().st_size,
    }


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--rollover-mib", type=float, default=1.0, help="a last row: 64 appenders sealing segments of this size"
    )
    parser.add_argument("--proof-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / f"audit_cpu_{time.strftime('%Y-%m-%d')}.json"
    )
    args = parser.parse_args(argv)
    key = ec.generate_private_key(ec.SECP384R1())
    load_before = _load()
    out: dict[str, Any] = {
        "benchmark": "bench/audit.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU",
        "python": platform.python_version(),
        "storage": "ext4 on /dev/vda (virtio disk), the filesystem of /tmp and the repository",
        "load_average_before": load_before,
        "seconds_per_run": args.seconds,
        "repeats": args.repeats,
        "reference": {"tessera_posix_writes_per_s": TESSERA_WRITES_PER_S, "tessera_cores": 12},
        "appends": {},
        "proofs": {},
    }
    rows: list[tuple[str, int, int | None]] = [(str(t), t, None) for t in args.concurrency]
    if args.rollover_mib:
        rows.append((f"64, {args.rollover_mib:g} MiB segments", 64, int(args.rollover_mib * (1 << 20))))
    for label, threads, segment_bytes in rows:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
                probe = disk_fsync_ms(Path(tmp))
                run = run_once(Path(tmp), threads=threads, seconds=args.seconds, key=key, segment_bytes=segment_bytes)
                runs.append({**run, "disk_fsync_ms": probe})
        row: dict[str, Any] = {
            "records_per_s": _summary(runs, "records_per_s"),
            "p50_ms": _summary(runs, "p50_ms"),
            "p99_ms": _summary(runs, "p99_ms"),
            "fsyncs_per_record": _summary(runs, "fsyncs_per_record"),
            "checkpoints_signed": _summary(runs, "checkpoints_signed"),
            "disk_fsync_ms": _summary(runs, "disk_fsync_ms"),
            "segments_sealed": _summary(runs, "segments_sealed"),
            "runs": runs,
        }
        row["ratio_to_tessera"] = row["records_per_s"]["median"] / TESSERA_WRITES_PER_S
        out["appends"][label] = row
        print(
            f"{label:>3} appenders: {row['records_per_s']['median']:8.0f} records/s "
            f"({row['records_per_s']['min']:.0f}..{row['records_per_s']['max']:.0f}), "
            f"p50 {row['p50_ms']['median']:.2f} ms, p99 {row['p99_ms']['median']:.2f} ms, "
            f"{row['fsyncs_per_record']['median']:.3f} fsyncs/record, "
            f"disk fsync {row['disk_fsync_ms']['median']:.2f} ms",
            flush=True,
        )
    for records in args.proof_sizes:
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
            row = proof_bench(Path(tmp), records, key, max(5, args.repeats))
        out["proofs"][str(records)] = row
        print(
            f"proof at {row['records']} records: {row['proof_from_node_store']['median_ms']:.2f} ms "
            "from the node store, "
            f"{row['proof_by_rehashing_the_log']['median_ms']:.0f} ms rehashing; start-up verify "
            f"{row['startup_verify_active_segment_only']['median_ms']:.0f} ms vs deep "
            f"{row['verify_deep_every_line']['median_ms']:.0f} ms",
            flush=True,
        )
    out["load_average_after"] = _load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out} (load average before {load_before}, after {out['load_average_after']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
