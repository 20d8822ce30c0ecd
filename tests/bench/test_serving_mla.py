"""The MLA serving benchmark: its floor counts the active parameters, every method runs (CPU, tiny shape),
the greedy check agrees exactly in fp32, and parts merge into one result with the goals."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.serving_mla import V2_LITE, build_model, expected_experts, main, mla_decode_bytes


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds sync cost
    yield
    torch.set_num_threads(before)


def test_v2_lite_shape_has_the_published_parameter_counts() -> None:
    """15.7B parameters, 2.45B read per token at batch 1 (6 of 64 experts), built on the meta device."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(DeepseekV2Config(**V2_LITE), dtype=torch.bfloat16)
    b = mla_decode_bytes(model, context=0)
    assert round(b["parameters"]["all"] / 1e9, 1) == 15.7
    assert round(b["parameters"]["read_per_step"] / 1e9, 2) == 2.45
    assert b["weight_bytes"] == b["parameters"]["read_per_step"] * 2
    assert b["kv_bytes_per_token"] == 27 * (512 + 64) * 2  # the latent cache, not full K/V


def test_floor_bytes_count_the_picked_experts_and_the_latent_cache() -> None:
    model = build_model("tiny-v2", "cpu")
    cfg = model.config
    emb = model.get_input_embeddings().weight
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    other = sum(p.numel() for p in model.parameters()) - routed - emb.numel()
    one = mla_decode_bytes(model, context=10)
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert one["weight_bytes"] == (other + routed * k / e + cfg.hidden_size) * 4
    assert one["kv_bytes"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * 10
    many = mla_decode_bytes(model, context=10, batch=64)
    assert many["active_experts_per_moe_layer"] == round(expected_experts(e, k, 64), 2) <= e
    assert expected_experts(64, 6, 1) == pytest.approx(6) and expected_experts(64, 6, 64) == pytest.approx(
        63.88, abs=0.01
    )


def test_quick_cpu_run_measures_every_method_with_medians_of_five(tmp_path: Path) -> None:
    out = tmp_path / "mla.json"
    main(["--quick", "--hf", "eager,static", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["shape"] == "tiny-v2" and res["floor"]["tokens_per_s"] > 0 and "floor_c2" in res
    for name in (
        "engine_c1",
        "engine_c2",
        "engine_c2_a3",
        "hf_c1_eager",
        "hf_c2_eager",
        "hf_c1_static",
        "hf_c2_static",
    ):
        m = res["methods"][name]
        assert "error" not in m, (name, m)
        tps = m["tokens_per_s"]
        assert tps["n"] == 5 and tps["median"] == round(statistics.median(tps["values"]), 1)
    assert res["methods"]["engine_c1"]["runner"] == "MLARunner"
    goals = res["goals"]
    for key in (
        "c1_over_floor",
        "c1_over_best_hf",
        "c2_over_best_hf",
        "c2_over_floor_c2",
        "three_versions_over_single",
    ):
        assert goals[key]["n"] == 5, key
    assert goals["c2_over_best_hf"]["hf_method"] in ("hf_c2_eager", "hf_c2_static")


def test_check_greedy_is_exact_in_fp32_and_parts_merge(tmp_path: Path) -> None:
    greedy = tmp_path / "greedy.json"
    main(["--quick", "--check-greedy", "--out", str(greedy)])
    g = json.loads(greedy.read_text())["check_greedy"]
    assert g["dtype"] == "float32" and g["sequences_equal"] == g["requests"] == 3
    assert g["engine_teacher_forced_agreement"] == 1.0 and g["engine_tokens"] == g["hf_tokens"]
    assert "fp32_engine_agreement" not in g  # an fp32 check is its own reference

    low = tmp_path / "greedy_bf16.json"  # bf16: both decoders are also held to the fp32 model's argmax
    b = main(["--quick", "--check-greedy", "--check-dtype", "bfloat16", "--out", str(low)])["check_greedy"]
    assert b["dtype"] == "bfloat16" and 0.5 <= b["fp32_engine_agreement"] <= 1.0
    assert len(b["fp32_hf_generate_disagreement_logit_gaps"]) == round((1 - b["fp32_hf_generate_agreement"]) * 3 * 4)

    parts = []
    for part, hf in (("engine", "eager"), ("hf", "eager")):
        parts.append(tmp_path / f"{part}.json")
        main(["--quick", "--part", part, "--hf", hf, "--adapters", "1", "--repeats", "5", "--out", str(parts[-1])])
    merged = tmp_path / "all.json"
    res = main(["--merge", *map(str, parts), str(greedy), "--out", str(merged)])
    assert {"engine_c1", "engine_c2", "hf_c1_eager", "hf_c2_eager"} <= set(res["methods"])
    assert res["goals"]["c2_over_best_hf"]["hf_method"] == "hf_c2_eager"
    assert res["check_greedy"]["sequences_equal"] == 3
    assert json.loads(merged.read_text())["goals"] == res["goals"]
