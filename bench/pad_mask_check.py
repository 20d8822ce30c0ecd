"""Left-padded batches in bf16 + SDPA on CUDA: transformers' 2-D-mask path against the trainer's pad-safe mask.

The usefulness benchmark saw NaN losses on the H200 in bf16 + SDPA on left-padded batches, blamed
on query rows with every key masked. This measures, per SDPA backend, whether the per-record losses and
the DP per-sample gradients (``privacy.lora_dp.LoraGradSampler``) are finite with the mask
transformers builds from the 2-D padding mask (a leading pad token's query sees no key) and
with ``node.model.pad_safe_attention_mask`` (what ``node.trainer.per_sample_loss`` now uses),
then runs one real ``node.trainer.train_round`` in bf16. H200, torch 2.11 (2026-11-28): finite
everywhere, with either mask (``bench/results/pad_mask_check_h200_2026-11-28.json``). Models:
the product's tiny DeepSeek-V3 (MLA + MoE) and a Qwen2 of the usefulness benchmark's shape (GQA),
both seeded, nothing downloaded.

Usage: ``python bench/pad_mask_check.py --out results.json`` (CUDA; a CPU run shows the CPU
kernels' zeros for all-masked rows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's packages

from fedseek_examples.demo.data import generate_site_records

from bench.common import machine, versions
from node.data import Example, collate, tokenize
from node.engine import TRAIN_ADAPTER, ModelHost
from node.model import load_model, write_tiny_model
from node.trainer import TrainSettings, per_sample_loss, train_round
from privacy.ledger import Budget, PrivacyLedger
from privacy.lora_dp import LoraGradSampler


def _qwen2_dir(out: Path, tiny: Path) -> Path:
    """A seeded Qwen2 of the usefulness benchmark's shape (GQA 4/2), with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def check(host: ModelHost, batch: dict[str, torch.Tensor], backend: Any, *, pad_safe: bool) -> dict[str, Any]:
    """Per-record loss and per-sample gradients of one left-padded batch under one SDPA backend."""
    from torch.nn.attention import sdpa_kernel

    sampler = LoraGradSampler(host.peft, adapter_name=TRAIN_ADAPTER)
    try:
        with contextlib.ExitStack() as stack:
            if not pad_safe:  # the mask transformers builds from the 2-D one, as before the fix
                stack.enter_context(mock.patch("node.trainer.pad_safe_attention_mask", lambda _m, a: a))
            if backend is not None:
                stack.enter_context(sdpa_kernel(backend))
            loss = per_sample_loss(host.peft, batch)
            loss.mean().backward()
        grads = [g for p in host.peft.parameters() if (g := getattr(p, "grad_sample", None)) is not None]
        return {
            "loss_finite": _finite(loss),
            "nan_records": int(torch.isnan(loss).sum()),
            "grad_sample_finite": all(_finite(g) for g in grads) if grads else None,
            "mean_loss": float(loss.detach().float().nanmean()),
        }
    except RuntimeError as exc:  # a backend that cannot run this mask or dtype
        return {"error": str(exc).splitlines()[0][:160]}
    finally:
        for p in host.peft.parameters():
            p.grad_sample = None  # type: ignore[attr-defined]
            p.grad = None
        sampler.close()


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="fedseek-padmask-"))
    tiny = write_tiny_model(work / "tiny-deepseek-v3")
    records = generate_site_records(site_index=0, n_sites=3, n=args.batch * 2, seed=3)
    backends = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "math": SDPBackend.MATH}  # fmt: skip
    res: dict[str, Any] = {"benchmark": "pad_mask_check", "machine": machine(device), "device": device, "models": {}}
    for name, model_dir in (("tiny-deepseek-v3", tiny), ("qwen2-usefulness-shape", _qwen2_dir(work / "qwen2", tiny))):
        model, tok = load_model(model_dir, device=device)
        host = ModelHost(model, tok, model_name=name)
        data = tokenize([Example(messages=r.to_chat()["messages"]) for r in records], tok)
        batch = {
            k: v.to(device) for k, v in collate(data[: args.batch], pad_id=int(tok.pad_token_id), left=True).items()
        }
        out: dict[str, Any] = {
            "dtype": str(next(model.parameters()).dtype),
            "attn_implementation": model.config._attn_implementation,
            "pad_fraction": round(float((batch["attention_mask"] == 0).float().mean()), 3),
        }
        with host.lock:
            host.reset_train_adapter(None)
            host.peft.set_adapter(TRAIN_ADAPTER)
            host.peft.train()
            for bname, backend in backends.items():
                out[bname] = {
                    "2d_mask": check(host, batch, backend, pad_safe=False),
                    "pad_safe_mask": check(host, batch, backend, pad_safe=True),
                }
            host.peft.eval()
        ledger = PrivacyLedger(work / f"{name}.ledger.sqlite", budget=Budget(epsilon=1.0, delta=1e-4))
        rnd = train_round(
            host, ledger, data, site="site-0", run_id="pad-mask-check", round=1, rounds_left=1, global_arrays=None,
            settings=TrainSettings(batch_size=32, learning_rate=1e-2),
        )  # fmt: skip
        out["train_round"] = {"train_loss": rnd.report.train_loss, "steps": rnd.report.steps}
        res["models"][name] = out
        print(name, json.dumps(out, indent=1), flush=True)
    res["versions"] = versions("torch", "transformers", "peft", "opacus")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
