"""The fast runner for the Qwen2/Llama family (the DeepSeek-R1-Distill models).

Our own forward over the HF module's weights: embedding, RMSNorm, rotary, GQA attention, SwiGLU.
q/k/v and gate/up are fused into one matmul each; by default the HF parameters become views of the
fused tensors, so the model is held once. K/V live in a static cache.

A decode step is self-contained on the device: it reads each slot's last token, position and
sampling parameters from static buffers, runs the model over rows 0..B-1 (B a power-of-two bucket;
the scheduler keeps slots dense), samples the next token (greedy or seeded, see sampling.py) and
writes it and the advanced position back into those buffers. On CUDA the whole step is one CUDA
graph replay per (batch bucket, length bucket, live adapters, sampling mode), so the host launches
step t+1 before it has read step t's tokens (the scheduler checks stops one step behind).

Constrained rows (a JSON schema, grammar.py) keep the graphs: the step runs as usual, then the rows
that `constrain` named are sampled again, eagerly, from the graph's logits with their bitmask
applied, with the same seeded draw (same seed and token index), and their token in `_tok` (the next
step's input) is overwritten: a few small kernels for those rows only, after the replay. Logprobs
likewise come from the step's logits after the replay, only when a running row asked for them.

Kernels per layer are kept few because at batch 1 each costs about as much as it computes: one
RMSNorm kernel, rotary of every q and k head as one batched matmul by a per-row rotation matrix
(built once per step), residual adds folded into the o/down matmuls (`addmm_`), one additive
attention mask per step.

Several LoRA adapters run in the same batch. Adapter slot s owns `m * rank` rows of each group's A
(m = targets in the group: 3 for q/k/v, 2 for gate/up, 1 for o and down) and the same rows of B;
the A rows are stored under the base weight, so ONE matmul yields the base output and every live
adapter's `x A^T`. One Triton kernel per group (`kernels.lora`) then adds each row's own adapter,
`(x A^T)_own B_own`, with the group's epilogue: in place for q/k/v, into the residual stream for o
and down, SwiGLU for gate/up (which runs it without adapters too, as the fused silu * up). The row's
adapter id selects its bank rows inside the kernel: no mask tensors, no side stream. Only the rows
of slots up to the highest adapter id in the running batch are computed, so the cost follows the
adapters in use, not the bank's capacity. Batch-1 steps without adapters take the fused Triton
GEMV path (kernels.py) where it compiled and passed its check; the torch path (and `lora`'s torch
formula) serves elsewhere, the CPU included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from node.serving import kernels
from node.serving.kv_cache import StaticKVCache
from node.serving.lora import LoraWeights
from node.serving.quant import Linear, linear
from node.serving.runner import Prompt, UnknownAdapter
from node.serving.sampling import RowSampling, StepLogprobs, apply_bitmask, logprob_rows, sample, token_logprobs

SUPPORTED = frozenset({"qwen2", "llama"})
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
GREEDY, RANDOM, RANDOM_TOP_P = 0, 1, 2  # sampling modes: each is its own decode graph
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Prefill attention backends: not cuDNN, whose plan is built per new (prompts, length) shape (seen
as 85 ms prefills of 29 and 35 prompts on an H200 against 45 ms for 64 prompts of a warm shape)."""
GEMV_CANDIDATES: dict[str, list[kernels.GemvConfig]] = {
    "qkv": [(4, 512, 4, 1), (8, 512, 4, 1), (2, 512, 4, 1), (4, 256, 4, 1), kernels.CUBLAS],
    "o": [(8, 256, 4, 3), (32, 128, 4, 12), (16, 256, 4, 6), (8, 512, 8, 3), kernels.CUBLAS],
    "gate_up": [(32, 128, 4, 1), (16, 256, 4, 1), (8, 256, 4, 1), (64, 128, 8, 1), kernels.CUBLAS],
    "down": [(16, 512, 8, 9), (16, 512, 8, 6), (32, 128, 4, 14), (8, 512, 8, 9), kernels.CUBLAS],
    "lm_head": [(8, 256, 4, 1), (16, 256, 4, 1), (8, 512, 4, 1), (4, 256, 4, 1), kernels.CUBLAS],
}
"""Per weight kind, the fused GEMV configs `_tune` times: the fastest of `kernels.gemv_candidates`
for the R1-Distill-1.5B shapes on an H200 (bench/results/serving_profile_h200_2026-11-28_sweep.json)
and neighbours; a kind not listed gets all of `gemv_candidates`."""


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
    """One fused kernel on CUDA; computes in fp32 internally (HF's Qwen2RMSNorm up to one rounding)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """M with x @ M == cat(-x[half:], x[:half]) (HF's rotate_half) for row vectors x."""
    half = dim // 2
    m = torch.zeros(dim, dim)
    idx = torch.arange(half)
    m[idx + half, idx] = -1.0
    m[idx, idx + half] = 1.0
    return m


class Proj:
    """One fused projection group with its LoRA bank rows (`capacity * m * rank` of A and of B).

    Unless the weight is INT8, the bank's A rows sit under the base weight in one tensor (`full`), so
    ONE matmul yields the base output and every live adapter's `x A^T`; `lora` (a Triton kernel on
    CUDA, `kernels.lora`) then adds each row's own adapter `(x A^T)_own B_own` in one pass, together
    with the group's epilogue: in place (q/k/v), into the residual stream (o, down), or SwiGLU
    (gate/up, which runs that kernel even with no adapter, as the fused silu * up)."""

    def __init__(self, mods: list[Any], *, rank: int, adapters: int, int8: bool, share: bool) -> None:
        ws = [m.weight for m in mods]
        self.m = len(ws)
        self.rb = self.m * rank  # bank rows per adapter
        lora_rows = adapters * self.rb
        self.splits = [int(w.shape[0]) for w in ws]
        self.out = sum(self.splits)
        in_features = int(ws[0].shape[1])
        dtype, device = ws[0].dtype, ws[0].device
        biases = [m.bias for m in mods]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, ws, strict=True)])
        self.full: torch.Tensor | None = None  # [out + lora_rows, in]: base rows, then LoRA A rows
        self.full_bias: torch.Tensor | None = None
        if not int8:
            self.full = torch.zeros(self.out + lora_rows, in_features, dtype=dtype, device=device)
            self.full[: self.out] = torch.cat([w.detach() for w in ws])
            weight = self.full[: self.out]
            if share:  # the HF parameters become views of the fused tensor: one copy in memory
                for mod, view in zip(mods, weight.split(self.splits), strict=True):
                    mod.weight.data = view
            if bias is not None:
                self.full_bias = torch.zeros(self.out + lora_rows, dtype=dtype, device=device)
                self.full_bias[: self.out] = bias.detach()
                bias = self.full_bias[: self.out]
            self.a = self.full[self.out :]
        else:
            weight = ws[0].detach() if self.m == 1 else torch.cat([w.detach() for w in ws])
            self.a = torch.zeros(lora_rows, in_features, dtype=dtype, device=device)
        self.lin = Linear(weight, None if bias is None else bias.detach(), int8=int8)
        self.b = torch.zeros(lora_rows, self.out, dtype=dtype, device=device)
        self.fused_lora = False  # the runner switches to the Triton kernel where it passed

    def _both(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x W^T + bias, x A^T over the first `rows` bank rows): one GEMM where the bank sits under W."""
        if self.full is None:
            return linear(x, self.lin.parts), F.linear(x, self.a[:rows])
        bias = None if self.full_bias is None else self.full_bias[: self.out + rows]
        both = F.linear(x, self.full[: self.out + rows], bias)
        return both[:, : self.out], both[:, self.out :]

    def __call__(self, x: torch.Tensor, rows: int, aid: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> [N, out], each row with its own adapter (`aid` [N], 0: none) of the first `rows`."""
        if rows == 0:
            return linear(x, self.lin.parts)
        y, t = self._both(x, rows)
        return kernels.lora(y, t, self.b[:rows], aid, y, rows_per_adapter=self.rb, mode=0, fused=self.fused_lora)

    def swiglu(self, x: torch.Tensor, rows: int, aid: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this (gate/up) group's output, adapters included: [N, out / 2]."""
        if rows == 0:
            y, t = linear(x, self.lin.parts), x.new_empty(x.shape[0], 0)
        else:
            y, t = self._both(x, rows)
        out = torch.empty(x.shape[0], self.out // 2, dtype=y.dtype, device=y.device)
        return kernels.lora(y, t, self.b[:rows], aid, out, rows_per_adapter=self.rb, mode=2, fused=self.fused_lora)

    def residual(self, x: torch.Tensor, inp: torch.Tensor, rows: int, aid: torch.Tensor) -> None:
        """x += proj(inp), in place (without adapters the add rides in the matmul where the weight allows)."""
        if rows:
            y, t = self._both(inp, rows)
            kernels.lora(y, t, self.b[:rows], aid, x, rows_per_adapter=self.rb, mode=1, fused=self.fused_lora)
            return
        weight, bias, scale = self.lin.parts
        if scale is None and bias is None:
            x.addmm_(inp, weight.t())
        else:
            x.add_(linear(inp, self.lin.parts))

    def nbytes(self) -> int:
        return self.lin.nbytes()


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: Proj
    o: Proj
    gate_up: Proj
    down: Proj

    def groups(self) -> dict[str, Proj]:
        return {"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down}


class LoraBank:
    """Which adapter owns which slot of every group's bank rows; slot s (id s+1) owns rows
    `[s * m * rank, (s + 1) * m * rank)`, target t of the group inside at `t * rank`."""

    def __init__(self, layers: Sequence[Any], *, adapters: int, rank: int) -> None:
        self.layers, self.n, self.rank = layers, adapters, rank
        self.names: list[str | None] = [None] * adapters

    def targets(self, layer: Any) -> dict[str, tuple[str, ...]]:
        """Group name -> the HF module names (under `model.layers.{i}.`) its targets serve, in bank order;
        the per-layer hook a model family with other groups (mla.MLALoraBank) overrides."""
        return GROUPS

    def rows(self, m: int, live: int) -> int:
        """Bank rows a group of `m` targets computes when adapter ids up to `live` run."""
        return live * m * self.rank

    def live(self) -> int:
        return max((i + 1 for i, n in enumerate(self.names) if n is not None), default=0)

    def load(self, name: str, weights: LoraWeights) -> int:
        """Copy an adapter into its slot (the same name replaces in place); returns its id (1..N)."""
        if name in self.names:
            slot = self.names.index(name)
        elif None in self.names:
            slot = self.names.index(None)  # the lowest free slot keeps live ids dense
        else:
            raise RuntimeError(f"all {self.n} adapter slots are in use; unload one first")
        unknown = set(weights) - {
            f"model.layers.{i}.{t}"
            for i, layer in enumerate(self.layers)
            for ts in self.targets(layer).values()
            for t in ts
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
        """Write (or, where `weights` lacks a module, zero) adapter slot `slot`'s rows."""
        r = self.rank
        for i, layer in enumerate(self.layers):
            targets = self.targets(layer)
            for g, proj in layer.groups().items():
                ends = torch.tensor(proj.splits).cumsum(0).tolist()
                for t, target in enumerate(targets[g]):
                    row, lo, hi = (slot * proj.m + t) * r, ends[t] - proj.splits[t], ends[t]
                    proj.a[row : row + r].zero_()
                    proj.b[row : row + r].zero_()
                    if (ab := weights.get(f"model.layers.{i}.{target}")) is not None:
                        rank = ab[0].shape[0]
                        proj.a[row : row + rank] = ab[0].to(proj.a)
                        proj.b[row : row + rank, lo:hi] = ab[1].t().to(proj.b)


class FastRunner:
    """Static-KV, CUDA-graph decode runner for Qwen2/Llama models (see the module docstring)."""

    # Class-level, so a subclass with its own __init__ (mla.MLARunner) has them too.
    last_logprobs: StepLogprobs | None = None
    """runner.LogprobRunner: the last prefill/decode's logprobs when a row asked (else None)."""
    _allowed: tuple[list[int], torch.Tensor] | None = None  # runner.GuidedRunner: the next call's masks

    @property
    def vocab_size(self) -> int:
        """The logits' width (a grammar bitmask's)."""
        return int(self.lm_head.out_features)

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
        share = share_weights and not int8
        self.layers = [self._layer(layer, max_adapters, max_lora_rank, share) for layer in base.model.layers]
        zero = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = base.model.rotary_emb(zero, torch.arange(self.max_len, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim], exactly HF's values
        self._rot_half = rotate_half_matrix(self.head_dim).to(self.device, self.dtype)
        self.kv = StaticKVCache(
            layers=len(self.layers),
            slots=max_slots,
            kv_heads=self.kv_heads,
            max_len=self.max_len,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.lora = LoraBank(self.layers, adapters=max_adapters, rank=max_lora_rank)
        self._init_slot_state(max_slots)
        self.batch_buckets = _pow2_buckets(max_slots)
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self.last_logits: torch.Tensor | None = None  # the latest step's logits (rows 0..B-1), for tests
        cuda = self.device.type == "cuda"
        # Triton kernels: the per-row LoRA/SwiGLU epilogue at any batch, and the fused batch-1 decode
        # without adapters (kernels.py); each is used only where it compiled and passed its self-test.
        triton_on = cuda if fused is None else fused
        self.lora_kernel_off: str | None = kernels.available(self.device) if triton_on and not int8 else "off"
        if self.lora_kernel_off is None:
            for layer in self.layers:
                for proj in layer.groups().values():
                    proj.fused_lora = True
        self.fused_off: str | None = self.lora_kernel_off
        self._gemv_cfg: dict[str, kernels.GemvConfig] = {}
        self.gemv_times: dict[str, dict[str, float]] = {}  # per weight kind: config -> ms per step's pass
        self._attn_cfg = kernels.ATTENTION_CONFIGS[0]
        if self.fused_off is None:
            try:
                self._tune()
            except Exception as exc:  # e.g. a tile that fails to compile: keep the torch path
                self.fused_off = f"tuning failed: {type(exc).__name__}: {exc}"

    # ---- weights --------------------------------------------------------------------------
    def _layer(self, layer: Any, adapters: int, rank: int, share: bool) -> _Layer:
        projs = {
            g: Proj(
                [_unwrap(layer.get_submodule(t)) for t in targets],
                rank=rank,
                adapters=adapters,
                int8=self.int8,
                share=share,
            )
            for g, targets in GROUPS.items()
        }
        return _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, **projs)

    def weight_bytes(self) -> int:
        """Bytes one decode step reads for weights (embedding rows aside)."""
        return self.lm_head.nbytes() + sum(
            p.nbytes() + layer.ln1.nbytes + layer.ln2.nbytes for layer in self.layers for p in layer.groups().values()
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

    # ---- forward --------------------------------------------------------------------------
    def _layer_mlp(self, layer: _Layer, x: torch.Tensor, live: int, aid: torch.Tensor) -> None:
        """x += MLP(norm(x)), in place."""
        act = layer.gate_up.swiglu(rms_norm(x, layer.ln2, self.eps), self.lora.rows(2, live), aid)
        layer.down.residual(x, act, self.lora.rows(1, live), aid)

    def prefill(
        self, slots: Sequence[int], prompts: Sequence[Prompt], adapters: Sequence[int], sampling: Sequence[RowSampling]
    ) -> torch.Tensor:
        """Fill `slots` from `prompts`, sample each first token; returns them ([n], on the device).

        A single prompt without an adapter is padded to a length bucket and, where `capture()` made
        one, replayed from a CUDA graph: eager prefill costs a few hundred launches of host time."""
        n, live, mode = len(prompts), max(adapters), _mode(sampling)
        longest = max(len(p) for p in prompts)
        single = n == 1 and live == 0
        width = next(b for b in self.prefill_buckets if b >= longest) if single else longest
        ids = torch.zeros((n, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.tensor(list(p))
        self._p_ids[:n, :width].copy_(ids, non_blocking=True)
        meta = [[len(p) for p in prompts], list(slots), list(adapters), [r.seed for r in sampling]]
        self._p_long[:, :n].copy_(torch.tensor(meta), non_blocking=True)
        temp_top_p = [[r.temperature for r in sampling], [r.top_p for r in sampling]]
        self._p_float[:, :n].copy_(torch.tensor(temp_top_p, dtype=torch.float32), non_blocking=True)
        with torch.no_grad():
            if single and (width, mode) in self._prefill_graphs:
                graph, (logits, tokens) = self._prefill_graphs[(width, mode)]
                graph.replay()
            else:
                logits, tokens = self._prefill_rows(n, width, live, mode)
            if self._allowed is not None:  # constrained rows: sample again among their allowed tokens
                masked, bitmask = self._allowed
                at = {s: i for i, s in enumerate(slots)}
                rows = [at[s] for s in masked]
                idx = torch.tensor(rows, device=self.device)
                nxt = self._resample(
                    logits[idx],
                    bitmask,
                    [sampling[r] for r in rows],
                    self._p_float[0, idx],
                    self._p_float[1, idx],
                    self._p_long[3, idx],
                    torch.zeros(len(rows), dtype=torch.long, device=self.device),
                )
                tokens[idx] = nxt
                self._tok.index_copy_(0, self._p_long[1, idx], nxt)
            k = logprob_rows(sampling)
            self.last_logprobs = None if k is None else token_logprobs(logits, tokens, k)
        self._allowed = None
        self.last_logits = logits
        for s, p, a, smp in zip(slots, prompts, adapters, sampling, strict=True):
            self._len[s], self._aid_host[s], self._sampling[s] = len(p), a, smp
        return tokens

    def _init_slot_state(self, max_slots: int) -> None:
        """Per-slot state the decode step reads and advances on the device (static addresses for graphs),
        and its host mirrors; shared with mla.MLARunner, whose prefill/decode/capture read the same."""
        dev, s = self.device, max_slots
        self._tok = torch.zeros(s, dtype=torch.long, device=dev)  # the slot's last token: the next input
        self._pos = torch.zeros(s, dtype=torch.long, device=dev)  # its position
        self._plen = torch.zeros(s, dtype=torch.long, device=dev)  # prompt length (sampling step = pos - plen + 1)
        self._aid = torch.zeros(s, dtype=torch.long, device=dev)
        self._active = torch.zeros(s, dtype=torch.bool, device=dev)
        self._temp = torch.zeros(s, dtype=torch.float32, device=dev)
        self._top_p = torch.ones(s, dtype=torch.float32, device=dev)
        self._seed = torch.zeros(s, dtype=torch.long, device=dev)
        self._rows = torch.arange(s, device=dev)
        self._p_ids = torch.zeros(s, self.max_len, dtype=torch.long, device=dev)  # prefill inputs (static)
        self._p_long = torch.zeros(4, s, dtype=torch.long, device=dev)  # lengths, slots, adapter ids, seeds
        self._p_float = torch.zeros(2, s, dtype=torch.float32, device=dev)  # temperatures, top-p
        self.prefill_buckets = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048) if b < self.max_len]
        self.prefill_buckets.append(self.max_len)
        self._prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.prefill_graphs_off: str | None = None
        self._keys = torch.arange(self.max_len, device=dev)
        # Host mirrors: what the host needs to pick a graph without reading the device.
        self._len = [0] * s
        self._aid_host = [0] * s
        self._sampling: list[RowSampling | None] = [None] * s
        self._active_host = [False] * s

    def _prefill_rows(self, n: int, width: int, live: int, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill from the static prompt buffers (graph-capturable); returns (logits, first tokens)."""
        ids = self._p_ids[:n, :width]
        lens, slot_t, aid = self._p_long[:3, :n]
        row_aid = aid.repeat_interleave(width)
        h_, kvh, d = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[:width], self.sin[:width]
        x = F.embedding(ids, self.embed).view(n * width, -1)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.ln1, self.eps), self.lora.rows(3, live), row_aid)
            qkv = qkv.view(n, width, h_ + 2 * kvh, d)
            qk = rotate(qkv[:, :, : h_ + kvh].transpose(1, 2), cos, sin)  # q and k heads in one pass
            q, k, v = qk[:, :h_], qk[:, h_:], qkv[:, :, h_ + kvh :].transpose(1, 2)
            self.kv.write_prompt(i, slot_t, k, v)  # right padding: pad keys sit after each prompt, never attended
            if h_ != kvh:  # each query head its own K/V copy: flash attention without the GQA path
                k, v = k.repeat_interleave(h_ // kvh, dim=1), v.repeat_interleave(h_ // kvh, dim=1)
            with sdpa_kernel(PREFILL_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            layer.o.residual(x, o.transpose(1, 2).reshape(n * width, h_ * d), self.lora.rows(1, live), row_aid)
            self._layer_mlp(layer, x, live, row_aid)
        last = x.view(n, width, -1)[self._rows[:n], lens - 1]
        return self._prefill_sample(self.lm_head(rms_norm(last, self.norm, self.eps)), n, mode)

    def _prefill_sample(self, logits: torch.Tensor, n: int, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill's tail (graph-capturable): sample the first tokens of rows 0..n-1 from their last
        position's logits and seed their slots' decode state from the static prompt buffers."""
        lens, slot_t, aid, seed = self._p_long[:, :n]
        temp, top_p = self._p_float[:, :n]
        tokens = sample(
            logits,
            temp,
            top_p,
            seed,
            torch.zeros(n, dtype=torch.long, device=self.device),
            any_random=mode != GREEDY,
            any_top_p=mode == RANDOM_TOP_P,
        )
        self._tok[slot_t] = tokens
        self._pos[slot_t] = lens
        self._plen[slot_t] = lens
        self._aid[slot_t] = aid
        self._temp[slot_t], self._top_p[slot_t], self._seed[slot_t] = temp, top_p, seed
        return logits, tokens

    def _decode_rows(self, batch: int, width: int, live: int, mode: int) -> torch.Tensor:
        """One decode step over rows 0..batch-1 from the static buffers, sampling included; graph-capturable.

        Advances `_tok` and `_pos` of the active rows in place; returns the logits."""
        if batch == 1 and live == 0 and self.fused_off is None:
            return self._advance(batch, mode, self._forward_fused())
        pos = self._pos[:batch]
        rows = self._rows[:batch]
        h_, kvh, d = self.heads, self.kv_heads, self.head_dim
        # x @ rot == x * cos + rotate_half(x) * sin, per row: rotary of all q and k heads is one bmm per layer
        cos, sin = self.cos[pos], self.sin[pos]
        rot = torch.diag_embed(cos) + self._rot_half * sin[:, None, :]
        bias = torch.zeros(batch, 1, 1, width, dtype=self.dtype, device=self.device)
        bias.masked_fill_((self._keys[:width][None, :] > pos[:, None])[:, None, None, :], float("-inf"))
        aid = self._aid[:batch]
        x = F.embedding(self._tok[:batch], self.embed)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.ln1, self.eps), self.lora.rows(3, live), aid)
            qk = torch.bmm(qkv[:, : (h_ + kvh) * d].view(batch, h_ + kvh, d), rot)
            v = qkv[:, (h_ + kvh) * d :].view(batch, kvh, d)
            self.kv.write_token(i, rows, pos, qk[:, h_:], v)
            keys, values = self.kv.keys[i][:batch, :, :width], self.kv.values[i][:batch, :, :width]
            q = qk[:, :h_].reshape(batch, kvh, h_ // kvh, d)  # query heads of one KV head side by side
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
            layer.o.residual(x, o.reshape(batch, h_ * d), self.lora.rows(1, live), aid)
            self._layer_mlp(layer, x, live, aid)
        return self._advance(batch, mode, self.lm_head(rms_norm(x, self.norm, self.eps)))

    def _forward_fused(self) -> torch.Tensor:
        """Row 0's logits [1, vocab] through the fused kernels: five launches per layer. The residual
        stream stays in fp32 here, so the o and down products may split K and add atomically."""
        x = F.embedding(self._tok[:1], self.embed).view(-1).float()
        pos, cfg, eps = self._pos[:1], self._gemv_cfg, self.eps
        o = torch.empty(1, self.heads * self.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.layers):
            qkv_w, qkv_b, _ = layer.qkv.lin.parts
            qkv = torch.empty(layer.qkv.out, dtype=self.dtype, device=self.device)
            kernels.gemv(qkv_w, x, qkv, cfg=cfg["qkv"], bias=qkv_b, ln=layer.ln1, eps=eps)
            kernels.attention(
                qkv.view(1, -1),
                self.cos,
                self.sin,
                pos,
                self.kv.keys[i],
                self.kv.values[i],
                o,
                heads=self.heads,
                kv_heads=self.kv_heads,
                cfg=self._attn_cfg,
            )
            kernels.gemv(layer.o.lin.weight, o.view(-1), x, cfg=cfg["o"], residual=True)
            gu = torch.empty(layer.gate_up.out, dtype=self.dtype, device=self.device)
            kernels.gemv(layer.gate_up.lin.weight, x, gu, cfg=cfg["gate_up"], ln=layer.ln2, eps=eps)
            kernels.gemv(layer.down.lin.weight, gu, x, cfg=cfg["down"], swiglu=True, residual=True)
        logits = torch.empty(self.lm_head.out_features, dtype=self.dtype, device=self.device)
        kernels.gemv(self.lm_head.weight, x, logits, cfg=cfg["lm_head"], ln=self.norm, eps=eps)
        return logits.view(1, -1)

    def _tune(self) -> None:
        """Pick the fused GEMV's config per weight kind (all layers share it) by timing every layer's
        weights in one graph, keeping the fastest that matches torch on layer 0's weight."""
        if self.device.type != "cuda":  # Triton's interpreter (tests): any tiles will do
            self._gemv_cfg = dict.fromkeys(("qkv", "o", "gate_up", "down", "lm_head"), (16, 64, 4, 1))
            self._gemv_cfg["down"] = (16, 64, 4, 2)  # exercise split-K
            return
        layer, h, dev = self.layers[0], self.embed.shape[1], self.device
        x = torch.randn(h, dtype=torch.float32, device=dev)
        gu = torch.randn(2 * layer.down.lin.weight.shape[1], dtype=self.dtype, device=dev)
        att = torch.randn(layer.o.lin.weight.shape[1], dtype=self.dtype, device=dev)

        def out(n: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.randn(n, dtype=dtype, device=dev)

        eps, layers = self.eps, self.layers
        specs: dict[str, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, dict[str, Any]]] = {
            "qkv": (
                [la.qkv.lin.weight for la in layers],
                x,
                out(layer.qkv.out),
                {"bias": layer.qkv.lin.bias, "ln": layer.ln1, "eps": eps},
            ),
            "o": ([la.o.lin.weight for la in layers], att, out(h, torch.float32), {"residual": True}),
            "gate_up": (
                [la.gate_up.lin.weight for la in layers],
                x,
                out(layer.gate_up.out),
                {"ln": layer.ln2, "eps": eps},
            ),
            "down": (
                [la.down.lin.weight for la in layers],
                gu,
                out(h, torch.float32),
                {"swiglu": True, "residual": True},
            ),
            "lm_head": ([self.lm_head.weight], x, out(self.lm_head.out_features), {"ln": self.norm, "eps": eps}),
        }
        for name, (ws, inp, dst, flags) in specs.items():
            times = kernels.gemv_times(ws, inp, dst, GEMV_CANDIDATES.get(name), **flags)
            ranked = sorted(times, key=lambda c: times[c])
            self._gemv_cfg[name] = next(
                (c for c in ranked if kernels.check_gemv(ws[0], inp, dst, c, 3e-2, **flags) is None), kernels.CUBLAS
            )
            self.gemv_times[name] = {str(c): round(t, 4) for c, t in sorted(times.items(), key=lambda kv: kv[1])}
        qkv = torch.randn(1, layer.qkv.out, dtype=self.dtype, device=self.device)
        self._attn_cfg = kernels.tune_attention(
            qkv,
            self.cos,
            self.sin,
            min(self.max_len - 1, 192),
            heads=self.heads,
            kv_heads=self.kv_heads,
            dim=self.head_dim,
        )

    def _advance(self, batch: int, mode: int, logits: torch.Tensor) -> torch.Tensor:
        """Sample the next token of rows 0..batch-1 and advance the active ones' token and position."""
        tok, pos, active = self._tok[:batch], self._pos[:batch], self._active[:batch]
        step = pos - self._plen[:batch] + 1  # index of the token being sampled within its request
        nxt = sample(
            logits,
            self._temp[:batch],
            self._top_p[:batch],
            self._seed[:batch],
            step,
            any_random=mode != GREEDY,
            any_top_p=mode == RANDOM_TOP_P,
        )
        tok.copy_(torch.where(active, nxt, tok))
        pos.add_(active).clamp_(max=self.max_len - 1)
        return logits

    def decode(self, slots: Sequence[int]) -> torch.Tensor:
        """Advance each slot in `slots` by one sampled token; returns next tokens indexed by slot (device).

        Launches work and returns without waiting for it: the result is a view of a static buffer
        that the next step overwrites, so copy it (non-blocking) before calling again."""
        batch = next(b for b in self.batch_buckets if b > max(slots))
        active = [False] * self.max_slots
        for s in slots:
            active[s] = True
        if active != self._active_host:  # only when the running set changes: no per-step copy
            self._active.copy_(torch.tensor(active), non_blocking=True)
            self._active_host = active
        width = self.kv.bucket(max(self._len[s] for s in slots) + 1)
        live = max(self._aid_host[s] for s in slots)
        mode = _mode([smp for s in slots if (smp := self._sampling[s]) is not None])
        guided, self._allowed = self._allowed, None
        with torch.no_grad():
            if guided is not None:  # each constrained row's token index, before the step advances it
                idx = torch.tensor(guided[0], device=self.device)
                steps = self._pos[idx] - self._plen[idx] + 1
            if self.use_graphs:
                self.last_logits = self._graph(batch, width, live, mode)
            else:
                self.last_logits = self._decode_rows(batch, width, live, mode)
            if guided is not None:  # after the graph: constrained rows sample again, their token replaced
                nxt = self._resample(
                    self.last_logits[idx],
                    guided[1],
                    [self._sampling[s] for s in guided[0]],
                    self._temp[idx],
                    self._top_p[idx],
                    self._seed[idx],
                    steps,
                )
                self._tok.index_copy_(0, idx, nxt)
            k = logprob_rows([self._sampling[s] for s in slots])
            self.last_logprobs = None if k is None else token_logprobs(self.last_logits, self._tok[:batch], k)
        for s in slots:
            self._len[s] += 1
        return self._tok[:batch]

    def constrain(self, slots: Sequence[int], bitmask: torch.Tensor) -> None:
        """runner.GuidedRunner: the next `prefill`/`decode` samples `slots` among their allowed tokens."""
        self._allowed = (list(slots), bitmask)

    def _resample(
        self,
        logits: torch.Tensor,
        bitmask: torch.Tensor,
        rows: Sequence[RowSampling | None],
        temp: torch.Tensor,
        top_p: torch.Tensor,
        seed: torch.Tensor,
        steps: torch.Tensor,
    ) -> torch.Tensor:
        """The constrained rows' tokens: `sample` over their masked logits with their own parameters."""
        smp = [r for r in rows if r is not None]
        return sample(
            apply_bitmask(logits, bitmask),
            temp,
            top_p,
            seed,
            steps,
            any_random=any(r.random for r in smp),
            any_top_p=any(r.nucleus for r in smp),
        )

    def _capture(self, fn: Any) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Warm `fn` up twice on a side stream (allocator, cuBLAS, Triton), then capture it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn()
        return graph, out

    def _graph(self, batch: int, width: int, live: int, mode: int, *, replay: bool = True) -> torch.Tensor:
        """Replay (capturing first if new) the decode graph of this bucket."""
        key = (batch, width, live, mode)
        if key not in self._graphs:
            saved = [t[:batch].clone() for t in (self._tok, self._pos)]  # warm-up runs advance them
            self._graphs[key] = self._capture(lambda: self._decode_rows(batch, width, live, mode))
            for buf, old in zip((self._tok, self._pos), saved, strict=True):
                buf[:batch].copy_(old)
        graph, out = self._graphs[key]
        if replay:
            graph.replay()
        return out

    def capture(self, max_batch: int | None = None, max_prompt: int = 512, *, prefill: bool = True) -> int:
        """Capture the greedy decode graphs not captured yet, up to `max_batch` rows, without adapters
        and for the live ones, and with `prefill` the single-prompt prefill graphs up to `max_prompt`
        tokens (no-op off CUDA); returns the graphs held.

        With `prefill=False` it is safe between engine steps (after an adapter load): a decode
        graph's warm-up runs restore every slot's token and position, and the keys they write sit at
        each row's next position, which the next real step overwrites. The prefill graphs are
        captured through slot 0's cache rows, so take them before requests run."""
        if not self.use_graphs:
            return 0
        with torch.no_grad():
            for live in sorted({0, self.lora.live()}):
                for batch in self.batch_buckets:
                    if max_batch is not None and batch > max_batch and batch != self.batch_buckets[0]:
                        break
                    for width in self.kv.buckets:
                        if (batch, width, live, GREEDY) not in self._graphs:
                            self._graph(batch, width, live, GREEDY, replay=False)
            widths = [b for b in self.prefill_buckets if b <= max_prompt and (b, GREEDY) not in self._prefill_graphs]
            for width in widths if prefill and self.prefill_graphs_off is None else []:
                state = (self._tok, self._pos, self._plen, self._aid, self._temp, self._top_p)
                saved = [t.clone() for t in state]
                self._p_ids[:1].zero_()
                self._p_long[:, :1] = torch.tensor([[width], [0], [0], [0]])
                self._p_float[:, :1] = torch.tensor([[0.0], [1.0]])
                try:
                    graph = self._capture(lambda: self._prefill_rows(1, width, 0, GREEDY))  # noqa: B023
                except RuntimeError as exc:  # eager prefill still serves; say why once
                    self.prefill_graphs_off = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    break
                finally:
                    for buf, old in zip(state, saved, strict=True):
                        buf.copy_(old)
                self._prefill_graphs[(width, GREEDY)] = graph
        return len(self._graphs) + len(self._prefill_graphs)

    def sync_adapters(self, keep: Sequence[str], fresh: dict[str, LoraWeights]) -> None:
        """Serve exactly the versions in `keep`: unload the others and those `fresh` replaces, load
        `fresh`, then capture the decode graphs of the new live set now rather than on first use
        (node.service.Serving calls this between engine steps; bench/serving.py does the same)."""
        for name in self.adapters():
            if name not in keep or name in fresh:
                self.unload_adapter(name)
        for name, weights in fresh.items():
            self.load_adapter(name, weights)
        self.capture(prefill=False)

    def release(self, slot: int) -> None:
        self._len[slot] = 0
        self._aid_host[slot] = 0
        self._sampling[slot] = None


def _mode(rows: Sequence[RowSampling]) -> int:
    """The sampling graph a set of rows needs."""
    if not any(r.random for r in rows):
        return GREEDY
    return RANDOM_TOP_P if any(r.nucleus for r in rows) else RANDOM


def _unwrap(module: Any) -> Any:
    """The plain Linear under a peft LoRA wrapper (the runner applies LoRA itself)."""
    return getattr(module, "base_layer", module)
