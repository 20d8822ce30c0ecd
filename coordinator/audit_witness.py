"""The coordinator witnesses each site's audit-log checkpoints (`privacy.checkpoints`), kind `audit.checkpoint`.

A site sends its latest signed checkpoint (tree size, Merkle root, time) with every readiness answer
and update. The coordinator checks the signature with the site's registered node key and that the
checkpoint does not go back on the latest one it witnessed: a smaller tree (the log cut or an older
copy restored), the same size with another root (a fork), or an earlier time. It keeps each new one
in the witness store, so `fedseek audit verify LOG --witness COORD_STATE` can later hold the site's
log against all of them: a log rewritten in a way these cheap checks do not see here (a history
rewritten and grown past the witnessed size) still cannot match the witnessed root at that size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.witness import WitnessRefused, WitnessStore
from federation.security.signed_statement import StatementError
from privacy.checkpoints import KIND, Checkpoint, parse_checkpoint

__all__ = ["KIND", "witness_audit_checkpoint"]


def witness_audit_checkpoint(
    store: WitnessStore, site: str, statements: Sequence[object], *, key: ec.EllipticCurvePublicKey
) -> Checkpoint | None:
    """Record the site's `audit.checkpoint` among `statements` if it is new; WitnessRefused if it is
    forged, another site's, or goes back on the latest witnessed one. None if the site sent none
    (a node whose key could not sign yet: its ledger head is what admits it to a round)."""
    sent = [s for s in statements if isinstance(s, Mapping) and s.get("kind") == KIND]
    if not sent:
        return None
    if len(sent) > 1:
        raise WitnessRefused(f"{site}: {len(sent)} audit checkpoints with one answer")
    try:
        checkpoint = parse_checkpoint(sent[0], key=key)
    except StatementError as exc:
        raise WitnessRefused(f"{site}: audit checkpoint: {exc.one_line()}") from None
    if checkpoint.origin != site:
        raise WitnessRefused(f"{site}: the audit checkpoint is signed for site {checkpoint.origin!r}")
    latest = store.latest(site, KIND)
    if latest is not None:
        before = parse_checkpoint(latest)
        _check_extends(site, checkpoint, before)
        if checkpoint == before:
            return checkpoint
    store.record(site, KIND, dict(sent[0]))
    return checkpoint


def _check_extends(site: str, new: Checkpoint, old: Checkpoint) -> None:
    if new.size < old.size:
        raise WitnessRefused(
            f"{site}: audit log rolled back or cut: its checkpoint holds {new.size} records, the coordinator "
            f"witnessed {old.describe()}"
        )
    if new.size == old.size and new.root != old.root:
        raise WitnessRefused(f"{site}: audit log forked: another root for the {old.size} records witnessed")
    if new.when < old.when:
        raise WitnessRefused(f"{site}: audit checkpoint dated {new.time}, before the witnessed {old.time}")


def describe(checkpoint: Mapping[str, Any]) -> str:
    """One line for an operator: what a stored checkpoint statement says."""
    return parse_checkpoint(checkpoint).describe()
