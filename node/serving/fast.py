"""The fast runner for the Qwen2/Llama family (the DeepSeek-R1-Distill models).

Our own forward over the HF module's weights: embedding, RMSNorm, rotary, GQA attention, SwiGLU.
q/k/v and gate/up are fused into one matmul each; by default the HF parameters become views of the
fused tensors, so the model is held once. K/V live in a static cache; a decode step runs over slot
rows 0..B-1 (B a power-of-two bucket; the scheduler keeps slots dense), attends over a bucketed
prefix of the cache with a per-row length mask, and on CUDA is replayed from a CUDA graph captured
per (batch bucket, length bucket). Several LoRA adapters run in the same batch: per fused group,
`x @ A_all` for every adapter at once, a per-row mask keeps the row's own adapter (index 0, the base
model, keeps none) and `@ B_all` adds the delta, so mixing versions costs two small matmuls per group
whatever the mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from node.serving.kv_cache import StaticKVCache
from node.serving.lora import LoraWeights
from node.serving.quant import Linear, LinearParts, linear
from node.serving.runner import UnknownAdapter

SUPPORTED = frozenset({"qwen2", "llama"})
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def supports(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return cfg.model_type in SUPPORTED and not getattr(cfg, "use_sliding_window", False)


def _pow2_buckets(n: int) -> list[int]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return [*out, n]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF's Qwen2RMSNorm: normalise in fp32, scale in the model dtype."""
    h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # one fused kernel on CUDA instead of six
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def lora_delta(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-row LoRA for a fused group: h [n, T, in], a [in, G*W], b [G*W, out], mask [n, 1, 1, W]."""
    t = (h @ a).unflatten(-1, (groups, -1)) * mask
    return t.flatten(-2) @ b


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    linears: dict[str, Linear]
    splits: dict[str, list[int]]


class LoraBank:
    """Stacked adapter weights per (layer, fused group); adapter slot a (1..N) owns columns a-1 of each block."""

    def __init__(self, layers: list[_Layer], *, adapters: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.n, self.rank = adapters, rank
        width = adapters * rank
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        for layer in layers:
            self.a.append({})
            self.b.append({})
            for g, lin in layer.linears.items():
                m = len(GROUPS[g])
                in_features = int(lin.weight.shape[1])
                self.a[-1][g] = torch.zeros(in_features, m * width, dtype=dtype, device=device)
                self.b[-1][g] = torch.zeros(m * width, lin.out_features, dtype=dtype, device=device)
        self.splits = [layer.splits for layer in layers]
        self.names: list[str | None] = [None] * adapters
        self.owner = torch.arange(width, device=device) // rank + 1

    def mask(self, adapter_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.owner[None, :] == adapter_ids[:, None]).to(dtype)[:, None, None, :]

    def load(self, name: str, weights: LoraWeights) -> int:
        """Copy an adapter into its slot (the same name replaces in place); returns its id (1..N)."""
        if name in self.names:
            slot = self.names.index(name)
        elif None in self.names:
            slot = self.names.index(None)
        else:
            raise RuntimeError(f"all {self.n} adapter slots are in use; unload one first")
        unknown = set(weights) - {
            f"model.layers.{i}.{t}" for i in range(len(self.a)) for ts in GROUPS.values() for t in ts
        }
        if unknown:
            raise ValueError(f"adapter {name!r} targets modules the engine does not serve: {sorted(unknown)[:3]}")
        if any(a.shape[0] > self.rank for a, _ in weights.values()):
            raise ValueError(f"adapter {name!r} has a rank above the engine's max LoRA rank {self.rank}")
        self._fill(slot, weights)
        self.names[slot] = name
        return slot + 1

    def unload(self, name: str) -> None:
        slot = self.names.index(name)
        self._fill(slot, {})
        self.names[slot] = None

    def _fill(self, slot: int, weights: LoraWeights) -> None:
        """Write (or, where `weights` lacks a module, zero) adapter slot `slot`'s columns and rows."""
        r = self.rank
        for i, (a_g, b_g) in enumerate(zip(self.a, self.b, strict=True)):
            for g, targets in GROUPS.items():
                ends = torch.tensor(self.splits[i][g]).cumsum(0).tolist()
                for t, target in enumerate(targets):
                    col, lo, hi = (t * self.n + slot) * r, ends[t] - self.splits[i][g][t], ends[t]
                    a_g[g][:, col : col + r].zero_()
                    b_g[g][col : col + r, lo:hi].zero_()
                    if (ab := weights.get(f"model.layers.{i}.{target}")) is not None:
                        rank = ab[0].shape[0]
                        a_g[g][:, col : col + rank] = ab[0].t().to(a_g[g])
                        b_g[g][col : col + rank, lo:hi] = ab[1].t().to(b_g[g])


class FastRunner:
    """Static-KV, CUDA-graph decode runner for Qwen2/Llama models (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        max_slots: int = 64,
        max_len: int | None = None,
        int8: bool = False,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        max_adapters: int = 4,
        max_lora_rank: int = 16,
        share_weights: bool = True,
    ) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        if not supports(base):
            raise ValueError(
                f"the fast runner serves {sorted(SUPPORTED)} without sliding windows, not {cfg.model_type}"
            )
        self.max_slots = max_slots
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.device = base.lm_head.weight.device
        self.dtype = base.lm_head.weight.dtype
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.eps = float(cfg.rms_norm_eps)
        self.int8 = int8
        self.embed = base.model.embed_tokens.weight
        self.norm = base.model.norm.weight
        self.lm_head = Linear(base.lm_head.weight, int8=int8)
        self.layers = [self._layer(layer, share=share_weights and not int8) for layer in base.model.layers]
        zero = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = base.model.rotary_emb(zero, torch.arange(self.max_len, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim], exactly HF's values
        self.kv = StaticKVCache(
            layers=len(self.layers),
            slots=max_slots,
            kv_heads=self.kv_heads,
            max_len=self.max_len,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.lora = LoraBank(
            self.layers, adapters=max_adapters, rank=max_lora_rank, dtype=self.dtype, device=self.device
        )
        self._len = [0] * max_slots
        self.batch_buckets = _pow2_buckets(max_slots)
        self._tok = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        self._aid = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        self._rows = torch.arange(max_slots, device=self.device)
        self._keys = torch.arange(self.max_len, device=self.device)
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self._pre, self._post = _pre_attention, _post_attention
        if compile:
            self._pre = torch.compile(_pre_attention, dynamic=None)
            self._post = torch.compile(_post_attention, dynamic=None)

    # ---- weights --------------------------------------------------------------------------
    def _layer(self, layer: Any, *, share: bool) -> _Layer:
        linears: dict[str, Linear] = {}
        splits: dict[str, list[int]] = {}
        for g, targets in GROUPS.items():
            mods = [_unwrap(layer.get_submodule(t)) for t in targets]
            ws = [m.weight for m in mods]
            weight = ws[0] if len(ws) == 1 else torch.cat([w.detach() for w in ws])
            if share and len(ws) > 1:  # the HF parameters become views of the fused tensor: one copy in memory
                for m, view in zip(mods, weight.split([w.shape[0] for w in ws]), strict=True):
                    m.weight.data = view
            biases = [m.bias for m in mods]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, ws, strict=True)]
                )
            linears[g] = Linear(weight.detach(), None if bias is None else bias.detach(), int8=self.int8)
            splits[g] = [int(w.shape[0]) for w in ws]
        return _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, linears, splits)

    def weight_bytes(self) -> int:
        """Bytes one decode step reads for weights (embedding rows aside)."""
        return self.lm_head.nbytes() + sum(
            lin.nbytes() + layer.ln1.nbytes + layer.ln2.nbytes
            for layer in self.layers
            for lin in layer.linears.values()
        )

    # ---- adapters -------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        return [n for n in self.lora.names if n is not None]

    def adapter_id(self, name: str | None) -> int:
        if name is None or name == "__base__":
            return 0
        if name not in self.lora.names:
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        return self.lora.names.index(name) + 1

    def load_adapter(self, name: str, weights: LoraWeights) -> int:
        return self.lora.load(name, weights)

    def unload_adapter(self, name: str) -> None:
        self.lora.unload(name)

    @property
    def lora_on(self) -> bool:
        return any(n is not None for n in self.lora.names)

    # ---- forward --------------------------------------------------------------------------
    def _layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lmask: torch.Tensor | None, attend: Any
    ) -> torch.Tensor:
        shape = (self.heads, self.kv_heads, self.head_dim)
        for i, layer in enumerate(self.layers):
            lin = layer.linears
            la = self.lora.a[i] if lmask is not None else None
            lb = self.lora.b[i] if lmask is not None else None
            q, k, v = self._pre(x, layer.ln1, self.eps, lin["qkv"].parts, cos, sin, shape, _ab(la, lb, "qkv"), lmask)
            o = attend(i, q, k, v)
            x = self._post(
                x, o, lin["o"].parts, layer.ln2, self.eps, lin["gate_up"].parts, lin["down"].parts, la, lb, lmask
            )
        return x

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], adapters: Sequence[int]) -> torch.Tensor:
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((n, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.tensor(list(p))
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        slot_t = torch.tensor(list(slots), device=self.device)
        lmask = self.lora.mask(torch.tensor(list(adapters), device=self.device), self.dtype) if self.lora_on else None

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.kv.write_prompt(i, slot_t, k, v)  # right padding: pad keys sit after each prompt, never attended
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
            return o.transpose(1, 2).reshape(n, width, -1)

        with torch.no_grad():
            x = F.embedding(ids.to(self.device), self.embed)
            x = self._layers(x, self.cos[:width], self.sin[:width], lmask, attend)
            last = x[torch.arange(n, device=self.device), lens - 1]
            logits = self.lm_head(rms_norm(last, self.norm, self.eps))
        for s, p in zip(slots, prompts, strict=True):
            self._len[s] = len(p)
        return logits

    def _decode_rows(self, batch: int, width: int, lora_on: bool) -> torch.Tensor:
        """One decode step over rows 0..batch-1 from the static inputs; graph-capturable."""
        tok, pos = self._tok[:batch], self._pos[:batch]
        rows = self._rows[:batch]
        cos, sin = self.cos[pos][:, None, None, :], self.sin[pos][:, None, None, :]
        amask = (self._keys[:width][None, :] <= pos[:, None])[:, None, None, :]
        lmask = self.lora.mask(self._aid[:batch], self.dtype) if lora_on else None
        group = self.heads // self.kv_heads

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.kv.write_token(i, rows, pos, k[:, :, 0], v[:, :, 0])
            keys, values = self.kv.keys[i][:batch, :, :width], self.kv.values[i][:batch, :, :width]
            qg = q.reshape(batch, self.kv_heads, group, self.head_dim)  # query heads of one KV head side by side
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=amask)
            return o.reshape(batch, 1, -1)

        x = F.embedding(tok, self.embed)[:, None, :]
        x = self._layers(x, cos, sin, lmask, attend)
        return self.lm_head(rms_norm(x[:, 0], self.norm, self.eps))

    def decode(self, slots: Sequence[int], tokens: Sequence[int], adapters: Sequence[int]) -> torch.Tensor:
        batch = next(b for b in self.batch_buckets if b > max(slots))
        host = torch.zeros((3, batch), dtype=torch.long)
        for s, t, a in zip(slots, tokens, adapters, strict=True):
            host[0, s], host[1, s], host[2, s] = t, self._len[s], a
        width = self.kv.bucket(int(host[1].max()) + 1)
        for buf, row in zip((self._tok, self._pos, self._aid), host, strict=True):
            buf[:batch].copy_(row, non_blocking=True)
        with torch.no_grad():
            out = self._graph(batch, width) if self.use_graphs else self._decode_rows(batch, width, self.lora_on)
        for s in slots:
            self._len[s] += 1
        return out[torch.tensor(list(slots), device=self.device)]

    def _graph(self, batch: int, width: int) -> torch.Tensor:
        """Replay (capturing first if new) the decode graph of this bucket."""
        key = (batch, width, self.lora_on)
        if key not in self._graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (allocator, cuBLAS, compile)
                for _ in range(2):
                    self._decode_rows(batch, width, key[2])
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._decode_rows(batch, width, key[2])
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def capture(self, max_batch: int | None = None) -> int:
        """Capture every decode graph up to `max_batch` rows ahead of serving (no-op off CUDA)."""
        if not self.use_graphs:
            return 0
        saved = self._len[:]
        with torch.no_grad():
            for batch in self.batch_buckets:
                if max_batch is not None and batch > max_batch and batch != self.batch_buckets[0]:
                    break
                for width in self.kv.buckets:
                    self._pos[:batch].fill_(width - 1)  # free slots only: capture runs write into them
                    self._graph(batch, width)
        self._len = saved
        return len(self._graphs)

    def release(self, slot: int) -> None:
        self._len[slot] = 0


def _unwrap(module: Any) -> Any:
    """The plain Linear under a peft LoRA wrapper (the runner applies LoRA itself)."""
    return getattr(module, "base_layer", module)


def _ab(
    la: dict[str, torch.Tensor] | None, lb: dict[str, torch.Tensor] | None, group: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if la is None or lb is None else (la[group], lb[group])


def _linear(
    lin: LinearParts,
    x: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
    groups: int,
) -> torch.Tensor:
    y = linear(x, lin)
    if lora is not None and mask is not None:
        y = y + lora_delta(x, lora[0], lora[1], mask, groups)
    return y


def _pre_attention(
    x: torch.Tensor,
    ln: torch.Tensor,
    eps: float,
    qkv: LinearParts,
    cos: torch.Tensor,
    sin: torch.Tensor,
    shape: tuple[int, int, int],
    lora: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused q/k/v projection (+ LoRA), rotary: q [n, heads, T, D], k and v [n, kv_heads, T, D]."""
    heads, kv_heads, dim = shape
    n, t = x.shape[:2]
    h = rms_norm(x, ln, eps)
    qk, v = _linear(qkv, h, lora, mask, 3).split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk = rotate(qk.view(n, t, heads + kv_heads, dim).transpose(1, 2), cos, sin)  # q and k heads in one pass
    v = v.view(n, t, kv_heads, dim).transpose(1, 2)
    return qk[:, :heads], qk[:, heads:], v


def _post_attention(
    x: torch.Tensor,
    o: torch.Tensor,
    o_proj: LinearParts,
    ln: torch.Tensor,
    eps: float,
    gate_up: LinearParts,
    down: LinearParts,
    la: dict[str, torch.Tensor] | None,
    lb: dict[str, torch.Tensor] | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Output projection and residual, then the SwiGLU MLP and residual (each + LoRA)."""
    x = x + _linear(o_proj, o, _ab(la, lb, "o"), mask, 1)
    gate, up = _linear(gate_up, rms_norm(x, ln, eps), _ab(la, lb, "gate_up"), mask, 2).chunk(2, dim=-1)
    return x + _linear(down, F.silu(gate) * up, _ab(la, lb, "down"), mask, 1)
