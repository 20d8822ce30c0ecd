"""The main job end to end: `fedseek demo` with 2 hospitals and 1 round, real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from federation.ops.supervise import port_open
from federation.protocol import wire

pytestmark = pytest.mark.e2e


def fedseek(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *args], capture_output=True, text=True, timeout=900, check=check
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], str]:
    out = tmp_path_factory.mktemp("demo")
    proc = fedseek("demo", "--out", str(out), "--sites", "2", "--rounds", "1", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), proc.stdout


def test_report_says_the_consortium_trained_and_served(demo: tuple[Path, dict[str, object], str]) -> None:
    _, report, stdout = demo
    assert report["rounds_completed"] == 1
    assert report["mtls"] is True
    glob = report["global_adapter"]
    assert isinstance(glob, dict)
    arrays = wire.decode(Path(glob["path"]).read_bytes())
    assert wire.sha256_of(arrays) == glob["sha256"]
    assert {s["site"] for s in glob["lineage"]} == {"hospital-a", "hospital-b"}
    assert report["served_model"] == [glob["version"], glob["version"]]
    sites = report["sites"]
    assert isinstance(sites, list) and len(sites) == 2
    n_train = report["training"]["train_records_per_site"]  # type: ignore[index]
    for site in sites:
        assert 0 < site["epsilon"] <= 0.5 + 1e-6  # the run's share (RunSettings.budget_share) of a budget of 1
        assert 0 < site["delta"] < 1 / n_train  # below 1/n for the training records of each site
        assert [e["round"] for e in site["ledger"]] == [1]
        assert site["ledger"][0]["accountant"] == "rdp" and site["ledger"][0]["noise_multiplier"] > 0
        assert site["audit_verified"] is True and site["audit_records"] >= 3  # train, deploy, serve
        # One DP round at the demo's size (160 records, fresh noise each run: node/trainer.py draws its seed)
        # moves the eval loss by about 1e-4 either way (0.57359 -> 0.57363 seen on 2026-12-06), so "it learned"
        # is no per-run fact here; what holds every run is that the global adapter is finite and no worse
        # beyond that noise. Learning under DP is measured at scale in bench/usefulness.py.
        assert site["eval_loss_after"] < site["eval_loss_before"] + 0.005
    assert "round 1 done" in stdout  # progress is shown as it goes


def test_the_model_answers_and_the_dp_rounds_teach_it(demo: tuple[Path, dict[str, object], str]) -> None:
    """Issue 18: pretrained on public text the model answers; the DP round teaches what only the sites know.

    Exact match on each site's 60 held-out notes, base vs global adapter. The nodes draw fresh DP noise
    each run, so each site is held to issue 18's bar (no worse, above zero) and the learning to the mean:
    five runs of these settings gained 0.27-0.45 a site and 0.32-0.41 on average (examples/demo/README.md),
    the 0.1 asserted under a third of the lowest; the base before this work gained 0.00 at both sites.
    """
    _, report, stdout = demo
    sites = report["sites"]
    assert isinstance(sites, list)
    for site in sites:
        assert isinstance(site["answer"], str) and site["answer"].strip(), site  # through the site's OpenAI API
        assert 0 < site["accuracy_after"] <= 1
        assert site["accuracy_after"] >= site["accuracy_before"], site
    before = sum(s["accuracy_before"] for s in sites) / len(sites)
    after = sum(s["accuracy_after"] for s in sites) / len(sites)
    assert after >= before + 0.1, (before, after)  # 6 more right answers in 60 a site, on average
    assert "pretrained on" in stdout and "public" in stdout


def test_explanation_report_written(demo: tuple[Path, dict[str, object], str]) -> None:
    _, report, _ = demo
    expl = report["explanation"]
    assert isinstance(expl, dict)
    html = Path(expl["html"]).read_text()
    assert "<html" in html.lower() and report["global_adapter"]["version"] in html  # type: ignore[index]
    assert len(expl["top_tokens"]) >= 1
    assert expl["response_source"] == "generated"  # the model's own answer, not a supplied one
    assert isinstance(expl["response"], str) and expl["response"].strip()


def test_every_process_stopped(demo: tuple[Path, dict[str, object], str]) -> None:
    _, report, _ = demo
    endpoints = report["endpoints"]
    assert isinstance(endpoints, dict)
    host, port = str(endpoints["coordinator_fleet"]).rsplit(":", 1)
    assert not port_open(host, int(port))
    for node in endpoints["nodes"]:
        h, p = node["openai"].removeprefix("https://").rsplit(":", 1)
        assert not port_open(h, int(p))


def test_audit_verify_cli_detects_tampering(demo: tuple[Path, dict[str, object], str], tmp_path: Path) -> None:
    _, report, _ = demo
    log = Path(report["sites"][0]["audit_log"])  # type: ignore[index]
    ok = fedseek("audit", "verify", str(log))
    assert ok.returncode == 0 and "OK" in ok.stdout
    copy = tmp_path / "audit.jsonl"
    copy.write_text(log.read_text().replace('"action":"serve"', '"action":"SERVE"'))
    (tmp_path / "audit.jsonl.head").write_text(Path(str(log) + ".head").read_text())
    bad = fedseek("audit", "verify", str(copy), check=False)
    assert bad.returncode == 1 and "hash mismatch" in bad.stderr


def test_budget_cli_shows_ledger(demo: tuple[Path, dict[str, object], str]) -> None:
    out, report, _ = demo
    state = out / "sites" / "hospital-a" / "state"
    res = fedseek("budget", "--state", str(state), "--json")
    data = json.loads(res.stdout)
    assert data["epsilon_spent"] == pytest.approx(report["sites"][0]["epsilon"])  # type: ignore[index]
    assert data["budget_epsilon"] == 1.0 and len(data["entries"]) == 1
