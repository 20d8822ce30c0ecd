"""A hospital's local JSONL data turned into tokenized examples with loss on the answer only.

Only answer tokens carry a label, so the LoRA update (and the DP noise budget spent on it)
goes to learning the answer rather than to re-predicting the fixed prompt.

A site's training data is either one `train.jsonl` or a `train/` directory holding one JSONL
file per ingestion batch (e.g. `train/2025-07.jsonl`). Each file is a data partition, named by
the sha256 of its bytes: the privacy ledger accounts each partition's budget on its own
(`privacy.ledger`), so a batch added later arrives with a full budget while a spent one retires.

A file may be kept encrypted under the site's key-encryption key (`name.jsonl.enc`,
federation.security.at_rest; `fedseek keys encrypt`): it is read with the site's envelope, and its
fingerprint is the sha256 of the plaintext, so encrypting a batch, or rotating the KEK, leaves the
partition the ledger knows unchanged (a fingerprint of the ciphertext would make an already spent
batch look new, with a fresh budget, at each re-encryption).
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, overload

import torch

from federation.errors import InvalidInput
from federation.security.at_rest import Envelope, WrongKek

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss skips this label
_ROLES = frozenset({"system", "user", "assistant"})
_SHAPE_HINT = "missing 'messages' or 'prompt'/'completion'"
ENCRYPTED_SUFFIX = ".enc"  # a data file kept encrypted under the site's KEK


class DataError(InvalidInput, ValueError):
    """Local training data is unreadable or malformed; the message is one line."""


@dataclass(frozen=True)
class Example:
    """A chat whose last message is the assistant answer to learn; ``line`` is where it was read."""

    messages: list[dict[str, str]]
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.messages) < 2:
            raise DataError("an example needs at least one prompt message and an answer")
        if self.messages[-1].get("role") != "assistant":
            raise DataError("the last message must have role 'assistant'")
        if not any(m.get("role") == "user" for m in self.messages[:-1]):
            raise DataError("an example needs a 'user' message before the answer")
        if not self.messages[-1].get("content", "").strip():
            raise DataError("the answer (last assistant message) is empty")

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the answer: what the model sees at inference."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels; labels are IGNORE_INDEX for every non-answer token."""

    input_ids: list[int]
    labels: list[int]


def _parse_message(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise DataError("each message must be an object with 'role' and 'content'")
    role, content = raw.get("role"), raw.get("content")
    if role not in _ROLES:
        raise DataError(f"message role must be one of system/user/assistant, got {role!r}")
    if not isinstance(content, str):
        raise DataError("message 'content' must be a string")
    return {"role": str(role), "content": content}


def _parse_record(record: Any) -> Example:
    """One JSON value -> Example; accepts chat messages or a prompt/completion pair."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise DataError("give either 'messages' or 'prompt'/'completion', not both")
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError("'messages' must be a non-empty list")
        return Example(messages=[_parse_message(m) for m in raw])
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(_SHAPE_HINT)
    return Example(
        messages=[
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
    )


def _parse_line(line: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    return _parse_record(record)


def load_jsonl(path: Path, *, envelope: Envelope | None = None) -> list[Example]:
    """Read one example per non-blank line; errors name the file and line. `path` or, if only it
    exists, `path.enc` (decrypted with `envelope`)."""
    path = Path(path)
    encrypted = path.with_name(path.name + ENCRYPTED_SUFFIX)
    if not path.exists() and encrypted.exists():
        path = encrypted
    return _parse_jsonl(_read_bytes(path, envelope=envelope), path)


def read_data_bytes(path: Path, *, envelope: Envelope | None = None) -> bytes:
    """A data file's bytes, decrypted if it is encrypted (`.enc`); DataError or AtRestError naming it."""
    return _read_bytes(path, envelope=envelope)


def _read_bytes(path: Path, *, envelope: Envelope | None = None) -> bytes:
    if Path(path).name.endswith(ENCRYPTED_SUFFIX):
        if envelope is None:
            raise WrongKek(f"{path}: encrypted, and this site has no KEK configured (NodeConfig.kek)")
        try:
            return envelope.read(Path(path), context="data")
        except FileNotFoundError as exc:
            raise DataError(f"{path}: file not found") from exc
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__})") from exc


def _parse_jsonl(data: bytes, path: Path) -> list[Example]:
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__})") from exc
    examples: list[Example] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(replace(_parse_line(line), line=number))
        except DataError as exc:
            raise DataError(f"{Path(path).name} line {number}: {exc}") from exc
    if not examples:
        raise DataError(f"{Path(path).name}: no examples (empty file)")
    return examples


def flat_ids(encoded: Any) -> list[int]:
    """apply_chat_template may return a list, a nested list, a tensor or a BatchEncoding."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    ids = list(encoded)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise DataError(f"expected one tokenized sequence, got a batch of {len(ids)}")
        ids = ids[0]
    return [int(i) for i in ids]


def _tokenize_one(example: Example, tokenizer: Any, *, max_length: int) -> TokenizedExample:
    prompt_ids = flat_ids(
        tokenizer.apply_chat_template(example.prompt_messages, add_generation_prompt=True, tokenize=True)
    )
    answer_ids = flat_ids(tokenizer(example.answer + tokenizer.eos_token, add_special_tokens=False))
    if len(answer_ids) >= max_length:
        raise DataError(f"answer is {len(answer_ids)} tokens; max_length {max_length} leaves no prompt")
    keep = max_length - len(answer_ids)
    if len(prompt_ids) > keep:  # cut from the left: the question sits at the prompt's end
        prompt_ids = prompt_ids[-keep:]
    return TokenizedExample(
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    )


def tokenize(examples: Sequence[Example], tokenizer: Any, *, max_length: int = 256) -> list[TokenizedExample]:
    """Chat-template the prompt, append answer + EOS, and mask the prompt out of the labels."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; the model directory must provide one")
    tokenized: list[TokenizedExample] = []
    for index, example in enumerate(examples):
        try:
            tokenized.append(_tokenize_one(example, tokenizer, max_length=max_length))
        except DataError as exc:
            where = f"line {example.line}" if example.line is not None else f"example {index}"
            raise DataError(f"{where}: {exc}") from exc
    return tokenized


def file_sha256(path: Path) -> str:
    """`sha256:<hex>` of a data file's bytes: the fingerprint a site's privacy ledger is created for."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__})") from exc
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class DataPartition:
    """One ingestion batch: its records and the fingerprint its privacy budget is accounted under."""

    sha256: str
    name: str
    examples: list[TokenizedExample]


class SiteData(Sequence[TokenizedExample]):
    """A site's training records by partition; as a sequence, every record in partition order."""

    def __init__(self, partitions: Sequence[DataPartition]) -> None:
        seen: dict[str, str] = {}
        for part in partitions:
            if part.sha256 in seen:
                raise DataError(f"{part.name} holds the same bytes as {seen[part.sha256]}: one batch, one partition")
            seen[part.sha256] = part.name
        self.partitions: tuple[DataPartition, ...] = tuple(partitions)
        self._all = [example for part in self.partitions for example in part.examples]

    @classmethod
    def single(cls, examples: Sequence[TokenizedExample], *, sha256: str, name: str = "train") -> SiteData:
        return cls([DataPartition(sha256=sha256, name=name, examples=list(examples))])

    @property
    def fingerprints(self) -> list[str]:
        return [part.sha256 for part in self.partitions]

    def records(self, fingerprints: Collection[str]) -> list[TokenizedExample]:
        """The records of the partitions named, in partition order: what a round may sample."""
        wanted = set(fingerprints)
        return [example for part in self.partitions if part.sha256 in wanted for example in part.examples]

    def __len__(self) -> int:
        return len(self._all)

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...
    @overload
    def __getitem__(self, index: slice) -> list[TokenizedExample]: ...
    def __getitem__(self, index: int | slice) -> TokenizedExample | list[TokenizedExample]:
        return self._all[index]


TRAIN_FILE, TRAIN_DIR = "train.jsonl", "train"


def partition_files(data_dir: Path) -> list[Path]:
    """A site's training files: `train/*.jsonl` in name order (one per ingestion batch), else `train.jsonl`
    (each may be encrypted: `.jsonl.enc`)."""
    batches, single = Path(data_dir) / TRAIN_DIR, Path(data_dir) / TRAIN_FILE
    sealed = single.with_name(TRAIN_FILE + ENCRYPTED_SUFFIX)
    if not batches.is_dir():
        return [sealed if sealed.exists() and not single.exists() else single]
    if single.exists() or sealed.exists():
        raise DataError(f"{data_dir}: both {TRAIN_FILE} and {TRAIN_DIR}/ exist; keep one layout")
    files = sorted(p for p in batches.iterdir() if p.name.endswith((".jsonl", ".jsonl.enc")) and p.is_file())
    if not files:
        raise DataError(f"{batches}: no .jsonl batch files")
    return files


def read_partition(path: Path, *, envelope: Envelope | None = None) -> tuple[str, list[Example]]:
    """A batch file's fingerprint and examples, both from one read of its bytes (so they always agree);
    for an encrypted batch, of its plaintext."""
    data = _read_bytes(path, envelope=envelope)
    return f"sha256:{hashlib.sha256(data).hexdigest()}", _parse_jsonl(data, Path(path))


def load_partitions(
    data_dir: Path, tokenizer: Any, *, max_length: int = 256, envelope: Envelope | None = None
) -> SiteData:
    """Every training batch of a site's data directory, tokenized, each a partition named by its sha256."""
    parts = []
    for path in partition_files(data_dir):
        sha256, examples = read_partition(path, envelope=envelope)
        parts.append(
            DataPartition(sha256=sha256, name=path.name, examples=tokenize(examples, tokenizer, max_length=max_length))
        )
    return SiteData(parts)


def examples_sha256(examples: Sequence[TokenizedExample]) -> str:
    """A fingerprint of already-tokenized examples, for a node assembled without its data files (tests, benchmarks)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels], separators=(",", ":")).encode())
        digest.update(b"\n")
    return f"tokens-sha256:{digest.hexdigest()}"


def collate(batch: Sequence[TokenizedExample], *, pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch (right, or left so every answer ends the row); an empty batch gives (0, 1) tensors.

    Left padding lets the loss compute logits only for the last positions (`logits_to_keep`):
    with rotary embeddings only relative positions matter, so the result is unchanged.
    """
    width = max((len(e.input_ids) for e in batch), default=1)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example.input_ids)
        cols = slice(width - length, width) if left else slice(0, length)
        input_ids[row, cols] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TokenizedDataset(torch.utils.data.Dataset[TokenizedExample]):
    """Map-style dataset with a length, as Opacus' DPDataLoader requires."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self._examples[index]


_TRAILING_PUNCTUATION = string.punctuation + "。．！？"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(prediction: str, answer: str) -> bool:
    """Lenient exact match: generations often run on ("Cardiology. The patient..."), so a
    normalised prediction that starts with the normalised answer at a word boundary counts.
    """
    pred, gold = _normalise(prediction), _normalise(answer)
    if not gold:
        return not pred
    if not pred.startswith(gold):
        return False
    return len(pred) == len(gold) or not pred[len(gold)].isalnum()
