"""The demo's public pretraining: a public corpus that is not any site's data, deterministic, cached."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from fedseek_examples.demo.data import DEPARTMENTS, FINDINGS, QUESTION, SYSTEM_PROMPT, generate_site_records
from fedseek_examples.demo.pretrain import MARKER, PublicPretraining, cache_key, write_pretrained_tiny_model
from fedseek_examples.demo.public import (
    COMPANION_QUESTION,
    COMPANION_SYSTEM,
    PUBLIC_QUESTION,
    PUBLIC_SEED,
    public_chats,
    public_records,
)
from fedseek_examples.demo.run import DemoSettings

from node.model import TinyModelConfig

TINY = PublicPretraining(n_public=8, epochs=1, batch_size=8)  # seconds, not minutes: the mechanics only


def _texts(chats: list[list[dict[str, str]]]) -> list[str]:
    return [json.dumps(c, sort_keys=True) for c in chats]


def test_public_corpus_is_deterministic() -> None:
    a = public_chats(public_records(n=60), seed=PUBLIC_SEED)
    b = public_chats(public_records(n=60), seed=PUBLIC_SEED)
    assert _texts(a) == _texts(b)
    other = public_chats(public_records(n=60, seed=PUBLIC_SEED + 1), seed=PUBLIC_SEED + 1)
    assert _texts(other) != _texts(a)


@pytest.mark.parametrize("n_sites", [2, 3])
def test_no_site_record_appears_in_the_public_corpus(n_sites: int) -> None:
    demo = DemoSettings(out=Path("unused"))
    pre = PublicPretraining()  # the demo's corpus, every kind of chat in it
    public = public_records(n=pre.n_public)
    public_notes = {r.note for r in public}
    chats = public_chats(
        public, seed=PUBLIC_SEED, uniform_task_answers=pre.uniform_task_answers, companions=pre.companions
    )
    corpus = "\n".join(m["content"] for chat in chats for m in chat)
    for i in range(n_sites):
        # what write_site_dataset writes for the demo (seed 7, train then eval)
        site = generate_site_records(site_index=i, n_sites=n_sites, n=demo.n_train + demo.n_eval, seed=7)
        assert not public_notes & {r.note for r in site}
        assert not any(r.note in corpus for r in site)


def test_public_answers_carry_no_findings_to_department_signal() -> None:
    """Three kinds of answered chats, none of which pairs a note's findings with their department:
    a referrer named in the note, a co-occurring finding, and the task's question answered at random."""
    records = public_records(n=600)
    chats = public_chats(records, seed=PUBLIC_SEED, uniform_task_answers=True, companions=True)
    assert len(chats) == 3 * len(records)
    task_hits = 0
    for record, (task, referral, companion) in zip(records, zip(*[iter(chats)] * 3, strict=True), strict=True):
        assert task[0]["content"] == SYSTEM_PROMPT and task[1]["content"].endswith(QUESTION)
        assert task[-1]["content"] in DEPARTMENTS
        task_hits += task[-1]["content"] == record.answer
        assert referral[1]["content"].endswith(PUBLIC_QUESTION)
        assert f"Referred by {referral[-1]['content']}." in referral[1]["content"]
        assert companion[0]["content"] == COMPANION_SYSTEM and companion[1]["content"].endswith(COMPANION_QUESTION)
        group = next(d for d, found in FINDINGS.items() if companion[-1]["content"] in found)
        assert group == record.answer and companion[-1]["content"] not in record.note  # another finding of the note's
        assert not any(d in m["content"] for m in companion for d in DEPARTMENTS)  # no department named at all
    # the task's answers are drawn independently of the findings: right about 1 in 6 (100 of 600 +- 9),
    # and every department is the answer equally often (no department leads the base's answers)
    assert abs(task_hits / len(records) - 1 / len(DEPARTMENTS)) < 0.05, task_hits
    counts = Counter(chat[-1]["content"] for chat in chats[::3])
    assert set(counts.values()) == {len(records) // len(DEPARTMENTS)}, counts


def test_the_default_corpus_answers_only_referrals() -> None:
    """Without the options, what bench/usefulness.py pretrains on: prompts and referral copies."""
    for chat in public_chats(public_records(n=60), seed=PUBLIC_SEED):
        if chat[-1]["role"] == "assistant":
            assert f"Referred by {chat[-1]['content']}." in chat[1]["content"]


def _weights_digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_pretraining_is_cached_and_deterministic(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = write_pretrained_tiny_model(tmp_path / "a", pretraining=TINY, cache_dir=cache, log=lambda _: None)
    assert first["cached"] is False and first["key"] == cache_key(TinyModelConfig(), TINY)
    assert (cache / first["key"] / MARKER).is_file()
    entry_mtime = (cache / first["key"] / "model.safetensors").stat().st_mtime_ns

    second = write_pretrained_tiny_model(tmp_path / "b", pretraining=TINY, cache_dir=cache, log=lambda _: None)
    assert second["cached"] is True  # copied, not trained again
    assert (cache / first["key"] / "model.safetensors").stat().st_mtime_ns == entry_mtime
    assert _weights_digest(tmp_path / "a") == _weights_digest(tmp_path / "b")

    again = write_pretrained_tiny_model(tmp_path / "b", pretraining=TINY, cache_dir=cache, log=lambda _: None)
    assert again["cached"] is True  # an output already pretrained under this key is kept

    # no cache: trained from scratch, bit for bit the same model (seeded and deterministic)
    fresh = write_pretrained_tiny_model(tmp_path / "c", pretraining=TINY, cache_dir=None, log=lambda _: None)
    assert fresh["cached"] is False
    assert _weights_digest(tmp_path / "c") == _weights_digest(tmp_path / "a")
    untrained = tmp_path / "u"
    from node.model import write_tiny_model

    write_tiny_model(untrained)
    assert _weights_digest(untrained) != _weights_digest(tmp_path / "a")  # pretraining changed the weights


def test_cache_key_changes_with_every_input() -> None:
    base = cache_key(TinyModelConfig(), TINY)
    assert cache_key(TinyModelConfig(seed=1), TINY) != base
    assert cache_key(TinyModelConfig(), PublicPretraining(n_public=9, epochs=1, batch_size=8)) != base
    assert cache_key(TinyModelConfig(), PublicPretraining(n_public=8, epochs=1, batch_size=8, public_seed=1)) != base
    gen = PublicPretraining(n_public=8, epochs=1, batch_size=8, generator_version=TINY.generator_version + 1)
    assert cache_key(TinyModelConfig(), gen) != base
