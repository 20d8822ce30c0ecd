"""Tests for local JSONL loading, answer-only tokenization and collation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from node.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    SiteData,
    TokenizedDataset,
    TokenizedExample,
    collate,
    exact_match,
    file_sha256,
    load_jsonl,
    load_partitions,
    partition_files,
    read_partition,
    tokenize,
)
from node.model import build_deepseek_tokenizer

CHAT = {
    "messages": [
        {"role": "system", "content": "You are a hospital triage assistant."},
        {"role": "user", "content": "Troponin elevated. Which department?"},
        {"role": "assistant", "content": "cardiology"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_deepseek_tokenizer()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return [int(i) for i in out]


def test_load_messages_and_prompt_completion(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train.jsonl",
        [json.dumps(CHAT), "", json.dumps({"prompt": "Q?", "completion": "neurology"})],
    )
    chat, pair = load_jsonl(path)
    assert chat.answer == "cardiology"
    assert chat.prompt_messages == CHAT["messages"][:2]
    assert pair.messages == [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "neurology"},
    ]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "hi"}', "missing 'messages' or 'prompt'/'completion'"),
        ('{"prompt": "Q?"}', "missing 'messages' or 'prompt'/'completion'"),
        ('{"messages": []}', "non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "Q?"}]}',
            "at least one prompt message",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}',
            "last message must have role 'assistant'",
        ),
        ('{"messages": [{"role": "doctor", "content": "Q"}]}', "role must be one of"),
        (
            '{"messages": [{"role": "user", "content": 3}]}',
            "'content' must be a string",
        ),
        (
            '{"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}',
            "needs a 'user' message",
        ),
        ('{"prompt": "Q?", "completion": "  "}', "answer (last assistant message) is empty"),
        (
            '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "prompt": "Q"}',
            "not both",
        ),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = _write(tmp_path / "train.jsonl", [json.dumps(CHAT), json.dumps(CHAT), bad_line])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert message.startswith("train.jsonl line 3: ")
    assert reason in message
    assert "\n" not in message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"eval\.jsonl: no examples"):
        load_jsonl(empty)
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_example_requires_assistant_last() -> None:
    with pytest.raises(DataError):
        Example(
            messages=[
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
            ]
        )


def test_labels_mask_exactly_the_prompt(tokenizer: Any) -> None:
    example = Example(messages=CHAT["messages"])
    (tok,) = tokenize([example], tokenizer)
    prompt_ids = _chat_ids(tokenizer, example.prompt_messages, add_generation_prompt=True)
    n_prompt = len(prompt_ids)
    assert tok.input_ids[:n_prompt] == prompt_ids
    assert tok.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer_labels = tok.labels[n_prompt:]
    assert IGNORE_INDEX not in answer_labels
    assert answer_labels == tok.input_ids[n_prompt:]
    assert tokenizer.decode(answer_labels) == "cardiology" + tokenizer.eos_token
    assert answer_labels[-1] == tokenizer.eos_token_id


def test_training_sequence_matches_full_chat_template(tokenizer: Any) -> None:
    """Training format must equal what the template renders for the full chat."""
    example = Example(messages=CHAT["messages"])
    (tok,) = tokenize([example], tokenizer)
    full = _chat_ids(tokenizer, example.messages)
    answer_ids = [t for t in tok.labels if t != IGNORE_INDEX]
    assert full[-len(answer_ids) :] == answer_ids
    assert full == tok.input_ids


def test_transformers_chat_template_output_is_handled(tokenizer: Any) -> None:
    """transformers 5 returns a BatchEncoding for tokenize=True; tokenize() must flatten it."""
    raw = tokenizer.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True)
    (tok,) = tokenize([Example(messages=CHAT["messages"])], tokenizer)
    ids = raw["input_ids"] if not isinstance(raw, list) else raw
    assert tok.input_ids[: len(ids)] == list(ids)


def test_long_prompt_is_truncated_from_the_left(tokenizer: Any) -> None:
    long_user = "filler words " * 200 + "Which department?"
    example = Example(
        messages=[
            {"role": "user", "content": long_user},
            {"role": "assistant", "content": "respiratory"},
        ]
    )
    (tok,) = tokenize([example], tokenizer, max_length=32)
    assert len(tok.input_ids) == len(tok.labels) == 32
    answer = [t for t in tok.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "respiratory" + tokenizer.eos_token
    prompt_tail = _chat_ids(tokenizer, example.prompt_messages, add_generation_prompt=True)
    assert tok.input_ids[: 32 - len(answer)] == prompt_tail[-(32 - len(answer)) :]


def test_answer_longer_than_max_length_raises(tokenizer: Any) -> None:
    example = Example(
        messages=[
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "a b c d e f"},
        ]
    )
    with pytest.raises(DataError, match="example 0: answer is"):
        tokenize([example], tokenizer, max_length=3)


def test_collate_right_pads() -> None:
    batch = [
        TokenizedExample(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7]),
        TokenizedExample(input_ids=[8], labels=[8]),
    ]
    out = collate(batch, pad_id=2)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "input_ids": (2, 3),
        "attention_mask": (2, 3),
        "labels": (2, 3),
    }
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7],
        [8, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert all(v.dtype == torch.long for v in out.values())


def test_collate_empty_batch() -> None:
    out = collate([], pad_id=2)
    assert all(tuple(v.shape) == (0, 1) and v.dtype == torch.long for v in out.values())


def test_dataset_with_dataloader(tokenizer: Any) -> None:
    examples = [Example(messages=CHAT["messages"])] * 3
    dataset = TokenizedDataset(tokenize(examples, tokenizer))
    assert len(dataset) == 3
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=2,
        collate_fn=lambda b: collate(b, pad_id=tokenizer.pad_token_id),
    )
    shapes = [tuple(batch["input_ids"].shape) for batch in loader]
    assert [s[0] for s in shapes] == [2, 1]


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("cardiology", "cardiology", True),
        ("  Cardiology. ", "cardiology", True),
        ("CARDIOLOGY!", "Cardiology.", True),
        ("Cardiology\n\nThe patient has chest pain.", "cardiology", True),
        ("cardiology, urgently", "cardiology", True),
        ("gastro   enterology", "Gastro enterology", True),
        ("neurology", "cardiology", False),
        ("cardiologyneurology", "cardiology", False),
        ("The answer is cardiology", "cardiology", False),
        ("", "cardiology", False),
        ("", "", True),
    ],
)
def test_exact_match(prediction: str, answer: str, expected: bool) -> None:
    assert exact_match(prediction, answer) is expected


def test_multi_turn_chat_learns_only_the_last_answer(tokenizer: Any, tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "Triage."},
            {"role": "user", "content": "Chest pain?"},
            {"role": "assistant", "content": "neurology"},
            {"role": "user", "content": "Troponin is up."},
            {"role": "assistant", "content": "cardiology"},
        ]
    }
    (example,) = load_jsonl(_write(tmp_path / "train.jsonl", [json.dumps(chat)]))
    (tok,) = tokenize([example], tokenizer)
    answer = [t for t in tok.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "cardiology" + tokenizer.eos_token
    assert tok.input_ids == _chat_ids(tokenizer, chat["messages"])  # earlier turns are prompt, in the template


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n")
    (example,) = load_jsonl(path)
    assert example.answer == "cardiology" and example.line == 1


def test_tokenize_errors_name_the_source_line(tokenizer: Any, tmp_path: Path) -> None:
    long = {"prompt": "Q?", "completion": "a very long answer " * 5}
    path = _write(tmp_path / "train.jsonl", [json.dumps(CHAT), "", json.dumps(long)])
    with pytest.raises(DataError, match=r"^line 3: answer is \d+ tokens"):
        tokenize(load_jsonl(path), tokenizer, max_length=8)


def test_tokenizer_without_chat_template_is_refused(tokenizer: Any) -> None:
    class NoTemplate:
        chat_template = None

    with pytest.raises(DataError, match="no chat template"):
        tokenize([Example(messages=CHAT["messages"])], NoTemplate())


# ---- data partitions (one JSONL per ingestion batch) ------------------------------------------


def test_a_single_train_file_is_one_partition_named_by_its_bytes(tokenizer: Any, tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", [json.dumps(CHAT)] * 2)
    assert partition_files(tmp_path) == [tmp_path / "train.jsonl"]
    data = load_partitions(tmp_path, tokenizer)
    (part,) = data.partitions
    assert (part.sha256, part.name, len(part.examples)) == (file_sha256(tmp_path / "train.jsonl"), "train.jsonl", 2)
    assert len(data) == 2 and data[0] == part.examples[0] and data[:1] == part.examples[:1]


def test_batch_files_are_partitions_in_name_order(tokenizer: Any, tmp_path: Path) -> None:
    batches = tmp_path / "train"
    batches.mkdir()
    _write(batches / "2025-02.jsonl", [json.dumps(CHAT)])
    _write(batches / "2025-01.jsonl", [json.dumps(CHAT), json.dumps({"prompt": "ECG?", "completion": "cardiology"})])
    (batches / "notes.txt").write_text("not a batch")
    data = load_partitions(tmp_path, tokenizer)
    assert [p.name for p in data.partitions] == ["2025-01.jsonl", "2025-02.jsonl"]
    assert data.fingerprints == [file_sha256(batches / "2025-01.jsonl"), file_sha256(batches / "2025-02.jsonl")]
    assert len(data) == 3 and data.records([data.fingerprints[1]]) == data.partitions[1].examples
    sha, examples = read_partition(batches / "2025-02.jsonl")
    assert sha == data.fingerprints[1] and len(examples) == 1


def test_ambiguous_or_duplicate_batches_are_refused(tokenizer: Any, tmp_path: Path) -> None:
    batches = tmp_path / "train"
    batches.mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl batch files"):
        partition_files(tmp_path)
    _write(batches / "a.jsonl", [json.dumps(CHAT)])
    _write(batches / "b.jsonl", [json.dumps(CHAT)])  # the same bytes: one batch cannot be two partitions
    with pytest.raises(DataError, match=r"b\.jsonl holds the same bytes as a\.jsonl"):
        load_partitions(tmp_path, tokenizer)
    _write(tmp_path / "train.jsonl", [json.dumps(CHAT)])
    with pytest.raises(DataError, match=r"both train\.jsonl and train/ exist"):
        partition_files(tmp_path)
    assert isinstance(SiteData([]), SiteData) and len(SiteData([])) == 0
