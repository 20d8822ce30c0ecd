"""LoRA adapter weights in the form the serving engine uses: per target module, A and a scaled B.

Adapters come from the peft model that ModelHost keeps (named adapters) or from the safetensors
arrays a node receives (`federation.protocol.wire`, peft state-dict keys); either way the result is a plain
mapping the fast runner copies into its stacked multi-adapter buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module path in the base model (e.g. `model.layers.0.self_attn.q_proj`) -> (A [r, in], scaling * B [out, r])."""

_PEFT_PREFIX = "base_model.model."


def lora_from_peft(peft_model: Any, adapter: str) -> LoraWeights:
    """Read adapter `adapter` out of a peft model (scaling folded into B)."""
    from peft.tuners.lora import LoraLayer

    out: LoraWeights = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(f"adapter {adapter!r} uses DoRA, which the serving engine does not support")
        a_mod: Any = module.lora_A[adapter]
        b_mod: Any = module.lora_B[adapter]
        a = a_mod.weight.detach()
        b = b_mod.weight.detach() * float(module.scaling[adapter])
        out[name.removeprefix(_PEFT_PREFIX)] = (a, b)
    if not out:
        raise KeyError(f"adapter {adapter!r} not found in the peft model")
    return out


def lora_from_arrays(arrays: Mapping[str, np.ndarray], *, scaling: float) -> LoraWeights:
    """Parse peft state-dict arrays (`...q_proj.lora_A.weight`) as the wire format carries them."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        for kind in ("lora_A", "lora_B"):
            suffix = f".{kind}.weight"
            if key.endswith(suffix):
                path = key.removesuffix(suffix).removeprefix(_PEFT_PREFIX)
                parts.setdefault(path, {})[kind] = torch.from_numpy(np.asarray(value, dtype=np.float32))
                break
        else:
            raise ValueError(f"unexpected adapter tensor {key!r}")
    out: LoraWeights = {}
    for path, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter module {path!r} lacks lora_A or lora_B")
        out[path] = (ab["lora_A"], ab["lora_B"] * scaling)
    return out
