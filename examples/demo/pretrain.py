"""The demo's base model: the tiny DeepSeek-V3, pretrained on public chats, cached.

Seeded weights (`node.model.write_tiny_model`) answer noise; pretrained on the public corpus
(`fedseek_examples.demo.public`, never a site's records) the model answers in the task's form,
one department name then end of turn, and knows which findings go together, without knowing
which department sees them: that mapping is what the federation's DP rounds teach.
Deterministic for (model config, every `PublicPretraining` field): that key names the cache
entry, so a second demo run copies the model instead of training again.
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
from typing import Any, Literal

import torch
from fedseek_examples.demo.public import GENERATOR_VERSION, PUBLIC_SEED, public_chats, public_records

from node.data import Example, TokenizedExample, flat_ids, tokenize
from node.model import TinyModelConfig, load_model, write_tiny_model
from node.pretrain import PretrainSettings, pretrain

MARKER = "fedseek_pretrain.json"
"""Written last into a pretrained model directory: its cache key and what the pretraining did."""


@dataclass(frozen=True)
class PublicPretraining:
    """What the tiny model is pretrained on and how; every field is part of the cache key.

    The defaults give the DP rounds a base they can teach (examples/demo/README.md has the numbers): a
    causal-LM loss on every token of the public chats (the notes' words and which findings go together,
    the answers' form), over the corpus's own 706 tokens instead of the 129k-token head
    (`corpus_vocabulary`): six epochs over 1,440 chats take 21-26 s (42-47 s of CPU) on 2 cores, where the
    earlier three answer-only epochs over 480 took 14 s (27 s); with the full head, ~10 minutes (270 x 2.1 s).
    """

    public_seed: int = PUBLIC_SEED
    n_public: int = 480
    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 1e-2
    generator_version: int = GENERATOR_VERSION
    uniform_task_answers: bool = True
    """Answer the task's own prompt too, with every department equally often at random (`public.public_chats`)."""
    companions: bool = True
    """Ask which other finding comes with a note's findings (`public.companion_chat`)."""
    loss: Literal["all", "answer"] = "all"
    """"all": every token of every chat; "answer": the answered chats' answers only (`PretrainSettings.loss`)."""
    corpus_vocabulary: bool = True
    """Compute the head on the corpus's own tokens only (`PretrainSettings.vocabulary`)."""


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
    chats = public_chats(
        public_records(n=pretraining.n_public, seed=pretraining.public_seed),
        seed=pretraining.public_seed,
        uniform_task_answers=pretraining.uniform_task_answers,
        companions=pretraining.companions,
    )
    if pretraining.loss == "all":  # every token: where the model learns which findings go together
        rows = [_all_tokens(c, tok) for c in chats]
    else:
        rows = tokenize([Example(messages=c) for c in chats if c[-1]["role"] == "assistant"], tok)
    vocabulary = sorted({t for r in rows for t in r.labels if t != -100}) if pretraining.corpus_vocabulary else []
    model.get_input_embeddings().weight.requires_grad_(False)  # the seeded ones already tell 706 tokens apart
    settings = PretrainSettings(
        vocabulary=tuple(vocabulary),
        epochs=pretraining.epochs,
        batch_size=pretraining.batch_size,
        learning_rate=pretraining.learning_rate,
        seed=config.seed,
        loss=pretraining.loss,
    )
    result = pretrain(model, rows, pad_id=int(tok.pad_token_id), settings=settings, log=log)
    model.save_pretrained(out)
    info = {"key": cache_key(config, pretraining), "public_chats": len(rows), **asdict(pretraining), **asdict(result)}
    (out / MARKER).write_text(json.dumps(info, indent=2))


def _all_tokens(chat: list[dict[str, str]], tok: Any) -> TokenizedExample:
    """A chat as one causal-LM row (every token a label); an unanswered one ends with the generation prompt."""
    answered = chat[-1]["role"] == "assistant"
    ids = flat_ids(tok.apply_chat_template(chat, add_generation_prompt=not answered, tokenize=True))
    return TokenizedExample(input_ids=ids, labels=list(ids))


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
        log(f"pretraining the tiny model on public chats (key {key}, {torch.get_num_threads()} threads)")
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
