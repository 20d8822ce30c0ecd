"""One federated round of record-level DP-SGD on the site's LoRA adapter.

Order matters for fail-closed accounting: plan the noise from what the ledger has left,
charge the ledger (fsync'd), then train. A round that crashes stays charged.

With partitioned data (`node.data.SiteData`) a round samples only the partitions its plan names:
`choose_partitions` picks them from those with room left for the run, and Poisson sampling runs
over their records alone, so a partition's epsilon composes only the rounds that sampled it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from federation.errors import Conflict
from federation.protocol import wire
from federation.protocol.round_settings import RunSettings, TrainInstruction
from node.data import SiteData, TokenizedExample, collate
from node.engine import TRAIN_ADAPTER, ModelHost
from node.model import pad_safe_attention_mask
from privacy.ledger import PartitionAccount, PrivacyLedger, RoundPlan
from privacy.lora_dp import GroupedDPOptimizer, LoraGradSampler

Progress = Callable[[int, int, float], None]


class TrainingError(Conflict):
    """Training diverged (NaN loss) or had nothing to train on."""

    default_code = "TrainingError"  # the code /internal/train has always answered with


_RUN = RunSettings()  # the run defaults, so that local rounds (benchmarks, audits) train like federated ones


@dataclass(frozen=True)
class TrainSettings:
    """How the site trains one round: the run's DP-SGD settings plus the site's own choices."""

    local_epochs: int = _RUN.local_epochs
    batch_size: int = _RUN.batch_size
    learning_rate: float = _RUN.learning_rate
    max_grad_norm: float = _RUN.max_grad_norm
    secure_mode: bool = False
    clipping: Literal["lora", "opacus"] = "lora"
    """Per-sample gradients: "lora" (privacy.lora_dp: the same values without Opacus's module hooks, clipped
    in batches per shape) or "opacus" (Opacus hooks). Noise and accounting are Opacus's either way."""
    freeze_lora_a: bool = False
    """FFA-LoRA: train only B. A keeps the seeded init every site shares, so averaging B is exact."""
    send_lora_a: bool = True
    """With `freeze_lora_a`: False sends B and A's digest only (the coordinator asks for A until it has it)."""
    lora_a_sha256: str = ""
    """With `freeze_lora_a`: the run's A digest; a site whose seeded A differs refuses before being charged."""
    noise_schedule: str = _RUN.noise_schedule
    """How the run's epsilon is spread over its rounds (privacy.ledger.NOISE_SCHEDULES)."""
    budget_share: float = _RUN.budget_share
    """Share of the budget left at the run's start that the run may spend (RunSettings.budget_share); a
    scratch ledger whose whole budget is one experiment's (canary audit, benchmarks) uses 1.0."""

    @classmethod
    def of(cls, instruction: TrainInstruction, *, secure_mode: bool) -> TrainSettings:
        """The settings a train message asks for, with the site's `secure_mode`."""
        run = instruction.run
        return cls(
            local_epochs=run.local_epochs,
            batch_size=run.batch_size,
            learning_rate=run.learning_rate,
            max_grad_norm=run.max_grad_norm,
            secure_mode=secure_mode,
            freeze_lora_a=run.ffa_lora,
            send_lora_a=instruction.reply_factors == "AB",
            lora_a_sha256=instruction.lora_a_sha256,
            budget_share=run.budget_share,
            noise_schedule=run.noise_schedule,
        )


@dataclass(frozen=True)
class RoundResult:
    arrays: wire.Arrays
    """The whole trained adapter, A and B, as the site's working copy holds it."""
    report: wire.PrivacyReport
    factors: wire.Factors = "AB"
    """What leaves the site: the whole adapter or, under FFA-LoRA, its B factors."""

    def update(self) -> wire.AdapterUpdate:
        return wire.AdapterUpdate.of(self.arrays, self.factors)


def per_sample_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token cross-entropy of each sample: a per-record quantity, as DP-SGD needs.

    The batch is left-padded, so answers end every row and only the last `keep` positions need
    logits: the full-vocabulary head runs on a few tokens per record instead of all of them.
    """
    labels = batch["labels"]
    answer_cols = torch.nonzero((labels != -100).any(dim=0)).flatten()
    keep = int(labels.size(1) - answer_cols.min()) + 1 if answer_cols.numel() else 2
    keep = min(keep, labels.size(1))
    attention = pad_safe_attention_mask(model, batch["attention_mask"])  # no query without keys (NaN in some kernels)
    logits = model(input_ids=batch["input_ids"], attention_mask=attention, logits_to_keep=keep).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, labels.size(1) - keep + 1 :]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).float()
    return (tok * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_loss(
    host: ModelHost, data: Sequence[TokenizedExample], *, model: str | None, batch_size: int = 16
) -> float:
    """Mean per-record answer loss under `model` (base or an adapter version)."""
    if not data:
        raise TrainingError("no evaluation data")
    total = 0.0
    pad = int(host.tokenizer.pad_token_id)
    with host.using(model) as m, torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = _to_device(collate(data[start : start + batch_size], pad_id=pad, left=True), host.device)
            total += float(per_sample_loss(m, batch).sum())
    return total / len(data)


def _sampling(n: int, settings: TrainSettings) -> tuple[float, int]:
    """Sample rate and steps of a round over `n` records: batches of `batch_size` expected, `local_epochs` passes."""
    sample_rate = min(1.0, settings.batch_size / n)
    return sample_rate, max(1, math.ceil(settings.local_epochs / sample_rate))


def choose_partitions(accounts: Sequence[PartitionAccount], data: SiteData) -> list[str]:
    """The partitions a round samples: of those present with room left in this run, the most room first,
    cut where (records) x (the least room among them) is largest.

    Every partition a round samples must stay within its own limit, so a nearly spent one would force
    the noise up for all: at a fixed batch size the update's signal-to-noise grows about with the
    records sampled times the epsilon the tightest of them can still spend. This is utility only:
    the privacy bound holds whichever set is chosen, since the ledger plans and checks every one.
    """
    sizes = {part.sha256: len(part.examples) for part in data.partitions if part.examples}
    ranked = sorted((a for a in accounts if a.sha256 in sizes and a.open), key=lambda a: (-a.room, -a.seq))
    chosen: list[str] = []
    best, records = 0.0, 0
    for k, account in enumerate(ranked, start=1):
        records += sizes[account.sha256]
        if records * account.room >= best:  # ties: the larger set
            best, chosen = records * account.room, [a.sha256 for a in ranked[:k]]
    return chosen


def plan_round(
    ledger: PrivacyLedger, data: Sequence[TokenizedExample], settings: TrainSettings, *, run_id: str, rounds_left: int
) -> RoundPlan:
    """The DP-SGD plan of a round on `data`, or BudgetExceeded: what training charges, and what a
    readiness query answers without charging anything. Partitioned data is planned over the
    partitions `choose_partitions` picks; plain records as all the ledger's partitions."""
    share = settings.budget_share
    chosen: list[str] | None = None  # None: every partition the ledger holds
    records = len(data)
    if isinstance(data, SiteData):
        accounts = ledger.partitions(run_id=run_id, share=share)
        chosen = choose_partitions(accounts, data)
        if not chosen:  # none open: the ledger's refusal says why (spent, or this run's share spent)
            chosen = [sha for sha in data.fingerprints if sha in {a.sha256 for a in accounts}]
            if not chosen:
                raise TrainingError(
                    "none of the site's data partitions is registered in its privacy ledger; register a new batch "
                    "with `fedseek budget add-partition`"
                )
        records = len(data.records(chosen))
    sample_rate, steps = _sampling(records, settings)
    return ledger.plan_round(
        sample_rate=sample_rate,
        steps=steps,
        rounds_left=rounds_left,
        run_id=run_id,
        share=share,
        partitions=chosen,
        schedule=settings.noise_schedule,
    )


def train_round(
    host: ModelHost,
    ledger: PrivacyLedger,
    data: Sequence[TokenizedExample],
    *,
    site: str,
    run_id: str,
    round: int,
    rounds_left: int,
    global_arrays: wire.Arrays | None,
    settings: TrainSettings,
    progress: Progress | None = None,
) -> RoundResult:
    if len(data) == 0:
        raise TrainingError("the site has no training data")
    global_arrays = start_arrays(host, global_arrays, settings)  # a malformed one must not cost budget
    plan = plan_round(ledger, data, settings, run_id=run_id, rounds_left=rounds_left)
    if isinstance(data, SiteData) and plan.partitions:
        data = data.records(plan.partitions)  # Poisson sampling over the planned partitions' records only
    n = len(data)
    sample_rate, steps = plan.sample_rate, plan.steps
    entry = ledger.charge(run_id=run_id, round=round, plan=plan, max_grad_norm=settings.max_grad_norm)
    pad = int(host.tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(torch.seed()) if not settings.secure_mode else None
    losses: list[float] = []
    with host.lock, _train_adapter(host, global_arrays, freeze_a=settings.freeze_lora_a) as params:
        model, close, optimizer_class = _per_sample_model(host, settings.clipping)
        optimizer = optimizer_class(
            torch.optim.AdamW(params, lr=settings.learning_rate),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=max(1, round_half(sample_rate * n)),
            loss_reduction="mean",
            secure_mode=settings.secure_mode,
        )
        model.train()
        try:
            for step in range(steps):
                chosen = _poisson_indices(n, sample_rate, generator)
                optimizer.zero_grad(set_to_none=True)
                if not chosen:
                    for p in params:  # noise-only step keeps the accounting exact
                        empty = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                        p.grad_sample = empty  # type: ignore[attr-defined]
                else:
                    batch = _to_device(collate([data[i] for i in chosen], pad_id=pad, left=True), host.device)
                    loss = per_sample_loss(model, batch).mean()
                    if not torch.isfinite(loss):
                        raise TrainingError(f"non-finite loss at step {step + 1}; round aborted, budget stays charged")
                    loss.backward()
                    losses.append(float(loss))
                optimizer.step()
                if progress:
                    progress(step + 1, steps, losses[-1] if losses else float("nan"))
        finally:
            optimizer.zero_grad(set_to_none=True)
            close()
            host.peft.eval()
        arrays = host.adapter_arrays(TRAIN_ADAPTER)
    wire.validate_arrays(arrays)  # a NaN update never leaves the site
    if settings.freeze_lora_a and wire.lora_a_sha256(arrays) != wire.lora_a_sha256(host.initial_arrays()):
        raise TrainingError("lora_A moved during an FFA-LoRA round; the update is withheld")
    done = ledger.complete(entry.id, steps=steps)
    report = wire.PrivacyReport(
        site=site,
        epsilon=ledger.spent(),
        delta=ledger.budget.delta,
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        accountant=done.accountant,
        num_examples=n,
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
    )
    factors: wire.Factors = "B" if settings.freeze_lora_a and not settings.send_lora_a else "AB"
    return RoundResult(arrays=arrays, report=report, factors=factors)


def start_arrays(host: ModelHost, arrays: wire.Arrays | None, settings: TrainSettings) -> wire.Arrays | None:
    """The round's whole starting adapter from what the coordinator sent (None: the seeded init).

    Under FFA-LoRA the coordinator sends B only once it knows A: the site adds its own seeded A,
    after checking the run's A digest is its own, so a site with another init (model, rank, seed)
    refuses instead of averaging B factors that belong to a different A.
    """
    init = host.initial_arrays()
    if settings.freeze_lora_a:
        own = wire.lora_a_sha256(init)
        if settings.lora_a_sha256 and settings.lora_a_sha256 != own:
            raise wire.WireError(
                f"FFA-LoRA: the run's lora_A (sha256 {settings.lora_a_sha256[:12]}) is not this site's seeded "
                f"lora_A ({own[:12]}); refusing"
            )
        if arrays:
            sent_a = wire.lora_a(arrays)
            if sent_a and wire.sha256_of(sent_a) != own:
                raise wire.WireError("FFA-LoRA: the global adapter's lora_A is not the seeded lora_A; refusing")
            arrays = wire.with_lora_a(wire.lora_b(arrays), wire.lora_a(init))
    return wire.validate_arrays(arrays, like=init) if arrays else None


def with_seeded_lora_a(host: ModelHost, arrays: wire.Arrays) -> wire.Arrays:
    """A B-only adapter (an FFA-LoRA deployment) completed with the site's seeded A; others as given.

    Whether that is the adapter the coordinator stored is for its sha256 to say, which
    `ModelHost.install` checks on the whole adapter.
    """
    if wire.lora_a(arrays) or not any(wire.factor_of(k) == "B" for k in arrays):
        return arrays
    return wire.with_lora_a(arrays, wire.lora_a(host.initial_arrays()))


def _per_sample_model(host: ModelHost, clipping: str) -> tuple[torch.nn.Module, Callable[[], None], type[DPOptimizer]]:
    """The module to run forwards through, how to detach its per-sample gradient machinery, the optimizer."""
    if clipping == "lora":
        sampler = LoraGradSampler(host.peft, adapter_name=TRAIN_ADAPTER, loss_reduction="mean")
        return host.peft, sampler.close, GroupedDPOptimizer
    if clipping == "opacus":
        gsm = GradSampleModule(host.peft, batch_first=True, loss_reduction="mean", strict=False)
        return gsm, gsm._close, DPOptimizer
    raise ValueError(f"unknown clipping {clipping!r}; use 'lora' or 'opacus'")


@contextlib.contextmanager
def _train_adapter(
    host: ModelHost, arrays: wire.Arrays | None, *, freeze_a: bool
) -> Iterator[list[torch.nn.Parameter]]:
    """Load and activate the working adapter; yield its trainable weights, lora_A frozen for FFA-LoRA.

    The freeze comes after `set_adapter`, which makes all of an adapter's weights trainable, and
    is undone afterwards.
    """
    host.reset_train_adapter(arrays)
    host.peft.set_adapter(TRAIN_ADAPTER)
    frozen = [p for n, p in host.peft.named_parameters() if freeze_a and f".lora_A.{TRAIN_ADAPTER}." in n]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield [p for p in host.peft.parameters() if p.requires_grad]
    finally:
        for p in frozen:
            p.requires_grad_(True)


def round_half(x: float) -> int:
    return math.floor(x + 0.5)


def _poisson_indices(n: int, rate: float, generator: torch.Generator | None) -> list[int]:
    """Poisson sampling: each record joins the batch independently with probability `rate`."""
    draws = torch.rand(n, generator=generator) if generator is not None else _secure_uniform(n)
    return [int(i) for i in torch.nonzero(draws < rate).flatten().tolist()]


def _secure_uniform(n: int) -> torch.Tensor:
    import secrets

    return torch.tensor([secrets.randbits(53) / (1 << 53) for _ in range(n)], dtype=torch.float64)
