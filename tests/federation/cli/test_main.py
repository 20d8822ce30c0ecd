"""The `fedseek` CLI root: argument wiring and one-line errors (in-process, real files)."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from federation.cli import main as cli_main
from federation.cli.main import main
from federation.errors import KINDS, FedSeekError, Forbidden, InvalidInput, Unavailable
from federation.ops.layout import NodeLayout
from federation.security import pki
from tests.federation.cli.ca_files import ca_files


def _pass_file(tmp_path: Path, secret: str = "cli test passphrase, not the env one") -> str:
    path = tmp_path / "ca-pass"
    path.write_text(secret + "\n")
    return str(path)


def test_ca_init_issue_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pki"
    pw = ["--passphrase-file", _pass_file(tmp_path)]
    assert main(["ca", "init", "--pki", str(root), "--consortium", "acme", *pw]) == 0
    assert (
        main(["ca", "issue", "coordinator", "--pki", str(root), "--role", "coordinator", "--host", "fl.acme.org", *pw])
        == 0
    )
    assert main(["ca", "issue", "site-x", "--pki", str(root), "--role", "node", *pw]) == 0
    ident = pki.verify_leaf(root / "coordinator" / "cert.pem", root / "ca" / "ca.pem")
    # the coordinator always also answers on loopback, where SuperNodes reach it through their sidecar
    assert {"fl.acme.org", "localhost", "127.0.0.1"} <= set(ident.hosts)
    assert (root / "site-keys" / "site-x.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    capsys.readouterr()
    assert main(["ca", "list", "--pki", str(root)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in listed] == [
        ["coordinator", "coordinator", "valid"],
        ["site-x", "node", "valid"],
    ]
    # The file's passphrase, not the environment's, encrypted the key.
    assert main(["ca", "issue", "site-y", "--pki", str(root), "--role", "node"]) == 2
    assert "wrong passphrase" in capsys.readouterr().err


def test_ca_renew_revoke_crl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pki"
    pw = ["--passphrase-file", _pass_file(tmp_path)]
    assert main(["ca", "init", "--pki", str(root), *pw]) == 0
    for name in ("site-x", "site-y"):
        assert main(["ca", "issue", name, "--pki", str(root), "--role", "node", "--days", "7", *pw]) == 0
    old = pki.read_identity(root / "site-x" / "cert.pem")
    flower_key = (root / "site-x" / "supernode_auth.key").read_bytes()
    capsys.readouterr()

    assert main(["ca", "renew", "site-x", "--pki", str(root), *pw]) == 0
    new = pki.read_identity(root / "site-x" / "cert.pem")
    assert f"serial {new.serial:x}" in capsys.readouterr().out
    assert new.serial != old.serial and new.not_after - new.not_before > timedelta(days=29)
    assert (root / "site-x" / "supernode_auth.key").read_bytes() == flower_key

    assert main(["ca", "revoke", "site-x", "--pki", str(root), "--serial", f"{old.serial:x}", *pw]) == 0
    assert main(["ca", "revoke", "site-y", "--pki", str(root), "--reason", "key-compromise", *pw]) == 0
    out = capsys.readouterr().out
    assert f"serial {old.serial:x}" in out and "CRL published to every party" in out
    crl = pki.load_crl(root / "site-x" / "crl.pem")
    assert crl.get_revoked_certificate_by_serial_number(old.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(new.serial) is None

    assert main(["ca", "crl", "--pki", str(root), "--days", "2", *pw]) == 0
    assert capsys.readouterr().out.strip() == str(root / "ca" / "crl.pem")
    assert (root / "site-y" / "crl.pem").read_bytes() == (root / "ca" / "crl.pem").read_bytes()

    assert main(["ca", "list", "--pki", str(root)]) == 0
    status = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()}
    assert status == {"site-x": "valid", "site-y": "revoked"}


def test_ca_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pki"
    pw = ["--passphrase-file", _pass_file(tmp_path)]
    assert main(["ca", "init", "--pki", str(root), *pw]) == 0
    assert main(["ca", "issue", "site-x", "--pki", str(root), "--role", "node", *pw]) == 0
    capsys.readouterr()
    before = ca_files(root)
    wrong = tmp_path / "wrong"
    wrong.write_text("a wrong passphrase\n")
    (tmp_path / "bad-crl.pem").write_text("junk")
    cases = [
        (["ca", "issue", "site-y", "--role", "node", "--passphrase-file", str(wrong)], "wrong passphrase"),
        (["ca", "renew", "site-x", "--passphrase-file", str(wrong)], "wrong passphrase"),
        (["ca", "revoke", "site-x", "--passphrase-file", str(wrong)], "wrong passphrase"),
        (["ca", "crl", "--passphrase-file", str(wrong)], "wrong passphrase"),
        (["ca", "crl", "--passphrase-file", str(tmp_path / "nope")], "passphrase file not found"),
        (["ca", "renew", "ghost", *pw], "no complete certificate for 'ghost'"),
        (["ca", "revoke", "ghost", *pw], "no certificate was issued to 'ghost'"),
        (["ca", "issue", "site-y", "--role", "node", "--days", "400", *pw], "at most 90 days"),
        (["ca", "init", *pw], "already exists"),
    ]
    errors = []
    for argv, message in cases:
        assert main([*argv, "--pki", str(root)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedseek: error:") and message in err[0], (argv, err)
        errors.append(err[0].removeprefix("fedseek: error: "))
    monkeypatch.delenv(pki.PASSPHRASE_ENV)
    assert main(["ca", "crl", "--pki", str(root)]) == 2
    assert "--passphrase-file FILE or set FEDSEEK_CA_PASSPHRASE" in capsys.readouterr().err
    assert ca_files(root) == before
    trail = (root / "ca-audit" / "audit.jsonl").read_text().splitlines()
    refused = [json.loads(line) for line in trail if '"ca.refused"' in line]
    assert [r["details"]["error"] for r in refused][: len(errors)] == errors and len(refused) == len(errors) + 1
    # The secret is never an argument (it would show in `ps`), not even by abbreviation.
    with pytest.raises(SystemExit):
        main(["ca", "crl", "--pki", str(root), "--passphrase", "hunter2-hunter2"])
    assert "unrecognized arguments: --passphrase" in capsys.readouterr().err


def test_user_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pki"
    assert main(["ca", "issue", "site-x", "--pki", str(root), "--role", "node"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedseek: error:")
    assert main(["node", "start", "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["budget", "--state", str(tmp_path)]) == 2
    assert "no privacy ledger" in capsys.readouterr().err


@pytest.mark.parametrize("kind", [FedSeekError, *KINDS], ids=lambda kind: kind.__name__)
def test_any_fedseek_error_in_a_handler_is_one_line_and_its_exit_code(
    kind: type[FedSeekError], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(args: argparse.Namespace) -> int:
        raise kind("what went wrong\nTraceback-like detail that belongs in a log, not on the terminal")

    monkeypatch.setattr(cli_main, "_model_tiny", handler)
    assert main(["model", "tiny", "--out", str(tmp_path)]) == kind.exit_code == 2
    printed = capsys.readouterr()
    assert printed.err == "fedseek: error: what went wrong\n" and printed.out == ""


def test_an_error_without_a_message_is_named_and_other_exceptions_propagate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raised: list[BaseException] = [Unavailable(), RuntimeError("a bug keeps its traceback"), KeyboardInterrupt()]

    def handler(args: argparse.Namespace) -> int:
        raise raised.pop(0)

    monkeypatch.setattr(cli_main, "_model_tiny", handler)
    argv = ["model", "tiny", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err == "fedseek: error: Unavailable\n"
    with pytest.raises(RuntimeError, match="a bug keeps its traceback"):
        main(argv)
    assert main(argv) == 130


EXPLAIN = ["explain", "--node", "https://localhost:1", "--cert", "cert.pem", "--key", "key.pem"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["coordinator", "start"], "give --config FILE, or --pki and --state"),
        (["serve", "--model", ".", "--cert", "cert.pem"], "give both --cert and --key for TLS, or neither"),
        (["serve", "--model", ".", "--adapter", "no-equals-sign"], "--adapter wants NAME=DIR"),
        (["serve", "--model", ".", "--adapter", "../x=dir"], "invalid --adapter name '../x'"),  # finding 4
        (["serve", "--model", ".", "--adapter", "site_local=dir"], "--adapter name 'site_local' is reserved"),
        (
            ["serve", "--model", "m/Qwen2-Tiny", "--adapter", "qwen2-tiny=dir"],
            "--adapter name 'qwen2-tiny' is reserved",
        ),
        ([*EXPLAIN, "--ca", "missing-ca.pem", "--prompt", "hi"], "cannot load CA certificate missing-ca.pem"),
        ([*EXPLAIN, "--ca", "ca.pem", "--messages-file", "missing.json"], "cannot read messages from missing.json"),
    ],
    ids=[
        "coordinator-start",
        "serve-tls",
        "serve-adapter",
        "serve-adapter-path",
        "serve-adapter-reserved",
        "serve-adapter-base-name",
        "explain-ca",
        "explain-messages",
    ],
)
def test_each_command_refuses_bad_input_in_one_line(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedseek: error: {message}")
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_a_node_refusal_is_raised_as_its_kind_with_its_code() -> None:
    body = {"error": {"message": "role 'node' may not call this route", "type": "permission_error", "code": "role"}}
    with pytest.raises(Forbidden, match="node answered 403: role 'node' may not") as info:
        cli_main._node_json(httpx.Response(403, json=body))
    assert info.value.code == "role"
    with pytest.raises(FedSeekError, match="node answered 502: bad gateway") as other:
        cli_main._node_json(httpx.Response(502, text="bad gateway"))
    assert type(other.value) is FedSeekError and other.value.code is None
    with pytest.raises(InvalidInput, match="node answered 400"):
        cli_main._node_json(httpx.Response(400, json={"error": {"message": "bad", "code": None}}))
    assert cli_main._node_json(httpx.Response(200, json={"id": "x"})) == {"id": "x"}


def test_audit_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from privacy.audit import AuditTrail

    log = tmp_path / "audit.jsonl"
    trail = AuditTrail(log)
    for i in range(3):
        trail.append(actor="app", action="serve", resource=f"v{i}")
    assert main(["audit", "verify", str(log)]) == 0
    assert "OK: 3 records" in capsys.readouterr().out
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[2]]) + "\n")  # delete the middle record
    assert main(["audit", "verify", str(log)]) == 1
    assert "TAMPERED" in capsys.readouterr().err


def _ledger_with_rounds(state: Path) -> None:
    from privacy.ledger import Budget, PrivacyLedger

    ledger = PrivacyLedger(NodeLayout(state).ledger, budget=Budget(epsilon=1.0, delta=1e-4))
    for r in range(2):
        plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=2 - r)
        ledger.complete(ledger.charge(run_id="run-1", round=r, plan=plan, max_grad_norm=1.0).id, steps=1)


def test_budget_json_text_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib
    import json

    _ledger_with_rounds(tmp_path)
    before = hashlib.sha256(NodeLayout(tmp_path).ledger.read_bytes()).hexdigest()
    assert main(["budget", "--state", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget_epsilon"] == 1.0 and data["delta"] == 1e-4 and len(data["entries"]) == 2
    assert data["epsilon_spent"] == data["entries"][-1]["epsilon_after"] <= 1.0
    assert main(["budget", "--state", str(tmp_path), "--plot", str(tmp_path / "budget.png")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("epsilon spent ") and text.count("run run-1 round") == 2
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    assert hashlib.sha256(NodeLayout(tmp_path).ledger.read_bytes()).hexdigest() == before  # read-only


def test_budget_of_damaged_ledger_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _ledger_with_rounds(tmp_path)
    path = NodeLayout(tmp_path).ledger
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["budget", "--state", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedseek: error:")


def test_budget_shows_why_training_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14 findings 1-2: a deleted or re-chained ledger no longer reads as an unspent budget."""
    import json
    import sqlite3

    from privacy.audit import AuditTrail
    from privacy.ledger import Budget, PrivacyLedger

    layout = NodeLayout(tmp_path)
    ledger = PrivacyLedger(layout.ledger, budget=Budget(epsilon=1.0, delta=1e-4), audit=AuditTrail(layout.audit))
    for r in range(2):
        plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=2 - r)
        ledger.complete(ledger.charge(run_id="run-1", round=r, plan=plan, max_grad_norm=1.0).id, steps=1)
    spent = ledger.spent()
    assert main(["budget", "--state", str(tmp_path)]) == 0  # the honest ledger
    assert "REFUSED" not in capsys.readouterr().out
    conn = sqlite3.connect(layout.ledger)  # the last row deleted and the head reset to the one before
    first = conn.execute("SELECT hash FROM entries WHERE id = 1").fetchone()[0]
    conn.execute("DELETE FROM entries WHERE id = 2")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (json.dumps({"id": 1, "hash": first}),))
    conn.commit()
    conn.close()
    assert main(["budget", "--state", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("TRAINING REFUSED: ledger entries missing: the audit trail records 2 training rounds")
    assert main(["budget", "--state", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["training_refused"].startswith("ledger entries missing")
    layout.ledger.unlink()
    assert main(["budget", "--state", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedseek: error: ledger missing: the audit trail records 2 training rounds spending epsilon {spent:.4f}; "
        "refusing to train"
    ]


def test_privacy_audit_rejects_too_few_canaries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["privacy", "audit", "--model", str(tmp_path), "--canaries", "3"])
    assert info.value.code == 2
    assert "at least 4 canaries" in capsys.readouterr().err


def test_privacy_audit_reports_dp_next_to_baseline(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Wiring only (one tiny step each); tests/node/test_canary_audit.py checks what it measures."""
    import json

    out = tmp_path / "audit.json"
    argv = ["privacy", "audit", "--model", str(tiny_model_dir), "--canaries", "4", "--epochs", "1"]
    assert main([*argv, "--batch-size", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dp     claimed epsilon     1  AUC ")
    assert lines[1].startswith("no_dp  claimed epsilon  none  AUC ")
    report = json.loads(out.read_text())
    assert report["canaries"] == 4 and report["site_records"] == 0
    assert report["runs"]["dp"]["claimed_epsilon"] == 1.0 and report["runs"]["no_dp"]["claimed_epsilon"] is None
    assert all(run["members"] == run["nonmembers"] == 2 for run in report["runs"].values())


def test_ca_list_with_a_wrong_pki_dir_is_an_error_not_an_empty_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "list", "--pki", str(tmp_path / "typo")]) == 2
    assert "no consortium CA in" in capsys.readouterr().err


def test_version_names_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fedseek {version('fedseek')}"


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """`fedseek budget --json | head`: a closed pipe is the reader's choice, not a traceback.

    The command's output is made long (1 MB, far past the pipe's buffer) by swapping in a handler
    that prints it, so the write into the closed pipe really happens; main() is the real one."""
    import subprocess
    import sys

    script = (
        "import sys, federation.cli.ca as ca, federation.cli.main as m\n"
        "ca._list = lambda args: [print('x' * 99) for _ in range(10_000)] and 0\n"
        "sys.exit(m.main(['ca', 'list', '--pki', 'unused']))\n"
    )
    proc = subprocess.run(
        f'{sys.executable} -c "$SCRIPT" | head -n 1; echo "exit ${{PIPESTATUS[0]}}"',
        shell=True,
        executable="/bin/bash",
        env={**__import__("os").environ, "SCRIPT": script},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.splitlines() == ["x" * 99, "exit 0"], proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
