"""FROZEN COPY for tests (commit af5c832): privacy/ledger.py as it wrote format-2 ledgers (one dataset,
no partitions).

Persisted per-site privacy budget ledger that fails closed.

Every round of every run is recorded before training starts, and the site's
total epsilon is always recomputed by composing the full history with an
Opacus accountant (never by summing per-round epsilons). Rows are hash
chained from a genesis record that commits the budget, delta, accountant and the
fingerprint of the data the budget covers, and the chain's end is kept in a meta
table, so an edited, deleted or appended row makes the ledger refuse to plan or
charge. An insider who can write the file can still rebuild the whole chain; what
catches that locally is the site's audit trail, which records the genesis and every
charge's (seq, hash, epsilon) while each entry cites the audit record it followed:
`privacy/consistency.py` holds the two against each other. Commits are fsync'd
(WAL, ``synchronous=FULL``), and a new ledger appears under its name only once
complete, so a file that exists but is empty or not a ledger is refused rather
than silently taken for a fresh budget.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, fields, replace
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant, create_accountant  # type: ignore[import-untyped,unused-ignore]

from federation.errors import Conflict
from federation.ops.atomic import fsync_dir
from privacy.audit import AuditTrail, canonical_json, sha256_hex, utc_now

SUPPORTED_ACCOUNTANTS = ("rdp", "prv")
MIN_NOISE = 0.3
NOISE_TOLERANCE = 1e-3
EXHAUSTED_BELOW = 1e-6
SPENT_BELOW = 0.01
"""A budget, the site's or a run's share of it, counts as spent once less than this part of it is left
(a last round's plan lands just under its limit; a round on the crumbs would be nearly all noise)."""

History = Sequence[tuple[float, float, int]]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, round INTEGER NOT NULL,
        steps INTEGER NOT NULL, sample_rate REAL NOT NULL,
        noise_multiplier REAL NOT NULL, max_grad_norm REAL NOT NULL,
        accountant TEXT NOT NULL, delta REAL NOT NULL, epsilon_after REAL NOT NULL,
        status TEXT NOT NULL, ts TEXT NOT NULL, steps_completed INTEGER,
        budget_epsilon REAL NOT NULL, audit_seq INTEGER NOT NULL, audit_hash TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
)


class BudgetExceeded(Conflict):
    """The site's lifetime privacy budget does not allow this round."""

    default_code = "BudgetExceeded"  # the codes /internal/train has always answered with


class LedgerError(Conflict):
    """The ledger failed its integrity check or was given a bad configuration."""

    default_code = "LedgerError"


class PolicyError(LedgerError):
    """A configured budget breaks the site's policy (epsilon above its cap, delta >= 1/n, no records)."""

    default_code = "PolicyError"


@dataclass(frozen=True)
class Budget:
    """Lifetime (epsilon, delta) guarantee for one site, and how it is accounted."""

    epsilon: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise LedgerError(f"budget epsilon must be finite and > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise LedgerError(f"budget delta must be in (0, 1), got {self.delta}")
        if self.accountant not in SUPPORTED_ACCOUNTANTS:
            raise LedgerError(f"unsupported accountant {self.accountant!r}; use one of {SUPPORTED_ACCOUNTANTS}")


@dataclass(frozen=True)
class LedgerEntry:
    """One charged round; ``steps`` is what was charged and is what gets composed.

    ``steps_completed`` records how many steps training actually ran. It may be
    lower than ``steps``: the unused part is deliberately not refunded.
    """

    id: int
    run_id: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    delta: float
    epsilon_after: float
    status: str
    ts: str
    steps_completed: int | None = None
    budget_epsilon: float = 0.0
    """The lifetime budget in force when the round was charged: a tightening lands in the chain."""
    audit_seq: int = 0
    audit_hash: str = ""
    """The audit record the charge followed (0 and "" without an audit trail): the cross-reference
    that makes rewriting the ledger alone show against the audit trail."""


@dataclass(frozen=True)
class Genesis:
    """What a ledger was created for; its hash is the first entry's `prev_hash`, so every entry chains over it."""

    budget: Budget
    dataset_sha256: str
    created: str
    format: int = 2

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": asdict(self.budget),
            "dataset_sha256": self.dataset_sha256,
            "created": self.created,
            "format": self.format,
        }

    @property
    def hash(self) -> str:
        return sha256_hex(canonical_json(self.to_json()))

    @classmethod
    def from_json(cls, raw: Any) -> Genesis:
        try:
            genesis = cls(
                budget=Budget(**raw["budget"]),
                dataset_sha256=str(raw["dataset_sha256"]),
                created=str(raw["created"]),
                format=int(raw["format"]),
            )
        except (TypeError, KeyError, ValueError, LedgerError):
            raise LedgerError("ledger genesis is missing or malformed (an older or damaged ledger); refusing") from None
        if genesis.to_json() != raw:
            raise LedgerError("ledger genesis is malformed; refusing")
        return genesis


@dataclass(frozen=True)
class ChainLink:
    """One entry as stored: the entry, the hash before it and its own hash."""

    entry: LedgerEntry
    prev_hash: str
    hash: str

    def hash_when(self, status: str) -> str | None:
        """The entry's hash as it stood with `status`: a `charged` entry is re-hashed when completed,
        and an audit record taken at the charge holds the earlier hash. None: it never had that status."""
        if status == self.entry.status:
            return self.hash
        if status == "charged" and self.entry.status == "completed":
            charged = replace(self.entry, status="charged", steps_completed=None)
            return _entry_hash(charged, prev_hash=self.prev_hash)
        return None


@dataclass(frozen=True)
class LedgerChain:
    """The verified ledger: its genesis, every entry with its hashes, and the budget stored now."""

    genesis: Genesis
    links: list[ChainLink]
    budget: Budget

    @property
    def head_hash(self) -> str:
        return self.links[-1].hash if self.links else self.genesis.hash


@dataclass(frozen=True)
class LedgerHead:
    """The ledger's state in one signable line: what a coordinator witnesses (sequence, hash,
    cumulative epsilon, the budget, its delta and the data fingerprint it covers)."""

    genesis: str
    seq: int
    hash: str
    epsilon: float
    budget_epsilon: float
    delta: float
    accountant: str
    dataset_sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RoundPlan:
    """DP-SGD parameters for the next round and the epsilon they would lead to."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float


_COLUMNS = ", ".join(f.name for f in fields(LedgerEntry))
_PLACEHOLDERS = ", ".join("?" * (len(fields(LedgerEntry)) + 2))
_INSERT = f"INSERT OR REPLACE INTO entries ({_COLUMNS}, prev_hash, hash) VALUES ({_PLACEHOLDERS})"


def compose_epsilon(history: History, *, budget: Budget) -> float:
    """Epsilon at ``budget.delta`` of all ``(noise, sample_rate, steps)`` rounds together."""
    if not history:
        return 0.0
    accountant = create_accountant(mechanism=budget.accountant)
    accountant.history = list(history)
    with warnings.catch_warnings():
        # At the ends of the noise search RDP's best order sits on the edge of
        # Opacus's alpha grid; the bound is still valid (just loose), so don't spam.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(accountant.get_epsilon(delta=budget.delta))


def _history(entries: Sequence[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def _check_round_args(*, sample_rate: float, steps: int) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _smallest_noise(
    epsilon_at: Callable[[float], float], *, target: float, low: float, high: float
) -> tuple[float, float] | None:
    """Bisect for the least noise meeting ``target``; epsilon falls as noise grows.

    Returns ``(noise, epsilon)`` or None when even ``high`` is too little noise.
    ``not eps <= target`` also rejects NaN, so a broken accountant fails closed.
    """
    best = (high, epsilon_at(high))
    if not best[1] <= target:
        return None
    eps_low = epsilon_at(low)
    if eps_low <= target:
        return low, eps_low
    while high - low > NOISE_TOLERANCE:
        mid = (low + high) / 2
        eps = epsilon_at(mid)
        if eps <= target:
            high, best = mid, (mid, eps)
        else:
            low = mid
    return best


def _entry_hash(entry: LedgerEntry, *, prev_hash: str) -> str:
    return sha256_hex(canonical_json({**asdict(entry), "prev_hash": prev_hash}))


def _get_meta(conn: sqlite3.Connection, key: str) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else _loads(row[0])


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise LedgerError("ledger meta value is malformed") from None


def _put_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        (key, canonical_json(value)),
    )


def entry_ref(chain: LedgerChain, link: ChainLink) -> dict[str, Any]:
    """How an audit record cites a ledger entry (see `privacy.consistency`)."""
    return {
        "genesis": chain.genesis.hash,
        "seq": link.entry.id,
        "hash": link.hash,
        "status": link.entry.status,
        "epsilon": link.entry.epsilon_after,
    }


def _genesis(conn: sqlite3.Connection) -> Genesis:
    return Genesis.from_json(_get_meta(conn, "genesis"))


def _stored_budget(conn: sqlite3.Connection) -> Budget:
    stored = _get_meta(conn, "budget")
    try:
        return Budget(**stored)
    except (TypeError, LedgerError):
        raise LedgerError("stored budget is missing or malformed") from None


def _check_budget_step(entry: LedgerEntry, *, epsilon: float, delta: float, accountant: str) -> None:
    """A budget may only tighten along the chain, and the accountant never changes."""
    if entry.accountant != accountant or entry.budget_epsilon > epsilon or entry.delta > delta:
        raise LedgerError(
            f"ledger entry {entry.id}: budget (epsilon {entry.budget_epsilon:g}, delta {entry.delta:g}, "
            f"{entry.accountant}) is looser than the chain before it (epsilon {epsilon:g}, delta {delta:g}, "
            f"{accountant}); refusing"
        )


def _load_chain(conn: sqlite3.Connection) -> LedgerChain:
    """Read the genesis and all entries, refusing unless the hash chain, head and budgets are intact."""
    genesis = _genesis(conn)
    links: list[ChainLink] = []
    prev = genesis.hash
    epsilon, delta = genesis.budget.epsilon, genesis.budget.delta
    for expected_id, row in enumerate(
        conn.execute(f"SELECT {_COLUMNS}, prev_hash, hash FROM entries ORDER BY id"),
        start=1,
    ):
        entry = LedgerEntry(*row[:-2])
        if entry.id != expected_id:
            raise LedgerError(f"ledger entry {expected_id}: missing (row deleted)")
        if row[-2] != prev or row[-1] != _entry_hash(entry, prev_hash=prev):
            raise LedgerError(f"ledger entry {entry.id}: hash chain broken (row edited)")
        _check_budget_step(entry, epsilon=epsilon, delta=delta, accountant=genesis.budget.accountant)
        epsilon, delta = entry.budget_epsilon, entry.delta
        links.append(ChainLink(entry, prev, row[-1]))
        prev = row[-1]
    if _get_meta(conn, "head") != {"id": len(links), "hash": prev}:
        raise LedgerError("ledger head does not match entries (rows deleted or added outside the ledger)")
    budget = _stored_budget(conn)
    if budget.accountant != genesis.budget.accountant or budget.epsilon > epsilon or budget.delta > delta:
        raise LedgerError(
            f"stored budget (epsilon {budget.epsilon:g}, delta {budget.delta:g}) is looser than the chain's "
            f"(epsilon {epsilon:g}, delta {delta:g}): edited outside the ledger; refusing"
        )
    return LedgerChain(genesis, links, budget)


def _load(conn: sqlite3.Connection) -> list[LedgerEntry]:
    """Read all entries, refusing unless the hash chain and head are intact."""
    return [link.entry for link in _load_chain(conn).links]


def _store(conn: sqlite3.Connection, entries: Sequence[LedgerEntry], *, from_id: int) -> str:
    """Rewrite rows from ``from_id`` on with a fresh chain, then move the head; returns the head hash."""
    prev = _genesis(conn).hash
    for entry in entries:
        hash_ = _entry_hash(entry, prev_hash=prev)
        if entry.id >= from_id:
            conn.execute(_INSERT, (*astuple(entry), prev, hash_))
        prev = hash_
    _put_meta(conn, "head", {"id": len(entries), "hash": prev})
    return prev


def _reconcile_budget(conn: sqlite3.Connection, budget: Budget) -> bool:
    """The budget stored at creation may only be tightened afterwards; True if it was just tightened."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"meta", "entries"} <= tables:
        raise LedgerError("not a privacy ledger (empty, truncated or foreign file); refusing")
    stored = _get_meta(conn, "budget")
    try:
        old = Budget(**stored)
    except (TypeError, LedgerError):
        raise LedgerError("stored budget is missing or malformed") from None
    if budget.accountant != old.accountant:
        raise LedgerError(f"accountant changed from {old.accountant!r} to {budget.accountant!r}; refusing")
    if budget.epsilon > old.epsilon or budget.delta > old.delta:
        raise LedgerError(
            f"configured budget (epsilon {budget.epsilon}, delta {budget.delta:g}) is looser than "
            f"the stored lifetime budget (epsilon {old.epsilon}, delta {old.delta:g}); refusing"
        )
    if budget != old:
        _put_meta(conn, "budget", asdict(budget))
        return True
    return False


def read_budget(path: Path) -> Budget:
    """The lifetime budget stored in an existing ledger (for read-only tools like `fedseek budget`)."""
    if not path.exists():
        raise LedgerError(f"no privacy ledger at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            stored = _get_meta(conn, "budget")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: not a readable privacy ledger ({exc})") from exc
    if not isinstance(stored, dict):
        raise LedgerError(f"ledger {path} has no stored budget")
    try:
        return Budget(**stored)
    except (TypeError, LedgerError) as exc:
        raise LedgerError(f"ledger {path} has a malformed budget: {exc}") from None


def _create(path: Path, genesis: Genesis) -> bool:
    """Build a new ledger beside ``path`` and link it into place only when complete; True if this call made it.

    ``os.link`` fails if ``path`` appeared meanwhile (another process won the race), so an
    existing ledger is never replaced; a crash leaves at most a stray temp file, never a
    half-made ledger that would later read as an unspent budget.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    tmp.unlink(missing_ok=True)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            _put_meta(conn, "genesis", genesis.to_json())
            _put_meta(conn, "budget", asdict(genesis.budget))
            _put_meta(conn, "head", {"id": 0, "hash": genesis.hash})
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class PrivacyLedger:
    """Per-site record of DP-SGD rounds; every read re-verifies the whole ledger."""

    def __init__(
        self, path: Path, *, budget: Budget, dataset_sha256: str = "", audit: AuditTrail | None = None
    ) -> None:
        """Open the ledger at `path`, creating it for `budget` and the data `dataset_sha256` names if absent.

        With `audit` (the site's trail) the genesis, every budget tightening and every charge are
        recorded there as they happen, and each entry cites the audit record it followed, so
        `privacy.consistency` can hold the two chains against each other at the next start.
        """
        self._path = path
        self._budget = budget
        self._audit = audit
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists() and _create(
            path, Genesis(budget=budget, dataset_sha256=dataset_sha256, created=utc_now())
        )
        with self._session() as conn:
            tightened = _reconcile_budget(conn, budget)
            chain = _load_chain(conn)
        if created:
            self._record("ledger.genesis", chain, details={"genesis": chain.genesis.to_json()})
        elif tightened:
            self._record("ledger.budget", chain, details={"budget": asdict(budget)})

    @classmethod
    def open_existing(cls, path: Path) -> PrivacyLedger:
        """Open a ledger under its stored budget, never creating one (for read-only tools)."""
        return cls(path, budget=read_budget(path))

    @property
    def budget(self) -> Budget:
        return self._budget

    @property
    def path(self) -> Path:
        return self._path

    def chain(self) -> LedgerChain:
        """The whole verified chain: genesis, entries with their hashes, the stored budget."""
        with self._session() as conn:
            return _load_chain(conn)

    def head(self) -> LedgerHead:
        """Sequence, hash and cumulative epsilon of the chain's end, with the budget, delta and data it covers."""
        return self._head(self.chain())

    def _head(self, chain: LedgerChain) -> LedgerHead:
        return LedgerHead(
            genesis=chain.genesis.hash,
            seq=len(chain.links),
            hash=chain.head_hash,
            epsilon=self._epsilon(_history([link.entry for link in chain.links])),
            budget_epsilon=self._budget.epsilon,
            delta=self._budget.delta,
            accountant=self._budget.accountant,
            dataset_sha256=chain.genesis.dataset_sha256,
        )

    def ref(self, entry_id: int | None = None) -> dict[str, Any]:
        """What an audit record cites of entry `entry_id` (the last one if None): genesis, seq, hash,
        status and the epsilon after it."""
        chain = self.chain()
        if entry_id is None:
            entry_id = len(chain.links)
        if not 1 <= entry_id <= len(chain.links):
            raise LedgerError(f"no ledger entry {entry_id}")
        return entry_ref(chain, chain.links[entry_id - 1])

    def _record(self, action: str, chain: LedgerChain, *, details: dict[str, Any], resource: str = "") -> None:
        """Append a ledger event to the site's audit trail, if this ledger has one."""
        if self._audit is not None:
            details = {"ledger_genesis": chain.genesis.hash, **details}
            self._audit.append(actor="ledger", action=action, resource=resource, details=details)

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """One write-locked transaction, so check-then-charge is atomic across processes.

        WAL mode is persistent in the file (set at creation); setting it here would write to a
        file that may not be a ledger at all. ``synchronous=FULL`` fsyncs the WAL on commit.
        """
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=30.0)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self._path}: {exc}") from exc
        finally:
            conn.close()

    def _epsilon(self, history: History) -> float:
        return compose_epsilon(history, budget=self._budget)

    def _refusal(self, spent: float, *, reason: str) -> BudgetExceeded:
        return BudgetExceeded(
            f"privacy budget exhausted for this site: spent {spent:.2f} of "
            f"{self._budget.epsilon:.2f} (delta {self._budget.delta:g}); {reason}"
        )

    def entries(self) -> list[LedgerEntry]:
        with self._session() as conn:
            return _load(conn)

    def spent(self) -> float:
        """Epsilon at ``budget.delta`` composed over all entries (0.0 if none)."""
        return self._epsilon(_history(self.entries()))

    def plan_round(
        self,
        *,
        sample_rate: float,
        steps: int,
        rounds_left: int,
        max_noise: float = 50.0,
        run_id: str | None = None,
        share: float = 1.0,
    ) -> RoundPlan:
        """Least noise keeping this round within an equal share of what its run may still spend.

        A run may spend `share` of the budget that was left when its first round (the first entry
        with `run_id`) was charged; without `run_id`, `share` of what is left now.
        """
        _check_round_args(sample_rate=sample_rate, steps=steps)
        if rounds_left < 1:
            raise ValueError(f"rounds_left must be >= 1, got {rounds_left}")
        if not max_noise > MIN_NOISE:
            raise ValueError(f"max_noise must be > {MIN_NOISE}, got {max_noise}")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        entries = self.entries()
        history = _history(entries)
        spent = self._epsilon(history)
        if self._budget.epsilon - spent <= max(EXHAUSTED_BELOW, SPENT_BELOW * self._budget.epsilon):
            raise self._refusal(spent, reason="refusing round")
        before, ceiling = self._run_limits(entries, run_id=run_id, share=share)
        remaining = ceiling - spent
        if remaining <= max(EXHAUSTED_BELOW, SPENT_BELOW * (ceiling - before)):
            if ceiling >= self._budget.epsilon:  # the run's limit was the lifetime budget: that is what is spent
                raise self._refusal(spent, reason="refusing round")
            raise BudgetExceeded(
                f"this run's share ({share:g}) of the privacy budget is spent: epsilon {spent:.2f} of "
                f"{self._budget.epsilon:.2f} (run limit {ceiling:.2f}); refusing round"
            )
        found = _smallest_noise(
            lambda noise: self._epsilon([*history, (noise, sample_rate, steps)]),
            target=min(spent + remaining / rounds_left, ceiling),  # guard float rounding
            low=MIN_NOISE,
            high=max_noise,
        )
        if found is None:
            raise self._refusal(spent, reason=f"noise {max_noise:g} is not enough; refusing round")
        noise, eps = found
        return RoundPlan(
            noise_multiplier=noise,
            sample_rate=sample_rate,
            steps=steps,
            epsilon_after=eps,
        )

    def _run_limits(self, entries: Sequence[LedgerEntry], *, run_id: str | None, share: float) -> tuple[float, float]:
        """Epsilon spent before the run, and what the run may reach: that plus `share` of what was left."""
        start = next((i for i, e in enumerate(entries) if run_id and e.run_id == run_id), len(entries))
        before = self._epsilon(_history(entries[:start]))
        return before, min(self._budget.epsilon, before + share * (self._budget.epsilon - before))

    def charge(self, *, run_id: str, round: int, plan: RoundPlan, max_grad_norm: float) -> LedgerEntry:
        """Durably record the round before training; re-checks the budget under the lock."""
        _check_round_args(sample_rate=plan.sample_rate, steps=plan.steps)
        if not (math.isfinite(plan.noise_multiplier) and plan.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {plan.noise_multiplier}")
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
        if not run_id or round < 0:
            raise ValueError("run_id must be non-empty and round >= 0")
        audit_seq, audit_hash = self._audit.head() if self._audit is not None else (0, "")
        with self._session() as conn:
            chain = _load_chain(conn)
            entries = [link.entry for link in chain.links]
            history = _history(entries)
            epsilon_after = self._epsilon([*history, (plan.noise_multiplier, plan.sample_rate, plan.steps)])
            if not epsilon_after <= self._budget.epsilon:
                raise self._refusal(
                    self._epsilon(history),
                    reason=f"round would reach {epsilon_after:.2f}; refusing charge",
                )
            entry = LedgerEntry(
                id=len(entries) + 1,
                run_id=run_id,
                round=round,
                steps=plan.steps,
                sample_rate=plan.sample_rate,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=max_grad_norm,
                accountant=self._budget.accountant,
                delta=self._budget.delta,
                epsilon_after=epsilon_after,
                status="charged",
                ts=utc_now(),
                budget_epsilon=self._budget.epsilon,
                audit_seq=audit_seq,
                audit_hash=audit_hash,
            )
            link = ChainLink(entry, chain.head_hash, _store(conn, [*entries, entry], from_id=entry.id))
        # After the commit: a crash in between leaves a charge the audit trail lacks, which only over-counts.
        self._record(
            "ledger.charge",
            chain,
            resource=run_id,
            details={
                "ledger": entry_ref(chain, link),
                "round": round,
                "steps": plan.steps,
                "sample_rate": plan.sample_rate,
                "noise_multiplier": plan.noise_multiplier,
                "max_grad_norm": max_grad_norm,
            },
        )
        return entry

    def complete(self, entry_id: int, *, steps: int) -> LedgerEntry:
        """Mark a charged round done; more steps than charged would under-count, so refuse."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        with self._session() as conn:
            entries = _load(conn)
            if not 1 <= entry_id <= len(entries):
                raise LedgerError(f"no ledger entry {entry_id}")
            entry = entries[entry_id - 1]
            if entry.status != "charged":
                raise LedgerError(f"ledger entry {entry_id} is already {entry.status}")
            if steps > entry.steps:
                raise LedgerError(
                    f"ledger entry {entry_id}: training ran {steps} steps but only {entry.steps} were charged"
                )
            done = replace(entry, status="completed", steps_completed=steps)
            entries[entry_id - 1] = done
            _store(conn, entries, from_id=entry_id)
        return done

    def to_json(self) -> dict[str, Any]:
        """Everything an auditor needs to recompute epsilon with an independent accountant.

        Entries carry each round's (steps, sample rate, noise multiplier); with the RDP
        accountant the orders it minimises over are listed too, since the epsilon bound
        depends on that grid.
        """
        chain = self.chain()
        head = self._head(chain)
        spent = head.epsilon
        report: dict[str, Any] = {
            "epsilon_spent": spent,
            "epsilon_remaining": max(0.0, self._budget.epsilon - spent),
            "delta": self._budget.delta,
            "budget_epsilon": self._budget.epsilon,
            "accountant": self._budget.accountant,
            "entries": [asdict(link.entry) for link in chain.links],
            "head": head.to_json(),  # what a witness signs: the chain's end, the budget and data it covers
        }
        if self._budget.accountant == "rdp":
            report["rdp_orders"] = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]
        return report
