"""`fedseek node start` refuses bad inputs before touching anything: certificate, audit, ledger, model.

`node.agent.preflight` checks what needs no model; `node.build.build_node` refuses a model or
dataset it cannot read.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from federation.ops.layout import NodeLayout
from federation.protocol.config import NodeConfig
from federation.security import pki
from federation.security.signed_statement import load_private_key
from node.agent import preflight
from node.build import NodeStartError, build_node, site_budget
from node.witness_statements import node_key_path
from privacy.audit import AuditTrail, verify
from privacy.checkpoints import parse_checkpoint
from privacy.ledger import BudgetExceeded, PrivacyLedger, RoundPlan, compose_epsilon


def make_config(
    tmp_path: Path, *, name: str, pki_dir: Path, model_dir: Path, data_dir: Path, **kw: object
) -> NodeConfig:
    return NodeConfig(
        name=name,
        model_dir=str(model_dir),
        data_dir=str(data_dir),
        state_dir=str(tmp_path / "state"),
        pki_dir=str(pki_dir),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def config(tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path) -> NodeConfig:
    return make_config(tmp_path, name="site-a", pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir)


def refused(config: NodeConfig) -> str:
    with pytest.raises(NodeStartError) as info:
        preflight(config)
    message = str(info.value)
    assert message.strip() and "\n" not in message
    return message


def state(config: NodeConfig) -> NodeLayout:
    return NodeLayout(Path(config.state_dir))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def n_train(config: NodeConfig) -> int:
    return sum(1 for line in (Path(config.data_dir) / "train.jsonl").read_text().splitlines() if line.strip())


def test_good_config_passes(config: NodeConfig, pki_dir: Path) -> None:
    leaf = preflight(config)
    assert leaf.name == "site-a" and leaf.role == "node"
    assert leaf.cert == pki_dir / "site-a" / "cert.pem"


def test_a_first_start_signs_its_audit_trail_from_the_first_record(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path
) -> None:
    """A certificate issued without the site's node key (`pki.issue`): the start makes the key before the
    audit trail opens, so the first records are in a signed checkpoint (they were left unsigned until
    the next start, which noted them as `audit.unsigned_tail`)."""
    fresh = tmp_path / "pki"
    shutil.copytree(pki_dir, fresh)
    for name in ("supernode_auth.key", "supernode_auth.pub"):
        (fresh / "site-a" / name).unlink(missing_ok=True)
    config = make_config(tmp_path, name="site-a", pki_dir=fresh, model_dir=tiny_model_dir, data_dir=site_data_dir)
    preflight(config)
    service = build_node(config)
    size = service.audit.head()[0]
    assert size > 0  # the ledger's genesis and the data minimisation, at least
    statement = service.audit.checkpoint() or service.audit.latest_checkpoint()
    key = load_private_key(node_key_path(fresh, "site-a")).public_key()
    assert parse_checkpoint(statement, key=key).size == size  # signed with the key the start made


# ---- certificates ------------------------------------------------------------------------


@pytest.mark.parametrize("consortium", ["fedseek-test", "other-consortium"])
def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path, consortium: str
) -> None:
    other = tmp_path / "other-pki"
    pki.init_ca(other, consortium=consortium)
    pki.issue(other, "site-a", role="node")
    layout = tmp_path / "pki"
    (layout / "site-a").mkdir(parents=True)
    shutil.copy2(other / "site-a" / "cert.pem", layout / "site-a" / "cert.pem")
    shutil.copy2(other / "site-a" / "key.pem", layout / "site-a" / "key.pem")
    shutil.copy2(pki_dir / "site-a" / "ca.pem", layout / "site-a" / "ca.pem")  # the consortium's CA
    config = make_config(tmp_path, name="site-a", pki_dir=layout, model_dir=tiny_model_dir, data_dir=site_data_dir)
    message = refused(config)
    assert message.startswith("certificate check failed:")
    assert "consortium" in message
    assert not Path(config.state_dir).exists()  # refused before the state dir is touched


def test_missing_certificate_is_refused(tmp_path: Path, tiny_model_dir: Path, site_data_dir: Path) -> None:
    config = make_config(
        tmp_path, name="site-a", pki_dir=tmp_path / "empty-pki", model_dir=tiny_model_dir, data_dir=site_data_dir
    )
    message = refused(config)
    assert "certificate check failed" in message and "site-a" in message


@pytest.mark.parametrize("name", ["coordinator", "reviewer"])
def test_non_node_certificate_is_refused(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path, name: str
) -> None:
    config = make_config(tmp_path, name=name, pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir)
    message = refused(config)
    assert f"role {name!r}" in message
    assert "'node'" in message
    assert not Path(config.state_dir).exists()


# ---- audit trail -------------------------------------------------------------------------


def _audit_with_two_records(config: NodeConfig) -> Path:
    path = state(config).audit
    trail = AuditTrail(path)
    trail.append(actor="operator-1", action="serve", resource="m", details={"n": 1})
    trail.append(actor="operator-1", action="serve", resource="m", details={"n": 2})
    assert verify(path).ok
    return path


def _flip_one_byte(path: Path, *, line: int) -> None:
    data = bytearray(path.read_bytes())
    start = sum(len(x) + 1 for x in data.split(b"\n")[:line])
    offset = data.index(b"operator-1", start) + len("operator-")
    data[offset] = ord("2")  # still valid JSON: only the content, hence the hash, is wrong
    path.write_bytes(bytes(data))


def test_tampered_last_audit_record_is_refused(config: NodeConfig) -> None:
    path = _audit_with_two_records(config)
    _flip_one_byte(path, line=1)
    assert not verify(path).ok
    before = path.read_bytes()
    message = refused(config)
    assert "audit trail" in message and "integrity" in message
    assert path.read_bytes() == before


def test_tampered_earlier_audit_record_is_refused(config: NodeConfig) -> None:
    path = _audit_with_two_records(config)
    _flip_one_byte(path, line=0)
    assert not verify(path).ok
    before = path.read_bytes()
    message = refused(config)
    assert "audit trail" in message
    assert path.read_bytes() == before


def test_truncated_audit_trail_is_refused(config: NodeConfig) -> None:
    path = _audit_with_two_records(config)
    first_line = path.read_bytes().split(b"\n")[0] + b"\n"
    path.write_bytes(first_line)
    message = refused(config)
    assert "audit trail" in message
    assert path.read_bytes() == first_line


# ---- privacy ledger ----------------------------------------------------------------------


def _exhaust(config: NodeConfig) -> PrivacyLedger:
    """Charge rounds (sample rate 1, one step) until the site's lifetime epsilon is spent."""
    budget = site_budget(config, n_train(config))
    ledger = PrivacyLedger(state(config).ledger, budget=budget)
    plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=2)
    ledger.complete(ledger.charge(run_id="r", round=1, plan=plan, max_grad_norm=1.0).id, steps=1)
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries()]
    low, high = 0.3, 50.0  # least noise that still fits: lands on the budget to within float precision
    for _ in range(80):
        mid = (low + high) / 2
        if compose_epsilon([*history, (mid, 1.0, 1)], budget=budget) <= budget.epsilon:
            high = mid
        else:
            low = mid
    eps = compose_epsilon([*history, (high, 1.0, 1)], budget=budget)
    last = RoundPlan(noise_multiplier=high, sample_rate=1.0, steps=1, epsilon_after=eps)
    ledger.complete(ledger.charge(run_id="r", round=2, plan=last, max_grad_norm=1.0).id, steps=1)
    assert ledger.spent() >= budget.epsilon - 1e-6
    with pytest.raises(BudgetExceeded):
        ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=1)
    return ledger


def test_exhausted_budget_does_not_stop_the_start_and_ledger_untouched(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14, finding 3: serving never depends on the training budget (the ledger refuses rounds)."""
    ledger = _exhaust(config)
    path = state(config).ledger
    entries, before = ledger.entries(), digest(path)
    with caplog.at_level("WARNING", logger="fedseek.node"):
        assert preflight(config).role == "node"
    assert "privacy budget spent" in caplog.text and "training rounds are refused" in caplog.text
    assert digest(path) == before
    assert ledger.entries() == entries


def test_partly_spent_budget_passes(config: NodeConfig) -> None:
    ledger = PrivacyLedger(state(config).ledger, budget=site_budget(config, n_train(config)))
    plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=2)
    ledger.charge(run_id="r", round=1, plan=plan, max_grad_norm=1.0)
    assert preflight(config).role == "node"


def test_edited_ledger_is_refused(config: NodeConfig) -> None:
    ledger = PrivacyLedger(state(config).ledger, budget=site_budget(config, n_train(config)))
    plan = ledger.plan_round(sample_rate=1.0, steps=1, rounds_left=2)
    ledger.charge(run_id="r", round=1, plan=plan, max_grad_norm=1.0)
    path = state(config).ledger
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE entries SET noise_multiplier = 100.0")
    conn.close()
    before = digest(path)
    message = refused(config)
    assert message.startswith("privacy ledger refused:")
    assert "hash chain" in message
    assert digest(path) == before


def test_loosened_budget_is_refused(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, site_data_dir: Path, config: NodeConfig
) -> None:
    PrivacyLedger(state(config).ledger, budget=site_budget(config, n_train(config)))
    looser = make_config(
        tmp_path, name="site-a", pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=site_data_dir, epsilon=8.0
    )
    message = refused(looser)
    assert "privacy ledger refused" in message and "looser" in message


def test_ledger_without_training_data_is_refused(
    tmp_path: Path, pki_dir: Path, tiny_model_dir: Path, config: NodeConfig
) -> None:
    PrivacyLedger(state(config).ledger, budget=site_budget(config, n_train(config)))
    no_data = make_config(
        tmp_path, name="site-a", pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=tmp_path / "no-data"
    )
    message = refused(no_data)
    assert "training data" in message


# ---- build_node ------------------------------------------------------------------------


def test_build_node_with_missing_model_dir(tmp_path: Path, pki_dir: Path, site_data_dir: Path) -> None:
    config = make_config(
        tmp_path, name="site-a", pki_dir=pki_dir, model_dir=tmp_path / "no-model", data_dir=site_data_dir
    )
    with pytest.raises(NodeStartError) as info:
        build_node(config)
    message = str(info.value)
    assert "\n" not in message
    assert "model directory not found" in message and "no-model" in message
    assert not state(config).ledger.exists()


def test_build_node_with_bad_site_data(tmp_path: Path, pki_dir: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "Q?"}\n')
    (data / "eval.jsonl").write_text('{"prompt": "Q?", "completion": "A"}\n')
    config = make_config(tmp_path, name="site-a", pki_dir=pki_dir, model_dir=tiny_model_dir, data_dir=data)
    with pytest.raises(NodeStartError) as info:
        build_node(config)
    message = str(info.value)
    assert message.startswith("bad site data:") and "train.jsonl line 1" in message
    assert "\n" not in message
