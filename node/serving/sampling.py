"""Per-request sampling, batched: greedy / temperature / top-p with a seed, stop strings and EOS.

The random draw of a row depends only on (seed, token index, vocabulary id), through a counter-based
hash computed on the device: a seeded request gets the same tokens whatever else shares its batch
and whichever slot it runs in, and the whole batch samples in a few kernels with no per-row
generator and no host round trip.

Two opt-in extras, each costing nothing to a batch that does not use them (runners call them only
for the rows that asked): `apply_bitmask` restricts rows to the tokens a grammar allows
(constrained decoding, grammar.py), and `token_logprobs` gives the chosen token's log-probability
and the top k under the model's raw distribution (OpenAI's `logprobs`). A runner that supports them
says so by having `constrain` / `last_logprobs` (runner.py: `GuidedRunner`, `LogprobRunner`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from node.serving.grammar import Constraint

_M32 = 0xFFFFFFFF
MAX_LOGPROBS = 20
"""Most alternatives per token (OpenAI's `top_logprobs` bound)."""


@dataclass(frozen=True)
class SamplingParams:
    """What an OpenAI request asks for; `temperature == 0` is greedy.

    `max_tokens=None` runs to the end of the context (or EOS). `logprobs=k` returns each output
    token's log-probability and its k most likely alternatives (k = 0: the token's own only).
    `constraint` holds the output to a JSON schema / JSON object / regular expression."""

    max_tokens: int | None = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")

    def resolved_seed(self) -> int:
        """The seed to use: the request's, or a fresh random one (unseeded requests still differ)."""
        return self.seed if self.seed is not None else secrets.randbits(63)


@dataclass(frozen=True)
class RowSampling:
    """What a runner needs to sample one request's tokens on the device."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k (runner.LogprobRunner)

    @property
    def random(self) -> bool:
        return self.temperature > 0

    @property
    def nucleus(self) -> bool:
        """Top-p filtering is in force (a random row with top_p below 1)."""
        return self.random and self.top_p < 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on int64 tensors holding uint32 values: a bijective 32-bit mixer."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) float32 of shape [rows, vocab], a pure function of (seed, step, vocabulary id)."""
    s = seeds.to(torch.int64)
    key = _mix32(_mix32((s & _M32) ^ _mix32((s >> 32) & _M32)) ^ (steps.to(torch.int64) & _M32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32(_mix32(key[:, None] ^ ids[None, :]) ^ key[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    any_random: bool,
    any_top_p: bool,
) -> torch.Tensor:
    """Next token per row. Greedy rows take the argmax; the others an exponential race (Gumbel-max).

    `any_random` / `any_top_p` come from the host's own copy of the parameters, so an all-greedy
    batch costs one argmax and no device-to-host sync.
    """
    greedy = logits.argmax(dim=-1)
    if not any_random:
        return greedy
    probs = torch.softmax(logits.float() / temperature.clamp_min(1e-5)[:, None], dim=-1)
    if any_top_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p[:, None]  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    race = probs / -torch.log(uniform_noise(seeds, steps, probs.shape[-1]))
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 (bit i of word w: token 32 w + i) -> [rows, vocab] bool on bitmask's device;
    tokens past the mask's words are not allowed."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return allowed[:, :vocab]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [rows, vocab] with every token its row's bitmask does not allow at -inf (a new tensor)."""
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    return logits.masked_fill(~allowed, float("-inf"))


@dataclass(frozen=True)
class StepLogprobs:
    """One step's log-probabilities on the device, a row per returned token (as the step's tokens
    are indexed): the chosen token's [rows], and the top k [rows, k] values and ids."""

    chosen: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> StepLogprobs:
    """log_softmax of the raw `logits` (float32; before temperature, top-p or a grammar's mask, as
    vLLM's default `raw_logprobs`) at `tokens`, and the top `k` per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.view(-1, 1).to(torch.long)).squeeze(-1)
    values, ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens.new_zeros(tokens.shape[0], 0))
    return StepLogprobs(chosen, values, ids)


def logprob_rows(rows: Sequence[RowSampling | None]) -> int | None:
    """The top k a step must compute for `rows` (the most any asks), None if none asked."""
    asked = [r.logprobs for r in rows if r is not None and r.logprobs is not None]
    return max(asked) if asked else None


class TextStream:
    """Incremental detokenisation with stop strings: yields text deltas safe to show.

    Decoding a short window (not the whole output) keeps each token O(1); text that could still
    become a stop string is held back until it can't.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (may run past a stop string)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False
        self._prefix = 0
        self._read = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Add a token; return new visible text. Sets `stopped` when a stop string appears."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            start = max(0, self.emitted - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        return self._take(len(self.text) - self._hold)

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the request)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
