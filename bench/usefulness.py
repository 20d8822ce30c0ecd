"""Usefulness: does the DP federation learn the demo task nearly as well as pooling the data?

The question a consortium asks before joining: is DP-SGD at epsilon 1 per site, federated,
worth more than each hospital training alone with the same privacy, and how much does it lose
against pooling everything without privacy (which no hospital may do)? One process, one base
model loaded once (``node.engine.ModelHost``, the product's LoRA settings and targets), the
demo's synthetic non-IID triage notes (``fedseek_examples.demo.data``), three arms:

* ``pooled_nonprivate`` (a): non-private LoRA on all sites' training records together (plain
  AdamW on ``node.trainer.per_sample_loss``, the trainer's loss);
* ``site_alone`` (b): each site runs ``node.trainer.train_round`` for ``--rounds`` rounds on its
  own records, continuing from its own adapter, with its own real ``PrivacyLedger`` (epsilon 1,
  delta ``--delta`` < 1/n): the node's DP path exactly, no peers;
* ``federated`` (c): the same rounds, but every round starts from the global adapter: the
  example-weighted mean of the sites' updates computed by ``coordinator.aggregate.weighted_average``
  (what ``LoraFedAvg`` calls, weights ``PrivacyReport.num_examples``), then moved by the server's
  optimizer (``--server-opt``, ``ServerOpt``): FedAvgM, momentum 0.9, by default, ``fedavg`` for the
  plain mean the coordinator ships today, ``fedadam`` too. ``--variant NAME:key=value,...``
  compares other federation settings in the same run (same data, base model and (a)).

Defaults (8 rounds, FedAvgM 0.9, lr grid 0.003 / 0.01) are the winners of the 2026-12-06 H100
sweep over six data seeds (BENCHMARKS.md, ``bench/usefulness_seeds.py``): against 4 rounds of
plain FedAvg they lifted the hard seed 11 from 0.80 to 0.90 mean exact match over repeated runs
and seeds 7 and 17 to 1.000; clip 0.3 / 0.1, FedAvgM or a server lr of 2 at 4 rounds did worse.

Score: exact match (``node.data.exact_match``) of the greedy answer that ``ModelHost.generate``
produces (the serving path: chat template, EOS handling) on held-out records of *every* site,
one test set shared by all arms. Each arm gets the same learning-rate grid, run in order and
chosen on a separate validation split (also from every site); clip 1.0 is fixed for every arm.
The test set is scored once per arm, with the chosen rate. Tuning on private data is not charged
to the ledgers (as usual in DP papers): each reported run spends at most epsilon 1 per site, the
sweep as a whole does not.

Sites are non-IID by speciality: ``--minority-weight 0.1`` makes each site's two departments
about 96% of its records and the other four about 1% each, so a site alone lacks coverage.

Model. A small Qwen2 (the R1-Distill family's architecture) generated from a config and seed,
with a byte-level BPE tokenizer trained on the demo vocabulary (each word one token; the shape
``AutoTokenizer`` rebuilds as Qwen2Tokenizer, checked by ``check_tokenizer_round_trip``), then
pretrained on **public** text (a different seed): the task's prompts without answers, and a
referral-copy chat ("Referred by X. Which department referred this patient?" -> X) whose answer
is drawn independently of the findings. So the base knows the words and the one-word answer
format but not the private findings-to-department mapping (it scores about chance). Nothing is
downloaded. (SmolLM2-135M loads here but trains at ~1 s per record on 2 CPU cores, far too slow
for the thousands of records DP at epsilon 1 needs.) On CUDA the base runs in float32 with eager
attention (``--cuda-precision fp32-eager``, the default): in bf16 + SDPA (``node``, as the node
loads it) the DP arms trained finite on the H200, but arm (a), which has no clipping, went NaN
after its first epoch at lr 0.01 (2026-11-28, 50,000 records/site, batch 2,500). All-masked pad
rows are not the cause there: ``bench/pad_mask_check.py`` found every SDPA backend finite on them.
An adapter with NaN scores 0 and is marked diverged instead of stopping the run.

Noise. DP-SGD's noise on the averaged gradient is ``sigma * clip / batch``, and at a fixed sample
rate and number of epochs sigma stays put while the batch grows with the records: 30,000
synthetic records per site at q = 0.05 give batches of 1,500 (three times less noise per step than
10,000 records). ``--ffa-lora`` (default on) trains the DP arms as FFA-LoRA (``TrainSettings.
freeze_lora_a``, B only: half the noisy dimensions, exact averaging); arm (a) trains A and B.

Usage: ``python -m bench.usefulness --device cuda --budget-s 600`` (the full configuration on
an H200, about 2 min per learning rate; ``--budget-s`` stops the lr sweep early to fit a time
limit), ``--quick`` for a CPU
smoke run. Writes ``bench/results/usefulness_<device>_<date>.json`` (with every DP site's
ledger of arm (c), for ``privacy/budget_plot.py``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's packages

from fedseek_examples.demo.data import (
    DEPARTMENTS,
    FINDINGS,
    NEUTRAL_PHRASES,
    QUESTION,
    SYSTEM_PROMPT,
    ClinicalRecord,
    generate_site_records,
    question_for,
)
from fedseek_examples.demo.public import PUBLIC_QUESTION, REFERRAL, public_chats, public_records

from bench.common import machine, versions
from coordinator.aggregate import weighted_average
from coordinator.server_opt import ServerOpt, ServerState
from federation.protocol import wire
from federation.protocol.round_settings import NOISE_SCHEDULES, SERVER_OPTS
from node.data import Example, TokenizedExample, collate, exact_match, tokenize
from node.engine import TRAIN_ADAPTER, LoraSettings, ModelHost
from node.model import CHAT_TEMPLATE, load_model
from node.pretrain import PretrainSettings, pretrain
from node.trainer import RoundResult, TrainSettings, per_sample_loss, train_round
from privacy.ledger import Budget, PrivacyLedger

ARMS = ("pooled_nonprivate", "site_alone", "federated")
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>")
UNK = "<unk>"
GOAL_FRACTION = 0.9


# ---- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSplits:
    """One site's records: consecutive draws of its stream, so the three parts never overlap."""

    name: str
    train: list[ClinicalRecord]
    val: list[ClinicalRecord]
    test: list[ClinicalRecord]


def site_splits(
    *, n_sites: int, n_train: int, n_val: int, n_test: int, seed: int, minority_weight: float = 1.0
) -> list[SiteSplits]:
    """Every site's train / validation / test records, as ``write_site_dataset`` draws them (train first)."""
    out = []
    for i in range(n_sites):
        n = n_train + n_val + n_test
        recs = generate_site_records(site_index=i, n_sites=n_sites, n=n, seed=seed, minority_weight=minority_weight)
        out.append(
            SiteSplits(
                name=f"site-{i}",
                train=recs[:n_train],
                val=recs[n_train : n_train + n_val],
                test=recs[n_train + n_val :],
            )
        )
    return out


def held_out(splits: Sequence[SiteSplits], part: str) -> list[ClinicalRecord]:
    """The evaluation set every arm is scored on: that part of every site, in site order."""
    return [r for s in splits for r in getattr(s, part)]


def examples(records: Sequence[ClinicalRecord]) -> list[Example]:
    return [Example(messages=r.to_chat()["messages"]) for r in records]


# ---- the federated average the coordinator computes --------------------------------------


def federated_average(results: Sequence[RoundResult]) -> wire.Arrays:
    """The global adapter of one round: what ``LoraFedAvg.aggregate_train`` computes from the same replies."""
    return weighted_average([(r.arrays, float(r.report.num_examples)) for r in results])


# ---- base model: generated from config, public pretraining --------------------------------

# Qwen2's pre-tokenizer split (words with their leading space, single digits): transformers rebuilds
# a qwen2 checkpoint's tokenizer as Qwen2Tokenizer from tokenizer.json's vocab and merges, so the
# synthetic tokenizer must be a byte-level BPE of that shape to survive `node.model.load_model`.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer() -> Any:
    """Byte-level BPE over the demo's vocabulary (every word one token), DeepSeek chat tokens, chat template.

    Not a word-level model: `AutoTokenizer` loads a qwen2 directory as Qwen2Tokenizer, which
    rebuilds a BPE from vocab and merges; a word-level tokenizer.json came back as single
    letters, so the fine-tuning data were tokenized unlike the public pretraining (the cause of
    the earlier 0% everywhere). `check_tokenizer_round_trip` guards this.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    corpus = [SYSTEM_PROMPT, QUESTION, PUBLIC_QUESTION, *DEPARTMENTS]
    corpus += [REFERRAL.format(department=d) for d in DEPARTMENTS]
    corpus += [p for phrases in FINDINGS.values() for p in phrases] + list(NEUTRAL_PHRASES)
    for i in range(3):  # every opener and joining word the notes use
        corpus += [r.note for r in generate_site_records(site_index=i, n_sites=3, n=200, seed=12345)]
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=4000,  # more than the corpus can merge into: every word ends up a single token
        special_tokens=[PAD, BOS, EOS, UNK, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(CHAT_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_tokenizer_round_trip(built: Any, loaded: Any, records: Sequence[ClinicalRecord]) -> None:
    """The tokenizer the node loads must encode the task exactly as the one pretraining used."""
    for r in records:
        chat = r.to_chat()["messages"]
        a, b = (t.apply_chat_template(chat, tokenize=True) for t in (built, loaded))
        a, b = (list(x["input_ids"] if hasattr(x, "keys") else x) for x in (a, b))
        if a != b:
            raise RuntimeError(f"the saved tokenizer reloads as {type(loaded).__name__} and encodes differently")


@dataclass(frozen=True)
class BaseShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


def build_base_model(
    out_dir: Path, *, shape: BaseShape, public: Sequence[ClinicalRecord], epochs: int, device: str, seed: int
) -> dict[str, Any]:
    """Seeded Qwen2 + public pretraining (all weights, causal LM on prompts without answers); saved to out_dir."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = build_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        **asdict(shape),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    rows = []
    for chat in public_chats(public, seed=seed):
        answered = chat[-1]["role"] == "assistant"
        ids = tok.apply_chat_template(chat, add_generation_prompt=not answered, tokenize=True)
        ids = [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
        rows.append(TokenizedExample(input_ids=ids, labels=list(ids)))  # causal LM on every token
    settings = PretrainSettings(epochs=epochs, batch_size=128, learning_rate=3e-3, seed=seed, loss="all")
    result = pretrain(model, rows, pad_id=int(tok.pad_token_id), settings=settings, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {
        "architecture": "Qwen2ForCausalLM",
        "shape": asdict(shape),
        "vocab_size": len(tok),
        "parameters": sum(p.numel() for p in model.parameters()),
        "public_records": len(public),
        "public_epochs": epochs,
        "public_final_loss": result.final_loss,
        "public_seconds": result.seconds,
    }


# ---- arms -------------------------------------------------------------------------------


@dataclass
class ArmRun:
    """One trained adapter of one arm at one learning rate, with what it cost."""

    arm: str
    lr: float
    arrays: wire.Arrays
    epsilon: dict[str, float] = field(default_factory=dict)
    noise: dict[str, list[float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    ledgers: dict[str, dict[str, Any]] = field(default_factory=dict)


def train_nonprivate(
    host: ModelHost, data: Sequence[TokenizedExample], *, epochs: int, batch_size: int, lr: float, seed: int
) -> ArmRun:
    """Arm (a): plain AdamW on the pooled records, the same LoRA init, loss, batch size and epochs as the DP arms."""
    start = time.perf_counter()
    rng = random.Random(seed)
    pad = int(host.tokenizer.pad_token_id)
    losses = []
    with host.lock:
        host.reset_train_adapter(None)
        host.peft.set_adapter(TRAIN_ADAPTER)
        params = [p for p in host.peft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        host.peft.train()
        for epoch in range(epochs):
            order = list(range(len(data)))
            rng.shuffle(order)
            epoch_losses = []
            for b in range(0, len(order), batch_size):
                batch = collate([data[i] for i in order[b : b + batch_size]], pad_id=pad, left=True)
                batch = {k: v.to(host.device) for k, v in batch.items()}
                loss = per_sample_loss(host.peft, batch).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                epoch_losses.append(float(loss.detach()))
            losses.append(sum(epoch_losses) / len(epoch_losses))
            print(f"    (a) lr {lr:g} epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
        host.peft.eval()
        arrays = host.adapter_arrays(TRAIN_ADAPTER)
    return ArmRun("pooled_nonprivate", lr, arrays, losses=losses, seconds=time.perf_counter() - start)


def _ledger(root: Path, site: str, budget: Budget) -> PrivacyLedger:
    return PrivacyLedger(root / f"{site}.ledger.sqlite", budget=budget)


def _sent(arrays: wire.Arrays | None, settings: TrainSettings) -> wire.Arrays | None:
    """What the coordinator sends a site: under FFA-LoRA the B factors only (the site adds its seeded A)."""
    return wire.lora_b(arrays) if arrays is not None and settings.freeze_lora_a else arrays


def train_dp(
    host: ModelHost,
    data: dict[str, list[TokenizedExample]],
    *,
    federated: bool,
    rounds: int,
    settings: TrainSettings,
    budget: Budget,
    ledger_dir: Path,
    label: str,
    lr_decay: float = 1.0,
    server: ServerOpt | None = None,
    arm: str = "",
) -> list[ArmRun]:
    """Arms (b) and (c): the node's `train_round` per site per round, each site with a fresh ledger.

    (b) returns one run per site (each continues from its own adapter); (c) one run, the final
    global adapter, each round starting every site from the previous round's global adapter: the
    weighted average, moved by the server's optimizer when `server` is not plain FedAvg. Round r
    trains at ``learning_rate * lr_decay ** (r - 1)`` (the rate a coordinator would send that round).
    """
    start = time.perf_counter()
    ledgers = {s: _ledger(ledger_dir, s, budget) for s in data}
    own: dict[str, wire.Arrays | None] = {s: None for s in data}
    global_arrays: wire.Arrays | None = None
    server_state = ServerState(server or ServerOpt(), frozen_a=settings.freeze_lora_a)
    noise: dict[str, list[float]] = {s: [] for s in data}
    losses: list[float] = []
    for rnd in range(1, rounds + 1):
        results = []
        round_settings = replace(settings, learning_rate=settings.learning_rate * lr_decay ** (rnd - 1))
        for site, records in data.items():
            res = train_round(
                host,
                ledgers[site],
                records,
                site=site,
                run_id=label,
                round=rnd,
                rounds_left=rounds - rnd + 1,  # as node.service computes it
                global_arrays=_sent(global_arrays, settings) if federated else own[site],
                settings=round_settings,
            )
            own[site] = res.arrays
            noise[site].append(round(res.report.noise_multiplier, 4))
            results.append(res)
            print(
                f"    {label} round {rnd}/{rounds} {site}: loss {res.report.train_loss:.4f}, steps {res.report.steps}, "
                f"noise {res.report.noise_multiplier:.3f}, epsilon {res.report.epsilon:.3f}",
                flush=True,
            )
        if federated:
            previous = global_arrays if global_arrays is not None else host.initial_arrays()
            global_arrays = server_state.step(previous, federated_average(results))
        total = sum(r.report.num_examples for r in results)
        losses.append(sum(r.report.train_loss * r.report.num_examples for r in results) / total)
    seconds = time.perf_counter() - start
    eps = {s: ledgers[s].spent() for s in data}
    books = {s: ledgers[s].to_json() for s in data}
    lr = settings.learning_rate
    if federated:
        assert global_arrays is not None
        return [ArmRun(arm or "federated", lr, global_arrays, eps, noise, losses, seconds, books)]
    return [
        ArmRun(f"{arm or 'site_alone'}:{s}", lr, arrays, {s: eps[s]}, {s: noise[s]}, losses, seconds, {s: books[s]})
        for s, arrays in own.items()
        if arrays is not None
    ]


# ---- variants: federation settings compared in one run --------------------------------------


@dataclass(frozen=True)
class Variant:
    """One federation configuration: the DP settings both DP arms train with, their lr grid, and the
    server's step (arm (c) only). Variants that share DP settings share one arm (b)."""

    name: str
    rounds: int
    local_epochs: int
    batch_size: int
    clip: float
    ffa_lora: bool
    lrs: tuple[float, ...]
    lr_decay: float = 1.0
    """Round r trains at lr * lr_decay ** (r - 1): a schedule over rounds, which a coordinator can send."""
    server: ServerOpt = field(default_factory=ServerOpt)
    noise_schedule: str = "constant"
    """How each site's ledger spreads epsilon over the rounds (privacy.ledger.NOISE_SCHEDULES)."""

    @property
    def dp_key(self) -> tuple[Any, ...]:
        """What arm (b) depends on: everything but the server's step."""
        return (
            self.rounds, self.local_epochs, self.batch_size, self.clip, self.ffa_lora, self.lr_decay,
            self.noise_schedule,
        )  # fmt: skip

    def settings(self, lr: float) -> TrainSettings:
        return TrainSettings(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=lr,
            max_grad_norm=self.clip,
            freeze_lora_a=self.ffa_lora,
            budget_share=1.0,  # each arm's fresh ledger: the whole budget is the experiment's
            noise_schedule=self.noise_schedule,
        )

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["server"]["describe"] = self.server.describe()
        return out


_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
VARIANT_KEYS: dict[str, str] = {
    "rounds": "rounds",
    "local-epochs": "local_epochs",
    "batch-size": "batch_size",
    "clip": "clip",
    "ffa-lora": "ffa_lora",
    "lrs": "lrs",
    "lr-decay": "lr_decay",
    "noise-schedule": "noise_schedule",
    "server-opt": "kind",
    "server-lr": "lr",
    "server-momentum": "momentum",
    "server-beta2": "beta2",
    "server-tau": "tau",
}


def parse_variant(spec: str, base: Variant) -> Variant:
    """``NAME:key=value,key=value`` over `base` (keys: VARIANT_KEYS; lrs as 0.003/0.01; ffa-lora 0/1)."""
    name, _, body = spec.partition(":")
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name == base.name:
        raise ValueError(f"variant {spec!r}: give it a new name of letters, digits, '-', '_' or '.' before ':'")
    top: dict[str, Any] = {}
    srv: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in VARIANT_KEYS:
            raise ValueError(f"variant {name}: {item!r} is not key=value with a key of {', '.join(VARIANT_KEYS)}")
        attr = VARIANT_KEYS[key]
        if key.startswith("server-"):
            srv[attr] = value if attr == "kind" else float(value)
        elif key == "lrs":
            top[attr] = tuple(float(x) for x in value.split("/"))
        elif key == "noise-schedule":
            if value not in NOISE_SCHEDULES:
                raise ValueError(f"variant {name}: noise-schedule must be one of {NOISE_SCHEDULES}, not {value!r}")
            top[attr] = value
        elif key == "ffa-lora":
            if value.lower() not in _BOOL:
                raise ValueError(f"variant {name}: ffa-lora must be 0 or 1, not {value!r}")
            top[attr] = _BOOL[value.lower()]
        else:
            top[attr] = int(value) if attr in ("rounds", "local_epochs", "batch_size") else float(value)
    return replace(base, name=name, server=replace(base.server, **srv), **top)


# ---- evaluation ---------------------------------------------------------------------------


def score(host: ModelHost, arrays: wire.Arrays | None, records: Sequence[ClinicalRecord], *, version: str) -> dict:
    """Exact match of greedy answers served by ModelHost.generate under `arrays` (None: the base model)."""
    model = host.model_name
    version = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in version.lower())  # the one name pattern
    if arrays is not None and not all(np.isfinite(v).all() for v in arrays.values()):
        n = len(records)
        return {"exact_match": 0.0, "n": n, "diverged": True, "per_department": {}, "top_predictions": {}}
    if arrays is not None:
        host.install(version, arrays, sha256=wire.sha256_of(arrays))
        model = version
    hits: dict[str, list[int]] = {}
    predictions: dict[str, int] = {}
    t0 = time.perf_counter()
    for r in records:
        text = host.generate(question_for(r), model=model, max_tokens=3).text
        hits.setdefault(r.answer, []).append(int(exact_match(text, r.answer)))
        key = text.strip().split(" ")[0] if text.strip() else "<empty>"
        predictions[key] = predictions.get(key, 0) + 1
    _SECONDS_PER_ANSWER.append((time.perf_counter() - t0) / max(1, len(records)))
    if arrays is not None:  # keep the host from accumulating dozens of adapters
        host.peft.delete_adapter(version)
        host.adapters.pop(version, None)
    n = sum(len(v) for v in hits.values())
    return {
        "exact_match": sum(sum(v) for v in hits.values()) / n,
        "n": n,
        "per_department": {d: round(sum(v) / len(v), 4) for d, v in sorted(hits.items())},
        "top_predictions": dict(sorted(predictions.items(), key=lambda kv: -kv[1])[:8]),
    }


def score_by_site(host: ModelHost, arrays: wire.Arrays | None, splits: Sequence[SiteSplits], *, version: str) -> dict:
    """Test exact match over all sites together, and per site (same records, partitioned)."""
    per_site = {s.name: score(host, arrays, s.test, version=f"{version}-{s.name}") for s in splits}
    n = sum(v["n"] for v in per_site.values())
    total = sum(v["exact_match"] * v["n"] for v in per_site.values()) / n
    return {"exact_match": total, "n": n, "per_site": {k: round(v["exact_match"], 4) for k, v in per_site.items()}}


# ---- report -------------------------------------------------------------------------------

MARKDOWN_HEADER = (
    "| arm | privacy | lr (chosen on validation) | val EM | test EM (all sites) | per site test EM |\n"
    "| --- | --- | --- | --- | --- | --- |"
)


def markdown_rows(res: dict[str, Any]) -> list[str]:
    rows = []
    for row in res["table"]:
        per_site = ", ".join(f"{k} {v:.3f}" for k, v in row["per_site"].items())
        rows.append(
            f"| {row['arm']} | {row['privacy']} | {row['lr']} | {row['val_em']} "
            f"| **{row['test_em']:.3f}** | {per_site} |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--cuda-precision",
        choices=("fp32-eager", "node"),
        default="fp32-eager",
        help="on CUDA: float32 + eager attention, or the node's bf16 + SDPA (arm (a) went NaN there)",
    )
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=30000, help="private training records per site")
    ap.add_argument("--n-val", type=int, default=30, help="validation records per site (learning-rate choice)")
    ap.add_argument("--n-test", type=int, default=150, help="held-out test records per site")
    ap.add_argument("--minority-weight", type=float, default=0.1, help="weight of a site's non-specialities (6 / 3)")
    ap.add_argument("--n-public", type=int, default=3000, help="public notes for public pretraining")
    ap.add_argument("--public-epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=8, help="at most ~10 at q 0.05: the ledger caps noise at 50")
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1500, help="expected (Poisson) batch of DP-SGD; batch of (a)")
    ap.add_argument(
        "--ffa-lora", action=argparse.BooleanOptionalAction, default=True, help="DP arms train B only (FFA-LoRA)"
    )
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2], help="grid every arm gets, in run order")
    ap.add_argument("--lr-decay", type=float, default=1.0, help="round r trains at lr * decay ** (r - 1)")
    ap.add_argument(
        "--noise-schedule", choices=NOISE_SCHEDULES, default="constant", help="how each ledger spreads epsilon"
    )
    ap.add_argument("--server-opt", choices=SERVER_OPTS, default="fedavgm", help="the server's step, arm (c)")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--server-momentum", type=float, default=0.9, help="FedAvgM momentum; FedAdam beta1")
    ap.add_argument("--server-beta2", type=float, default=0.99, help="FedAdam")
    ap.add_argument("--server-tau", type=float, default=1e-3, help="FedAdam")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="another federation setting to compare in the same run (keys: " + ", ".join(VARIANT_KEYS) + ")",
    )
    ap.add_argument(
        "--federated-only",
        action="store_true",
        help="explore: train and score only the (c) arms (no (a), no (b), no goal verdict)",
    )
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=7, help="private data seed")
    ap.add_argument("--public-seed", type=int, default=2024, help="public notes seed (must differ from --seed)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one lr, 2 rounds")
    ap.add_argument("--budget-s", type=float, default=None, help="stop the lr sweep early to finish within this")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.n_public, args.public_epochs = 200, 5, 5, 100, 1
        args.rounds, args.batch_size, args.lrs = 2, 50, args.lrs[:1]
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    if args.public_seed == args.seed:
        ap.error("--public-seed must differ from --seed: the public notes must not be the sites' records")
    if not args.delta < 1 / args.n_train:
        ap.error(f"--delta must be < 1/n = {1 / args.n_train:g}")
    sizes = ("n_train", "n_val", "n_test", "n_public", "public_epochs", "rounds", "batch_size", "lrs", "ffa_lora")
    reduced = [k for k in sizes if getattr(args, k) != ap.get_default(k)]  # a run below the full configuration
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    date = datetime.now(UTC)
    out = args.out or Path(__file__).parent / "results" / f"usefulness_{args.device}_{date:%Y-%m-%d}.json"

    splits = site_splits(
        n_sites=args.sites,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        minority_weight=args.minority_weight,
    )
    per_site_public = math.ceil(args.n_public / args.sites)
    public = public_records(n=per_site_public * args.sites, n_sites=args.sites, seed=args.public_seed)
    work = Path(tempfile.mkdtemp(prefix="fedseek-usefulness-"))
    print(f"public pretraining on {len(public)} notes (seed {args.public_seed})", flush=True)
    base_info = build_base_model(
        work / "base", shape=BaseShape(), public=public, epochs=args.public_epochs, device=args.device, seed=0
    )
    model, tok = load_model(work / "base", device=args.device)  # the node's loader
    if args.device == "cuda" and args.cuda_precision == "fp32-eager":
        model.float()
        model.set_attn_implementation("eager")
    check_tokenizer_round_trip(build_tokenizer(), tok, held_out(splits, "val"))
    host = ModelHost(model, tok, model_name="usefulness-base", lora=LoraSettings(r=args.rank, alpha=2 * args.rank))
    train = {s.name: tokenize(examples(s.train), tok) for s in splits}
    pooled = [t for s in splits for t in train[s.name]]
    val = held_out(splits, "val")

    def val_em(arrays: wire.Arrays | None, tag: str) -> float:
        return float(score(host, arrays, val, version=f"val-{tag}")["exact_match"])

    budget = Budget(epsilon=args.epsilon, delta=args.delta)
    default = Variant(
        name="default",
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        clip=args.clip,
        ffa_lora=args.ffa_lora,
        lrs=tuple(args.lrs),
        lr_decay=args.lr_decay,
        noise_schedule=args.noise_schedule,
        server=ServerOpt(
            kind=args.server_opt,
            lr=args.server_lr,
            momentum=args.server_momentum,
            beta2=args.server_beta2,
            tau=args.server_tau,
        ),
    )
    try:
        variants = [default, *(parse_variant(v, default) for v in args.variant)]
    except ValueError as exc:
        ap.error(str(exc))
    if len({v.name for v in variants}) != len(variants):
        ap.error("--variant names must differ")
    # arm (b) once per distinct DP setting; the default's keeps the plain names
    b_arm: dict[tuple[Any, ...], str] = {}
    for v in variants:
        b_arm.setdefault(v.dp_key, "site_alone" if v is default else f"site_alone[{v.name}]")
    c_arm = {v.name: "federated" if v is default else f"federated[{v.name}]" for v in variants}
    lr_order = list(dict.fromkeys(lr for v in variants for lr in v.lrs))
    sweep_seconds: list[float] = []
    n_arms = 1 + len(variants) + (0 if args.federated_only else 1 + len(b_arm) * args.sites)  # base, (c), (a), (b)
    n_test_scores = n_arms * args.sites * args.n_test
    candidates: dict[str, list[tuple[float, ArmRun]]] = {}
    lrs_run: list[float] = []
    for lr in lr_order:
        if lrs_run and args.budget_s and _sweep_must_stop(args.budget_s, started, sweep_seconds, n_test_scores):
            print(f"time budget: lr sweep stopped before lr {lr:g}", flush=True)
            break
        lr_started = time.perf_counter()
        runs: list[ArmRun] = []
        if lr in default.lrs and not args.federated_only:
            print(f"lr {lr:g}: (a) pooled non-private", flush=True)
            runs.append(
                train_nonprivate(
                    host, pooled, epochs=default.rounds * default.local_epochs, batch_size=default.batch_size,
                    lr=lr, seed=args.seed,
                )
            )  # fmt: skip
        for key, arm in b_arm.items():
            v = next(v for v in variants if v.dp_key == key)
            if args.federated_only or lr not in {x for w in variants if w.dp_key == key for x in w.lrs}:
                continue
            print(f"lr {lr:g}: {arm}, each site alone, DP", flush=True)
            runs += train_dp(
                host, train, federated=False, rounds=v.rounds, settings=v.settings(lr), budget=budget,
                ledger_dir=work / f"ledgers-{arm}-{lr:g}", label=f"(b{arm[10:]}) lr {lr:g}", lr_decay=v.lr_decay,
                arm=arm,
            )  # fmt: skip
        for v in variants:
            if lr not in v.lrs:
                continue
            print(f"lr {lr:g}: {c_arm[v.name]}, DP ({v.server.describe()})", flush=True)
            runs += train_dp(
                host, train, federated=True, rounds=v.rounds, settings=v.settings(lr), budget=budget,
                ledger_dir=work / f"ledgers-{c_arm[v.name]}-{lr:g}", label=f"(c{c_arm[v.name][9:]}) lr {lr:g}",
                lr_decay=v.lr_decay, server=v.server, arm=c_arm[v.name],
            )  # fmt: skip
        print(f"lr {lr:g} trained ({time.perf_counter() - started:.0f} s so far)", flush=True)
        for run in runs:
            em = val_em(run.arrays, f"{run.arm}-{lr:g}")
            candidates.setdefault(run.arm, []).append((em, run))
            print(f"  validation EM {run.arm} lr {lr:g}: {em:.3f}", flush=True)
        lrs_run.append(lr)
        sweep_seconds.append(time.perf_counter() - lr_started)

    table: list[dict[str, Any]] = []
    base_test = score_by_site(host, None, splits, version="base")
    table.append(
        {"arm": "base (public pretraining only)", "privacy": "-", "lr": "-", "val_em": "-", **_test(base_test)}
    )
    chosen: dict[str, ArmRun] = {}
    for arm in sorted(candidates, key=_arm_order):
        em, run = max(candidates[arm], key=lambda c: c[0])  # the earlier-run lr wins a tie
        chosen[arm] = run
        test = score_by_site(host, run.arrays, splits, version=f"test-{arm}")
        privacy = "none" if arm == "pooled_nonprivate" else ", ".join(f"eps {e:.3f}" for e in run.epsilon.values())
        table.append({"arm": arm, "privacy": privacy, "lr": run.lr, "val_em": round(em, 4), **_test(test)})
        print(f"test EM {arm}: {test['exact_match']:.4f} {test['per_site']}", flush=True)

    test_em = {row["arm"]: row["test_em"] for row in table}
    a = test_em.get("pooled_nonprivate")
    learned = a is not None and a > test_em["base (public pretraining only)"]  # else (a) is no reference
    by_variant = {
        v.name: variant_goal(v, test_em, federated=c_arm[v.name], site_alone=b_arm[v.dp_key], pooled_learned=learned)
        for v in variants
    }
    c, best_b = test_em["federated"], by_variant["default"]["best_site_alone"]
    beats = best_b is not None and c > best_b
    res: dict[str, Any] = {
        "benchmark": "usefulness",
        "date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(args.device),
        "device": args.device,
        "threads": args.threads if args.device == "cpu" else None,
        "reduced": reduced,
        "model": base_info,
        "lora": {
            "r": args.rank,
            "alpha": 2 * args.rank,
            "targets": sorted(getattr(host.peft.peft_config[TRAIN_ADAPTER], "target_modules", None) or []),
            "trained_factors": {
                "pooled_nonprivate": "A and B",
                "dp_arms": "B (FFA-LoRA)" if args.ffa_lora else "A and B",
            },
        },
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": model.config._attn_implementation,
        "data": {
            "sites": args.sites,
            "train_per_site": args.n_train,
            "val_per_site": args.n_val,
            "test_per_site": args.n_test,
            "test_total": args.sites * args.n_test,
            "minority_weight": args.minority_weight,
            "department_share_per_site": department_shares(splits),
            "seed": args.seed,
            "public_seed": args.public_seed,
        },
        "training": {
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "sample_rate": min(1.0, args.batch_size / args.n_train),
            "ffa_lora": args.ffa_lora,
            "max_grad_norm": args.clip,
            "lr_decay": args.lr_decay,
            "server": default.server.describe(),
            "lr_grid": args.lrs,
            "lr_grid_run": lrs_run,
            "budget": asdict(budget),
        },
        "table": table,
        "privacy": {
            arm: {"epsilon_spent": run.epsilon, "noise_multiplier_per_round": run.noise}
            for arm, run in chosen.items()
            if arm != "pooled_nonprivate"
        },
        "ledgers_federated": chosen["federated"].ledgers,  # privacy/budget_plot.py draws these
        "train_loss_per_round": {arm: [round(x, 4) for x in run.losses] for arm, run in chosen.items()},
        "seconds": {arm: round(run.seconds, 1) for arm, run in chosen.items()},
        "goal": {
            "pooled_learned": learned,
            "federated_over_pooled": round(c / a, 4) if a else None,
            "federated_at_least_90pct_of_pooled": a is not None and c >= GOAL_FRACTION * a,
            "best_site_alone": best_b,
            "federated_beats_every_site_alone": beats,
        },
        "variants": {v.name: {"settings": v.as_json(), **by_variant[v.name]} for v in variants},
        "total_seconds": round(time.perf_counter() - started, 1),
        "versions": versions("torch", "transformers", "peft", "opacus"),
    }
    res["goal"]["met"] = (
        res["goal"]["pooled_learned"]
        and res["goal"]["federated_at_least_90pct_of_pooled"]
        and res["goal"]["federated_beats_every_site_alone"]
    )
    res["markdown"] = {"header": MARKDOWN_HEADER, "rows": markdown_rows(res)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(MARKDOWN_HEADER)
    print("\n".join(res["markdown"]["rows"]))
    print(json.dumps(res["goal"], indent=2))
    print(f"wrote {out} ({res['total_seconds']:.0f} s)")
    return res


_SECONDS_PER_ANSWER: list[float] = []  # measured by `score`, for the time-budget guard


def _sweep_must_stop(budget_s: float, started: float, sweep_seconds: Sequence[float], n_test_scores: int) -> bool:
    """Would another learning rate plus the final test scoring overrun the time budget?"""
    per_answer = sum(_SECONDS_PER_ANSWER) / max(1, len(_SECONDS_PER_ANSWER))
    needed = 1.15 * max(sweep_seconds) + 1.3 * n_test_scores * per_answer
    return time.perf_counter() - started + needed > budget_s


def _arm_order(arm: str) -> tuple[int, str]:
    """Table order: base, (a), the (b) arms, the (c) arms; the default's before the variants'."""
    kind = arm.split(":")[0].split("[")[0]
    return ARMS.index(kind), arm.replace("[", "~")  # "~" sorts a variant after the plain name


def variant_goal(
    variant: Variant, test_em: dict[str, float], *, federated: str, site_alone: str, pooled_learned: bool
) -> dict[str, Any]:
    """One variant's verdict: its (c) against (a) and against its own best (b) (same DP settings)."""
    a, c = test_em.get("pooled_nonprivate"), test_em[federated]
    sites = {k: v for k, v in test_em.items() if k.startswith(f"{site_alone}:")}
    best_b = max(sites.values()) if sites else None  # None: a --federated-only run
    beats = best_b is not None and c > best_b
    return {
        "federated_arm": federated,
        "site_alone_arms": sorted(sites),
        "pooled": a,
        "federated": c,
        "best_site_alone": best_b,
        "federated_over_pooled": round(c / a, 4) if a else None,
        "federated_beats_every_site_alone": beats,
        "met": pooled_learned and a is not None and c >= GOAL_FRACTION * a and beats,
    }


def department_shares(splits: Sequence[SiteSplits]) -> dict[str, dict[str, float]]:
    """How non-IID the sites are: each site's training share of every department."""
    out = {}
    for s in splits:
        counts = {d: 0 for d in DEPARTMENTS}
        for r in s.train:
            counts[r.answer] += 1
        out[s.name] = {d: round(c / max(1, len(s.train)), 4) for d, c in counts.items()}
    return out


def _test(scored: dict[str, Any]) -> dict[str, Any]:
    return {"test_em": round(scored["exact_match"], 4), "n_test": scored["n"], "per_site": scored["per_site"]}


if __name__ == "__main__":
    main()
