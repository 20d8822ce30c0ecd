"""`fedseek privacy audit`: measured leakage of a DP-LoRA round next to the epsilon it claims.

Runs the canary membership test (privacy.membership, wired in node.canary_audit) at the
configured epsilon and, unless `--no-baseline`, once more without noise: the baseline shows
that the test can see memorisation, so a low leakage under DP means something.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def add_privacy_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `privacy audit` on the root parser's subcommands."""
    privacy = sub.add_parser("privacy", help="privacy checks").add_subparsers(dest="privacy_command", required=True)
    p = privacy.add_parser("audit", help="canary membership-inference audit of a DP-LoRA round")
    p.add_argument("--model", required=True, help="model directory (as in the node config's model_dir)")
    p.add_argument("--data", help="JSONL shaped like the site's training data to mix canaries into (default: none)")
    p.add_argument("--canaries", type=_at_least_4, default=64, help="canaries, half inserted (default: 64)")
    p.add_argument("--epsilon", type=float, default=1.0, help="epsilon of the private run (default: 1.0)")
    p.add_argument("--delta", type=float, help="delta (default: 1 / (10 n))")
    p.add_argument("--epochs", type=int, default=12, help="training epochs of each run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="expected batch size (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="LoRA learning rate (default: %(default)s)")
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="DP-SGD per-sample clipping norm (default: %(default)s)"
    )
    p.add_argument("--max-length", type=int, default=256, help="tokens per training example (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of canaries, sampling and noise (default: %(default)s)")
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.set_defaults(func=_audit)


def _at_least_4(text: str) -> int:
    value = int(text)
    if value < 4:
        raise argparse.ArgumentTypeError("at least 4 canaries are needed (2 inserted, 2 held out)")
    return value


def _audit(args: argparse.Namespace) -> int:
    from node.canary_audit import audit_site
    from node.data import load_jsonl, tokenize
    from node.engine import ModelHost
    from node.model import load_model
    from node.trainer import TrainSettings

    model, tokenizer = load_model(args.model, device=args.device)
    host = ModelHost(model, tokenizer, model_name=Path(args.model).name)
    site = tokenize(load_jsonl(Path(args.data)), tokenizer, max_length=args.max_length) if args.data else []
    settings = TrainSettings(
        local_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
    )
    runs: dict[str, Any] = {}
    for name, epsilon in [("dp", args.epsilon), *([] if args.no_baseline else [("no_dp", None)])]:
        result = audit_site(
            host,
            site,
            canaries=args.canaries,
            epsilon=epsilon,
            settings=settings,
            delta=args.delta,
            seed=args.seed,
            max_length=args.max_length,
        )
        runs[name] = result.to_dict()
        claimed = "none" if math.isinf(result.claimed_epsilon) else f"{result.claimed_epsilon:g}"
        print(
            f"{name:6} claimed epsilon {claimed:>5}  AUC {result.auc:.3f}  "
            f"TPR@FPR<={result.low_fpr:g} {result.tpr_at_low_fpr:.3f}  "
            f"epsilon lower bound {result.epsilon_lower_bound:.3f} ({result.confidence:.0%} confidence)",
            flush=True,
        )
    report = {"canaries": args.canaries, "site_records": len(site), "settings": vars(settings), "runs": runs}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"results: {args.out}")
    return 0
