"""A site's privacy ledger held against its own audit trail, before the site may train.

The ledger and the audit trail are two hash chains in the same state directory. Either one
alone can be rebuilt by an insider who can write that directory (delete the ledger and start
afresh, delete a row and reset the head, edit a noise multiplier and re-chain), so each cites
the other: the audit trail records the ledger's genesis (budget, delta, data fingerprint),
every budget tightening and every charge's (seq, hash, epsilon), and each ledger entry names
the audit record it followed. `check_ledger_against_audit` refuses, with one line, a ledger
that lacks or differs from a charge the audit trail recorded, is missing while training was
recorded, holds a budget looser than one recorded, or covers other data than the node trains on.

What it cannot catch: a site that deletes or rebuilds both chains consistently has no local
history left to compare; only a witness outside the site (the coordinator countersigning
`PrivacyLedger.head()`) catches that. The audit trail's own chain is verified at start-up by
the node's preflight (`privacy.audit.verify`); here each record read is checked against its
own hash only, and only records that concern the ledger are parsed, so this stays cheap on a
long serving log.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from privacy.audit import AuditError, AuditTrail, canonical_json, iter_lines, sha256_hex
from privacy.ledger import Budget, Genesis, LedgerChain, LedgerError, PrivacyLedger
from privacy.segments import segments_dir

__all__ = ["AuditedLedger", "LedgerMismatch", "check_ledger_against_audit", "ledger_refusal", "read_audit"]


class LedgerMismatch(LedgerError):
    """The ledger disagrees with the site's audit trail: the site may serve, but not train."""

    default_code = "LedgerMismatch"


@dataclass(frozen=True)
class Ref:
    """A ledger entry as an audit record cited it (`privacy.ledger.entry_ref`)."""

    genesis: str
    seq: int
    hash: str
    status: str
    epsilon: float


@dataclass
class AuditedLedger:
    """What a site's audit trail says about its ledgers."""

    geneses: dict[str, Genesis] = field(default_factory=dict)  # genesis hash -> what it committed
    budgets: list[Budget] = field(default_factory=list)  # every budget recorded, at creation or tightened
    refs: dict[tuple[str, int], Ref] = field(default_factory=dict)  # the latest citation of each entry
    cited: dict[int, str] = field(default_factory=dict)  # hashes of the audit records ledger entries cite

    def spent(self, refs: Iterable[Ref]) -> str:
        """'N training rounds spending epsilon E': what the audit trail says these charges spent."""
        refs = list(refs)
        rounds = len({(r.genesis, r.seq) for r in refs if r.status != "added"})  # "added": a partition registered
        epsilon = max((r.epsilon for r in refs), default=0.0)
        plural = "s" if rounds != 1 else ""
        return f"the audit trail records {rounds} training round{plural} spending epsilon {epsilon:.4f}"


def read_audit(path: Path, *, cite: Collection[int] = ()) -> AuditedLedger:
    """The ledger records of the audit trail at `path`, and the hashes of records `cite` names."""
    seen = AuditedLedger()
    if not path.exists() and not segments_dir(path).is_dir():
        return seen
    try:
        for lineno, line in iter_lines(path):  # across the log's sealed segments and the active file
            if lineno not in cite and b'"ledger' not in line:
                continue  # a serving record: not parsed, so a long log stays cheap to scan
            record = _parse(line, lineno)
            if lineno in cite:
                seen.cited[lineno] = str(record["hash"])
            _collect(seen, record)
    except AuditError as exc:
        raise LedgerMismatch(f"cannot read the audit trail {path} ({exc}); refusing to train") from None
    except OSError as exc:
        raise LedgerMismatch(f"cannot read the audit trail {path} ({exc.strerror}); refusing to train") from exc
    return seen


def _parse(line: bytes, lineno: int) -> dict[str, object]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LedgerMismatch(f"audit record {lineno} is not JSON; refusing to train") from None
    if not isinstance(record, dict) or record.get("seq") != lineno:
        raise LedgerMismatch(f"audit record {lineno} is not in sequence; refusing to train")
    if sha256_hex(canonical_json({k: v for k, v in record.items() if k != "hash"})) != record.get("hash"):
        raise LedgerMismatch(f"audit record {lineno}: hash mismatch (edited); refusing to train")
    return record


def _collect(seen: AuditedLedger, record: dict[str, object]) -> None:
    details = record.get("details")
    if not isinstance(details, dict):
        return
    try:
        if record.get("actor") == "ledger" and record.get("action") == "ledger.genesis":
            genesis = Genesis.from_json(details["genesis"])
            seen.geneses[genesis.hash] = genesis
            seen.budgets.append(genesis.budget)
        elif record.get("actor") == "ledger" and record.get("action") == "ledger.budget":
            seen.budgets.append(Budget(**details["budget"]))
        cite = details.get("ledger")
        if isinstance(cite, dict):
            ref = Ref(
                genesis=str(cite["genesis"]),
                seq=int(cite["seq"]),
                hash=str(cite["hash"]),
                status=str(cite["status"]),
                epsilon=float(cite["epsilon"]),
            )
            seen.refs[(ref.genesis, ref.seq)] = ref
    except (KeyError, TypeError, ValueError, LedgerError):
        raise LedgerMismatch(f"audit record {record.get('seq')}: malformed ledger record; refusing to train") from None


def _describe(genesis: Genesis) -> str:
    budget = genesis.budget
    data = genesis.dataset_sha256[:19] or "none"
    return f"budget epsilon {budget.epsilon:g}, delta {budget.delta:g}, {budget.accountant}, data {data}"


def _check_foreign(chain: LedgerChain | None, seen: AuditedLedger) -> None:
    """Charges recorded under another ledger than this one: the ledger was deleted, replaced or rewritten."""
    here = chain.genesis.hash if chain is not None else None
    foreign = [r for r in seen.refs.values() if r.genesis != here]
    if not foreign:
        return
    spent = seen.spent(foreign)
    if chain is None:
        raise LedgerMismatch(f"ledger missing: {spent}; refusing to train")
    if not chain.links:
        raise LedgerMismatch(
            f"ledger missing: {spent}, but the ledger here (created {chain.genesis.created}) holds none of them; "
            "refusing to train"
        )
    recorded = seen.geneses.get(foreign[0].genesis)
    if recorded is not None and _describe(recorded) != _describe(chain.genesis):
        raise LedgerMismatch(
            f"ledger rewritten: its genesis says {_describe(chain.genesis)}, the audit trail recorded "
            f"{_describe(recorded)}; {spent}; refusing to train"
        )
    raise LedgerMismatch(f"ledger replaced: {spent} under another ledger than this one; refusing to train")


def _check_charges(chain: LedgerChain, seen: AuditedLedger) -> None:
    """Every charge the audit trail recorded for this ledger is there, as recorded."""
    mine = sorted((r for r in seen.refs.values() if r.genesis == chain.genesis.hash), key=lambda r: r.seq)
    if mine and mine[-1].seq > len(chain.links):
        raise LedgerMismatch(
            f"ledger entries missing: {seen.spent(mine)} up to entry {mine[-1].seq}, the ledger holds "
            f"{len(chain.links)} (rows deleted); refusing to train"
        )
    for ref in mine:
        link = chain.links[ref.seq - 1]
        now = link.hash_when(ref.status)
        if now != ref.hash or link.entry.epsilon_after != ref.epsilon:
            raise LedgerMismatch(
                f"ledger entry {ref.seq} differs from the audit trail's record of it (epsilon "
                f"{ref.epsilon:.4f}, hash {ref.hash[:12]} recorded; epsilon {link.entry.epsilon_after:.4f}, "
                f"hash {(now or link.hash)[:12]} now): edited and re-chained; refusing to train"
            )


def _check_budget(chain: LedgerChain, seen: AuditedLedger) -> None:
    """The ledger's budget is never looser than any the audit trail saw it hold."""
    if not seen.budgets:
        return
    epsilon = min(b.epsilon for b in seen.budgets)
    delta = min(b.delta for b in seen.budgets)
    held = [chain.budget]
    if chain.genesis.hash not in seen.geneses:  # a genesis the trail never saw: it must not be looser either
        held.append(chain.genesis.budget)
    for budget in held:
        if budget.epsilon > epsilon or budget.delta > delta:
            raise LedgerMismatch(
                f"ledger budget (epsilon {budget.epsilon:g}, delta {budget.delta:g}) is looser than the audit "
                f"trail recorded (epsilon {epsilon:g}, delta {delta:g}): edited; refusing to train"
            )


def _check_citations(chain: LedgerChain, seen: AuditedLedger) -> None:
    """Each entry's audit record is in the audit trail, unchanged."""
    for link in chain.links:
        entry = link.entry
        if not entry.audit_seq:
            continue
        recorded = seen.cited.get(entry.audit_seq)
        if recorded is None:
            raise LedgerMismatch(
                f"ledger entry {entry.id} follows audit record {entry.audit_seq}, which the audit trail does not "
                "hold (audit trail replaced or cut); refusing to train"
            )
        if recorded != entry.audit_hash:
            raise LedgerMismatch(
                f"ledger entry {entry.id} follows audit record {entry.audit_seq}, which differs in the audit trail "
                "(audit trail rewritten); refusing to train"
            )


def _check_data(chain: LedgerChain, dataset_sha256: str | Collection[str] | None) -> None:
    """At least one of the site's data partitions is one the ledger accounts for (the others are not trained on)."""
    if dataset_sha256 is None:
        return
    present = [dataset_sha256] if isinstance(dataset_sha256, str) else list(dataset_sha256)
    registered = chain.fingerprints()
    if not set(present) & set(registered):
        then = registered[0][:19] or "none"
        now = present[0][:19] if present else "none"
        raise LedgerMismatch(
            f"training data changed since the ledger was created (data {then} then, {now} now): its budget covers "
            "the data registered in it (new data: `fedseek budget add-partition`); refusing to train"
        )


def check_ledger_against_audit(
    ledger: PrivacyLedger | None, audit: AuditTrail | Path, *, dataset_sha256: str | Collection[str] | None = None
) -> None:
    """Raise LedgerMismatch (one line) unless `ledger` agrees with the site's audit trail.

    `ledger` None: there is no ledger file. `dataset_sha256`: the fingerprint of the data the
    node would train on, or of each of its partitions (None: not checked, as in `fedseek budget`, which
    does not read the data); at least one must be registered in the ledger.
    A damaged ledger raises its own LedgerError.
    """
    path = audit.path if isinstance(audit, AuditTrail) else audit
    chain = ledger.chain() if ledger is not None else None
    cite = {link.entry.audit_seq for link in chain.links if link.entry.audit_seq} if chain is not None else set()
    seen = read_audit(path, cite=cite)
    _check_foreign(chain, seen)
    if chain is None:
        return
    _check_charges(chain, seen)
    _check_budget(chain, seen)
    _check_citations(chain, seen)
    _check_data(chain, dataset_sha256)


def ledger_refusal(
    ledger: PrivacyLedger | None, audit: AuditTrail | Path, *, dataset_sha256: str | Collection[str] | None = None
) -> str | None:
    """The one-line reason the site may not train, or None when ledger and audit trail agree."""
    try:
        check_ledger_against_audit(ledger, audit, dataset_sha256=dataset_sha256)
    except LedgerMismatch as exc:
        return str(exc)
    return None
