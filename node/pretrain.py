"""Non-private pretraining of a base model on public text, before any site trains on private records.

A base model that has never seen the task's language answers noise, so a federation's DP rounds
would be spent teaching the answer format instead of what only the sites know. Pretraining on
public (synthetic, never a site's) chats fixes that once, outside the privacy ledgers: nothing
private is touched. One loop serves the demo's tiny DeepSeek-V3 and the usefulness benchmark.

A causal-LM loss on every token is what makes the base useful to the demo (it learns which findings
go together, examples/demo/README.md), but DeepSeek's 129,280-token head dominates a small model's
step: on the demo's corpus (1,440 chats, ~60 tokens each, 706 distinct tokens) one batch of 32 took
2.1 s forward and backward on 2 CPU threads with the full head, 0.04 s with `PretrainSettings.vocabulary`
(the head computed on the corpus's own tokens, the rest held at logit 0: the same loss, see
`_RestrictedHead`). The demo's 6 epochs (270 steps) take 21-26 s (42-47 s of CPU) instead of ~10 minutes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from node.data import TokenizedExample, collate
from node.trainer import per_sample_loss


@dataclass(frozen=True)
class PretrainSettings:
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    loss: Literal["all", "answer"] = "all"
    """"all": causal LM on every token (learns the prompts' words too); "answer": only the labelled
    tokens (the answer and its end of turn), which skips the full-vocabulary head on every prompt
    position: the 128k-token DeepSeek vocabulary makes "all" minutes slower on a CPU."""
    vocabulary: tuple[int, ...] = ()
    """Token ids the head is computed for (empty: all). Every other token's head row is set to zero and
    stays so, its logit 0: the loss over these ids plus one column standing for the others
    (log of their count) is then exactly the full-vocabulary loss, at a cost of len(vocabulary) columns
    instead of 129,280 for the DeepSeek tokenizer. The model that comes out never generates a token
    outside the corpus's vocabulary (its logit 0 stays below what training raised the corpus's to)."""


class _RestrictedHead:
    """The loss of a causal LM whose head rows outside `ids` are zero, computed on `ids` alone."""

    def __init__(self, ids: torch.Tensor, index: torch.Tensor, rest: float) -> None:
        self.ids, self.index, self.rest = ids, index, rest

    @classmethod
    def of(cls, model: Any, vocabulary: Sequence[int], *, device: str | torch.device) -> _RestrictedHead:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is None or out.weight is inp.weight or getattr(out, "bias", None) is not None:
            raise ValueError("a restricted vocabulary needs an untied head without bias")
        size = out.weight.size(0)
        ids = torch.tensor(sorted(set(vocabulary)), dtype=torch.long, device=device)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= size:
            raise ValueError(f"vocabulary ids must lie in [0, {size})")
        with torch.no_grad():
            keep = out.weight[ids].clone()
            out.weight.zero_()  # every other token's logit is 0 from now on (no gradient reaches those rows)
            out.weight[ids] = keep
        index = torch.full((size,), -100, dtype=torch.long, device=device)
        index[ids] = torch.arange(ids.numel(), device=device)
        rest = math.log(size - ids.numel()) if size > ids.numel() else -math.inf
        return cls(ids, index, rest)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], *, per_sample: bool) -> torch.Tensor:
        """Right-padded batch. Token mean over the batch, or with `per_sample` each row's mean, averaged
        (as `model(...).loss` and `per_sample_loss` weigh them)."""
        labels = batch["labels"][:, 1:]
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        logits = hidden[:, :-1].float() @ model.get_output_embeddings().weight[self.ids].float().T
        rest = torch.full((*logits.shape[:2], 1), self.rest, dtype=logits.dtype, device=logits.device)
        logits = torch.cat([logits, rest], dim=-1)
        target = torch.where(labels == -100, labels, self.index[labels.clamp(min=0)])
        if bool(((labels != -100) & (target == -100)).any()):
            raise ValueError("a label lies outside the restricted vocabulary")
        tok = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="none"
        ).view(target.shape)
        mask = (target != -100).float()
        if per_sample:
            return ((tok * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
        return (tok * mask).sum() / mask.sum().clamp(min=1.0)


def _batches(
    rows: Sequence[TokenizedExample], settings: PretrainSettings, rng: random.Random
) -> list[list[TokenizedExample]]:
    """One epoch's batches: a seeded shuffle, cut."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [[rows[i] for i in order[b : b + settings.batch_size]] for b in range(0, len(order), settings.batch_size)]


@dataclass(frozen=True)
class PretrainResult:
    epochs: int
    steps: int
    final_loss: float
    """Mean loss over the last epoch's rows (as the model changed during it)."""
    seconds: float
    cpu_seconds: float
    """This process's CPU time: on a shared machine the wall time says more about the neighbours."""


def pretrain(
    model: Any,
    rows: Sequence[TokenizedExample],
    *,
    pad_id: int,
    settings: PretrainSettings,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> PretrainResult:
    """AdamW + one-cycle schedule over `rows` for `settings.epochs`, all weights; deterministic for a seed.

    For "all" each row's labels should be its input ids; for "answer" the prompt is masked
    (`node.data.tokenize`). Leaves the model in eval mode.
    """
    if not rows:
        raise ValueError("no public rows to pretrain on")
    head = _RestrictedHead.of(model, settings.vocabulary, device=device) if settings.vocabulary else None
    torch.manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    rng = random.Random(settings.seed)
    total = settings.epochs * math.ceil(len(rows) / settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.learning_rate, total_steps=total, pct_start=0.1)
    model.train()
    start, cpu, step, epoch_loss = time.perf_counter(), time.process_time(), 0, float("nan")
    for epoch in range(settings.epochs):
        total_loss = 0.0
        for chunk in _batches(rows, settings, rng):
            if head is not None:
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id).items()}
                loss = head.loss(model, batch, per_sample=settings.loss == "answer")
            elif settings.loss == "answer":  # left padding: the answers end every row (logits_to_keep)
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id, left=True).items()}
                loss = per_sample_loss(model, batch).mean()
            else:
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id).items()}
                loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total_loss += float(loss.detach()) * len(chunk)
        epoch_loss = total_loss / len(rows)  # the epoch's mean, less noisy than its last batch's
        elapsed = time.perf_counter() - start
        log(f"  public pretraining epoch {epoch + 1}/{settings.epochs}: loss {epoch_loss:.3f} ({elapsed:.0f} s)")
    model.eval()
    return PretrainResult(
        epochs=settings.epochs,
        steps=step,
        final_loss=round(epoch_loss, 4),
        seconds=round(time.perf_counter() - start, 1),
        cpu_seconds=round(time.process_time() - cpu, 1),
    )
