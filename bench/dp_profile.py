"""Where a DP step's time goes: forward+backward vs optimizer step, per method, plus a profiler table.

Companion to bench/dp_training.py (same model, batch and methods); prints, writes nothing.
Usage: ``python -m bench.dp_profile --device cuda --shape r1-distill-1.5b``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.dp_training import ADAPTER, build_batch, build_model, method, sync


def phases(name: str, model: object, batch: dict[str, torch.Tensor], device: str, steps: int) -> dict[str, float]:
    with method(name, model, batch) as m:
        fb, opt = [], []
        for i in range(steps + 2):
            sync(device)
            t0 = time.perf_counter()
            m.backward()
            sync(device)
            t1 = time.perf_counter()
            m.optimizer.step()
            sync(device)
            t2 = time.perf_counter()
            if i >= 2:
                fb.append(t1 - t0)
                opt.append(t2 - t1)
    return {"fwd_bwd_s": statistics.median(fb), "opt_step_s": statistics.median(opt)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="r1-distill-1.5b")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.shape, args.device, dtype, 16, 32)
    vocab = model.get_base_model().config.vocab_size  # type: ignore[operator]
    batch = build_batch(vocab, 8, 512 if args.shape != "tiny" else 64, 128 if args.shape != "tiny" else 16, args.device)
    for name in ("nonprivate", "opacus", "ours"):
        timing = phases(name, model, batch, args.device, args.steps)
        print(name, {k: round(v, 4) for k, v in timing.items()}, flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with method("ours", model, batch) as m:
        for _ in range(2):
            m.step()
        sync(args.device)
        with torch.profiler.profile(activities=activities) as prof:
            m.step()
            sync(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    _ = ADAPTER


if __name__ == "__main__":
    main()
