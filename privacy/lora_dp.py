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
untouched. The branch saves its input in the activations' own dtype (bf16 on GPU), shared by
the layers that read the same tensor (q/k/v, gate/up), where peft keeps one fp32 copy per layer.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.nn import functional as F

__all__ = ["GroupedDPOptimizer", "LoraGradSampler", "UnsupportedLoraModel", "lora_layers"]


class UnsupportedLoraModel(ValueError):
    """The model has trainable weights this module cannot give per-sample gradients for."""


def _per_sample(grad: torch.Tensor, inp: torch.Tensor, scale: float) -> torch.Tensor:
    """sum_t grad[i,t] inp[i,t]^T for each sample i; 3-D or 4-D, batch first, in grad's dtype."""
    n = inp.shape[0]
    gs = torch.bmm(
        grad.reshape(n, -1, grad.shape[-1]).transpose(1, 2), inp.reshape(n, -1, inp.shape[-1]).to(grad.dtype)
    )
    return gs.mul_(scale) if scale != 1.0 else gs


def _write(p: torch.Tensor, grad_sample: torch.Tensor) -> None:
    if getattr(p, "grad_sample", None) is not None:
        raise RuntimeError(
            "grad_sample is already set: call optimizer.zero_grad() before each backward "
            "(a LoRA layer used twice in one forward, or accumulation over batches, is not supported)"
        )
    p.grad_sample = grad_sample  # type: ignore[attr-defined]


class _LoraDelta(torch.autograd.Function):
    """`scaling * B(A(x))` whose backward writes per-sample gradients of A and B instead of summed ones."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float, mean: bool
    ) -> torch.Tensor:
        h = F.linear(x.to(weight_a.dtype), weight_a)  # the same ops, in the same order, as peft
        ctx.save_for_backward(x, h)
        ctx.weights, ctx.scaling, ctx.mean = (weight_a, weight_b), scaling, mean
        return F.linear(h, weight_b) * scaling

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        x, h = ctx.saved_tensors
        weight_a, weight_b = ctx.weights
        g = grad_out.to(weight_b.dtype) * ctx.scaling
        gh = g @ weight_b
        # A mean loss scales each record's gradient by 1/n; Opacus's hooks multiply it back by n.
        scale = float(x.shape[0]) if ctx.mean else 1.0
        if weight_b.requires_grad:
            _write(weight_b, _per_sample(g, h, scale))
        if weight_a.requires_grad:
            _write(weight_a, _per_sample(gh, x, scale))
        grad_x = (gh @ weight_a).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


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
            a, b = self_.lora_A[name], self_.lora_B[name]
            dropout = self_.lora_dropout[name]
            if not isinstance(dropout, nn.Identity):  # peft's order: cast, then dropout (same RNG draws)
                x = dropout(self_._cast_input_dtype(x, a.weight.dtype))  # type: ignore[arg-type]
            delta = _LoraDelta.apply(x, a.weight, b.weight, self_.scaling[name], mean)
            return (result + delta).to(result.dtype)

        self._patched.append((layer, layer.__dict__.get("forward")))
        layer.forward = types.MethodType(forward, layer)  # type: ignore[method-assign]

    def close(self) -> None:
        """Restore the stock peft forward of every layer (idempotent)."""
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
    """Opacus's `DPOptimizer` with its per-parameter Python loops batched, for models with many small tensors.

    A LoRA model has hundreds of factor tensors (392 for R1-Distill-1.5B on all linears): Opacus
    clips them with several kernels each and `scale_grad` rescans every parameter once per
    parameter (quadratic). Here per-sample grads of equal shape are stacked, so the per-sample
    norms, clip factors and clipped sums take a few kernels per shape; the norm formula, the
    1e-6 guard and the order of the noise draws (`add_noise` is Opacus's own) stay the same.
    """

    def __init__(self, *args: Any, batched_noise: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batched_noise = batched_noise

    def add_noise(self) -> None:
        """Opacus's Gaussian mechanism, N(0, (noise_multiplier * max_grad_norm)^2) on every coordinate
        of every clipped sum, drawn in one call per dtype/device instead of one (plus a zeros
        tensor) per parameter. Same distribution, different draw order from Opacus's loop, so
        `batched_noise=False` (and secure_mode, whose 4-draw sum stays Opacus's) keep the loop."""
        if self.secure_mode or not self.batched_noise:
            super().add_noise()
            return
        std = self.noise_multiplier * self.max_grad_norm
        sums: list[torch.Tensor] = [p.summed_grad for p in self.params]  # type: ignore[attr-defined]
        for s in sums:
            _check_processed_flag(s)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, s in enumerate(sums):
            groups.setdefault((s.dtype, s.device), []).append(i)
        for (dtype, device), idx in groups.items():
            total = sum(sums[i].numel() for i in idx)
            if std == 0:
                flat = torch.zeros(total, dtype=dtype, device=device)
            else:
                flat = torch.normal(0.0, std, size=(total,), dtype=dtype, device=device, generator=self.generator)
            chunks = flat.split([sums[i].numel() for i in idx])
            noised = torch._foreach_add(
                [sums[i] for i in idx], [c.view_as(sums[i]) for c, i in zip(chunks, idx, strict=True)]
            )
            for i, grad in zip(idx, noised, strict=True):
                self.params[i].grad = grad.view_as(self.params[i])
                _mark_as_processed(sums[i])

    def clip_and_accumulate(self) -> None:
        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        if not samples or len(samples[0]) == 0 or any(s.dtype != p.dtype for s, p in zip(samples, params, strict=True)):
            super().clip_and_accumulate()  # empty batch, mixed dtypes: Opacus's loop
            return
        for p in params:
            _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, g in enumerate(samples):
            groups.setdefault((g.shape, g.dtype, g.device), []).append(i)
        n = len(samples[0])
        stacked = {key: torch.stack([samples[i] for i in idx]) for key, idx in groups.items()}
        norms = torch.empty((n, len(samples)), device=samples[0].device, dtype=samples[0].dtype)
        for key, idx in groups.items():  # per-parameter, per-sample norms, as Opacus computes them
            norms[:, idx] = stacked[key].reshape(len(idx), n, -1).norm(2, dim=-1).T.to(norms.device)
        factor = (self.max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        for key, idx in groups.items():
            summed = torch.einsum("i,ki...->k...", factor.to(stacked[key]), stacked[key])
            for i, grad in zip(idx, summed.unbind(0), strict=True):
                p = params[i]
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad  # type: ignore[attr-defined]
                _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)
