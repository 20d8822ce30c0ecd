"""DP-SGD step benchmark: non-private LoRA vs Opacus hooks vs FedSeek's LoRA-aware per-sample gradients.

One process, one seeded random-init model with LoRA on the architecture's targets
(``node.model.lora_target_modules``: every Linear of Qwen2), one batch of ``--batch`` records of
``--seq`` tokens, the trainer's loss (``node.trainer.per_sample_loss``: mean cross-entropy over each
record's last ``--answer-tokens`` tokens), AdamW:

* ``nonprivate``: the stock peft model, plain ``loss.backward()`` and ``AdamW.step()``;
* ``opacus``: ``GradSampleModule(grad_sample_mode="hooks")`` + Opacus ``DPOptimizer`` (clip, noise, step);
* ``ours``: ``privacy.lora_dp.LoraGradSampler`` + ``GroupedDPOptimizer`` (Opacus's DPOptimizer, clipping
  batched per tensor shape; Opacus's own noise).

Each method gets ``--warmup`` untimed steps, then ``--steps`` timed ones (device-synchronised); the
median is reported, and the peak of ``torch.cuda.max_memory_allocated`` over the timed steps (GPU
only). ``agreement`` compares the two DP paths' sums of per-sample-clipped gradients on the same
batch, before noise. Shapes: ``r1-distill-1.5b`` (DeepSeek-R1-Distill-Qwen-1.5B, the GPU
benchmark) and ``tiny`` (the same architecture, CPU-sized, a smoke check).

Usage: ``python -m bench.dp_training --device cuda --shape r1-distill-1.5b --out results.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's packages

from bench.common import machine, versions
from node.data import TokenizedExample, collate
from node.model import lora_target_modules
from node.trainer import per_sample_loss
from privacy.lora_dp import GroupedDPOptimizer, LoraGradSampler

QWEN_SHAPES: dict[str, dict[str, Any]] = {
    # DeepSeek-R1-Distill-Qwen-1.5B
    "r1-distill-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
    },
}
METHODS = ("nonprivate", "opacus", "ours")
NOISE_MULTIPLIER = 1.0
ADAPTER = "bench"
GIB = 1024**3


def build_model(shape: str, device: str, dtype: torch.dtype, rank: int, alpha: int) -> Any:
    """Seeded random-init Qwen2 of `shape` on `device` (before peft: opacus#820), LoRA on every Linear."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**QWEN_SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_target_modules(model), init_lora_weights=False)
    return get_peft_model(model, lora, adapter_name=ADAPTER)


def build_batch(vocab: int, batch: int, seq: int, answer: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(batch):
        ids = torch.randint(1, vocab, (seq,), generator=g).tolist()
        rows.append(TokenizedExample(input_ids=ids, labels=[-100] * (seq - answer) + ids[seq - answer :]))
    return {k: v.to(device) for k, v in collate(rows, pad_id=0, left=True).items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Method:
    """One method's model entry point and optimizer (a DPOptimizer for the private ones)."""

    forward: Any
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]

    def backward(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = per_sample_loss(self.forward, self.batch).mean()
        loss.backward()
        return float(loss.detach())

    def step(self) -> float:
        loss = self.backward()
        self.optimizer.step()
        return loss


@contextmanager
def method(name: str, model: Any, batch: dict[str, torch.Tensor]) -> Iterator[Method]:
    """Attach `name`'s per-sample gradient machinery to `model`; detach it and free its state after."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4)
    forward, close = model, (lambda: None)
    if name == "opacus":
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        forward, close = gsm, gsm._close
    elif name == "ours":
        close = LoraGradSampler(model, adapter_name=ADAPTER).close
    if name != "nonprivate":
        optimizer = (GroupedDPOptimizer if name == "ours" else DPOptimizer)(
            optimizer, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=1.0, expected_batch_size=len(batch["input_ids"])
        )
    model.train()
    try:
        yield Method(forward=forward, optimizer=optimizer, batch=batch)
    finally:
        optimizer.zero_grad(set_to_none=True)
        close()
        model.eval()
        for p in params:
            p.grad_sample = p.summed_grad = None  # type: ignore[attr-defined]
        del optimizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(name: str, model: Any, batch: dict[str, torch.Tensor], device: str, warmup: int, steps: int) -> dict:
    """Median step time and peak device memory over `steps` timed steps after `warmup` untimed ones."""
    with method(name, model, batch) as m:
        for _ in range(warmup):
            m.step()
        sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(m.step())
            sync(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None
    return {
        "median_step_s": round(statistics.median(times), 4),
        "step_s": [round(t, 4) for t in times],
        "peak_memory_gib": None if peak is None else round(peak, 3),
        "last_loss": losses[-1],
    }


def measure_rounds(
    names: Sequence[str], model: Any, batch: dict[str, torch.Tensor], device: str, warmup: int, steps: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """`measure` each method in `rounds` interleaved rounds (order reversed every other round), pooled.

    A step here is host-bound (the device idles between launches), so its time follows the host's
    momentary speed; interleaving keeps a slow spell from landing on one method only. Per-round
    medians are kept to show the spread of the ratios.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            runs[name].append(measure(name, model, batch, device, warmup, steps))
            print(f"round {r} {name}: {runs[name][-1]['median_step_s']:.4f} s/step", flush=True)
    out = {}
    for name, rs in runs.items():
        times = [t for r in rs for t in r["step_s"]]
        peaks = [r["peak_memory_gib"] for r in rs if r["peak_memory_gib"] is not None]
        out[name] = {
            "median_step_s": round(statistics.median(times), 4),
            "step_s": times,
            "round_median_step_s": [r["median_step_s"] for r in rs],
            "peak_memory_gib": max(peaks) if peaks else None,
            "last_loss": rs[-1]["last_loss"],
        }
    return out


def clipped_sum(name: str, model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The DP path's sum of per-sample-clipped gradients before noise (DPOptimizer.clip_and_accumulate)."""
    with method(name, model, batch) as m:
        m.backward()
        m.optimizer.clip_and_accumulate()  # type: ignore[attr-defined]
        return [p.summed_grad.detach().float().cpu() for p in m.optimizer.params]  # type: ignore[attr-defined]


def compare(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    """max over tensors of max|ours - ref| / max|ref|, and the l2 relative difference over all tensors."""
    rel = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, ref, strict=True)]
    diff = torch.cat([(a - b).flatten() for a, b in zip(ours, ref, strict=True)])
    total = torch.cat([b.flatten() for b in ref])
    return {"max_rel_diff_per_tensor": max(rel), "rel_diff_l2": float(diff.norm() / total.norm())}


def agreement(model: Any, batch: dict[str, torch.Tensor], *, repeat: bool = False) -> dict[str, Any]:
    """Ours vs Opacus hooks on the same batch; with `repeat`, also each path vs a second run of itself
    (the run-to-run spread of the model's own kernels, the floor any comparison can reach)."""
    ref, ours = clipped_sum("opacus", model, batch), clipped_sum("ours", model, batch)
    res: dict[str, Any] = compare(ours, ref)
    if repeat:
        res["opacus_vs_opacus"] = compare(clipped_sum("opacus", model, batch), ref)
        res["ours_vs_ours"] = compare(clipped_sum("ours", model, batch), ours)
    return res


@contextmanager
def deterministic(*, algorithms: bool = True, math_sdpa: bool = True) -> Iterator[None]:
    """Deterministic kernels where PyTorch has them (warn, not fail, where it has none) and/or the math
    SDPA backend, whose backward has no atomics (flash/cuDNN attention backward accumulate with them)."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(algorithms, warn_only=True)
    try:
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH) if math_sdpa else nullcontext():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def trainable_state(model: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def restore(model: Any, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, saved in zip([p for p in model.parameters() if p.requires_grad], state, strict=True):
            p.copy_(saved)


MARKDOWN_HEADER = (
    "| machine | shape | batch x seq (answer) | rank | non-private s | Opacus hooks s | ours s | Opacus/np time "
    "| ours/np time | peak GiB np / Opacus / ours | Opacus/np mem | ours/np mem | clipped-sum rel diff |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def markdown_row(res: dict[str, Any]) -> str:
    def fmt(x: float | None, spec: str, suffix: str = "") -> str:
        return "n/a" if x is None else format(x, spec) + suffix

    m, r = res["methods"], res["ratios"]
    peaks = " / ".join(fmt(m[k].get("peak_memory_gib"), ".1f") for k in METHODS)
    cells = [
        res["machine"],
        res["shape"],
        f"{res['batch']} x {res['seq']} ({res['answer_tokens']})",
        str(res["rank"]),
        *(fmt(m[k]["median_step_s"], ".3f") for k in METHODS),
        fmt(r["opacus_time"], ".2f", "x"),
        fmt(r["ours_time"], ".2f", "x"),
        peaks,
        fmt(r["opacus_memory"], ".2f", "x"),
        fmt(r["ours_memory"], ".2f", "x"),
        fmt(res.get("agreement_step0", res.get("agreement", {})).get("max_rel_diff_per_tensor"), ".1e"),
    ]
    return "| " + " | ".join(cells) + " |"


def _ratio(methods: dict[str, dict[str, Any]], num: str, key: str) -> float | None:
    a, b = methods[num].get(key), methods["nonprivate"].get(key)
    return None if a is None or not b else round(a / b, 3)


NOTES = [
    "nonprivate = stock peft forward/backward + AdamW; opacus = GradSampleModule(hooks) + DPOptimizer(AdamW); "
    "ours = privacy.lora_dp.LoraGradSampler + GroupedDPOptimizer (a DPOptimizer subclass: per-sample gradients "
    "laid side by side in one (n, D) matrix per dtype, one norm / GEMV for the clipped sum, one noise draw + add, "
    "one division; noise std = noise_multiplier * max_grad_norm as Opacus)",
    "ours casts each distinct LoRA input to fp32 once (q/k/v share one, gate/up another) and saves that copy; "
    "stock peft (nonprivate and opacus) casts and saves an fp32 copy per layer: part of the memory difference "
    "is that, which a non-private step could also adopt",
    "weights are random (seeded), init_lora_weights=False (B non-zero): speed depends on the shape only",
    "the step is host-bound (the device idles between launches), so with --rounds > 1 the methods are measured "
    "in interleaved rounds (order reversed every other round) and the pooled median is reported; round_ratios "
    "are the per-round medians' ratios",
    "agreement: max over tensors of max|ours - opacus| / max|opacus| of the clipped sums (max_grad_norm 1.0), "
    "and the l2 relative difference, on the benchmark batch; opacus_vs_opacus / ours_vs_ours: each path against "
    "a second run of itself (run-to-run spread of the kernels). 'agreement' is measured after the timed noisy "
    "steps (as in earlier runs), 'agreement_step0*' on the initial weights: default kernels, the math SDPA "
    "backend, torch.use_deterministic_algorithms(warn_only), and both",
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", choices=tuple(QWEN_SHAPES), default="r1-distill-1.5b")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="base weights; LoRA factors are fp32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--answer-tokens", type=int, default=128, help="loss positions per record (the trainer's)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method and round")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of --steps timed steps per method")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="also bench.dp_profile's phases and kernel counts (same model)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/dp_training-*.json)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    if not 0 < args.answer_tokens < args.seq:
        ap.error("--answer-tokens must be in (0, --seq)")
    if "nonprivate" not in args.methods:
        args.methods.insert(0, "nonprivate")  # the ratios' denominator
    out = args.out or Path(__file__).parent / "results" / f"dp_training-{args.device}-{args.shape}.json"

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(args.shape, args.device, dtype, args.rank, args.alpha)
    batch = build_batch(model.config.vocab_size, args.batch, args.seq, args.answer_tokens, args.device)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    initial = trainable_state(model)
    methods: dict[str, dict[str, Any]] = {}
    methods = measure_rounds(args.methods, model, batch, args.device, args.warmup, args.steps, args.rounds)
    for name, m in methods.items():
        print(f"{name}: {m['median_step_s']:.4f} s/step, peak {m['peak_memory_gib']} GiB")
    res: dict[str, Any] = {
        "benchmark": "dp_training",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(args.device),
        "device": args.device,
        "shape": args.shape,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "answer_tokens": args.answer_tokens,
        "rank": args.rank,
        "alpha": args.alpha,
        "lora_parameters": n_lora,
        "target_modules": sorted(model.peft_config[ADAPTER].target_modules),
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "methods": {k: methods.get(k, {"skipped": True}) for k in METHODS},
    }
    res["round_ratios"] = {
        f"{k}_time": [
            round(a / b, 3)
            for a, b in zip(
                methods[k]["round_median_step_s"], methods["nonprivate"]["round_median_step_s"], strict=True
            )
        ]
        for k in ("opacus", "ours")
        if k in methods
    }
    res["ratios"] = {
        f"{k}_{what}": _ratio(res["methods"], k, key) if k in methods else None
        for k in ("opacus", "ours")
        for what, key in (("time", "median_step_s"), ("memory", "peak_memory_gib"))
    }
    if not args.skip_agreement:
        res["agreement"] = agreement(model, batch, repeat=True)  # after the timed (noisy) steps
        res["agreement"]["after_steps"] = len(args.methods) * (args.warmup + args.steps) * args.rounds
        restore(model, initial)
        for suffix, algorithms, math_sdpa in (
            ("", False, False),
            ("_math_sdpa", False, True),
            ("_deterministic_algorithms", True, False),
            ("_deterministic", True, True),
        ):
            with deterministic(algorithms=algorithms, math_sdpa=math_sdpa):
                res["agreement_step0" + suffix] = agreement(model, batch, repeat=True)
    if args.profile:
        from bench.dp_profile import profile

        restore(model, initial)
        res["profile"] = profile(model, batch, args.device)
    ours_t, ours_m = res["ratios"]["ours_time"], res["ratios"]["ours_memory"]
    res["goals"] = {
        "ours_time_at_most_1_2x": None if ours_t is None else ours_t <= 1.2,
        "ours_memory_at_most_1_1x": None if ours_m is None else ours_m <= 1.1,
    }
    res["versions"], res["notes"] = versions("torch", "transformers", "peft", "opacus"), NOTES
    res["markdown"] = {"header": MARKDOWN_HEADER, "row": markdown_row(res)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    keys = ("machine", "ratios", "round_ratios", "goals", "agreement")
    print(json.dumps({k: v for k, v in res.items() if k in keys or k.startswith("agreement_")}, indent=2))
    print(MARKDOWN_HEADER)
    print(res["markdown"]["row"])
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
