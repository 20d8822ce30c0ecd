"""The coordinator's check of a pushed audit checkpoint against a witness store that has grown for months.

    python -m bench.witness_store [--sizes 1000 10000 100000] [--repeats 7] [--out bench/results/...json]

A site pushes its signed audit checkpoint about once a minute while its log grows (some 43,000 a
month, 500,000 a year), and each push is checked against the latest one witnessed for the site
(`coordinator.audit_witness.witness_audit_checkpoint`). For each store size (real P-384 signed
checkpoints, stored as the coordinator stores them), side by side in one run:

- `incremental`: the coordinator's `WitnessStore`, which keeps the last entry per note and the
  offset it read, so each push reads the lines appended since the previous one;
- `whole_file`: a fresh `WitnessStore` per push, which reads and parses every line: what every
  push cost before the tail was kept (and what `fedseek audit verify --witness` reads once).

Each timed call checks (and records) one new checkpoint; the medians of `--repeats` calls with
their min..max, the ratio, and the bytes each reads (the floor: one stored line, ~700 bytes).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import write_results
from coordinator.audit_witness import PUSH, witness_audit_checkpoint
from coordinator.witness import WitnessStore
from privacy.audit import utc_now
from privacy.checkpoints import KIND, Checkpoint, CheckpointSigner

REPO = Path(__file__).resolve().parents[1]
SITE = "site-a"


def _statement(signer: CheckpointSigner, size: int) -> dict[str, Any]:
    return signer.sign(Checkpoint(SITE, size, f"{size:064x}", utc_now()))


def _fill(store: WitnessStore, signer: CheckpointSigner, n: int) -> None:
    """`n` stored checkpoints (one signature reused with its size rewritten: the store parses, never
    verifies, what it holds; every checked push below is signed for real)."""
    template = _statement(signer, 1)
    path = store.root / SITE / f"{KIND}.jsonl"
    store.record(SITE, KIND, template, note=PUSH)
    with path.open("a", encoding="utf-8") as fh:
        line = path.read_text(encoding="utf-8").splitlines()[0]
        head, _, rest = line.partition('"size":1,')
        for i in range(2, n + 1):
            fh.write(f'{head}"size":{i},{rest}\n')
        fh.flush()
        os.fsync(fh.fileno())  # else the first timed push's fsync writes the whole fill back


def _time_pushes(
    root: Path, warm: WitnessStore | None, signer: CheckpointSigner, start: int, repeats: int
) -> list[float]:
    """Seconds of each of `repeats` push checks, with the `warm` store, or a fresh one per push."""
    key = signer.key.public_key()
    out = []
    for i in range(repeats):
        statement = _statement(signer, start + i)
        store = warm if warm is not None else WitnessStore(root)
        t = time.perf_counter()
        witness_audit_checkpoint(store, SITE, [statement], key=key, channel=PUSH)
        out.append(time.perf_counter() - t)
    return out


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 3),
        "min_ms": round(min(values) * 1000, 3),
        "max_ms": round(max(values) * 1000, 3),
        "values_ms": [round(v * 1000, 3) for v in values],
    }


def run(sizes: list[int], repeats: int) -> dict[str, Any]:
    signer = CheckpointSigner(key=ec.generate_private_key(ec.SECP384R1()), origin=SITE)
    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(dir=REPO, prefix=".bench-witness-"))
        try:
            root = work / "witness"
            warm = WitnessStore(root)
            _fill(warm, signer, n)
            path = root / SITE / f"{KIND}.jsonl"
            line_bytes = path.stat().st_size // n
            warm.latest_by_note(SITE, KIND)  # the coordinator's store has read its file once since it started
            incremental = _time_pushes(root, warm, signer, n + 1, repeats)
            whole = _time_pushes(root, None, signer, n + 1 + repeats, repeats)
            row: dict[str, Any] = {
                "stored": n,
                "file_mb": round(path.stat().st_size / 1e6, 2),
                "incremental": {**_summary(incremental), "reads_bytes": line_bytes},
                "whole_file": {**_summary(whole), "reads_bytes": path.stat().st_size},
                "ratio_whole_to_incremental": round(statistics.median(whole) / statistics.median(incremental), 1),
            }
            rows.append(row)
            print(
                f"{n:>7} stored ({row['file_mb']} MB): incremental {row['incremental']['median_ms']} ms, "
                f"whole file {row['whole_file']['median_ms']} ms ({row['ratio_whole_to_incremental']}x)",
                flush=True,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "bench": "witness_store",
        "machine": f"{platform.machine()} CPU ({platform.processor() or platform.platform()})",
        "python": platform.python_version(),
        "repeats": args.repeats,
        **run(args.sizes, args.repeats),
    }
    if args.out is not None:
        write_results(res, args.out, t0=t0)


if __name__ == "__main__":
    main()
