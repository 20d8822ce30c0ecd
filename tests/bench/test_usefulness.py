"""The usefulness benchmark compares arms fairly (one held-out set, the coordinator's own average) on a sound setup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedseek_examples.demo.data import DEPARTMENTS, QUESTION, generate_site_records

from bench.usefulness import (
    REFERRAL,
    ServerOpt,
    ServerState,
    Variant,
    build_tokenizer,
    check_tokenizer_round_trip,
    department_shares,
    examples,
    federated_average,
    held_out,
    main,
    parse_variant,
    public_chats,
    site_splits,
)
from bench.usefulness_seeds import summarize
from federation.protocol import wire
from node.data import IGNORE_INDEX, tokenize
from node.model import load_model
from node.trainer import RoundResult


def _result(site: str, value: float, n: int) -> RoundResult:
    arrays = {"lora_A": np.full((2, 3), value, np.float32), "lora_B": np.full((3, 2), -value, np.float32)}
    report = wire.PrivacyReport(
        site=site,
        epsilon=0.5,
        delta=1e-5,
        steps=1,
        sample_rate=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
        num_examples=n,
        train_loss=1.0,
    )
    return RoundResult(arrays=arrays, report=report)


def test_federated_average_weights_each_site_by_its_examples() -> None:
    """Not an unweighted mean: a site with 3x the records pulls the global adapter 3x as hard."""
    out = federated_average([_result("a", 1.0, 100), _result("b", 5.0, 300)])
    np.testing.assert_allclose(out["lora_A"], np.full((2, 3), 4.0))
    np.testing.assert_allclose(out["lora_B"], np.full((3, 2), -4.0))


def test_every_arm_is_scored_on_the_same_disjoint_held_out_records() -> None:
    """Test records come from every site, never overlap training or validation, and are reproducible."""
    splits = site_splits(n_sites=3, n_train=30, n_val=5, n_test=7, seed=11)
    again = site_splits(n_sites=3, n_train=30, n_val=5, n_test=7, seed=11)
    test = held_out(splits, "test")
    assert test == held_out(again, "test")
    assert len(test) == 21
    assert [len(s.test) for s in splits] == [7, 7, 7]
    for s in splits:
        seen = {r.note for r in s.train} | {r.note for r in s.val}
        assert not seen & {r.note for r in s.test}
    band = 9000 // 3  # demo_data gives each of the 3 sites its own postcode band
    assert {(int(r.postcode) - 1000) // band for r in test} == {0, 1, 2}


def test_saved_tokenizer_reloads_identically_through_the_nodes_loader(tmp_path: Path) -> None:
    """The cause of the earlier 0% everywhere: a word-level tokenizer.json came back as single letters.

    The byte-level BPE must survive `node.model.load_model` (AutoTokenizer picks Qwen2Tokenizer for a
    qwen2 directory) and give every department one token followed by EOS as the label.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = build_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_model(tmp_path)
    records = generate_site_records(site_index=1, n_sites=3, n=20, seed=5)
    check_tokenizer_round_trip(tok, loaded, records)
    for ex, r in zip(tokenize(examples(records), loaded), records, strict=True):
        answer = [i for i in ex.labels if i != IGNORE_INDEX]
        assert answer == [loaded.convert_tokens_to_ids(r.answer), loaded.eos_token_id]
        assert loaded.decode(answer, skip_special_tokens=True) == r.answer


def test_public_corpus_teaches_the_answer_format_but_not_the_mapping() -> None:
    """Public referral answers name the department in the text, drawn independently of the findings."""
    records = generate_site_records(site_index=0, n_sites=3, n=600, seed=2024)
    chats = public_chats(records, seed=0)
    assert len(chats) == 2 * len(records)
    unanswered, referrals = chats[0::2], chats[1::2]
    assert all(c[-1]["role"] == "user" and c[-1]["content"].endswith(QUESTION) for c in unanswered)
    agree = 0
    for chat, r in zip(referrals, records, strict=True):
        answer = chat[-1]["content"]
        assert REFERRAL.format(department=answer) in chat[1]["content"]
        agree += answer == r.answer
    assert agree / len(records) < 0.3  # chance is 1/6; the true department would give 1.0


def test_minority_weight_makes_other_departments_rare_at_each_site() -> None:
    """Each site's two specialities dominate; the rest appear about 1% each, so a site alone lacks coverage."""
    splits = site_splits(n_sites=3, n_train=3000, n_val=0, n_test=0, seed=3, minority_weight=0.1)
    shares = department_shares(splits)
    for i, s in enumerate(splits):
        own = {DEPARTMENTS[i], DEPARTMENTS[i + 3]}
        assert sum(shares[s.name][d] for d in own) > 0.9
        assert all(0 < shares[s.name][d] < 0.03 for d in DEPARTMENTS if d not in own)
    balanced = department_shares(site_splits(n_sites=3, n_train=3000, n_val=0, n_test=0, seed=3))
    assert min(balanced["site-0"].values()) > 0.05  # the demo's default mix is milder


def _adapter(b: float, a: float = 0.5) -> dict[str, np.ndarray]:
    return {
        "m.lora_A.weight": np.full((2, 3), a, np.float32),
        "m.lora_B.weight": np.full((3, 2), b, np.float32),
    }


def test_plain_fedavg_server_step_is_the_coordinators_mean_bit_for_bit() -> None:
    mean = _adapter(0.123456789)
    out = ServerState(ServerOpt(), frozen_a=True).step(_adapter(0.0), mean)
    assert all(np.array_equal(out[k], mean[k]) for k in mean)


def test_fedavgm_accumulates_a_velocity_over_rounds_and_never_moves_a_frozen_a() -> None:
    """x_{t+1} = x_t + lr * v_t with v_t = momentum * v_{t-1} + (mean_t - x_t); FFA-LoRA's A stays put."""
    state = ServerState(ServerOpt(kind="fedavgm", lr=1.0, momentum=0.5), frozen_a=True)
    x1 = state.step(_adapter(0.0), _adapter(1.0, a=0.7))  # d = 1, v = 1
    np.testing.assert_allclose(x1["m.lora_B.weight"], 1.0)
    np.testing.assert_allclose(x1["m.lora_A.weight"], 0.7)  # the mean's A, untouched by the step
    x2 = state.step(x1, _adapter(1.5))  # d = 0.5, v = 0.5 * 1 + 0.5 = 1.0
    np.testing.assert_allclose(x2["m.lora_B.weight"], 2.0)
    trained_a = ServerState(ServerOpt(kind="fedavg", lr=2.0), frozen_a=False).step(_adapter(0.0), _adapter(1.0, a=1.0))
    np.testing.assert_allclose(trained_a["m.lora_A.weight"], 1.5)  # A and B train: both stepped, 0.5 + 2 * 0.5
    np.testing.assert_allclose(trained_a["m.lora_B.weight"], 2.0)


def test_fedadam_divides_the_first_moment_by_the_root_of_the_second() -> None:
    opt = ServerOpt(kind="fedadam", lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    out = ServerState(opt, frozen_a=True).step(_adapter(0.0), _adapter(-0.2))
    m1, m2 = 0.1 * -0.2, 0.01 * 0.04
    np.testing.assert_allclose(out["m.lora_B.weight"], 0.1 * m1 / (np.sqrt(m2) + 1e-3), rtol=1e-6)


def test_variant_overrides_only_what_it_names() -> None:
    base = Variant(name="default", rounds=4, local_epochs=1, batch_size=1500, clip=1.0, ffa_lora=True, lrs=(0.003,))
    v = parse_variant("m8:rounds=8,server-opt=fedavgm,server-momentum=0.8,lrs=0.003/0.01,ffa-lora=0", base)
    assert (v.rounds, v.clip, v.lrs, v.ffa_lora, v.batch_size) == (8, 1.0, (0.003, 0.01), False, 1500)
    assert (v.server.kind, v.server.momentum, v.server.lr) == ("fedavgm", 0.8, 1.0)
    assert v.dp_key != base.dp_key  # it needs its own site-alone arm
    assert parse_variant("m:server-opt=fedavgm", base).dp_key == base.dp_key  # server-only: shares (b)
    for bad in ("default:clip=0.1", "x:clipp=0.1", "x:server-opt=sgd", "x:ffa-lora=maybe", "x y:clip=1"):
        with pytest.raises(ValueError):
            parse_variant(bad, base)


def _seed_result(seed: int, *, pooled: float, best_b: float, fed: float, learned: bool = True) -> dict:
    return {
        "data": {"seed": seed, "public_seed": 2000 + seed},
        "goal": {"pooled_learned": learned},
        "table": [
            {"arm": "base (public pretraining only)", "test_em": 0.1, "lr": "-"},
            {"arm": "federated", "test_em": fed, "lr": 0.003},
        ],
        "variants": {
            "default": {
                "settings": {"server": {"describe": "FedAvg"}, "clip": 1.0, "rounds": 4, "lrs": [0.003]},
                "federated_arm": "federated",
                "pooled": pooled,
                "federated": fed,
                "best_site_alone": best_b,
                "federated_over_pooled": round(fed / pooled, 4),
                "federated_beats_every_site_alone": fed > best_b,
            }
        },
    }


def test_seed_summary_reports_the_spread_and_holds_the_goal_to_every_seed() -> None:
    feds = [1.0, 0.96, 0.95, 0.99, 0.91]
    s = summarize([_seed_result(i, pooled=1.0, best_b=0.8, fed=f) for i, f in enumerate(feds)])["default"]
    assert (s["seeds"], s["median_ratio"], s["worst_ratio"], s["spread_ratio"]) == (5, 0.96, 0.91, 0.09)
    assert s["goal_met"]
    assert [r["seed"] for r in s["rows"]] == [0, 1, 2, 3, 4]
    below_site = [_seed_result(i, pooled=1.0, best_b=0.8, fed=f) for i, f in enumerate(feds[:4])]
    below_site.append(_seed_result(4, pooled=1.0, best_b=0.95, fed=0.93))  # ratio fine, but a site alone is better
    assert not summarize(below_site)["default"]["goal_met"]
    assert not summarize([_seed_result(i, pooled=1.0, best_b=0.5, fed=1.0) for i in range(4)])["default"]["goal_met"]
    low_median = [_seed_result(i, pooled=1.0, best_b=0.5, fed=f) for i, f in enumerate([1.0, 0.94, 0.93, 0.92, 1.0])]
    assert not summarize(low_median)["default"]["goal_met"]


def test_pipeline_runs_every_arm_on_the_product_path(tmp_path: Path) -> None:
    """A tiny end-to-end run: all arms scored on one test set, each DP site's ledger within epsilon."""
    out = tmp_path / "u.json"
    res = main(
        ["--n-train", "40", "--n-val", "2", "--n-test", "2", "--n-public", "6", "--public-epochs", "1",
         "--rounds", "2", "--batch-size", "4", "--lrs", "0.01", "--out", str(out),
         "--variant", "avg:server-opt=fedavg"]  # q = 0.1: a large q makes RDP slow
    )  # fmt: skip
    assert json.loads(out.read_text())["goal"] == res["goal"]
    arms = [row["arm"] for row in res["table"]]
    assert arms[1:] == [
        "pooled_nonprivate", "site_alone:site-0", "site_alone:site-1", "site_alone:site-2", "federated",
        "federated[avg]",
    ]  # fmt: skip
    assert res["variants"]["avg"]["site_alone_arms"] == ["site_alone:site-0", "site_alone:site-1", "site_alone:site-2"]
    assert res["variants"]["avg"]["settings"]["server"]["kind"] == "fedavg"
    assert res["variants"]["default"]["settings"]["server"]["kind"] == "fedavgm"  # the winning default
    assert {row["n_test"] for row in res["table"]} == {6}
    for arm, spent in res["privacy"].items():
        assert all(0 < eps <= 1.0 + 1e-9 for eps in spent["epsilon_spent"].values()), arm
        assert all(len(noise) == 2 for noise in spent["noise_multiplier_per_round"].values())
    assert set(res["ledgers_federated"]) == {"site-0", "site-1", "site-2"}
    assert res["reduced"]  # a run below the full configuration says so
