"""The fast runner for DeepSeek-V2/V3 (multi-head latent attention + mixture of experts).

Like `FastRunner` (whose slot state, decode/prefill scheduling, CUDA-graph capture, sampling and
adapter API it inherits), it runs its own forward over the HF module's weights; only the model
differs.

**Latent KV cache.** A token's cache entry is what MLA compresses it to: the normalised latent
`c` (kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim), one [slots, max_len,
kv_lora_rank + rope] tensor per layer: 576 values a token at V2-Lite instead of 2 x 16 x 192 for
full K/V (10.7x less), exactly what HF's cache holds.

**Absorbed decode.** kv_b_proj's weight splits per head into W_UK [dn, r] (keys) and W_UV [dv, r]
(values) over the latent. A decode step never expands the cache: the query is moved into latent
space, `q_abs_h = W_UK_h^T q_nope_h` (one batched matmul over heads), the scores are
`[q_abs | q_rope] . [c | k_rope]` against the cache as it is, the attention output stays latent
(`P c`) and W_UV brings it to each head's value space before o_proj. Prefill uses the plain form
(kv_b_proj expands the prompt's latents to keys and values; flash/efficient SDPA).

**LoRA** (DESIGN.md: q_a_proj, q_b_proj or q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) through
the fast runner's bank (`Proj`): q_a/q (fused with kv_a_proj_with_mqa into one GEMM), q_b and o_proj
exactly as there. kv_b_proj's adapter is applied in rank space, so absorption stays exact per row
without an absorbed weight per adapter: with W' = W + B A,
`W'_UK^T q = W_UK^T q + A^T (B_UK^T q)` and `W'_UV o = W_UV o + B_UV (A o)`; each row keeps only
its own adapter's rank rows (the bank's owner mask), so several versions share one batch. Prefill
applies kv_b_proj's adapter the plain way (the same `Proj` rows).

**Rotary.** HF's cos/sin (YaRN's scaling included) per position and pair; DeepSeek-V3's interleaved
pairs and V2's complex form both become one rotation of pairs (2i, 2i+1), written back as
[all first | all second] (HF's V3 layout; V2 keeps the pairs interleaved, but q and k share the
permutation, so every score is the same); the softmax scale is HF's (YaRN mscale included).

**Decode paths.** On CUDA the decode step is one graph replay per (batch bucket, length bucket, live
adapters, sampling mode), as in FastRunner, and runs the kernels of mla_kernels.py: the latent
write, the absorbed attention (kv_b_proj's LoRA inside), the routing, and the routed experts as
either grouped GEMMs or expert pairs, whichever timed faster for that batch bucket at load (moe.py).
Batch 1 without adapters takes a fused path of about ten launches a layer (kernels.gemv with the
norms, SwiGLU and residual adds fused; fp32 residual stream). On the CPU, and wherever a kernel
fails its load-time checks (self-test, then this model's shapes against torch) or its graph
capture, the torch form serves: rotary by per-row rotation matrices (one batched matmul for all q
heads), the cache as keys for a batched matmul, MoE through grouped GEMMs. CI tests that form
against HF; tests/node/serving/test_mla_kernels.py runs the kernel paths under Triton's interpreter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from node.serving import kernels, mla_kernels
from node.serving.fast import (
    PREFILL_ATTENTION,
    FastRunner,
    LoraBank,
    Proj,
    _pow2_buckets,
    _unwrap,
)
from node.serving.kv_cache import length_buckets
from node.serving.moe import DenseMLP, MoE
from node.serving.quant import Linear

SUPPORTED = frozenset({"deepseek_v2", "deepseek_v3"})
GEMV_KINDS = ("qa", "qb", "o", "router", "gate_up", "down", "lm_head")
GEMV_CANDIDATES: dict[str, list[kernels.GemvConfig]] = {
    "qa": [(4, 512, 4, 1), (8, 512, 4, 1), (8, 256, 4, 1), (16, 256, 4, 1), kernels.CUBLAS],
    "qb": [(4, 512, 4, 1), (8, 256, 4, 1), (16, 256, 4, 1), kernels.CUBLAS],
    "o": [(8, 256, 4, 2), (16, 256, 4, 2), (8, 512, 8, 1), (8, 256, 4, 1), kernels.CUBLAS],
    "router": [(4, 256, 4, 1), (4, 512, 4, 1), (8, 256, 4, 1), kernels.CUBLAS],
    "gate_up": [(16, 256, 4, 1), (8, 256, 4, 1), (32, 128, 4, 1), (8, 512, 4, 1), kernels.CUBLAS],
    "down": [(16, 512, 8, 2), (8, 256, 4, 2), (16, 256, 4, 1), (8, 512, 8, 1), kernels.CUBLAS],
    "lm_head": [(8, 256, 4, 1), (16, 256, 4, 1), (8, 512, 4, 1), kernels.CUBLAS],
}
"""Per weight kind, the batch-1 GEMV configs `_tune` times (those of fast.py for the kinds of similar shape;
gate_up/down are the shared experts', and the dense layer's where that is the only MLP)."""
STATIC_ROPE = frozenset({"default", "linear", "yarn"})
"""Rope types whose frequencies do not depend on the sequence length (dynamic/longrope do; HF serves those)."""


def supports(model: Any) -> bool:
    """DeepSeek-V2/V3 causal LMs with SiLU experts and a static rope."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if cfg.model_type not in SUPPORTED or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    return str(rope.get("rope_type", "default")) in STATIC_ROPE


class LatentCache:
    """Per layer one [slots, max_len, kv_lora_rank + rope] tensor: the latent, then the rotated rope key."""

    def __init__(
        self, *, layers: int, slots: int, max_len: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.cache = [torch.zeros(slots, max_len, width, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len
        self.buckets = length_buckets(max_len)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.cache)

    def bucket(self, length: int) -> int:
        """The smallest attention width that covers `length` positions."""
        return next(b for b in self.buckets if b >= length)


@dataclass
class _MLALayer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qa: Proj  # [q_a_proj | kv_a_proj_with_mqa] or [q_proj | kv_a_proj_with_mqa]: one GEMM
    qb: Proj | None  # q_b_proj (q_lora_rank set) or None
    q_ln: torch.Tensor | None
    q_eps: float
    kv_ln: torch.Tensor
    kv_eps: float
    kvb: Proj  # kv_b_proj; W_UK / W_UV are views of its weight
    o: Proj
    mlp: DenseMLP | MoE
    w_uk: torch.Tensor  # [H, dn, r]
    w_uv_t: torch.Tensor  # [H, r, dv]

    def groups(self) -> dict[str, Proj]:
        """The LoRA groups (bank rows), by name."""
        out = {"qa": self.qa, "kvb": self.kvb, "o": self.o}
        if self.qb is not None:
            out["qb"] = self.qb
        return out

    def targets(self) -> dict[str, tuple[str, ...]]:
        """Each LoRA group's target modules (paths under the decoder layer), in bank order."""
        out = {
            "qa": ("self_attn.q_a_proj" if self.qb is not None else "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
            "kvb": ("self_attn.kv_b_proj",),
            "o": ("self_attn.o_proj",),
        }
        if self.qb is not None:
            out["qb"] = ("self_attn.q_b_proj",)
        return out


class MLALoraBank(LoraBank):
    """FastRunner's bank (slot s owns rows [s m r, (s+1) m r) of each group) over the MLA groups."""

    def targets(self, layer: Any) -> dict[str, tuple[str, ...]]:
        return cast(_MLALayer, layer).targets()


def rotation_basis(dim: int, *, interleaved: bool) -> torch.Tensor:
    """M [dim, dim * dim] with (cat(cos, sin) @ M).view(dim, dim) = the matrix R of one position's rotary:
    x @ R = cat(x1 cos - x2 sin, x2 cos + x1 sin), pairs (x1, x2) = (x[2i], x[2i+1]) if `interleaved`
    else (x[i], x[i + dim/2]); cos/sin [dim/2] per pair."""
    half = dim // 2
    m = torch.zeros(dim, dim, dim)  # [cos_i or sin_i, row, column]
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        m[i, a, i] = 1.0  # out[i] = x1 cos ...
        m[half + i, b, i] = -1.0  # ... - x2 sin
        m[i, b, half + i] = 1.0  # out[half + i] = x2 cos ...
        m[half + i, a, half + i] = 1.0  # ... + x1 sin
    return m.view(dim, dim * dim)


class MLARunner(FastRunner):
    """Static latent-KV, CUDA-graph decode runner for DeepSeek-V2/V3 (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        max_slots: int = 64,
        max_len: int | None = None,
        int8: bool = False,
        cuda_graphs: bool | None = None,
        max_adapters: int = 4,
        max_lora_rank: int = 16,
        share_weights: bool = True,
        fused: bool | None = None,
        moe: str | None = None,
    ) -> None:
        """`fused`: use the Triton kernels (default: on CUDA, where they compile and pass their
        self-test); `moe`: force the routed experts' form at every batch ("grouped" or "pairs"),
        default: timed per batch bucket at load on CUDA, grouped elsewhere."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        if not supports(base):
            raise ValueError(f"the MLA runner serves {sorted(SUPPORTED)} with SiLU and a static rope, not this model")
        if int8:
            raise ValueError("the MLA runner has no INT8 weights")
        self.max_slots = max_slots
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.device = base.lm_head.weight.device
        self.dtype = base.lm_head.weight.dtype
        self.int8 = False
        self.heads = int(cfg.num_attention_heads)
        self.dn, self.dr, self.dv = int(cfg.qk_nope_head_dim), int(cfg.qk_rope_head_dim), int(cfg.v_head_dim)
        self.kv_rank = int(cfg.kv_lora_rank)
        self.q_rank = None if cfg.q_lora_rank is None else int(cfg.q_lora_rank)
        self.head_dim = self.dn + self.dr  # for code that reads FastRunner's attribute
        self.eps = float(cfg.rms_norm_eps)
        attn0 = base.model.layers[0].self_attn
        self.scale = float(attn0.scaling)  # HF's softmax scale, YaRN mscale included
        # V3 rotates interleaved pairs when rope_interleave is set, halves otherwise; V2 always interleaves
        self.interleaved = cfg.model_type == "deepseek_v2" or bool(getattr(cfg, "rope_interleave", False))
        self.embed = base.model.embed_tokens.weight
        self.norm = base.model.norm.weight
        self.lm_head = Linear(base.lm_head.weight)
        share = share_weights
        self.blocks = [self._mla_layer(layer, max_adapters, max_lora_rank, share) for layer in base.model.layers]
        self._cos, self._sin = self._rope_tables(base)
        self._cs = torch.cat([self._cos, self._sin], dim=-1)  # [max_len, dr]: a step's rotation per row is cs[pos] @ M
        self._rot_basis = rotation_basis(self.dr, interleaved=self.interleaved).to(self.device)
        self.latent = LatentCache(
            layers=len(self.blocks),
            slots=max_slots,
            max_len=self.max_len,
            width=self.kv_rank + self.dr,
            dtype=self.dtype,
            device=self.device,
        )
        self.kv = self.latent  # type: ignore[assignment]  # FastRunner.decode reads only bucket()
        self.lora = MLALoraBank(self.blocks, adapters=max_adapters, rank=max_lora_rank)
        self._init_slot_state(max_slots)  # FastRunner's: its decode/prefill/capture read them
        self.batch_buckets = _pow2_buckets(max_slots)
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self.last_logits: torch.Tensor | None = None
        cuda = self.device.type == "cuda"
        triton_on = cuda if fused is None else fused
        # kernels.py (the LoRA/SwiGLU epilogue, the batch-1 GEMV) and mla_kernels.py (latent write, absorbed
        # attention, routing, expert pairs): each used only where it compiled and passed its self-test.
        self.lora_kernel_off: str | None = kernels.available(self.device) if triton_on else "off"
        if self.lora_kernel_off is None:
            for layer in self.blocks:
                for proj in (*layer.groups().values(), *_dense_projs(layer.mlp)):
                    proj.fused_lora = True
        self.kernels_off: str | None = mla_kernels.available(self.device) if triton_on else "off"
        self.fused_off: str | None = self.kernels_off or self.lora_kernel_off
        if self.fused_off is None and (cfg.attention_bias or getattr(cfg, "mlp_bias", False)):
            self.fused_off = "biases: the batch-1 path fuses bias-free projections only"
        if moe not in (None, "grouped", "pairs") or (moe == "pairs" and self.kernels_off is not None):
            raise ValueError(f"moe={moe!r}: 'grouped', or 'pairs' where the Triton kernels run ({self.kernels_off})")
        self.moe_path: dict[int, str] = dict.fromkeys(self.batch_buckets, moe or "grouped")
        moes = [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
        if moes and not moes[0].native:  # no grouped kernel for this dtype here (e.g. fp16 on CUDA): a host loop
            if moe is None and self.kernels_off is None:
                self.moe_path = dict.fromkeys(self.batch_buckets, "pairs")
            elif self.moe_path[self.batch_buckets[0]] == "grouped":
                self.use_graphs = False  # the loop syncs with the host: no graphs
            # Prefill always takes the grouped form: its capture could only fail, and a failed capture
            # can leave the allocator's capture state behind for the next graph (moe.grouped_mm_works).
            self.prefill_graphs_off = "no grouped-GEMM kernel for this dtype here: prefill loops on the host"
        self.moe_times: dict[str, dict[str, float]] = {}  # per batch bucket: form -> ms per step's MoE layers
        self.attn_split: dict[int, bool] = dict.fromkeys(self.batch_buckets, False)  # W_UK/W_UV by cuBLAS
        self.attn_times: dict[str, dict[str, float]] = {}  # per batch bucket: form -> ms per step's attention
        self._mla_cfg = mla_kernels.MLA_CONFIGS[0]
        self._moe_cfg = (mla_kernels.MOE_UP_CONFIGS[0], mla_kernels.MOE_DOWN_CONFIGS[0])
        self._gemv_cfg: dict[str, kernels.GemvConfig] = dict.fromkeys(GEMV_KINDS, (16, 64, 4, 1))
        self.gemv_times: dict[str, dict[str, float]] = {}
        self.tune_s = 0.0
        if cuda and self.kernels_off is None:
            t = time.perf_counter()
            try:
                self._tune(moe_auto=moe is None)
                why = self._check_real_shapes()
            except Exception as exc:  # e.g. a tile that fails to compile at this model's shapes
                why = f"tuning failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if why is not None:
                self._fall_back(why)
            self.tune_s = round(time.perf_counter() - t, 1)

    # ---- weights --------------------------------------------------------------------------
    def _mla_layer(self, layer: Any, adapters: int, rank: int, share: bool) -> _MLALayer:
        attn = layer.self_attn
        h, dn, dv, r = self.heads, self.dn, self.dv, self.kv_rank

        def proj(*mods: Any) -> Proj:
            return Proj([_unwrap(m) for m in mods], rank=rank, adapters=adapters, int8=False, share=share)

        q_lora = self.q_rank is not None
        qa = proj(attn.q_a_proj if q_lora else attn.q_proj, attn.kv_a_proj_with_mqa)
        kvb = proj(attn.kv_b_proj)
        w = kvb.lin.weight.view(h, dn + dv, r)
        mlp = MoE(layer.mlp, share=share) if hasattr(layer.mlp, "experts") else DenseMLP(layer.mlp, share=share)
        return _MLALayer(
            ln1=layer.input_layernorm.weight,
            ln2=layer.post_attention_layernorm.weight,
            qa=qa,
            qb=proj(attn.q_b_proj) if q_lora else None,
            q_ln=attn.q_a_layernorm.weight if q_lora else None,
            q_eps=float(attn.q_a_layernorm.variance_epsilon) if q_lora else 0.0,
            kv_ln=attn.kv_a_layernorm.weight,
            kv_eps=float(attn.kv_a_layernorm.variance_epsilon),
            kvb=kvb,
            o=proj(attn.o_proj),
            mlp=mlp,
            w_uk=w[:, :dn],
            w_uv_t=w[:, dn:].transpose(1, 2),
        )

    def _rope_tables(self, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position and pair, HF's own cos and sin (fp32, [max_len, dr / 2])."""
        pos = torch.arange(self.max_len, device=self.device)[None]
        with torch.no_grad():
            emb = base.model.rotary_emb(torch.zeros(1, dtype=torch.float32, device=self.device), pos)
        if isinstance(emb, tuple):  # V3: (cos, sin) as cat(freqs, freqs)
            cos, sin = emb[0][0].float(), emb[1][0].float()
            return cos[:, : self.dr // 2].contiguous(), sin[:, : self.dr // 2].contiguous()
        fc = emb[0]  # V2: complex exp(i freqs) [max_len, dr / 2] (YaRN's attention scaling folded in)
        return fc.real.float().contiguous(), fc.imag.float().contiguous()

    def weight_bytes(self, *, active_experts: int | None = None) -> int:
        """Weight bytes the engine holds (embedding table aside), or with `active_experts` per MoE layer
        what one batch-1 decode step reads (top-k)."""
        total = self.lm_head.nbytes() + self.norm.nbytes
        for layer in self.blocks:
            total += layer.ln1.nbytes + layer.ln2.nbytes + layer.kv_ln.nbytes
            total += 0 if layer.q_ln is None else layer.q_ln.nbytes
            total += sum(p.nbytes() for p in layer.groups().values())
            mlp = layer.mlp
            total += mlp.nbytes(active_experts) if isinstance(mlp, MoE) else mlp.nbytes()
        return total

    # ---- forward pieces -------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary of x [..., dr] (cos/sin broadcast to [..., dr / 2]) in fp32, as [firsts | seconds]."""
        xf = x.float()
        half = self.dr // 2
        x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if self.interleaved else (xf[..., :half], xf[..., half:])
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def _q(self, layer: _MLALayer, a: torch.Tensor, live: int, aid: torch.Tensor) -> torch.Tensor:
        """Queries [N, H (dn + dr)] from the fused first projection's output."""
        if layer.qb is None:
            return a[:, : self.heads * (self.dn + self.dr)]
        assert layer.q_ln is not None and self.q_rank is not None
        qn = F.rms_norm(a[:, : self.q_rank], (self.q_rank,), layer.q_ln, layer.q_eps)
        return layer.qb(qn, self.lora.rows(1, live), aid)

    def _latent(self, layer: _MLALayer, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised latent [N, r], raw rope key [N, dr]) from the fused first projection's output."""
        off = a.shape[1] - self.kv_rank - self.dr
        c = F.rms_norm(a[:, off : off + self.kv_rank], (self.kv_rank,), layer.kv_ln, layer.kv_eps)
        return c, a[:, off + self.kv_rank :]

    def _mlp(self, layer: _MLALayer, x: torch.Tensor, aid: torch.Tensor) -> None:
        """x += MLP(norm(x)), in place (dense or MoE; no LoRA on either)."""
        layer.mlp.residual(x, F.rms_norm(x, (x.shape[-1],), layer.ln2, self.eps), aid)

    def _prefill_rows(self, n: int, width: int, live: int, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill from the static prompt buffers (graph-capturable); returns (logits, first tokens).
        The plain (non-absorbed) form: kv_b_proj expands the prompt's latents to keys and values."""
        ids = self._p_ids[:n, :width]
        lens, slot_t, aid = self._p_long[:3, :n]
        row_aid = aid.repeat_interleave(width)
        h_, dn, dr, dv = self.heads, self.dn, self.dr, self.dv
        cos, sin = self._cos[:width, None], self._sin[:width, None]  # [W, 1, dr / 2]
        x = F.embedding(ids, self.embed).view(n * width, -1)
        for i, layer in enumerate(self.blocks):
            a = layer.qa(F.rms_norm(x, (x.shape[-1],), layer.ln1, self.eps), self.lora.rows(2, live), row_aid)
            q = self._q(layer, a, live, row_aid).view(n, width, h_, dn + dr)
            c, k_raw = self._latent(layer, a)
            k_rope = self._rope(k_raw.view(n, width, 1, dr), cos, sin)  # [n, W, 1, dr]
            self.latent.cache[i][slot_t, :width] = torch.cat([c.view(n, width, -1), k_rope.view(n, width, dr)], dim=-1)
            kv = layer.kvb(c, self.lora.rows(1, live), row_aid).view(n, width, h_, dn + dv)
            qr = torch.cat([q[..., :dn], self._rope(q[..., dn:], cos, sin)], dim=-1).transpose(1, 2)
            k = torch.cat([kv[..., :dn], k_rope.expand(n, width, h_, dr)], dim=-1).transpose(1, 2)
            v = kv[..., dn:].transpose(1, 2)
            with sdpa_kernel(PREFILL_ATTENTION):  # right padding: pad keys sit after each prompt, never attended
                o = F.scaled_dot_product_attention(qr, k, v, is_causal=True, scale=self.scale)
            layer.o.residual(x, o.transpose(1, 2).reshape(n * width, h_ * dv), self.lora.rows(1, live), row_aid)
            self._mlp(layer, x, row_aid)
        last = x.view(n, width, -1)[self._rows[:n], lens - 1]
        return self._prefill_sample(self.lm_head(F.rms_norm(last, (last.shape[-1],), self.norm, self.eps)), n, mode)

    def _decode_rows(self, batch: int, width: int, live: int, mode: int) -> torch.Tensor:
        """One decode step over rows 0..batch-1 from the static buffers, sampling included; graph-capturable.
        Absorbed attention over the latent cache (see the module docstring): through `mla_kernels` where
        they run (any adapters), else through torch; batch 1 without adapters takes the fused path."""
        if batch == 1 and live == 0 and self.fused_off is None:
            return self._advance(1, mode, self._forward_fused())
        pos, aid = self._pos[:batch], self._aid[:batch]
        h_, dn, dr = self.heads, self.dn, self.dr
        if self.kernels_off is not None:  # the torch form's per-step rotary matrices and key mask
            rot = (self._cs[pos] @ self._rot_basis).view(batch, dr, dr).to(self.dtype)
            bias = torch.zeros(batch, 1, width, dtype=self.dtype, device=self.device)
            bias.masked_fill_((self._keys[:width][None, :] > pos[:, None])[:, None, :], float("-inf"))
        x = F.embedding(self._tok[:batch], self.embed)
        for i, layer in enumerate(self.blocks):
            a = layer.qa(F.rms_norm(x, (x.shape[-1],), layer.ln1, self.eps), self.lora.rows(2, live), aid)
            q = self._q(layer, a, live, aid)
            cache = self.latent.cache[i]
            if self.kernels_off is None:
                o = self._attend_kernels(layer, a, q, cache, batch, live)
            else:
                o = self._attend_torch(layer, a, q.view(batch, h_, dn + dr), cache, batch, width, live, rot, bias)
            layer.o.residual(x, o, self.lora.rows(1, live), aid)
            self._mlp_decode(layer, x, aid, batch)
        return self._advance(batch, mode, self.lm_head(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)))

    def _attend_kernels(
        self,
        layer: _MLALayer,
        a: torch.Tensor,
        q: torch.Tensor,
        cache: torch.Tensor,
        batch: int,
        live: int,
        *,
        pos: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        fused: bool = True,
        split: bool | None = None,
    ) -> torch.Tensor:
        """Latent write + absorbed attention through two kernels: o_proj's input [B, H dv]. `pos`, `out`,
        `fused`, `split` default to the decode step's (the slots' positions, a fresh output, the kernels,
        the bucket's timed split); the load-time check passes its own to compare the forms."""
        pos = self._pos[:batch] if pos is None else pos
        mla_kernels.latent_write(
            a,
            layer.kv_ln,
            layer.kv_eps,
            self._cos,
            self._sin,
            pos,
            cache,
            off=a.shape[1] - self.kv_rank - self.dr,
            rank=self.kv_rank,
            interleaved=self.interleaved,
            fused=fused,
        )
        o = torch.empty(batch, self.heads * self.dv, dtype=self.dtype, device=self.device) if out is None else out
        lora = (self._aid[:batch], layer.kvb.a, layer.kvb.b, self.lora.rank) if live else None
        return mla_kernels.mla_decode(
            q,
            layer.kvb.lin.weight,
            self._cos,
            self._sin,
            pos,
            cache,
            o,
            heads=self.heads,
            dn=self.dn,
            dv=self.dv,
            scale=self.scale,
            interleaved=self.interleaved,
            lora=lora,
            cfg=self._mla_cfg,
            split=self.attn_split.get(batch, False) if split is None else split,
            fused=fused,
        )

    def _attend_torch(
        self,
        layer: _MLALayer,
        a: torch.Tensor,
        q: torch.Tensor,
        cache: torch.Tensor,
        batch: int,
        width: int,
        live: int,
        rot: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """The same in torch: rotary by per-row matrices, one batched matmul per step piece."""
        pos, rows, aid = self._pos[:batch], self._rows[:batch], self._aid[:batch]
        dn, dr, r = self.dn, self.dr, self.kv_rank
        c, k_raw = self._latent(layer, a)
        k_rope = torch.bmm(k_raw.view(batch, 1, dr), rot)
        cache[rows, pos] = torch.cat([c, k_rope.view(batch, dr)], dim=-1)
        q_abs = torch.bmm(q[..., :dn].transpose(0, 1), layer.w_uk).transpose(0, 1)  # [B, H, r]: W_UK absorbed
        if live:
            q_abs = q_abs + self._kvb_lora_query(layer, q[..., :dn], live, aid)
        q_lat = torch.cat([q_abs, torch.bmm(q[..., dn:], rot)], dim=-1)  # [B, H, r + dr]
        keys = cache[:batch, :width]  # [B, W, r + dr]: the cache as it is, never expanded
        scores = torch.baddbmm(bias, q_lat, keys.transpose(1, 2), alpha=self.scale)
        o_lat = torch.bmm(torch.softmax(scores, dim=-1), keys[..., :r])  # [B, H, r]
        o = torch.bmm(o_lat.transpose(0, 1), layer.w_uv_t).transpose(0, 1)  # [B, H, dv]: W_UV after attention
        if live:
            o = o + self._kvb_lora_value(layer, o_lat, live, aid)
        return o.reshape(batch, self.heads * self.dv)

    def _mlp_decode(self, layer: _MLALayer, x: torch.Tensor, aid: torch.Tensor, batch: int) -> None:
        """x += MLP(norm(x)): the MoE's routed experts as this batch bucket's timed form."""
        mlp = layer.mlp
        if not isinstance(mlp, MoE) or self.moe_path.get(batch) != "pairs":
            self._mlp(layer, x, aid)
            return
        h = F.rms_norm(x, (x.shape[-1],), layer.ln2, self.eps)
        idx = torch.empty(batch, mlp.top_k, dtype=torch.int32, device=self.device)
        wts = torch.empty(batch, mlp.top_k, dtype=torch.float32, device=self.device)
        mla_kernels.moe_route(F.linear(h.float(), mlp.gate_w32), mlp.bias, idx, wts, **mlp.route_kwargs())
        if mlp.shared is not None:
            mlp.shared.residual(x, h, aid)
        self._moe_pairs(mlp, h, idx, wts, x, fused=True)

    def _moe_pairs(
        self, mlp: MoE, h: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, y: torch.Tensor, *, fused: bool
    ) -> None:
        """y += the picked experts of `h`'s rows (routing `idx`/`wts`) as expert pairs, in the tuned tiles."""
        act = torch.empty(h.shape[0] * mlp.top_k, mlp.inter, dtype=self.dtype, device=self.device)
        up, down = self._moe_cfg
        mla_kernels.moe_pairs(
            h,
            idx,
            wts,
            mlp.w_gu,
            mlp.w_down,
            act,
            y,
            ln=None,
            eps=0.0,
            residual=True,
            up_cfg=up,
            down_cfg=down,
            fused=fused,
        )

    def _forward_fused(self) -> torch.Tensor:
        """Row 0's logits [1, vocab] without adapters in about ten launches a layer: GEMVs with the norms,
        SwiGLU and residual adds fused (kernels.gemv), the latent write and absorbed attention, routing and
        the picked experts (mla_kernels). The residual stream stays in fp32 here (split-K adds atomically)."""
        dev, dt, eps, cfg = self.device, self.dtype, self.eps, self._gemv_cfg
        x = F.embedding(self._tok[:1], self.embed).view(-1).float()
        for i, layer in enumerate(self.blocks):
            a = torch.empty(layer.qa.out, dtype=dt, device=dev)
            kernels.gemv(layer.qa.lin.weight, x, a, cfg=cfg["qa"], ln=layer.ln1, eps=eps)
            q = a
            if layer.qb is not None:
                assert self.q_rank is not None
                q = torch.empty(layer.qb.out, dtype=dt, device=dev)
                kernels.gemv(layer.qb.lin.weight, a[: self.q_rank], q, cfg=cfg["qb"], ln=layer.q_ln, eps=layer.q_eps)
            o = self._attend_kernels(layer, a.view(1, -1), q.view(1, -1), self.latent.cache[i], 1, 0)
            kernels.gemv(layer.o.lin.weight, o.view(-1), x, cfg=cfg["o"], residual=True)
            # every read of x (router, shared gate/up, the experts' gate/up) before either residual add
            mlp = layer.mlp
            dense = mlp if isinstance(mlp, DenseMLP) else mlp.shared
            if isinstance(mlp, MoE):
                logits = torch.empty(mlp.experts, dtype=torch.float32, device=dev)
                kernels.gemv(mlp.gate_w, x, logits, cfg=cfg["router"], ln=layer.ln2, eps=eps)
                idx = torch.empty(1, mlp.top_k, dtype=torch.int32, device=dev)
                wts = torch.empty(1, mlp.top_k, dtype=torch.float32, device=dev)
                mla_kernels.moe_route(logits.view(1, -1), mlp.bias, idx, wts, **mlp.route_kwargs())
                act = torch.empty(mlp.top_k, mlp.inter, dtype=dt, device=dev)
                mla_kernels.moe_up(x.view(1, -1), idx, mlp.w_gu, act, ln=layer.ln2, eps=eps, cfg=self._moe_cfg[0])
            if dense is not None:
                gu = torch.empty(dense.gate_up.out, dtype=dt, device=dev)
                kernels.gemv(dense.gate_up.lin.weight, x, gu, cfg=cfg["gate_up"], ln=layer.ln2, eps=eps)
                kernels.gemv(dense.down.lin.weight, gu, x, cfg=cfg["down"], swiglu=True, residual=True)
            if isinstance(mlp, MoE):
                mla_kernels.moe_down(act, idx, wts, mlp.w_down, x.view(1, -1), residual=True, cfg=self._moe_cfg[1])
        logits = torch.empty(self.lm_head.out_features, dtype=dt, device=dev)
        kernels.gemv(self.lm_head.weight, x, logits, cfg=cfg["lm_head"], ln=self.norm, eps=eps)
        return logits.view(1, -1)

    # ---- safety: the torch path serves wherever a kernel path fails ---------------------------
    def _fall_back(self, why: str) -> None:
        """Serve through torch from now on (graphs captured so far ran their kernels and stay)."""
        self.kernels_off = self.kernels_off or why
        self.fused_off = self.fused_off or why
        self.moe_path = dict.fromkeys(self.batch_buckets, "grouped")

    def _graph(self, batch: int, width: int, live: int, mode: int, *, replay: bool = True) -> torch.Tensor:
        """FastRunner's capture-or-replay; if capturing a kernel path fails (a shape the load-time checks
        did not compile, e.g. a new adapter rank), restore the rows the warm-up ran and fall back to torch."""
        saved = [t[:batch].clone() for t in (self._tok, self._pos)]
        try:
            return super()._graph(batch, width, live, mode, replay=replay)
        except Exception as exc:
            if self.kernels_off is not None and self.lora_kernel_off is not None:
                raise
            for buf, old in zip((self._tok, self._pos), saved, strict=True):
                buf[:batch].copy_(old)
            self._graphs.pop((batch, width, live, mode), None)
            self._fall_back(
                f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            if self.lora_kernel_off is None:  # the LoRA epilogue kernel too
                self.lora_kernel_off = self.kernels_off
                for layer in self.blocks:
                    for proj in (*layer.groups().values(), *_dense_projs(layer.mlp)):
                        proj.fused_lora = False
            return super()._graph(batch, width, live, mode, replay=replay)

    def _check_real_shapes(self) -> str | None:
        """The kernels at this model's shapes (layer 0's attention, the first MoE layer's routing and
        experts, two rows) against their torch formulas; None if they agree."""
        dev, dt = self.device, self.dtype
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) * scale).to(dev, dt)

        def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
            got, ref = got.float(), ref.float()
            tol = 3e-2 * float(ref.abs().max()) + 1e-6
            return bool(torch.isfinite(got).all()) and torch.allclose(got, ref, atol=tol, rtol=0)

        layer = self.blocks[0]
        pos = torch.tensor([min(self.max_len - 1, 40), 7], device=dev)
        a = rnd(2, layer.qa.out, scale=0.5)
        q = self._q(layer, a, 0, self._aid[:2]) if layer.qb is not None else a
        caches = [rnd(2, int(pos.max()) + 1, self.kv_rank + self.dr)]
        caches += [caches[0].clone(), caches[0].clone()]
        outs = [torch.empty(2, self.heads * self.dv, dtype=dt, device=dev) for _ in range(3)]
        forms = ((True, False), (True, True), (False, False))  # (fused, split): both kernel forms, then torch
        for cache, out, (fused, split) in zip(caches, outs, forms, strict=True):
            self._attend_kernels(layer, a, q, cache, 2, 0, pos=pos, out=out, fused=fused, split=split)
        if not all(close(c, caches[2]) and close(o, outs[2]) for c, o in zip(caches[:2], outs[:2], strict=True)):
            return "the attention kernels disagree with torch at this model's shapes"
        moe = next((b.mlp for b in self.blocks if isinstance(b.mlp, MoE)), None)
        if moe is None:
            return None
        h = rnd(2, self.embed.shape[1])
        logits = F.linear(h.float(), moe.gate_w32)
        idx = torch.empty(2, moe.top_k, dtype=torch.int32, device=dev)
        wts = torch.empty(2, moe.top_k, dtype=torch.float32, device=dev)
        mla_kernels.moe_route(logits, moe.bias, idx, wts, **moe.route_kwargs())
        ref_w, ref_i = moe.route(h)
        mine, theirs = idx.long().sort(dim=-1), ref_i.sort(dim=-1)
        if not torch.equal(mine.values, theirs.values) or not torch.allclose(
            wts.gather(1, mine.indices), ref_w.gather(1, theirs.indices), atol=1e-4
        ):
            return "the routing kernel disagrees with torch at this model's shapes"
        ys = [torch.zeros(2, h.shape[1], dtype=dt, device=dev) for _ in range(2)]
        for y, fused in zip(ys, (True, False), strict=True):
            self._moe_pairs(moe, h, idx, wts, y, fused=fused)
        if not (close(ys[0], ys[1]) and close(ys[0], moe.grouped(h, wts, idx.long()))):
            return "the expert kernels disagree with torch at this model's shapes"
        return None

    # ---- tuning (CUDA) ------------------------------------------------------------------------
    def _tune(self, *, moe_auto: bool = True) -> None:
        """Pick, by timing every layer's weights in one CUDA graph: each batch-1 GEMV kind's config (then
        checked against torch, as FastRunner does), the attention and expert kernels' tiles, and per batch
        bucket the routed experts' form (grouped GEMMs vs expert pairs; `moe_times` keeps the figures)."""
        dev, dt, hd, eps = self.device, self.dtype, self.embed.shape[1], self.eps
        blocks = self.blocks
        moes = [b.mlp for b in blocks if isinstance(b.mlp, MoE)]
        denses = [d for b in blocks if (d := b.mlp if isinstance(b.mlp, DenseMLP) else b.mlp.shared) is not None]
        x = torch.randn(hd, dtype=torch.float32, device=dev)

        def out(n: int, dtype: torch.dtype = dt) -> torch.Tensor:
            return torch.randn(n, dtype=dtype, device=dev)

        b0 = blocks[0]
        specs: dict[str, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, dict[str, Any]]] = {
            "qa": ([b.qa.lin.weight for b in blocks], x, out(b0.qa.out), {"ln": b0.ln1, "eps": eps}),
            "o": (
                [b.o.lin.weight for b in blocks],
                out(self.heads * self.dv),
                out(hd, torch.float32),
                {"residual": True},
            ),
            "lm_head": ([self.lm_head.weight], x, out(self.lm_head.out_features), {"ln": self.norm, "eps": eps}),
        }
        if b0.qb is not None and self.q_rank is not None:
            flags = {"ln": b0.q_ln, "eps": b0.q_eps}
            specs["qb"] = (
                [b.qb.lin.weight for b in blocks if b.qb is not None],
                out(self.q_rank),
                out(b0.qb.out),
                flags,
            )
        if moes:
            specs["router"] = (
                [m.gate_w for m in moes],
                x,
                out(moes[0].experts, torch.float32),
                {"ln": b0.ln2, "eps": eps},
            )
        if denses:  # the shared experts' shape where there are MoE layers (all but the first dense ones)
            shape = denses[-1].gate_up.lin.weight.shape
            same = [d for d in denses if d.gate_up.lin.weight.shape == shape]
            gu = out(shape[0])
            specs["gate_up"] = ([d.gate_up.lin.weight for d in same], x, gu, {"ln": b0.ln2, "eps": eps})
            specs["down"] = (
                [d.down.lin.weight for d in same],
                gu,
                out(hd, torch.float32),
                {"swiglu": True, "residual": True},
            )
        for name, (ws, inp, dst, flags) in specs.items():
            times = kernels.gemv_times(ws, inp, dst, GEMV_CANDIDATES[name], **flags)
            ranked = sorted(times, key=lambda c: times[c])
            self._gemv_cfg[name] = next(
                (c for c in ranked if kernels.check_gemv(ws[0], inp, dst, c, 3e-2, **flags) is None), kernels.CUBLAS
            )
            self.gemv_times[name] = {str(c): round(t, 4) for c, t in sorted(times.items(), key=lambda kv: kv[1])}
        self._mla_cfg = self._tune_attention()
        for batch in self.batch_buckets:
            forms = self._time_attention_forms(batch)
            self.attn_times[str(batch)] = forms
            self.attn_split[batch] = forms.get("split", float("inf")) < forms.get("fused", float("inf"))
        if moes:
            self._moe_cfg = self._tune_experts(moes)
            if moe_auto and moes[0].native:
                for batch in self.batch_buckets:
                    forms = self._time_moe_forms(moes, batch)
                    self.moe_times[str(batch)] = forms
                    self.moe_path[batch] = min(forms, key=lambda k: forms[k])

    def _tune_attention(self) -> tuple[int, int, int]:
        """The fastest of MLA_CONFIGS for one row over a 192-key context that matches the first config's output."""
        pos = torch.full((1,), min(self.max_len - 1, 192), device=self.device)
        layer, cache = self.blocks[0], self.latent.cache[0]
        q = torch.randn(1, self.heads * (self.dn + self.dr), dtype=self.dtype, device=self.device)
        kw: dict[str, Any] = {"heads": self.heads, "dn": self.dn, "dv": self.dv, "scale": self.scale}
        kw["interleaved"] = self.interleaved
        outs: dict[tuple[int, int, int], torch.Tensor] = {}
        times: dict[tuple[int, int, int], float] = {}
        for cfg in mla_kernels.MLA_CONFIGS:
            o = torch.empty(1, self.heads * self.dv, dtype=self.dtype, device=self.device)

            def run(cfg: tuple[int, int, int] = cfg, o: torch.Tensor = o) -> None:
                mla_kernels.mla_decode(
                    q, layer.kvb.lin.weight, self._cos, self._sin, pos, cache, o, cfg=cfg, fused=True, **kw
                )

            try:
                times[cfg] = mla_kernels.time_graph(run)
            except Exception:  # a tile that does not compile here is not a candidate
                continue
            outs[cfg] = o.float()
        ref = outs[mla_kernels.MLA_CONFIGS[0]]
        ok = [c for c in times if torch.allclose(outs[c], ref, atol=3e-2 * float(ref.abs().max()) + 1e-6)]
        self.gemv_times["mla_decode"] = {str(c): round(times[c], 4) for c in sorted(ok, key=lambda c: times[c])}
        return min(ok, key=lambda c: times[c])

    def _time_attention_forms(self, batch: int) -> dict[str, float]:
        """Milliseconds of every layer's absorbed attention at `batch` rows over 192 keys: W_UK/W_UV inside
        the kernel ("fused") or as cuBLAS batched matmuls around it ("split")."""
        pos = torch.full((batch,), min(self.max_len - 1, 192), device=self.device)
        q = torch.randn(batch, self.heads * (self.dn + self.dr), dtype=self.dtype, device=self.device)
        o = torch.empty(batch, self.heads * self.dv, dtype=self.dtype, device=self.device)
        kw: dict[str, Any] = {"heads": self.heads, "dn": self.dn, "dv": self.dv, "scale": self.scale}
        kw |= {"interleaved": self.interleaved, "cfg": self._mla_cfg, "fused": True}
        out: dict[str, float] = {}
        for name, split in (("fused", False), ("split", True)):

            def run(split: bool = split) -> None:
                for layer, cache in zip(self.blocks, self.latent.cache, strict=True):
                    w = layer.kvb.lin.weight
                    mla_kernels.mla_decode(q, w, self._cos, self._sin, pos, cache, o, split=split, **kw)

            try:
                out[name] = round(mla_kernels.time_graph(run), 4)
            except Exception:  # a form that cannot run or be captured here is not a candidate
                continue
        return out

    def _tune_experts(self, moes: list[MoE]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """The expert kernels' tiles at batch 1: each layer's experts picked at random, all layers in one graph."""
        dev, dt, hd = self.device, self.dtype, self.embed.shape[1]
        k, inter = moes[0].top_k, moes[0].inter
        gen = torch.Generator(device="cpu").manual_seed(0)
        idx = [torch.randperm(moes[0].experts, generator=gen)[:k].to(dev, torch.int32).view(1, k) for _ in moes]
        wts = torch.rand(1, k, device=dev)
        x, act, y = (
            torch.randn(1, hd, device=dev, dtype=dt),
            torch.empty(k, inter, device=dev, dtype=dt),
            torch.zeros(1, hd, device=dev),
        )
        picked = []
        for kind, configs in (("moe_up", mla_kernels.MOE_UP_CONFIGS), ("moe_down", mla_kernels.MOE_DOWN_CONFIGS)):
            times: dict[tuple[int, int, int], float] = {}
            results: dict[tuple[int, int, int], torch.Tensor] = {}
            for cfg in configs:

                def run(cfg: tuple[int, int, int] = cfg, kind: str = kind) -> None:
                    for m, ix in zip(moes, idx, strict=True):
                        if kind == "moe_up":
                            mla_kernels.moe_up(x, ix, m.w_gu, act, ln=None, eps=0.0, cfg=cfg)
                        else:
                            mla_kernels.moe_down(act, ix, wts, m.w_down, y, residual=False, cfg=cfg)

                try:
                    times[cfg] = mla_kernels.time_graph(run)
                except Exception:
                    continue
                results[cfg] = (act if kind == "moe_up" else y).float().clone()
            ref = results[configs[0]]
            ok = [c for c in times if torch.allclose(results[c], ref, atol=3e-2 * float(ref.abs().max()) + 1e-6)]
            self.gemv_times[kind] = {str(c): round(times[c], 4) for c in sorted(ok, key=lambda c: times[c])}
            picked.append(min(ok, key=lambda c: times[c]))
        return picked[0], picked[1]

    def _time_moe_forms(self, moes: list[MoE], batch: int) -> dict[str, float]:
        """Milliseconds of every MoE layer's routing + routed experts at `batch` rows, grouped vs pairs."""
        h = torch.randn(batch, self.embed.shape[1], device=self.device, dtype=self.dtype)
        y = torch.zeros_like(h)
        k = moes[0].top_k
        idx = torch.empty(batch, k, dtype=torch.int32, device=self.device)
        wts = torch.empty(batch, k, dtype=torch.float32, device=self.device)

        def grouped() -> None:
            for m in moes:
                w, ix = m.route(h)
                y.add_(m.grouped(h, w, ix))

        def pairs() -> None:  # as _mlp_decode runs them (its activations allocated in the graph's pool)
            for m in moes:
                mla_kernels.moe_route(F.linear(h.float(), m.gate_w32), m.bias, idx, wts, **m.route_kwargs())
                self._moe_pairs(m, h, idx, wts, y, fused=True)

        out: dict[str, float] = {}
        for name, fn in (("grouped", grouped), ("pairs", pairs)):
            try:
                out[name] = round(mla_kernels.time_graph(fn), 4)
            except Exception:  # a form that cannot run or be captured here is not a candidate
                continue
        return out or {"grouped": 0.0}

    def _kvb_bank(
        self, layer: _MLALayer, live: int, aid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [R, r], B^T [R, H, dn + dv], owner mask [B, R]) over the live adapters' kv_b_proj bank rows."""
        rows = self.lora.rows(1, live)
        owner = torch.arange(rows, device=self.device) // self.lora.rank + 1
        own = (owner[None, :] == aid[:, None]).to(self.dtype)
        return layer.kvb.a[:rows], layer.kvb.b[:rows].view(rows, self.heads, self.dn + self.dv), own

    def _kvb_lora_query(self, layer: _MLALayer, q_nope: torch.Tensor, live: int, aid: torch.Tensor) -> torch.Tensor:
        """A^T (B_UK^T q_nope) per head, each row with its own adapter: [B, H, r]."""
        a, bt, own = self._kvb_bank(layer, live, aid)
        u = torch.einsum("bhd,khd->bhk", q_nope, bt[..., : self.dn]) * own[:, None, :]
        return u @ a

    def _kvb_lora_value(self, layer: _MLALayer, o_lat: torch.Tensor, live: int, aid: torch.Tensor) -> torch.Tensor:
        """B_UV (A o_lat) per head, each row with its own adapter: [B, H, dv]."""
        a, bt, own = self._kvb_bank(layer, live, aid)
        w = (o_lat @ a.t()) * own[:, None, :]
        return torch.einsum("bhk,khd->bhd", w, bt[..., self.dn :])


def _dense_projs(mlp: DenseMLP | MoE) -> list[Proj]:
    dense = mlp if isinstance(mlp, DenseMLP) else mlp.shared
    return [] if dense is None else [dense.gate_up, dense.down]
