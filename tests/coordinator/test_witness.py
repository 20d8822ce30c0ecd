"""The coordinator as witness of every site's privacy ledger (issue 14, anchored ledger).

The store keeps what sites signed (0600, one JSONL per site and kind). `LedgerWitness` checks a
site's signed `ledger.head` against the last head it witnessed: a reset (new genesis), rollback
(lower seq), fork or re-chain (another hash at the witnessed seq) is refused with one line and
audited. Ledgers here are real `PrivacyLedger`s charged as the trainer charges them; the strategy
tests drive `run_federation` through the in-process Flower grid of test_strategy.py, with sites
that keep a real ledger and sign its head with their own EC key, as `node.witness_statements` does.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message, RecordDict

from coordinator.server_app import run_federation
from coordinator.witness import (
    GENESIS_ACCEPTED,
    LEDGER_HEAD,
    HeadClaim,
    LedgerWitness,
    WitnessRefused,
    WitnessStore,
    WitnessStoreError,
    check_extends,
    coordinator_witness,
)
from federation.errors import InvalidInput
from federation.ops.layout import CoordinatorLayout
from federation.protocol import records, wire
from federation.security.signed_statement import sign_statement
from privacy.audit import AuditTrail
from privacy.ledger import Budget, PrivacyLedger, RoundPlan
from tests.coordinator.test_strategy import FakeSite, InProcessGrid, _run_config, _sites
from tests.coordinator.test_strategy import serverapp_identity as serverapp_identity  # autouse: a ServerApp task
from tests.privacy.insider import rechain

DATA = "d" * 64
NEW_DATA = "e" * 64
PLAN = RoundPlan(noise_multiplier=5.0, sample_rate=0.01, steps=1, epsilon_after=0.0)  # a small epsilon a round


def _ledger(path: Path, *, data: str = DATA) -> PrivacyLedger:
    return PrivacyLedger(path, budget=Budget(epsilon=1.0, delta=1e-5), dataset_sha256=data)


def _charge(ledger: PrivacyLedger, n: int = 1, *, run_id: str = "run") -> None:
    for i in range(n):
        entry = ledger.charge(run_id=run_id, round=i + 1, plan=PLAN, max_grad_norm=1.0)
        ledger.complete(entry.id, steps=entry.steps)


def _payload(ledger: PrivacyLedger, site: str) -> dict[str, Any]:
    """What node.witness_statements.ledger_head_payload sends (coordinator tests do not import node/)."""
    chain = ledger.chain()
    return {
        "site": site,
        "head": ledger.head().to_json(),
        "genesis_record": chain.genesis.to_json(),
        "chain": [link.hash for link in chain.links],
    }


def _claim(ledger: PrivacyLedger, site: str = "site-a") -> HeadClaim:
    return HeadClaim.parse(_payload(ledger, site))


class Keys:
    """Each site's node key; the coordinator's copy of the public halves in `dir` (`<site>.pub`, OpenSSH)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.private: dict[str, ec.EllipticCurvePrivateKey] = {}

    def key(self, site: str) -> ec.EllipticCurvePrivateKey:
        if site not in self.private:
            self.private[site] = ec.generate_private_key(ec.SECP384R1())
            pub = self.private[site].public_key()
            ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            (self.dir / f"{site}.pub").write_bytes(ssh + b"\n")
        return self.private[site]

    def head(self, ledger: PrivacyLedger, site: str, *, signer: str | None = None) -> list[dict[str, Any]]:
        return [sign_statement(LEDGER_HEAD, _payload(ledger, site), key=self.key(signer or site))]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "site-keys")


@pytest.fixture
def witness(tmp_path: Path, keys: Keys) -> LedgerWitness:
    layout = CoordinatorLayout(tmp_path / "coord")
    return LedgerWitness(WitnessStore(layout.witness), site_keys_dir=keys.dir, audit=AuditTrail(layout.audit))


def _audit(witness: LedgerWitness) -> list[dict[str, Any]]:
    assert witness.audit is not None
    return [json.loads(line) for line in witness.audit.path.read_text().splitlines()]


# -- the store -------------------------------------------------------------------------


def test_store_appends_per_site_and_kind_privately(tmp_path: Path) -> None:
    store = WitnessStore(tmp_path / "witness")
    assert store.latest("site-a", LEDGER_HEAD) is None and store.statements("site-a", LEDGER_HEAD) == []
    store.record("site-a", LEDGER_HEAD, {"kind": LEDGER_HEAD, "payload": {"n": 1}})
    store.record("site-a", LEDGER_HEAD, {"kind": LEDGER_HEAD, "payload": {"n": 2}})
    store.record("site-a", "audit.checkpoint", {"kind": "audit.checkpoint", "payload": {"n": 9}})
    store.record("site-b", LEDGER_HEAD, {"kind": LEDGER_HEAD, "payload": {"n": 3}})
    assert [s["payload"]["n"] for s in store.statements("site-a", LEDGER_HEAD)] == [1, 2]
    assert store.latest("site-a", LEDGER_HEAD) == {"kind": LEDGER_HEAD, "payload": {"n": 2}}
    assert store.latest("site-a", "audit.checkpoint") == {"kind": "audit.checkpoint", "payload": {"n": 9}}
    assert store.sites() == ["site-a", "site-b"]
    path = tmp_path / "witness" / "site-a" / "ledger.head.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "witness").stat().st_mode) == 0o700
    (entry,) = store.entries("site-b", LEDGER_HEAD)
    assert entry["site"] == "site-b" and entry["kind"] == LEDGER_HEAD and entry["witnessed_at"].endswith("Z")


@pytest.mark.parametrize(("site", "kind"), [("../x", LEDGER_HEAD), ("Site", LEDGER_HEAD), ("a", "../x"), ("a", "")])
def test_store_refuses_path_like_sites_and_kinds(tmp_path: Path, site: str, kind: str) -> None:
    with pytest.raises(InvalidInput):
        WitnessStore(tmp_path).record(site, kind, {})


def test_a_damaged_store_line_stops_the_reader(tmp_path: Path) -> None:
    store = WitnessStore(tmp_path)
    store.record("site-a", LEDGER_HEAD, {"payload": {}})
    with (tmp_path / "site-a" / "ledger.head.jsonl").open("a") as fh:
        fh.write('{"half a line\n')
    with pytest.raises(WitnessStoreError, match="line 2: not JSON"):
        store.latest("site-a", LEDGER_HEAD)


def test_latest_by_note_reads_only_what_was_appended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site pushes a checkpoint a minute (500,000 lines a year): the push check reads the lines added
    since the previous one, not the file (it read, and parsed, every line on every push)."""
    store = WitnessStore(tmp_path)
    for n in range(200):
        store.record("site-a", "audit.checkpoint", {"payload": {"n": n}}, note="push" if n % 3 else None)
    read: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: read.append(size) or real_pread(fd, size, offset))
    latest = store.latest_by_note("site-a", "audit.checkpoint")
    assert {note: (line, e["statement"]["payload"]["n"]) for note, (line, e) in latest.items()} == {
        "push": (200, 199),
        None: (199, 198),
    }
    path = tmp_path / "site-a" / "audit.checkpoint.jsonl"
    assert sum(read) == path.stat().st_size  # the first call: the whole file
    read.clear()
    store.record("site-a", "audit.checkpoint", {"payload": {"n": 200}})
    appended = path.stat().st_size
    assert store.latest_by_note("site-a", "audit.checkpoint")[None][0] == 201
    assert sum(read) == len(path.read_bytes().splitlines(keepends=True)[-1])  # one line
    assert store.latest("site-a", "audit.checkpoint") == {"payload": {"n": 200}}
    # the same answers as reading everything, for every note
    entries = store.entries("site-a", "audit.checkpoint")
    latest = store.latest_by_note("site-a", "audit.checkpoint")
    for note in ("push", None):
        assert latest[note][1] == [e for e in entries if e.get("note") == note][-1]
    assert path.stat().st_size == appended


def test_latest_by_note_rereads_a_replaced_or_cut_file_and_waits_for_a_whole_line(tmp_path: Path) -> None:
    store = WitnessStore(tmp_path)
    for n in range(5):
        store.record("site-a", LEDGER_HEAD, {"payload": {"n": n}})
    assert store.latest("site-a", LEDGER_HEAD) == {"payload": {"n": 4}}
    path = tmp_path / "site-a" / "ledger.head.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]))  # cut (same inode, shorter): read again from the start
    assert store.latest("site-a", LEDGER_HEAD) == {"payload": {"n": 1}}
    fresh = tmp_path / "fresh"
    fresh.write_bytes(lines[3])
    os.replace(fresh, path)  # replaced (another inode), here as long as before or longer
    assert store.latest("site-a", LEDGER_HEAD) == {"payload": {"n": 3}}
    with path.open("ab") as fh:
        fh.write(lines[4][:-10])  # a line being appended: not an entry yet, and no error
    assert store.latest("site-a", LEDGER_HEAD) == {"payload": {"n": 3}}
    with path.open("ab") as fh:
        fh.write(lines[4][-10:])
    assert store.latest("site-a", LEDGER_HEAD) == {"payload": {"n": 4}}
    path.unlink()
    assert store.latest("site-a", LEDGER_HEAD) is None


# -- the extension check -----------------------------------------------------------------


def test_a_ledger_that_grew_extends_what_was_witnessed(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "l.sqlite")
    _charge(ledger)
    witnessed = _claim(ledger)
    _charge(ledger, 2, run_id="later")
    check_extends(_claim(ledger), witnessed)
    check_extends(witnessed, witnessed)  # the same head again: nothing new, nothing undone


def test_reset_rollback_and_fork_are_each_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = _ledger(path)
    _charge(ledger)
    shutil.copy(path, tmp_path / "copy.sqlite")
    _charge(ledger)
    witnessed = _claim(ledger)

    other = _ledger(tmp_path / "new.sqlite")
    with pytest.raises(WitnessRefused, match=r"^site-a: ledger reset or replaced: genesis \w{12} is not") as exc:
        check_extends(_claim(other), witnessed)
    assert "\n" not in str(exc.value) and "accept-genesis" in str(exc.value)

    rolled = PrivacyLedger.open_existing(tmp_path / "copy.sqlite")
    with pytest.raises(WitnessRefused, match=r"ledger rolled back: head seq 1 .* behind the witnessed seq 2"):
        check_extends(_claim(rolled), witnessed)

    noise = ledger.entries()[0].noise_multiplier
    rechain(path, entries={1: {"noise_multiplier": noise * 3}})  # same length, same genesis, other hashes
    with pytest.raises(WitnessRefused, match=r"ledger forked or re-chained: entry 2 hash \w{12} is not the witnessed"):
        check_extends(_claim(PrivacyLedger.open_existing(path)), witnessed)


def test_a_fork_that_outgrows_the_witnessed_head_is_still_a_fork(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = _ledger(path)
    _charge(ledger)
    shutil.copy(path, tmp_path / "copy.sqlite")
    _charge(ledger)
    witnessed = _claim(ledger)
    fork = PrivacyLedger.open_existing(tmp_path / "copy.sqlite")
    _charge(fork, 3, run_id="elsewhere")  # longer, but entry 2 is another round
    with pytest.raises(WitnessRefused, match="forked or re-chained: entry 2"):
        check_extends(_claim(fork), witnessed)


def test_a_loosened_budget_is_refused(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "l.sqlite")
    witnessed = _claim(ledger)
    payload = _payload(ledger, "site-a")
    payload["head"]["budget_epsilon"] = 2.0  # a head claiming more budget than the one witnessed
    with pytest.raises(WitnessRefused, match=r"budget loosened .*budget_epsilon 1.0 -> 2.0"):
        check_extends(HeadClaim.parse(payload), witnessed)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda p: p["head"].update(seq=5), "head seq 5 is not the end"),
        (lambda p: p["chain"].append("f" * 64), "is not the end of its"),
        (lambda p: p["genesis_record"].update(dataset_sha256=NEW_DATA), "does not hash to the head's genesis"),
        (lambda p: p["head"].update(epsilon=7.0), "outside the budget"),
        (lambda p: p.pop("chain"), "malformed ledger head"),
        (lambda p: p["head"].update(hash="X"), "64 lowercase hex"),
    ],
)
def test_a_malformed_head_is_refused(tmp_path: Path, edit: Any, reason: str) -> None:
    ledger = _ledger(tmp_path / "l.sqlite")
    _charge(ledger)
    payload = _payload(ledger, "site-a")
    edit(payload)
    with pytest.raises(WitnessRefused, match=reason):
        HeadClaim.parse(payload)


# -- LedgerWitness: signatures, recording, audit --------------------------------------------


def test_first_head_is_recorded_and_a_repeat_is_not(tmp_path: Path, keys: Keys, witness: LedgerWitness) -> None:
    ledger = _ledger(tmp_path / "l.sqlite")
    witness.witness("site-a", keys.head(ledger, "site-a"), stage="readiness")
    witness.witness("site-a", keys.head(ledger, "site-a"), stage="readiness")
    assert len(witness.store.statements("site-a", LEDGER_HEAD)) == 1
    _charge(ledger)
    claim = witness.witness("site-a", keys.head(ledger, "site-a"), stage="update")
    assert witness.latest("site-a") == claim and claim.seq == 1
    assert len(witness.heads("site-a")) == 2


@pytest.mark.parametrize("attack", ["unsigned", "other site's key", "signed for another site", "payload edited"])
def test_a_head_not_signed_by_the_sites_key_is_refused_and_audited(
    tmp_path: Path, keys: Keys, witness: LedgerWitness, attack: str
) -> None:
    ledger = _ledger(tmp_path / "l.sqlite")
    keys.key("site-b")
    statements: list[dict[str, Any]]
    if attack == "unsigned":
        statements = []
    elif attack == "other site's key":
        statements = keys.head(ledger, "site-a", signer="site-b")
    elif attack == "signed for another site":
        statements = keys.head(ledger, "site-b")
    else:
        statements = keys.head(ledger, "site-a")
        statements[0]["payload"]["head"]["epsilon"] = 0.0001
    with pytest.raises(WitnessRefused) as exc:
        witness.witness("site-a", statements, stage="readiness", context={"round": 3})
    assert str(exc.value).startswith("site-a: ") and "\n" not in str(exc.value)
    assert witness.store.statements("site-a", LEDGER_HEAD) == []
    refused = _audit(witness)[-1]
    assert (refused["action"], refused["resource"]) == ("witness.refused", "site-a")
    assert refused["details"] == {"stage": "readiness", "error": str(exc.value), "round": 3}


def test_an_update_whose_ledger_did_not_advance_is_refused(tmp_path: Path, keys: Keys, witness: LedgerWitness) -> None:
    ledger = _ledger(tmp_path / "l.sqlite")
    before = witness.witness("site-a", keys.head(ledger, "site-a"), stage="readiness")
    with pytest.raises(WitnessRefused, match=r"did not advance past .* the round was not charged"):
        witness.witness("site-a", keys.head(ledger, "site-a"), stage="update", after=before)
    _charge(ledger)
    assert witness.witness("site-a", keys.head(ledger, "site-a"), stage="update", after=before).seq == 1


def test_a_reset_ledger_needs_an_accepted_genesis_for_new_data(
    tmp_path: Path, keys: Keys, witness: LedgerWitness
) -> None:
    old = _ledger(tmp_path / "old.sqlite")
    _charge(old)
    witness.witness("site-a", keys.head(old, "site-a"), stage="update")

    same_data = _ledger(tmp_path / "same.sqlite")  # the insider's fresh ledger over the same records
    with pytest.raises(WitnessRefused, match="ledger reset or replaced"):
        witness.witness("site-a", keys.head(same_data, "site-a"), stage="readiness")
    with pytest.raises(WitnessRefused, match=r"data dddddddddddd was already witnessed .* never gets a fresh one"):
        witness.accept_genesis("site-a", dataset_sha256=f"sha256:{DATA}", operator="mallory")
    with pytest.raises(InvalidInput, match="sha256 hex digests"):
        witness.accept_genesis("site-a", dataset_sha256="not-a-digest", operator="mallory")
    with pytest.raises(WitnessRefused, match="ledger reset or replaced"):  # still refused
        witness.witness("site-a", keys.head(same_data, "site-a"), stage="readiness")

    fresh = _ledger(tmp_path / "fresh.sqlite", data=f"sha256:{NEW_DATA}")  # as the node names its data
    with pytest.raises(WitnessRefused, match="ledger reset or replaced"):  # new data, but no operator said so
        witness.witness("site-a", keys.head(fresh, "site-a"), stage="readiness")
    witness.accept_genesis("site-a", dataset_sha256=NEW_DATA, operator="olivia")
    assert witness.witness("site-a", keys.head(fresh, "site-a"), stage="readiness").genesis == fresh.head().genesis
    with pytest.raises(WitnessRefused, match="ledger reset or replaced"):  # and never back to the old ledger
        witness.witness("site-a", keys.head(old, "site-a"), stage="readiness")

    actions = [(r["action"], r["details"].get("operator")) for r in _audit(witness)]
    assert ("witness.genesis-refused", "mallory") in actions and ("witness.genesis-accepted", "olivia") in actions
    (accepted,) = witness.store.statements("site-a", GENESIS_ACCEPTED)
    assert accepted["dataset_sha256"] == NEW_DATA


def test_coordinator_witness_needs_a_coordinator_that_names_its_site_keys(tmp_path: Path, keys: Keys) -> None:
    layout = CoordinatorLayout(tmp_path / "coord")
    layout.root.mkdir()
    with pytest.raises(WitnessStoreError, match="names no site keys"):
        coordinator_witness(layout.registry)
    layout.endpoints.write_text(json.dumps({"registry": str(layout.registry), "site_keys": str(keys.dir)}))
    found = coordinator_witness(layout.registry)
    assert found.store.root == layout.witness and found.site_keys_dir == keys.dir
    with pytest.raises(WitnessStoreError, match="not a coordinator state's registry"):
        coordinator_witness(tmp_path / "elsewhere")


# -- the strategy: a real round loop, sites with real ledgers ---------------------------------


class LedgerSite(FakeSite):
    """A FakeSite that charges a real ledger for every round it trains and signs its head, as a node does."""

    ledger: PrivacyLedger
    keys: Keys
    stale_update: bool = False  # trains without charging (its update's head does not advance)

    def query(self, msg: Message, server_round: int) -> Message:
        reply = super().query(msg, server_round)
        reply.content[records.WITNESS] = records.witness_to_config(self.keys.head(self.ledger, self.name))
        return reply

    def train(self, msg: Message, server_round: int) -> Message:
        if not self.stale_update:
            _charge(self.ledger, run_id=f"r{server_round}")
        reply = super().train(msg, server_round)
        reply.content[records.WITNESS] = records.witness_to_config(self.keys.head(self.ledger, self.name))
        return reply


def _ledger_sites(base: Path, keys: Keys) -> dict[int, LedgerSite]:
    out: dict[int, LedgerSite] = {}
    for node, site in _sites().items():
        ledger_site = LedgerSite(site.name, site.num_examples, site.epsilon, site.eval_loss)
        ledger_site.ledger = _ledger(base / f"{site.name}.sqlite")
        ledger_site.keys = keys
        out[node] = ledger_site
    return out


def _run(tmp_path: Path, sites: dict[int, LedgerSite], witness: LedgerWitness, **cfg: Any) -> dict[str, Any]:
    grid = InProcessGrid(dict(sites))
    return run_federation(grid, _run_config(tmp_path, **{"num_rounds": 1, **cfg}), witness=lambda _: witness)


def test_rounds_witness_every_sites_head_before_and_after(tmp_path: Path, keys: Keys, witness: LedgerWitness) -> None:
    sites = _ledger_sites(tmp_path, keys)
    summary = _run(tmp_path, sites, witness, num_rounds=2)
    assert summary["status"] == "finished", summary
    for site in sites.values():
        assert [h.seq for h in witness.heads(site.name)] == [0, 1, 2]  # readiness 0, update 1, update 2
        assert witness.latest(site.name) == _claim(site.ledger, site.name)


def test_reset_rolled_back_and_rechained_sites_are_left_out_before_the_round(
    tmp_path: Path, keys: Keys, witness: LedgerWitness
) -> None:
    sites = _ledger_sites(tmp_path, keys)
    a, b, c = sites[11], sites[22], sites[33]
    assert _run(tmp_path, sites, witness, run_name="first")["status"] == "finished"
    shutil.copy(a.ledger.path, tmp_path / "a-after-1.sqlite")
    assert _run(tmp_path, sites, witness, run_name="second")["status"] == "finished"

    a.ledger = PrivacyLedger.open_existing(tmp_path / "a-after-1.sqlite")  # rolled back (audit trail too)
    b.ledger = _ledger(tmp_path / "b-fresh.sqlite")  # deleted and started afresh
    noise = c.ledger.entries()[0].noise_multiplier
    rechain(c.ledger.path, entries={1: {"noise_multiplier": noise * 5}})  # re-chained in place
    summary = _run(tmp_path, sites, witness, run_name="third", min_nodes=1)

    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    (rec,) = summary["rounds"]
    assert rec["not_ready"]["site-a (node-11)"].startswith("site-a: ledger rolled back: head seq 1")
    assert rec["not_ready"]["site-b (node-22)"].startswith("site-b: ledger reset or replaced")
    assert rec["not_ready"]["site-c (node-33)"].startswith("site-c: ledger forked or re-chained: entry 2")
    assert summary["error"].startswith("round 1 not started, nothing trained or charged: 0 of 3 connected sites ready")
    assert all(site.trained == [1, 1] for site in sites.values())  # nothing trained in the third run
    assert len(a.ledger.entries()) == 1  # nothing charged either
    refused = [r for r in _audit(witness) if r["action"] == "witness.refused"]
    assert sorted(r["resource"] for r in refused) == ["site-a", "site-b", "site-c"]
    assert all(r["details"]["stage"] == "readiness" and r["details"]["run"] == "third" for r in refused)


def test_an_update_whose_ledger_was_not_charged_is_not_aggregated(
    tmp_path: Path, keys: Keys, witness: LedgerWitness
) -> None:
    sites = _ledger_sites(tmp_path, keys)
    sites[22].stale_update = True
    summary = _run(tmp_path, sites, witness, min_nodes=2)
    (rec,) = summary["rounds"]
    assert summary["status"] == "finished"
    assert rec["rejected"]["node-22"].startswith("site-b: the update's ledger head (seq 0")
    assert "the round was not charged" in rec["rejected"]["node-22"]
    assert sorted(rec["accepted"]) == ["site-a", "site-c"]


def test_an_update_from_a_ledger_rolled_back_mid_round_is_not_aggregated(
    tmp_path: Path, keys: Keys, witness: LedgerWitness
) -> None:
    """The insider restores an old copy between the readiness answer and the update (both signed)."""
    sites = _ledger_sites(tmp_path, keys)
    a = sites[11]
    assert _run(tmp_path, sites, witness, run_name="first")["status"] == "finished"
    shutil.copy(a.ledger.path, tmp_path / "a-1.sqlite")
    _charge(a.ledger, 2, run_id="local")  # charged (and witnessed at readiness), then rolled back
    original_train = a.train

    def train_after_rollback(msg: Message, server_round: int) -> Message:
        a.ledger = PrivacyLedger.open_existing(tmp_path / "a-1.sqlite")
        return original_train(msg, server_round)

    a.train = train_after_rollback  # type: ignore[method-assign]
    summary = _run(tmp_path, sites, witness, run_name="second", min_nodes=3)
    (rec,) = summary["rounds"]
    assert summary["status"] == "failed"
    assert rec["rejected"]["node-11"].startswith("site-a: ledger rolled back: head seq 2")
    assert rec["version"] is None  # nothing aggregated
    assert "site-a: ledger rolled back" in summary["error"] and "\n" not in summary["error"]


def test_a_site_answering_without_a_signed_head_is_left_out(tmp_path: Path, keys: Keys, witness: LedgerWitness) -> None:
    sites = _ledger_sites(tmp_path, keys)
    b = sites[22]

    def unsigned_query(msg: Message, server_round: int) -> Message:
        reply = LedgerSite.query(b, msg, server_round)
        del reply.content.config_records[records.WITNESS]
        return reply

    b.query = unsigned_query  # type: ignore[method-assign]
    summary = _run(tmp_path, sites, witness, min_nodes=2)
    (rec,) = summary["rounds"]
    assert rec["not_ready"] == {
        "site-b (node-22)": "site-b: no signed ledger head with its answer; the coordinator takes no unwitnessed ledger"
    }
    assert sorted(rec["accepted"]) == ["site-a", "site-c"] and b.trained == []


def test_a_run_without_its_witness_does_not_start(tmp_path: Path) -> None:
    def no_witness(_: Path) -> LedgerWitness:
        raise WitnessStoreError("coordinator.json names no site keys")

    grid = InProcessGrid(dict(_sites()))
    summary = run_federation(grid, _run_config(tmp_path), witness=no_witness)
    assert summary["status"] == "failed"
    assert summary["error"] == "run not started: coordinator.json names no site keys"
    assert grid.delivered == []
    stored = json.loads((tmp_path / "registry" / "runs" / "unit-run.json").read_text())
    assert stored["status"] == "failed"


def test_witness_record_round_trips_through_records() -> None:
    statements = [{"kind": LEDGER_HEAD, "payload": {"a": [1, 2]}, "key_id": "k", "signature": "s"}]
    content = RecordDict({records.WITNESS: records.witness_to_config(statements)})
    assert records.witness_from_content(content) == statements
    assert records.witness_from_content(RecordDict({})) == []
    bad = RecordDict({records.WITNESS: records.witness_to_config([])})
    bad.config_records[records.WITNESS]["statements"] = '{"not": "a list"}'
    with pytest.raises(wire.WireError, match="malformed witness record"):
        records.witness_from_content(bad)


def test_store_files_survive_only_as_written(tmp_path: Path) -> None:
    """Appends never rewrite: an earlier line is byte-identical after later records (append-only)."""
    store = WitnessStore(tmp_path)
    store.record("site-a", LEDGER_HEAD, {"n": 1})
    path = tmp_path / "site-a" / "ledger.head.jsonl"
    first = path.read_bytes()
    store.record("site-a", LEDGER_HEAD, {"n": 2})
    assert path.read_bytes().startswith(first)
    assert os.stat(path).st_nlink == 1
