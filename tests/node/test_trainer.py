"""DP-SGD rounds on the site's LoRA adapter: loss, ledger charging, isolation and fail-closed refusals.

Rounds use 16 records with batch size 16 (sample rate 1), so the RDP accountant stays in
its closed form and each round is one DP step: the whole module runs in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from federation.protocol import wire
from federation.protocol.config import NodeConfig
from federation.protocol.round_settings import RoundSettingsError, RunSettings, TrainInstruction
from node.build import assemble_node
from node.data import TokenizedExample, collate, load_jsonl, tokenize
from node.engine import TRAIN_ADAPTER, ModelHost
from node.model import load_model
from node.service import NodeService
from node.trainer import RoundResult, TrainSettings, per_sample_loss, train_round
from privacy.audit import verify
from privacy.ledger import Budget, BudgetExceeded, PrivacyLedger, compose_epsilon

N_TRAIN, N_EVAL = 16, 4


def round_config(
    server_round: int,
    num_rounds: int,
    *,
    run_id: str = "run-1",
    ffa: bool = False,
    share: float = RunSettings.budget_share,
    **round_fields: Any,
) -> ConfigRecord:
    """A train message's config as the ClientApp relays it to the agent."""
    run = RunSettings(
        num_rounds=num_rounds,
        batch_size=N_TRAIN,  # sample rate 1: one step per epoch, closed-form RDP
        local_epochs=1,
        learning_rate=1e-2,
        ffa_lora=ffa,
        budget_share=share,
    )
    return TrainInstruction(run=run, server_round=server_round, run_id=run_id, **round_fields).to_config_record()


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    model, tok = load_model(tiny_model_dir)
    return ModelHost(model, tok, model_name=tiny_model_dir.name)


@pytest.fixture(scope="module")
def site_data(host: ModelHost, site_data_dir: Path) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    train = tokenize(load_jsonl(site_data_dir / "train.jsonl"), host.tokenizer)[:N_TRAIN]
    eval_data = tokenize(load_jsonl(site_data_dir / "eval.jsonl"), host.tokenizer)[:N_EVAL]
    return train, eval_data


def make_service(
    host: ModelHost, site_data: tuple[list[TokenizedExample], list[TokenizedExample]], state_dir: Path, data_dir: Path
) -> NodeService:
    config = NodeConfig(
        name="site-a",
        model_dir=str(state_dir / "unused-model"),
        data_dir=str(data_dir),
        state_dir=str(state_dir),
        pki_dir=str(state_dir / "unused-pki"),
    )
    train, eval_data = site_data
    return assemble_node(config, host, train=list(train), eval_data=list(eval_data))


@pytest.fixture
def service(
    host: ModelHost,
    site_data: tuple[list[TokenizedExample], list[TokenizedExample]],
    site_data_dir: Path,
    tmp_path: Path,
) -> NodeService:
    """A fresh site service (its own state dir, ledger and audit trail) on the module's model."""
    return make_service(host, site_data, tmp_path / "state", site_data_dir)


def last_audit(service: NodeService) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(service.audit.path.read_text().splitlines()[-1])
    return record


def random_arrays(like: wire.Arrays, *, seed: int, scale: float = 0.05) -> wire.Arrays:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, scale, v.shape).astype(np.float32) for k, v in like.items()}


def _opacus_hooks(model: torch.nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        hooks = [
            *module._forward_hooks.values(),
            *module._forward_pre_hooks.values(),
            *module._backward_hooks.values(),
            *getattr(module, "_backward_pre_hooks", {}).values(),
        ]
        for hook in hooks:
            fn = getattr(hook, "func", hook)
            if "opacus" in (getattr(fn, "__module__", "") or ""):
                found.append(name)
    return found


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# ---- the loss ---------------------------------------------------------------------------


def _right_padded_reference(model: Any, examples: list[TokenizedExample], pad: int) -> torch.Tensor:
    batch = collate(examples, pad_id=pad, left=False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    mask = (labels != -100).float()
    return (tok * mask).sum(1) / mask.sum(1)


def test_per_sample_loss_left_padding_matches_full_logits(
    host: ModelHost, site_data: tuple[list[TokenizedExample], list[TokenizedExample]]
) -> None:
    train, _ = site_data
    by_length: dict[int, TokenizedExample] = {}
    for ex in train:
        by_length.setdefault(len(ex.input_ids), ex)
    examples = list(by_length.values())[:4]
    assert len({len(e.input_ids) for e in examples}) >= 2, "need rows of different lengths"
    pad = int(host.tokenizer.pad_token_id)
    with host.lock:
        host.reset_train_adapter(random_arrays(host.initial_arrays(), seed=5))  # a non-trivial adapter
        host.peft.set_adapter(TRAIN_ADAPTER)
        with torch.no_grad():
            left = per_sample_loss(host.peft, collate(examples, pad_id=pad, left=True))
            ref = _right_padded_reference(host.peft, examples, pad)
            singles = torch.cat([per_sample_loss(host.peft, collate([e], pad_id=pad, left=True)) for e in examples])
        host.reset_train_adapter(None)
    assert left.shape == (len(examples),)
    assert torch.isfinite(left).all()
    torch.testing.assert_close(left, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left, singles, atol=1e-4, rtol=1e-4)
    assert all(any(x != -100 for x in e.labels) for e in examples)  # every record has answer tokens


def test_per_sample_loss_is_per_record(host: ModelHost) -> None:
    """Rows of a batch do not influence each other (a prerequisite of per-sample clipping)."""
    pad = int(host.tokenizer.pad_token_id)
    eos = int(host.tokenizer.eos_token_id)
    a = TokenizedExample(input_ids=[5, 6, 7, 8, eos], labels=[-100, -100, -100, 8, eos])
    b = TokenizedExample(input_ids=[9, 10, eos], labels=[-100, 10, eos])
    c = TokenizedExample(input_ids=[11, 12, 13, 14, 15, 16, eos], labels=[-100] * 6 + [eos])
    with host.using("base") as m, torch.no_grad():
        ab = per_sample_loss(m, collate([a, b], pad_id=pad, left=True))
        cb = per_sample_loss(m, collate([c, b], pad_id=pad, left=True))
    torch.testing.assert_close(ab[1], cb[1], atol=1e-4, rtol=1e-4)


# ---- one DP round -----------------------------------------------------------------------


@dataclass
class FirstRound:
    service: NodeService
    result: RoundResult
    arrays_before: wire.Arrays
    params_before: dict[str, torch.Tensor]
    installed_before: wire.Arrays
    hooks_before: int
    audit_before: int


@pytest.fixture(scope="module")
def first_round(
    host: ModelHost,
    site_data: tuple[list[TokenizedExample], list[TokenizedExample]],
    site_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> FirstRound:
    service = make_service(host, site_data, tmp_path_factory.mktemp("trainer-state"), site_data_dir)
    installed = random_arrays(host.initial_arrays(), seed=9)
    service.deploy("v-served", wire.sha256_of(installed), installed)
    host.reset_train_adapter(None)
    arrays_before = host.adapter_arrays(TRAIN_ADAPTER)
    params_before = {n: p.detach().clone() for n, p in host.peft.named_parameters()}
    hooks_before, audit_before = _hook_count(host.peft), len(service.audit)
    result = service.train(None, round_config(1, 2))
    return FirstRound(
        service=service,
        result=result,
        arrays_before=arrays_before,
        params_before=params_before,
        installed_before=host.adapter_arrays("v-served"),
        hooks_before=hooks_before,
        audit_before=audit_before,
    )


def test_round_changes_the_lora_arrays(first_round: FirstRound, host: ModelHost) -> None:
    result = first_round.result
    assert sorted(result.arrays) == sorted(first_round.arrays_before) == sorted(host.initial_arrays())
    changed = [k for k in result.arrays if not np.array_equal(result.arrays[k], first_round.arrays_before[k])]
    assert changed, "a DP round must move the adapter"
    assert any("lora_B" in k for k in changed)
    assert all(np.isfinite(v).all() for v in result.arrays.values())
    # what is returned is what the working copy now holds
    now = host.adapter_arrays(TRAIN_ADAPTER)
    for k, v in result.arrays.items():
        np.testing.assert_array_equal(now[k], v)


def test_round_charges_the_ledger_and_reports_it(first_round: FirstRound) -> None:
    service, report = first_round.service, first_round.result.report
    (entry,) = service.ledger.entries()
    assert entry.status == "completed"
    assert entry.run_id == "run-1" and entry.round == 1
    assert 0 < entry.epsilon_after <= 1.0
    assert entry.steps_completed == entry.steps == report.steps == 1
    assert report.epsilon == pytest.approx(entry.epsilon_after, rel=1e-9)
    assert report.epsilon == pytest.approx(service.ledger.spent(), rel=1e-9)
    # rounds_left=2 of a run that may spend half (budget-share 0.5) of 1.0, at one noise for both rounds (the
    # constant schedule): round 1 alone spends more than half the run's 0.5, both together at most 0.5
    both = compose_epsilon(
        [(report.noise_multiplier, report.sample_rate, report.steps)] * 2, budget=service.ledger.budget
    )
    assert 0.25 < report.epsilon < both <= 0.5 + 1e-9
    assert report.delta == entry.delta == service.ledger.budget.delta == pytest.approx(1 / (10 * N_TRAIN))
    assert report.noise_multiplier == entry.noise_multiplier > 0
    assert report.sample_rate == entry.sample_rate == 1.0
    assert report.max_grad_norm == entry.max_grad_norm == 1.0
    assert report.accountant == entry.accountant == "rdp"
    assert report.site == "site-a"
    assert report.num_examples == N_TRAIN
    assert np.isfinite(report.train_loss)


def test_round_is_audited(first_round: FirstRound) -> None:
    service, result = first_round.service, first_round.result
    assert len(service.audit) == first_round.audit_before + 2  # the ledger's charge, then the round
    assert verify(service.audit.path).ok
    charge, record = (json.loads(line) for line in service.audit.path.read_text().splitlines()[-2:])
    assert charge["action"] == "ledger.charge" and charge["details"]["ledger"]["status"] == "charged"
    assert record["action"] == "train"
    (link,) = service.ledger.chain().links  # the round cites its completed ledger entry
    assert record["details"]["ledger"] == {**charge["details"]["ledger"], "hash": link.hash, "status": "completed"}
    assert record["resource"] == "run-1"
    assert record["details"]["update_sha256"] == wire.sha256_of(result.arrays)
    assert record["details"]["epsilon"] == pytest.approx(result.report.epsilon)
    assert service.state.rounds_trained == 1


def test_round_only_changes_the_local_lora(first_round: FirstRound, host: ModelHost) -> None:
    after = dict(host.peft.named_parameters())
    assert set(after) == set(first_round.params_before)
    changed = {n for n, before in first_round.params_before.items() if not torch.equal(before, after[n])}
    assert changed
    assert all(".lora_" in n and f".{TRAIN_ADAPTER}." in n for n in changed), sorted(changed)[:5]
    base = [n for n in after if ".lora_" not in n]
    assert base and all(torch.equal(first_round.params_before[n], after[n]) for n in base)
    # the served adapter is untouched
    served = host.adapter_arrays("v-served")
    for k, v in first_round.installed_before.items():
        np.testing.assert_array_equal(served[k], v)


def test_round_leaves_no_opacus_state(first_round: FirstRound, host: ModelHost) -> None:
    assert _opacus_hooks(host.peft) == []
    assert _hook_count(host.peft) == first_round.hooks_before
    for name, p in host.peft.named_parameters():
        assert getattr(p, "grad_sample", None) is None, name
        assert p.grad is None, name
    assert not host.peft.training
    assert not any("forward" in vars(m) for m in host.peft.modules())  # LoRA-aware clipping detached
    assert host.peft.active_adapter == TRAIN_ADAPTER
    trainable = {n for n, p in host.peft.named_parameters() if p.requires_grad}
    assert trainable and all(f".{TRAIN_ADAPTER}." in n for n in trainable)


def test_served_model_still_works_after_round(first_round: FirstRound, host: ModelHost) -> None:
    gen = host.generate([{"role": "user", "content": "Chest pain?"}], model="v-served", max_tokens=2)
    assert gen.completion_tokens <= 2


# ---- budget exhaustion -----------------------------------------------------------------


def test_last_round_uses_the_rest_and_then_training_is_refused(
    service: NodeService,
    tmp_path: Path,
) -> None:
    first = service.train(None, round_config(1, 2, share=1.0))  # a run allowed all that remains
    second = service.train(first.arrays, round_config(2, 2, share=1.0))  # rounds_left = 1
    entries = service.ledger.entries()
    assert [e.status for e in entries] == ["completed", "completed"]
    assert first.report.epsilon < second.report.epsilon <= 1.0
    assert second.report.epsilon >= 0.99  # the last round spends (almost) everything left
    assert second.report.noise_multiplier < first.report.noise_multiplier  # more budget, less noise
    audit_before = len(service.audit)
    ledger_file = service.layout.ledger.read_bytes()

    with pytest.raises(BudgetExceeded, match="privacy budget exhausted"):
        service.train(second.arrays, round_config(3, 3, share=1.0))

    assert service.ledger.entries() == entries
    assert service.layout.ledger.read_bytes() == ledger_file
    assert service.state.rounds_trained == 2
    assert len(service.audit) == audit_before + 1
    assert verify(service.audit.path).ok
    record = last_audit(service)
    assert record["action"] == "train.refused"
    assert record["resource"] == "run-1"
    assert record["details"]["round"] == 3
    assert "budget" in record["details"]["error"]


# ---- bad global arrays ----------------------------------------------------------------


def _nan_arrays(host: ModelHost) -> wire.Arrays:
    arrays = host.initial_arrays()
    name = next(k for k in arrays if "lora_A" in k)
    arrays[name][0, 0] = np.nan
    return arrays


def test_nan_global_arrays_are_refused_before_training(
    service: NodeService,
    host: ModelHost,
) -> None:
    host.reset_train_adapter(None)
    before = host.adapter_arrays(TRAIN_ADAPTER)
    with pytest.raises(wire.WireError, match="NaN"):
        service.train(_nan_arrays(host), round_config(1, 2))
    after = host.adapter_arrays(TRAIN_ADAPTER)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    assert service.state.rounds_trained == 0
    record = last_audit(service)
    assert record["action"] == "train.refused"


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_bad_global_arrays_leave_the_ledger_unchanged(
    service: NodeService,
    host: ModelHost,
    bad: str,
) -> None:
    if bad == "nan":
        arrays = _nan_arrays(host)
    else:
        arrays = host.initial_arrays()
        name = next(iter(arrays))
        arrays[name] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(wire.WireError):
        service.train(arrays, round_config(1, 2))
    assert service.ledger.entries() == []
    assert service.ledger.spent() == 0.0


def test_train_settings_take_the_run_defaults() -> None:
    """One set of defaults: a local round (benchmarks, audits) trains like a federated one by default."""
    assert TrainSettings.of(TrainInstruction(), secure_mode=False) == TrainSettings()
    ffa = TrainInstruction(run=RunSettings(ffa_lora=True, batch_size=4), reply_factors="B", lora_a_sha256="0" * 64)
    assert TrainSettings.of(ffa, secure_mode=True) == TrainSettings(
        batch_size=4, secure_mode=True, freeze_lora_a=True, send_lora_a=False, lora_a_sha256="0" * 64
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param({"learning_rate": 0.5}, "unknown train config key 'learning_rate'", id="typo"),
        pytest.param({"batch-size": "8"}, "batch-size must be int", id="wrong-type"),
        pytest.param({"local-epochs": 0}, "local-epochs must be a positive integer", id="out-of-range"),
    ],
)
def test_a_bad_train_config_is_refused_before_charging(
    service: NodeService, change: dict[str, Any], match: str
) -> None:
    """A typo'd or mistyped setting on the wire is refused, never trained with a default instead."""
    audit_before = len(service.audit)
    with pytest.raises(RoundSettingsError, match=match) as refused:
        service.train(None, {**round_config(1, 2), **change})
    assert refused.value.status == 400
    assert service.ledger.entries() == [] and service.state.rounds_trained == 0
    assert len(service.audit) == audit_before


# ---- per-sample gradient paths and FFA-LoRA ----------------------------------------------


def _round(
    host: ModelHost,
    train: list[TokenizedExample],
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: TrainSettings,
) -> RoundResult:
    """One round from the seeded init, with every random draw (sampling and noise) seeded alike."""
    monkeypatch.setattr(torch, "seed", lambda: torch.manual_seed(1234).initial_seed())
    ledger = PrivacyLedger(state / "ledger.sqlite", budget=Budget(epsilon=1.0, delta=1 / (10 * len(train))))
    return train_round(
        host,
        ledger,
        train,
        site="site-a",
        run_id="run-1",
        round=1,
        rounds_left=2,
        global_arrays=None,
        settings=settings,
    )


def test_lora_clipping_trains_the_same_adapter_as_opacus_hooks(
    host: ModelHost,
    site_data: tuple[list[TokenizedExample], list[TokenizedExample]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same batch, same clipping, same noise, same accountant: the two paths give one update."""
    train = site_data[0]
    base = TrainSettings(batch_size=len(train) // 2, learning_rate=1e-2)  # sample rate 1/2: Poisson-sampled steps
    ours = _round(host, train, tmp_path / "lora", monkeypatch, base)
    ref = _round(host, train, tmp_path / "opacus", monkeypatch, replace(base, clipping="opacus"))
    assert replace(ours.report, train_loss=0.0) == replace(ref.report, train_loss=0.0)
    assert ours.report.train_loss == pytest.approx(ref.report.train_loss, rel=1e-5)
    init = host.initial_arrays()
    moved = [k for k in ref.arrays if not np.array_equal(ref.arrays[k], init[k])]
    assert moved and any("lora_A" in k for k in moved)
    for k, v in ref.arrays.items():
        np.testing.assert_allclose(ours.arrays[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    assert not any("forward" in vars(m) for m in host.peft.modules())  # the LoRA layers are restored


def test_ffa_lora_trains_b_only(
    host: ModelHost,
    site_data: tuple[list[TokenizedExample], list[TokenizedExample]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train = site_data[0]
    result = _round(host, train, tmp_path, monkeypatch, TrainSettings(batch_size=len(train), freeze_lora_a=True))
    init = host.initial_arrays()
    a_keys = [k for k in init if "lora_A" in k]
    b_keys = [k for k in init if "lora_B" in k]
    assert a_keys and b_keys and len(a_keys) + len(b_keys) == len(init)
    for k in a_keys:
        np.testing.assert_array_equal(result.arrays[k], init[k], err_msg=k)
    assert any(not np.array_equal(result.arrays[k], init[k]) for k in b_keys)
    trainable = {n for n, p in host.peft.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)  # A is trainable again after the round


def _sdpa_without_all_masked_guard(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA without a special case for a query whose keys are all masked: softmax of -inf only, NaN.

    Torch's SDPA before 2.5 did this; torch 2.11 returns 0 for such a row, so the failure needs this stand-in.
    """
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
    scores = (query @ key.transpose(-2, -1)).float() * (scale if scale is not None else query.size(-1) ** -0.5)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1).to(value.dtype) @ value


def test_left_padded_round_is_finite_where_sdpa_gives_nan_for_all_masked_rows(
    host: ModelHost,
    site_data: tuple[list[TokenizedExample], list[TokenizedExample]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A leading pad token's query sees no key under the model's own mask: the trainer must not depend on it."""
    train = site_data[0]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _sdpa_without_all_masked_guard)
    batch = collate(train, pad_id=int(host.tokenizer.pad_token_id), left=True)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    with host.using("base") as m, torch.no_grad():
        unsafe = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        safe = per_sample_loss(m, batch)
    assert torch.isnan(unsafe).all(dim=-1).any(), "the 2-D mask path reproduces the NaN"
    assert torch.isfinite(safe).all()
    result = _round(host, train, tmp_path, monkeypatch, TrainSettings(batch_size=len(train)))
    assert np.isfinite(result.report.train_loss)
    init = host.initial_arrays()
    assert all(np.isfinite(v).all() for v in result.arrays.values())
    assert any(not np.array_equal(result.arrays[k], init[k]) for k in init)


def test_unknown_clipping_is_refused(
    host: ModelHost,
    site_data: tuple[list[TokenizedExample], list[TokenizedExample]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="unknown clipping"):
        _round(host, site_data[0], tmp_path, monkeypatch, TrainSettings(clipping="ghost"))  # type: ignore[arg-type]


def test_ffa_round_sends_b_only_with_the_seeded_a_digest(
    host: ModelHost,
    site_data: tuple[list[TokenizedExample], list[TokenizedExample]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train = site_data[0]
    init = host.initial_arrays()
    settings = TrainSettings(batch_size=len(train), freeze_lora_a=True, send_lora_a=False)
    result = _round(host, train, tmp_path, monkeypatch, settings)
    update = result.update()
    assert result.factors == update.factors == "B"
    assert set(update.arrays) == set(wire.lora_b(init)) and not wire.lora_a(update.arrays)
    assert update.lora_a_sha256 == wire.lora_a_sha256(init) == wire.lora_a_sha256(result.arrays)
    for k, v in wire.lora_a(init).items():  # A unchanged: the node keeps the whole adapter
        np.testing.assert_array_equal(result.arrays[k], v, err_msg=k)
    assert any(not np.array_equal(update.arrays[k], init[k]) for k in update.arrays)
    back = wire.decode_update(wire.encode_update(update))  # what the agent's /internal/train returns
    assert back.factors == "B" and wire.sha256_of(wire.with_lora_a(back.arrays, wire.lora_a(init))) == wire.sha256_of(
        result.arrays
    )
    whole = len(wire.encode_update(wire.AdapterUpdate.of(result.arrays, "AB")))
    assert len(wire.encode_update(update)) < 0.6 * whole


def _ffa_config(server_round: int, num_rounds: int, **round_fields: Any) -> ConfigRecord:
    return round_config(server_round, num_rounds, ffa=True, **{"reply_factors": "B", **round_fields})


def test_ffa_service_round_from_b_only_global_arrays(
    service: NodeService,
    host: ModelHost,
) -> None:
    """Round 2 of an FFA run: the coordinator sends B only and the run's A digest; the site adds its A."""
    init = host.initial_arrays()
    digest = wire.lora_a_sha256(init)
    first = service.train(None, _ffa_config(1, 2, reply_factors="AB"))
    assert first.factors == "AB" and first.update().lora_a_sha256 == digest  # round 1: the coordinator asks for A
    global_b = wire.lora_b(random_arrays(init, seed=3, scale=0.01))
    second = service.train(global_b, _ffa_config(2, 2, lora_a_sha256=digest))
    assert second.factors == "B" and second.update().arrays.keys() == global_b.keys()
    for k, v in wire.lora_a(init).items():
        np.testing.assert_array_equal(second.arrays[k], v, err_msg=k)
    record = last_audit(service)
    assert record["action"] == "train" and record["details"]["factors_sent"] == "B"
    assert [e.status for e in service.ledger.entries()] == ["completed", "completed"]


@pytest.mark.parametrize("bad", ["digest", "global-a"])
def test_ffa_round_against_another_a_is_refused_before_charging(
    service: NodeService,
    host: ModelHost,
    bad: str,
) -> None:
    init = host.initial_arrays()
    if bad == "digest":
        arrays, config = wire.lora_b(init), _ffa_config(1, 2, lora_a_sha256="0" * 64)
    else:
        arrays, config = random_arrays(init, seed=4), _ffa_config(1, 2)  # a whole adapter with another A
    with pytest.raises(wire.WireError, match="FFA-LoRA"):
        service.train(arrays, config)
    assert service.ledger.entries() == [] and service.ledger.spent() == 0.0
    record = last_audit(service)
    assert record["action"] == "train.refused" and "lora_A" in record["details"]["error"]


def test_ffa_deployment_carries_b_only_and_is_checked_whole(
    service: NodeService,
    host: ModelHost,
) -> None:
    init = host.initial_arrays()
    stored = {**init, **wire.lora_b(random_arrays(init, seed=6, scale=0.01))}  # what the registry holds
    result = service.deploy("global-v0007", wire.sha256_of(stored), wire.lora_b(stored))
    assert result["sha256"] == wire.sha256_of(stored)
    served = host.adapter_arrays("global-v0007")
    for k, v in stored.items():
        np.testing.assert_array_equal(served[k], v, err_msg=k)
    other = {**random_arrays(init, seed=8), **wire.lora_b(stored)}  # same B, another A: another adapter
    with pytest.raises(wire.WireError, match="sha256 mismatch"):
        service.deploy("global-v0008", wire.sha256_of(other), wire.lora_b(other))
    assert "global-v0008" not in host.adapters
