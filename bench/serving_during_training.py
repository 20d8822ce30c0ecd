"""Serving latency with and without a concurrent DP training round, on one node (JSON out).

The node is a real `NodeService` over the tiny DeepSeek-V3 model on CPU: a few client threads
send chat requests to its engine for a fixed time, once alone and once while `NodeService.train`
runs a DP-LoRA round (the sharing policy of docs/ARCHITECTURE.md, "Serving"). Reported: TTFT
p50/p99, end-to-end p50/p99, generated tokens/s, and the training steps done meanwhile.

    python -m bench.serving_during_training [--seconds 20] [--clients 4] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, versions
from federation.protocol.round_settings import RunSettings, TrainInstruction

USER = [{"role": "user", "content": "Chest pain since this morning, troponin elevated. Which department?"}]


def build_node(root: Path) -> Any:
    from fedseek_examples.demo.data import write_site_dataset

    from federation.protocol.config import NodeConfig
    from node.build import assemble_node
    from node.data import load_jsonl, tokenize
    from node.engine import ModelHost
    from node.model import load_model, write_tiny_model

    model_dir = write_tiny_model(root / "model")
    write_site_dataset(root / "data", site_index=0, n_sites=3, n_train=64, n_eval=8)
    model, tok = load_model(model_dir)
    config = NodeConfig(
        name="bench",
        model_dir=str(model_dir),
        data_dir=str(root / "data"),
        state_dir=str(root / "state"),
        pki_dir=str(root / "pki"),
        epsilon=1.0,
    )
    train = tokenize(load_jsonl(root / "data" / "train.jsonl"), tok)
    eval_data = tokenize(load_jsonl(root / "data" / "eval.jsonl"), tok)
    return assemble_node(config, ModelHost(model, tok, model_name="tiny"), train=train, eval_data=eval_data)


def serve_for(service: Any, seconds: float, clients: int, max_tokens: int) -> dict[str, Any]:
    """`clients` threads send requests back to back through the node's engine for `seconds`."""
    from node.serving import SamplingParams

    ttft: list[float] = []
    e2e: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prep = service.serving.prepare(USER, None)

    def client() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            out = service.serving.engine.complete(prep.prompt_ids, params, adapter=prep.adapter)
            with lock:
                ttft.append(out.ttft_s)
                e2e.append(time.perf_counter() - start)
                tokens[0] += out.completion_tokens

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "requests": len(e2e),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4),
        "e2e_p50_s": round(float(np.percentile(e2e, 50)), 4),
        "e2e_p99_s": round(float(np.percentile(e2e, 99)), 4),
        "tokens_per_s": round(tokens[0] / wall, 1),
    }


def train(service: Any, server_round: int) -> dict[str, Any]:
    """One DP round of 32 steps (Poisson batches of 8 of 64 records, 4 epochs); a quarter of the budget."""
    start = time.perf_counter()
    run = RunSettings(num_rounds=4, local_epochs=4, batch_size=8)
    instruction = TrainInstruction(run=run, server_round=server_round, run_id="bench")
    result = service.train(None, instruction.to_config_record())
    took = time.perf_counter() - start
    return {
        "steps": result.report.steps,
        "seconds": round(took, 2),
        "steps_per_s": round(result.report.steps / took, 2),
    }


def main() -> None:
    from node.service import TRAIN_YIELD_S

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        service = build_node(Path(tmp))
        serve_for(service, 2.0, args.clients, args.max_tokens)  # warm-up
        training_alone = train(service, 1)
        serving_alone = serve_for(service, args.seconds, args.clients, args.max_tokens)
        during: dict[str, Any] = {}
        trainer = threading.Thread(target=lambda: during.update(train(service, 2)))
        trainer.start()
        serving_during = serve_for(service, args.seconds, args.clients, args.max_tokens)
        trainer.join()
        service.serving.close()
    report = {
        "benchmark": "serving_during_training",
        "machine": machine("cpu"),
        "versions": versions("torch", "transformers", "peft", "opacus"),
        "model": "tiny DeepSeek-V3 (node.model.write_tiny_model), generic runner",
        "torch_threads": args.threads,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "policy": f"serving on its own module tree over shared weights; training yields <= {TRAIN_YIELD_S} s/step",
        "serving_alone": serving_alone,
        "serving_during_training": serving_during,
        "training_alone": training_alone,
        "training_during_serving": during,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
