"""FFA-LoRA wire bytes: what one training reply carries, the whole adapter (A+B) vs B only.

Both sides are serialized for real: the node agent's safetensors payload (`wire.encode_update`)
and the Flower reply (adapter, metrics and privacy records) as the SuperLink carries it, every
nested object deflated. The layouts are the tiny demo model's adapter (r=8 on the MLA
projections, as the demo trains) and, computed from its config shapes on the meta device without
downloading weights, DeepSeek-R1-Distill-Qwen-1.5B's with r=16 on every linear layer. Values are
seeded random float32, as trained factors are: Flower stores identical chunks once, so an
all-zero B (the init) would look smaller than any trained one.

    .venv/bin/python bench/ffa_wire_bytes.py [--out bench/results/ffa_wire_bytes_cpu_DATE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's packages

from bench.common import machine, versions
from federation.protocol import records, wire

REPORT = wire.PrivacyReport(
    site="site-a",
    epsilon=0.5,
    delta=1e-5,
    steps=6,
    sample_rate=0.125,
    noise_multiplier=1.1,
    max_grad_norm=1.0,
    accountant="rdp",
    num_examples=48,
    train_loss=2.0,
)


def tiny_demo_adapter() -> tuple[wire.Arrays, dict[str, Any]]:
    """The seeded LoRA init a demo site trains (the node's own ModelHost on the tiny model)."""
    from node.engine import ModelHost
    from node.model import load_model, lora_target_modules, write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_model(write_tiny_model(Path(tmp) / "tiny-deepseek-v3"))
    host = ModelHost(model, tok, model_name="tiny-deepseek-v3")
    info = {"rank": host.lora.r, "target_modules": lora_target_modules(host.peft.get_base_model())}
    return host.initial_arrays(), info


def r1_distill_adapter(rank: int) -> tuple[wire.Arrays, dict[str, Any]]:
    """DeepSeek-R1-Distill-Qwen-1.5B's LoRA tensor names and shapes (meta device)."""
    from peft import get_peft_model_state_dict

    from bench.dp_training import ADAPTER, build_model
    from node.model import lora_target_modules

    model = build_model("r1-distill-1.5b", "meta", torch.float32, rank, 2 * rank)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    info = {"rank": rank, "target_modules": lora_target_modules(model.get_base_model()), "computed": True}
    return {k: np.zeros(tuple(v.shape), np.float32) for k, v in state.items()}, info


def measure(layout: wire.Arrays) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    adapter = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in layout.items()}
    out: dict[str, Any] = {
        "tensors": len(adapter),
        "a_values": sum(v.size for v in wire.lora_a(adapter).values()),
        "b_values": sum(v.size for v in wire.lora_b(adapter).values()),
    }
    for factors in wire.FACTORS:
        update = wire.AdapterUpdate.of(adapter, factors)
        reply = RecordDict(
            {
                **records.update_records(update),
                records.METRICS: records.report_metrics(REPORT),
                records.PRIVACY: records.report_to_config(REPORT),
            }
        )
        out[factors] = {"agent_payload_bytes": len(wire.encode_update(update)), "flower_reply_bytes": 0}
        out[factors]["flower_reply_bytes"] = records.serialized_size(reply)
    out["ratio_b_over_ab"] = {
        k: round(out["B"][k] / out["AB"][k], 4) for k in ("agent_payload_bytes", "flower_reply_bytes")
    }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank for the R1-Distill-Qwen-1.5B shape")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    now = datetime.now(UTC)
    out = args.out or Path(__file__).parent / "results" / f"ffa_wire_bytes_cpu_{now:%Y-%m-%d}.json"
    models: dict[str, Any] = {}
    for name, build in (
        ("tiny-demo", tiny_demo_adapter),
        ("r1-distill-qwen-1.5b", lambda: r1_distill_adapter(args.rank)),
    ):
        adapter, info = build()
        models[name] = {**info, **measure(adapter)}
        m = models[name]
        print(
            f"{name}: whole {m['AB']['flower_reply_bytes']:,} B, B only {m['B']['flower_reply_bytes']:,} B "
            f"per Flower reply ({m['ratio_b_over_ab']['flower_reply_bytes']:.3f}x)"
        )
    res = {
        "benchmark": "ffa_wire_bytes",
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine("cpu"),
        "models": models,
        "versions": versions("flwr", "safetensors", "peft", "transformers"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
