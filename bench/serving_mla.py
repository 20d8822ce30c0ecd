"""Serving benchmark for DeepSeek's own architecture (MLA + MoE): the engine's MLA runner vs HF at its best.

One seeded random-init DeepSeek-V2-Lite-shaped model (bf16, built directly on the device), random
prompts of exactly ``--prompt-tokens`` tokens, ``--new-tokens`` generated per request (EOS ignored).
The measurement helpers are bench/serving.py's (read bandwidth, engine runs, HF ``generate``, spreads).

* ``floor``: the active-parameter floor at batch 1 = the bytes one decode step reads / the read
  bandwidth measured in the same run. Bytes = every weight a step reads: attention projections and
  norms of every layer, the dense first layer's MLP, per MoE layer the router, the shared experts and
  the k routed experts a token picks (not all E), the final norm and the LM head, one embedding row
  (not the table), and the latent KV cache (kv_lora_rank + qk_rope_head_dim per token and layer) at
  the run's mean context. ``floor_c{N}`` is the same bound at N rows: the expected number of distinct
  experts N tokens pick (E (1 - (1 - k/E)^N) under uniform routing, which random weights give; 63.9
  of 64 at N = 64) times their bytes, + N embedding rows and caches; N x bandwidth / bytes;
* ``engine_c{N}`` / ``engine_c{N}_a{K}``: bench/serving.py's engine runs through ``make_runner`` (the
  MLA runner, graphs captured at load), K model versions = base + K-1 rank-16 LoRA adapters on the MLA
  projections (q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) round-robin in one running batch;
* ``hf_c{N}_eager`` (dynamic cache), ``hf_c{N}_static`` (static cache, no compile),
  ``hf_c{N}_static_compile`` (static cache, transformers compiling the decode step with
  reduce-overhead: CUDA graphs): ``model.generate`` one request at a time (N = 1) or as one static batch
  of N; HF's experts use its default ``grouped_mm``. A failure is recorded and the others stand; the
  best median at each concurrency is the denominator of every engine/HF ratio;
* ``--check-greedy``: the engine's greedy tokens against HF's: sequences equal token for token, and,
  teacher-forced on the engine's own sequence (so one near-tie does not cascade), how often the
  engine's token is HF's argmax and by how many logits HF prefers its own where not. On the GPU in
  bf16 a near-tie may flip; with ``--check-dtype float32`` (a few layers, same widths) the tokens must
  match exactly.

Each throughput and ratio is the median of ``--repeats`` (>= 5) runs with min and max. The JSON is
rewritten after each method; ``--part engine|hf|all`` splits a run so each command stays short, and
``--merge a.json b.json --out c.json`` joins the parts and recomputes the goals (batch-1 >= 0.6 of the
floor, 64 concurrent >= 20x HF's best). ``--quick``: a tiny shape on the CPU, every method, seconds.

H100 (each command well under 8 min; the JSONs under $OUT; then merge them here):
``python -m bench.serving_mla --part engine --time-budget-s 400 --out $OUT/mla_engine.json``
``python -m bench.serving_mla --part hf --hf eager --out $OUT/mla_hf_eager.json``
``python -m bench.serving_mla --part hf --hf static --out $OUT/mla_hf_static.json``
``python -m bench.serving_mla --part hf --hf static_compile --concurrency 1 --out $OUT/mla_hf_compile1.json``
``python -m bench.serving_mla --part hf --hf static_compile --concurrency 64 --out $OUT/mla_hf_compile64.json``
``python -m bench.serving_mla --check-greedy --prompt-tokens 64 --new-tokens 32 --out $OUT/mla_greedy.json``
``python -m bench.serving_mla --check-greedy --check-dtype float32 --prompt-tokens 64 --new-tokens 32 \\``
``--out $OUT/mla_greedy_fp32.json``
``python -m bench.serving_mla --merge mla_engine.json mla_hf_*.json mla_greedy.json --out serving_mla.json``
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.common import Recorder, machine, recorder, versions, write_results
from bench.serving import (
    ToyTokenizer,
    _med,
    add_adapters,
    engine_run,
    hf_generate,
    peak_gb,
    prompts_for,
    ratio_spread,
    read_bandwidth,
    repeated,
    reset_memory,
)
from node.serving import Engine, SamplingParams, lora_from_peft, make_runner

YARN = {  # DeepSeek-V2-Lite's rope_scaling
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "rope_theta": 10000.0,
}
V2_LITE: dict[str, Any] = {  # deepseek-ai/DeepSeek-V2-Lite: 15.7B parameters, 2.4B active
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": False,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840,
    "rope_parameters": YARN,
    "tie_word_embeddings": False,
}
SHAPES: dict[str, dict[str, Any]] = {
    "v2-lite": V2_LITE,
    "v2-lite-4l": {**V2_LITE, "num_hidden_layers": 4},  # the float32 exactness check: same widths, 4 layers
    "tiny-v2": {  # the CPU smoke shape (--quick)
        **V2_LITE,
        "vocab_size": 2048,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope_parameters": {**YARN, "factor": 4.0, "original_max_position_embeddings": 64},
        "max_position_embeddings": 512,
    },
}
GOAL_C1_OVER_FLOOR = 0.6
GOAL_TOP_OVER_HF = 20.0


def build_model(shape: str, device: str, dtype: torch.dtype | None = None) -> Any:
    """Seeded random weights (HF's init), built on `device` directly: bf16 on CUDA, fp32 on the CPU."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    torch.manual_seed(0)
    cfg = DeepseekV2Config(**SHAPES[shape])
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def expected_experts(experts: int, k: int, rows: int) -> float:
    """Distinct experts `rows` tokens pick (k each, uniform routing): E (1 - (1 - k/E)^rows)."""
    return experts * (1 - (1 - k / experts) ** rows)


def mla_decode_bytes(model: Any, *, context: float, batch: int = 1) -> dict[str, Any]:
    """Bytes one decode step of `batch` rows reads (see the module docstring): the active-parameter count."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    elem = emb.element_size()
    experts, k = int(cfg.n_routed_experts), int(cfg.num_experts_per_tok)
    active = min(float(k * batch), expected_experts(experts, k, batch))
    routed = other = 0
    for name, p in model.named_parameters():
        if p is emb:
            continue
        if ".experts." in name:
            routed += p.numel()
        else:
            other += p.numel()
    routed_read = routed * active / experts
    rows = emb.shape[1] * batch
    kv_per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    params = {
        "all": other + routed + emb.numel(),
        "routed_experts": routed,
        "read_per_step": round(other + routed_read + rows),
    }
    weight_bytes = (other + routed_read + rows) * elem
    kv_bytes = kv_per_token * elem * context * batch
    return {
        "batch": batch,
        "parameters": params,
        "active_experts_per_moe_layer": round(active, 2),
        "weight_bytes": round(weight_bytes),
        "kv_bytes_per_token": kv_per_token * elem,
        "context_tokens": context,
        "kv_bytes": round(kv_bytes),
        "total_bytes": round(weight_bytes + kv_bytes),
    }


def floor_at(model: Any, *, context: float, batch: int, gb_per_s: float) -> dict[str, Any]:
    read = mla_decode_bytes(model, context=context, batch=batch)
    bw = gb_per_s * 1e9
    return {
        "how": "batch x read bandwidth / bytes a step reads (active parameters, latent KV cache)",
        "tokens_per_s": round(batch * bw / read["total_bytes"], 1),
        "ms_per_step": round(read["total_bytes"] / bw * 1000, 4),
        "decode_gb": round(read["total_bytes"] / 1e9, 4),
        "decode_bytes": read,
    }


# ---- HF -------------------------------------------------------------------------------------


def hf_method(
    kind: str, model: Any, prompts: list[list[int]], new: int, device: str, *, batch: int, repeats: int
) -> dict[str, Any]:
    """One HF configuration: eager (dynamic cache), static (static cache, no compile), static_compile."""
    if kind not in ("eager", "static", "static_compile"):
        raise ValueError(f"unknown HF configuration {kind!r}")
    return hf_generate(
        model,
        prompts,
        new,
        device,
        static=kind != "eager",
        compile_step=kind == "static_compile",
        batch=batch,
        repeats=repeats,
    )


# ---- greedy check -----------------------------------------------------------------------------


def check_greedy(model: Any, prompts: list[list[int]], new: int, device: str, *, max_slots: int) -> dict[str, Any]:
    """The engine's greedy tokens (all prompts in one running batch) against HF `generate` (batch 1).

    Both are then teacher-forced through HF's full forward, in the model's dtype and, for a bf16 or
    fp16 model, once more with the model converted to fp32 in place (last: the model is fp32 after
    this). The fp32 argmax is the unbiased reference, the 1.5B path's standard: HF's own bf16 forward
    shares its kernels and rounding with HF `generate`, so agreement with it flatters HF.
    """
    import threading

    runner = make_runner(model, max_slots=max_slots, max_len=-(-(len(prompts[0]) + new) // 64) * 64)
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    out: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def collect(i: int) -> Callable[[Any], None]:
        def cb(ev: Any) -> None:
            out[i].extend(ev.token_ids)
            if ev.finish_reason is not None:
                done.release()

        return cb

    with Engine(runner, ToyTokenizer()) as engine:
        for i, p in enumerate(prompts):
            engine.submit(p, params, on_event=collect(i))
        for _ in prompts:
            if not done.acquire(timeout=600):
                raise RuntimeError("the engine did not finish the greedy check in 600 s")
    del engine, runner  # the runner's packed expert weights are a copy: freed before the fp32 conversion below
    hf: list[list[int]] = []
    first_diff: list[int | None] = []
    with torch.no_grad():
        for p, ours in zip(prompts, out, strict=True):
            ids = torch.tensor([p], device=device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )
            theirs = [int(t) for t in gen[0, len(p) :]]
            hf.append(theirs)
            first_diff.append(next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None))
    dtype = next(model.parameters()).dtype
    seqs = {"engine": out, "hf": hf}
    same = teacher_forced(model, prompts, seqs, device)
    result: dict[str, Any] = {
        "requests": len(prompts),
        "new_tokens": new,
        "dtype": str(dtype).removeprefix("torch."),
        "sequences_equal": sum(a == b for a, b in zip(out, hf, strict=True)),
        "first_difference_at": first_diff,
        "how": "teacher-forced: HF's full forward over prompt + each one's own tokens; agreement = the share "
        "of positions where that token is the forward's argmax; `fp32_*`: the same with the model in fp32 "
        "(the reference for a bf16/fp16 check: HF generate's share there is the dtype's noise floor)",
        "engine_teacher_forced_agreement": same["engine"]["agreement"],
        "hf_generate_teacher_forced_agreement": same["hf"]["agreement"],
        "engine_disagreement_logit_gaps": same["engine"]["gaps"],
        "logit_std": same["engine"]["logit_std"],
    }
    if dtype != torch.float32:
        if device == "cuda":
            torch.cuda.empty_cache()
        model.float()  # in place, tensor by tensor: peak about the fp32 model (63 GB at V2-Lite)
        ref = teacher_forced(model, prompts, seqs, device)
        result |= {
            "fp32_engine_agreement": ref["engine"]["agreement"],
            "fp32_hf_generate_agreement": ref["hf"]["agreement"],
            "fp32_engine_disagreement_logit_gaps": ref["engine"]["gaps"],
            "fp32_hf_generate_disagreement_logit_gaps": ref["hf"]["gaps"],
        }
    return result | {"engine_tokens": out, "hf_tokens": hf}


def teacher_forced(
    model: Any, prompts: list[list[int]], seqs: dict[str, list[list[int]]], device: str
) -> dict[str, dict[str, Any]]:
    """For each named set of continuations: the share of its tokens that are the model's argmax given
    the prompt and the tokens before, and the logit gaps (argmax minus chosen) where they are not."""
    res: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for who, rows in seqs.items():
            hits = total = 0
            gaps: list[float] = []
            scale = 0.0
            for p, toks in zip(prompts, rows, strict=True):
                logits = model(input_ids=torch.tensor([p + toks], device=device)).logits[0, len(p) - 1 : -1].float()
                chosen = torch.tensor(toks, device=device)
                hit = logits.argmax(dim=-1) == chosen
                hits, total = hits + int(hit.sum()), total + len(toks)
                gap = logits.max(dim=-1).values - logits.gather(1, chosen[:, None])[:, 0]
                gaps += [round(float(g), 4) for g, h in zip(gap, hit, strict=True) if not h]
                scale = max(scale, float(logits.std()))
            res[who] = {"agreement": round(hits / total, 4), "gaps": gaps, "logit_std": round(scale, 4)}
    return res


# ---- goals and merge ----------------------------------------------------------------------------


def best_hf(methods: dict[str, Any], c: int) -> tuple[str | None, dict[str, Any] | None]:
    best: tuple[str | None, dict[str, Any] | None] = (None, None)
    for kind in ("static_compile", "static", "eager"):
        m = methods.get(f"hf_c{c}_{kind}", {})
        tps = _med(m, "tokens_per_s")
        if tps is not None and (best[1] is None or tps > (_med(best[1], "tokens_per_s") or 0)):
            best = (f"hf_c{c}_{kind}", m)
    return best


def goals(res: dict[str, Any]) -> dict[str, Any]:
    m, out = res["methods"], {}
    conc = res.get("concurrency") or [1]
    top = max(conc)
    floor = res.get("floor", {}).get("tokens_per_s")
    one = m.get("engine_c1", {})
    if floor and isinstance(one.get("tokens_per_s"), dict):
        out["c1_over_floor"] = ratio_spread(one["tokens_per_s"]["values"], floor)
        out[f"c1_at_least_{GOAL_C1_OVER_FLOOR}_floor"] = out["c1_over_floor"]["median"] >= GOAL_C1_OVER_FLOOR
    if floor and isinstance(one.get("decode_tokens_per_s"), dict):
        out["c1_decode_over_floor"] = ratio_spread(one["decode_tokens_per_s"]["values"], floor)
    for c in sorted({1, top}):
        name, hf = best_hf(m, c)
        eng = m.get(f"engine_c{c}", {})
        if hf is not None and isinstance(eng.get("tokens_per_s"), dict):
            out[f"c{c}_over_best_hf"] = {
                "hf_method": name,
                **ratio_spread(eng["tokens_per_s"]["values"], hf["tokens_per_s"]["values"]),
            }
    top_floor = res.get(f"floor_c{top}", {}).get("tokens_per_s")
    many = m.get(f"engine_c{top}", {})
    if top_floor and isinstance(many.get("tokens_per_s"), dict):
        out[f"c{top}_over_floor_c{top}"] = ratio_spread(many["tokens_per_s"]["values"], top_floor)
    if f"c{top}_over_best_hf" in out:
        out[f"c{top}_at_least_{GOAL_TOP_OVER_HF:g}x_best_hf"] = (
            out[f"c{top}_over_best_hf"]["median"] >= GOAL_TOP_OVER_HF
        )
        name, hf = best_hf(m, top)
        if hf is not None and top_floor:
            out[f"c{top}_floor_over_best_hf"] = round(top_floor / (_med(hf, "tokens_per_s") or 1), 2)
    mixed = m.get(f"engine_c{top}_a3", {})
    if isinstance(many.get("tokens_per_s"), dict) and isinstance(mixed.get("tokens_per_s"), dict):
        out["three_versions_over_single"] = ratio_spread(
            mixed["tokens_per_s"]["values"], many["tokens_per_s"]["values"]
        )
    return out


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """Join the parts of one benchmark (engine, HF) into one result; the first part with a floor gives it."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res: dict[str, Any] = {**parts[0], "methods": {}, "merged_from": [str(p) for p in paths]}
    for part in parts:
        for key, value in part.items():
            if key.startswith("floor") and key not in res:
                res[key] = value
        res["methods"].update(part.get("methods", {}))
        res["concurrency"] = sorted({*res.get("concurrency", []), *part.get("concurrency", [])})
        for key in ("check_greedy",):
            if key in part:
                res[key] = part[key]
    res["goals"] = goals(res)
    return res


# ---- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="v2-lite")
    ap.add_argument("--part", choices=("all", "engine", "hf"), default="all")
    ap.add_argument("--concurrency", default="1,64", help="comma list; 1 = one request at a time")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--adapters", default="1,3", help="model versions at the largest concurrency (1 = base only)")
    ap.add_argument("--sequential-requests", type=int, default=4, help="requests for engine_c1")
    ap.add_argument("--repeats", type=int, default=5, help="measured runs of every method (>= 5 for a report)")
    ap.add_argument("--hf", default="eager,static,static_compile", help="HF configurations")
    ap.add_argument("--check-greedy", action="store_true", help="compare greedy tokens with HF instead of timing")
    ap.add_argument("--check-dtype", choices=("bfloat16", "float32"), default=None)
    ap.add_argument("--check-requests", type=int, default=8)
    ap.add_argument("--time-budget-s", type=float, default=None, help="skip methods not started by then")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, few tokens")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="join result files (then only --out)")
    ap.add_argument("--out", type=Path, default=Path("serving_mla.json"))
    args = ap.parse_args(argv)
    if args.merge:
        joined = merge(args.merge)
        args.out.write_text(json.dumps(joined, indent=2))
        print(json.dumps(joined["goals"], indent=2))
        return joined
    if args.quick:
        args.device, args.shape, args.concurrency = "cpu", "tiny-v2", "1,2"
        args.prompt_tokens, args.new_tokens, args.sequential_requests = 8, 4, 2
        args.check_requests = 3
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    if args.check_greedy:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(args.check_dtype or "")
        shape = "v2-lite-4l" if dtype == torch.float32 and args.shape == "v2-lite" else args.shape
        model = build_model(shape, args.device, dtype)
        prompts = prompts_for(args.check_requests, args.prompt_tokens, int(model.config.vocab_size))
        check = check_greedy(model, prompts, args.new_tokens, args.device, max_slots=len(prompts))
        checked: dict[str, Any] = {
            "benchmark": "serving_mla_check_greedy",
            "machine": machine(args.device),
            "shape": shape,
            "check_greedy": check,
            "versions": versions("torch", "transformers", "peft", "triton"),
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "total_seconds": round(time.perf_counter() - t0, 1),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(checked, indent=2))
        print(json.dumps({k: v for k, v in check.items() if not k.endswith("_tokens")}, indent=2))
        return checked

    conc = sorted({int(c) for c in args.concurrency.split(",")})
    top = conc[-1]
    model = build_model(args.shape, args.device)
    log(f"model {args.shape} on {args.device}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters")
    vocab = int(model.config.vocab_size)
    prompts = prompts_for(max(top, args.sequential_requests), args.prompt_tokens, vocab)
    context = args.prompt_tokens + args.new_tokens / 2
    rb = read_bandwidth(args.device)
    res: dict[str, Any] = {
        "benchmark": "serving_mla",
        "part": args.part,
        "machine": machine(args.device),
        "device": args.device,
        "shape": args.shape,
        "config": {k: v for k, v in SHAPES[args.shape].items()},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "concurrency": conc,
        "repeats": args.repeats,
        "read_bandwidth": rb,
        "floor": floor_at(model, context=context, batch=1, gb_per_s=rb["gb_per_s"]),
        "methods": {},
        "versions": versions("torch", "transformers", "peft", "numpy", "triton"),
    }
    for c in conc[1:]:
        res[f"floor_c{c}"] = floor_at(model, context=context, batch=c, gb_per_s=rb["gb_per_s"])

    def save() -> None:
        res["goals"] = goals(res)
        write_results(res, args.out, t0=t0)

    record = recorder(res, t0=t0, budget_s=args.time_budget_s, log=log, save=save)

    log(f"floor {res['floor']['tokens_per_s']} tok/s at {rb['gb_per_s']} GB/s read")
    new, reps = args.new_tokens, args.repeats
    max_len = -(-(args.prompt_tokens + new) // 64) * 64
    if args.part in ("all", "engine"):
        run_engine(args, model, prompts, conc, record, log, max_len)
    if args.part in ("all", "hf"):
        reset_memory(args.device)
        for kind in [h for h in args.hf.split(",") if h]:
            for c in conc:
                ps = prompts[:1] if c == 1 else prompts[:c]
                record(f"hf_c{c}_{kind}", partial(hf_method, kind, model, ps, new, args.device, batch=c, repeats=reps))
    save()
    print(json.dumps({k: res[k] for k in ("machine", "goals")}, indent=2))
    return res


def run_engine(
    args: argparse.Namespace,
    model: Any,
    prompts: list[list[int]],
    conc: list[int],
    record: Recorder,
    log: Callable[[str], None],
    max_len: int,
) -> None:
    """engine_c{N} for every N, then with adapters engine_c{top}_a{K}, each through make_runner."""
    top, new, reps = conc[-1], args.new_tokens, args.repeats
    versions_n = sorted({int(a) for a in args.adapters.split(",")})

    def measure(served: Any, adapters_for: dict[int, list[str | None]], only_top: bool) -> None:
        reset_memory(args.device)
        t = time.perf_counter()
        runner: Any = make_runner(served, max_slots=top, max_len=max_len)  # as node.service.Serving does
        extra: dict[str, Any] = {"runner": type(runner).__name__, "runner_build_s": round(time.perf_counter() - t, 1)}
        loaded = sorted({a for names in adapters_for.values() for a in names if a})
        if loaded:
            t = time.perf_counter()
            runner.sync_adapters(loaded, {n: lora_from_peft(served, n) for n in loaded})  # as Serving does
            extra["adapters_load_s"] = round(time.perf_counter() - t, 1)
        extra["engine_weight_gb"] = round(runner.weight_bytes() / 1e9, 3)
        extra["kv_cache_gb"] = round(runner.kv.nbytes() / 1e9, 4)
        extra["graphs"] = len(getattr(runner, "_graphs", {}))
        for key in (
            "kernels_off",
            "fused_off",
            "lora_kernel_off",
            "prefill_graphs_off",
            "moe_path",
            "moe_times",
            "attn_split",
            "attn_times",
            "gemv_times",
            "tune_s",
        ):
            if hasattr(runner, key):
                extra[key] = getattr(runner, key)
        with Engine(runner, ToyTokenizer()) as engine:
            for c in conc:
                if only_top and c != top:
                    continue
                for k, names in sorted(adapters_for.items()):
                    n = args.sequential_requests if c == 1 else c

                    def one(c: int = c, n: int = n, names: list[str | None] = names) -> dict[str, Any]:
                        engine_run(engine, prompts[: min(n, c)], 4, names, together=c > 1)  # warm-up
                        engine_run(engine, prompts[:n], new, names, together=c > 1)
                        out = repeated(lambda: engine_run(engine, prompts[:n], new, names, together=c > 1), reps)
                        return {**out, "peak_memory_gb": peak_gb(args.device), **extra}

                    record(f"engine_c{c}" + (f"_a{k}" if k > 1 else ""), one)

    try:
        measure(model, {1: [None]}, only_top=False)
        multi = [k for k in versions_n if k > 1]
        if multi:
            peft = add_adapters(model, max(multi) - 1)
            measure(peft, {k: [None, *(f"v{i}" for i in range(1, k))] for k in multi}, only_top=True)
            peft.unload()
    except Exception as exc:  # e.g. out of memory building a runner: keep what was measured
        why = f"{type(exc).__name__}: {exc}"
        log(f"engine failed: {why}")
        record("engine", lambda: {"error": why})


if __name__ == "__main__":
    main()
