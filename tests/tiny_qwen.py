"""A tiny seeded Qwen2 (the R1-Distill family, and the serving fast path's architecture) built from a config.

One builder for the serving tests and the LoRA DP tests; each passes what its checks depend on.
"""

from __future__ import annotations

from typing import Any

import torch

BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": False,
}


def tiny_qwen2(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any) -> Any:
    """A randomly initialised Qwen2 in eval mode; `config` overrides BASE_CONFIG's Qwen2Config fields."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**BASE_CONFIG, **config})
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
