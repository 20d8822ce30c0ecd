"""Self-contained HTML report of an :class:`Attribution` for clinical reviewers.

Everything (styles, plot) is inlined so the file can be archived with the audit
record and opened offline; every piece of text is HTML-escaped because prompts
and responses are untrusted.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from explain.attribution import Attribution
from federation.ops.atomic import write_atomic

_TOP_N = 10
_POS_RGB = (220, 38, 38)  # red: raises the response's log-prob
_NEG_RGB = (37, 99, 235)  # blue: lowers it
_MAX_ALPHA = 0.85

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #111; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-family: monospace; }
.text { white-space: pre-wrap; font-family: monospace; border: 1px solid #ccc;
        padding: 0.8em; line-height: 1.7; }
.feat { border-radius: 2px; }
.legend { color: #555; font-size: 0.9em; }
img { max-width: 100%; }
"""


@dataclass(frozen=True)
class ReportContext:
    """Provenance shown with the attribution so a reviewer can tie it to an audit record."""

    model: str
    adapter_version: str
    adapter_sha256: str
    requested_by: str
    created_at: str
    audit_record: str
    response: str


@dataclass(frozen=True)
class RenderedReport:
    """A report in memory: the HTML page (plot inlined) and the plot on its own."""

    html: str
    png: bytes | None


def render_report(attribution: Attribution, ctx: ReportContext, *, plot: bool = True) -> RenderedReport:
    """The report's bytes, for a caller that stores them its own way (the node seals them at rest)."""
    img, png = "", None
    if plot:
        png = _bar_plot_png(attribution.top_features(_TOP_N))
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        img = f'<h2>Top features (plot)</h2>\n<img alt="Top features bar plot" src="{src}">\n'
    return RenderedReport(html=_render(attribution, ctx, img), png=png)


def write_report(
    attribution: Attribution,
    ctx: ReportContext,
    *,
    html_path: Path,
    png_path: Path | None = None,
) -> Path:
    """Write the report to ``html_path`` (and the bar plot to ``png_path``); return ``html_path``.

    Both files are replaced atomically so a reader never sees a half-written report.
    """
    report = render_report(attribution, ctx, plot=png_path is not None)
    if png_path is not None and report.png is not None:
        write_atomic(png_path, report.png, mode=0o600)  # clinical text: its owner's alone
    write_atomic(html_path, report.html.encode("utf-8"), mode=0o600)
    return html_path


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _render(a: Attribution, ctx: ReportContext, img: str) -> str:
    meta = [
        ("Model", ctx.model),
        ("Adapter version", ctx.adapter_version),
        ("Adapter SHA-256", ctx.adapter_sha256),
        ("Requested by", ctx.requested_by),
        ("Created at", ctx.created_at),
        ("Audit record", ctx.audit_record),
    ]
    meta_rows = "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta)

    total = a.total
    vmax = float(abs(total).max()) if len(total) else 0.0
    spans = []
    for i, (feat, v) in enumerate(zip(a.features, total.tolist(), strict=True)):
        if not feat:
            continue
        alpha = _MAX_ALPHA * abs(v) / vmax if vmax > 0 else 0.0
        r, g, b = _POS_RGB if v >= 0 else _NEG_RGB
        spans.append(
            f'<span class="feat" data-i="{i}" title="{v:+.4g}" '
            f'style="background-color: rgba({r}, {g}, {b}, {alpha:.3f})">{_e(feat)}</span>'
        )

    tok_rows = "\n".join(
        f"<tr><td>{_e(repr(t))}</td><td class='num'>{f:.4f}</td>"
        f"<td class='num'>{b:.4f}</td><td class='num'>{s:+.4f}</td></tr>"
        for t, f, b, s in zip(
            a.output_tokens,
            a.full_values.tolist(),
            a.base_values.tolist(),
            a.values.sum(axis=0).tolist(),
            strict=True,
        )
    )
    top_rows = "\n".join(
        f"<tr><td class='num'>{k}</td><td>{_e(t)}</td><td class='num'>{v:+.4f}</td></tr>"
        for k, (t, v) in enumerate(a.top_features(_TOP_N), start=1)
    )
    title = f"FedSeek attribution report: {ctx.audit_record}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<table class="meta">
{meta_rows}
</table>
<h2>Prompt</h2>
<p class="legend">SHAP (Owen) value of each prompt token for the log-probability of the
{len(a.output_tokens)} explained response token(s), summed over them:
red raises it, blue lowers it; hover for the value.</p>
<div class="text prompt">{"".join(spans)}</div>
<h2>Response</h2>
<div class="text response">{_e(ctx.response)}</div>
<h2>Explained response tokens</h2>
<table class="tokens">
<tr><th>Token</th><th>log p (prompt)</th><th>log p (all masked)</th><th>Sum of attributions</th></tr>
{tok_rows}
</table>
<h2>Top {_TOP_N} features</h2>
<table class="top">
<tr><th>Rank</th><th>Feature</th><th>Attribution</th></tr>
{top_rows}
</table>
{img}</body>
</html>
"""


def _bar_plot_png(top: list[tuple[str, float]]) -> bytes:
    # Figure + Agg canvas directly: no pyplot global state, safe in servers and threads.
    fig = Figure(figsize=(7, 0.45 * max(len(top), 1) + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vals = [v for _, v in reversed(top)]
    labels = [t.replace("$", r"\$") for t, _ in reversed(top)]  # no mathtext from prompt text
    colors = [tuple(c / 255 for c in (_POS_RGB if v >= 0 else _NEG_RGB)) for v in vals]
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), labels=labels)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("SHAP value (summed over response tokens)")
    ax.set_title("Top prompt features")
    buf = io.BytesIO()
    with warnings.catch_warnings():  # emoji etc. lacking in the default font are not an error
        warnings.filterwarnings("ignore", message="Glyph .* missing", category=UserWarning)
        fig.tight_layout()
        fig.savefig(buf, format="png")
    return buf.getvalue()
