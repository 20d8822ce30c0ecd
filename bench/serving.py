"""Serving benchmark: the FedSeek engine (node/serving) vs Hugging Face ``generate`` at its best.

One process, one seeded random-init model, random prompts of exactly ``--prompt-tokens`` tokens and
``--new-tokens`` generated per request (EOS ignored, so every method generates the same count):

* ``floor``: the batch-1 decode floor = the bytes one decode step reads / the read bandwidth measured in
  the same run (a read-only reduction over a buffer far larger than L2, best of N). The bytes are every
  weight a step's matmuls read (all layers + norms + the LM head) plus one gathered embedding row plus
  the KV cache read at the mean context of the measured run; the input embedding table is NOT counted
  (a step gathers one row of it), unless it is tied to the LM head (then the head reads all of it);
* ``hf_c1_static_compile`` / ``hf_c{N}_static_compile``: ``model.generate`` with
  ``cache_implementation="static"``, whose decode steps transformers compiles itself on CUDA
  (``CompileConfig(mode="reduce-overhead", dynamic=False)``), batch 1 and one static batch of N (all
  prompts one length, so no padding); ``hf_c1_eager`` / ``hf_c{N}_eager``: the same with the default
  dynamic cache, no compile; ``hf_generate_batch``: transformers' continuous batching with defaults.
  A method that fails records its error and the others stand; the best HF configuration at each
  concurrency is the denominator of every engine/HF ratio;
* ``engine_c{N}``: the engine with N requests submitted together (``engine_c1``: one at a time, in
  sequence); ``engine_c{N}_a{K}``: the same N requests spread round-robin over K model versions
  (base + K-1 LoRA adapters, rank 16 on every linear layer) in the same running batch;
* with ``--int8``: the same engine runs with INT8 weights.

Every method is warmed up (same shapes) and then measured ``--repeats`` times; each throughput, TTFT
and ratio is reported as the median of the repeats with its min and max.

The JSON is rewritten after each method, so a run cut short keeps what finished; ``--time-budget-s``
skips (and records) the methods left once it is spent. Shapes: ``r1-distill-1.5b`` (the GPU
benchmark, fast runner), ``qwen-tiny`` (the fast runner on a CPU-sized Qwen2), ``tiny`` (the
project's tiny DeepSeek-V3: the generic runner).

Usage: ``python -m bench.serving --device cuda --shape r1-distill-1.5b --concurrency 1,64 --adapters 1,3``
``--repeats 5 --out serving.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, versions
from node.serving import Engine, SamplingParams, lora_from_peft, make_runner

QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "r1-distill-1.5b": {  # DeepSeek-R1-Distill-Qwen-1.5B
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    "qwen-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
    },
}
SHAPES = (*QWEN_SHAPES, "tiny")
LORA_RANK = 16


class ToyTokenizer:
    """Random weights emit any id; this renders ids cheaply (the Qwen shapes have no tokenizer here)."""

    eos_token_id = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" t{i}" for i in ids)


def build_model(shape: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer): seeded random weights, bf16 on CUDA, fp32 on the CPU."""
    torch.manual_seed(0)
    if shape == "tiny":
        from node.model import load_model, write_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_model(Path(tmp) / "tiny")
            model, tok = load_model(Path(tmp) / "tiny", device=device)
    else:
        from transformers import AutoModelForCausalLM, Qwen2Config

        cfg = Qwen2Config(**QWEN_SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=4096)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        tok = ToyTokenizer()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


# ---- measurement helpers ------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), best of 10."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n / best


def reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if device == "cuda" else None


def percentile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo = min(1000, vocab // 4)
    return torch.randint(lo, vocab - lo, (n, length), generator=g).tolist()


# ---- the methods --------------------------------------------------------------------------


def hf_sequential(model: Any, prompts: list[list[int]], new: int, device: str) -> dict[str, Any]:
    def gen(p: list[int], n: int) -> int:
        x = torch.tensor([p], device=device)
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
        return int(out.shape[1] - x.shape[1])

    with torch.no_grad():
        gen(prompts[0], 4)  # warm-up
        reset_memory(device)
        sync(device)
        t = time.perf_counter()
        tokens = sum(gen(p, new) for p in prompts)
        sync(device)
    s = time.perf_counter() - t
    return {"requests": len(prompts), "tokens": tokens, "seconds": round(s, 3), "tokens_per_s": round(tokens / s, 1)}


def hf_static(model: Any, prompts: list[list[int]], new: int, device: str) -> dict[str, Any]:
    """One static batch (all prompts the same length: no padding)."""
    x = torch.tensor(prompts, device=device)
    with torch.no_grad():
        model.generate(input_ids=x[:, :8], max_new_tokens=2, do_sample=False)
        reset_memory(device)
        sync(device)
        t = time.perf_counter()
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
        sync(device)
    s = time.perf_counter() - t
    tokens = int((out.shape[1] - x.shape[1]) * x.shape[0])
    return {"requests": len(prompts), "tokens": tokens, "seconds": round(s, 3), "tokens_per_s": round(tokens / s, 1)}


def hf_generate_batch(model: Any, prompts: list[list[int]], new: int, device: str) -> dict[str, Any]:
    """transformers' continuous batching (`generate_batch`), all requests at once."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers version has no generate_batch"}
    cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=[p[:16] for p in prompts[:4]], generation_config=cfg, max_new_tokens=4)  # warm-up
    reset_memory(device)
    sync(device)
    t = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=cfg)
    sync(device)
    s = time.perf_counter() - t
    tokens = sum(len(r.generated_tokens) for r in out.values())
    if tokens == 0:
        raise RuntimeError("generate_batch generated nothing (its requests failed; see its log above)")
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": round(s, 3),
        "tokens_per_s": round(tokens / s, 1),
        "peak_memory_gb": peak_gb(device),
    }


def engine_run(
    engine: Engine, prompts: list[list[int]], new: int, adapters: Sequence[str | None], *, together: bool
) -> dict[str, Any]:
    """Submit every prompt at once (`together`) or one after another; time to the last token."""
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    n = len(prompts)
    first: list[float | None] = [None] * n
    submitted = [0.0] * n
    counts = [0] * n
    done = threading.Semaphore(0)
    errors: list[str] = []

    def on_event(i: int) -> Callable[[Any], None]:
        def cb(ev: Any) -> None:
            if ev.token_ids and first[i] is None:
                first[i] = time.perf_counter()
            counts[i] += len(ev.token_ids)
            if ev.finish_reason is not None:
                if ev.finish_reason == "error":
                    errors.append(str(ev.error))
                done.release()

        return cb

    def submit(i: int) -> None:
        submitted[i] = time.perf_counter()
        engine.submit(prompts[i], params, adapter=adapters[i % len(adapters)], on_event=on_event(i))

    t = time.perf_counter()
    if together:
        for i in range(n):
            submit(i)
        for _ in range(n):
            done.acquire()
    else:
        for i in range(n):
            submit(i)
            done.acquire()
    s = time.perf_counter() - t
    if errors:
        raise RuntimeError(errors[0])
    ttft = [f - s0 for f, s0 in zip(first, submitted, strict=True) if f is not None]
    tokens = sum(counts)
    return {
        "requests": n,
        "tokens": tokens,
        "seconds": round(s, 3),
        "tokens_per_s": round(tokens / s, 1),
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def add_adapters(model: Any, count: int) -> Any:
    """Wrap `model` in peft with `count` random rank-16 adapters (v1, v2, ...) on every linear layer."""
    from peft import LoraConfig, get_peft_model

    from node.model import lora_target_modules

    cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=lora_target_modules(model))
    peft = get_peft_model(model, cfg, adapter_name="v1")
    for k in range(2, count + 1):
        peft.add_adapter(f"v{k}", cfg)
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    return peft.eval()


# ---- report -------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    floor = res.get("floor", {}).get("tokens_per_s")
    lines = [
        "| method | requests | tokens/s | x floor | TTFT p50 ms | TTFT p99 ms | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in res["methods"].items():
        if "tokens_per_s" not in m:
            lines.append(f"| {name} | {m.get('skipped') or m.get('error')} | | | | | |")
            continue
        ratio = f"{m['tokens_per_s'] / floor:.2f}" if floor and m["requests"] and "c1" in name else ""
        cells = [name, m["requests"], m["tokens_per_s"], ratio, m.get("ttft_p50_ms"), m.get("ttft_p99_ms")]
        cells.append(m.get("peak_memory_gb"))
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def goals(res: dict[str, Any], top: int) -> dict[str, Any]:
    m, floor = res["methods"], res.get("floor", {}).get("tokens_per_s")
    one = m.get("engine_c1", {}).get("tokens_per_s")
    many = m.get(f"engine_c{top}", {}).get("tokens_per_s")
    mixed = m.get(f"engine_c{top}_a3", {}).get("tokens_per_s")
    return {
        "c1_over_floor": None if not (one and floor) else round(one / floor, 3),
        "c1_at_least_half_floor": None if not (one and floor) else one >= 0.5 * floor,
        f"c{top}_tokens_per_s": many,
        f"c{top}_at_least_4000": None if many is None else many >= 4000,
        "three_versions_over_single": None if not (mixed and many) else round(mixed / many, 3),
        "three_versions_at_least_0_85": None if not (mixed and many) else mixed >= 0.85 * many,
    }


NOTES = [
    "floor = measured copy bandwidth (2 x bytes / time of a 1 GiB device copy, best of 10) / bytes of all "
    "parameters: every weight read once per generated token at batch 1",
    "every request gets prompt-tokens random ids and generates exactly new-tokens (EOS ignored); tokens/s = "
    "generated tokens / wall time from the first submit to the last token, prefill included; TTFT from "
    "submit to the first token, with all requests submitted at t0 (engine_c1: sequential, one at a time)",
    "engine_cN_aK: the same N requests assigned round-robin to base, v1, ... (K versions) in one running "
    "batch; adapters are rank-16 LoRA on every linear layer, random B",
    "HF baselines run on the same model before it is wrapped in peft; generate_batch uses transformers' "
    "own continuous batching defaults",
    "peak_memory_gb = torch.cuda.max_memory_allocated during that method (model weights included)",
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", choices=SHAPES, default="r1-distill-1.5b")
    ap.add_argument("--concurrency", default="1,64", help="comma list; 1 = one request at a time")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--adapters", default="1,3", help="model versions at the largest concurrency (1 = base only)")
    ap.add_argument("--sequential-requests", type=int, default=4, help="requests for engine_c1")
    ap.add_argument("--hf-requests", type=int, default=2, help="requests for the sequential HF baseline")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--int8", action="store_true", help="also run the engine with INT8 weights")
    ap.add_argument("--out", type=Path, default=Path("serving.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    conc = sorted({int(c) for c in args.concurrency.split(",")})
    versions_n = sorted({int(a) for a in args.adapters.split(",")})
    top = conc[-1]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    model, tok = build_model(args.shape, args.device)
    vocab = int(model.config.vocab_size)
    prompts = prompts_for(max(top, args.sequential_requests, args.hf_requests), args.prompt_tokens, vocab)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(args.device)
    res: dict[str, Any] = {
        "benchmark": "serving",
        "machine": machine(args.device),
        "device": args.device,
        "shape": args.shape,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "concurrency": conc,
        "floor": {
            "copy_gb_per_s": round(bw / 1e9, 1),
            "weight_gb": round(param_bytes / 1e9, 3),
            "tokens_per_s": round(bw / param_bytes, 1),
        },
        "methods": {},
        "versions": versions("torch", "transformers", "peft", "numpy"),
        "notes": NOTES,
    }

    def save() -> None:
        res["goals"] = goals(res, top)
        res["table"] = table(res)
        res["date"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        res["total_seconds"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))

    def record(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            res["methods"][name] = fn()
        except Exception as exc:  # one broken method must not lose the others
            res["methods"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        log(f"{name}: {res['methods'][name]}")
        save()

    log(f"model {args.shape} on {args.device}; floor {res['floor']}")
    new = args.new_tokens
    if not args.skip_hf:
        record("hf_generate", lambda: hf_sequential(model, prompts[: args.hf_requests], new, args.device))
        record("hf_static", lambda: hf_static(model, prompts[:top], new, args.device))
        record("hf_generate_batch", lambda: hf_generate_batch(model, prompts[:top], new, args.device))

    max_len = -(-(args.prompt_tokens + new) // 64) * 64

    def run_engine(suffix: str, served: Any, adapters_for: dict[int, list[str | None]], **opts: Any) -> None:
        reset_memory(args.device)
        t_load = time.perf_counter()
        runner: Any = make_runner(served, max_slots=top, max_len=max_len, **opts)  # as node.service.Serving does
        extra: dict[str, Any] = {"runner_build_s": round(time.perf_counter() - t_load, 1)}
        if hasattr(runner, "load_adapter"):  # the fast runner; the generic one serves peft's adapters directly
            loaded = sorted({a for names in adapters_for.values() for a in names if a})
            t_load = time.perf_counter()
            runner.sync_adapters(loaded, {n: lora_from_peft(served, n) for n in loaded})  # as Serving does
            extra["adapters_load_s"] = round(time.perf_counter() - t_load, 1)
            extra["engine_weight_gb"] = round(runner.weight_bytes() / 1e9, 3)
            extra["fused_batch1"] = runner.fused_off or "on"
            extra["lora_kernel"] = runner.lora_kernel_off or "on"
            extra["gemv_tiles"] = {k: list(v) for k, v in runner._gemv_cfg.items()}
            extra["kv_cache_gb"] = round(runner.kv.nbytes() / 1e9, 3)
        with Engine(runner, tok) as engine:

            def measure(c: int, names: list[str | None]) -> dict[str, Any]:
                n = args.sequential_requests if c == 1 else c
                engine_run(engine, prompts[: min(n, c)], 4, names, together=c > 1)  # warm-up: shapes, graphs
                out = engine_run(engine, prompts[:n], new, names, together=c > 1)
                return {**out, "peak_memory_gb": peak_gb(args.device), **extra}

            for c in conc:
                for k, names in sorted(adapters_for.items()):
                    if k == 1 or c == top:
                        record(f"engine_c{c}" + (f"_a{k}" if k > 1 else "") + suffix, lambda: measure(c, names))  # noqa: B023

    fast = args.shape != "tiny"
    try:
        run_engine("", model, {1: [None]})
        if args.int8 and fast:
            run_engine("_int8", model, {1: [None]}, int8=True)
        multi = [k for k in versions_n if k > 1]
        if multi:
            peft = add_adapters(model, max(multi) - 1)
            run_engine("", peft, {k: [None, *(f"v{i}" for i in range(1, k))] for k in multi})
    except Exception as exc:  # e.g. out of memory building a runner: keep what was measured
        res["methods"]["engine"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"engine failed: {exc}")
    save()
    print(json.dumps({k: res[k] for k in ("machine", "floor", "goals")}, indent=2))
    print(res["table"])
    return res


if __name__ == "__main__":
    main()
