"""The demo's base model: the tiny DeepSeek-V3, pretrained on public referral chats, cached.

Seeded weights (`node.model.write_tiny_model`) answer noise; pretrained on the public corpus
(`fedseek_examples.demo.public`, never a site's records) the model answers in the task's form,
one department name then end of turn, without knowing which findings mean which department.
Deterministic for (model config, public seed, corpus size, epochs, generator version): that key
names the cache entry, so a second demo run copies the model instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from fedseek_examples.demo.public import GENERATOR_VERSION, PUBLIC_SEED, public_chats, public_records

from node.data import Example, tokenize
from node.model import TinyModelConfig, load_model, write_tiny_model
from node.pretrain import PretrainSettings, pretrain

MARKER = "fedseek_pretrain.json"
"""Written last into a pretrained model directory: its cache key and what the pretraining did."""


@dataclass(frozen=True)
class PublicPretraining:
    """What the tiny model is pretrained on and how; every field is part of the cache key."""

    public_seed: int = PUBLIC_SEED
    n_public: int = 480
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-2
    generator_version: int = GENERATOR_VERSION


def cache_key(config: TinyModelConfig, pretraining: PublicPretraining) -> str:
    blob = json.dumps({"model": asdict(config), "pretraining": asdict(pretraining)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pretrained_key(model_dir: Path) -> str | None:
    try:
        return str(json.loads((model_dir / MARKER).read_text())["key"])
    except (OSError, ValueError, KeyError):
        return None


def _train(out: Path, config: TinyModelConfig, pretraining: PublicPretraining, log: Callable[[str], None]) -> None:
    write_tiny_model(out, config)
    model, tok = load_model(out)
    # Only the referral-copy chats carry an answer; the answer-only loss skips the prompts' 128k-way
    # heads (see PretrainSettings.loss), and the embeddings stay at their seeded values: both keep
    # this to minutes on a small CPU.
    chats = public_chats(
        public_records(n=pretraining.n_public, seed=pretraining.public_seed), seed=pretraining.public_seed
    )
    rows = tokenize([Example(messages=c) for c in chats if c[-1]["role"] == "assistant"], tok)
    model.get_input_embeddings().weight.requires_grad_(False)
    settings = PretrainSettings(
        epochs=pretraining.epochs,
        batch_size=pretraining.batch_size,
        learning_rate=pretraining.learning_rate,
        seed=config.seed,
        loss="answer",
    )
    result = pretrain(model, rows, pad_id=int(tok.pad_token_id), settings=settings, log=log)
    model.save_pretrained(out)
    info = {"key": cache_key(config, pretraining), "public_chats": len(rows), **asdict(pretraining), **asdict(result)}
    (out / MARKER).write_text(json.dumps(info, indent=2))


def write_pretrained_tiny_model(
    out: str | Path,
    *,
    config: TinyModelConfig | None = None,
    pretraining: PublicPretraining | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the pretrained tiny model to `out`, from `cache_dir` when it holds this key; returns its marker.

    `out` already pretrained under the same key is kept as it is. The cache entry is filled by
    an atomic rename, so an interrupted run never leaves a half-written model to be reused.
    """
    cfg, pre = config or TinyModelConfig(), pretraining or PublicPretraining()
    key = cache_key(cfg, pre)
    out_dir = Path(out)
    if _pretrained_key(out_dir) == key:
        return {**json.loads((out_dir / MARKER).read_text()), "cached": True}
    cached = cache_dir / key if cache_dir is not None else None
    hit = cached is not None and _pretrained_key(cached) == key
    if not hit:
        start = time.perf_counter()
        log(f"pretraining the tiny model on public referral chats (key {key}, {torch.get_num_threads()} threads)")
        parent = cache_dir if cache_dir is not None else out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=parent))
        try:
            _train(work, cfg, pre, log)
            if cached is None:
                shutil.rmtree(out_dir, ignore_errors=True)
                work.rename(out_dir)
                return {**json.loads((out_dir / MARKER).read_text()), "cached": False}
            shutil.rmtree(cached, ignore_errors=True)
            work.rename(cached)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"public pretraining took {time.perf_counter() - start:.0f} s")
    assert cached is not None
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(cached, out_dir)
    return {**json.loads((out_dir / MARKER).read_text()), "cached": hit}
