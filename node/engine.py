"""The node's model host: one base model, loaded once, with named LoRA adapters on top.

Serving, training and explanation share the same weights; a lock serialises them (the
walking skeleton's sharing policy: a training round holds the model between steps only).
The adapter named `TRAIN_ADAPTER` is the site's private working copy and is never served.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from federation.errors import NotFound
from federation.protocol import wire
from federation.protocol.names import BASE_ALIAS, LATEST_ALIAS, TRAIN_ADAPTER, check_adapter_name
from node.model import lora_target_modules
from node.scoring import KV, ScoringStats, prefix_kv, teacher_forced_logprobs

BASE = BASE_ALIAS
# peft keeps adapters as `torch.nn.ModuleDict` keys: a name that is one of its attributes
# (`train`, `eval`, `keys`, ...) fails inside peft after half the adapter is added.
_MODULE_DICT_ATTRS = frozenset(n for n in dir(torch.nn.ModuleDict()) if not n.startswith("_"))


class UnknownModel(NotFound):
    """The request names a model or adapter version this node does not serve."""

    default_code = "model_not_found"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    seed: int = 1234  # every site starts from the same LoRA init, so round 1 averages match

    def config(self, model: Any) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=lora_target_modules(model),
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class AdapterInfo:
    version: str
    sha256: str
    parent: str | None
    created: int


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    output_ids: list[int]


class ModelHost:
    """Owns the GPU/CPU copy of the model and every adapter version served from it."""

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str, lora: LoraSettings | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.lora = lora or LoraSettings()
        self.device = next(model.parameters()).device
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(self.lora.seed)
        self.peft: PeftModel = get_peft_model(model, self.lora.config(model), adapter_name=TRAIN_ADAPTER)
        self._init_state = self.adapter_arrays(TRAIN_ADAPTER)
        self.adapters: dict[str, AdapterInfo] = {}
        self.lock = threading.RLock()
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))

    # ---- adapters -------------------------------------------------------------------
    def adapter_arrays(self, name: str) -> wire.Arrays:
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        return {k: v.detach().float().cpu().numpy().copy() for k, v in state.items()}

    def initial_arrays(self) -> wire.Arrays:
        return {k: v.copy() for k, v in self._init_state.items()}

    def _load_into(self, name: str, arrays: wire.Arrays) -> None:
        clean = wire.validate_arrays(arrays, like=self._init_state)
        state = {k: torch.from_numpy(v).to(self.device) for k, v in clean.items()}
        set_peft_model_state_dict(self.peft, state, adapter_name=name)

    def reset_train_adapter(self, arrays: wire.Arrays | None) -> None:
        """Start a round from the global arrays (or the shared seeded init when there are none)."""
        with self.lock:
            self._load_into(TRAIN_ADAPTER, arrays if arrays else self._init_state)

    def install(
        self, version: str, arrays: wire.Arrays, *, sha256: str, parent: str | None = None, created: int | None = None
    ) -> AdapterInfo:
        """Serve a new adapter version after checking its name and its content hash.

        Every way a version arrives (deploy, restart, `fedseek serve --adapter`) passes here, so a
        reserved name (the training adapter, the base model's names) never replaces what it names.
        """
        self.check_version_name(version)
        actual = wire.sha256_of(arrays)
        if actual != sha256:
            raise wire.WireError(f"adapter {version} sha256 mismatch: got {actual[:12]}, expected {sha256[:12]}")
        with self.lock:
            if version not in self.peft.peft_config:
                self.peft.add_adapter(version, self.lora.config(self.peft.get_base_model()))
            self._load_into(version, arrays)
            self.peft.set_adapter(TRAIN_ADAPTER)
            info = AdapterInfo(version=version, sha256=sha256, parent=parent, created=created or int(time.time()))
            self.adapters.pop(version, None)  # insertion order is install order: the last is the latest
            self.adapters[version] = info
            return info

    def check_version_name(self, version: object) -> str:
        """`version` if it may name an adapter here (raises federation.protocol.names.InvalidNameError)."""
        return check_adapter_name(version, reserved=(self.model_name, *_MODULE_DICT_ATTRS))

    def latest_adapter(self) -> AdapterInfo | None:
        return next(reversed(self.adapters.values()), None)

    @contextlib.contextmanager
    def using(self, model: str | None) -> Iterator[Any]:
        """Hold the lock with `model` (base name, adapter version, or None = latest) active."""
        name = self.resolve(model)
        with self.lock:
            if name == BASE:
                with self.peft.disable_adapter():
                    yield self.peft
            else:
                self.peft.set_adapter(name)
                try:
                    yield self.peft
                finally:
                    self.peft.set_adapter(TRAIN_ADAPTER)

    def resolve(self, model: str | None) -> str:
        if model in (None, "", LATEST_ALIAS):
            latest = self.latest_adapter()
            return latest.version if latest else BASE
        if model in (self.model_name, BASE):
            return BASE
        if model in self.adapters:
            return str(model)
        raise UnknownModel(f"model {model!r} is not served here; see GET /v1/models")

    # ---- inference -------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]

    def generate(
        self,
        messages: Sequence[dict[str, str]],
        *,
        model: str | None = None,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Generation:
        ids = self.prompt_ids(messages)
        if len(ids) + max_tokens > self.context_length:
            raise ValueError(
                f"prompt of {len(ids)} tokens plus max_tokens {max_tokens} exceeds the context of {self.context_length}"
            )
        input_ids = torch.tensor([ids], device=self.device)
        if seed is not None:
            torch.manual_seed(seed)
        sampling = temperature > 0
        with self.using(model) as m, torch.no_grad():
            out = m.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        new = [int(t) for t in out[0, len(ids) :].tolist()]
        eos = self.tokenizer.eos_token_id
        finish = "stop" if eos in new else "length"
        if eos in new:
            new = new[: new.index(eos)]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(
            text=text, prompt_tokens=len(ids), completion_tokens=len(new), finish_reason=finish, output_ids=new
        )

    # Scoring switches and telemetry (tests and benchmarks read/flip these; serving leaves them alone).
    use_prefix_cache: bool = True
    last_scoring_prefix_tokens: int = 0
    """Prompt tokens per row that the last `response_logprobs` call took from a shared KV cache (0: none)."""
    max_scoring_tokens: int | None = None
    """Positions per scoring forward; None: `node.scoring.default_batch_tokens` for the device."""
    last_scoring: ScoringStats | None = None
    _prefix_memo: tuple[tuple[str, str, tuple[int, ...]], KV | None] | None = None

    def response_logprobs(
        self,
        prompts: Sequence[Sequence[dict[str, str]]],
        response_ids: Sequence[int],
        *,
        model: str | None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Teacher-forced log-prob of each fixed response token, gathering only those tokens.

        An explanation scores hundreds of prompts that differ only in the masked last user
        message, so they are tokenized in one call, the shared token prefix (BOS, system prompt,
        earlier turns, user tag) is run once and its KV cache reused by every batch and by later
        calls on the same adapter, and all rows go through as few forwards as
        `max_scoring_tokens` allows (at most `batch_size` rows each, if given): node/scoring.py.
        Results match the uncached, unbatched computation.
        """
        response = [int(t) for t in response_ids]
        if not prompts:
            return np.zeros((0, len(response)))
        name = self.resolve(model)
        seqs = self._prompt_ids_many(prompts)
        split = self._shared_prefix_len(prompts, seqs) if self.use_prefix_cache else 0
        stats = ScoringStats()
        with self.using(name) as m, torch.no_grad():
            prefix = self._shared_prefix_kv(m, name, seqs[0][:split], stats) if split >= _MIN_SHARED_PREFIX else None
            used = split if prefix is not None else 0
            self.last_scoring_prefix_tokens = used
            out = teacher_forced_logprobs(
                m,
                [s[used:] for s in seqs],
                response,
                pad_id=int(self.tokenizer.pad_token_id or 0),
                device=self.device,
                prefix=prefix,
                prefix_len=used,
                max_batch_tokens=self.max_scoring_tokens,
                max_batch_rows=batch_size,
                stats=stats,
            )
        self.last_scoring = stats
        return out

    def forget_scoring_prefix(self) -> None:
        """Drop the shared prefix's KV cache kept between scoring calls (a benchmark times cold runs)."""
        self._prefix_memo = None

    def _shared_prefix_kv(self, m: Any, name: str, ids: list[int], stats: ScoringStats) -> KV | None:
        """The prefix's KV cache, from the last call when it was for the same adapter content and tokens."""
        info = self.adapters.get(name)
        key = (name, info.sha256 if info else "", tuple(ids))
        if self._prefix_memo is not None and self._prefix_memo[0] == key:
            return self._prefix_memo[1]
        kv = prefix_kv(m, ids, self.device)
        stats.prefix_forwards += 1
        self._prefix_memo = (key, kv)
        return kv

    def _prompt_ids_many(self, prompts: Sequence[Sequence[dict[str, str]]]) -> list[list[int]]:
        """`prompt_ids` of each prompt; prompts that differ only in the last user message's content
        are rendered by substitution into the template and tokenized in one call (rendering the
        template per prompt cost ~1 ms each, 0.5 s for an explanation's 500 prompts)."""
        head = list(prompts[0][:-1])
        if all(p and p[-1].get("role") == "user" and list(p[:-1]) == head for p in prompts):
            parts = self._template_parts(head)
            if parts is not None:
                before, after = parts
                texts = [before + p[-1]["content"] + after for p in prompts]
                encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                return [[int(i) for i in ids] for ids in encoded]
        return [self.prompt_ids(p) for p in prompts]

    def _template_parts(self, head: list[dict[str, str]]) -> tuple[str, str] | None:
        """(text before, text after) the last user message's content, if the chat template puts the
        content in verbatim and tokenizing the rendered text is what `prompt_ids` does; else None."""
        memo: dict[str, tuple[str, str] | None] = self.__dict__.setdefault("_template_memo", {})
        key = json.dumps([self.tokenizer.chat_template, head], sort_keys=True)  # a benchmark swaps templates
        if key not in memo:
            memo[key] = self._probe_template(head)
        return memo[key]

    def _probe_template(self, head: list[dict[str, str]]) -> tuple[str, str] | None:
        def render(content: str) -> str:
            out = self.tokenizer.apply_chat_template(
                [*head, {"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            return out if isinstance(out, str) else ""

        text = render(_SENTINEL)
        if text.count(_SENTINEL) != 1:
            return None
        before, after = text.split(_SENTINEL)
        probe = [*head, {"role": "user", "content": _PROBE}]
        if render(_PROBE) != before + _PROBE + after:  # trimmed, escaped or otherwise rewritten content
            return None
        ids = self.tokenizer(before + _PROBE + after, add_special_tokens=False)["input_ids"]
        if [int(i) for i in ids] != self.prompt_ids(probe):
            return None
        return before, after

    def _shared_prefix_len(self, prompts: Sequence[Sequence[dict[str, str]]], seqs: Sequence[list[int]]) -> int:
        """Tokens every prompt starts with, cut at the last user message's content.

        The common token prefix is what makes reuse exact; the cut keeps the split point the
        same whatever else is in the call (a lone prompt splits where a batch of its masked
        variants would), so cached results don't depend on the batch's company. Each row
        keeps at least one token: the first response token is predicted from the last one.
        """
        if not seqs:
            return 0
        n = min(len(s) for s in seqs) - 1
        first = seqs[0]
        for s in seqs[1:]:
            n = _common_prefix_len(first, s, n)
        head = self._user_content_offset_ids(prompts[0])
        if head is not None:
            n = _common_prefix_len(first, head, n)
        return max(n, 0)

    def _user_content_offset_ids(self, messages: Sequence[dict[str, str]]) -> list[int] | None:
        """Token ids of the chat template up to the last user message's content, if it is one."""
        if not messages or messages[-1].get("role") != "user":
            return None
        probe = [*messages[:-1], {**messages[-1], "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        if not isinstance(text, str) or _SENTINEL not in text:
            return None
        ids = self.tokenizer(text[: text.index(_SENTINEL)], add_special_tokens=False).input_ids
        return [int(i) for i in ids]


_MIN_SHARED_PREFIX = 2
_SENTINEL = "\x00fedseek-user-content\x00"
# Leading/trailing whitespace, punctuation and CJK: content a template that trims or escapes would change.
_PROBE = " \n\tPatient: chest pain & <b>fever</b>, 38.9 C; 胸痛? \n"


def _common_prefix_len(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n
