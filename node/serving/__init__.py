"""The serving engine: continuous batching over a static KV cache, several LoRA versions per batch.

`make_runner` picks the fast runner for Qwen2/Llama models, the MLA runner for DeepSeek-V2/V3 and
the generic HF runner otherwise; `Engine` schedules requests over it (see scheduler.py for the API
the HTTP layer uses).
"""

from __future__ import annotations

from typing import Any

from node.serving.fast import FastRunner
from node.serving.fast import supports as fast_supports
from node.serving.grammar import Constraint, GrammarBusy, GrammarError
from node.serving.lora import LoraWeights, lora_from_arrays, lora_from_peft
from node.serving.mla import MLARunner
from node.serving.mla import supports as mla_supports
from node.serving.runner import GuidedRunner, HFRunner, LogprobRunner, Runner, UnknownAdapter
from node.serving.sampling import SamplingParams
from node.serving.scheduler import Completion, Engine, Event, QueueFull, TokenLogprob

__all__ = [
    "Completion",
    "Constraint",
    "Engine",
    "Event",
    "FastRunner",
    "GrammarBusy",
    "GrammarError",
    "GuidedRunner",
    "HFRunner",
    "LogprobRunner",
    "LoraWeights",
    "MLARunner",
    "QueueFull",
    "Runner",
    "SamplingParams",
    "TokenLogprob",
    "UnknownAdapter",
    "lora_from_arrays",
    "lora_from_peft",
    "make_runner",
    "supports",
]


def supports(model: Any) -> bool:
    """Whether a fast runner (Qwen2/Llama, or DeepSeek-V2/V3 MLA + MoE) serves this model."""
    return fast_supports(model) or mla_supports(model)


def make_runner(
    model: Any, *, max_slots: int = 64, max_len: int | None = None, max_prompt: int = 512, **fast: Any
) -> Runner:
    """The fast runner where the architecture allows it (FastRunner for Qwen2/Llama, MLARunner for
    DeepSeek-V2/V3), else the generic one.

    This is how serving builds its runner (`node.service.Serving`, so `fedseek serve` and `fedseek
    node start`) and how bench/serving.py measures it. On CUDA the fast runner captures its graphs
    here, at load: the decode graphs without adapters and the single-prompt prefill graphs up to
    `max_prompt` tokens (longer prompts prefill eagerly; graphs for adapters are captured when a
    batch first uses them)."""
    if supports(model):
        cls = FastRunner if fast_supports(model) else MLARunner
        runner = cls(model, max_slots=max_slots, max_len=max_len, **fast)
        runner.capture(max_prompt=max_prompt)
        return runner
    return HFRunner(model, max_slots=max_slots, max_len=max_len)
