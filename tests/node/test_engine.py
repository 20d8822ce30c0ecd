"""ModelHost: seeded LoRA init, adapter installation by hash, serving and teacher-forced scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from federation.protocol import wire
from federation.protocol.names import InvalidNameError
from node.engine import BASE, TRAIN_ADAPTER, ModelHost, UnknownModel
from node.model import load_model
from tests.node.arrays import random_arrays

MODEL_NAME = "tiny-deepseek-v3"
SHORT = [{"role": "user", "content": "Fever?"}]
LONG = [
    {"role": "system", "content": "You are a hospital triage assistant. Answer with one department name."},
    {"role": "user", "content": "Seen today with ST elevation on ECG and troponin elevated. Which department?"},
]
MEDIUM = [{"role": "user", "content": "Sudden weakness of the left arm and slurred speech."}]


def _host(model_dir: Path) -> ModelHost:
    model, tok = load_model(model_dir)
    return ModelHost(model, tok, model_name=MODEL_NAME)


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> ModelHost:
    return _host(tiny_model_dir)


@pytest.fixture(scope="module")
def adapter(host: ModelHost) -> tuple[str, wire.Arrays]:
    """A non-zero adapter, so that serving it differs measurably from the base model."""
    arrays = random_arrays(host.initial_arrays(), seed=7)
    host.install("v-test", arrays, sha256=wire.sha256_of(arrays), parent=None)
    return "v-test", arrays


def _response_ids(host: ModelHost, text: str = " cardiology department") -> list[int]:
    ids = host.tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) >= 2
    return [int(i) for i in ids]


def direct_logprobs(host: ModelHost, messages: list[dict[str, str]], response: list[int], model: str) -> np.ndarray:
    """Teacher forcing without padding or logits_to_keep: the reference for response_logprobs."""
    prompt = host.prompt_ids(messages)
    ids = torch.tensor([prompt + response], device=host.device)
    with host.using(model) as m, torch.no_grad():
        logits = m(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logp[rows, torch.tensor(response)].double().cpu().numpy()


# ---- seeded LoRA init ---------------------------------------------------------------


def test_initial_lora_is_identical_across_sites(tiny_model_dir: Path, host: ModelHost) -> None:
    torch.manual_seed(999)  # global RNG state before construction must not matter
    torch.rand(1000)
    other = _host(tiny_model_dir)
    a, b = host.initial_arrays(), other.initial_arrays()
    assert sorted(a) == sorted(b)
    assert len(a) > 0
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    lora_a = [v for k, v in a.items() if "lora_A" in k]
    assert lora_a and all(np.abs(v).max() > 0 for v in lora_a)  # a real (non-zero) init, not a trivial one


def test_initial_arrays_cover_only_lora_of_mla(host: ModelHost) -> None:
    names = list(host.initial_arrays())
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any(p in n for n in names for p in ("gate_proj", "up_proj", "down_proj", "embed", "lm_head"))
    assert all(TRAIN_ADAPTER not in n for n in names)  # the wire names carry no adapter name


def test_initial_arrays_are_copies(host: ModelHost) -> None:
    first = host.initial_arrays()
    name = next(iter(first))
    first[name][...] = 123.0
    assert not np.any(host.initial_arrays()[name] == 123.0)


def test_base_and_fresh_train_adapter_agree(host: ModelHost) -> None:
    """LoRA B starts at zero, so the untrained adapter must not change the model's output."""
    response = _response_ids(host)
    host.reset_train_adapter(None)
    base = host.response_logprobs([SHORT], response, model=BASE)
    with host.lock:
        host.peft.set_adapter(TRAIN_ADAPTER)
        ids = torch.tensor([host.prompt_ids(SHORT) + response])
        with torch.no_grad():
            logits = host.peft(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    p = len(host.prompt_ids(SHORT))
    ref = np.array([float(logp[p - 1 + j, t]) for j, t in enumerate(response)])
    np.testing.assert_allclose(base[0], ref, atol=1e-5)


# ---- install / resolve ----------------------------------------------------------------


def test_install_with_wrong_sha256_is_refused_and_not_served(host: ModelHost) -> None:
    arrays = random_arrays(host.initial_arrays(), seed=1)
    with pytest.raises(wire.WireError, match="sha256 mismatch"):
        host.install("v-bad", arrays, sha256="0" * 64)
    assert "v-bad" not in host.adapters
    assert "v-bad" not in host.peft.peft_config
    with pytest.raises(UnknownModel):
        host.resolve("v-bad")


def test_install_with_wrong_shapes_is_refused_and_not_served(host: ModelHost) -> None:
    arrays = random_arrays(host.initial_arrays(), seed=2)
    name = next(iter(arrays))
    arrays[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(wire.WireError):
        host.install("v-shape", arrays, sha256=wire.sha256_of(arrays))
    assert "v-shape" not in host.adapters
    with pytest.raises(UnknownModel):
        host.resolve("v-shape")
    assert host.peft.active_adapter == TRAIN_ADAPTER


@pytest.mark.parametrize("version", [TRAIN_ADAPTER, BASE, "latest", MODEL_NAME, "train", "eval", "keys", "v.1", "../x"])
def test_install_refuses_reserved_and_path_like_versions(host: ModelHost, version: str) -> None:
    """Finding 4: the training adapter, the base model's names, peft's ModuleDict attributes and
    path-like names are never installed (the training adapter's weights stay as they were)."""
    before = host.adapter_arrays(TRAIN_ADAPTER)
    arrays = random_arrays(host.initial_arrays(), seed=11)
    with pytest.raises(InvalidNameError):
        host.install(version, arrays, sha256=wire.sha256_of(arrays))
    assert version not in host.adapters
    after = host.adapter_arrays(TRAIN_ADAPTER)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_install_with_nan_is_refused(host: ModelHost) -> None:
    arrays = random_arrays(host.initial_arrays(), seed=3)
    name = next(iter(arrays))
    arrays[name][0, 0] = np.nan
    with pytest.raises(wire.WireError, match="NaN"):
        host.install("v-nan", arrays, sha256="0" * 64)
    assert "v-nan" not in host.adapters


def test_install_then_resolve_and_use(host: ModelHost, adapter: tuple[str, wire.Arrays]) -> None:
    version, arrays = adapter
    info = host.adapters[version]
    assert info.sha256 == wire.sha256_of(arrays)
    assert host.resolve(version) == version
    assert host.resolve(BASE) == BASE
    assert host.resolve(MODEL_NAME) == BASE
    assert host.resolve(None) in host.adapters
    assert host.resolve("latest") == host.resolve(None) == host.resolve("")
    installed = host.adapter_arrays(version)
    for k, v in arrays.items():
        np.testing.assert_array_equal(installed[k], v)
    with host.using(version) as m:
        assert m.active_adapter == version
    assert host.peft.active_adapter == TRAIN_ADAPTER  # the private working copy is restored
    with host.using(BASE) as m:
        assert m is host.peft
    assert host.peft.active_adapter == TRAIN_ADAPTER


def test_using_restores_train_adapter_after_an_error(host: ModelHost, adapter: tuple[str, wire.Arrays]) -> None:
    version, _ = adapter
    with pytest.raises(RuntimeError, match="boom"), host.using(version):
        raise RuntimeError("boom")
    assert host.peft.active_adapter == TRAIN_ADAPTER


def test_installed_adapter_changes_the_output(host: ModelHost, adapter: tuple[str, wire.Arrays]) -> None:
    version, _ = adapter
    response = _response_ids(host)
    base = host.response_logprobs([SHORT], response, model=BASE)
    tuned = host.response_logprobs([SHORT], response, model=version)
    assert np.abs(base - tuned).max() > 1e-3


def test_reinstalling_a_version_replaces_its_weights(host: ModelHost) -> None:
    first = random_arrays(host.initial_arrays(), seed=11)
    second = random_arrays(host.initial_arrays(), seed=12)
    host.install("v-re", first, sha256=wire.sha256_of(first))
    host.install("v-re", second, sha256=wire.sha256_of(second))
    got = host.adapter_arrays("v-re")
    for k, v in second.items():
        np.testing.assert_array_equal(got[k], v)
    assert host.adapters["v-re"].sha256 == wire.sha256_of(second)


def test_latest_is_the_most_recent_install_within_one_second(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.engine as engine

    other = _host(tiny_model_dir)
    monkeypatch.setattr(engine.time, "time", lambda: 1_700_000_000.25)
    for i, version in enumerate(("r1", "r2")):
        arrays = random_arrays(other.initial_arrays(), seed=20 + i)
        other.install(version, arrays, sha256=wire.sha256_of(arrays))
    assert other.resolve(None) == "r2"


@pytest.mark.parametrize("name", ["nope", "v-test-2", "site_local", "tiny"])
def test_unknown_model(host: ModelHost, adapter: tuple[str, wire.Arrays], name: str) -> None:
    with pytest.raises(UnknownModel, match="not served"):
        host.resolve(name)
    with pytest.raises(UnknownModel):
        host.generate(SHORT, model=name, max_tokens=1)
    with pytest.raises(UnknownModel):
        host.response_logprobs([SHORT], [1, 2], model=name)
    with pytest.raises(UnknownModel), host.using(name):
        pass


# ---- generation ---------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 4])
def test_generate_respects_max_tokens(host: ModelHost, adapter: tuple[str, wire.Arrays], max_tokens: int) -> None:
    version, _ = adapter
    gen = host.generate(SHORT, model=version, max_tokens=max_tokens)
    assert gen.prompt_tokens == len(host.prompt_ids(SHORT))
    assert len(gen.output_ids) <= max_tokens
    assert gen.completion_tokens == len(gen.output_ids)
    assert host.tokenizer.eos_token_id not in gen.output_ids
    assert gen.finish_reason in {"stop", "length"}
    if gen.finish_reason == "length":
        assert len(gen.output_ids) == max_tokens
    assert gen.text == host.tokenizer.decode(gen.output_ids, skip_special_tokens=True)


def test_greedy_generation_is_deterministic_and_matches_argmax(host: ModelHost) -> None:
    first = host.generate(MEDIUM, model=BASE, max_tokens=3)
    second = host.generate(MEDIUM, model=BASE, max_tokens=3)
    assert first == second
    ids = torch.tensor([host.prompt_ids(MEDIUM)])
    with host.using(BASE) as m, torch.no_grad():
        expected = int(m(input_ids=ids).logits[0, -1].argmax())
    assert first.output_ids[:1] == [expected] or (not first.output_ids and expected == host.tokenizer.eos_token_id)


def test_seeded_sampling_is_reproducible(host: ModelHost, adapter: tuple[str, wire.Arrays]) -> None:
    version, _ = adapter
    kwargs: dict[str, Any] = {"model": version, "max_tokens": 4, "temperature": 1.5, "top_p": 1.0, "seed": 42}
    assert host.generate(SHORT, **kwargs).output_ids == host.generate(SHORT, **kwargs).output_ids


def test_generation_leaves_train_adapter_active(host: ModelHost, adapter: tuple[str, wire.Arrays]) -> None:
    host.generate(SHORT, model=adapter[0], max_tokens=1)
    assert host.peft.active_adapter == TRAIN_ADAPTER


def test_context_overflow_is_a_value_error(host: ModelHost) -> None:
    with pytest.raises(ValueError, match="exceeds the context"):
        host.generate(SHORT, model=BASE, max_tokens=host.context_length)
    huge = [{"role": "user", "content": "fever " * (host.context_length + 10)}]
    with pytest.raises(ValueError, match="exceeds the context"):
        host.generate(huge, model=BASE, max_tokens=1)


# ---- teacher-forced scoring -----------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_response_logprobs_match_direct_computation(
    host: ModelHost, adapter: tuple[str, wire.Arrays], which: str
) -> None:
    model = BASE if which == "base" else adapter[0]
    response = _response_ids(host)
    prompts = [SHORT, LONG, MEDIUM]
    lengths = {len(host.prompt_ids(p)) for p in prompts}
    assert len(lengths) == 3  # different lengths: the batch really is left-padded
    batched = host.response_logprobs(prompts, response, model=model)
    assert batched.shape == (3, len(response))
    assert np.all(batched <= 0) and np.all(np.isfinite(batched))
    for i, prompt in enumerate(prompts):
        ref = direct_logprobs(host, prompt, response, model)
        np.testing.assert_allclose(batched[i], ref, atol=1e-4, rtol=0)
        alone = host.response_logprobs([prompt], response, model=model)
        np.testing.assert_allclose(alone[0], ref, atol=1e-4, rtol=0)


def test_response_logprobs_chunking_does_not_change_results(host: ModelHost, adapter: tuple[str, wire.Arrays]) -> None:
    version, _ = adapter
    response = _response_ids(host, " neurology")
    prompts = [SHORT, LONG, MEDIUM, SHORT, LONG]
    whole = host.response_logprobs(prompts, response, model=version)
    chunked = host.response_logprobs(prompts, response, model=version, batch_size=2)
    np.testing.assert_allclose(whole, chunked, atol=1e-4, rtol=0)
    np.testing.assert_allclose(whole[0], whole[3], atol=1e-4, rtol=0)


def test_single_token_response(host: ModelHost) -> None:
    response = _response_ids(host)[:1]
    got = host.response_logprobs([LONG], response, model=BASE)
    np.testing.assert_allclose(got[0], direct_logprobs(host, LONG, response, BASE), atol=1e-4, rtol=0)
