"""A real site and coordinator state for `fedseek compliance report` tests (in-process, no services).

The site's privacy ledger charges two DP rounds through its audit trail, which signs checkpoints
with the site's real node key; the coordinator's witness checks and records the signed ledger head
and audit checkpoint after each round (`coordinator.witness`, as a round does); the coordinator's
registry holds the global version the site deployed (`node.adapter_store`, gray release state by
`node.release`); the access policy is the node's default plus one member; three API keys were
issued, one revoked and one left to expire. A partition label, an audit actor and a key label are
HTML (`MARK`): the report must show them as text.

`snapshot` is a copy of the state directory after round 1 (witnessed): what an insider restores.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from coordinator.registry import AdapterRegistry, SiteLineage
from coordinator.witness import LedgerWitness, WitnessStore
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.protocol import wire
from federation.security.flower_auth import ensure_auth_keypair
from federation.security.signed_statement import load_private_key
from node.adapter_store import release_path, save_version
from node.api_keys import ApiKeys
from node.engine import AdapterInfo
from node.policy import add_members, ensure_policy
from node.release import Release
from node.witness_statements import node_key_path, round_statements
from privacy.audit import AuditTrail
from privacy.checkpoints import CheckpointSigner
from privacy.ledger import Budget, PrivacyLedger, RoundPlan

SITE = "site-a"
DATA = "a" * 64
MARK = '<script>alert("pwned")</script>'
PLAN = RoundPlan(noise_multiplier=5.0, sample_rate=0.01, steps=1, epsilon_after=0.0)


@dataclass(frozen=True)
class Site:
    state: Path
    coord: Path
    site_keys: Path
    snapshot: Path
    version: str

    @property
    def layout(self) -> NodeLayout:
        return NodeLayout(self.state)


def _witness(witness: LedgerWitness, ledger: PrivacyLedger, trail: AuditTrail, pki: Path) -> None:
    statements = round_statements(ledger, site=SITE, key_path=node_key_path(pki, SITE))
    checkpoint = trail.checkpoint()
    assert statements and checkpoint is not None
    witness.witness(SITE, [*statements, checkpoint], stage="update")


def _charge(ledger: PrivacyLedger, round: int) -> None:
    entry = ledger.charge(run_id="run-1", round=round, plan=PLAN, max_grad_norm=1.0)
    ledger.complete(entry.id, steps=1)


def build_site(root: Path) -> Site:
    pki = root / "pki"
    pair = ensure_auth_keypair(pki / SITE)
    site_keys = pki / "site-keys"
    site_keys.mkdir()
    shutil.copy(pair.public_key, site_keys / f"{SITE}.pub")
    coord = CoordinatorLayout(root / "coord")
    coord.root.mkdir()
    witness = LedgerWitness(WitnessStore(coord.witness), site_keys_dir=site_keys, audit=AuditTrail(coord.audit))

    layout = NodeLayout(root / "site")
    layout.root.mkdir()
    signer = CheckpointSigner(load_private_key(pair.private_key), SITE)
    trail = AuditTrail(layout.audit, signer=signer, interval_s=3600)  # checkpoints when the test says
    ledger = PrivacyLedger(layout.ledger, budget=Budget(epsilon=1.0, delta=1e-5), dataset_sha256=DATA, audit=trail)
    _charge(ledger, 1)
    _witness(witness, ledger, trail, pki)
    snapshot = root / "snapshot"
    shutil.copytree(layout.root, snapshot)

    ledger.add_partition("sha256:" + "b" * 64, label=MARK)
    _charge(ledger, 2)
    trail.append(actor=MARK, action="serve", resource="deepseek", details={"prompt_hmac": "0" * 64})
    _witness(witness, ledger, trail, pki)

    arrays = {"layer.lora_A": np.ones((2, 4), dtype=np.float32), "layer.lora_B": np.zeros((4, 2), dtype=np.float32)}
    epsilon = ledger.head().epsilon
    manifest = AdapterRegistry(coord.registry).save(
        arrays,
        run="run-1",
        round=2,
        sites=[SiteLineage(SITE, epsilon, 1e-5, 10, 2, PLAN.noise_multiplier)],
        parent=None,
    )
    assert manifest.sha256 == wire.sha256_of(arrays)
    save_version(layout.adapters, AdapterInfo(manifest.version, manifest.sha256, None, int(time.time())), arrays)
    Release(release_path(layout.adapters), audit=trail, base_eval_loss=2.0, installed=[manifest.version])

    add_members(ensure_policy(layout.access_policy, site=SITE), site=SITE, org=SITE, names=["rita"])
    keys = ApiKeys(layout.api_key_digests)
    keys.issue(label="app")
    _, revoked = keys.issue(label="old app")
    keys.revoke(revoked.id)
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    keys.issue(label=MARK, expires=expires)
    trail.close()  # a last signed checkpoint: every record is covered
    while datetime.now(UTC) <= expires:  # the third key expires, as keys do
        time.sleep(0.1)
    return Site(layout.root, coord.root, site_keys, snapshot, manifest.version)


def restore(snapshot: Path, state: Path) -> None:
    """An insider's restore of ledger and audit trail (every companion file) from an older copy."""
    for path in state.iterdir():
        if path.name.startswith(("ledger", "audit")) and path.is_file():
            path.unlink()
    for path in snapshot.iterdir():
        if path.name.startswith(("ledger", "audit")) and path.is_file():
            shutil.copy(path, state / path.name)


def copy_site(site: Site, root: Path) -> Site:
    """The same site and coordinator under `root` (a test that attacks one leaves the others theirs)."""
    old = site.state.parent
    shutil.copytree(old, root, dirs_exist_ok=True)
    return Site(*(root / p.relative_to(old) for p in (site.state, site.coord, site.site_keys, site.snapshot)),
                version=site.version)  # fmt: skip


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
