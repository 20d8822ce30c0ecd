"""Where a decode step's time goes: device time per step and CUDA kernels per step of the fast runner.

For each configuration (batch 1; batch 64; batch 64 over three model versions, i.e. base + two
rank-16 adapters) it records the time of one decode step (mean of ``--steps`` back-to-back steps,
CUDA events; for the engine's runner this is ``FastRunner.decode``, host launch included), the
CUDA kernels one eager step launches (torch.profiler) and the top kernels by device time. With
``--old PATH`` (an earlier ``node/serving/fast.py``), the same for that runner: before/after.

Usage: ``python -m bench.serving_profile --old old_fast.py --out profile.json`` (CUDA only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import machine, versions
from bench.serving import add_adapters, build_model, prompts_for
from node.serving import FastRunner, lora_from_peft
from node.serving.sampling import RowSampling

CONFIGS = (("c1", 1, 1), ("c64", 64, 1), ("c64_a3", 64, 3))  # name, batch, model versions


def kernels(fn: Callable[[], Any], top: int = 12) -> dict[str, Any]:
    """CUDA kernels (and copies) that one call of `fn` launches, with the top ones by device time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    dev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by: dict[str, list[float]] = {}
    for e in dev:
        by.setdefault(e.name[:90], []).append(e.device_time)
    ranked = sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "count": len(dev),
        "device_us": round(sum(e.device_time for e in dev), 1),
        "top": [{"name": n, "calls": len(t), "us": round(sum(t), 1)} for n, t in ranked],
    }


def step_ms(fn: Callable[[], Any], steps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / steps, 4)


def new_runner(model: Any, names: Sequence[str], **opts: Any) -> FastRunner:
    runner = FastRunner(model, max_slots=64, max_len=256, **opts)
    for n in names:
        runner.load_adapter(n, lora_from_peft(model, n))
    return runner


def profile_new(runner: FastRunner, batch: int, versions_n: int, prompts: list[list[int]], steps: int) -> Any:
    """Prefill `batch` prompts (timed, with its kernels), then time decode steps; keeps the logits of
    the prefill and of the first decode step (`agreement` compares them across variants)."""
    slots = list(range(batch))
    for s in range(runner.max_slots):
        runner.release(s)
    aids = [s % versions_n for s in slots]

    def prefill() -> None:
        runner.prefill(slots, prompts[:batch], aids, [RowSampling()] * batch)

    prefill_ms = step_ms(prefill, 5)
    prefill_k = kernels(prefill)
    prefill()
    assert runner.last_logits is not None
    seen = [runner.last_logits[:batch].float().clone()]
    runner.decode(slots)
    torch.cuda.synchronize()
    seen.append(runner.last_logits[:batch].float().clone())
    ms = step_ms(lambda: runner.decode(slots), steps)
    live = max(aids)
    width = runner.kv.bucket(max(runner._len[s] for s in slots) + 1)
    with torch.no_grad():
        k = kernels(lambda: runner._decode_rows(batch, width, live, 0))
    return {"step_ms": ms, "kernels": k, "prefill_ms": prefill_ms, "prefill_kernels": prefill_k}, seen


def engine_ttft(runner: FastRunner, prompts: list[list[int]], versions_n: int) -> dict[str, Any]:
    """64 requests submitted together through the Engine (8 new tokens): TTFT and the prefill batches
    the scheduler formed (sizes and host seconds per call)."""
    from bench.serving import ToyTokenizer, engine_run
    from node.serving import Engine

    calls: list[tuple[int, float]] = []
    inner = runner.prefill

    def prefill(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = inner(*a, **kw)
        calls.append((len(a[1]), round(time.perf_counter() - t, 4)))
        return out

    runner.prefill = prefill  # type: ignore[method-assign]
    names = [None, "v1", "v2"][:versions_n]
    try:
        with Engine(runner, ToyTokenizer()) as engine:
            engine_run(engine, prompts, 4, names, together=True)
            calls.clear()
            out = engine_run(engine, prompts, 8, names, together=True)
    finally:
        runner.prefill = inner  # type: ignore[method-assign]
    return {**out, "prefill_calls": calls}


def profile_old(
    mod: Any, model: Any, names: Sequence[str], batch: int, versions_n: int, prompts: Any, steps: int
) -> Any:
    runner = mod.FastRunner(model, max_slots=64, max_len=256)
    for n in names[: versions_n - 1]:
        runner.load_adapter(n, lora_from_peft(model, n))
    slots = list(range(batch))
    aids = [s % versions_n for s in slots]
    logits = runner.prefill(slots, prompts[:batch], aids)
    tokens = logits.argmax(-1).tolist()

    def engine_step() -> None:  # what the old scheduler did per token: decode, then sample on the host
        nonlocal tokens
        tokens = runner.decode(slots, tokens, aids).argmax(-1).tolist()

    ms_engine = step_ms(engine_step, steps)
    width = runner.kv.bucket(max(runner._len[s] for s in slots) + 1)
    ms_graph = step_ms(lambda: runner._graph(batch, width), steps)
    with torch.no_grad():
        k = kernels(lambda: runner._decode_rows(batch, width, runner.lora_on))
    return {"step_ms": ms_engine, "graph_replay_ms": ms_graph, "kernels": k}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--shape", default="r1-distill-1.5b")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--old", type=Path, help="an earlier node/serving/fast.py to compare with")
    ap.add_argument("--out", type=Path, default=Path("serving_profile.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, _ = build_model(args.shape, "cuda")
    prompts = prompts_for(64, args.prompt_tokens, int(model.config.vocab_size))
    peft = add_adapters(model, 2)
    names = ["v1", "v2"]
    res: dict[str, Any] = {
        "benchmark": "serving_profile",
        "machine": machine("cuda"),
        "shape": args.shape,
        "prompt_tokens": args.prompt_tokens,
        "versions": versions("torch", "transformers", "peft"),
        "new": {},
        "old": {},
    }

    def save() -> None:
        res["date"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        res["total_seconds"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))

    variants = {"": {}, "_unfused": {"fused": False}}  # Triton kernels on; the torch path (the reference)
    seen: dict[str, list[torch.Tensor]] = {}
    for suffix, opts in variants.items():
        t = time.perf_counter()
        runner = new_runner(peft, names, **opts)
        res["new"]["build_s" + suffix] = round(time.perf_counter() - t, 1)
        res["new"]["fused_off" + suffix] = runner.fused_off
        res["new"]["lora_kernel_off" + suffix] = runner.lora_kernel_off
        res["new"]["gemv_tiles" + suffix] = runner._gemv_cfg
        res["new"]["gemv_times_ms" + suffix] = runner.gemv_times
        res["new"]["attention_tiles" + suffix] = runner._attn_cfg
        for name, batch, k in CONFIGS:
            res["new"][name + suffix], seen[name + suffix] = profile_new(runner, batch, k, prompts, args.steps)
            print(name + suffix, json.dumps(res["new"][name + suffix])[:600], flush=True)
            save()
        if not suffix:
            for k in (1, 3):
                res["new"][f"engine_c64_a{k}"] = engine_ttft(runner, prompts, k)
                print(f"engine_c64_a{k}", res["new"][f"engine_c64_a{k}"], flush=True)
                save()
        del runner
    agreement: dict[str, Any] = {}
    for name, _, _ in CONFIGS:  # relative L2 error of the Triton path against the torch path (bf16)
        agreement[name] = [
            round(float((a - b).norm() / b.norm()), 5) for a, b in zip(seen[name], seen[name + "_unfused"], strict=True)
        ]
    res["new"]["agreement_prefill_decode_rel_l2"] = agreement
    print("agreement", agreement, flush=True)
    save()
    if args.old:
        spec = importlib.util.spec_from_file_location("old_fast", args.old)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["old_fast"] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        for name, batch, k in CONFIGS:
            try:
                res["old"][name] = profile_old(mod, peft, names, batch, k, prompts, args.steps)
            except Exception as exc:  # the comparison must not lose the new figures
                res["old"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, "old", json.dumps(res["old"][name])[:600], flush=True)
            save()
    save()
    return res


if __name__ == "__main__":
    main()
