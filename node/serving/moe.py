"""DeepSeek-V2/V3 mixture of experts for the MLA runner: routing, routed experts, shared and dense MLPs.

Routing follows the HF modules exactly (the router reads fp32 logits): DeepSeek-V3 scores with a
sigmoid, picks experts by score + `e_score_correction_bias` within the `topk_group` best of `n_group`
groups (a group's score: its two best), weights them by the unbiased score, normalised if
`norm_topk_prob`, times `routed_scaling_factor`; DeepSeek-V2 takes a softmax and its top-k (greedy or
group-limited greedy), times `routed_scaling_factor`.

Routed experts run over the HF module's own stacked weights (`gate_up_proj` [E, 2I, h], `down_proj`
[E, h, I]; nothing is copied) in one of two forms:

* grouped: the (token, expert) pairs sorted by expert and two grouped GEMMs (`F.grouped_mm`) over the
  contiguous segments, as HF's `grouped_mm` experts do. Each expert's weight is read once per step
  whatever its token count, so this is the form for large batches (at 64 decode rows top-6 of 64
  touches nearly every expert), and for prefill;
* pairs (CUDA, Triton, `mla_kernels.moe_pairs`): one program per (pair, row block) reads its expert's
  rows by index: gate/up with SwiGLU in one kernel, down with the routing weights, the sum over the k
  experts and the residual add in a second. No sort, no offsets, no gathered copy of the weights (an
  index-gather `w[idx]` would copy the picked experts and read them twice more); for a few rows this
  reads exactly the picked experts once, but each pair re-reads its expert, so at many rows the grouped
  form's one read per expert wins. The runner times both per batch bucket at load and keeps the faster
  (`MLARunner.moe_path`, figures in `moe_times`).

Where `F.grouped_mm` has no kernel for the dtype (it documents bf16 on CUDA; the CPU takes fp32), a
loop over the segments stands in (one host sync: no CUDA graphs on that path).

Dense MLPs (the first `first_k_dense_replace` layers, and the shared experts) are two projections
with the fused SwiGLU of the fast runner's `Proj`.
"""

from __future__ import annotations

from typing import Any, TypedDict, Unpack

import torch
import torch.nn.functional as F

from node.serving.fast import Proj, _unwrap

_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `F.grouped_mm` runs for this device and dtype without the host (its CUDA kernel is
    documented for bf16; the CPU one takes fp32 too). Checked once per (device type, dtype) on a tiny
    problem. On CUDA other dtypes reach ATen's fallback, which copies `offs` to the host and loops:
    right values, but a graph that captures it fails, and a failed capture can leave the caching
    allocator's capture state behind (pytorch#180395); the probe runs with synchronisation made an
    error, so such a dtype counts as not native and takes the graph-free loop."""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        cuda = device.type == "cuda"
        try:
            x = torch.ones(4, 16, device=device, dtype=dtype)
            w = torch.ones(2, 16, 16, device=device, dtype=dtype)
            offs = torch.tensor([1, 4], dtype=torch.int32, device=device)
            mode = torch.cuda.get_sync_debug_mode() if cuda else 0
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("error")
            try:
                y = F.grouped_mm(x, w, offs=offs)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(mode)  # the caller's mode, not "default"
            _GROUPED_OK[key] = bool(torch.allclose(y.float(), torch.full_like(y.float(), 16.0)))
        except (RuntimeError, NotImplementedError):
            _GROUPED_OK[key] = False
    return _GROUPED_OK[key]


def _grouped_linear(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor, native: bool) -> torch.Tensor:
    """x [S, K] sorted by group @ w_t [E, K, N] per segment: F.grouped_mm, or a loop over the segments
    (one host sync, no graph capture) where the dtype has no grouped kernel."""
    if native:
        return F.grouped_mm(x, w_t, offs=offs)
    out = x.new_zeros(x.shape[0], w_t.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w_t[e], out=out[start:end])
        start = end
    return out


class RouteOptions(TypedDict):
    """A router's options (MoE.route_kwargs), shared by this torch routing and mla_kernels.moe_route."""

    top_k: int
    n_group: int
    topk_group: int
    v3: bool
    norm: bool
    scaling: float


def route_torch(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    method: str = "greedy",
    **opts: Unpack[RouteOptions],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [M, k] fp32, expert ids [M, k]) from fp32 router logits [M, E], as HF's routers compute them."""
    m, e = logits.shape
    top_k, n_group, topk_group = opts["top_k"], opts["n_group"], opts["topk_group"]
    if opts["v3"]:
        scores = logits.sigmoid()
        choice = scores if bias is None else scores + bias
        if n_group > 1 and topk_group < n_group:  # one group, or all groups kept: no mask
            per = choice.view(m, n_group, e // n_group)
            group_scores = per.topk(2, dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = per.masked_fill(~mask[:, :, None], float("-inf")).view(m, e)
        idx = choice.topk(top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if opts["norm"]:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        scores = logits.softmax(dim=-1)
        if method == "group_limited_greedy" and n_group > 1 and topk_group < n_group:
            per = scores.view(m, n_group, e // n_group)
            keep = per.amax(dim=-1).topk(topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros(m, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
            scores = per.masked_fill(~mask[:, :, None], 0.0).view(m, e)
        weights, idx = scores.topk(top_k, dim=-1, sorted=False)
    return weights * opts["scaling"], idx


class DenseMLP:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one projection (no LoRA: see DESIGN.md)."""

    def __init__(self, mlp: Any, *, share: bool) -> None:
        mods = [_unwrap(mlp.gate_proj), _unwrap(mlp.up_proj)]
        self.gate_up = Proj(mods, rank=0, adapters=0, int8=False, share=share)
        self.down = Proj([_unwrap(mlp.down_proj)], rank=0, adapters=0, int8=False, share=share)
        self.inter = int(mods[0].weight.shape[0])

    def residual(self, x: torch.Tensor, h: torch.Tensor, aid: torch.Tensor) -> None:
        """x += MLP(h), in place."""
        self.down.residual(x, self.gate_up.swiglu(h, 0, aid), 0, aid)

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


class MoE:
    """One DeepSeek MoE block: router, routed experts over the HF weights, shared experts."""

    def __init__(self, mlp: Any, *, share: bool) -> None:
        gate, experts = mlp.gate, mlp.experts
        self.gate_w = gate.weight.detach()  # the HF parameter (the fused batch-1 GEMV reads it, accumulating in fp32)
        self.gate_w32 = self.gate_w.float()  # HF computes the router in fp32 (0.5 MB a layer at V2-Lite)
        bias = getattr(gate, "e_score_correction_bias", None)
        self.v3 = bias is not None  # DeepSeek-V3: sigmoid scores, bias-corrected group-limited choice
        self.bias: torch.Tensor | None = None if bias is None else bias.detach().float()
        self.top_k = int(gate.top_k)
        self.experts = int(gate.num_experts)
        self.n_group = int(getattr(gate, "num_group", None) or 1)
        self.topk_group = int(getattr(gate, "topk_group", None) or 1)
        self.norm_topk = bool(getattr(gate, "norm_topk_prob", False)) and self.v3
        self.scaling = float(gate.routed_scaling_factor)
        self.method = str(getattr(gate, "topk_method", None) or "greedy")
        if not self.v3 and self.method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"unknown DeepSeek-V2 topk_method {self.method!r}")
        self.w_gu = experts.gate_up_proj.detach()  # [E, 2I, h]: the HF parameter itself
        self.w_down = experts.down_proj.detach()  # [E, h, I]
        self.inter = int(self.w_down.shape[2])
        self.native = grouped_mm_works(self.w_gu.device, self.w_gu.dtype)  # else the loop (no graphs)
        self.shared = DenseMLP(mlp.shared_experts, share=share) if getattr(mlp, "shared_experts", None) else None

    # ---- routing ------------------------------------------------------------------------------
    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [M, k] fp32, expert ids [M, k]) for the normalised hidden states h [M, hidden]."""
        return route_torch(F.linear(h.float(), self.gate_w32), self.bias, method=self.method, **self.route_kwargs())

    def route_kwargs(self) -> RouteOptions:
        """This router's options for `mla_kernels.moe_route` (V2's plain greedy limits no groups)."""
        limited = self.v3 or self.method == "group_limited_greedy"
        return {
            "top_k": self.top_k,
            "n_group": self.n_group if limited else 1,
            "topk_group": self.topk_group if limited else 1,
            "v3": self.v3,
            "norm": self.norm_topk,
            "scaling": self.scaling,
        }

    # ---- routed experts -------------------------------------------------------------------------
    def grouped(self, h: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sum over each row's experts [M, hidden] (model dtype), as two grouped GEMMs over pairs sorted
        by expert. Graph-capturable: the offsets stay on the device (histc, not bincount)."""
        m, k = idx.shape
        ids, perm = torch.sort(idx.reshape(-1))
        xs = h[perm // k]
        counts = torch.histc(
            ids.float() if ids.device.type != "cuda" else ids.int(), bins=self.experts, min=0, max=self.experts - 1
        )
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate_up = _grouped_linear(xs, self.w_gu.transpose(1, 2), offs, self.native)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        y = _grouped_linear(act, self.w_down.transpose(1, 2), offs, self.native)
        y = y * weights.reshape(-1)[perm, None]  # fp32, as HF weighs and sums its experts
        out = torch.empty_like(y).index_copy_(0, perm, y)
        return out.view(m, k, -1).sum(dim=1).to(h.dtype)

    def residual(self, x: torch.Tensor, h: torch.Tensor, aid: torch.Tensor) -> None:
        """x += MoE(h) through the grouped form, in place (the torch path: prefill, CPU, large batches)."""
        weights, idx = self.route(h)
        routed = self.grouped(h, weights, idx)
        if self.shared is not None:
            self.shared.residual(x, h, aid)
        x.add_(routed)

    def nbytes(self, active: int | None = None) -> int:
        """Weight bytes: all experts, or `active` of them (what a decode step reads at batch 1)."""
        n = self.experts if active is None else active
        per_expert = (self.w_gu[0].numel() + self.w_down[0].numel()) * self.w_gu.element_size()
        shared = self.shared.nbytes() if self.shared is not None else 0
        return n * per_expert + self.gate_w32.numel() * self.w_gu.element_size() + shared
