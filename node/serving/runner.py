"""Model runners: what the scheduler needs from a model, and the generic path for any HF causal LM.

A runner owns a fixed number of KV-cache slots. The scheduler tells it which slot each request
occupies; `prefill` fills slots from prompts and samples each first token, `decode` advances every
given slot by one sampled token in one batched forward. Tokens stay on the device: a slot's last
token is the next step's input without a host round trip, and the scheduler reads them back
asynchronously. Only the scheduler's thread calls a runner.

Two capabilities are opt-in, so a runner without them keeps working (the engine refuses a request
that needs one its runner lacks): `GuidedRunner.constrain` (constrained decoding: the next step's
allowed tokens per slot) and `LogprobRunner.last_logprobs` (the last step's log-probabilities).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch
from transformers.cache_utils import DynamicCache

from federation.errors import NotFound
from node.serving.sampling import RowSampling, StepLogprobs, apply_bitmask, logprob_rows, sample, token_logprobs

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
Prompt: TypeAlias = Sequence[int]
"""A prompt's token ids."""


class UnknownAdapter(NotFound):
    """A request names an adapter the runner has not loaded."""

    default_code = "model_not_found"  # to an OpenAI client an adapter is a model


class Runner(Protocol):
    max_slots: int
    max_len: int
    device: torch.device

    def adapter_id(self, name: str | None) -> int:
        """0 for the base model (None), else the id of a loaded adapter; raises UnknownAdapter."""
        ...

    def adapters(self) -> list[str]: ...

    def prefill(
        self, slots: Sequence[int], prompts: Sequence[Prompt], adapters: Sequence[int], sampling: Sequence[RowSampling]
    ) -> torch.Tensor:
        """Fill `slots` with `prompts` (serving adapter ids `adapters`, sampling as `sampling` for the
        slot's whole life); return each prompt's first sampled token, [n] on the device."""
        ...

    def decode(self, slots: Sequence[int]) -> torch.Tensor:
        """Feed each slot its last token; return the next sampled tokens indexed by slot (device,
        at least max(slots) + 1 long). May return before the device finishes and reuse the buffer
        on the next call: copy it out first."""
        ...

    def release(self, slot: int) -> None: ...


@runtime_checkable
class GuidedRunner(Protocol):
    """A runner that samples constrained rows among allowed tokens only (node/serving/grammar.py)."""

    def constrain(self, slots: Sequence[int], bitmask: torch.Tensor) -> None:
        """For the NEXT `prefill` or `decode` call only: the row of `slots[i]` samples among the tokens
        whose bit is set in `bitmask[i]` ([len(slots), words] int32 on the CPU, bit j of word w is
        token 32 w + j; `sampling.apply_bitmask`). Other rows are not constrained."""
        ...


@runtime_checkable
class LogprobRunner(Protocol):
    """A runner that returns log-probabilities for the rows whose `RowSampling.logprobs` is set."""

    last_logprobs: StepLogprobs | None
    """Set by each `prefill`/`decode`: None when no row of that call asked, else indexed as that call's
    tokens are (prefill: by row; decode: by slot), top k = the most any row asked
    (`sampling.token_logprobs` of the raw logits at the sampled tokens). Copy it out before the
    next call."""


class HFRunner:
    """Correctness-first path for any HF causal LM (the tiny DeepSeek-V3 MLA model included).

    Each slot keeps its own per-layer (keys, values); a decode step left-pads them into one batched
    cache with an attention mask and explicit positions (RoPE makes left padding exact), runs the
    model once, and splits the grown cache back. A peft model serves several adapters in the same
    batch through peft's `adapter_names` (mixed-batch LoRA). `lock` (e.g. ModelHost.lock) is held
    around each forward so training never sees a half-served model.
    """

    def __init__(
        self, model: Any, *, max_slots: int = 8, max_len: int | None = None, lock: threading.RLock | None = None
    ) -> None:
        self.model = model
        self.max_slots = max_slots
        self.max_len: int = max_len or int(getattr(model.config, "max_position_embeddings", 2048))
        self.device = next(model.parameters()).device
        self.lock = lock or threading.RLock()
        self._peft = hasattr(model, "peft_config")
        self._names = [BASE_ADAPTER]
        self._kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._slot: dict[int, tuple[int, RowSampling]] = {}  # slot -> (adapter id, sampling)
        self._last: dict[int, torch.Tensor] = {}  # slot -> its last token ([1], device)
        self._made: dict[int, int] = {}  # slot -> tokens sampled so far (the seeded draw's step)
        self._allowed: tuple[list[int], torch.Tensor] | None = None  # `constrain` for the next call
        self.last_logprobs: StepLogprobs | None = None
        self.vocab_size = int(model.config.vocab_size)  # the logits' width (grammar bitmasks)

    def adapters(self) -> list[str]:
        return sorted(self.model.peft_config) if self._peft else []

    def adapter_id(self, name: str | None) -> int:
        if name in (None, BASE_ADAPTER):
            return 0
        if not self._peft or name not in self.model.peft_config:
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        if name not in self._names:
            self._names.append(str(name))
        return self._names.index(str(name))

    def _forward(self, adapters: Sequence[int], **kwargs: Any) -> Any:
        extra = {"adapter_names": [self._names[a] for a in adapters]} if self._peft else {}
        with self.lock, torch.no_grad():
            training = self.model.training  # peft refuses adapter_names in train mode (ModelHost's peft model is)
            self.model.eval()
            try:
                return self.model(use_cache=True, logits_to_keep=1, **kwargs, **extra)
            finally:
                self.model.train(training)

    def constrain(self, slots: Sequence[int], bitmask: torch.Tensor) -> None:
        self._allowed = (list(slots), bitmask)

    def _sample(self, slots: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        rows = [self._slot[s][1] for s in slots]
        dev = logits.device
        raw = logits
        if self._allowed is not None:
            masked, bitmask = self._allowed
            self._allowed = None
            at = {s: i for i, s in enumerate(slots)}
            idx = torch.tensor([at[s] for s in masked], device=dev)
            logits = logits.clone()
            logits[idx] = apply_bitmask(logits[idx], bitmask)
        tokens = sample(
            logits,
            torch.tensor([r.temperature for r in rows], device=dev),
            torch.tensor([r.top_p for r in rows], device=dev),
            torch.tensor([r.seed for r in rows], device=dev),
            torch.tensor([self._made[s] for s in slots], device=dev),
            any_random=any(r.random for r in rows),
            any_top_p=any(r.nucleus for r in rows),
        )
        k = logprob_rows(rows)
        self.last_logprobs = None if k is None else token_logprobs(raw, tokens, k)
        for i, s in enumerate(slots):
            self._last[s] = tokens[i : i + 1]
            self._made[s] += 1
        return tokens

    def prefill(
        self, slots: Sequence[int], prompts: Sequence[Prompt], adapters: Sequence[int], sampling: Sequence[RowSampling]
    ) -> torch.Tensor:
        rows = []
        for slot, ids, adapter, smp in zip(slots, prompts, adapters, sampling, strict=True):
            out = self._forward([adapter], input_ids=torch.tensor([list(ids)], device=self.device))
            self._kv[slot] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            self._slot[slot], self._made[slot] = (adapter, smp), 0
            rows.append(out.logits[0, -1])
        return self._sample(slots, torch.stack(rows))

    def decode(self, slots: Sequence[int]) -> torch.Tensor:
        lens = [self._kv[s][0][0].shape[2] for s in slots]
        width = max(lens)
        n_layers = len(self._kv[slots[0]])

        def padded(layer: int, which: int) -> torch.Tensor:
            parts = []
            for s, n in zip(slots, lens, strict=True):
                t = self._kv[s][layer][which]
                parts.append(torch.nn.functional.pad(t, (0, 0, width - n, 0)))
            return torch.cat(parts)

        cache = DynamicCache([(padded(i, 0), padded(i, 1)) for i in range(n_layers)])
        mask = torch.zeros((len(slots), width + 1), dtype=torch.long, device=self.device)
        for row, n in enumerate(lens):
            mask[row, width - n :] = 1
        out = self._forward(
            [self._slot[s][0] for s in slots],
            input_ids=torch.stack([self._last[s] for s in slots]),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in lens], device=self.device),
            past_key_values=cache,
        )
        layers = out.past_key_values.layers
        for row, (s, n) in enumerate(zip(slots, lens, strict=True)):
            start = width - n
            self._kv[s] = [(lay.keys[row : row + 1, :, start:], lay.values[row : row + 1, :, start:]) for lay in layers]
        tokens = self._sample(slots, out.logits[:, -1])
        where = torch.tensor(list(slots), device=self.device)
        by_slot = torch.zeros(max(slots) + 1, dtype=torch.long, device=self.device)
        by_slot[where] = tokens
        if (lp := self.last_logprobs) is not None:  # indexed by slot, as the tokens
            n, k = max(slots) + 1, lp.top_ids.shape[1]
            chosen, values = lp.chosen.new_zeros(n), lp.top_values.new_zeros(n, k)
            ids = lp.top_ids.new_zeros(n, k)
            chosen[where], values[where], ids[where] = lp.chosen, lp.top_values, lp.top_ids
            self.last_logprobs = StepLogprobs(chosen, values, ids)
        return by_slot

    def release(self, slot: int) -> None:
        self._kv.pop(slot, None)
        self._slot.pop(slot, None)
        self._last.pop(slot, None)
        self._made.pop(slot, None)
