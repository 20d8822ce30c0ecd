"""The coordinator as witness: every signed statement a site made about its own state, kept per site and kind.

A site's ledger (and its audit log) live on the site's disk, where an insider with write access
can delete, roll back or re-chain them together with every local cross-check. What the site has
already *told* the consortium, signed with its node key, cannot be taken back that way: the
coordinator keeps each accepted statement here, and the next one must extend it.

One file per site and kind, `<witness>/<site>/<kind>.jsonl`, one signed statement per line as the
site sent it (so anyone holding the site's public key can re-verify the whole record later), each
line wrapped with the time it was witnessed. Files are 0600 in 0700 directories and every append
is fsynced (file, and directory on creation): a witnessed head must survive a coordinator crash,
or a rollback right after one would pass.

The store is generic: it neither verifies signatures nor knows what a kind means; callers
(`ledger.head` checks below, the audit checkpoints of kind `audit.checkpoint`) verify first and
record what they accepted.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from federation.errors import Conflict, FedSeekError, InvalidInput
from federation.ops.atomic import fsync_dir, private_dir
from federation.ops.layout import CoordinatorLayout
from federation.protocol import records
from federation.protocol.names import check_name
from federation.security.signed_statement import StatementError, load_public_key, verify_statement
from privacy.audit import AuditTrail, canonical_json, sha256_hex, utc_now

__all__ = [
    "GENESIS_ACCEPTED",
    "LEDGER_HEAD",
    "HeadClaim",
    "LedgerWitness",
    "WitnessRefused",
    "WitnessStore",
    "WitnessStoreError",
    "check_extends",
    "coordinator_witness",
]

_KIND_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


class WitnessStoreError(FedSeekError):
    """The witness store cannot be read or written (a damaged line, a full disk): the round must stop."""


@dataclass
class _Tail:
    """What a store file held when last read: where that reading ended, and the last entry per note."""

    ino: int
    offset: int = 0
    lines: int = 0
    latest: dict[str | None, tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=dict)


class WitnessStore:
    """Append-only JSONL of accepted signed statements per site and kind, under `root` (`CoordinatorLayout.witness`).

    A site pushes an audit checkpoint about once a minute while its log grows: some 500,000 lines a
    year. The checks that run on every push need only the latest entries, so `latest_by_note`
    keeps, per file, the last entry of each note and the offset read so far, and reads only what
    was appended since (a replaced or shorter file is read again from the start). `entries` still
    reads the whole file, for the operator's commands.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tails: dict[Path, _Tail] = {}
        self._tails_lock = threading.Lock()

    def _path(self, site: str, kind: str) -> Path:
        check_name(site, what="site")
        if not isinstance(kind, str) or _KIND_RE.fullmatch(kind) is None or ".." in kind:
            raise InvalidInput(f"invalid statement kind {kind!r}: lowercase letters, digits, '.', '_' or '-'")
        return self.root / site / f"{kind}.jsonl"

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        # One writer at a time per file: the strategy and an operator command may both append.
        lock = path.with_name(path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record(self, site: str, kind: str, statement: Mapping[str, Any], *, note: str | None = None) -> dict[str, Any]:
        """Append `statement` (already verified by the caller) for `site`; returns the stored entry."""
        path = self._path(site, kind)
        private_dir(self.root)
        created = not path.parent.is_dir()
        private_dir(path.parent)
        if created:
            fsync_dir(self.root)
        entry: dict[str, Any] = {"witnessed_at": utc_now(), "site": site, "kind": kind, "statement": dict(statement)}
        if note is not None:
            entry["note"] = note
        line = (canonical_json(entry) + "\n").encode("utf-8")
        with self._locked(path):
            new_file = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if new_file:
                fsync_dir(path.parent)
        return entry

    def entries(self, site: str, kind: str) -> list[dict[str, Any]]:
        """Every stored entry (`witnessed_at`, `site`, `kind`, `statement`, maybe `note`), oldest first."""
        path = self._path(site, kind)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise WitnessStoreError(f"witness store {path}: {exc.strerror or exc}") from exc
        lines = enumerate(text.splitlines(), 1)
        return [_parse_entry(path, n, line) for n, line in lines if line.strip()]

    def latest_by_note(self, site: str, kind: str) -> dict[str | None, tuple[int, dict[str, Any]]]:
        """The last stored entry of each `note` (None: entries without one) with its line number, reading
        only the lines appended since the previous call."""
        path = self._path(site, kind)
        with self._tails_lock:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._tails.pop(path, None)
                return {}
            except OSError as exc:
                raise WitnessStoreError(f"witness store {path}: {exc.strerror or exc}") from exc
            try:
                st = os.fstat(fd)
                tail = self._tails.get(path)
                if tail is None or tail.ino != st.st_ino or st.st_size < tail.offset:
                    tail = _Tail(ino=st.st_ino)  # new, replaced or cut: read it whole
                size = st.st_size - tail.offset
                data = bytearray()
                while len(data) < size and (chunk := os.pread(fd, size - len(data), tail.offset + len(data))):
                    data += chunk
            except OSError as exc:
                raise WitnessStoreError(f"witness store {path}: {exc.strerror or exc}") from exc
            finally:
                os.close(fd)
            whole = bytes(data[: data.rfind(b"\n") + 1])  # a line still being appended is read the next time
            for raw in whole.split(b"\n")[:-1]:
                tail.lines += 1
                if raw.strip():
                    entry = _parse_entry(path, tail.lines, raw.decode("utf-8"))
                    tail.latest[entry.get("note")] = (tail.lines, entry)
            tail.offset += len(whole)
            self._tails[path] = tail
            return dict(tail.latest)

    def statements(self, site: str, kind: str) -> list[dict[str, Any]]:
        """Every accepted signed statement of `kind` from `site`, oldest first."""
        return [e["statement"] for e in self.entries(site, kind)]

    def latest(self, site: str, kind: str) -> dict[str, Any] | None:
        """The last accepted signed statement of `kind` from `site`, or None if none was ever witnessed."""
        last = max(self.latest_by_note(site, kind).values(), key=lambda numbered: numbered[0], default=None)
        return last[1]["statement"] if last is not None else None

    def sites(self) -> list[str]:
        """Sites with any witnessed statement."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())


def _parse_entry(path: Path, n: int, line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WitnessStoreError(f"witness store {path} line {n}: not JSON ({exc.msg})") from exc
    if not isinstance(entry, dict) or not isinstance(entry.get("statement"), dict):
        raise WitnessStoreError(f"witness store {path} line {n}: not a witnessed statement")
    return entry


# ---- the ledger head: what a site's signed `ledger.head` statement must show ----------------------

LEDGER_HEAD = records.LEDGER_HEAD
GENESIS_ACCEPTED = "ledger.genesis-accepted"
"""An operator's decision (`fedseek witness accept-genesis`) that a site may start a new ledger for new data."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_EPSILON_SLACK = 1e-9  # float noise between two compositions of the same history


def fingerprint(value: object) -> str:
    """A data fingerprint as compared here: the sha256 hex digest, with or without its `sha256:` prefix
    (the node's dataset fingerprint carries it); "" if `value` is none."""
    text = str(value or "").strip().lower()
    return text.removeprefix("sha256:")


class WitnessRefused(Conflict):
    """A site's ledger does not extend what the coordinator witnessed (reset, rollback, fork), or its
    statement is missing, unsigned or malformed: the site is left out of the round (409)."""

    default_code = "WitnessRefused"


@dataclass(frozen=True)
class HeadClaim:
    """A `ledger.head` payload, parsed: the site, its head (as `PrivacyLedger.head().to_json()`), the
    genesis record the head's `genesis` hash covers, and every entry hash from the first to the head."""

    site: str
    head: dict[str, Any]
    genesis_record: dict[str, Any]
    chain: tuple[str, ...]

    @property
    def genesis(self) -> str:
        return str(self.head["genesis"])

    @property
    def seq(self) -> int:
        return int(self.head["seq"])

    @property
    def hash(self) -> str:
        return str(self.head["hash"])

    @property
    def epsilon(self) -> float:
        return float(self.head["epsilon"])

    def fingerprints(self) -> set[str]:
        """Every data fingerprint this ledger covers: its genesis dataset and any partition's."""
        found = {fingerprint(self.head.get("dataset_sha256")), fingerprint(self.genesis_record.get("dataset_sha256"))}
        for part in self.head.get("partitions") or []:
            if isinstance(part, Mapping):
                found.update(fingerprint(part[k]) for k in ("fingerprint", "sha256", "dataset_sha256") if part.get(k))
        found.discard("")
        return found

    def describe(self) -> str:
        return f"seq {self.seq}, epsilon {self.epsilon:.4f}, genesis {self.genesis[:12]}"

    @classmethod
    def parse(cls, payload: Mapping[str, Any]) -> HeadClaim:
        """The claim in a payload, its chain checked for shape (WitnessRefused if malformed)."""
        try:
            head = dict(payload["head"])
            genesis_record = dict(payload["genesis_record"])
            chain = tuple(str(h) for h in payload["chain"])
            claim = cls(str(payload["site"]), head, genesis_record, chain)
            seq, epsilon, budget = claim.seq, claim.epsilon, float(head["budget_epsilon"])
            float(head["delta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WitnessRefused(f"malformed ledger head statement ({type(exc).__name__}: {exc})") from None
        if not all(_HEX64.fullmatch(h) for h in (claim.genesis, claim.hash, *chain)):
            raise WitnessRefused("malformed ledger head statement: hashes must be 64 lowercase hex digits")
        if sha256_hex(canonical_json(genesis_record)) != claim.genesis:
            raise WitnessRefused("ledger head statement: the genesis record does not hash to the head's genesis")
        if seq != len(chain) or claim.hash != (chain[-1] if chain else claim.genesis):
            raise WitnessRefused(f"ledger head statement: head seq {seq} is not the end of its {len(chain)} hashes")
        if not (math.isfinite(epsilon) and 0 <= epsilon <= budget + _EPSILON_SLACK):
            raise WitnessRefused(f"ledger head statement: epsilon {epsilon} outside the budget {budget}")
        return claim


def check_extends(claim: HeadClaim, witnessed: HeadClaim) -> None:
    """WitnessRefused (one line) unless `claim`'s ledger extends the `witnessed` head of the same ledger:
    same genesis, the witnessed hash at the witnessed seq, nothing spent or tightened undone."""
    site = claim.site
    if claim.genesis != witnessed.genesis:
        raise WitnessRefused(
            f"{site}: ledger reset or replaced: genesis {claim.genesis[:12]} is not the witnessed ledger's "
            f"({witnessed.describe()}); a site that starts over needs `fedseek witness accept-genesis`"
        )
    if claim.seq < witnessed.seq:
        raise WitnessRefused(
            f"{site}: ledger rolled back: head seq {claim.seq} (epsilon {claim.epsilon:.4f}) is behind the "
            f"witnessed {witnessed.describe()}"
        )
    if witnessed.seq and claim.chain[witnessed.seq - 1] != witnessed.hash:
        raise WitnessRefused(
            f"{site}: ledger forked or re-chained: entry {witnessed.seq} hash {claim.chain[witnessed.seq - 1][:12]} "
            f"is not the witnessed {witnessed.hash[:12]}"
        )
    if claim.epsilon < witnessed.epsilon - _EPSILON_SLACK:
        raise WitnessRefused(
            f"{site}: ledger epsilon {claim.epsilon:.4f} is below the witnessed {witnessed.epsilon:.4f}"
        )
    old, new = witnessed.head, claim.head
    looser = [
        f"{key} {old.get(key)} -> {new.get(key)}"
        for key in ("budget_epsilon", "delta")
        if key in old and float(new.get(key, math.inf)) > float(old[key])
    ]
    looser += [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in ("accountant", "dataset_sha256")
        if key in old and new.get(key) != old[key]
    ]
    if looser:
        raise WitnessRefused(f"{site}: ledger budget loosened or data changed since witnessed: {', '.join(looser)}")


class LedgerWitness:
    """Checks each site's signed ledger head against what this coordinator witnessed, and records it.

    `site_keys_dir` holds the sites' registered node keys (`<site>.pub`, as `SiteAccess` reads them);
    `audit` is the coordinator's trail, where every refusal lands. The first head ever seen from a
    site is taken as it is (there is nothing to hold it against); every later one must extend the
    latest witnessed, or start a new genesis an operator accepted for new data.
    """

    def __init__(
        self, store: WitnessStore, *, site_keys_dir: Path | None = None, audit: AuditTrail | None = None
    ) -> None:
        self.store = store
        self.site_keys_dir = site_keys_dir
        self.audit = audit

    def site_key(self, site: str) -> ec.EllipticCurvePublicKey:
        check_name(site, what="site")
        if self.site_keys_dir is None:
            raise WitnessRefused(f"{site}: this witness holds no site keys; a signed statement cannot be checked")
        path = self.site_keys_dir / f"{site}.pub"
        try:
            return load_public_key(path)
        except FileNotFoundError:
            raise WitnessRefused(f"{site}: no registered node key ({path.name} not in {self.site_keys_dir})") from None
        except (OSError, ValueError, StatementError) as exc:
            raise WitnessRefused(f"{site}: registered node key {path.name} unreadable: {exc}") from None

    def claim_of(self, site: str, statements: Sequence[object]) -> tuple[dict[str, Any], HeadClaim]:
        """The one `ledger.head` statement among `statements`, signed by `site`'s key, and its claim."""
        heads = [s for s in statements if isinstance(s, Mapping) and s.get("kind") == LEDGER_HEAD]
        if len(heads) != 1:
            what = "no signed ledger head" if not heads else f"{len(heads)} ledger heads"
            raise WitnessRefused(f"{site}: {what} with its answer; the coordinator takes no unwitnessed ledger")
        try:
            payload = verify_statement(heads[0], kind=LEDGER_HEAD, key=self.site_key(site))
        except StatementError as exc:
            raise WitnessRefused(f"{site}: {exc.one_line()}") from None
        claim = HeadClaim.parse(payload)
        if claim.site != site:
            raise WitnessRefused(f"{site}: the ledger head is signed for site {claim.site!r}")
        return dict(heads[0]), claim

    def heads(self, site: str) -> list[HeadClaim]:
        """Every head witnessed for `site`, oldest first (each was verified before it was recorded)."""
        return [HeadClaim.parse(s["payload"]) for s in self.store.statements(site, LEDGER_HEAD)]

    def latest(self, site: str) -> HeadClaim | None:
        stored = self.store.latest(site, LEDGER_HEAD)
        return HeadClaim.parse(stored["payload"]) if stored is not None else None

    def check(self, site: str, statements: Sequence[object], *, after: HeadClaim | None = None) -> HeadClaim:
        """The site's head if it extends the latest witnessed (and, for a trained update, advanced past
        `after`, the head it showed before the round: the round was charged); WitnessRefused otherwise."""
        _, claim = self.claim_of(site, statements)
        self.check_claim(claim, after=after)
        return claim

    def check_claim(self, claim: HeadClaim, *, after: HeadClaim | None = None) -> None:
        """WitnessRefused unless `claim` (signature already checked, or a ledger read directly) extends
        the latest head witnessed for its site, or starts a new ledger an operator accepted."""
        witnessed = self.latest(claim.site)
        if witnessed is not None and not (claim.genesis != witnessed.genesis and self._new_genesis_accepted(claim)):
            check_extends(claim, witnessed)
        if after is not None and (claim.genesis != after.genesis or claim.seq <= after.seq):
            raise WitnessRefused(
                f"{claim.site}: the update's ledger head ({claim.describe()}) did not advance past the one it "
                f"showed before the round ({after.describe()}): the round was not charged"
            )

    def _new_genesis_accepted(self, claim: HeadClaim) -> bool:
        """A new ledger the operator accepted for new data: its data fingerprints named by an acceptance,
        disjoint from every fingerprint witnessed for the site, and its genesis never seen before."""
        heads = self.heads(claim.site)
        if claim.genesis in {h.genesis for h in heads}:
            return False  # an older ledger of this site: a rollback, never a new start
        seen = set().union(*(h.fingerprints() for h in heads))
        if claim.fingerprints() & seen:
            return False
        mine = claim.fingerprints()
        return any(
            fingerprint(a.get("dataset_sha256")) in mine and a.get("genesis") in (None, "", claim.genesis)
            for a in self.store.statements(claim.site, GENESIS_ACCEPTED)
        )

    def witness(
        self,
        site: str,
        statements: Sequence[object],
        *,
        stage: str,
        after: HeadClaim | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> HeadClaim:
        """`check`, then record the head if it is new; a refusal is audited, then raised."""
        from coordinator.audit_witness import witness_audit_checkpoint  # that module builds on this one

        try:
            statement, claim = self.claim_of(site, statements)
            self.check_claim(claim, after=after)
            witness_audit_checkpoint(self.store, site, statements, key=self.site_key(site))  # the audit log's
        except WitnessRefused as exc:
            self._audit("witness.refused", site, {"stage": stage, "error": exc.one_line(), **(context or {})})
            raise
        latest = self.store.latest(site, LEDGER_HEAD)
        if latest is None or HeadClaim.parse(latest["payload"]).head != claim.head:
            self.store.record(site, LEDGER_HEAD, statement)
        return claim

    def accept_genesis(self, site: str, *, dataset_sha256: str, genesis: str = "", operator: str) -> dict[str, Any]:
        """Let `site` start a new ledger for the data `dataset_sha256` names (and, if given, only the ledger
        `genesis`). Refused (Conflict) if that data was ever witnessed for the site: old data never gets a
        fresh budget. Audited either way."""
        check_name(site, what="site")
        dataset_sha256 = fingerprint(dataset_sha256)
        if not _HEX64.fullmatch(dataset_sha256) or (genesis and not _HEX64.fullmatch(genesis)):
            raise InvalidInput("the dataset fingerprint and genesis must be sha256 hex digests (64 hex digits)")
        details = {"dataset_sha256": dataset_sha256, "genesis": genesis, "operator": operator}
        heads = self.heads(site)
        earlier = [h for h in heads if dataset_sha256 in h.fingerprints() or (genesis and h.genesis == genesis)]
        if earlier:
            error = (
                f"{site}: data {dataset_sha256[:12]} was already witnessed (ledger genesis {earlier[0].genesis[:12]}, "
                f"{earlier[-1].describe()}): data that spent budget never gets a fresh one"
            )
            self._audit("witness.genesis-refused", site, {**details, "error": error})
            raise WitnessRefused(error)
        entry = self.store.record(site, GENESIS_ACCEPTED, {"site": site, **details})
        self._audit("witness.genesis-accepted", site, details)
        return entry

    def _audit(self, action: str, site: str, details: Mapping[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(actor="coordinator", action=action, resource=site, details=dict(details))


def coordinator_witness(registry_dir: Path) -> LedgerWitness:
    """The ledger witness of the coordinator whose registry is `registry_dir` (`<state>/registry`): its
    witness store, the site keys it registers (named in its `coordinator.json`) and its audit trail.
    WitnessStoreError if there is no running coordinator there: a run is never taken unwitnessed."""
    layout = CoordinatorLayout(registry_dir.parent)
    if layout.registry != registry_dir:
        raise WitnessStoreError(f"{registry_dir} is not a coordinator state's registry; no witness store")
    try:
        keys = json.loads(layout.endpoints.read_text())["site_keys"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WitnessStoreError(
            f"{layout.endpoints} names no site keys ({type(exc).__name__}); start the coordinator with this release"
        ) from None
    return LedgerWitness(WitnessStore(layout.witness), site_keys_dir=Path(str(keys)), audit=AuditTrail(layout.audit))
