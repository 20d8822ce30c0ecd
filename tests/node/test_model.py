"""Loading the tiny seeded DeepSeek-V3 checkpoint offline, and refusing broken model directories."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from node.model import (
    CHAT_TEMPLATE,
    ModelLoadError,
    load_model,
    lora_target_modules,
    pad_safe_attention_mask,
    write_tiny_model,
)

MLA = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model(tiny_model_dir)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(model_dir: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(model_dir)
    message = str(info.value)
    assert message.strip()
    assert "\n" not in message
    return message


def test_tiny_model_loads_as_deepseek_v3(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    assert model.config.model_type == "deepseek_v3"
    assert tok.chat_template
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert not model.training
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert ids.startswith(tok.bos_token) and ids.endswith("<｜Assistant｜>")


def test_chat_template_round_trips_through_save(tiny_model_dir: Path, loaded: tuple[Any, Any]) -> None:
    _, tok = loaded
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tiny_model_dir / "config.json").is_file()
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_write_is_seeded_and_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    assert _sha(again / "model.safetensors") == _sha(tiny_model_dir / "model.safetensors")
    assert (again / "config.json").read_text() == (tiny_model_dir / "config.json").read_text()


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    message = _one_line_error(tmp_path / "nowhere")
    assert "not found" in message


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _one_line_error(tmp_path)
    assert "config.json" in message


def test_truncated_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _one_line_error(broken)
    assert str(broken) in message


def test_garbage_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "garbage"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    _one_line_error(broken)


def test_lora_targets_are_mla_projections(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    targets = lora_target_modules(model)
    assert set(targets) == MLA  # q_lora_rank > 0: q_a/q_b instead of q_proj
    assert not set(targets) & MLP
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(targets) <= leaf_names
    assert leaf_names >= MLP  # the MLP linears exist but are deliberately not targeted


def test_lora_targets_for_other_architectures() -> None:
    qwen = SimpleNamespace(config=SimpleNamespace(model_type="qwen2"))
    assert set(lora_target_modules(qwen)) == {"q_proj", "k_proj", "v_proj", "o_proj", *MLP}


LEFT_PADDED = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])


def _transformers_mask(model: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """The 4-D mask transformers itself builds from the 2-D mask (what the model used before)."""
    from transformers.masking_utils import create_causal_mask

    embeds = torch.zeros((*attention_mask.shape, 1), dtype=model.dtype)
    return create_causal_mask(model.config, embeds, attention_mask, past_key_values=None, allow_is_causal_skip=False)


def test_pad_safe_mask_leaves_no_query_without_keys(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    assert model.config._attn_implementation == "sdpa"
    ours = pad_safe_attention_mask(model, LEFT_PADDED)
    theirs = _transformers_mask(model, LEFT_PADDED)
    assert ours.dtype == torch.bool and ours.shape == (3, 1, 5, 5)
    assert (~theirs).all(dim=-1).any(), "transformers' own mask has all-masked pad rows (the NaN's cause)"
    assert ours.any(dim=-1).all(), "every query row attends at least one key"
    real = LEFT_PADDED.bool()[:, None, :, None].expand_as(ours)
    assert torch.equal(ours[real], theirs[real]), "rows of real tokens are unchanged"
    pad_rows = ours[~real].view(-1, 5)
    assert (pad_rows.sum(dim=-1) == 1).all(), "a pad query attends itself only"


def test_pad_safe_mask_is_additive_for_eager_and_untouched_otherwise(loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    sdpa = pad_safe_attention_mask(model, LEFT_PADDED)
    assert pad_safe_attention_mask(model, torch.ones(2, 5, dtype=torch.long)).shape == (2, 5)  # no padding: causal path
    try:
        model.config._attn_implementation = "eager"
        eager = pad_safe_attention_mask(model, LEFT_PADDED)
        model.config._attn_implementation = "flash_attention_2"
        assert pad_safe_attention_mask(model, LEFT_PADDED) is LEFT_PADDED  # unpads the batch itself
    finally:
        model.config._attn_implementation = "sdpa"
    assert eager.dtype == model.dtype
    assert torch.equal(eager == 0, sdpa)
    assert (eager[~sdpa] == torch.finfo(model.dtype).min).all()
