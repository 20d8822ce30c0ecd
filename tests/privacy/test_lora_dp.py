"""LoRA-aware per-sample gradients equal Opacus hooks': per sample, after clipping, after noise.

Both paths run on the same left-padded, variable-length batch of the tiny DeepSeek-V3 (MLA,
`kv_b_proj` sees a 4-D input) and of a tiny Qwen2 (the R1-Distill family), and hand their
per-sample gradients to Opacus's own `DPOptimizer`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from node.data import TokenizedExample, collate
from node.model import load_model, lora_target_modules
from node.trainer import per_sample_loss
from privacy.lora_dp import GroupedDPOptimizer, LoraGradSampler, UnsupportedLoraModel
from tests.tiny_qwen import tiny_qwen2

ADAPTER = "site_local"
REL_TOL = 1e-4  # the bound on the fp32 relative difference


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _peft(model: Any, *, dropout: float = 0.0, seed: int = 0) -> PeftModel:
    """LoRA on the architecture's targets, B initialised non-zero so both factors get gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model),
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config, adapter_name=ADAPTER)


def _qwen2(dtype: torch.dtype = torch.float32) -> Any:
    return tiny_qwen2(dtype=dtype, intermediate_size=96, pad_token_id=0)


@pytest.fixture(scope="module")
def deepseek(tiny_model_dir: Path) -> PeftModel:
    model, _ = load_model(tiny_model_dir)
    return _peft(model)


@pytest.fixture(scope="module")
def qwen2() -> PeftModel:
    return _peft(_qwen2())


def _batch(vocab: int, *, seed: int = 0, n: int = 5) -> dict[str, torch.Tensor]:
    """Left-padded records of different lengths, answers of different lengths at the end."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length, answer = 6 + 3 * i, 1 + i % 3
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=[-100] * (length - answer) + ids[length - answer :]))
    return collate(examples, pad_id=0, left=True)


@dataclass
class Grads:
    per_sample: list[torch.Tensor]
    clipped_sum: list[torch.Tensor]
    noised: list[torch.Tensor]


def _run(model: PeftModel, batch: dict[str, torch.Tensor], *, ours: bool, noise: float = 0.0) -> Grads:
    """One backward through `model`; Opacus's DPOptimizer clips at the median norm and adds seeded noise."""
    params = [p for p in model.parameters() if p.requires_grad]
    if ours:
        sampler = LoraGradSampler(model, adapter_name=ADAPTER)
        wrapped: nn.Module = model
        close = sampler.close
    else:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        wrapped, close = gsm, gsm._close
    try:
        model.train()
        per_sample_loss(wrapped, batch).mean().backward()
        assert all(p.grad is None for p in params) == ours  # ours skips the summed gradient autograd would add
        per_sample = [p.grad_sample.detach().clone() for p in params]  # type: ignore[attr-defined]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample], dim=1).norm(dim=1)
        optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=0.0),
            noise_multiplier=noise,
            max_grad_norm=float(norms.median()),  # some records clipped, some not
            expected_batch_size=len(norms),
            generator=torch.Generator().manual_seed(7),
        )
        optimizer.clip_and_accumulate()
        clipped = [p.summed_grad.detach().clone() for p in params]  # type: ignore[attr-defined]
        optimizer.add_noise()
        noised = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        optimizer.zero_grad(set_to_none=True)
    finally:
        close()
        model.eval()
        for p in params:
            p.grad_sample = p.summed_grad = None  # type: ignore[attr-defined]
    return Grads(per_sample=per_sample, clipped_sum=clipped, noised=noised)


def _max_rel(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest per-tensor max|ours - ref| / max|ref|."""
    assert [t.shape for t in ours] == [t.shape for t in ref]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, ref, strict=True))


@pytest.mark.parametrize("name", ["deepseek", "qwen2"])
def test_same_per_sample_and_clipped_gradients_as_opacus_hooks(name: str, request: pytest.FixtureRequest) -> None:
    model: PeftModel = request.getfixturevalue(name)
    batch = _batch(model.config.vocab_size)
    ref = _run(model, batch, ours=False)
    ours = _run(model, batch, ours=True)
    assert len(ours.per_sample) == len(ref.per_sample) > 0
    assert all(g.shape[0] == batch["input_ids"].shape[0] for g in ours.per_sample)
    assert all(g.abs().sum() > 0 for g in ref.per_sample), "every factor must get a gradient"
    assert _max_rel(ours.per_sample, ref.per_sample) <= REL_TOL
    assert _max_rel(ours.clipped_sum, ref.clipped_sum) <= REL_TOL


def test_deepseek_mla_layers_with_4d_input_are_covered(deepseek: PeftModel) -> None:
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in deepseek.named_parameters() if p.requires_grad}
    assert {"kv_b_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"} <= names


def test_qwen2_targets_every_linear(qwen2: PeftModel) -> None:
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in qwen2.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_noise_is_opacus_noise(qwen2: PeftModel) -> None:
    """Same seeded generator, same noise: the noised sums differ only by the clipped sums' rounding."""
    batch = _batch(qwen2.config.vocab_size, seed=1)
    ref = _run(qwen2, batch, ours=False, noise=1.3)
    ours = _run(qwen2, batch, ours=True, noise=1.3)
    assert _max_rel(ours.noised, ref.noised) <= REL_TOL
    noise = torch.cat([(n - c).flatten() for n, c in zip(ours.noised, ours.clipped_sum, strict=True)])
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in ours.per_sample], dim=1).norm(dim=1)
    assert float(noise.std()) == pytest.approx(1.3 * float(norms.median()), rel=0.05)


def test_dropout_matches_opacus_under_the_same_seed() -> None:
    model = _peft(_qwen2(), dropout=0.3)
    batch = _batch(model.config.vocab_size, seed=2)
    torch.manual_seed(11)
    ref = _run(model, batch, ours=False)
    torch.manual_seed(11)
    ours = _run(model, batch, ours=True)
    torch.manual_seed(12)
    other = _run(model, batch, ours=True)
    assert _max_rel(ours.clipped_sum, ref.clipped_sum) <= REL_TOL
    assert _max_rel(other.clipped_sum, ref.clipped_sum) > REL_TOL  # dropout is live in this test


def test_bf16_model_fp32_factors_match_opacus() -> None:
    model = _peft(_qwen2(torch.bfloat16))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    batch = _batch(model.config.vocab_size, seed=3)
    ref = _run(model, batch, ours=False)
    ours = _run(model, batch, ours=True)
    assert all(g.dtype == torch.float32 for g in ours.per_sample)
    assert _max_rel(ours.clipped_sum, ref.clipped_sum) <= REL_TOL  # the base backward runs the same bf16 ops


def test_ffa_lora_gives_only_b_gradients_and_matches_opacus() -> None:
    model = _peft(_qwen2())
    a = {n: p for n, p in model.named_parameters() if ".lora_A." in n}
    for p in a.values():
        p.requires_grad_(False)
    batch = _batch(model.config.vocab_size, seed=4)
    ref = _run(model, batch, ours=False)
    ours = _run(model, batch, ours=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    assert len(ours.per_sample) == len(trainable)
    assert _max_rel(ours.clipped_sum, ref.clipped_sum) <= REL_TOL
    assert all(getattr(p, "grad_sample", None) is None for p in a.values())


def test_close_restores_the_stock_forward(qwen2: PeftModel) -> None:
    batch = _batch(qwen2.config.vocab_size, seed=5)
    with torch.no_grad():
        before = per_sample_loss(qwen2, batch)
        with LoraGradSampler(qwen2, adapter_name=ADAPTER):
            assert any("forward" in vars(m) for m in qwen2.modules())
            during = per_sample_loss(qwen2, batch)
    assert not any("forward" in vars(m) for m in qwen2.modules())
    torch.testing.assert_close(during, before, rtol=0, atol=0)  # the forward is peft's, op for op


def test_disabled_adapter_runs_the_base_model(qwen2: PeftModel) -> None:
    batch = _batch(qwen2.config.vocab_size, seed=6)
    with torch.no_grad(), LoraGradSampler(qwen2, adapter_name=ADAPTER), qwen2.disable_adapter():
        base = per_sample_loss(qwen2, batch)
    with torch.no_grad(), qwen2.disable_adapter():
        torch.testing.assert_close(per_sample_loss(qwen2, batch), base, rtol=0, atol=0)


def test_refuses_trainable_weights_outside_the_lora_factors(qwen2: PeftModel) -> None:
    head = qwen2.get_output_embeddings()
    head.weight.requires_grad_(True)
    try:
        with pytest.raises(UnsupportedLoraModel, match="lm_head"):
            LoraGradSampler(qwen2, adapter_name=ADAPTER)
    finally:
        head.weight.requires_grad_(False)
    assert not any("forward" in vars(m) for m in qwen2.modules())
    with pytest.raises(UnsupportedLoraModel, match="outside the LoRA factors of adapter 'missing'"):
        LoraGradSampler(qwen2, adapter_name="missing")
    trainable = [p for p in qwen2.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with pytest.raises(UnsupportedLoraModel, match="no trainable"):
            LoraGradSampler(qwen2, adapter_name=ADAPTER)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def test_refuses_dora() -> None:
    model = _qwen2()
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    dora = get_peft_model(model, config, adapter_name=ADAPTER)
    with pytest.raises(UnsupportedLoraModel, match="plain LoRA"):
        LoraGradSampler(dora, adapter_name=ADAPTER)


def test_second_backward_without_zero_grad_is_refused(qwen2: PeftModel) -> None:
    batch = _batch(qwen2.config.vocab_size, seed=7)
    params = [p for p in qwen2.parameters() if p.requires_grad]
    try:
        with LoraGradSampler(qwen2, adapter_name=ADAPTER):
            per_sample_loss(qwen2, batch).mean().backward()
            with pytest.raises(RuntimeError, match="zero_grad"):
                per_sample_loss(qwen2, batch).mean().backward()
    finally:
        for p in params:
            p.grad_sample = None  # type: ignore[attr-defined]


@pytest.mark.parametrize("secure_mode", [False, True])
def test_grouped_optimizer_steps_like_opacus(qwen2: PeftModel, secure_mode: bool) -> None:
    """Same clipped sums, the same noise draws (seeded), the same scaled gradients as DPOptimizer."""
    params = [p for p in qwen2.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    record_scale = torch.linspace(0.2, 3.0, 6)
    samples = [torch.randn((6, *p.shape), generator=g) * record_scale.view(6, *[1] * p.dim()) for p in params]
    norms = torch.stack([s.flatten(1).norm(dim=1) for s in samples], dim=1).norm(dim=1)
    clip = float(norms.median())  # some of the 6 records clipped, some not
    results = []
    for cls in (DPOptimizer, GroupedDPOptimizer):
        extra = {"batched_noise": False} if cls is GroupedDPOptimizer else {}  # Opacus's draw order
        optimizer = cls(
            torch.optim.SGD(params, lr=0.0),
            noise_multiplier=0.7,
            max_grad_norm=clip,
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(5),
            secure_mode=secure_mode,
            **extra,
        )
        for p, s in zip(params, samples, strict=True):
            p.grad_sample = s.clone()  # type: ignore[attr-defined]
        optimizer.clip_and_accumulate()
        clipped = [p.summed_grad.clone() for p in params]  # type: ignore[attr-defined]
        optimizer.add_noise()
        optimizer.scale_grad()
        results.append((clipped, [p.grad.clone() for p in params]))  # type: ignore[union-attr]
        optimizer.zero_grad(set_to_none=True)
    (ref_clipped, ref_grad), (clipped, grad) = results
    assert (norms > clip).any() and (norms < clip).any()
    assert _max_rel(clipped, ref_clipped) <= 1e-6
    assert _max_rel(grad, ref_grad) <= 1e-6


def test_batched_noise_is_the_same_gaussian_mechanism(qwen2: PeftModel) -> None:
    """One draw per dtype: every coordinate of every clipped sum gets N(0, (sigma C)^2), independently."""
    params = [p for p in qwen2.parameters() if p.requires_grad]
    sigma, clip = 0.9, 2.0
    draws = []
    for seed in (11, 12):
        optimizer = GroupedDPOptimizer(
            torch.optim.SGD(params, lr=0.0),
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(seed),
        )
        for p in params:
            p.summed_grad = torch.full_like(p, 0.25)  # type: ignore[attr-defined]
        optimizer.add_noise()
        noise = [(p.grad - 0.25).flatten() for p in params]  # type: ignore[operator]
        draws.append(torch.cat(noise))
        assert all(p.grad.shape == p.shape for p in params)  # type: ignore[union-attr]
        for p in params:
            p.grad = p.summed_grad = None  # type: ignore[attr-defined]
    first, second = draws
    assert first.numel() > 5000
    assert float(first.std()) == pytest.approx(sigma * clip, rel=0.03)
    assert abs(float(first.mean())) < 4 * sigma * clip / first.numel() ** 0.5
    per_tensor_std = [float(t.std()) for t in first.split([p.numel() for p in params]) if t.numel() > 200]
    assert min(per_tensor_std) > 0.8 * sigma * clip  # no tensor left without noise
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.05  # fresh draws per step


def test_grouped_optimizer_accumulates_a_skipped_step_like_opacus(qwen2: PeftModel) -> None:
    """Virtual steps (BatchMemoryManager's signal_skip_step): the second batch's clipped sum adds to the first's."""
    params = [p for p in qwen2.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(8)
    batches = [[torch.randn((3, *p.shape), generator=g) * (1.0 + k) for p in params] for k in range(2)]
    results = []
    for cls in (DPOptimizer, GroupedDPOptimizer):
        extra = {"batched_noise": False} if cls is GroupedDPOptimizer else {}  # Opacus's draw order
        optimizer = cls(
            torch.optim.SGD(params, lr=0.0),
            noise_multiplier=0.5,
            max_grad_norm=1.0,
            expected_batch_size=6,
            generator=torch.Generator().manual_seed(9),
            **extra,
        )
        optimizer.signal_skip_step(True)
        for k, samples in enumerate(batches):
            for p, s in zip(params, samples, strict=True):
                p.grad_sample = s.clone()  # type: ignore[attr-defined]
            optimizer.step()
            if k == 0:
                assert all(p.grad is None for p in params)  # skipped: clipped and summed, no noise, no step
                optimizer.zero_grad(set_to_none=True)
        results.append([p.grad.clone() for p in params])  # type: ignore[union-attr]
        optimizer._is_last_step_skipped = False
        optimizer.zero_grad(set_to_none=True)
    ref, ours = results
    assert _max_rel(ours, ref) <= 1e-6


class _SharedInput(nn.Module):
    """Two Linear layers reading one input, modified in place between them (a cached cast must not be reused)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        x.mul_(3.0)
        return y + self.second(x)


def test_input_cast_is_not_reused_after_an_in_place_change() -> None:
    torch.manual_seed(0)
    module = _SharedInput().to(torch.bfloat16)
    for p in module.parameters():
        p.requires_grad_(False)
    model = get_peft_model(
        module, LoraConfig(r=2, target_modules=["first", "second"], init_lora_weights=False), adapter_name=ADAPTER
    )
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # cast needed and cached
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        stock = model(x.clone())
        with LoraGradSampler(model, adapter_name=ADAPTER):
            patched = model(x.clone())
    torch.testing.assert_close(patched, stock, rtol=0, atol=0)
