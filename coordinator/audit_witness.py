"""The coordinator witnesses each site's audit-log checkpoints (`privacy.checkpoints`), kind `audit.checkpoint`.

A site sends its latest signed checkpoint (tree size, Merkle root, time) with every readiness answer
and update. The coordinator checks the signature with the site's registered node key and that the
checkpoint does not go back on the latest one it witnessed: a smaller tree (the log cut or an older
copy restored), the same size with another root (a fork), or an earlier time. It keeps each new one
in the witness store, so `fedseek audit verify LOG --witness COORD_STATE` can later hold the site's
log against all of them: a log rewritten in a way these cheap checks do not see here (a history
rewritten and grown past the witnessed size) still cannot match the witnessed root at that size.

Two channels bring checkpoints: the rounds (`channel="round"`, from the strategy) and the node
agent's push to the admin API between rounds (`channel="push"`, `coordinator.admin_api`, at least
every 60 s while the log grows). Each must extend its own channel's latest checkpoint. Against the
other channel's latest only what proves a rollback or fork is refused (same size with another root;
signed later yet smaller; signed earlier yet larger): a round's reply can wait in the SuperLink
while the agent pushes a newer checkpoint, so a round's checkpoint that is merely older than a
pushed one is old news, not a rollback. Pushed entries are stored with `note: "push"`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.witness import WitnessRefused, WitnessStore
from federation.security.signed_statement import StatementError
from privacy.checkpoints import KIND, Checkpoint, parse_checkpoint

__all__ = ["KIND", "PUSH", "Channel", "witness_audit_checkpoint"]

Channel = Literal["round", "push"]
PUSH: Final = "push"  # the note on entries the node agent pushed between rounds


def witness_audit_checkpoint(
    store: WitnessStore,
    site: str,
    statements: Sequence[object],
    *,
    key: ec.EllipticCurvePublicKey,
    channel: Channel = "round",
) -> Checkpoint | None:
    """Record the site's `audit.checkpoint` among `statements` if it is new; WitnessRefused if it is
    forged, another site's, or goes back on the latest witnessed one of its `channel` (or contradicts
    the other channel's, see the module). None if the site sent none (a node whose key could not sign
    yet: its ledger head is what admits it to a round)."""
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
    latest = store.latest_by_note(site, KIND)  # the latest of each channel: pushed, or sent with a round
    pushed = [latest[PUSH]] if PUSH in latest else []
    in_rounds = [numbered for note, numbered in latest.items() if note != PUSH]
    mine, other = (pushed, in_rounds) if channel == PUSH else (in_rounds, pushed)
    mine_cp, other_cp = _newest(mine), _newest(other)
    if other_cp is not None:
        _check_consistent(site, checkpoint, other_cp)
    if mine_cp is not None:
        _check_extends(site, checkpoint, mine_cp)
        if checkpoint == mine_cp:
            return checkpoint
    store.record(site, KIND, dict(sent[0]), note=PUSH if channel == PUSH else None)
    return checkpoint


def _newest(numbered: Sequence[tuple[int, Mapping[str, Any]]]) -> Checkpoint | None:
    """The checkpoint of the entry stored last (highest line number) among `numbered`, or None."""
    return parse_checkpoint(max(numbered, key=lambda n: n[0])[1]["statement"]) if numbered else None


def _check_consistent(site: str, new: Checkpoint, old: Checkpoint) -> None:
    """Refuse only what an honest, growing log cannot have signed, whichever came first."""
    if new.size == old.size and new.root != old.root:
        raise WitnessRefused(f"{site}: audit log forked: another root for the {old.size} records witnessed")
    if new.when > old.when and new.size < old.size:
        raise WitnessRefused(
            f"{site}: audit log rolled back or cut: its checkpoint of {new.time} holds {new.size} records, the "
            f"coordinator witnessed {old.describe()}"
        )
    if new.when < old.when and new.size > old.size:
        raise WitnessRefused(
            f"{site}: audit checkpoint of {new.time} holds {new.size} records, more than the later witnessed "
            f"{old.describe()}"
        )


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
