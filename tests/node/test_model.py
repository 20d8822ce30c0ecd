"""Loading the tiny seeded DeepSeek-V3 checkpoint offline, and refusing broken model directories."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node.model import CHAT_TEMPLATE, ModelLoadError, load_model, lora_target_modules, write_tiny_model

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
