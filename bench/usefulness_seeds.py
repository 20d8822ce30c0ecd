"""Usefulness across data seeds: `bench/usefulness.py` once per (data seed, public seed), then the spread.

One seed's verdict can hide a bad draw: on an H100 the default settings gave the federation 0.973
of pooled exact match on seed 7 but 0.798 on seed 11 (public seed 2031). The goal is about the
distribution: over at least five data seeds, the worst federation/pooled ratio >= 0.9, the median
>= 0.95, and every seed's federation above that seed's best site alone.

Runs the seeds as parallel processes (the benchmark's 1 M-parameter model leaves a GPU mostly idle,
so several seeds share one), each writing its own JSON, then summarises every variant the runs
compared (``--variant`` of bench/usefulness.py; "default" is the command line's own settings):
per seed pooled, best site alone, federation and their ratio; over seeds the median, worst, best,
spread (best - worst) and mean of the ratio, and how many seeds met each part of the goal.

Usage: ``python -m bench.usefulness_seeds --pairs 7:2024 3:2027 11:2031 5:2029 13:2033 --parallel 5
--out-dir DIR -- --device cuda --lrs 0.003 0.01`` (everything after ``--`` goes to every seed's run).
``--summarize-only`` rebuilds the summary from the JSONs already in DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GOAL_WORST = 0.9
GOAL_MEDIAN = 0.95
MIN_SEEDS = 5


def parse_pair(text: str) -> tuple[int, int]:
    seed, sep, public = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: give DATA_SEED:PUBLIC_SEED, e.g. 11:2031")
    pair = int(seed), int(public)
    if pair[0] == pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: the public seed must differ from the data seed")
    return pair


def run_seeds(
    pairs: Sequence[tuple[int, int]], passthrough: Sequence[str], *, out_dir: Path, parallel: int, timeout_s: float
) -> dict[int, str]:
    """Each pair as its own `python -m bench.usefulness` process, at most `parallel` at a time.

    Returns each seed's outcome ("ok", "exit N" or "timed out"); a process that outlives
    `timeout_s` is killed (its JSON is then missing, and the summary says so).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = list(pairs)
    running: dict[int, tuple[subprocess.Popen[bytes], float, Any]] = {}
    outcome: dict[int, str] = {}
    while pending or running:
        while pending and len(running) < parallel:
            seed, public = pending.pop(0)
            cmd = [
                sys.executable, "-m", "bench.usefulness", "--seed", str(seed), "--public-seed", str(public),
                "--out", str(out_dir / f"usefulness_seed{seed}.json"), *passthrough,
            ]  # fmt: skip
            log = (out_dir / f"usefulness_seed{seed}.log").open("wb")
            running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.monotonic(), log)
            print(f"seed {seed} (public {public}) started: {' '.join(cmd[3:])}", flush=True)
        time.sleep(1.0)
        for seed, (proc, began, log) in list(running.items()):
            code = proc.poll()
            if code is None and time.monotonic() - began > timeout_s:
                proc.kill()  # this process only, which this driver started
                proc.wait()
                code, outcome[seed] = -9, "timed out"
            elif code is not None:
                outcome[seed] = "ok" if code == 0 else f"exit {code}"
            if code is not None:
                log.close()
                del running[seed]
                print(f"seed {seed}: {outcome[seed]} after {time.monotonic() - began:.0f} s", flush=True)
    return outcome


def seed_row(res: dict[str, Any], variant: str) -> dict[str, Any]:
    """One seed's line for one variant, from a bench/usefulness.py result."""
    v = res["variants"][variant]
    base = next(r["test_em"] for r in res["table"] if r["arm"].startswith("base"))
    lr = next(r["lr"] for r in res["table"] if r["arm"] == v["federated_arm"])
    return {
        "seed": res["data"]["seed"],
        "public_seed": res["data"]["public_seed"],
        "base": base,
        "pooled": v["pooled"],
        "best_site_alone": v["best_site_alone"],
        "federated": v["federated"],
        "federated_lr": lr,
        "ratio": v["federated_over_pooled"],
        "beats_best_site_alone": v["federated_beats_every_site_alone"],
    }


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: every seed's row and the spread of the federation/pooled ratio over seeds.

    A variant is summarised over the seeds whose runs compared it; the goal needs at least
    MIN_SEEDS of them, a pooled arm that learned on every one (else the ratio means nothing),
    worst ratio >= GOAL_WORST, median >= GOAL_MEDIAN and the federation above the best site alone
    on every seed.
    """
    names = list(dict.fromkeys(name for res in results for name in res.get("variants", {})))
    out: dict[str, Any] = {}
    for name in names:
        runs = sorted((r for r in results if name in r.get("variants", {})), key=lambda r: r["data"]["seed"])
        rows = [seed_row(r, name) for r in runs]
        ratios = [row["ratio"] for row in rows if row["ratio"] is not None]
        learned = all(r["goal"]["pooled_learned"] for r in runs)
        stats: dict[str, Any] = {"seeds": len(rows)}
        if ratios:
            stats |= {
                "median_ratio": round(statistics.median(ratios), 4),
                "worst_ratio": round(min(ratios), 4),
                "best_ratio": round(max(ratios), 4),
                "spread_ratio": round(max(ratios) - min(ratios), 4),
                "mean_ratio": round(statistics.fmean(ratios), 4),
                "stdev_ratio": round(statistics.stdev(ratios), 4) if len(ratios) > 1 else 0.0,
                "median_federated": round(statistics.median(r["federated"] for r in rows), 4),
                "worst_federated": round(min(r["federated"] for r in rows), 4),
                "seeds_beating_best_site_alone": sum(r["beats_best_site_alone"] for r in rows),
                "worst_margin_over_best_site_alone": min(
                    (round(r["federated"] - r["best_site_alone"], 4) for r in rows if r["best_site_alone"] is not None),
                    default=None,
                ),
            }
        stats["goal_met"] = bool(
            ratios
            and len(ratios) == len(rows) >= MIN_SEEDS
            and learned
            and stats["worst_ratio"] >= GOAL_WORST
            and stats["median_ratio"] >= GOAL_MEDIAN
            and stats["seeds_beating_best_site_alone"] == len(rows)
        )
        settings = runs[0]["variants"][name]["settings"]
        out[name] = {"settings": settings, "rows": rows, **stats}
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    for name, s in summary.items():
        st = s["settings"]
        grid = "/".join(f"{x:g}" for x in st["lrs"])
        lines.append(
            f"**{name}** ({st['server']['describe']}, clip {st['clip']:g}, {st['rounds']} rounds, lr grid {grid})"
        )
        lines.append("")
        lines.append(
            "| data seed | public seed | base | (a) pooled | best (b) site alone | (c) federation (lr) | (c)/(a) |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in s["rows"]:
            pooled, best, ratio = (_num(r[k]) for k in ("pooled", "best_site_alone", "ratio"))
            lines.append(
                f"| {r['seed']} | {r['public_seed']} | {r['base']:.3f} | {pooled} "
                f"| {best} | {r['federated']:.3f} ({r['federated_lr']:g}) | {ratio} |"
            )
        if "median_ratio" in s:
            lines.append(
                f"| **over {s['seeds']} seeds** | | | | | median {s['median_federated']:.3f}, worst "
                f"{s['worst_federated']:.3f} | median **{s['median_ratio']:.3f}**, worst **{s['worst_ratio']:.3f}**, "
                f"spread {s['spread_ratio']:.3f} |"
            )
        lines.append(f"\nGoal met: {s['goal_met']}\n")
    return "\n".join(lines)


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("usefulness_seed*.json"))]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pairs", type=parse_pair, nargs="+", default=[], metavar="SEED:PUBLIC_SEED")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="kill a seed's run after this long")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--summary", type=Path, default=None, help="default: OUT_DIR/summary.json")
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args(argv)
    if args.parallel < 1:
        ap.error("--parallel must be at least 1")
    outcome: dict[int, str] = {}
    if not args.summarize_only:
        if not args.pairs:
            ap.error("give --pairs (or --summarize-only)")
        outcome = run_seeds(
            args.pairs, passthrough, out_dir=args.out_dir, parallel=args.parallel, timeout_s=args.timeout_s
        )
    results = load_results(args.out_dir)
    variants = summarize(results)
    summary: dict[str, Any] = {
        "benchmark": "usefulness_seeds",
        "goal": {"worst_ratio_at_least": GOAL_WORST, "median_ratio_at_least": GOAL_MEDIAN, "min_seeds": MIN_SEEDS},
        "outcome": {str(k): v for k, v in outcome.items()},
        "machine": results[0]["machine"] if results else None,
        "passthrough": passthrough,
        "variants": variants,
        "markdown": markdown(variants),
    }
    path = args.summary or args.out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print(summary["markdown"])
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
