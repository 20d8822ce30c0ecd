"""The serving benchmark's floor counts the bytes a decode step reads, and every number carries its spread."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from bench.serving import decode_read_bytes, main, ratio_spread, read_bandwidth, spread
from tests.tiny_qwen import BASE_CONFIG, tiny_qwen2


def _hand_count(*, h: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, int]:
    """Elements of a Qwen2 counted by hand from its config (q/k/v carry biases, o and the MLP do not)."""
    hd = h // heads
    kv = kv_heads * hd
    attn = h * h + h + 2 * (h * kv + kv) + h * h
    mlp = 3 * h * inter
    per_layer = attn + mlp + 2 * h  # two RMSNorms
    body = layers * per_layer + h  # + the final norm
    return {"body": body, "embedding": vocab * h, "lm_head": vocab * h, "kv_per_token": layers * 2 * kv}


def test_decode_bytes_leave_out_the_embedding_table_but_one_row() -> None:
    model = tiny_qwen2()
    c = BASE_CONFIG
    n = _hand_count(
        h=c["hidden_size"],
        inter=c["intermediate_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        kv_heads=c["num_key_value_heads"],
        vocab=c["vocab_size"],
    )
    b = decode_read_bytes(model, context=10)
    elem = 4  # fp32
    assert b["all_parameters_bytes"] == (n["body"] + n["embedding"] + n["lm_head"]) * elem
    assert b["weight_bytes"] == (n["body"] + n["lm_head"] + c["hidden_size"]) * elem
    assert b["all_parameters_bytes"] - b["weight_bytes"] == (c["vocab_size"] - 1) * c["hidden_size"] * elem
    assert b["kv_bytes_per_token"] == n["kv_per_token"] * elem
    assert b["kv_bytes"] == 10 * n["kv_per_token"] * elem
    assert b["total_bytes"] == b["weight_bytes"] + b["kv_bytes"]
    assert not b["tied_lm_head"]


def test_a_tied_lm_head_reads_the_whole_table_once() -> None:
    model = tiny_qwen2(tie_word_embeddings=True)
    b = decode_read_bytes(model, context=0)
    assert b["tied_lm_head"]
    assert b["weight_bytes"] == b["all_parameters_bytes"]  # the table is read (by the head), and counted once
    assert b["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())


def test_bf16_halves_the_bytes() -> None:
    b32 = decode_read_bytes(tiny_qwen2(), context=7)
    b16 = decode_read_bytes(tiny_qwen2(dtype=torch.bfloat16), context=7)
    assert b16["total_bytes"] * 2 == b32["total_bytes"]


def test_read_bandwidth_is_a_positive_best_of_its_passes() -> None:
    rb = read_bandwidth("cpu", repeats=3)
    assert rb["gb_per_s"] > 0
    assert rb["gb_per_s"] == max(k["best_gb_per_s"] for k in rb["kernels"].values())
    for k in rb["kernels"].values():
        assert k["best_gb_per_s"] >= k["median_gb_per_s"]


def test_spread_and_ratios() -> None:
    s = spread([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 10.0, 5)
    r = ratio_spread([2.0, 4.0, 6.0], [1.0, 2.0, 4.0])
    assert r["values"] == [2.0, 2.0, 1.5] and r["median"] == 2.0
    assert ratio_spread([10.0, 20.0], 10.0)["values"] == [1.0, 2.0]


def test_cpu_run_reports_the_floor_and_medians_of_five(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    args = ["--device", "cpu", "--shape", "qwen-tiny", "--concurrency", "1,2", "--adapters", "1"]
    args += ["--prompt-tokens", "8", "--new-tokens", "4", "--sequential-requests", "2", "--repeats", "5"]
    args += ["--hf", "eager", "--out", str(out)]
    main(args)
    res = json.loads(out.read_text())
    floor, db = res["floor"], res["decode_bytes"]
    assert db["context_tokens"] == 8 + 4 / 2
    assert floor["decode_gb"] == round(db["total_bytes"] / 1e9, 4)
    assert floor["tokens_per_s"] == pytest.approx(res["read_bandwidth"]["gb_per_s"] * 1e9 / db["total_bytes"], rel=1e-3)
    assert db["weight_bytes"] < db["all_parameters_bytes"]  # the embedding table is not in the floor
    for name in ("engine_c1", "engine_c2", "hf_c1_eager", "hf_c2_eager"):
        m = res["methods"][name]
        assert "error" not in m, m
        tps = m["tokens_per_s"]
        assert tps["n"] == 5 and len(tps["values"]) == 5
        assert tps["min"] <= tps["median"] <= tps["max"]
        assert tps["median"] == round(statistics.median(tps["values"]), 1)
    assert res["methods"]["hf_c1_eager"]["compiled"] is False
    c1 = res["goals"]["c1_over_floor"]
    assert c1["n"] == 5
    vals = res["methods"]["engine_c1"]["tokens_per_s"]["values"]
    assert c1["median"] == pytest.approx(statistics.median(v / floor["tokens_per_s"] for v in vals), abs=2e-3)
    assert res["goals"]["c2_over_best_hf"]["hf_method"] == "hf_c2_eager"


def test_capture_cost_records_build_time_and_the_kv_cache_at_each_context(tmp_path: Path) -> None:
    """`--capture-contexts`: the runner built at each max_len; on the CPU nothing is captured, the KV cache grows."""
    out = tmp_path / "serving.json"
    args = ["--device", "cpu", "--shape", "qwen-tiny", "--concurrency", "2", "--adapters", "1", "--skip-hf"]
    args += ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--capture-contexts", "128,512"]
    main([*args, "--out", str(out)])
    methods = json.loads(out.read_text())["methods"]
    small, large = methods["capture_ctx128"], methods["capture_ctx512"]
    assert small["max_len"] == 128 and large["max_len"] == 512 and small["max_slots"] == 2
    assert large["kv_cache_bytes"] == 4 * small["kv_cache_bytes"] > 0  # the cache is sized by max_len
    assert small["capture_s"] >= 0 and small["graphs"] == 0  # CUDA graphs only on CUDA
    assert small["graphs_and_workspace_gb"] is None
