"""Linear layers for the fast runner: the model's own weight, or INT8 weight-only (per output channel).

INT8 halves the bytes each decode step reads, which is what bounds small-batch decoding. The
weight is dequantised inside the matmul expression (`x @ q.to(dtype) * scale`); under
`torch.compile` the cast fuses into the GEMM, eagerly it costs a temporary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LinearParts = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""(weight, bias, scale): scale is None for a weight in the model dtype, else the int8 weight's per-row scale."""


def linear(x: torch.Tensor, parts: LinearParts) -> torch.Tensor:
    weight, bias, scale = parts
    if scale is None:
        return F.linear(x, weight, bias)
    y = F.linear(x, weight.to(x.dtype)) * scale
    return y if bias is None else y + bias


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scale [out] float32)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Linear:
    """y = x W^T (+ b), with W in the model dtype or as int8 + scale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, int8: bool = False) -> None:
        self.bias = bias
        self.out_features = int(weight.shape[0])
        self.scale: torch.Tensor | None = None
        if int8:
            self.weight, scale = quantize_int8(weight)
            self.scale = scale.to(weight.dtype)
        else:
            self.weight = weight

    @property
    def parts(self) -> LinearParts:
        """Plain tensors, so `torch.compile` guards on shapes rather than on one object per layer."""
        return (self.weight, self.bias, self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.parts)

    def nbytes(self) -> int:
        extra = 0 if self.scale is None else self.scale.nbytes
        return self.weight.nbytes + extra + (0 if self.bias is None else self.bias.nbytes)
