"""`fedseek privacy audit` at a site: canaries through the real DP-LoRA round, then membership inference.

Training goes through `node.trainer.train_round` unchanged, so what is audited is the code
that trains for real. The audit charges a scratch ledger in a temporary directory, never the
site's: run it on synthetic data or a copy shaped like the site's, since its output (losses on
canaries) is itself computed from whatever data it trains on.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from federation.ops.layout import NodeLayout
from federation.protocol import wire
from node.data import IGNORE_INDEX, Example, TokenizedExample, collate, tokenize
from node.engine import ModelHost
from node.trainer import TrainSettings, per_sample_loss, train_round
from privacy.ledger import Budget, LedgerEntry, PrivacyLedger, RoundPlan
from privacy.membership import Canary, MembershipResult, make_canaries, run_canary_audit


class _NoiseFreeLedger(PrivacyLedger):
    """The non-private baseline: plans noise 0 and charges nothing (epsilon is infinite).

    Exists only so the baseline runs the very same `train_round` as the private run.
    """

    def plan_round(self, *, sample_rate: float, steps: int, **_: Any) -> RoundPlan:
        return RoundPlan(noise_multiplier=0.0, sample_rate=sample_rate, steps=steps, epsilon_after=math.inf)

    _entry: LedgerEntry

    def charge(self, *, run_id: str, round: int, plan: RoundPlan, max_grad_norm: float) -> LedgerEntry:
        self._entry = LedgerEntry(
            id=0,
            run_id=run_id,
            round=round,
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            accountant="none",
            delta=self.budget.delta,
            epsilon_after=math.inf,
            status="charged",
            ts="",
        )
        return self._entry

    def complete(self, entry_id: int, *, steps: int) -> LedgerEntry:
        return replace(self._entry, status="completed", steps_completed=steps)

    def spent(self) -> float:
        return math.inf


def vocabulary_words(tokenizer: object, *, min_len: int = 5, max_len: int = 9) -> list[str]:
    """Lower-case words that are single tokens after a space: rare, and one token each."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    words = (w[1:] for w in vocab if w.startswith("Ġ"))
    return sorted(w for w in words if w.isascii() and w.isalpha() and w.islower() and min_len <= len(w) <= max_len)


def _example(canary: Canary) -> Example:
    return Example(
        messages=[{"role": "user", "content": canary.prompt}, {"role": "assistant", "content": canary.secret}]
    )


def secret_losses(
    host: ModelHost, items: Sequence[TokenizedExample], *, model: str, batch_size: int = 16
) -> list[float]:
    """Per-record loss on the secret's tokens only: the shared EOS label would dilute the signal."""
    masked = [replace(t, labels=[*t.labels[:-1], IGNORE_INDEX]) for t in items]
    pad = int(host.tokenizer.pad_token_id)
    out: list[float] = []
    with host.using(model) as m, torch.no_grad():
        for start in range(0, len(masked), batch_size):
            batch = collate(masked[start : start + batch_size], pad_id=pad, left=True)
            out += per_sample_loss(m, {k: v.to(host.device) for k, v in batch.items()}).tolist()
    return out


def audit_site(
    host: ModelHost,
    site_data: Sequence[TokenizedExample],
    *,
    canaries: int,
    epsilon: float | None,
    settings: TrainSettings,
    delta: float | None = None,
    seed: int = 0,
    max_length: int = 256,
) -> MembershipResult:
    """Train one round on site data plus a random half of ``canaries`` canaries and test membership.

    ``epsilon=None`` runs the non-private baseline (noise 0). The loss drop from the base model
    is the score: it cancels how hard a secret is to predict in the first place.
    """
    records = make_canaries(canaries, words=vocabulary_words(host.tokenizer), seed=seed)
    tokenized = tokenize([_example(c) for c in records], host.tokenizer, max_length=max_length)
    index = {id(c): t for c, t in zip(records, tokenized, strict=True)}
    n = len(site_data) + canaries // 2
    budget = Budget(epsilon=1.0 if epsilon is None else epsilon, delta=1.0 / (10 * n) if delta is None else delta)
    base = dict(zip(map(id, records), secret_losses(host, tokenized, model="base"), strict=True))

    with tempfile.TemporaryDirectory(prefix="fedseek-audit-") as scratch:
        ledger_cls = PrivacyLedger if epsilon is not None else _NoiseFreeLedger
        ledger = ledger_cls(NodeLayout(Path(scratch)).ledger, budget=budget)  # laid out like a site's state

        def train(inserted: Sequence[Canary]) -> str:
            data = [*site_data, *(index[id(c)] for c in inserted)]
            result = train_round(
                host,
                ledger,
                data,
                site="audit",
                run_id="audit",
                round=1,
                rounds_left=1,
                global_arrays=None,
                settings=replace(settings, budget_share=1.0),  # the scratch ledger's budget is this round's
            )
            version = f"audit-{'dp' if epsilon is not None else 'nodp'}-{seed}"
            host.install(version, result.arrays, sha256=wire.sha256_of(result.arrays))
            return version

        def score(version: str, items: Sequence[Canary]) -> list[float]:
            trained = secret_losses(host, [index[id(c)] for c in items], model=version)
            return [base[id(c)] - loss for c, loss in zip(items, trained, strict=True)]

        return run_canary_audit(
            records,
            train=train,
            score=score,
            claimed_epsilon=epsilon if epsilon is not None else math.inf,
            delta=budget.delta,
            seed=seed,
        )
