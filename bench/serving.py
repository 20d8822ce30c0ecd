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
from pathlib import Path
from typing import Any

import torch

from bench.common import call_seconds, machine, recorder, versions, write_results
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


def build_model(shape: str, device: str, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): seeded random weights, `dtype` (default bf16 on CUDA, fp32 on the CPU)."""
    torch.manual_seed(0)
    if shape == "tiny":
        from node.model import load_model, write_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_model(Path(tmp) / "tiny")
            model, tok = load_model(Path(tmp) / "tiny", device=device)
    else:
        from transformers import AutoModelForCausalLM, Qwen2Config

        cfg = Qwen2Config(**QWEN_SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=4096)
        dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
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
    """Bytes/s of a large device-to-device copy (read + write counted), best of 10. Kept for reference."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = min(call_seconds(lambda: dst.copy_(src), device, 10))
    return 2 * n / best


def read_bandwidth(device: str, *, repeats: int = 20) -> dict[str, Any]:
    """Bytes/s of read-only passes (a full reduction) over a buffer far larger than the L2 cache.

    A decode step only reads its weights, so this, not a copy, is its ceiling. Two reductions (fp32 and
    bf16 elements) are timed; the floor uses the best single pass of either.
    """
    n_bytes = (2 << 30) if device == "cuda" else (1 << 26)
    out: dict[str, Any] = {"buffer_bytes": n_bytes, "repeats": repeats, "kernels": {}}
    g = torch.Generator(device=device).manual_seed(0)
    for name, dtype in (("sum_fp32", torch.float32), ("sum_bf16_to_fp32", torch.bfloat16)):
        n = n_bytes // torch.tensor([], dtype=dtype).element_size()
        buf = torch.rand(n, generator=g, device=device, dtype=torch.float32).to(dtype)  # never time zeros
        secs = call_seconds(lambda b=buf: b.sum(dtype=torch.float32), device, repeats)  # type: ignore[misc]
        out["kernels"][name] = {
            "best_gb_per_s": round(n_bytes / min(secs) / 1e9, 1),
            "median_gb_per_s": round(n_bytes / statistics.median(secs) / 1e9, 1),
        }
        del buf
    best = max(k["best_gb_per_s"] for k in out["kernels"].values())
    out["gb_per_s"] = best
    return out


def decode_read_bytes(model: Any, *, context: float, batch: int = 1) -> dict[str, Any]:
    """The bytes one decode step reads from `model` at `batch` rows and a KV context of `context` tokens.

    weights = every parameter except the input embedding table (each layer's projections and norms, the
    final norm, the LM head), + one gathered embedding row per sequence; if the LM head is tied to the
    embedding it reads the whole table, so then the table is counted once, in full.
    kv = layers x 2 (K and V) x kv_heads x head_dim x element bytes x context x batch (reads only; the one
    new token's K/V written per step is left out: 28 KB on the 1.5B shape).
    For MoE models every expert is counted, so there the bytes are an upper bound and the floor a lower one.
    """
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    seen: set[int] = set()
    all_bytes = 0
    for p in model.parameters():  # a tied table appears once here
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            all_bytes += p.numel() * p.element_size()
    emb_bytes = emb.numel() * emb.element_size()
    row_bytes = emb.shape[1] * emb.element_size() * batch
    weight_bytes = all_bytes if tied else all_bytes - emb_bytes + row_bytes
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 0 if kv_heads is None else cfg.num_hidden_layers * 2 * kv_heads * head_dim * emb.element_size()
    kv_bytes = per_token * context * batch
    moe = any(getattr(cfg, k, None) for k in ("n_routed_experts", "num_experts", "num_local_experts"))
    return {
        "formula": "bytes = (all parameters - input embedding table + batch x one embedding row, or all "
        "parameters if the LM head is tied) + layers x 2 x kv_heads x head_dim x elem_bytes x context x batch",
        "all_parameters_bytes": all_bytes,
        "embedding_table_bytes": emb_bytes,
        "embedding_rows_bytes": emb_bytes if tied else row_bytes,
        "tied_lm_head": tied,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": per_token,
        "context_tokens": context,
        "kv_bytes": round(kv_bytes),
        "total_bytes": round(weight_bytes + kv_bytes),
        "moe_upper_bound": bool(moe),
    }


def spread(xs: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """Median, min and max of the repeats (and the repeats themselves)."""
    return {
        "median": round(statistics.median(xs), digits),
        "min": round(min(xs), digits),
        "max": round(max(xs), digits),
        "n": len(xs),
        "values": [round(x, digits) for x in xs],
    }


def repeated(fn: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Run a measurement `repeats` times: each numeric metric as its spread, the rest from the last run."""
    runs = [fn() for _ in range(repeats)]
    out: dict[str, Any] = {k: v for k, v in runs[-1].items() if not isinstance(v, float)}
    for key in ("tokens_per_s", "decode_tokens_per_s", "seconds", "ttft_p50_ms", "ttft_p99_ms"):
        xs = [r[key] for r in runs if r.get(key) is not None]
        if xs:
            out[key] = spread(xs, 3 if key == "seconds" else 1 if key == "tokens_per_s" else 2)
    for k, v in runs[-1].items():  # other floats (peak memory, load times) as last measured
        if isinstance(v, float) and k not in out:
            out[k] = v
    return out


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


# ---- the HF baselines ---------------------------------------------------------------------


def hf_generate(
    model: Any,
    prompts: list[list[int]],
    new: int,
    device: str,
    *,
    static: bool,
    batch: int,
    repeats: int,
    compile_step: bool = True,
) -> dict[str, Any]:
    """`model.generate` over `prompts` in static batches of `batch` (one length: no padding needed).

    `static`: `cache_implementation="static"`; on CUDA transformers then compiles the decode step itself
    (reduce-overhead: CUDA graphs), which is HF's documented fastest `generate`, unless `compile_step` is off
    (the static cache alone). Whether it compiled is read back (`_compiled_call`) and recorded, as is a failure.
    """
    from transformers import CompileConfig

    kw: dict[str, Any] = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new}
    compile_step = static and compile_step
    if static:
        kw["cache_implementation"] = "static"
    if compile_step:
        kw["compile_config"] = CompileConfig(mode="reduce-overhead", dynamic=False)
    else:
        kw["disable_compile"] = True
    chunks = [torch.tensor(prompts[i : i + batch], device=device) for i in range(0, len(prompts), batch)]

    def once() -> dict[str, Any]:
        sync(device)
        t = time.perf_counter()
        tokens = 0
        for x in chunks:
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
            tokens += int((out.shape[1] - x.shape[1]) * x.shape[0])
        sync(device)
        s = time.perf_counter() - t
        return {"requests": len(prompts), "tokens": tokens, "seconds": s, "tokens_per_s": tokens / s}

    with torch.no_grad():
        t = time.perf_counter()
        once()  # warm-up with the measured shapes: compiles and captures where it compiles
        warm = time.perf_counter() - t
        reset_memory(device)
        res = repeated(once, repeats)
    compiled = compile_step and hasattr(model, "_compiled_call")  # set by transformers when it compiles
    res.update(
        {
            "batch": batch,
            "cache": "static" if static else "dynamic",
            "compiled": compiled,
            "warmup_s": round(warm, 1),
            "peak_memory_gb": peak_gb(device),
        }
    )
    if compile_step and not compiled:
        res["compile_off"] = f"transformers compiles only on CUDA-like devices (this is {device})"
    return res


def hf_generate_batch(model: Any, prompts: list[list[int]], new: int, device: str, *, repeats: int) -> dict[str, Any]:
    """transformers' continuous batching (`generate_batch`) with its defaults, all requests at once."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers version has no generate_batch"}
    cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=[p[:16] for p in prompts[:4]], generation_config=cfg, max_new_tokens=4)  # warm-up

    def once() -> dict[str, Any]:
        sync(device)
        t = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=cfg)
        sync(device)
        s = time.perf_counter() - t
        tokens = sum(len(r.generated_tokens) for r in out.values())
        if tokens == 0:
            raise RuntimeError("generate_batch generated nothing (its requests failed; see its log above)")
        return {"requests": len(prompts), "tokens": tokens, "seconds": s, "tokens_per_s": tokens / s}

    reset_memory(device)
    res = repeated(once, repeats)
    res["peak_memory_gb"] = peak_gb(device)
    return res


# ---- the engine ---------------------------------------------------------------------------


def engine_run(
    engine: Engine, prompts: list[list[int]], new: int, adapters: Sequence[str | None], *, together: bool
) -> dict[str, Any]:
    """Submit every prompt at once (`together`) or one after another; time to the last token.

    `decode_tokens_per_s`: the tokens after each request's first over the time from its first token to its
    last, both summed over requests: the rate one request sees while decoding. One at a time (`together`
    False) it is the batch-1 decode rate with prefill left out, the number the decode floor bounds; with
    N together it is per request (the batch's aggregate is about N times it), not the throughput.
    """
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    n = len(prompts)
    first: list[float | None] = [None] * n
    last: list[float | None] = [None] * n
    submitted = [0.0] * n
    counts = [0] * n
    done = threading.Semaphore(0)
    errors: list[str] = []

    def on_event(i: int) -> Callable[[Any], None]:
        def cb(ev: Any) -> None:
            if ev.token_ids:
                now = time.perf_counter()
                if first[i] is None:
                    first[i] = now
                last[i] = now
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
    decode_s = sum(b - a for a, b in zip(first, last, strict=True) if a is not None and b is not None)
    decode_tokens = sum(c - 1 for c in counts if c > 0)
    return {
        "requests": n,
        "tokens": tokens,
        "seconds": s,
        "tokens_per_s": tokens / s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
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


def _med(m: dict[str, Any], key: str) -> float | None:
    v = m.get(key)
    return v.get("median") if isinstance(v, dict) else v


def _cell(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    if isinstance(v, dict):
        return f"{v['median']} ({v['min']}-{v['max']})"
    return "" if v is None else str(v)


def ratio_spread(num: Sequence[float], den: Sequence[float] | float) -> dict[str, Any]:
    """Per-repeat ratios (repeat i over repeat i, or over one fixed number) as a spread."""
    dens = [den] * len(num) if isinstance(den, int | float) else list(den)
    k = min(len(num), len(dens))
    return spread([num[i] / dens[i] for i in range(k)], 3)


def best_hf(res: dict[str, Any], batch: int) -> tuple[str | None, dict[str, Any] | None]:
    """The HF method with the highest median tokens/s among those measured at this concurrency."""
    names = [f"hf_c{batch}_static_compile", f"hf_c{batch}_eager"] + (["hf_generate_batch"] if batch > 1 else [])
    best: tuple[str | None, dict[str, Any] | None] = (None, None)
    for n in names:
        m = res["methods"].get(n, {})
        tps = _med(m, "tokens_per_s")
        if tps is not None and (best[1] is None or tps > (_med(best[1], "tokens_per_s") or 0)):
            best = (n, m)
    return best


def goals(res: dict[str, Any], top: int) -> dict[str, Any]:
    m, floor = res["methods"], res.get("floor", {}).get("tokens_per_s")
    out: dict[str, Any] = {}
    one = m.get("engine_c1", {})
    if floor and "tokens_per_s" in one:
        out["c1_over_floor"] = ratio_spread(one["tokens_per_s"]["values"], floor)
        out["c1_at_least_0_85_floor"] = out["c1_over_floor"]["median"] >= 0.85
    if floor and isinstance(one.get("decode_tokens_per_s"), dict):
        out["c1_decode_over_floor"] = ratio_spread(one["decode_tokens_per_s"]["values"], floor)
    many, mixed = m.get(f"engine_c{top}", {}), m.get(f"engine_c{top}_a3", {})
    if "tokens_per_s" in many and "tokens_per_s" in mixed:
        out["three_versions_over_single"] = ratio_spread(
            mixed["tokens_per_s"]["values"], many["tokens_per_s"]["values"]
        )
        out["three_versions_at_least_0_95"] = out["three_versions_over_single"]["median"] >= 0.95
    for key, m_ in ((f"c{top}_ttft_p50_ms", many), (f"c{top}_a3_ttft_p50_ms", mixed)):
        if isinstance(m_.get("ttft_p50_ms"), dict):
            out[key] = m_["ttft_p50_ms"]
            out[key.replace("_ms", "_at_most_30ms")] = m_["ttft_p50_ms"]["median"] <= 30
    for c in sorted({1, top}):
        name, hf = best_hf(res, c)
        eng = m.get(f"engine_c{c}", {})
        if hf is not None and "tokens_per_s" in eng:
            out[f"c{c}_over_best_hf"] = {
                "hf_method": name,
                **ratio_spread(eng["tokens_per_s"]["values"], hf["tokens_per_s"]["values"]),
            }
    return out


def capture_cost(model: Any, *, max_slots: int, max_len: int) -> dict[str, Any]:
    """What building the runner at a `max_len` context costs: wall time of `make_runner` (graph capture
    included), and the device memory it reserves beyond the KV cache (graph pool, workspaces)."""
    cuda = next(model.parameters()).is_cuda
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    before = torch.cuda.memory_reserved() if cuda else 0
    start = time.perf_counter()
    runner: Any = make_runner(model, max_slots=max_slots, max_len=max_len)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    reserved = (torch.cuda.memory_reserved() - before) if cuda else 0
    kv = runner.kv.nbytes() if hasattr(runner, "kv") else 0
    out = {
        "max_len": max_len,
        "max_slots": max_slots,
        "capture_s": round(seconds, 2),
        "graphs": len(getattr(runner, "_graphs", {})) + len(getattr(runner, "_prefill_graphs", {})),
        "kv_cache_bytes": kv,
        "kv_cache_gb": round(kv / 1e9, 3),
        "reserved_gb": round(reserved / 1e9, 3),
        "graphs_and_workspace_gb": round((reserved - kv) / 1e9, 3) if cuda else None,
    }
    del runner
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def table(res: dict[str, Any]) -> str:
    floor = res.get("floor", {}).get("tokens_per_s")
    lines = [
        "| method | requests | tokens/s median (min-max) | x floor | TTFT p50 ms | TTFT p99 ms | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    captures = [m for m in res["methods"].values() if "capture_s" in m]
    for name, m in res["methods"].items():
        if "capture_s" in m:
            continue
        if "tokens_per_s" not in m:
            lines.append(f"| {name} | {m.get('skipped') or m.get('error')} | | | | | |")
            continue
        tps = _med(m, "tokens_per_s")
        ratio = f"{tps / floor:.2f}" if floor and tps and m.get("requests") and "c1" in name else ""
        cells = [name, str(m["requests"]), _cell(m, "tokens_per_s"), ratio]
        cells += [_cell(m, "ttft_p50_ms"), _cell(m, "ttft_p99_ms"), _cell(m, "peak_memory_gb")]
        lines.append("| " + " | ".join(cells) + " |")
    if captures:
        lines += [
            "",
            "| max_len | slots | capture s | graphs | KV cache GB | graphs + workspace GB |",
            "| --- " * 6 + "|",
        ]
        for m in captures:
            cells = [
                m["max_len"],
                m["max_slots"],
                m["capture_s"],
                m["graphs"],
                m["kv_cache_gb"],
                m["graphs_and_workspace_gb"],
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


NOTES = [
    "floor = read bandwidth / decode_bytes.total_bytes: read bandwidth = the best single read-only pass "
    "(a full torch reduction, fp32 or bf16 elements) over a 2 GiB buffer (>> the 50 MB L2), measured in "
    "this run; decode bytes = every weight a decode step's matmuls read (all layers' projections and "
    "norms, the final norm, the LM head) + one gathered embedding row, NOT the input embedding table, + "
    "the KV cache read at the run's mean context (prompt_tokens + new_tokens / 2) at batch 1",
    "every throughput, TTFT and ratio is the median of --repeats measured runs with min and max "
    "(after a warm-up run with the same shapes); ratios are per-repeat (repeat i over repeat i, or over "
    "the one floor) and then summarised the same way",
    "every request gets prompt-tokens random ids and generates exactly new-tokens (EOS ignored); tokens/s = "
    "generated tokens / wall time from the first submit to the last token, prefill included; "
    "decode_tokens_per_s (engine) leaves each request's prefill and first token out and is per request (at "
    "N concurrent the aggregate is about N times it); TTFT from submit to "
    "the first token, with all requests submitted at t0 (engine_c1: sequential, one at a time)",
    "engine_cN_aK: the same N requests assigned round-robin to base, v1, ... (K versions) in one running "
    "batch; adapters are rank-16 LoRA on every linear layer, random B",
    "HF baselines run on the same model before it is wrapped in peft; *_static_compile = generate with "
    "cache_implementation='static', transformers compiling the decode step (reduce-overhead, dynamic=False) "
    "on CUDA; *_eager = the default dynamic cache, compile disabled; hf_generate_batch = transformers' "
    "continuous batching with its defaults; ratios to HF use the best HF method at that concurrency",
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
    ap.add_argument("--hf-requests", type=int, default=1, help="requests for the batch-1 HF baselines")
    ap.add_argument("--repeats", type=int, default=5, help="measured runs of every method (>= 5 for a report)")
    ap.add_argument(
        "--hf", default="static_compile,eager", help="HF configurations: static_compile, eager, generate_batch"
    )
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--time-budget-s", type=float, default=None, help="skip methods not started by then")
    ap.add_argument("--int8", action="store_true", help="also run the engine with INT8 weights")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="weights on CUDA")
    ap.add_argument(
        "--capture-contexts",
        default="",
        help="comma list of max_len: build the runner at each and record capture time and graph memory",
    )
    ap.add_argument("--out", type=Path, default=Path("serving.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    conc = sorted({int(c) for c in args.concurrency.split(",")})
    versions_n = sorted({int(a) for a in args.adapters.split(",")})
    hf_kinds = [h for h in args.hf.split(",") if h]
    top = conc[-1]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    model, tok = build_model(args.shape, args.device, getattr(torch, args.dtype) if args.device == "cuda" else None)
    vocab = int(model.config.vocab_size)
    prompts = prompts_for(max(top, args.sequential_requests, args.hf_requests), args.prompt_tokens, vocab)
    context = args.prompt_tokens + args.new_tokens / 2  # mean KV length over the measured decode steps
    read = decode_read_bytes(model, context=context)
    rb = read_bandwidth(args.device)
    copy = copy_bandwidth(args.device)
    bw = rb["gb_per_s"] * 1e9
    res: dict[str, Any] = {
        "benchmark": "serving",
        "machine": machine(args.device),
        "device": args.device,
        "shape": args.shape,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "concurrency": conc,
        "repeats": args.repeats,
        "floor": {
            "how": "decode_bytes.total_bytes / read_bandwidth.gb_per_s (both measured in this run)",
            "read_gb_per_s": rb["gb_per_s"],
            "decode_gb": round(read["total_bytes"] / 1e9, 4),
            "tokens_per_s": round(bw / read["total_bytes"], 1),
            "ms_per_token": round(read["total_bytes"] / bw * 1000, 4),
            "old_floor_tokens_per_s": round(copy / read["all_parameters_bytes"], 1),
            "old_floor_how": "all parameters' bytes / copy bandwidth (superseded: counts the embedding table "
            "a step does not read and uses copy, not read, bandwidth)",
        },
        "decode_bytes": read,
        "read_bandwidth": rb,
        "copy_gb_per_s": round(copy / 1e9, 1),
        "methods": {},
        "versions": versions("torch", "transformers", "peft", "numpy", "triton"),
        "notes": NOTES,
    }

    def save() -> None:
        res["goals"] = goals(res, top)
        res["table"] = table(res)
        write_results(res, args.out, t0=t0)

    record = recorder(res, t0=t0, budget_s=args.time_budget_s, log=log, save=save)

    log(f"model {args.shape} on {args.device}; floor {res['floor']}")
    new, reps = args.new_tokens, args.repeats
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
            extra["engine_weight_gb"] = round(runner.weight_bytes() / 1e9, 4)
            extra["fused_batch1"] = runner.fused_off or "on"
            extra["lora_kernel"] = runner.lora_kernel_off or "on"
            extra["kv_cache_gb"] = round(runner.kv.nbytes() / 1e9, 3)
        with Engine(runner, tok) as engine:

            def measure(c: int, names: list[str | None]) -> dict[str, Any]:
                n = args.sequential_requests if c == 1 else c
                engine_run(engine, prompts[: min(n, c)], 4, names, together=c > 1)  # warm-up: shapes, graphs
                engine_run(engine, prompts[:n], new, names, together=c > 1)
                out = repeated(lambda: engine_run(engine, prompts[:n], new, names, together=c > 1), reps)
                return {**out, "peak_memory_gb": peak_gb(args.device), **extra}

            for c in conc:
                for k, names in sorted(adapters_for.items()):
                    if k == 1 or c == top:
                        record(f"engine_c{c}" + (f"_a{k}" if k > 1 else "") + suffix, lambda: measure(c, names))  # noqa: B023

    fast = args.shape != "tiny"
    # The engine first: its numbers are the point; the HF baselines follow under the same time budget.
    try:
        run_engine("", model, {1: [None]})
        if args.int8 and fast:
            run_engine("_int8", model, {1: [None]}, int8=True)
        multi = [k for k in versions_n if k > 1]
        if multi:
            peft = add_adapters(model, max(multi) - 1)
            run_engine("", peft, {k: [None, *(f"v{i}" for i in range(1, k))] for k in multi})
            model = peft.unload()  # the HF baselines run on the plain model (unload drops the adapters)
    except Exception as exc:  # e.g. out of memory building a runner: keep what was measured
        res["methods"]["engine"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"engine failed: {exc}")
    for ctx in sorted({int(c) for c in args.capture_contexts.split(",") if c}):
        record(f"capture_ctx{ctx}", lambda ctx=ctx: capture_cost(model, max_slots=top, max_len=ctx))  # type: ignore[misc]
    reset_memory(args.device)
    if not args.skip_hf:
        for kind in hf_kinds:
            for c in conc:
                if kind == "generate_batch":
                    if c == top and top > 1:
                        record(
                            "hf_generate_batch",
                            lambda: hf_generate_batch(model, prompts[:top], new, args.device, repeats=reps),
                        )
                    continue
                ps = prompts[: args.hf_requests] if c == 1 else prompts[:c]
                static = kind == "static_compile"
                record(
                    f"hf_c{c}_{kind}",
                    lambda ps=ps, c=c, static=static: hf_generate(  # type: ignore[misc]
                        model, ps, new, args.device, static=static, batch=c, repeats=reps
                    ),
                )
    save()
    print(json.dumps({k: res[k] for k in ("machine", "floor", "goals")}, indent=2))
    print(res["table"])
    return res


if __name__ == "__main__":
    main()
