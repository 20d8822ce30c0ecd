"""Where a DP step's time goes: forward+backward vs optimizer step, host vs device, per method.

Companion to bench/dp_training.py (same model, batch and methods). For each method, after warm-up:

* ``fwd_bwd_s`` / ``opt_step_s``: wall time of each phase, device-synchronised (median);
* ``host_fwd_bwd_s`` / ``host_opt_step_s``: time until the phase's Python call returns, before the
  synchronisation (what the host needs to enqueue it): close to the wall time means host-bound;
* ``device_kernels`` / ``device_busy_s``: device operations (kernels, copies, fills) of one profiled
  step and the sum of their durations: the step's work on the device alone.

``python -m bench.dp_profile`` prints them with the top device kernels; ``bench.dp_training
--profile`` stores them in its JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.dp_training import METHODS, build_batch, build_model, method, sync
from node.trainer import per_sample_loss


def _device_time_us(event: Any) -> float:
    value: Any = getattr(event, "self_device_time_total", None)
    return float(getattr(event, "self_cuda_time_total", 0.0) if value is None else value)


def phases(name: str, model: Any, batch: dict[str, torch.Tensor], device: str, steps: int, warmup: int = 2) -> dict:
    """Median wall and host times of forward+backward and of the optimizer step, and one profiled step."""
    with method(name, model, batch) as m:
        times: dict[str, list[float]] = {"fwd_bwd_s": [], "opt_step_s": [], "host_fwd_bwd_s": [], "host_opt_step_s": []}
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            m.optimizer.zero_grad(set_to_none=True)
            per_sample_loss(m.forward, m.batch).mean().backward()
            t1 = time.perf_counter()
            sync(device)
            t2 = time.perf_counter()
            m.optimizer.step()
            t3 = time.perf_counter()
            sync(device)
            t4 = time.perf_counter()
            if i >= warmup:
                for key, value in zip(times, (t2 - t0, t4 - t2, t1 - t0, t3 - t2), strict=True):
                    times[key].append(value)
        res: dict[str, Any] = {k: round(statistics.median(v), 4) for k, v in times.items()}
        if device.startswith("cuda"):
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                m.step()
                sync(device)
            ops = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            ops.sort(key=_device_time_us, reverse=True)
            res["device_kernels"] = sum(e.count for e in ops)
            res["device_busy_s"] = round(sum(_device_time_us(e) for e in ops) / 1e6, 4)
            res["attention_kernels"] = sorted(
                {e.key[:90] for e in ops if any(w in e.key.lower() for w in ("flash", "fmha", "attention", "cudnn"))}
            )
            res["top_kernels"] = [
                {"name": e.key[:90], "count": e.count, "ms": round(_device_time_us(e) / 1e3, 2)} for e in ops[:12]
            ]
    return res


def profile(model: Any, batch: dict[str, torch.Tensor], device: str, steps: int = 8) -> dict[str, Any]:
    out = {}
    for name in METHODS:
        out[name] = phases(name, model, batch, device, steps)
        brief = {k: v for k, v in out[name].items() if k not in ("top_kernels", "attention_kernels")}
        print(f"profile {name}: {brief}", flush=True)
    for name in ("nonprivate", "ours"):
        print(f"  {name} attention kernels: {out[name].get('attention_kernels')}")
        for k in out[name].get("top_kernels", []):
            print(f"  {name} {k['ms']:8.2f} ms {k['count']:6d}  {k['name']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="r1-distill-1.5b")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.shape, args.device, dtype, 16, 32)
    vocab = model.get_base_model().config.vocab_size  # type: ignore[operator]
    tiny = args.shape == "tiny"
    batch = build_batch(vocab, 8, 64 if tiny else 512, 16 if tiny else 128, args.device)
    profile(model, batch, args.device, args.steps)


if __name__ == "__main__":
    main()
