"""The inspection report of `fedseek compliance report` as one self-contained HTML document.

Rendering only: `federation.cli.compliance` gathers and checks the site's state into an
`Inspection`; this module turns it into HTML and reads nothing itself. The document must stand
alone in an inspector's archive and be safe to open: styles are inline, the budget plot is a PNG
`data:` URI, there is no script and no link to anything, and a Content-Security-Policy forbids
loading anything but inline styles and `data:` images should a future edit add one. Every piece of
text is escaped with `html.escape`: partition labels, audit actors and actions, key labels and
policy lines come from files an insider (or a caller) wrote, and must show as text, never run.

Layout: the verdict and the summary of checks first (one table an inspector can read in a
minute), then what the report could not verify, then one section per subject.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FAIL", "PASS", "UNVERIFIED", "Check", "Inspection", "render"]

Status = Literal["pass", "fail", "not verified"]
PASS: Status = "pass"
FAIL: Status = "fail"
UNVERIFIED: Status = "not verified"

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
"""Nothing but this document's own styles and inline images may load (file:// pages obey it too)."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; color: #111; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
td.num { text-align: right; font-family: monospace; }
code, .mono { font-family: monospace; word-break: break-all; }
.status { font-weight: bold; text-transform: uppercase; white-space: nowrap; }
.pass { background: #16a34a; color: #fff; }
.fail { background: #dc2626; color: #fff; }
.unverified { background: #d97706; color: #fff; }
.verdict { font-size: 1.3em; padding: 0.4em 0.8em; display: inline-block; border-radius: 4px; }
th { overflow-wrap: normal; }
.meta td { padding: 0.1em 0.6em; }
.meta td:first-child { font-weight: bold; }
#summary h2 { margin-top: 1em; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


@dataclass(frozen=True)
class Check:
    """One check the report makes: a stable id, what it checks, its outcome and the one line why."""

    id: str
    title: str
    status: Status
    detail: str


@dataclass
class Inspection:
    """Everything the report shows; built by `federation.cli.compliance.inspect_site`."""

    site: str
    state_dir: str
    witness_dir: str | None
    generated: str
    version: str
    checks: list[Check] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # what this report could not check, and why
    ledger: Mapping[str, Any] | None = None  # PrivacyLedger.to_json()
    ledger_error: str | None = None
    plot_png: bytes | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)  # one row per deployed version
    audit: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status == PASS for c in self.checks)


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _status(status: Status) -> str:
    css = {"pass": "pass", "fail": "fail", "not verified": "unverified"}[status]
    return f'<td class="status {css}">{_e(status)}</td>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers) if any(headers) else ""
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>" for i, v in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="note">none</td></tr>')
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _fmt(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _summary(report: Inspection) -> str:
    verdict = (
        ("pass", "ALL CHECKS PASSED")
        if report.ok
        else ("fail", "CHECKS FAILED")
        if any(c.status == FAIL for c in report.checks)
        else ("unverified", "INCOMPLETE: NOT EVERY CHECK COULD BE MADE")
    )
    meta = _table(
        ["", ""],
        [
            ("Site", report.site),
            ("Report generated (UTC)", report.generated),
            ("Site state directory", report.state_dir),
            ("Coordinator state (witness)", report.witness_dir or "none given"),
            ("FedSeek", report.version),
        ],
    ).replace("<table>", '<table class="meta">', 1)
    rows = "".join(
        f'<tr data-check="{_e(c.id)}" data-status="{_e(c.status)}"><td>{_e(c.title)}</td>{_status(c.status)}'
        f"<td>{_e(c.detail)}</td></tr>"
        for c in report.checks
    )
    checks = f"<table><thead><tr><th>Check</th><th>Result</th><th>Detail</th></tr></thead><tbody>{rows}</tbody></table>"
    unverified = "".join(f"<li>{_e(u)}</li>" for u in report.unverified) or "<li>nothing: every check was made</li>"
    return (
        f'<section id="summary"><h1>Compliance inspection report: {_e(report.site)}</h1>'
        f'<p><span id="verdict" class="verdict status {verdict[0]}">{_e(verdict[1])}</span></p>{meta}'
        f"<h2>Summary of checks</h2>{checks}"
        f'<h3>What this report could not verify</h3><ul id="unverified">{unverified}</ul></section>'
    )


def _ledger(report: Inspection) -> str:
    out = ['<section id="ledger"><h2>Privacy ledger</h2>']
    data = report.ledger
    if data is None:
        out.append(f'<p class="note">{_e(report.ledger_error or "no ledger")}</p></section>')
        return "".join(out)
    delta = f"{data['delta']:.2e}"
    out.append(
        f"<p>Highest epsilon of any partition <b>{_e(_fmt(data['epsilon_spent']))}</b> of the budget "
        f"<b>{_e(_fmt(data['budget_epsilon']))}</b> (delta {_e(delta)}, accountant "
        f"{_e(data['accountant'])}). Ledger head: entry {_e(data['head'].get('seq'))}, hash "
        f"<code>{_e(data['head'].get('hash'))}</code>, genesis <code>{_e(data['head'].get('genesis'))}</code>.</p>"
    )
    if report.plot_png is not None:
        uri = "data:image/png;base64," + base64.b64encode(report.plot_png).decode("ascii")
        out.append(f'<img id="budget-plot" alt="epsilon spent per partition over the ledger" src="{uri}">')
    out.append("<h3>Partitions</h3>")
    out.append(
        _table(
            ["Label", "Data sha256", "Rounds", "Epsilon", "Remaining", "Status"],
            (
                (
                    p["label"] or "(genesis data)",
                    p["sha256"],
                    p["rounds"],
                    _fmt(p["epsilon"]),
                    _fmt(p["epsilon_remaining"]),
                    p["status"],
                )
                for p in data["partitions"]
            ),
            numeric=(2, 3, 4),
        )
    )
    out.append("<h3>Entries</h3>")
    out.append(
        _table(
            ["#", "Kind", "Time", "Run / label", "Round", "Steps", "q", "sigma", "C", "Epsilon after", "Status"],
            (
                (
                    e["id"],
                    e["kind"],
                    e["ts"],
                    e.get("label") if e["kind"] == "partition" else e.get("run_id"),
                    e.get("round"),
                    e.get("steps"),
                    _fmt(e.get("sample_rate")),
                    _fmt(e.get("noise_multiplier"), 3),
                    e.get("max_grad_norm"),
                    _fmt(e.get("epsilon_after")),
                    e.get("status"),
                )
                for e in data["entries"]
            ),
            numeric=(0, 4, 5, 6, 7, 8, 9),
        )
    )
    out.append("</section>")
    return "".join(out)


def _lineage(report: Inspection) -> str:
    rows = (
        (
            r["version"],
            r.get("release") or "-",
            r["sha256"],
            r.get("parent") or "-",
            r.get("created") or "-",
            r.get("registry") or "-",
            r.get("run") or "-",
            r.get("round") if r.get("round") is not None else "-",
            ", ".join(f"{s['site']} (epsilon {_fmt(s['epsilon'])})" for s in r.get("sites", ())) or "-",
        )
        for r in report.lineage
    )
    table = _table(
        [
            "Version",
            "Release",
            "sha256 (deployed)",
            "Parent",
            "Deployed",
            "Coordinator registry",
            "Run",
            "Round",
            "Trained by (epsilon per site)",
        ],
        rows,
    )
    return (
        f'<section id="lineage"><h2>Model lineage</h2><p>Adapter versions deployed at this site.</p>{table}</section>'
    )


def _audit(report: Inspection) -> str:
    a = report.audit
    facts = _table(
        ["", ""],
        [
            ("Audit log", a.get("path")),
            ("Records", a.get("records")),
            ("First record", a.get("first_ts") or "-"),
            ("Last record", a.get("last_ts") or "-"),
            ("Sealed segments (deleted by retention)", f"{a.get('sealed', 0)} ({a.get('deleted', 0)})"),
            ("Latest local signed checkpoint", a.get("checkpoint") or "none"),
            ("Local verification (hash chain, head, seals)", a.get("local") or "-"),
            ("Verification against the witness", a.get("witnessed") or "not made"),
        ],
    ).replace("<table>", '<table class="meta">', 1)
    actions = _table(["Action", "Records"], sorted(a.get("actions", {}).items()), numeric=(1,))
    recent = _table(
        ["Seq", "Time", "Actor", "Action", "Resource"],
        ((r["seq"], r["ts"], r["actor"], r["action"], r["resource"]) for r in a.get("recent", ())),
        numeric=(0,),
    )
    return (
        f'<section id="audit"><h2>Audit log</h2>{facts}<h3>Records by action</h3>{actions}'
        f"<h3>Latest records</h3>{recent}</section>"
    )


def _policy(report: Inspection) -> str:
    p = report.policy
    if p.get("error"):
        return f'<section id="policy"><h2>Access policy</h2><p class="note">{_e(p["error"])}</p></section>'
    lines = _table(["Kind", "Name", "Role", "Organisation", "Route", "Model", "Effect"], p.get("policies", ()))
    groups = _table(["Certificate name", "Organisation"], p.get("groupings", ()))
    probes = _table(["Probe (a certificate no line lists)", "Route", "Decision"], p.get("probes", ()))
    return (
        f'<section id="policy"><h2>Access policy</h2><p>File <code>{_e(p.get("path"))}</code>, sha256 '
        f"<code>{_e(p.get('sha256'))}</code>. Evaluated by casbin, deny by default: a request is allowed only "
        f"if an allow line matches it and no deny line does.</p><h3>Rules</h3>{lines}"
        f"<h3>Organisation members</h3>{groups}<h3>Probes of the default deny</h3>{probes}</section>"
    )


def _keys(report: Inspection) -> str:
    k = report.keys
    counts = ", ".join(f"{n} {state}" for state, n in sorted(k.get("counts", {}).items())) or "no keys"
    table = _table(
        ["Key id", "Label", "Scopes", "Created", "Expires", "Revoked", "State"],
        (
            (
                r["id"],
                r["label"] or "-",
                " ".join(r["scopes"]),
                r["created"] or "-",
                r["expires"] or "never",
                r["revoked"] or "-",
                r["state"],
            )
            for r in k.get("records", ())
        ),
    )
    bad = k.get("unreadable", 0)
    note = f'<p class="note">{_e(bad)} line(s) of the keys file are not key records.</p>' if bad else ""
    return (
        f'<section id="keys"><h2>API key inventory</h2><p>File <code>{_e(k.get("path"))}</code> (digests '
        f"only, never keys): {_e(counts)}.</p>{note}{table}</section>"
    )


def render(report: Inspection) -> str:
    """The whole HTML document of `report`."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        f"<title>FedSeek compliance inspection: {_e(report.site)} {_e(report.generated)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"{_summary(report)}{_ledger(report)}{_lineage(report)}{_audit(report)}{_policy(report)}{_keys(report)}"
        "</body></html>\n"
    )
