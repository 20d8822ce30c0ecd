"""LoRA-aware per-sample gradients for DP-SGD, handed to Opacus's `DPOptimizer` unchanged.

Opacus's `GradSampleModule` (hooks) puts full backward hooks on every trainable module and
lets autograd compute the summed gradients it then throws away: on a LoRA model that doubled
the step time (DESIGN.md section 5). Here each peft LoRA Linear runs its low-rank branch
through one autograd Function whose backward computes exactly what the summed backward would
(the input gradient) plus, instead of the summed weight gradients, the per-sample ones:

    h = A x,  g = scaling * dL/d(out)           (per token)
    grad_B[i] = sum_t g[i,t] h[i,t]^T          (n, out, r)
    grad_A[i] = sum_t (B^T g[i,t]) x[i,t]^T    (n, r, in)

Same FLOPs as the non-private backward, no module hooks. The result goes to `p.grad_sample`
exactly as Opacus's hooks write it (scaled by the batch size for `loss_reduction="mean"`),
so `DPOptimizer` clips, adds its noise and steps as it does for Opacus, and the accountant is
untouched. A step of a small adapter on a GPU is bound by kernel launches and Python, so the
branch is one node per layer with fewer kernels than peft's (see `_LoraLinear`), its fp32 input
is cast once per input tensor and shared by the layers that read it (q/k/v, gate/up) where peft
casts and keeps a copy per layer, and `GroupedDPOptimizer` clips and noises in a few kernels.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.nn import functional as F

from federation.errors import InvalidInput

__all__ = ["GroupedDPOptimizer", "LoraGradSampler", "UnsupportedLoraModel", "lora_layers"]


class UnsupportedLoraModel(InvalidInput, ValueError):
    """The model has trainable weights this module cannot give per-sample gradients for."""


_ZERO: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _ignored(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim `input` for `baddbmm`/`addmm` with beta=0, which ignore it (no fill kernel, no copy)."""
    key = (like.device, like.dtype)
    if key not in _ZERO:
        _ZERO[key] = torch.zeros((), device=like.device, dtype=like.dtype)
    return _ZERO[key]


def _per_sample(grad: torch.Tensor, inp: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * sum_t grad[i,t] inp[i,t]^T for each sample i, in one batched GEMM (batch first, any rank >= 2)."""
    n = inp.shape[0]
    g, x = grad.reshape(n, -1, grad.shape[-1]), inp.reshape(n, -1, inp.shape[-1]).to(grad.dtype)
    return torch.baddbmm(_ignored(g), g.transpose(1, 2), x, beta=0, alpha=scale)


def _write(p: torch.Tensor, grad_sample: torch.Tensor) -> None:
    if getattr(p, "grad_sample", None) is not None:
        raise RuntimeError(
            "grad_sample is already set: call optimizer.zero_grad() before each backward "
            "(a LoRA layer used twice in one forward, or accumulation over batches, is not supported)"
        )
    p.grad_sample = grad_sample  # type: ignore[attr-defined]


class _LoraLinear(torch.autograd.Function):
    """`base + scaling * B(A(x))`, cast to the base output's dtype, whose backward writes per-sample
    gradients of A and B instead of summed ones.

    One node per LoRA layer, with the base layer's output passed through: the add and the cast
    back to the activations' dtype are one kernel, and their backward is the identity plus one
    cast, where peft's graph has four nodes (mul, add, to, to). `xf` is x in the factors' dtype,
    cast once per input tensor (q/k/v and gate/up share it) and saved for the per-sample GEMMs.
    The scalings (LoRA's, and the batch size for a mean loss) ride on the GEMMs' alpha.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        xf: torch.Tensor,
        base: torch.Tensor,
        weight_a: torch.Tensor,
        weight_b: torch.Tensor,
        scaling: float,
        mean: bool,
    ) -> torch.Tensor:
        h = F.linear(xf, weight_a)  # the same ops, in the same order, as peft
        delta = F.linear(h, weight_b) * scaling
        ctx.save_for_backward(xf, h)
        ctx.weights, ctx.scaling, ctx.mean, ctx.x_dtype = (weight_a, weight_b), scaling, mean, x.dtype
        return torch.add(base, delta, out=torch.empty_like(base))  # peft's (base + delta).to(base.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xf, h = ctx.saved_tensors
        weight_a, weight_b = ctx.weights
        s = ctx.scaling
        g = grad_out.to(weight_b.dtype)  # dL/d(delta): exactly grad_out, as peft's graph has it
        g2 = g.reshape(-1, g.shape[-1])
        gh = torch.addmm(_ignored(g2), g2, weight_b, beta=0, alpha=s)  # dL/dh = scaling * g B
        # A mean loss scales each record's gradient by 1/n; Opacus's hooks multiply it back by n.
        n = float(xf.shape[0]) if ctx.mean else 1.0
        if weight_b.requires_grad:
            _write(weight_b, _per_sample(g, h, s * n))
        if weight_a.requires_grad:
            _write(weight_a, _per_sample(gh, xf, n))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gh @ weight_a).to(ctx.x_dtype).reshape(xf.shape)
        grad_base = grad_out if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_base, None, None, None, None


def lora_layers(model: nn.Module, adapter_name: str) -> Iterator[LoraLayer]:
    """Every peft LoRA layer of `model` that holds `adapter_name`."""
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield module


class LoraGradSampler:
    """Per-sample gradients of one adapter's LoRA factors, written to `p.grad_sample`.

    A drop-in for `GradSampleModule(model, grad_sample_mode="hooks")` on a peft model whose only
    trainable weights are that adapter's lora_A/lora_B: the model is used as is (no wrapper),
    and `close()` restores every layer. Either factor may be frozen (FFA-LoRA freezes A).
    Layers run the stock peft forward whenever the adapter is not the only active one.
    """

    def __init__(self, model: nn.Module, *, adapter_name: str, loss_reduction: str = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.adapter_name = adapter_name
        self._patched: list[tuple[LoraLinear, Any]] = []
        self._last_cast: tuple[torch.Tensor, int, torch.Tensor] | None = None
        covered: set[int] = set()
        layers: list[LoraLinear] = []
        for layer in lora_layers(model, adapter_name):
            a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            trainable = [p for p in (*a.parameters(), *b.parameters()) if p.requires_grad]
            if not trainable:
                continue
            if type(layer) is not LoraLinear or adapter_name in layer.lora_variant:
                raise UnsupportedLoraModel(
                    f"{type(layer).__name__} ({layer.lora_variant.get(adapter_name)}) "
                    "is not a plain LoRA Linear; use Opacus hooks"
                )
            if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
                raise UnsupportedLoraModel("lora_A/lora_B must be nn.Linear")
            covered.update(id(p) for p in (a.weight, b.weight) if p.requires_grad)
            layers.append(layer)
        other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if other:
            raise UnsupportedLoraModel(
                f"trainable parameters outside the LoRA factors of adapter {adapter_name!r} "
                f"(e.g. {other[:3]}); use Opacus hooks"
            )
        if not covered:
            raise UnsupportedLoraModel(f"adapter {adapter_name!r} has no trainable LoRA factors")
        for layer in layers:
            self._patch(layer, mean=loss_reduction == "mean")

    def _patch(self, layer: LoraLinear, *, mean: bool) -> None:
        name = self.adapter_name
        stock: Callable[..., torch.Tensor] = layer.forward

        def forward(self_: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs or self_.disable_adapters or self_.merged or list(self_.active_adapters) != [name]:
                return stock(x, *args, **kwargs)
            if torch.is_autocast_enabled(x.device.type):
                raise RuntimeError("LoRA per-sample gradients do not support autocast")
            result = self_.base_layer(x, *args)
            weight_a: torch.Tensor = self_.lora_A[name].weight  # type: ignore[assignment]
            weight_b: torch.Tensor = self_.lora_B[name].weight  # type: ignore[assignment]
            dropout = self_.lora_dropout[name]
            if not isinstance(dropout, nn.Identity):  # peft's order: cast, then dropout (same RNG draws)
                x = dropout(self_._cast_input_dtype(x, weight_a.dtype))
            xf = self._cast(x, weight_a.dtype)
            return _LoraLinear.apply(x, xf, result, weight_a, weight_b, self_.scaling[name], mean)

        self._patched.append((layer, layer.__dict__.get("forward")))
        layer.forward = types.MethodType(forward, layer)  # type: ignore[method-assign]

    def _cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` in `dtype`, outside autograd, reused while the same unmodified tensor comes back
        (q/k/v read one input, gate/up another): one cast and one saved copy per input, not per layer."""
        if x.dtype == dtype:
            return x.detach()
        last = self._last_cast
        if last is not None and last[0] is x and last[1] == x._version and last[2].dtype == dtype:
            return last[2]
        xf = x.detach().to(dtype)
        self._last_cast = (x, x._version, xf)
        return xf

    def close(self) -> None:
        """Restore the stock peft forward of every layer (idempotent)."""
        self._last_cast = None
        while self._patched:
            layer, previous = self._patched.pop()
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous  # type: ignore[method-assign]

    def __enter__(self) -> LoraGradSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupedDPOptimizer(DPOptimizer):
    """Opacus's `DPOptimizer` with its per-parameter loops batched, for models with many small tensors.

    A LoRA model has hundreds of factor tensors (392 for R1-Distill-1.5B on all linears), and a
    step is bound by kernel launches and Python, not arithmetic: Opacus spends several kernels per
    tensor on clipping and on noise, and rescans every parameter once per parameter. Here the
    per-sample gradients of each dtype/device are laid side by side in one (n, D) matrix, so a
    step's clipping is one norm, one clip factor and one GEMV (sum_i c_i g_i), the noise one draw
    and one add, and the mean scaling one division; `p.summed_grad` and `p.grad` are views of those
    buffers. The per-sample norm is the norm of the whole flattened per-sample gradient, which is
    Opacus's norm of per-parameter norms up to rounding; the 1e-6 guard, the clip factor and the
    Gaussian mechanism are Opacus's.
    """

    def __init__(self, *args: Any, batched_noise: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batched_noise = batched_noise
        self._sums: _Flat | None = None
        self._grads: _Flat | None = None

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Opacus's `pre_step`, without listing every per-sample gradient twice to test for none."""
        if not self.params:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def clip_and_accumulate(self) -> None:
        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        self._sums = None
        if not samples or len(samples[0]) == 0 or any(s.dtype != p.dtype for s, p in zip(samples, params, strict=True)):
            super().clip_and_accumulate()  # empty batch, mixed dtypes: Opacus's loop
            return
        for p in params:
            _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
        n = len(samples[0])
        groups = _by_dtype_device(samples)
        flat = {key: torch.cat([samples[i].reshape(n, -1) for i in idx], dim=1) for key, idx in groups.items()}
        first = samples[0].device
        sq = [f.norm(2, dim=1).to(first) for f in flat.values()]
        norms = sq[0] if len(sq) == 1 else torch.stack(sq).norm(2, dim=0)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        fresh = all(p.summed_grad is None for p in params)  # type: ignore[attr-defined]
        sums = _Flat()
        for key, idx in groups.items():
            summed = factor.to(flat[key]) @ flat[key]  # sum_i c_i g_i
            views = sums.add(summed, idx, params)
            for i, view in zip(idx, views, strict=True):
                p = params[i]
                p.summed_grad = view if fresh else p.summed_grad + view  # type: ignore[attr-defined]
                _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]
        self._sums = sums if fresh else None

    def add_noise(self) -> None:
        """Opacus's Gaussian mechanism, N(0, (noise_multiplier * max_grad_norm)^2) on every coordinate
        of every clipped sum, drawn in one call per dtype/device instead of one (plus a zeros
        tensor) per parameter. Same distribution, different draw order from Opacus's loop, so
        `batched_noise=False` (and secure_mode, whose 4-draw sum stays Opacus's) keep the loop."""
        self._grads = None
        if self.secure_mode or not self.batched_noise:
            super().add_noise()
            return
        params = self.params
        sums: list[torch.Tensor] = [p.summed_grad for p in params]  # type: ignore[attr-defined]
        for s in sums:
            _check_processed_flag(s)
        flats = self._sums if self._sums is not None and self._sums.holds(sums) else _Flat.of(sums, params)
        std = self.noise_multiplier * self.max_grad_norm
        grads = _Flat()
        for summed, idx in flats.parts:
            if std == 0:
                noised = summed.clone()
            else:
                noised = torch.normal(
                    0.0, std, size=summed.shape, dtype=summed.dtype, device=summed.device, generator=self.generator
                ).add_(summed)
            for i, view in zip(idx, grads.add(noised, idx, params), strict=True):
                params[i].grad = view
                _mark_as_processed(sums[i])
        self._grads = grads

    def scale_grad(self) -> None:
        if self.loss_reduction != "mean":
            return
        params = self.params
        denominator = self.expected_batch_size * self.accumulated_iterations
        if self._grads is not None and self._grads.holds([p.grad for p in params]):
            for flat, _ in self._grads.parts:
                flat.div_(denominator)
            return
        torch._foreach_div_([p.grad for p in params if p.grad is not None], denominator)

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        self._sums = self._grads = None


def _by_dtype_device(tensors: list[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


class _Flat:
    """1-D buffers, each split into per-parameter views (parameter indices `idx`, parameter shapes)."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, list[int]]] = []
        self.views: list[torch.Tensor | None] = []

    def add(self, flat: torch.Tensor, idx: list[int], params: list[torch.Tensor]) -> list[torch.Tensor]:
        views = [v.view_as(params[i]) for v, i in zip(flat.split([params[i].numel() for i in idx]), idx, strict=True)]
        self.parts.append((flat, idx))
        if len(self.views) < len(params):
            self.views.extend([None] * (len(params) - len(self.views)))
        for i, v in zip(idx, views, strict=True):
            self.views[i] = v
        return views

    def holds(self, tensors: Sequence[torch.Tensor | None]) -> bool:
        """Whether `tensors` are exactly the views this object handed out, in parameter order."""
        return len(tensors) == len(self.views) and all(t is v for t, v in zip(tensors, self.views, strict=True))

    @classmethod
    def of(cls, tensors: list[torch.Tensor], params: list[torch.Tensor]) -> _Flat:
        """Copies of `tensors` laid end to end, one buffer per dtype/device."""
        out = cls()
        for idx in _by_dtype_device(tensors).values():
            out.add(torch.cat([tensors[i].reshape(-1) for i in idx]), idx, params)
        return out
