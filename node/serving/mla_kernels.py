"""Triton kernels for the MLA runner's decode step (CUDA; the torch formulas are the reference and the CPU path).

A decode step at small batch is bound by bytes and by kernel count (see kernels.py), and MLA + MoE
done in plain torch costs about 45 kernels a layer (absorbed attention in eight, the MoE's sort /
offsets / gather / two grouped GEMMs / scatter / sum in another twenty). These kernels cut that:

* `latent_write`: the latent's RMSNorm, the rope key's rotary and the write of both into the cache
  at each row's position (one program per row);
* `mla_decode`: one program per (row, head): the absorbed query (W_UK_h^T q_nope, plus kv_b_proj's
  LoRA in rank space for the row's own adapter), the query's rotary, attention over the row's latent
  cache with an online softmax, and W_UV_h (plus LoRA) on the latent output, written straight into
  o_proj's input layout. The head's W_UK/W_UV slices (2 x dn x r) come from L2 after the first row.
  Its "split" form leaves W_UK and W_UV to two cuBLAS batched matmuls around the kernel (the whole
  chip streams those 2 x H x dn x r weights, where at batch 1 the fused form has only H programs to);
  the runner times both per batch bucket;
* `moe_route`: router scores to the top-k experts and their weights in one program per row (V3's
  sigmoid + bias + group-limited choice + normalisation, or V2's softmax + greedy / group-limited);
* `moe_up` / `moe_down`: the routed experts as one program per (pair, row block) reading its expert's
  rows by index (no sort, no offsets, no gathered weight copy): gate/up with the RMSNorm of the
  input and SwiGLU fused; down with the routing weight, the sum over the k experts and the residual
  add fused (one program per (token, row block), deterministic).

Every wrapper takes `fused=False` to compute the same through torch. `available()` compiles and checks
each kernel against those formulas once; the runner uses them only if that passes. The experts'
loops over K are unrolled (`tl.static_range`) so every weight load of a program can be in flight, as
in kernels.py; the attention kernel's W loops are not (unrolled, every config spilled 0.9-2.5 KB a
thread at V2-Lite's shapes; see MLA_CONFIGS). No config here spills (ptxas -v, sm_90a).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Unpack

import torch
import torch.nn.functional as F

from node.serving.kernels import _interpreting, _time_graph, tl, triton  # None on CPU-only installs

if TYPE_CHECKING:  # moe imports fast; the kernels stay importable on their own
    from node.serving.moe import RouteOptions

if triton is not None:

    @triton.jit
    def _latent_kernel(
        a_ptr,
        a_stride,
        ln_ptr,
        eps,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        cache_ptr,
        c_slot,
        c_pos,
        OFF: tl.constexpr,
        R: tl.constexpr,
        RP: tl.constexpr,
        HALF: tl.constexpr,
        HP: tl.constexpr,
        INTERLEAVED: tl.constexpr,
    ):
        """Row b: cache[b, pos] = [rmsnorm(a[OFF:OFF+R]) * ln, rotary(a[OFF+R:OFF+R+2 HALF])]."""
        b = tl.program_id(0).to(tl.int64)  # slot offsets pass 2^31 elements at long contexts
        pos = tl.load(pos_ptr + b)
        row = a_ptr + b * a_stride + OFF
        r = tl.arange(0, RP)
        rm = r < R
        c = tl.load(row + r, mask=rm, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / R + eps)
        c = c * rstd * tl.load(ln_ptr + r, mask=rm, other=0.0).to(tl.float32)
        dst = cache_ptr + b * c_slot + pos * c_pos
        tl.store(dst + r, c.to(cache_ptr.dtype.element_ty), mask=rm)
        i = tl.arange(0, HP)
        im = i < HALF
        if INTERLEAVED:
            x1 = tl.load(row + R + 2 * i, mask=im, other=0.0).to(tl.float32)
            x2 = tl.load(row + R + 2 * i + 1, mask=im, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(row + R + i, mask=im, other=0.0).to(tl.float32)
            x2 = tl.load(row + R + HALF + i, mask=im, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + pos * HALF + i, mask=im, other=0.0)
        sn = tl.load(sin_ptr + pos * HALF + i, mask=im, other=0.0)
        tl.store(dst + R + i, (x1 * cs - x2 * sn).to(cache_ptr.dtype.element_ty), mask=im)
        tl.store(dst + R + HALF + i, (x2 * cs + x1 * sn).to(cache_ptr.dtype.element_ty), mask=im)

    @triton.jit
    def _mla_decode_kernel(
        q_ptr,
        q_stride,
        w_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        cache_ptr,
        c_slot,
        c_pos,
        out_ptr,
        out_stride,
        scale,
        aid_ptr,
        la_ptr,
        lb_ptr,
        ext_ptr,
        ext_stride,
        R: tl.constexpr,
        RP: tl.constexpr,
        DN: tl.constexpr,
        DV: tl.constexpr,
        HALF: tl.constexpr,
        HP: tl.constexpr,
        RANK: tl.constexpr,
        RANKP: tl.constexpr,
        HEADS: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        EXT: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Row b, head h: absorbed MLA decode over keys 0..pos of the row's latent cache (see the module docstring).
        w = kv_b_proj's weight [HEADS (DN + DV), R]; LoRA bank (RANK > 0): a [rows, R], b [rows, HEADS (DN + DV)].
        EXT ("split" form): W_UK^T q_nope is read from ext [H, B, R] (a batched matmul made it) and the latent
        output is written back there for W_UV's batched matmul; `out` then gets only the LoRA value term."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        pos = tl.load(pos_ptr + b)
        r = tl.arange(0, RP)
        rm = r < R
        qrow = q_ptr + b * q_stride + h * (DN + 2 * HALF)
        wh = w_ptr + h * (DN + DV) * R
        dd = tl.arange(0, BLOCK_D)
        # the absorbed query: q_abs = W_UK_h^T q_nope
        ext = ext_ptr + h * ext_stride + b * R
        if EXT:
            q_abs = tl.load(ext + r, mask=rm, other=0.0).to(tl.float32)
        else:
            q_abs = tl.zeros([RP], dtype=tl.float32)
            for d0 in range(0, DN, BLOCK_D):  # not unrolled: a [BLOCK_D, R] tile in flight, no spills
                d = d0 + dd
                dm = d < DN
                qn = tl.load(qrow + d, mask=dm, other=0.0).to(tl.float32)
                wk = tl.load(wh + d[:, None] * R + r[None, :], mask=dm[:, None] & rm[None, :], other=0.0)
                q_abs += tl.sum(wk.to(tl.float32) * qn[:, None], axis=0)
        j = tl.arange(0, RANKP)  # the LoRA names exist either way (constexpr branches below fill them)
        jrow = j
        jm = j < RANK
        wl = tl.zeros([RANKP], dtype=tl.float32)
        if RANK > 0:  # + A^T (B_UK^T q_nope) for the row's own adapter (id 0: none)
            aid = tl.load(aid_ptr + b)
            jm = (j < RANK) & (aid > 0)
            jrow = (aid - 1) * RANK + j
            u = tl.zeros([RANKP], dtype=tl.float32)
            for d0 in range(0, DN, BLOCK_D):
                d = d0 + dd
                dm = d < DN
                qn = tl.load(qrow + d, mask=dm, other=0.0).to(tl.float32)
                bt = tl.load(
                    lb_ptr + jrow[:, None] * (HEADS * (DN + DV)) + h * (DN + DV) + d[None, :],
                    mask=jm[:, None] & dm[None, :],
                    other=0.0,
                ).to(tl.float32)
                u += tl.sum(bt * qn[None, :], axis=1)
            la = tl.load(la_ptr + jrow[:, None] * R + r[None, :], mask=jm[:, None] & rm[None, :], other=0.0).to(
                tl.float32
            )
            q_abs += tl.sum(la * u[:, None], axis=0)
        # the query's rotary half, in fp32
        i = tl.arange(0, HP)
        im = i < HALF
        if INTERLEAVED:
            x1 = tl.load(qrow + DN + 2 * i, mask=im, other=0.0).to(tl.float32)
            x2 = tl.load(qrow + DN + 2 * i + 1, mask=im, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(qrow + DN + i, mask=im, other=0.0).to(tl.float32)
            x2 = tl.load(qrow + DN + HALF + i, mask=im, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + pos * HALF + i, mask=im, other=0.0)
        sn = tl.load(sin_ptr + pos * HALF + i, mask=im, other=0.0)
        qp1 = x1 * cs - x2 * sn
        qp2 = x2 * cs + x1 * sn
        # attention over the latent cache, online softmax
        base = cache_ptr + b * c_slot
        w = tl.arange(0, BLOCK_W)
        m_i = tl.max(tl.full([BLOCK_W], -float("inf"), tl.float32), axis=0)  # fp32 scalars: loop-carried
        l_i = tl.sum(tl.zeros([BLOCK_W], dtype=tl.float32), axis=0)
        acc = tl.zeros([RP], dtype=tl.float32)
        for start in range(0, pos + 1, BLOCK_W):
            keys = start + w
            km = keys <= pos
            kl = tl.load(base + keys[:, None] * c_pos + r[None, :], mask=km[:, None] & rm[None, :], other=0.0).to(
                tl.float32
            )
            k1 = tl.load(base + keys[:, None] * c_pos + R + i[None, :], mask=km[:, None] & im[None, :], other=0.0)
            k2 = tl.load(
                base + keys[:, None] * c_pos + R + HALF + i[None, :], mask=km[:, None] & im[None, :], other=0.0
            )
            s = tl.sum(kl * q_abs[None, :], axis=1)
            s += tl.sum(k1.to(tl.float32) * qp1[None, :], axis=1) + tl.sum(k2.to(tl.float32) * qp2[None, :], axis=1)
            s = tl.where(km, s * scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            acc = acc * alpha + tl.sum(kl * p[:, None], axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        o_lat = acc / l_i
        if RANK > 0:  # A o_lat for the row's own adapter (A reloaded from L2 rather than held across the loop)
            la = tl.load(la_ptr + jrow[:, None] * R + r[None, :], mask=jm[:, None] & rm[None, :], other=0.0)
            wl = tl.sum(la.to(tl.float32) * o_lat[None, :], axis=1)
        if EXT:
            tl.store(ext + r, o_lat.to(ext_ptr.dtype.element_ty), mask=rm)
        # W_UV_h (+ B_UV (A o_lat)) into o_proj's input [B, HEADS DV]; EXT: the LoRA term only
        if (not EXT) or RANK > 0:
            for e0 in range(0, DV, BLOCK_D):
                e = e0 + dd
                em = e < DV
                o = tl.zeros([BLOCK_D], dtype=tl.float32)
                if not EXT:
                    wv = tl.load(wh + (DN + e)[:, None] * R + r[None, :], mask=em[:, None] & rm[None, :], other=0.0)
                    o += tl.sum(wv.to(tl.float32) * o_lat[None, :], axis=1)
                if RANK > 0:
                    bv = tl.load(
                        lb_ptr + jrow[:, None] * (HEADS * (DN + DV)) + h * (DN + DV) + DN + e[None, :],
                        mask=jm[:, None] & em[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    o += tl.sum(bv * wl[:, None], axis=0)
                tl.store(out_ptr + b * out_stride + h * DV + e, o.to(out_ptr.dtype.element_ty), mask=em)

    @triton.jit
    def _route_kernel(
        logits_ptr,
        bias_ptr,
        idx_ptr,
        wt_ptr,
        scaling,
        E: tl.constexpr,
        EP: tl.constexpr,
        K: tl.constexpr,
        KP: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        TG: tl.constexpr,
        V3: tl.constexpr,
        NORM: tl.constexpr,
    ):
        """Row m's top-K experts (ids, weights) from its fp32 router logits, as DeepSeek-V3 or -V2 route."""
        m = tl.program_id(0)
        e = tl.arange(0, EP)
        em = e < E
        lg = tl.load(logits_ptr + m * E + e, mask=em, other=-float("inf"))
        if V3:
            scores = tl.where(em, 1.0 / (1.0 + tl.exp(-lg)), 0.0)
            choice = tl.where(em, scores + tl.load(bias_ptr + e, mask=em, other=0.0), -float("inf"))
        else:
            p = tl.exp(lg - tl.max(lg, axis=0))
            scores = tl.where(em, p / tl.sum(p, axis=0), 0.0)
            choice = tl.where(em, scores, -float("inf"))
        if TG < G:  # keep the TG best groups (V3: a group's two best; V2: its best)
            per = E // G
            grp = e // per
            g = tl.arange(0, GP)
            gs = tl.full([GP], -float("inf"), tl.float32)
            for gi in tl.static_range(G):
                inside = tl.where(grp == gi, choice, -float("inf"))
                best = tl.max(inside, axis=0)
                if V3:
                    first = tl.argmax(inside, axis=0)
                    best += tl.max(tl.where(e == first, -float("inf"), inside), axis=0)
                gs = tl.where(g == gi, best, gs)
            keep = e < 0  # no expert kept yet
            for _ in tl.static_range(TG):
                top = tl.argmax(gs, axis=0)
                keep = keep | (grp == top)
                gs = tl.where(g == top, -float("inf"), gs)
            if V3:
                choice = tl.where(keep, choice, -float("inf"))
            else:  # V2 zeroes the scores outside the kept groups, as HF does
                scores = tl.where(keep, scores, 0.0)
                choice = tl.where(em, scores, -float("inf"))
        kk = tl.arange(0, KP)
        ids = tl.zeros([KP], dtype=tl.int32)
        wv = tl.zeros([KP], dtype=tl.float32)
        for k in tl.static_range(K):
            top = tl.argmax(choice, axis=0)
            ids = tl.where(kk == k, top, ids)
            wv = tl.where(kk == k, tl.sum(tl.where(e == top, scores, 0.0), axis=0), wv)
            choice = tl.where(e == top, -float("inf"), choice)
        if NORM:
            wv = wv / (tl.sum(wv, axis=0) + 1e-20)
        tl.store(idx_ptr + m * K + kk, ids, mask=kk < K)
        tl.store(wt_ptr + m * K + kk, wv * scaling, mask=kk < K)

    @triton.jit
    def _moe_up_kernel(
        x_ptr,
        x_stride,
        ln_ptr,
        eps,
        idx_ptr,
        w_ptr,
        act_ptr,
        INTER: tl.constexpr,
        HD: tl.constexpr,
        K: tl.constexpr,
        NORM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Pair p = (token p // K, its expert idx[p]): act[p, n] = silu(g) * u over rows n of the expert's
        gate and up (w: gate_up_proj [E, 2I, HD]) on x (RMSNorm * ln fused in with NORM)."""
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < INTER
        t = pair // K
        ex = tl.load(idx_ptr + pair).to(tl.int64)
        wb = w_ptr + ex * (2 * INTER * HD)
        cols = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in tl.static_range((HD + BLOCK_K - 1) // BLOCK_K):
            kk = i * BLOCK_K + cols
            km = kk < HD
            xin = tl.load(x_ptr + t * x_stride + kk, mask=km, other=0.0).to(tl.float32)
            if NORM:
                sq += xin * xin
                xin = xin * tl.load(ln_ptr + kk, mask=km, other=0.0).to(tl.float32)
            m2 = rmask[:, None] & km[None, :]
            g = tl.load(wb + rows[:, None] * HD + kk[None, :], mask=m2, other=0.0, eviction_policy="evict_first")
            u = tl.load(
                wb + (INTER + rows)[:, None] * HD + kk[None, :], mask=m2, other=0.0, eviction_policy="evict_first"
            )
            acc_g += g.to(tl.float32) * xin[None, :]
            acc_u += u.to(tl.float32) * xin[None, :]
        yg = tl.sum(acc_g, axis=1)
        yu = tl.sum(acc_u, axis=1)
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / HD + eps)
            yg = yg * rstd
            yu = yu * rstd
        act = yg / (1.0 + tl.exp(-yg)) * yu
        tl.store(act_ptr + pair * INTER + rows, act.to(act_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _moe_down_kernel(
        act_ptr,
        idx_ptr,
        wt_ptr,
        w_ptr,
        out_ptr,
        out_stride,
        INTER: tl.constexpr,
        HD: tl.constexpr,
        K: tl.constexpr,
        RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Token t, rows n: out[t, n] (+)= sum_k wt[t, k] * (down[idx[t, k]] @ act[t K + k])[n]."""
        t = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < HD
        cols = tl.arange(0, BLOCK_K)
        y = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(K):
            ex = tl.load(idx_ptr + t * K + j).to(tl.int64)
            wgt = tl.load(wt_ptr + t * K + j)
            wb = w_ptr + ex * (HD * INTER)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for i in tl.static_range((INTER + BLOCK_K - 1) // BLOCK_K):
                kk = i * BLOCK_K + cols
                km = kk < INTER
                a = tl.load(act_ptr + (t * K + j) * INTER + kk, mask=km, other=0.0).to(tl.float32)
                wv = tl.load(
                    wb + rows[:, None] * INTER + kk[None, :],
                    mask=rmask[:, None] & km[None, :],
                    other=0.0,
                    eviction_policy="evict_first",
                )
                acc += wv.to(tl.float32) * a[None, :]
            y += wgt * tl.sum(acc, axis=1)
        dst = out_ptr + t * out_stride + rows
        if RESIDUAL:
            y += tl.load(dst, mask=rmask, other=0.0).to(tl.float32)
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=rmask)


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MLA_CONFIGS = ((16, 16, 8), (8, 16, 4), (16, 32, 8), (32, 16, 8))
"""(BLOCK_W keys per iteration, BLOCK_D rows of W_UK/W_UV per load, num_warps) for `mla_decode`: none
spills at V2-Lite's shapes (ptxas -v for sm_90a, Triton 3.7: 167-217 registers; with the W loops
unrolled every config spilled 0.9-2.5 KB, and (32, 16, 4) still spills 168 B)."""
MOE_UP_CONFIGS = ((8, 256, 4), (16, 256, 8), (8, 512, 4), (16, 128, 4))
MOE_DOWN_CONFIGS = ((16, 128, 4), (8, 256, 4), (16, 256, 8), (32, 128, 4))
"""(BLOCK_N, BLOCK_K, num_warps) candidates for the expert kernels, timed at load; none spills at V2-Lite's
shapes (64-194 registers; (16, 256, 4) for moe_up spilled 568 B and was dropped)."""


# ---- wrappers (fused=False: the torch reference) ---------------------------------------------


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotary of x [..., 2 half] (cos/sin [..., half]) in fp32, as [firsts | seconds] (HF V3's layout)."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else (xf[..., :half], xf[..., half:])
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def latent_write(
    a: torch.Tensor,
    ln: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    cache: torch.Tensor,
    *,
    off: int,
    rank: int,
    interleaved: bool,
    fused: bool,
) -> None:
    """Rows 0..B-1 of `cache` [S, L, rank + dr] at `pos` [B] from a [B, ...] (latent at `off`, rope key after it)."""
    batch = a.shape[0]
    dr = cache.shape[-1] - rank
    if not fused:
        c = F.rms_norm(a[:, off : off + rank].float(), (rank,), ln.float(), eps)
        k = rope_pairs(a[:, off + rank : off + rank + dr], cos[pos], sin[pos], interleaved=interleaved)
        cache[torch.arange(batch, device=a.device), pos] = torch.cat([c, k], dim=-1).to(cache.dtype)
        return
    _latent_kernel[(batch,)](
        a,
        a.stride(0),
        ln,
        eps,
        cos,
        sin,
        pos,
        cache,
        cache.stride(0),
        cache.stride(1),
        OFF=off,
        R=rank,
        RP=_p2(rank),
        HALF=dr // 2,
        HP=_p2(dr // 2),
        INTERLEAVED=interleaved,
        num_warps=4,
    )


def mla_decode(
    q: torch.Tensor,
    w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    cache: torch.Tensor,
    out: torch.Tensor,
    *,
    heads: int,
    dn: int,
    dv: int,
    scale: float,
    interleaved: bool,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    cfg: tuple[int, int, int] = MLA_CONFIGS[0],
    split: bool = False,
    fused: bool,
) -> torch.Tensor:
    """Absorbed MLA decode for rows 0..B-1: q [B, H (dn + dr)] (row-strided ok), w = kv_b_proj [H (dn + dv), r],
    cache [S, L, r + dr] (keys 0..pos[b] of row b), out [B, H dv]. `lora` = (aid [B], bank A [rows, r],
    bank B^T [rows, H (dn + dv)], rank): each row adds its own adapter's kv_b_proj delta, exactly.

    `split`: W_UK and W_UV as two batched matmuls over heads (cuBLAS, the whole chip streaming the 2 x H x
    dn x r weights) around the attention kernel, instead of inside it (one program per row and head
    streaming its own slices); the runner times both forms per batch bucket."""
    batch = q.shape[0]
    r = w.shape[1]
    dr = cache.shape[-1] - r
    if not fused:
        return _mla_decode_torch(q, w, cos, sin, pos, cache, out, heads, dn, dv, scale, interleaved, lora)
    aid, la, lb, rank = lora if lora is not None else (pos, w, w, 0)
    ext = out
    if split:
        wh = w.view(heads, dn + dv, r)
        q_nope = q[:, : heads * (dn + dr)].view(batch, heads, dn + dr)[..., :dn].transpose(0, 1)
        ext = torch.bmm(q_nope, wh[:, :dn])  # [H, B, r]: W_UK^T q_nope; the kernel writes o_lat over it
    _mla_decode_kernel[(batch, heads)](
        q,
        q.stride(0),
        w,
        cos,
        sin,
        pos,
        cache,
        cache.stride(0),
        cache.stride(1),
        out,
        out.stride(0),
        scale,
        aid,
        la,
        lb,
        ext,
        batch * r,
        R=r,
        RP=_p2(r),
        DN=dn,
        DV=dv,
        HALF=dr // 2,
        HP=_p2(dr // 2),
        RANK=rank,
        RANKP=max(2, _p2(rank)),
        HEADS=heads,
        INTERLEAVED=interleaved,
        EXT=split,
        BLOCK_W=cfg[0],
        BLOCK_D=cfg[1],
        num_warps=cfg[2],
    )
    if split:
        o = torch.bmm(ext, wh[:, dn:].transpose(1, 2)).transpose(0, 1)  # [B, H, dv]: W_UV o_lat
        view = out.view(batch, heads, dv) if out.is_contiguous() else out.unflatten(1, (heads, dv))
        if rank:
            view.add_(o)  # the kernel wrote each row's LoRA value term
        else:
            view.copy_(o)
    return out


def _mla_decode_torch(
    q: torch.Tensor,
    w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    cache: torch.Tensor,
    out: torch.Tensor,
    heads: int,
    dn: int,
    dv: int,
    scale: float,
    interleaved: bool,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None,
) -> torch.Tensor:
    batch, r = q.shape[0], w.shape[1]
    dr = cache.shape[-1] - r
    qh = q[:, : heads * (dn + dr)].reshape(batch, heads, dn + dr).float()
    wh = w.float().view(heads, dn + dv, r)
    q_abs = torch.einsum("bhd,hdr->bhr", qh[..., :dn], wh[:, :dn])
    if lora is not None:
        aid, la, lb, rank = lora
        own = (torch.arange(la.shape[0], device=q.device) // rank + 1)[None, :] == aid[:, None]  # [B, rows]
        bt = lb.float().view(-1, heads, dn + dv)
        u = torch.einsum("bhd,jhd->bhj", qh[..., :dn], bt[..., :dn]) * own[:, None, :]
        q_abs = q_abs + u @ la.float()
    q_rope = rope_pairs(qh[..., dn:], cos[pos][:, None], sin[pos][:, None], interleaved=interleaved)
    keys = cache[:batch].float()  # [B, L, r + dr]
    scores = torch.einsum("bhc,blc->bhl", torch.cat([q_abs, q_rope], dim=-1), keys) * scale
    length = torch.arange(keys.shape[1], device=q.device)
    scores = scores.masked_fill((length[None, :] > pos[:, None])[:, None, :], float("-inf"))
    o_lat = torch.softmax(scores, dim=-1) @ keys[..., :r]  # [B, H, r]
    o = torch.einsum("bhr,hdr->bhd", o_lat, wh[:, dn:])
    if lora is not None:
        wl = (o_lat @ la.float().t()) * own[:, None, :]
        o = o + torch.einsum("bhj,jhd->bhd", wl, bt[..., dn:])
    return out.copy_(o.reshape(batch, heads * dv))


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    weights: torch.Tensor,
    **opts: Unpack[RouteOptions],
) -> None:
    """Fill idx [M, k] (int32) and weights [M, k] (fp32) from fp32 router logits [M, E] (Triton only;
    the torch routing is MoE.route)."""
    m, e = logits.shape
    top_k, n_group = opts["top_k"], opts["n_group"]
    _route_kernel[(m,)](
        logits,
        bias if bias is not None else logits,
        idx,
        weights,
        opts["scaling"],
        E=e,
        EP=_p2(e),
        K=top_k,
        KP=max(2, _p2(top_k)),
        G=n_group,
        GP=max(2, _p2(n_group)),
        TG=opts["topk_group"],
        V3=opts["v3"],
        NORM=opts["norm"],
        num_warps=4 if e <= 256 else 8,
    )


def moe_pairs(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    w_gu: torch.Tensor,
    w_down: torch.Tensor,
    act: torch.Tensor,
    out: torch.Tensor,
    *,
    ln: torch.Tensor | None,
    eps: float,
    residual: bool,
    up_cfg: tuple[int, int, int] = MOE_UP_CONFIGS[0],
    down_cfg: tuple[int, int, int] = MOE_DOWN_CONFIGS[0],
    fused: bool,
) -> torch.Tensor:
    """Routed experts as (pair, row block) programs: out [M, HD] (+)= sum_k weights[:, k] * expert_k(h),
    h = rmsnorm(x) * ln if `ln` else x; act [M k, I] is scratch. Unit column strides."""
    hd = w_down.shape[1]
    if not fused:
        h = x.float() if ln is None else F.rms_norm(x.float(), (hd,), ln.float(), eps)
        gu = torch.einsum("mh,mkoh->mko", h, w_gu[idx.long()].float())
        gate, up = gu.chunk(2, dim=-1)
        y = torch.einsum("mki,mkoi->mko", F.silu(gate) * up, w_down[idx.long()].float())
        y = (y * weights[:, :, None]).sum(dim=1)
        return out.add_(y.to(out.dtype)) if residual else out.copy_(y)
    moe_up(x, idx, w_gu, act, ln=ln, eps=eps, cfg=up_cfg)
    return moe_down(act, idx, weights, w_down, out, residual=residual, cfg=down_cfg)


def moe_up(
    x: torch.Tensor,
    idx: torch.Tensor,
    w_gu: torch.Tensor,
    act: torch.Tensor,
    *,
    ln: torch.Tensor | None,
    eps: float,
    cfg: tuple[int, int, int] = MOE_UP_CONFIGS[0],
) -> torch.Tensor:
    """act [M k, I] = silu(gate) * up of each (token, expert) pair (Triton; `moe_pairs` holds the torch form)."""
    m, k = idx.shape
    inter, hd = w_gu.shape[1] // 2, w_gu.shape[2]
    bn, bk, warps = cfg
    _moe_up_kernel[(m * k, triton.cdiv(inter, bn))](
        x,
        x.stride(0),
        ln if ln is not None else x,
        eps,
        idx,
        w_gu,
        act,
        INTER=inter,
        HD=hd,
        K=k,
        NORM=ln is not None,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
    )
    return act


def moe_down(
    act: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    w_down: torch.Tensor,
    out: torch.Tensor,
    *,
    residual: bool,
    cfg: tuple[int, int, int] = MOE_DOWN_CONFIGS[0],
) -> torch.Tensor:
    """out [M, HD] (+)= sum_k weights[:, k] * down_k(act) (Triton; `moe_pairs` holds the torch form)."""
    m, k = idx.shape
    hd, inter = w_down.shape[1], w_down.shape[2]
    bn, bk, warps = cfg
    _moe_down_kernel[(m, triton.cdiv(hd, bn))](
        act,
        idx,
        weights,
        w_down,
        out,
        out.stride(0),
        INTER=inter,
        HD=hd,
        K=k,
        RESIDUAL=residual,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
    )
    return out


# ---- self-test and timing ------------------------------------------------------------------------


def available(device: torch.device) -> str | None:
    """None if these kernels run and match the torch reference on `device`, else why not."""
    if triton is None:
        return "triton is not installed"
    if device.type != "cuda" and not _interpreting():
        return "the MLA kernels need CUDA"
    try:
        return _self_test(device)
    except Exception as exc:  # a compile or launch failure: keep the torch path
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _self_test(device: torch.device) -> str | None:
    """Small random problems through every kernel against the torch formulas (ragged sizes, two adapters)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
        got, ref = got.float(), ref.float()
        return bool(torch.isfinite(got).all()) and torch.allclose(got, ref, atol=tol * ref.abs().max().item(), rtol=0)

    heads, dn, dv, r, dr, slots, length, rank = 3, 24, 20, 40, 12, 3, 70, 3
    pos = torch.tensor([65, 4], device=device)
    cos = torch.rand(length, dr // 2, generator=g).to(device)
    sin = torch.rand(length, dr // 2, generator=g).to(device)
    for interleaved in (True, False):
        a = rnd(2, 50 + r + dr)[:, 7:]  # the latent at an offset, a strided row
        ln = rnd(r)
        caches = [rnd(slots, length, r + dr)]
        caches.append(caches[0].clone())
        for cache, fused in zip(caches, (True, False), strict=True):
            latent_write(a, ln, 1e-6, cos, sin, pos, cache, off=43, rank=r, interleaved=interleaved, fused=fused)
        if not close(caches[0], caches[1]):
            return "latent_write disagrees with torch"
        q = rnd(2, heads * (dn + dr) + 5)  # a strided row, as the fused projection's view is
        w = rnd(heads * (dn + dv), r, scale=0.2)
        aid = torch.tensor([2, 0], device=device)
        la, lb = rnd(2 * rank, r, scale=0.3), rnd(2 * rank, heads * (dn + dv), scale=0.3)
        for lora, split in ((None, False), ((aid, la, lb, rank), False), (None, True), ((aid, la, lb, rank), True)):
            outs = [torch.empty(2, heads * dv, device=device, dtype=dtype) for _ in range(2)]
            for out, fused in zip(outs, (True, False), strict=True):
                kw: dict[str, Any] = {"heads": heads, "dn": dn, "dv": dv, "scale": 1 / math.sqrt(dn + dr)}
                kw |= {"interleaved": interleaved, "lora": lora, "split": split}
                mla_decode(q, w, cos, sin, pos, caches[1], out, fused=fused, **kw)
            if not close(outs[0], outs[1]):
                return f"mla_decode disagrees with torch (lora {lora is not None}, split {split})"
    return _moe_test(rnd, close, device, dtype)


def _moe_test(rnd: Any, close: Any, device: torch.device, dtype: torch.dtype) -> str | None:
    from node.serving.moe import route_torch

    m, e, hd, inter = 5, 16, 72, 40
    logits = torch.randn(m, e, device=device)
    bias = torch.randn(e, device=device) * 0.1
    for v3, groups, topk_group, norm in (
        (True, 4, 2, True),
        (True, 1, 1, False),
        (False, 1, 1, False),
        (False, 4, 2, False),
    ):
        idx = torch.empty(m, 3, dtype=torch.int32, device=device)
        wts = torch.empty(m, 3, dtype=torch.float32, device=device)
        kw: dict[str, Any] = {"top_k": 3, "n_group": groups, "topk_group": topk_group, "v3": v3, "norm": norm}
        moe_route(logits, bias if v3 else None, idx, wts, scaling=2.5, **kw)
        ref_w, ref_i = route_torch(logits, bias if v3 else None, method="group_limited_greedy", scaling=2.5, **kw)
        order, ref_order = idx.long().sort(dim=-1), ref_i.sort(dim=-1)
        if not torch.equal(order.values, ref_order.values):
            return f"moe_route picks other experts than torch (v3 {v3}, groups {groups})"
        if not torch.allclose(wts.gather(1, order.indices), ref_w.gather(1, ref_order.indices), atol=1e-5):
            return f"moe_route weighs the experts unlike torch (v3 {v3}, groups {groups})"
    x, ln = rnd(m, hd), rnd(hd)
    w_gu, w_down = rnd(e, 2 * inter, hd, scale=0.2), rnd(e, hd, inter, scale=0.2)
    idx = torch.randint(0, e, (m, 3), device=device, dtype=torch.int32)
    wts = torch.rand(m, 3, device=device)
    act = torch.empty(m * 3, inter, device=device, dtype=dtype)
    for norm_in, residual in ((True, True), (False, False)):
        outs = [rnd(m, hd) for _ in range(2)]
        outs[1].copy_(outs[0])
        for out, fused in zip(outs, (True, False), strict=True):
            moe_pairs(
                x,
                idx,
                wts,
                w_gu,
                w_down,
                act,
                out,
                ln=ln if norm_in else None,
                eps=1e-6,
                residual=residual,
                fused=fused,
            )
        if not close(outs[0], outs[1]):
            return f"moe_pairs disagrees with torch (norm {norm_in}, residual {residual})"
    return None


def time_graph(fn: Any) -> float:
    """Milliseconds per call of `fn` replayed as one CUDA graph (kernels.py's timing)."""
    return _time_graph(fn)
