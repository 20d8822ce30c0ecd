"""`fedseek compliance report` (issue 16): one HTML document with every check an inspector needs.

A real site state (tests/federation/cli/compliance_site.py: ledger, signed audit log, witness,
registry, deployed adapter, policy, keys) is inspected through `fedseek`'s own `main`; each attack
an insider could make on the site's disk is made on a copy, and the report must say which check
failed, exit 1, and still be written. The checks' outcomes are read back from the HTML
(`data-check`/`data-status` of the summary rows), as an inspector's tooling would.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from federation.cli.main import main
from privacy.audit import canonical_json, head_path, sha256_hex
from privacy.checkpoints import tree_path
from tests.federation.cli.compliance_site import MARK, SITE, Site, build_site, copy_site, restore, sha256_file
from tests.privacy.insider import rechain

CHECKS = [
    "ledger.audit",
    "ledger.witnessed",
    "audit.chain",
    "audit.witnessed",
    "ledger.budget",
    "lineage",
    "policy",
    "keys",
]


class _Page(HTMLParser):
    """What the tests read back: the summary rows' checks, every tag, every attribute value, the text."""

    def __init__(self) -> None:
        super().__init__()
        self.checks: dict[str, str] = {}
        self.details: dict[str, str] = {}
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.text: list[str] = []
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend((k, v or "") for k, v in attrs)
        got = dict(attrs)
        if tag == "tr" and got.get("data-check"):
            self._row = str(got["data-check"])
            self.checks[self._row] = str(got["data-status"])
            self.details[self._row] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row is not None:
            self.details[self._row] += data


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build_site(tmp_path_factory.mktemp("compliance"))


@pytest.fixture
def site(built: Site, tmp_path: Path) -> Site:
    return copy_site(built, tmp_path / "copy")


def _report(site: Site, out: Path, *extra: str, witness: bool = True) -> tuple[int, _Page, str]:
    args = ["compliance", "report", "--site", str(site.state), "--out", str(out), *extra]
    if witness:
        args += ["--witness", str(site.coord), "--site-keys", str(site.site_keys)]
    code = main(args)
    text = out.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return code, page, text


def test_an_untouched_site_passes_every_check(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _files(site.state.parent)
    code, page, _ = _report(site, tmp_path / "r.html")
    assert code == 0, capsys.readouterr().out
    assert _files(site.state.parent) == before  # site and coordinator state only read, never written
    assert page.checks == dict.fromkeys(CHECKS, "pass")
    assert capsys.readouterr().out.strip().endswith("all checks passed; written to " + str(tmp_path / "r.html"))
    shown = " ".join(page.text)
    assert f"Compliance inspection report: {SITE}" in shown and "ALL CHECKS PASSED" in shown
    assert "nothing: every check was made" in shown
    assert "signatures checked" in page.details["audit.witnessed"]
    assert "1 active, 1 expired, 1 revoked" in page.details["keys"]
    assert "30 probes all denied" in page.details["policy"]
    # lineage: the deployed version, its release state, the registry's run and the site's epsilon
    assert site.version in shown and "same sha256" in shown and "stable" in shown and f"{SITE} (epsilon 0.1" in shown
    # the ledger's plot, inline, a real PNG
    (uri,) = [v for k, v in page.attrs if k == "src"]
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_text_is_escaped_and_nothing_is_loaded(site: Site, tmp_path: Path) -> None:
    _, page, text = _report(site, tmp_path / "r.html")
    assert "script" not in page.tags  # the label, audit actor and key label show as text, never run
    assert "<script" not in text.lower()
    assert text.count("&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;") >= 3  # partition, actor, key
    assert sum(MARK in t for t in page.text) >= 3
    # self-contained: no link, no remote source; the CSP forbids loading anything but inline styles and data:
    assert not [v for k, v in page.attrs if k in ("href", "src") and not v.startswith("data:")]
    assert "link" not in page.tags and "@import" not in text and "url(" not in text
    (csp,) = [v for k, v in page.attrs if k == "content" and "default-src" in v]
    assert "default-src 'none'" in csp and "img-src data:" in csp


def test_without_a_witness_the_witnessed_checks_are_not_verified(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, page, _ = _report(site, tmp_path / "r.html", witness=False)
    assert code == 1
    assert {k for k, v in page.checks.items() if v != "pass"} == {"ledger.witnessed", "audit.witnessed", "lineage"}
    assert set(page.checks.values()) == {"pass", "not verified"}
    shown = " ".join(page.text)
    assert "INCOMPLETE" in shown and "no coordinator state given (--witness)" in shown
    assert "NOT VERIFIED: Privacy ledger extends the head" in capsys.readouterr().out


def test_a_rewritten_audit_history_fails_the_witnessed_audit_check(site: Site, tmp_path: Path) -> None:
    """The insider edits a record, re-chains every hash and resets the head: the local chain still verifies."""
    log = site.layout.audit
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    records[-1]["actor"] = "nobody"
    prev, lines = records[0]["prev_hash"], []
    for record in records:
        content = {**{k: v for k, v in record.items() if k != "hash"}, "prev_hash": prev}
        prev = sha256_hex(canonical_json(content))
        lines.append(canonical_json({**content, "hash": prev}) + "\n")
    log.write_text("".join(lines), encoding="utf-8")
    head_path(log).write_text(canonical_json({"seq": len(records), "hash": prev}), encoding="utf-8")
    tree_path(log).unlink(missing_ok=True)

    code, page, _ = _report(site, tmp_path / "r.html")
    assert code == 1
    assert page.checks["audit.chain"] == "pass"  # fooled, as the issue says the local check alone is
    assert page.checks["audit.witnessed"] == "fail"
    assert "FAILED:" in page.details["audit.witnessed"]
    assert page.checks["ledger.witnessed"] == "pass"


def test_a_tampered_audit_line_fails_the_local_check(site: Site, tmp_path: Path) -> None:
    log = site.layout.audit
    text = log.read_text(encoding="utf-8")
    log.write_text(text.replace('"action":"serve"', '"action":"other"'), encoding="utf-8")
    code, page, _ = _report(site, tmp_path / "r.html")
    assert code == 1 and (tmp_path / "r.html").exists()
    assert page.checks["audit.chain"] == "fail" and page.checks["audit.witnessed"] == "fail"
    assert "TAMPERED:" in page.details["audit.chain"]
    assert "CHECKS FAILED" in " ".join(page.text)


def test_a_rolled_back_site_fails_both_witnessed_checks(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ledger and audit trail restored together from the copy after round 1: they agree with each other."""
    restore(site.snapshot, site.state)
    code, page, _ = _report(site, tmp_path / "r.html")
    assert code == 1
    assert page.checks["ledger.audit"] == "pass" and page.checks["audit.chain"] == "pass"
    assert page.checks["ledger.witnessed"] == "fail" and page.checks["audit.witnessed"] == "fail"
    assert "ledger rolled back" in page.details["ledger.witnessed"]
    out = capsys.readouterr().out
    assert "FAIL: Privacy ledger extends the head the coordinator witnessed: site-a: ledger rolled back" in out


def test_a_rechained_ledger_over_budget_fails_the_budget_and_audit_checks(site: Site, tmp_path: Path) -> None:
    """Less noise written into every round: epsilon recomputed from the entries exceeds the budget."""
    rechain(site.layout.ledger, entries={1: {"noise_multiplier": 0.3}, 3: {"noise_multiplier": 0.3}})
    code, page, _ = _report(site, tmp_path / "r.html")
    assert code == 1
    assert page.checks["ledger.budget"] == "fail" and "over the budget 1" in page.details["ledger.budget"]
    assert page.checks["ledger.audit"] == "fail" and page.checks["ledger.witnessed"] == "fail"


def test_a_policy_open_to_any_organisation_fails(site: Site, tmp_path: Path) -> None:
    policy = site.layout.access_policy
    policy.write_text(policy.read_text(encoding="utf-8") + "p, cert, *, *, *, chat, *, allow\n", encoding="utf-8")
    code, page, _ = _report(site, tmp_path / "r.html")
    assert code == 1 and page.checks["policy"] == "fail"
    assert "node on chat" in page.details["policy"] and "reviewer on chat" in page.details["policy"]
    assert "ALLOWED" in page.text

    policy.write_text("p, cert, *\n", encoding="utf-8")  # malformed: the node keeps its last policy; here a fail
    _, page, _ = _report(site, tmp_path / "r.html")
    assert page.checks["policy"] == "fail"


def test_a_deployed_adapter_not_in_the_registry_fails_lineage(site: Site, tmp_path: Path) -> None:
    meta = site.layout.adapters / site.version / "adapter.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "sha256": "f" * 64}))
    code, page, text = _report(site, tmp_path / "r.html")
    assert code == 1 and page.checks["lineage"] == "fail"
    assert f"{site.version}: deployed sha256 ffffffffffff" in page.details["lineage"]
    assert "DIFFERENT sha256" in text


def test_bad_input_exits_2_and_writes_nothing(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert main(["compliance", "report", "--site", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no site state directory" in capsys.readouterr().err
    args = ["compliance", "report", "--site", str(site.state), "--witness", str(tmp_path / "no-coord"), "--out"]
    assert main([*args, str(out)]) == 2
    assert "no coordinator state" in capsys.readouterr().err
    assert not out.exists()
