"""A deployed adapter version in PEFT's own format, for an engine that loads adapters from a directory.

vLLM's `POST /v1/load_lora_adapter` takes a directory holding what `PeftModel.save_pretrained` writes:
`adapter_config.json` (a `LoraConfig`: rank, alpha, target modules) and `adapter_model.safetensors`
(the LoRA A/B matrices under PEFT's keys, `base_model.model.<module>.lora_A.weight`). The node's own
wire arrays (`get_peft_model_state_dict`) already use those keys, so the export writes them unchanged;
checked on the tiny Qwen2: vLLM's greedy tokens with the exported adapter equal the node's peft model's.

A directory is written whole or not at all (a temporary sibling, then one rename): vLLM never reads half
an adapter. Its name carries the version and its sha256's first 12 hex digits, so a reused path never
serves other weights (vLLM warns that its prefix cache outlives an in-place reload from the same path).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from federation.protocol import wire
from federation.protocol.names import check_adapter_name

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "export_dir_name", "remove_export", "write_peft_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FILE_MODE = 0o640  # readable by the engine's group (a vLLM running as another user of the node's group)
DIR_MODE = 0o750


def export_dir_name(version: str, sha256: str) -> str:
    """`<version>-<sha256[:12]>`: a plain name (checked), never a path."""
    return f"{check_adapter_name(version)}-{sha256[:12]}"


def write_peft_adapter(
    root: Path, *, version: str, sha256: str, arrays: wire.Arrays, lora_config: Any, base_model: str
) -> Path:
    """Write `arrays` with `lora_config` (a peft `LoraConfig`) as `<root>/<version>-<sha12>/`; returns it.

    An existing directory of that name is kept as it is (same version, same weights).
    """
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, DIR_MODE)
    target = root / export_dir_name(version, sha256)
    if (target / CONFIG_FILE).is_file() and (target / WEIGHTS_FILE).is_file():
        return target
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=DIR_MODE)
    try:
        config = copy.deepcopy(lora_config)
        config.base_model_name_or_path = base_model
        config.inference_mode = True
        config.save_pretrained(str(tmp))  # adapter_config.json, as peft writes it (a key of ours would warn)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        for f in tmp.iterdir():
            os.chmod(f, FILE_MODE)
        shutil.rmtree(target, ignore_errors=True)  # a half-written one from a crash: replaced
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def remove_export(path: Path) -> None:
    """Delete an exported directory (weights in clear, even at a site that keeps its adapters encrypted)."""
    shutil.rmtree(path, ignore_errors=True)
