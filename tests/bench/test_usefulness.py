"""The usefulness benchmark compares arms fairly (one held-out set, the coordinator's own average) on a sound setup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fedseek_examples.demo.data import DEPARTMENTS, QUESTION, generate_site_records

from bench.usefulness import (
    REFERRAL,
    build_tokenizer,
    check_tokenizer_round_trip,
    department_shares,
    examples,
    federated_average,
    held_out,
    main,
    public_chats,
    site_splits,
)
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


def test_pipeline_runs_every_arm_on_the_product_path(tmp_path: Path) -> None:
    """A tiny end-to-end run: all arms scored on one test set, each DP site's ledger within epsilon."""
    out = tmp_path / "u.json"
    res = main(
        ["--n-train", "40", "--n-val", "2", "--n-test", "2", "--n-public", "6", "--public-epochs", "1",
         "--rounds", "2", "--batch-size", "4", "--lrs", "0.01", "--out", str(out)]  # q = 0.1: a large q makes RDP slow
    )  # fmt: skip
    assert json.loads(out.read_text())["goal"] == res["goal"]
    arms = [row["arm"] for row in res["table"]]
    assert arms[1:] == ["pooled_nonprivate", "site_alone:site-0", "site_alone:site-1", "site_alone:site-2", "federated"]
    assert {row["n_test"] for row in res["table"]} == {6}
    for arm, spent in res["privacy"].items():
        assert all(0 < eps <= 1.0 + 1e-9 for eps in spent["epsilon_spent"].values()), arm
        assert all(len(noise) == 2 for noise in spent["noise_multiplier_per_round"].values())
    assert set(res["ledgers_federated"]) == {"site-0", "site-1", "site-2"}
    assert res["reduced"]  # a run below the full configuration says so
