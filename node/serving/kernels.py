"""Fused Triton kernels for the batch-1 decode step (CUDA only; the torch path is the reference).

At batch 1 a decode step reads every weight once and each kernel costs a few microseconds of
launch and ramp, so the step is bound by bytes AND by kernel count. These kernels cut a layer to
five launches: RMSNorm fused into the q/k/v and gate/up matrix-vector products (each program
recomputes the norm of the 1536-wide input, which sits in L2), rotary + KV-cache write + attention
in one kernel per layer, SwiGLU fused into the down projection's input, residual adds fused into
the o/down outputs. `available()` compiles and checks each kernel against the torch path once;
the runner uses them only if that passes. Tile sizes are picked per weight shape by timing a few
candidates at load (`tune_gemv`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the runner keeps the torch path
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        w_ptr,
        x_ptr,
        out_ptr,
        bias_ptr,
        ln_ptr,
        N,
        K,
        eps,
        HAS_BIAS: tl.constexpr,
        NORM: tl.constexpr,
        SWIGLU: tl.constexpr,
        RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[n] (+)= sum_k w[n, k] * in[k] (+ bias[n]); in = x, rmsnorm(x) * ln, or silu(x[:K]) * x[K:]."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        cols = tl.arange(0, BLOCK_K)
        rstd = 1.0
        if NORM:
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xs = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                sq += xs * xs
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            kmask = kk < K
            if SWIGLU:
                g = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + kk, mask=kmask, other=0.0).to(tl.float32)
                xin = g / (1.0 + tl.exp(-g)) * u
            else:
                xin = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            if NORM:
                xin = xin * rstd * tl.load(ln_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * xin[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if RESIDUAL:
            y += tl.load(out_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _attention_kernel(
        qkv_ptr,
        qkv_stride,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        k_ptr,
        v_ptr,
        c_slot,
        c_head,
        c_pos,
        out_ptr,
        out_stride,
        scale,
        H: tl.constexpr,
        KV: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """Row b, KV head h: rotary on q and k, write k and v at `pos`, attend over keys 0..pos."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(pos_ptr + b)
        d = tl.arange(0, D)
        partner = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        row = qkv_ptr + b * qkv_stride
        k = tl.load(row + (H + h) * D + d).to(tl.float32)
        kp = tl.load(row + (H + h) * D + partner).to(tl.float32)
        k_new = (k * cos + sign * kp * sin).to(k_ptr.dtype.element_ty)
        v_new = tl.load(row + (H + KV + h) * D + d)
        base = b * c_slot + h * c_head
        tl.store(k_ptr + base + pos * c_pos + d, k_new)
        tl.store(v_ptr + base + pos * c_pos + d, v_new)

        g = tl.arange(0, GP)
        gmask = g < G
        qoff = (h * G + g)[:, None] * D
        q = tl.load(row + qoff + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        qp = tl.load(row + qoff + partner[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        q = (q * cos[None, :] + sign[None, :] * qp * sin[None, :]).to(k_ptr.dtype.element_ty)

        # the new key from registers (no read-after-write through memory), then the cached ones
        m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
        l_i = tl.zeros([GP], dtype=tl.float32) + 1.0
        acc = tl.zeros([GP, D], dtype=tl.float32) + v_new.to(tl.float32)[None, :]
        w = tl.arange(0, BLOCK_W)
        for start in range(0, pos, BLOCK_W):
            wmask = start + w < pos
            kt = tl.load(k_ptr + base + (start + w)[:, None] * c_pos + d[None, :], mask=wmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kt)) * scale
            s = tl.where(wmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            vt = tl.load(v_ptr + base + (start + w)[:, None] * c_pos + d[None, :], mask=wmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(out_ptr + b * out_stride + qoff + d[None, :], o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


GEMV_CONFIGS = (
    (2, 2048, 8),
    (4, 1024, 4),
    (4, 2048, 8),
    (8, 512, 4),
    (8, 1024, 4),
    (16, 512, 4),
    (16, 1024, 8),
    (32, 256, 4),
    (32, 512, 8),
    (64, 256, 8),
)
"""(BLOCK_N, BLOCK_K, num_warps) candidates; `tune_gemv` keeps the fastest per weight shape."""
ATTENTION_CONFIGS = ((64, 4), (32, 4), (128, 8))
"""(BLOCK_W keys per iteration, num_warps) candidates for `attention`."""


def gemv(
    w: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    cfg: tuple[int, int, int],
    bias: torch.Tensor | None = None,
    ln: torch.Tensor | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
    residual: bool = False,
) -> torch.Tensor:
    """out [N] (+)= w [N, K] @ f(x), f per the flags (see `_gemv_kernel`); x and out contiguous, batch 1."""
    n, k = w.shape
    block_n, block_k, warps = cfg
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        w,
        x,
        out,
        bias if bias is not None else w,
        ln if ln is not None else w,
        n,
        k,
        eps,
        HAS_BIAS=bias is not None,
        NORM=ln is not None,
        SWIGLU=swiglu,
        RESIDUAL=residual,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out


def attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    out: torch.Tensor,
    *,
    heads: int,
    kv_heads: int,
    cfg: tuple[int, int] = ATTENTION_CONFIGS[0],
) -> torch.Tensor:
    """Decode attention for rows 0..B-1: qkv [B, (H + 2 KV) D] (row-strided ok), cache [S, KV, L, D],
    cos/sin [L, D], pos [B]; writes k/v at pos and out [B, H D]."""
    batch = qkv.shape[0]
    d = keys.shape[-1]
    g = heads // kv_heads
    _attention_kernel[(batch, kv_heads)](
        qkv,
        qkv.stride(0),
        cos,
        sin,
        pos,
        keys,
        values,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        out,
        out.stride(0),
        1.0 / math.sqrt(d),
        H=heads,
        KV=kv_heads,
        G=g,
        GP=max(16, triton.next_power_of_2(g)),
        D=d,
        BLOCK_W=cfg[0],
        num_warps=cfg[1],
    )
    return out


def _time(fn: Any, reps: int = 25, trials: int = 3) -> float:
    """Best of `trials` mean times of `reps` calls (CUDA events), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def tune_gemv(ws: Sequence[torch.Tensor], x: torch.Tensor, out: torch.Tensor, **flags: Any) -> tuple[int, int, int]:
    """The fastest config of GEMV_CONFIGS for weights of this shape. Each timed call runs over every
    layer's weight in turn, so the weights stream from HBM as in a decode step: one matrix repeated
    stays in the 60 MB L2 and would reward tiles that are fast only from cache."""
    saved = out.clone()
    cfgs = [c for c in GEMV_CONFIGS if c[1] <= 2 * triton.next_power_of_2(ws[0].shape[1])]

    def run(cfg: tuple[int, int, int]) -> None:
        for w in ws:
            gemv(w, x, out, cfg=cfg, **flags)

    times = {c: _time(lambda c=c: run(c), reps=3) for c in cfgs}
    out.copy_(saved)
    return min(times, key=lambda c: times[c])


def tune_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, length: int, *, heads: int, kv_heads: int, dim: int
) -> tuple[int, int]:
    """The fastest config of ATTENTION_CONFIGS for one row attending over `length` keys (scratch cache)."""
    cache = torch.zeros(1, kv_heads, length + 1, dim, dtype=qkv.dtype, device=qkv.device)
    values = torch.zeros_like(cache)
    pos = torch.tensor([length], device=qkv.device)
    out = torch.empty(1, heads * dim, dtype=qkv.dtype, device=qkv.device)

    def run(cfg: tuple[int, int]) -> None:
        attention(qkv, cos, sin, pos, cache, values, out, heads=heads, kv_heads=kv_heads, cfg=cfg)

    times = {c: _time(lambda c=c: run(c)) for c in ATTENTION_CONFIGS}
    return min(times, key=lambda c: times[c])


def available(device: torch.device) -> str | None:
    """None if the kernels run and match the torch reference on `device`, else why not."""
    if triton is None:
        return "triton is not installed"
    if device.type != "cuda" and not _interpreting():
        return "the fused kernels need CUDA"
    try:
        return _self_test(device)
    except Exception as exc:  # a compile or launch failure: keep the torch path
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _self_test(device: torch.device) -> str | None:
    """Small random problems through every kernel mode against the torch formulas."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    n, k = 96, 200
    w, x, ln, bias = rnd(n, k), rnd(k), rnd(k), rnd(n)
    out = torch.empty(n, device=device, dtype=dtype)
    ref = F.linear(F.rms_norm(x.float(), (k,), ln.float(), 1e-6), w.float(), bias.float())
    gemv(w, x, out, cfg=(8, 64, 4), bias=bias, ln=ln, eps=1e-6)
    if not torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=0):
        return "gemv (norm, bias) disagrees with torch"
    gu, res = rnd(2 * k), rnd(n)
    out = res.clone()
    ref = res.float() + F.linear(F.silu(gu[:k].float()) * gu[k:].float(), w.float())
    gemv(w, gu, out, cfg=(16, 64, 4), swiglu=True, residual=True)
    if not torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=0):
        return "gemv (swiglu, residual) disagrees with torch"
    return _attention_test(rnd, device, tol)


def _attention_test(rnd: Any, device: torch.device, tol: float) -> str | None:
    heads, kv, d, slots, length = 4, 2, 16, 3, 80
    pos = torch.tensor([70, 5], device=device)
    qkv = rnd(2, (heads + 2 * kv) * d)
    cos, sin = rnd(length, d), rnd(length, d)
    keys, values = rnd(slots, kv, length, d), rnd(slots, kv, length, d)
    for cfg in ATTENTION_CONFIGS:
        if (why := _attention_check(qkv, cos, sin, pos, keys.clone(), values.clone(), cfg, tol)) is not None:
            return why
    return None


def _attention_check(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cfg: tuple[int, int],
    tol: float,
) -> str | None:
    import torch.nn.functional as F

    heads, kv, d = 4, 2, 16
    dtype = qkv.dtype
    ref_k, ref_v = keys.clone(), values.clone()
    out = torch.empty(2, heads * d, device=qkv.device, dtype=dtype)
    attention(qkv, cos, sin, pos, keys, values, out, heads=heads, kv_heads=kv, cfg=cfg)

    def rot(t: torch.Tensor, p: int) -> torch.Tensor:
        half = d // 2
        return t * cos[p] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[p]

    qs = []
    for b in range(2):
        p = int(pos[b])
        qs.append(rot(qkv[b, : heads * d].view(heads, d).float(), p))
        k = rot(qkv[b, heads * d : (heads + kv) * d].view(kv, d).float(), p)
        ref_k[b, :, p], ref_v[b, :, p] = k.to(dtype), qkv[b, (heads + kv) * d :].view(kv, d)
    if not (torch.allclose(keys.float(), ref_k.float(), atol=tol * 10) and torch.equal(values, ref_v)):
        return "attention's cache write disagrees with torch"
    for b in range(2):
        p = int(pos[b])
        kk, vv = ref_k[b, :, : p + 1].float(), ref_v[b, :, : p + 1].float()
        q = qs[b].to(dtype).float().view(kv, heads // kv, d)
        o = F.scaled_dot_product_attention(q, kk, vv).reshape(heads * d)
        if not torch.allclose(out[b].float(), o, atol=tol * 10, rtol=0):
            return f"attention output disagrees with torch (tiles {cfg})"
    return None
