"""Triton kernels for the fast runner (CUDA only; the torch formulas are the reference and the CPU path).

At batch 1 a decode step reads every weight once and each kernel costs a few microseconds of
launch and ramp, so the step is bound by bytes AND by kernel count. The batch-1 kernels cut a layer
to five launches: RMSNorm fused into the q/k/v and gate/up matrix-vector products (the norm's sum of
squares rides in the same pass over the input, which sits in L2), rotary + KV-cache write +
attention in one kernel per layer, SwiGLU fused into the down projection's input, residual adds
fused into the o/down outputs. Each GEMV program's loop is unrolled so all its 16-byte weight loads
can be in flight; o and down, short matrices with too few row blocks to fill the chip, may split K
and add atomically into the fp32 residual stream. The config per weight kind (cuBLAS through torch
among the candidates) is picked by timing every layer's weights in one CUDA graph at load
(`gemv_times`), then checked against torch. `lora` is the per-row multi-adapter epilogue used at
every batch size. `available()` compiles and checks each kernel against the torch formulas once;
the runner uses them only if that passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

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
        eps,
        K: tl.constexpr,
        CHUNK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        NORM: tl.constexpr,
        SWIGLU: tl.constexpr,
        RESIDUAL: tl.constexpr,
        ATOMIC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[n] (+)= sum_k w[n, k] * in[k] (+ bias[n]); in = x, rmsnorm(x) * ln, or silu(x[:K]) * x[K:].

        Program (i, j) owns rows [i BLOCK_N, (i + 1) BLOCK_N) and columns [j CHUNK, (j + 1) CHUNK); the
        loop over the chunk is unrolled (K and CHUNK are compile-time), so every weight load of the
        program can be in flight at once. The norm's sum of squares rides in the same pass (rstd is one
        scalar, applied to the dot product at the end). With several chunks (split-K) each program adds
        its partial sum atomically into the fp32 `out`."""
        pid = tl.program_id(0)
        k_lo = tl.program_id(1) * CHUNK
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in tl.static_range(CHUNK // BLOCK_K):
            kk = k_lo + i * BLOCK_K + cols
            kmask = kk < K
            w = tl.load(
                w_ptr + rows[:, None] * K + kk[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            if SWIGLU:
                g = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + kk, mask=kmask, other=0.0).to(tl.float32)
                xin = g / (1.0 + tl.exp(-g)) * u
            else:
                xin = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            if NORM:
                sq += xin * xin
                xin = xin * tl.load(ln_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * xin[None, :]
        y = tl.sum(acc, axis=1)
        if NORM:
            y = y / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if ATOMIC:
            tl.atomic_add(out_ptr + rows, y, mask=rmask, sem="relaxed")
        else:
            if RESIDUAL:
                y += tl.load(out_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _lora_kernel(
        base_ptr,
        base_stride,
        t_ptr,
        t_stride,
        b_ptr,
        b_stride,
        aid_ptr,
        out_ptr,
        out_stride,
        M,
        N,
        ROWS,
        RB: tl.constexpr,
        MODE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """y = base + (t * own) B over rows of one batch, own[m, r] = (r // RB + 1 == aid[m]): each row's
        own adapter only (id 0, the base model, none). MODE 0: out = y (may alias base); 1: out += y
        (the residual stream); 2: out = silu(y[:, :N]) * y[:, N:] (gate/up to the MLP's input)."""
        pm = tl.program_id(0)
        pc = tl.program_id(1)
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = rows < M
        cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < N
        aid = tl.load(aid_ptr + rows, mask=mmask, other=0)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for r0 in range(0, ROWS, BLOCK_R):
            rr = r0 + r
            own = (rr[None, :] < ROWS) & ((rr[None, :] // RB + 1) == aid[:, None]) & mmask[:, None]
            t = tl.load(t_ptr + rows[:, None] * t_stride + rr[None, :], mask=own, other=0.0)
            bmask = (rr[:, None] < ROWS) & cmask[None, :]
            b = tl.load(b_ptr + rr[:, None] * b_stride + cols[None, :], mask=bmask, other=0.0)
            acc = tl.dot(t, b, acc, input_precision="ieee")  # fp32 weights: no TF32 rounding
            if MODE == 2:
                b2 = tl.load(b_ptr + rr[:, None] * b_stride + N + cols[None, :], mask=bmask, other=0.0)
                acc2 = tl.dot(t, b2, acc2, input_precision="ieee")
        mask = mmask[:, None] & cmask[None, :]
        y = acc + tl.load(base_ptr + rows[:, None] * base_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        optr = out_ptr + rows[:, None] * out_stride + cols[None, :]
        if MODE == 1:
            y += tl.load(optr, mask=mask, other=0.0).to(tl.float32)
        if MODE == 2:
            u = acc2 + tl.load(base_ptr + rows[:, None] * base_stride + N + cols[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
            y = y / (1.0 + tl.exp(-y)) * u
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=mask)

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


GemvConfig = tuple[int, int, int, int]
"""(BLOCK_N, BLOCK_K, num_warps, split): split > 1 cuts K into that many chunks (atomic fp32 adds);
BLOCK_N 0 means cuBLAS through torch (the norm, SwiGLU and residual as separate kernels)."""
CUBLAS: GemvConfig = (0, 0, 0, 1)
GEMV_TILES = (
    (4, 512, 4),
    (8, 256, 4),
    (8, 512, 4),
    (8, 512, 8),
    (16, 256, 4),
    (16, 512, 8),
    (32, 256, 8),
    (32, 128, 4),
)
"""(BLOCK_N, BLOCK_K, num_warps) tiles that `gemv_candidates` combines with splits."""
ATTENTION_CONFIGS = ((64, 4), (32, 4), (128, 8))
"""(BLOCK_W keys per iteration, num_warps) candidates for `attention`."""


def gemv_candidates(
    n: int, k: int, *, splittable: bool, tiles: Sequence[tuple[int, int, int]] = GEMV_TILES, sms: int = 132
) -> list[GemvConfig]:
    """Configs worth timing for an [n, k] weight: each tile unsplit, and where the output may take
    atomic adds, the splits whose chunks are whole tiles and whose grid covers the SMs one to eight
    times over (a short matrix such as down [1536, 8960] has too few row blocks to fill the chip)."""
    out: list[GemvConfig] = [CUBLAS]
    for bn, bk, warps in tiles:
        if bk > 2 * k:
            continue
        out.append((bn, bk, warps, 1))
        if not splittable:
            continue
        blocks = -(-n // bn)
        steps = -(-k // bk)
        for split in range(2, steps + 1):
            if steps % split == 0 and sms <= blocks * split <= 8 * sms and blocks < 2 * sms:
                out.append((bn, bk, warps, split))
    return out


def gemv(
    w: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    cfg: GemvConfig,
    bias: torch.Tensor | None = None,
    ln: torch.Tensor | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
    residual: bool = False,
) -> torch.Tensor:
    """out [N] (+)= w [N, K] @ f(x), f per the flags (see `_gemv_kernel`); x and out contiguous, batch 1.
    A split config needs `residual` and an fp32 `out` (the partial sums are added atomically)."""
    n, k = w.shape
    block_n, block_k, warps, split = cfg
    if block_n == 0:
        return _gemv_torch(w, x, out, bias=bias, ln=ln, eps=eps, swiglu=swiglu, residual=residual)
    if split > 1 and not (residual and out.dtype == torch.float32):
        raise ValueError("a split-K GEMV adds into an fp32 residual")
    if split > 1 and (ln is not None or bias is not None):
        raise ValueError("the norm and the bias need the whole row: no split")
    chunk = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    _gemv_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, chunk))](
        w,
        x,
        out,
        bias if bias is not None else w,
        ln if ln is not None else w,
        n,
        eps,
        K=k,
        CHUNK=chunk,
        HAS_BIAS=bias is not None,
        NORM=ln is not None,
        SWIGLU=swiglu,
        RESIDUAL=residual,
        ATOMIC=split > 1,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out


def _gemv_torch(
    w: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    ln: torch.Tensor | None,
    eps: float,
    swiglu: bool,
    residual: bool,
) -> torch.Tensor:
    """The same function through torch (cuBLAS for the product): a tuning candidate and the reference."""
    k = w.shape[1]
    xin = x.float()
    if swiglu:
        xin = F.silu(xin[:k]) * xin[k:]
    if ln is not None:
        xin = F.rms_norm(xin, (k,), ln.float(), eps)
    y = F.linear(xin.to(w.dtype), w, bias)
    if residual:
        return out.add_(y)
    return out.copy_(y)


def lora(
    base: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    aid: torch.Tensor,
    out: torch.Tensor,
    *,
    rows_per_adapter: int,
    mode: int,
    fused: bool,
) -> torch.Tensor:
    """Each row's own adapter added to the base output in one kernel (see `_lora_kernel`): base [M, N]
    (or [M, 2N] for mode 2), t = x A^T [M, R] over the live adapters' R bank rows, b [R, N or 2N],
    aid [M] adapter ids; writes out [M, N]. Rows need unit column stride; base may alias out.
    `fused=False` computes the same through torch: the reference, and the path where Triton is absent."""
    if not fused:
        return _lora_torch(base, t, b, aid, out, rows_per_adapter, mode)
    m = base.shape[0]
    n = out.shape[1]
    rows = t.shape[1]
    block_m = 16 if m <= 64 else 64
    block_c = 64 if m <= 64 else 128
    _lora_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_c))](
        base,
        base.stride(0),
        t,
        t.stride(0),
        b,
        b.stride(0),
        aid,
        out,
        out.stride(0),
        m,
        n,
        rows,
        RB=rows_per_adapter,
        MODE=mode,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_R=32,
        num_warps=4,
    )
    return out


def _lora_torch(
    base: torch.Tensor, t: torch.Tensor, b: torch.Tensor, aid: torch.Tensor, out: torch.Tensor, rb: int, mode: int
) -> torch.Tensor:
    """`lora` in torch, `rb` bank rows per adapter."""
    rows = t.shape[1]
    if rows:
        owner = torch.arange(rows, device=t.device) // rb + 1
        y = torch.addmm(base, t * (owner[None, :] == aid[:, None]).to(t.dtype), b)
    else:
        y = base
    if mode == 1:
        return out.add_(y)
    if mode == 2:
        gate, up = y.chunk(2, dim=-1)
        return out.copy_(F.silu(gate) * up)
    return out.copy_(y)


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


def _time_graph(fn: Any, reps: int = 5, trials: int = 3) -> float:
    """`_time` of `fn` captured as one CUDA graph, so launch gaps are those of a decode step's graph
    (eager launches would hide the difference between kernels of a few microseconds)."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return _time(graph.replay, reps=reps, trials=trials)


def gemv_times(
    ws: Sequence[torch.Tensor],
    x: torch.Tensor,
    out: torch.Tensor,
    candidates: Sequence[GemvConfig] | None = None,
    **flags: Any,
) -> dict[GemvConfig, float]:
    """Milliseconds per pass over `ws` for each candidate that compiles (`gemv_candidates` by default).
    Each timed call runs over every layer's weight in turn, as one graph, so the weights stream from HBM
    as in a decode step: one matrix repeated stays in the 60 MB L2 and would reward tiles fast only from cache."""
    n, k = ws[0].shape
    if candidates is None:
        splittable = bool(flags.get("residual")) and out.dtype == torch.float32
        candidates = gemv_candidates(n, k, splittable=splittable)
    saved = out.clone()
    times: dict[GemvConfig, float] = {}
    for cfg in candidates:

        def run(cfg: GemvConfig = cfg) -> None:
            for w in ws:
                gemv(w, x, out, cfg=cfg, **flags)

        try:
            times[cfg] = _time_graph(run)
        except Exception:  # a tile that does not compile here is not a candidate
            continue
        finally:
            out.copy_(saved)
    if not times:
        raise RuntimeError("no GEMV config ran")
    return times


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

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    n, k = 96, 200
    w, x, ln, bias = rnd(n, k), rnd(k), rnd(k), rnd(n)
    out = torch.empty(n, device=device, dtype=dtype)
    if (why := check_gemv(w, x, out, (8, 64, 4, 1), tol, bias=bias, ln=ln, eps=1e-6)) is not None:
        return why
    gu, res = rnd(2 * k), rnd(n)
    for cfg in ((16, 64, 4, 1), (16, 32, 4, 3)):  # split-K: adds atomically into an fp32 residual
        out = res.clone() if cfg[3] == 1 else res.float()
        if (why := check_gemv(w, gu, out, cfg, tol, swiglu=True, residual=True)) is not None:
            return why
    if (why := _lora_test(rnd, device, tol)) is not None:
        return why
    return _attention_test(rnd, device, tol)


def check_gemv(
    w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, cfg: GemvConfig, tol: float, **flags: Any
) -> str | None:
    """None if `gemv` with `cfg` matches the torch formula on these inputs (`out` is left as it was)."""
    ref = _gemv_torch(
        w,
        x,
        out.float().clone(),
        bias=flags.get("bias"),
        ln=flags.get("ln"),
        eps=flags.get("eps", 0.0),
        swiglu=flags.get("swiglu", False),
        residual=flags.get("residual", False),
    )
    saved = out.clone()
    got = gemv(w, x, out, cfg=cfg, **flags).float().clone()
    out.copy_(saved)
    if not bool(torch.isfinite(got).all()) or not torch.allclose(got, ref, atol=tol * ref.abs().max().item(), rtol=0):
        return f"gemv {cfg} disagrees with torch"
    return None


def _lora_test(rnd: Any, device: torch.device, tol: float) -> str | None:
    """`lora` fused against its torch formula in its three modes, with base rows, two adapters and a ragged batch."""
    m, n, rb, live = 37, 80, 6, 3
    aid = torch.tensor([i % (live + 1) for i in range(m)], device=device)
    t = rnd(m, live * rb + 5)[:, : live * rb]  # a strided view, as the GEMM's extra columns are
    for mode, width in ((0, n), (1, n), (2, 2 * n)):
        base, b, out = rnd(m, width), rnd(live * rb, width), rnd(m, n)
        ref = lora(base, t, b, aid, out.clone().float(), rows_per_adapter=rb, mode=mode, fused=False)
        got = lora(base, t, b, aid, out, rows_per_adapter=rb, mode=mode, fused=True).float()
        if not torch.allclose(got, ref, atol=tol * ref.abs().max().item(), rtol=0):
            return f"lora kernel (mode {mode}) disagrees with torch"
    return None


def _attention_test(rnd: Any, device: torch.device, tol: float) -> str | None:
    """`attention` with each of ATTENTION_CONFIGS against torch: the cache write and the output of two
    rows at different positions."""
    heads, kv, d, slots, length = 4, 2, 16, 3, 80
    pos = torch.tensor([70, 5], device=device)
    qkv = rnd(2, (heads + 2 * kv) * d)
    cos, sin = rnd(length, d), rnd(length, d)
    keys, values = rnd(slots, kv, length, d), rnd(slots, kv, length, d)
    dtype = qkv.dtype

    def rot(t: torch.Tensor, p: int) -> torch.Tensor:
        half = d // 2
        return t * cos[p] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[p]

    qs: list[torch.Tensor] = []
    ref_k, ref_v = keys.clone(), values.clone()
    for b in range(2):
        p = int(pos[b])
        qs.append(rot(qkv[b, : heads * d].view(heads, d).float(), p))
        k = rot(qkv[b, heads * d : (heads + kv) * d].view(kv, d).float(), p)
        ref_k[b, :, p], ref_v[b, :, p] = k.to(dtype), qkv[b, (heads + kv) * d :].view(kv, d)
    for cfg in ATTENTION_CONFIGS:
        got_k, got_v = keys.clone(), values.clone()
        out = torch.empty(2, heads * d, device=device, dtype=dtype)
        attention(qkv, cos, sin, pos, got_k, got_v, out, heads=heads, kv_heads=kv, cfg=cfg)
        if not (torch.allclose(got_k.float(), ref_k.float(), atol=tol * 10) and torch.equal(got_v, ref_v)):
            return "attention's cache write disagrees with torch"
        for b in range(2):
            p = int(pos[b])
            kk, vv = ref_k[b, :, : p + 1].float(), ref_v[b, :, : p + 1].float()
            q = qs[b].to(dtype).float().view(kv, heads // kv, d)
            o = F.scaled_dot_product_attention(q, kk, vv).reshape(heads * d)
            if not torch.allclose(out[b].float(), o, atol=tol * 10, rtol=0):
                return f"attention output disagrees with torch (tiles {cfg})"
    return None
