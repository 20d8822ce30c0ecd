"""Persisted per-site privacy budget ledger that fails closed.

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

Budgets are accounted per data partition (one per ingestion batch, named by the sha256 of its
bytes): the genesis commits the first, and each later one is a `partition` entry in the same
chain, added only by `add_partition` (the audited operator command `fedseek budget
add-partition`), which refuses a fingerprint the chain already holds. A round entry names the
partitions whose records it sampled, and a partition's epsilon composes only the rounds that name
it, so a record's privacy loss is that of its own partition. A ledger written before partitions
(format 2) reads as one partition named by its genesis fingerprint: its rows hash as they did.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sqlite3
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant, create_accountant  # type: ignore[import-untyped,unused-ignore]
from opacus.accountants.analysis import rdp as rdp_analysis  # type: ignore[import-untyped,unused-ignore]

from federation.errors import Conflict, InvalidInput
from federation.ops.atomic import fsync_dir
from privacy.audit import AuditTrail, canonical_json, sha256_hex, utc_now

SUPPORTED_ACCOUNTANTS = ("rdp", "prv")
MIN_NOISE = 0.3
NOISE_TOLERANCE = 1e-3

NOISE_SCHEDULES = ("constant", "equal-epsilon")
"""How `PrivacyLedger.plan_round` spreads a run's epsilon over its rounds. "constant": the least noise
that, used in this round and every round left, brings each sampled partition to its run limit; so
every round of a run gets the same noise (a round re-planned later finds the same). "equal-epsilon":
each round raises epsilon by an equal share of what is left. Composition grows sublinearly, so equal
epsilon steps force the first round's noise far above the later ones': at 8 rounds of 20 steps at
q 0.05 the multiplier fell from 8.64 in round 1 to 2.20 in round 8 (bench/usefulness.py, H100,
2026-12-06), so round 1 trained on almost pure noise; constant noise spends the same epsilon (1.0,
delta 1e-5) with 2.80 in every round, and makes 12 such rounds possible (3.33; equal epsilon would
need more than the 50 cap in round 1). Both end the run at the same epsilon."""
EXHAUSTED_BELOW = 1e-6
SPENT_BELOW = 0.01
"""A budget, the site's or a run's share of it, counts as spent once less than this part of it is left
(a last round's plan lands just under its limit; a round on the crumbs would be nearly all noise)."""

History = Sequence[tuple[float, float, int]]

FORMAT = 3
"""Ledgers written now; format 2 (one dataset, no partition entries) still opens, as one partition."""
ROUND, PARTITION = "round", "partition"
"""The two kinds of chain entry: a charged DP-SGD round, and a data partition registered."""
_FINGERPRINT = re.compile(r"^[a-z0-9-]+:[0-9a-f]{64}$")
_NEW_COLUMNS = {
    "kind": "TEXT NOT NULL DEFAULT 'round'",
    "partitions": "TEXT NOT NULL DEFAULT '[]'",
    "label": "TEXT NOT NULL DEFAULT ''",
}
"""Columns format 3 added, with the value a format-2 row reads as; a row holding these defaults hashes
without them, exactly as format 2 hashed it."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, round INTEGER NOT NULL,
        steps INTEGER NOT NULL, sample_rate REAL NOT NULL,
        noise_multiplier REAL NOT NULL, max_grad_norm REAL NOT NULL,
        accountant TEXT NOT NULL, delta REAL NOT NULL, epsilon_after REAL NOT NULL,
        status TEXT NOT NULL, ts TEXT NOT NULL, steps_completed INTEGER,
        budget_epsilon REAL NOT NULL, audit_seq INTEGER NOT NULL, audit_hash TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'round',
        partitions TEXT NOT NULL DEFAULT '[]', label TEXT NOT NULL DEFAULT '')""",
)


class BudgetExceeded(Conflict):
    """The site's lifetime privacy budget does not allow this round."""

    default_code = "BudgetExceeded"  # the codes /internal/train has always answered with


class LedgerError(Conflict):
    """The ledger failed its integrity check or was given a bad configuration."""

    default_code = "LedgerError"


class PartitionExists(Conflict):
    """A data partition whose fingerprint the ledger already holds: its records never get a fresh budget."""

    default_code = "PartitionExists"


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
    kind: str = ROUND
    """`round` (a charged DP-SGD round) or `partition` (a data partition registered; no steps)."""
    partitions: tuple[str, ...] = ()
    """A round: the fingerprints of the partitions it sampled (empty: the genesis data, a format-2 row).
    A partition entry: the one fingerprint it registers."""
    label: str = ""
    """A partition entry: the operator's name for the batch (its file name)."""


@dataclass(frozen=True)
class Genesis:
    """What a ledger was created for; its hash is the first entry's `prev_hash`, so every entry chains over it."""

    budget: Budget
    dataset_sha256: str
    created: str
    format: int = FORMAT

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
        if genesis.format not in (2, FORMAT):
            raise LedgerError(f"ledger format {genesis.format} is not one this FedSeek reads (2, {FORMAT}); refusing")
        return genesis


@dataclass(frozen=True)
class ChainLink:
    """One entry as stored: the entry, the hash before it and its own hash."""

    entry: LedgerEntry
    prev_hash: str
    hash: str

    @property
    def seq(self) -> int:
        return self.entry.id

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

    def fingerprints(self) -> list[str]:
        """Every data partition the chain holds, in the order registered (the genesis's first)."""
        added = [link.entry.partitions[0] for link in self.links if link.entry.kind == PARTITION]
        return [self.genesis.dataset_sha256, *added]


@dataclass(frozen=True)
class LedgerHead:
    """The ledger's state in one signable line: what a coordinator witnesses (sequence, hash,
    cumulative epsilon, the budget, its delta and the data fingerprint it covers). `epsilon` is the
    highest of any data partition; `dataset_sha256` is the genesis's (later partitions are chain entries)."""

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
    """The highest epsilon of any partition the round samples, after it."""
    partitions: tuple[str, ...] = ()
    """The partitions whose records the round may sample (empty: every partition the ledger holds)."""


@dataclass(frozen=True)
class PartitionAccount:
    """One data partition's privacy account: only the rounds that sampled it, composed.

    `run_limit` is what it may reach by the end of the run it was asked for (what it had spent
    before that run plus the run's share of what was left then); `room` is what it may still spend
    in that run.
    """

    sha256: str
    label: str
    seq: int
    """The chain entry that registered it (0: the genesis)."""
    added: str
    rounds: int
    epsilon: float
    budget_epsilon: float
    before_run: float
    run_limit: float
    history: tuple[tuple[float, float, int], ...] = field(default=(), repr=False)

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget_epsilon - self.epsilon)

    @property
    def retired(self) -> bool:
        """Spent for good: less than `SPENT_BELOW` of the budget is left (a round on crumbs is nearly all noise)."""
        return self.budget_epsilon - self.epsilon <= max(EXHAUSTED_BELOW, SPENT_BELOW * self.budget_epsilon)

    @property
    def room(self) -> float:
        return self.run_limit - self.epsilon

    @property
    def run_spent(self) -> bool:
        return self.room <= max(EXHAUSTED_BELOW, SPENT_BELOW * (self.run_limit - self.before_run))

    @property
    def open(self) -> bool:
        """Whether a round of the run may still sample it."""
        return not self.retired and not self.run_spent


_FIELD_NAMES = [f.name for f in fields(LedgerEntry)]
_COLUMNS = ", ".join(_FIELD_NAMES)
_PLACEHOLDERS = ", ".join("?" * (len(fields(LedgerEntry)) + 2))
_INSERT = f"INSERT OR REPLACE INTO entries ({_COLUMNS}, prev_hash, hash) VALUES ({_PLACEHOLDERS})"


@functools.lru_cache(maxsize=4096)
def _rdp_step(sample_rate: float, noise: float) -> Any:
    """One step's RDP at Opacus's orders; cached, since every partition's history repeats the same rounds
    and a noise search revisits the same points (Opacus computes `steps` times this very vector)."""
    vector = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    vector.setflags(write=False)
    return vector


def _rdp(history: History) -> Any:
    """The RDP vector of a history, summed in the order Opacus's RDPAccountant sums it (so equal to the bit)."""
    return sum([_rdp_step(q, noise) * steps for noise, q, steps in history])


def _rdp_epsilon(rdp: Any, *, delta: float) -> float:
    with warnings.catch_warnings():
        # At the ends of the noise search RDP's best order sits on the edge of
        # Opacus's alpha grid; the bound is still valid (just loose), so don't spam.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def compose_epsilon(history: History, *, budget: Budget) -> float:
    """Epsilon at ``budget.delta`` of all ``(noise, sample_rate, steps)`` rounds together.

    RDP is Opacus's RDPAccountant computation with each step's vector cached; PRV is Opacus's accountant.
    """
    if not history:
        return 0.0
    if budget.accountant == "rdp":
        return _rdp_epsilon(_rdp(history), delta=budget.delta)
    accountant = create_accountant(mechanism=budget.accountant)
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(accountant.get_epsilon(delta=budget.delta))


def _epsilons_with(
    histories: Sequence[History], *, budget: Budget
) -> Callable[[tuple[float, float, int]], list[float]]:
    """Each history's epsilon with one more round: the partitions' sums are made once per noise search."""
    if budget.accountant != "rdp":
        return lambda rnd: [compose_epsilon([*h, rnd], budget=budget) for h in histories]
    bases = [_rdp(h) for h in histories]  # sum([a, b, new]) == sum([a, b]) + new, bit for bit
    return lambda rnd: [_rdp_epsilon(base + _rdp([rnd]), delta=budget.delta) for base in bases]


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


def _worst_ratio(epsilons: Sequence[float], targets: Sequence[float]) -> float:
    """max(epsilon / target) over the partitions, above 1 exactly when some epsilon exceeds its target
    (a rounded quotient must not let an epsilon one ulp over its target pass); NaN stays NaN."""
    pairs = list(zip(epsilons, targets, strict=True))
    ratio = max(e / t if t > 0 else math.inf for e, t in pairs)
    if any(e > t for e, t in pairs):
        ratio = max(ratio, math.nextafter(1.0, 2.0))
    if any(math.isnan(e) for e, _ in pairs):
        return math.nan
    return ratio


def _entry_hash(entry: LedgerEntry, *, prev_hash: str) -> str:
    """The entry's hash over all its fields and the hash before it; a field format 3 added is left out
    while it holds the value a format-2 row reads as, so format-2 rows keep their hashes."""
    body = {**asdict(entry), "prev_hash": prev_hash}
    for name, default in _LEGACY_VALUES.items():
        if body[name] == default:
            del body[name]
    return sha256_hex(canonical_json(body))


_LEGACY_VALUES: dict[str, Any] = {"kind": ROUND, "partitions": (), "label": ""}


def _entry_of(values: Sequence[Any]) -> LedgerEntry:
    """A stored row (the columns of `LedgerEntry`, in order) as an entry; `partitions` is JSON text."""
    raw = dict(zip(_FIELD_NAMES, values, strict=True))
    try:
        partitions = json.loads(raw["partitions"])
    except (TypeError, json.JSONDecodeError):
        partitions = None
    if not isinstance(partitions, list) or not all(isinstance(p, str) for p in partitions):
        raise LedgerError(f"ledger entry {raw['id']}: malformed partitions; refusing")
    return LedgerEntry(**{**raw, "partitions": tuple(partitions)})


def _row_of(entry: LedgerEntry) -> tuple[Any, ...]:
    return tuple(canonical_json(list(v)) if isinstance(v, tuple) else v for v in astuple(entry))


def _select(conn: sqlite3.Connection) -> str:
    """The entries query; a format-2 table lacks the columns format 3 added, which read as their defaults."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    missing = [n for n in _FIELD_NAMES if n not in have and n not in _NEW_COLUMNS]
    if missing or not {"prev_hash", "hash"} <= have:
        raise LedgerError("not a privacy ledger (its entries table lacks columns); refusing")
    columns = [n if n in have else f"{_NEW_COLUMNS[n].rsplit('DEFAULT ', 1)[1]} AS {n}" for n in _FIELD_NAMES]
    return f"SELECT {', '.join(columns)}, prev_hash, hash FROM entries ORDER BY id"


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns format 3 introduced to a format-2 table before writing to it (rows keep their values)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    for name, declaration in _NEW_COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE entries ADD COLUMN {name} {declaration}")


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
    """Read the genesis and all entries, refusing unless the hash chain, head, budgets and partitions are intact."""
    genesis = _genesis(conn)
    links: list[ChainLink] = []
    prev = genesis.hash
    epsilon, delta = genesis.budget.epsilon, genesis.budget.delta
    known = {genesis.dataset_sha256}
    for expected_id, row in enumerate(conn.execute(_select(conn)), start=1):
        entry = _entry_of(row[:-2])
        if entry.id != expected_id:
            raise LedgerError(f"ledger entry {expected_id}: missing (row deleted)")
        if row[-2] != prev or row[-1] != _entry_hash(entry, prev_hash=prev):
            raise LedgerError(f"ledger entry {entry.id}: hash chain broken (row edited)")
        _check_budget_step(entry, epsilon=epsilon, delta=delta, accountant=genesis.budget.accountant)
        _check_partitions(entry, known=known, first=genesis.dataset_sha256)
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


def _check_partitions(entry: LedgerEntry, *, known: set[str], first: str) -> None:
    """A partition is registered once; a round samples registered partitions only, each once."""
    if entry.kind == PARTITION:
        if len(entry.partitions) != 1 or entry.status != "added":
            raise LedgerError(f"ledger entry {entry.id}: malformed partition entry; refusing")
        if entry.partitions[0] in known:
            raise LedgerError(
                f"ledger entry {entry.id}: partition {entry.partitions[0][:19]} registered twice; refusing"
            )
        known.add(entry.partitions[0])
    elif entry.kind == ROUND:
        if not entry.partitions and known != {first}:
            raise LedgerError(f"ledger entry {entry.id}: a round that names no partition after partitions were added")
        if len(set(entry.partitions)) != len(entry.partitions) or not set(entry.partitions) <= known:
            raise LedgerError(f"ledger entry {entry.id}: samples a partition the chain does not hold; refusing")
    else:
        raise LedgerError(f"ledger entry {entry.id}: unknown kind {entry.kind!r}; refusing")


def _accounts(
    chain: LedgerChain, budget: Budget, *, run_id: str | None = None, share: float = 1.0
) -> list[PartitionAccount]:
    """Every partition's account, in the order registered; run limits for `run_id` (None: a new run)."""
    first = chain.genesis.dataset_sha256
    meta: dict[str, tuple[str, int, str]] = {first: ("", 0, chain.genesis.created)}
    histories: dict[str, list[tuple[float, float, int]]] = {first: []}
    before: dict[str, int] = {first: 0}
    started = False
    for link in chain.links:
        entry = link.entry
        started = started or (bool(run_id) and entry.run_id == run_id and entry.kind == ROUND)
        if entry.kind == PARTITION:
            sha = entry.partitions[0]
            meta[sha] = (entry.label, entry.id, entry.ts)
            histories[sha], before[sha] = [], 0
            continue
        for sha in entry.partitions or (first,):
            histories[sha].append((entry.noise_multiplier, entry.sample_rate, entry.steps))
            if not started:
                before[sha] = len(histories[sha])
    accounts = []
    for sha, history in histories.items():
        label, seq, added = meta[sha]
        spent_before = compose_epsilon(history[: before[sha]], budget=budget)
        accounts.append(
            PartitionAccount(
                sha256=sha,
                label=label,
                seq=seq,
                added=added,
                rounds=len(history),
                epsilon=compose_epsilon(history, budget=budget),
                budget_epsilon=budget.epsilon,
                before_run=spent_before,
                run_limit=min(budget.epsilon, spent_before + share * (budget.epsilon - spent_before)),
                history=tuple(history),
            )
        )
    return accounts


def _load(conn: sqlite3.Connection) -> list[LedgerEntry]:
    """Read all entries, refusing unless the hash chain and head are intact."""
    return [link.entry for link in _load_chain(conn).links]


def _store(conn: sqlite3.Connection, entries: Sequence[LedgerEntry], *, from_id: int) -> str:
    """Rewrite rows from ``from_id`` on with a fresh chain, then move the head; returns the head hash."""
    _migrate(conn)
    prev = _genesis(conn).hash
    for entry in entries:
        hash_ = _entry_hash(entry, prev_hash=prev)
        if entry.id >= from_id:
            conn.execute(_INSERT, (*_row_of(entry), prev, hash_))
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
        self.created = created  # this call made it: the node then registers the other batches it started with
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
            epsilon=max(a.epsilon for a in _accounts(chain, self._budget)),
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

    def _record(
        self, action: str, chain: LedgerChain, *, details: dict[str, Any], resource: str = "", actor: str = "ledger"
    ) -> None:
        """Append a ledger event to the site's audit trail, if this ledger has one."""
        if self._audit is not None:
            details = {"ledger_genesis": chain.genesis.hash, **details}
            self._audit.append(actor=actor, action=action, resource=resource, details=details)

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

    def _refusal(self, spent: float, *, reason: str) -> BudgetExceeded:
        return BudgetExceeded(
            f"privacy budget exhausted for this site: spent {spent:.2f} of "
            f"{self._budget.epsilon:.2f} (delta {self._budget.delta:g}); {reason}"
        )

    def entries(self) -> list[LedgerEntry]:
        with self._session() as conn:
            return _load(conn)

    def spent(self) -> float:
        """The highest epsilon (at ``budget.delta``) of any partition: what the most exposed record has spent."""
        return max(a.epsilon for a in self.partitions())

    def remaining(self) -> float:
        """The most epsilon any partition has left (a fresh partition: the whole budget)."""
        return max(a.remaining for a in self.partitions())

    def partitions(self, *, run_id: str | None = None, share: float = 1.0) -> list[PartitionAccount]:
        """Every data partition's account in the order registered, with its limit for run `run_id`
        at `share` (None: a run that has not started)."""
        return _accounts(self.chain(), self._budget, run_id=run_id, share=share)

    def plan_round(
        self,
        *,
        sample_rate: float,
        steps: int,
        rounds_left: int,
        max_noise: float = 50.0,
        run_id: str | None = None,
        share: float = 1.0,
        partitions: Collection[str] | None = None,
        schedule: str = "constant",
    ) -> RoundPlan:
        """Least noise keeping every partition the round samples within what its run may still spend
        on it, spread over `rounds_left` rounds (this one included) as `schedule` says (NOISE_SCHEDULES).

        `partitions`: those the round may sample (None: every one the ledger holds); retired ones and
        ones whose run share is spent are left out, and `RoundPlan.partitions` names the rest. A run may
        spend `share` of what each partition had left when the run's first round (the first entry with
        `run_id`) was charged; without `run_id`, `share` of what is left now.
        """
        _check_round_args(sample_rate=sample_rate, steps=steps)
        if rounds_left < 1:
            raise ValueError(f"rounds_left must be >= 1, got {rounds_left}")
        if not max_noise > MIN_NOISE:
            raise ValueError(f"max_noise must be > {MIN_NOISE}, got {max_noise}")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        if schedule not in NOISE_SCHEDULES:
            raise ValueError(f"schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")
        accounts = self._asked(self.partitions(run_id=run_id, share=share), partitions)
        live = [a for a in accounts if not a.retired]
        if not live:
            raise self._refusal(max(a.epsilon for a in accounts), reason=self._spent_reason(accounts))
        eligible = [a for a in live if not a.run_spent]
        if not eligible:
            first = live[0]
            if first.run_limit >= self._budget.epsilon:  # the run's limit was the lifetime budget: that is spent
                raise self._refusal(first.epsilon, reason="refusing round")
            raise BudgetExceeded(
                f"this run's share ({share:g}) of the privacy budget is spent: epsilon {first.epsilon:.2f} of "
                f"{self._budget.epsilon:.2f} (run limit {first.run_limit:.2f}); refusing round"
            )
        after = _epsilons_with([a.history for a in eligible], budget=self._budget)
        if schedule == "constant":  # the rounds left at one noise (their steps add up) end at the run limit
            targets = [min(a.epsilon + a.room, a.run_limit) for a in eligible]  # min: float rounding
            span = steps * rounds_left
        else:
            targets = [min(a.epsilon + a.room / rounds_left, a.run_limit) for a in eligible]
            span = steps
        found = _smallest_noise(
            lambda noise: _worst_ratio(after((noise, sample_rate, span)), targets),
            target=1.0,
            low=MIN_NOISE,
            high=max_noise,
        )
        if found is None:
            spent = max(a.epsilon for a in eligible)
            raise self._refusal(spent, reason=f"noise {max_noise:g} is not enough; refusing round")
        noise = found[0]
        return RoundPlan(
            noise_multiplier=noise,
            sample_rate=sample_rate,
            steps=steps,
            epsilon_after=max(after((noise, sample_rate, steps))),
            partitions=tuple(a.sha256 for a in eligible),
        )

    @staticmethod
    def _asked(accounts: list[PartitionAccount], partitions: Collection[str] | None) -> list[PartitionAccount]:
        if partitions is None:
            return accounts
        wanted = set(partitions)
        if not wanted:
            raise ValueError("partitions must name at least one partition (None: all of them)")
        unknown = wanted - {a.sha256 for a in accounts}
        if unknown:
            raise LedgerError(f"data partition {min(unknown)[:19]} is not registered in this ledger; refusing round")
        return [a for a in accounts if a.sha256 in wanted]

    @staticmethod
    def _spent_reason(accounts: Sequence[PartitionAccount]) -> str:
        if len(accounts) == 1:
            return "refusing round"
        return (
            f"all {len(accounts)} data partitions are spent (new data gets a budget through "
            "`fedseek budget add-partition`); refusing round"
        )

    def charge(self, *, run_id: str, round: int, plan: RoundPlan, max_grad_norm: float) -> LedgerEntry:
        """Durably record the round before training; re-checks every sampled partition's budget under the lock.

        A plan that names no partitions charges every partition the ledger holds (over-counting is safe).
        """
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
            accounts = _accounts(chain, self._budget)
            sampled = self._asked(accounts, plan.partitions or None)
            this_round = (plan.noise_multiplier, plan.sample_rate, plan.steps)
            after = _epsilons_with([a.history for a in sampled], budget=self._budget)(this_round)
            for account, epsilon in zip(sampled, after, strict=True):
                if not epsilon <= self._budget.epsilon:
                    raise self._refusal(account.epsilon, reason=f"round would reach {epsilon:.2f}; refusing charge")
            untouched = [a.epsilon for a in accounts if a not in sampled]
            entries = [link.entry for link in chain.links]
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
                epsilon_after=max([*after, *untouched]),
                status="charged",
                ts=utc_now(),
                budget_epsilon=self._budget.epsilon,
                audit_seq=audit_seq,
                audit_hash=audit_hash,
                partitions=tuple(a.sha256 for a in sampled),
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
                "partitions": list(entry.partitions),
            },
        )
        return entry

    def add_partition(
        self, sha256: str, *, label: str = "", actor: str = "operator", details: Mapping[str, Any] | None = None
    ) -> LedgerEntry:
        """Register a new data partition (an ingestion batch, named by the sha256 of its bytes) with a full budget.

        A fingerprint the chain already holds, the genesis's included, is refused (PartitionExists, 409):
        data already accounted for never gets a fresh budget. Both outcomes are audited as `actor`'s
        (`ledger.partition` / `ledger.partition.refused`), with `details` (what the operator named).
        """
        if not _FINGERPRINT.match(sha256):
            raise InvalidInput(f"a partition fingerprint looks like sha256:<64 hex digits>, got {sha256[:80]!r}")
        extra = {"partition": sha256, "label": label, **(details or {})}
        audit_seq, audit_hash = self._audit.head() if self._audit is not None else (0, "")
        refusal: PartitionExists | None = None
        with self._session() as conn:
            chain = _load_chain(conn)
            accounts = {a.sha256: a for a in _accounts(chain, self._budget)}
            if sha256 in accounts:
                held = accounts[sha256]
                where = f"entry {held.seq}" if held.seq else "the ledger's genesis"
                refusal = PartitionExists(
                    f"data partition {sha256[:19]} is already in this ledger ({where}, added {held.added}, epsilon "
                    f"{held.epsilon:.4f} spent): data already accounted for never gets a fresh budget; refusing"
                )
            else:
                entries = [link.entry for link in chain.links]
                entry = LedgerEntry(
                    id=len(entries) + 1,
                    run_id="",
                    round=0,
                    steps=0,
                    sample_rate=0.0,
                    noise_multiplier=0.0,
                    max_grad_norm=0.0,
                    accountant=self._budget.accountant,
                    delta=self._budget.delta,
                    epsilon_after=max(a.epsilon for a in accounts.values()),
                    status="added",
                    ts=utc_now(),
                    budget_epsilon=self._budget.epsilon,
                    audit_seq=audit_seq,
                    audit_hash=audit_hash,
                    kind=PARTITION,
                    partitions=(sha256,),
                    label=label,
                )
                link = ChainLink(entry, chain.head_hash, _store(conn, [*entries, entry], from_id=entry.id))
        if refusal is not None:
            self._record("ledger.partition.refused", chain, actor=actor, details={**extra, "error": refusal.one_line()})
            raise refusal
        self._record("ledger.partition", chain, actor=actor, details={"ledger": entry_ref(chain, link), **extra})
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
        """Everything an auditor needs to recompute every partition's epsilon with an independent accountant.

        Entries carry each round's (steps, sample rate, noise multiplier) and the partitions it sampled;
        each partition lists its epsilon after every round that sampled it. With the RDP accountant the
        orders it minimises over are listed too, since the epsilon bound depends on that grid.
        `epsilon_spent` is the highest epsilon of any partition, `epsilon_remaining` the most any has left.
        """
        chain = self.chain()
        head = self._head(chain)
        accounts = _accounts(chain, self._budget)
        report: dict[str, Any] = {
            "epsilon_spent": head.epsilon,
            "epsilon_remaining": max(a.remaining for a in accounts),
            "delta": self._budget.delta,
            "budget_epsilon": self._budget.epsilon,
            "accountant": self._budget.accountant,
            "partitions": [self._partition_json(a, chain) for a in accounts],
            "entries": [{**asdict(link.entry), "partitions": list(link.entry.partitions)} for link in chain.links],
            "head": head.to_json(),  # what a witness signs: the chain's end, the budget and data it covers
        }
        if self._budget.accountant == "rdp":
            report["rdp_orders"] = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]
        return report

    def _partition_json(self, account: PartitionAccount, chain: LedgerChain) -> dict[str, Any]:
        """One partition for `to_json`: its fingerprint, state and epsilon after each round that sampled it."""
        first = chain.genesis.dataset_sha256
        rounds = [
            link.entry.id
            for link in chain.links
            if link.entry.kind == ROUND and account.sha256 in (link.entry.partitions or (first,))
        ]
        trajectory = [
            [seq, compose_epsilon(account.history[: i + 1], budget=self._budget)] for i, seq in enumerate(rounds)
        ]
        return {
            "sha256": account.sha256,
            "label": account.label,
            "seq": account.seq,
            "added": account.added,
            "rounds": account.rounds,
            "epsilon": account.epsilon,
            "epsilon_remaining": account.remaining,
            "status": "retired" if account.retired else "active",
            "trajectory": trajectory,
        }
