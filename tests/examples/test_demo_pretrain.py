"""The demo's public pretraining: a public corpus that is not any site's data, deterministic, cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fedseek_examples.demo.data import generate_site_records
from fedseek_examples.demo.pretrain import MARKER, PublicPretraining, cache_key, write_pretrained_tiny_model
from fedseek_examples.demo.public import PUBLIC_SEED, public_chats, public_records
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
    public = public_records(n=PublicPretraining().n_public)
    public_notes = {r.note for r in public}
    corpus = "\n".join(m["content"] for chat in public_chats(public, seed=PUBLIC_SEED) for m in chat)
    for i in range(n_sites):
        # what write_site_dataset writes for the demo (seed 7, train then eval)
        site = generate_site_records(site_index=i, n_sites=n_sites, n=demo.n_train + demo.n_eval, seed=7)
        assert not public_notes & {r.note for r in site}
        assert not any(r.note in corpus for r in site)


def test_public_answers_carry_no_findings_signal() -> None:
    """The only answers in the corpus are referrers drawn independently of the note: a department named in it."""
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
