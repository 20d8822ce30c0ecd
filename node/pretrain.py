"""Non-private pretraining of a base model on public text, before any site trains on private records.

A base model that has never seen the task's language answers noise, so a federation's DP rounds
would be spent teaching the answer format instead of what only the sites know. Pretraining on
public (synthetic, never a site's) chats fixes that once, outside the privacy ledgers: nothing
private is touched. One loop serves the demo's tiny DeepSeek-V3 and the usefulness benchmark.
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


@dataclass(frozen=True)
class PretrainResult:
    epochs: int
    steps: int
    final_loss: float
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
    torch.manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    rng = random.Random(settings.seed)
    total = settings.epochs * math.ceil(len(rows) / settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.learning_rate, total_steps=total, pct_start=0.1)
    model.train()
    start, cpu, step, loss = time.perf_counter(), time.process_time(), 0, torch.tensor(float("nan"))
    for epoch in range(settings.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for b in range(0, len(order), settings.batch_size):
            chunk = [rows[i] for i in order[b : b + settings.batch_size]]
            if settings.loss == "answer":  # left padding: the answers end every row (logits_to_keep)
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
        elapsed = time.perf_counter() - start
        shown = float(loss.detach())
        log(f"  public pretraining epoch {epoch + 1}/{settings.epochs}: loss {shown:.3f} ({elapsed:.0f} s)")
    model.eval()
    return PretrainResult(
        epochs=settings.epochs,
        steps=step,
        final_loss=round(float(loss.detach()), 4),
        seconds=round(time.perf_counter() - start, 1),
        cpu_seconds=round(time.process_time() - cpu, 1),
    )
