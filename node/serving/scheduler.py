"""Continuous batching: requests join and leave the running batch at token granularity.

One engine thread loops: apply queued commands (adapter loads), release finished and cancelled
slots, admit waiting requests into free slots (one batched prefill, up to a token budget), launch
ONE batched decode step for every running slot, and only then read back the previous step's
tokens and stream them to their requests. The runner samples on the device and keeps each slot's
last token there, so launching step t+1 needs nothing from step t on the host: the device never
waits for the host's bookkeeping, and stops (EOS, stop strings) are checked one step behind. A
request that stopped at step t was also run in step t+1; that extra token is dropped. A length
limit is known ahead, so such a request is never launched past it. `cancel` frees the slot under
the lock at once, so the next step already admits someone else into it; steps in flight drop the
cancelled row's tokens.

A request held to a grammar (`SamplingParams.constraint`, grammar.py) cannot run ahead: its next
token's allowed set depends on the token just sampled. While such a request runs, each step first
reads back what is in flight (so the guides have advanced), then hands the runner every constrained
row's bitmask (`GuidedRunner.constrain`) before launching; the batch's other rows lose only the
overlap of host bookkeeping with the device for those steps. Logprobs (`SamplingParams.logprobs`)
are copied back with the step's tokens when a row of the step asked (`LogprobRunner`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from federation.errors import Busy
from node.serving.grammar import Grammars, Guided
from node.serving.runner import GuidedRunner, LogprobRunner, Runner
from node.serving.sampling import RowSampling, SamplingParams, StepLogprobs, TextStream

T = TypeVar("T")


class QueueFull(Busy):
    """The waiting queue is full (the HTTP layer answers 429)."""

    default_code = "queue_full"


@dataclass(frozen=True)
class TokenLogprob:
    """An output token's log-probability under the model and its most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Event:
    """A piece of one request's output. The last event has `finish_reason` set."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of `token_ids` when the request asked


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float


@dataclass
class _Launched:
    """One launched prefill or decode step: its tokens' host copy and which request reads which row."""

    tokens: torch.Tensor  # host copy (pinned on CUDA), filled asynchronously
    ready: Any  # torch.cuda.Event recorded after the copy, or None on the CPU
    rows: list[tuple[_Request, int]]
    logprobs: StepLogprobs | None = None  # host copies, when a row of the step asked

    @staticmethod
    def of(
        device_tokens: torch.Tensor, rows: list[tuple[_Request, int]], logprobs: StepLogprobs | None = None
    ) -> _Launched:
        cuda = device_tokens.is_cuda

        def host(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
            return out.copy_(t, non_blocking=cuda)

        tokens = host(device_tokens)
        lp = None
        if logprobs is not None:
            lp = StepLogprobs(host(logprobs.chosen), host(logprobs.top_values), host(logprobs.top_ids))
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(tokens, ready, rows, lp)

    def wait(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return [int(t) for t in self.tokens.tolist()]

    def logprob(self, row: int, k: int) -> TokenLogprob | None:
        """Row `row`'s token logprob with its top `k` (after `wait`)."""
        if self.logprobs is None:
            return None
        lp = self.logprobs
        top = tuple(zip(lp.top_ids[row, :k].tolist(), lp.top_values[row, :k].tolist(), strict=True))
        return TokenLogprob(int(self.tokens[row]), float(lp.chosen[row]), top)


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    adapter: int
    seed: int
    on_event: Callable[[Event], None]
    text: TextStream
    max_tokens: int  # params.max_tokens, or what the context leaves
    guide: Guided | None = None
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1
    launched: int = 0  # tokens whose generation has been launched on the device
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    def can_launch(self, max_len: int) -> bool:
        """Another token may be launched: the length limits are known before the tokens are."""
        fits = 0 < self.launched < self.max_tokens and len(self.prompt) + self.launched < max_len
        # a constrained request's next mask needs its last token: none may be in flight
        return fits and (self.guide is None or self.launched == len(self.generated))

    def sampling(self) -> RowSampling:
        return RowSampling(self.params.temperature, self.params.top_p, self.seed, self.params.logprobs)

    def event(
        self,
        text: str,
        tokens: tuple[int, ...],
        finish: str | None,
        error: str | None = None,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> Event:
        return Event(self.id, text, tokens, finish, len(self.prompt), len(self.generated), error, logprobs)


class Engine:
    """The serving engine over a `Runner`. Thread-safe; `stream`/`astream` suit the HTTP layer."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        *,
        max_queue: int = 256,
        prefill_token_budget: int = 8192,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        eos = eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id]
        self.eos = frozenset(int(t) for t in eos if t is not None)
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._slots: list[_Request | None] = [None] * runner.max_slots
        self._requests: dict[str, _Request] = {}
        self._to_release: list[int] = []
        self._inflight: collections.deque[_Launched] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.generated_tokens = 0
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    @property
    def grammars(self) -> Grammars:
        """The compiled constraints over this engine's tokenizer (made on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                vocab = int(getattr(self.runner, "vocab_size", 0) or len(self.tokenizer))
                eos = getattr(self.tokenizer, "eos_token_id", None)
                self._grammars = Grammars(
                    self.tokenizer, vocab_size=vocab, eos_token_id=int(eos if eos is not None else min(self.eos))
                )
            return self._grammars

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fedseek-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in list(self._requests.values()):
            self.cancel(req.id)
        if self._grammars is not None:
            self._grammars.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- requests -------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        on_event: Callable[[Event], None],
        request_id: str | None = None,
    ) -> str:
        """Queue a request; `on_event` is called from the engine thread. Raises QueueFull, ValueError,
        UnknownAdapter (and grammar.GrammarError / GrammarBusy for a constraint; a constraint not
        compiled yet is compiled here, blocking: `grammars.submit` it first to wait elsewhere)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        limit = params.max_tokens if params.max_tokens is not None else self.runner.max_len - len(prompt)
        if len(prompt) + max(limit, 1) > self.runner.max_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens plus max_tokens {limit} exceeds the context of {self.runner.max_len}"
            )
        if params.logprobs is not None and not isinstance(self.runner, LogprobRunner):
            raise ValueError(f"logprobs: {type(self.runner).__name__} does not return log-probabilities")
        if params.constraint is not None and not isinstance(self.runner, GuidedRunner):
            raise ValueError(f"response_format: {type(self.runner).__name__} does not support constrained decoding")
        adapter_id = self.runner.adapter_id(adapter)
        req = _Request(
            id=request_id or f"req-{uuid.uuid4().hex}",
            prompt=prompt,
            params=params,
            adapter=adapter_id,
            seed=params.resolved_seed(),
            on_event=on_event,
            text=TextStream(self.tokenizer, params.stop),
            max_tokens=limit,
            guide=self.grammars.guide(params.constraint) if params.constraint is not None else None,
        )
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            if req.id in self._requests:
                raise ValueError(f"request id {req.id!r} is in use")
            self._requests[req.id] = req
            self._waiting.append(req)
            self._cv.notify_all()
        return req.id

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request; its slot is free when this returns."""
        with self._cv:
            req = self._requests.pop(request_id, None)
            if req is None:
                return False
            if req.slot >= 0:
                self._slots[req.slot] = None
                self._to_release.append(req.slot)
            else:
                self._waiting.remove(req)
            self._cv.notify_all()
        req.on_event(req.event(req.text.flush(), (), "cancelled"))
        return True

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, adapter: str | None = None
    ) -> Iterator[Event]:
        """Blocking iterator of events; closing it early (client gone) cancels the request."""
        import queue

        q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        rid = self.submit(prompt_ids, params, adapter=adapter, on_event=q.put)
        try:
            while True:
                ev = q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(rid)

    async def astream(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, adapter: str | None = None
    ) -> AsyncIterator[Event]:
        """Async iterator of events for an asyncio server; cancelling or closing it cancels the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()

        def put(ev: Event) -> None:
            loop.call_soon_threadsafe(q.put_nowait, ev)

        rid = self.submit(prompt_ids, params, adapter=adapter, on_event=put)
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(rid)

    def complete(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, adapter: str | None = None
    ) -> Completion:
        """Run one request to the end (blocking)."""
        start = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        ids: list[int] = []
        last: Event | None = None
        for ev in self.stream(prompt_ids, params, adapter=adapter):
            if first is None and ev.token_ids:
                first = time.perf_counter() - start
            text.append(ev.text)
            ids.extend(ev.token_ids)
            last = ev
        assert last is not None and last.finish_reason is not None
        if last.finish_reason == "error":
            raise RuntimeError(f"generation failed: {last.error}")
        return Completion(
            last.request_id, "".join(text), ids, last.finish_reason, last.prompt_tokens, len(ids), first or 0.0
        )

    # ---- state and commands ---------------------------------------------------------------
    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps (runner state is single-threaded)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        fut: Future[T] = Future()
        with self._cv:
            self._commands.append((fn, fut))
            self._cv.notify_all()
        return fut.result()

    def kv_tokens(self) -> int:
        """Positions the running requests hold in the KV cache (prompt and launched tokens), of
        `runner.max_slots * runner.max_len` (node/metrics.py: `vllm:kv_cache_usage_perc`)."""
        with self._cv:
            return sum(len(r.prompt) + r.launched for r in self._slots if r is not None)

    def stats(self) -> dict[str, int]:
        with self._cv:
            running = sum(r is not None for r in self._slots)
            return {
                "waiting": len(self._waiting),
                "running": running,
                "free_slots": len(self._slots) - running,
                "steps": self.steps,
                "generated_tokens": self.generated_tokens,
            }

    # ---- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._commands or self._inflight or any(self._slots)):
                    self._cv.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller
                    fut.set_exception(exc)
            try:
                self.step()
            except Exception as exc:  # a broken step fails its requests, not the engine
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def step(self) -> None:
        """Admit into free slots (batched prefill), launch one batched decode step over every running
        slot, then read back and stream everything launched before that step."""
        with self._cv:
            released, self._to_release = self._to_release, []
            admitted = self._admit()
        for slot in released:
            self.runner.release(slot)
        emits: list[tuple[_Request, Event]] = []
        if admitted:
            self._constrain(admitted)
            tokens = self.runner.prefill(
                [r.slot for r in admitted],
                [r.prompt for r in admitted],
                [r.adapter for r in admitted],
                [r.sampling() for r in admitted],
            )
            for r in admitted:
                r.launched = 1
            rows = [(r, i) for i, r in enumerate(admitted)]
            self._inflight.append(_Launched.of(tokens, rows, self._logprobs(admitted)))
        with self._cv:
            waiting_on_guide = any(r is not None and r.guide and r.launched > len(r.generated) for r in self._slots)
        if waiting_on_guide:  # a constrained row needs its last token before its next step: read back now
            while self._inflight:
                emits += self._collect(self._inflight.popleft())
        with self._cv:
            running = [r for r in self._slots if r is not None and r.can_launch(self.runner.max_len)]
        if running:
            self._constrain(running)
            tokens = self.runner.decode([r.slot for r in running])
            for r in running:
                r.launched += 1
            self._inflight.append(_Launched.of(tokens, [(r, r.slot) for r in running], self._logprobs(running)))
        while len(self._inflight) > (1 if running else 0):  # the step just launched runs while we read
            emits += self._collect(self._inflight.popleft())
        self.steps += 1
        for req, ev in emits:
            req.on_event(ev)

    def _constrain(self, reqs: Sequence[_Request]) -> None:
        """Hand the runner the allowed next tokens of every constrained request about to run."""
        guided = [r for r in reqs if r.guide is not None]
        if guided:
            bitmask = self.grammars.bitmask([r.guide for r in guided if r.guide is not None])
            cast_runner: Any = self.runner  # submit checked it is a GuidedRunner
            cast_runner.constrain([r.slot for r in guided], bitmask)

    def _logprobs(self, reqs: Sequence[_Request]) -> StepLogprobs | None:
        """The step's logprobs when one of its requests asked (the runner computed them then)."""
        if all(r.params.logprobs is None for r in reqs):
            return None
        return getattr(self.runner, "last_logprobs", None)

    def _admit(self) -> list[_Request]:
        """Waiting requests into the lowest free slots (keeps the decode batch dense), under the lock."""
        admitted: list[_Request] = []
        budget = self.prefill_token_budget
        free = (i for i, r in enumerate(self._slots) if r is None)
        for slot in free:
            if not self._waiting or (admitted and len(self._waiting[0].prompt) > budget):
                break
            req = self._waiting.popleft()
            budget -= len(req.prompt)
            req.slot = slot
            self._slots[slot] = req
            admitted.append(req)
        return admitted

    def _collect(self, launched: _Launched) -> list[tuple[_Request, Event]]:
        """Wait for a launched step's tokens; record each for its request unless it finished or left."""
        tokens = launched.wait()
        out: list[tuple[_Request, Event]] = []
        with self._cv:
            for req, row in launched.rows:
                if self._requests.get(req.id) is not req:
                    continue  # finished one step earlier (this token is past its stop), or cancelled
                k = req.params.logprobs
                lp = launched.logprob(row, k) if k is not None else None
                out.append((req, self._record(req, tokens[row], lp)))
        return out

    def _record(self, req: _Request, tok: int, logprob: TokenLogprob | None = None) -> Event:
        """Append `tok` to `req` (under the lock); finish and free its slot when done."""
        p = req.params
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        self.generated_tokens += 1
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return self._finish(req, "stop", req.text.flush(), ())  # the stop token is not part of the output
        if req.guide is not None and not req.guide.advance(tok):
            return self._finish(req, "error", req.text.flush(), (), error=f"token {tok} breaks the response format")
        req.generated.append(tok)
        delta = req.text.push(tok)
        lps = (logprob,) if logprob is not None else ()
        if req.text.stopped:
            return self._finish(req, "stop", delta, (tok,), logprobs=lps)
        if len(req.generated) >= req.max_tokens or len(req.prompt) + len(req.generated) >= self.runner.max_len:
            return self._finish(req, "length", delta + req.text.flush(), (tok,), logprobs=lps)
        return req.event(delta, (tok,), None, logprobs=lps)

    def _finish(
        self,
        req: _Request,
        reason: str,
        text: str,
        tokens: tuple[int, ...],
        *,
        error: str | None = None,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> Event:
        self._requests.pop(req.id, None)
        self._slots[req.slot] = None
        self._to_release.append(req.slot)
        return req.event(text, tokens, reason, error, logprobs)

    def _fail_all(self, message: str) -> None:
        self._inflight.clear()
        with self._cv:
            reqs = [r for r in self._slots if r is not None]
            for req in reqs:
                self._requests.pop(req.id, None)
                self._slots[req.slot] = None
                self._to_release.append(req.slot)
        for req in reqs:
            req.on_event(req.event("", (), "error", message))
