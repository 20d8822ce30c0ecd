"""Teacher-forced scoring of one fixed response under many prompts: an explanation's evaluations.

An explanation scores hundreds of prompts that differ only in the masked last user message,
each followed by the same response, and needs only the response tokens' log-probabilities.
`ModelHost.response_logprobs` (node/engine.py) does the chat-template and adapter work and
hands the token rows here. What makes an evaluation cheap:

* every row of a call is scored in as few forwards as a token budget allows: rows are
  deduplicated, sorted by length and packed, so padding stays a few percent;
* rows are right-padded, so no attention mask is needed at all: a real token never sees a pad
  (pads only come after it), every query has a key (no fully masked row, so no NaN-prone
  kernel path), and without a shared prefix SDPA takes its plain causal kernel;
* the shared prefix (BOS, system prompt, user tag) is run once and its KV cache expanded, not
  copied, into every batch;
* only the response positions reach the LM head (`logits_to_keep` as per-row positions), in
  the model's dtype; the log-softmax normaliser is taken in fp32 a few rows at a time, so no
  full-vocabulary fp32 tensor is ever materialised;
* results stay on the device until the call ends: one synchronisation per call, so the host
  queues the next forward while the device runs this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer (keys, values) of a shared prefix, batch 1."""

_MIN_FILL = 0.9
"""Rows shorter than this share of a batch's width start a new batch (once it holds budget/4 positions)."""
_LSE_CHUNK_BYTES = 256 * 2**20
"""fp32 working set of one log-softmax normaliser chunk."""


@dataclass
class ScoringStats:
    """What the last scoring call ran: a benchmark and tests read it."""

    prompts: int = 0
    rows: int = 0  # distinct token rows actually scored (duplicates are scored once)
    forwards: int = 0
    tokens: int = 0  # positions run through the model, padding included, shared prefix excluded
    padding: int = 0
    prefix_tokens: int = 0  # per row, taken from the shared prefix's KV cache
    prefix_forwards: int = 0  # 0 when the prefix's KV cache came from an earlier call

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def default_batch_tokens(device: torch.device) -> int:
    """Positions per forward: large enough for full-efficiency matmuls on a GPU (a 1.5B model's
    activations for 16k positions are ~1.5 GB, its response logits for 64-token responses ~2 GB),
    small enough on a CPU that activations stay in cache."""
    return 16384 if device.type == "cuda" else 4096


def prefix_kv(model: Any, ids: Sequence[int], device: torch.device) -> KV | None:
    """The KV cache of ``ids`` (batch 1), or None when the model's cache is not a plain one.

    Sliding-window, linear or quantised cache layers are not known to be reusable exactly.
    """
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if type(cache) is not DynamicCache:
        return None
    kv: KV = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.get_seq_length() != len(ids):
            return None
        keys, values = layer.keys, layer.values
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
            return None
        kv.append((keys, values))
    return kv


def teacher_forced_logprobs(
    model: Any,
    rows: Sequence[Sequence[int]],
    response: Sequence[int],
    *,
    pad_id: int,
    device: torch.device,
    prefix: KV | None = None,
    prefix_len: int = 0,
    max_batch_tokens: int | None = None,
    max_batch_rows: int | None = None,
    stats: ScoringStats | None = None,
) -> np.ndarray:
    """``(len(rows), len(response))`` log-probs of each response token after ``prefix + row``.

    ``rows`` are prompt token ids after the shared prefix (each at least one token: the first
    response token is predicted from the row's last one); ``prefix`` its KV cache of
    ``prefix_len`` positions, or None. Numerically this is one unpadded forward per row, up to
    the reduction order of batched matmuls.
    """
    r = len(response)
    if r == 0:
        raise ValueError("the response has no tokens")
    if not rows:
        return np.zeros((0, r))
    distinct: dict[tuple[int, ...], int] = {}
    inverse = np.array([distinct.setdefault(tuple(int(t) for t in row), len(distinct)) for row in rows], dtype=np.int64)
    keys = list(distinct)
    if any(not k for k in keys):
        raise ValueError("every row needs at least one token to predict the response from")
    budget = max_batch_tokens or default_batch_tokens(device)
    cap = max_batch_rows or len(keys) or 1
    order = sorted(range(len(keys)), key=lambda i: -len(keys[i]))  # longest first: each batch's width is its first
    out = torch.empty((len(keys), r), dtype=torch.float32, device=device)
    resp = torch.tensor([int(t) for t in response], dtype=torch.long, device=device)
    steps = torch.arange(r, dtype=torch.long)
    offset = prefix_len if prefix is not None else 0  # positions continue after the cached prefix
    st = stats if stats is not None else ScoringStats()
    st.prompts, st.rows, st.prefix_tokens = len(rows), len(keys), offset
    start = 0
    while start < len(order):
        width = len(keys[order[start]]) + r
        limit = max(1, min(cap, budget // width, len(order) - start))
        b = 1
        # A batch also ends where the rows get much shorter than its width, once it is big enough
        # to run at full efficiency: KernelSHAP's coalitions range from a few words to the whole
        # prompt, and one width for all would pad a quarter of the positions.
        while b < limit and (len(keys[order[start + b]]) + r >= _MIN_FILL * width or b * width < budget // 4):
            b += 1
        batch = order[start : start + b]
        start += b
        ids = np.full((b, width), pad_id, dtype=np.int64)
        lengths = np.empty(b, dtype=np.int64)
        for j, k in enumerate(batch):
            seq = keys[k]
            ids[j, : len(seq)] = seq
            ids[j, len(seq) : len(seq) + r] = response
            lengths[j] = len(seq)
        # Response token t of row j is predicted at the row's position lengths[j] - 1 + t.
        keep = (torch.from_numpy(lengths)[:, None] - 1 + steps[None, :]).to(device)
        kwargs: dict[str, Any] = {}
        if prefix is not None:
            # DynamicLayer.update concatenates into new tensors: the shared prefix is never mutated.
            kwargs["past_key_values"] = DynamicCache(
                [(k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])) for k, v in prefix]
            )
            kwargs["use_cache"] = True
        positions = torch.arange(offset, offset + width, device=device)
        logits = model(
            input_ids=torch.from_numpy(ids).to(device),
            position_ids=positions[None, :].expand(b, width),
            logits_to_keep=keep,
            **kwargs,
        ).logits  # (b, r, vocab), the model's dtype
        target = logits.gather(-1, resp.expand(b, r).unsqueeze(-1)).squeeze(-1).float()
        out[torch.tensor(batch, device=device)] = target - _logsumexp_fp32(logits)
        st.forwards += 1
        st.tokens += b * width
        st.padding += b * width - int(lengths.sum()) - b * r
        del logits
    scored = out.double().cpu().numpy()  # the call's one synchronisation
    return np.asarray(scored[inverse])


def _logsumexp_fp32(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis in fp32, a few rows at a time (bf16 would round log-probs by ~0.03)."""
    b, r, v = logits.shape
    if logits.dtype == torch.float32:
        return torch.logsumexp(logits, dim=-1)
    step = max(1, _LSE_CHUNK_BYTES // max(1, r * v * 4))
    return torch.cat([torch.logsumexp(logits[i : i + step].float(), dim=-1) for i in range(0, b, step)])
