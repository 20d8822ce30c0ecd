"""What a site tells the coordinator about its own state each round, signed with its node key.

The coordinator is the site's witness (`coordinator.witness`): with its readiness answer and with
every trained update a site sends a signed `ledger.head` statement, so a ledger that an insider
deleted, rolled back or re-chained (together with the audit trail the node's own start-up check
holds it against) no longer extends what the coordinator already saw, and the site is refused.

The `ledger.head` payload: `site`; `head`, the ledger's `PrivacyLedger.head().to_json()` (sequence,
hash, cumulative epsilon, budget, delta, accountant, data fingerprint, and whatever else the head
carries); `genesis_record`, the genesis the head's `genesis` hash covers (so the budget and data it
was created for are checkable); `chain`, every entry's hash from the first to the head (entry i's
`prev_hash` is entry i-1's hash, the first one's the genesis hash), so the coordinator can see the
hash it witnessed earlier at the sequence it witnessed it. About 67 bytes a charged round.

`round_statements` returns a list so that other signed statements about the site's state (its
audit log's checkpoints) travel in the same place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from federation.errors import FedSeekError
from federation.protocol import records
from federation.security.flower_auth import auth_key_paths
from federation.security.signed_statement import load_private_key, sign_statement
from privacy.ledger import LedgerError, PrivacyLedger

__all__ = ["LEDGER_HEAD", "ledger_head_payload", "node_key_path", "round_statements"]

log = logging.getLogger("fedseek.node.witness")

LEDGER_HEAD = records.LEDGER_HEAD
_READ_TRIES = 3


def node_key_path(pki_dir: Path, site: str) -> Path:
    """The site's node (SuperNode) private key, as `node.agent` creates it."""
    return auth_key_paths(pki_dir / site).private_key


def ledger_head_payload(ledger: PrivacyLedger, *, site: str) -> dict[str, Any]:
    """The `ledger.head` payload of `ledger` now (LedgerError if the ledger fails its own check)."""
    for _ in range(_READ_TRIES):  # a charge between the two reads: read again
        chain = ledger.chain()
        head = ledger.head().to_json()
        hashes = [link.hash for link in chain.links]
        if head["seq"] == len(hashes) and head["hash"] == chain.head_hash:
            return {"site": site, "head": head, "genesis_record": chain.genesis.to_json(), "chain": hashes}
    raise LedgerError("the ledger changed while its head was read; try again")


def round_statements(ledger: PrivacyLedger, *, site: str, key_path: Path) -> list[dict[str, Any]]:
    """The signed statements this site sends with a readiness answer or an update.

    Empty if the node key or the ledger cannot be read: the coordinator then refuses the site with
    its own one-line reason ("no signed ledger head"), which is where that decision belongs; the
    site's serving is not affected.
    """
    try:
        key: ec.EllipticCurvePrivateKey = load_private_key(key_path)
    except (OSError, ValueError, FedSeekError) as exc:
        log.warning("no signed ledger head: node key %s unreadable (%s)", key_path, exc)
        return []
    try:
        payload = ledger_head_payload(ledger, site=site)
    except LedgerError as exc:
        log.warning("no signed ledger head: %s", exc.one_line())
        return []
    return [sign_statement(LEDGER_HEAD, payload, key=key)]
