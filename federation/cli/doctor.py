"""`fedseek doctor`: is this node or coordinator fit to run? One line per check, exit code from the worst.

Each check reuses the code the party itself runs (no copies): `pki.load_party` and `pki.crl.check_crl`
for the certificate and the CRL, `PrivacyLedger.open_existing` and `privacy.consistency.ledger_refusal`
for the budget and the ledger against the audit trail, `privacy.audit.verify` (the quick, incremental
check a node makes at start) for the trail. The rest is the host: free disk under the state
directory, the configured ports, and the GPU when the config asks for CUDA (torch is imported only
then). A check never raises: what it could not read is its FAIL line.

Exit status: 0 every check OK, 1 the worst is WARN, 2 the worst is FAIL.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from federation.errors import InvalidInput
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.protocol import config as cfg

Level = Literal["OK", "WARN", "FAIL"]
EXIT: dict[Level, int] = {"OK": 0, "WARN": 1, "FAIL": 2}
CERT_WARN = timedelta(days=7)  # a leaf lives 30 days (pki.DEFAULT_LEAF_DAYS): renew in the last week
CRL_WARN = timedelta(days=1)  # the CRL lives 7 days and the timer refreshes it well before: a day left is late
BUDGET_WARN = 0.1  # share of a partition's budget left below which training soon stops
DISK_WARN_SHARE, DISK_WARN_BYTES = 0.10, 1 << 30
DISK_FAIL_SHARE = 0.02

DESCRIPTION = """\
Check that a node or coordinator can run, from its config file: certificate and CRL validity,
privacy budget left, audit trail and ledger integrity (and the two against each other), free disk
in the state directory, the configured ports, and the GPU when the config asks for cuda.
One line per check: OK|WARN|FAIL name: detail.

exit status: 0 every check OK, 1 at least one WARN, 2 at least one FAIL (or an unreadable config)."""


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.level} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Party:
    """What the checks need of a config, for either kind of party."""

    kind: Literal["node", "coordinator"]
    name: str
    pki_dir: Path
    state_dir: Path
    ports: tuple[tuple[str, str, int], ...]  # (what, host, port)
    device: str
    endpoints: Path  # node.json / coordinator.json: the running party's pid
    audit: Path
    ledger: Path | None  # a coordinator has no privacy ledger


def read_party(path: Path) -> Party:
    """The party a config file describes: a node's config names a model_dir, a coordinator's does not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None  # cfg.load says what is wrong with it
    if isinstance(data, dict) and "model_dir" in data:
        node = cfg.load(cfg.NodeConfig, path)
        layout = NodeLayout(Path(node.state_dir))
        return Party(
            kind="node",
            name=node.name,
            pki_dir=Path(node.pki_dir),
            state_dir=layout.root,
            ports=(("api", node.api_host, node.api_port),),
            device=node.device,
            endpoints=layout.endpoints,
            audit=layout.audit,
            ledger=layout.ledger,
        )
    coord = cfg.load(cfg.CoordinatorConfig, path)
    clayout = CoordinatorLayout(Path(coord.state_dir))
    ports = [("fleet", coord.fleet_host, coord.fleet_port)]
    if coord.admin_port:  # 0: a free port picked at start, nothing to collide with
        ports.append(("admin", coord.admin_host, coord.admin_port))
    return Party(
        kind="coordinator",
        name=coord.name,
        pki_dir=Path(coord.pki_dir),
        state_dir=clayout.root,
        ports=tuple(ports),
        device="cpu",
        endpoints=clayout.endpoints,
        audit=clayout.audit,
        ledger=None,
    )


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.1f} days"


def check_certificate(party: Party, *, now: datetime) -> Check:
    from federation.security import pki

    if not party.pki_dir.is_dir():
        return Check("FAIL", "certificate", f"no such directory: {party.pki_dir}")
    try:
        leaf = pki.load_party(party.pki_dir, party.name, role=party.kind, now=now)
        identity = pki.read_identity(leaf.cert)
    except (OSError, ValueError, pki.PKIError) as exc:
        return Check("FAIL", "certificate", str(exc))
    left = identity.not_after - now
    detail = f"{leaf.cert} ({party.kind} {identity.name!r}) valid until {identity.not_after:%Y-%m-%dT%H:%M:%SZ}"
    if left < CERT_WARN:
        return Check("WARN", "certificate", f"{detail}: {_days(left)} left, renew it (`fedseek ca renew`)")
    return Check("OK", "certificate", f"{detail} ({_days(left)} left)")


def check_crl(party: Party, *, now: datetime) -> Check:
    from federation.security import pki
    from federation.security.pki.crl import check_crl as verify_crl
    from federation.security.pki.layout import CRL_FILE, LEAF_CA
    from federation.security.pki.pem import load_cert

    party_dir = party.pki_dir / party.name
    crl_path, ca_path = party_dir / CRL_FILE, party_dir / LEAF_CA
    if not crl_path.is_file():
        return Check("FAIL", "crl", f"no CRL at {crl_path}: revocation is not checked; publish one (`fedseek ca crl`)")
    try:
        crl = verify_crl(pki.load_crl(crl_path), crl_path, load_cert(ca_path), now)
    except (OSError, ValueError, pki.PKIError) as exc:
        return Check("FAIL", "crl", str(exc))
    assert crl.next_update_utc is not None  # check_crl refuses a CRL without one
    left = crl.next_update_utc - now
    detail = f"{crl_path} fresh until {crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}"
    if left < CRL_WARN:
        return Check("WARN", "crl", f"{detail}: {_days(left)} left; refresh it (`fedseek ca crl`) and ship copies")
    return Check("OK", "crl", f"{detail} ({_days(left)} left)")


def check_audit(party: Party) -> Check:
    from privacy.audit import verify

    if not party.audit.exists():
        if party.ledger is not None and party.ledger.exists():
            return Check("FAIL", "audit", f"no audit trail at {party.audit}, but a privacy ledger: it was deleted")
        return Check("WARN", "audit", f"no audit trail at {party.audit} yet (the {party.kind} has never started)")
    result = verify(party.audit)
    if not result.ok:
        return Check(
            "FAIL", "audit", f"{party.audit}: TAMPERED or damaged after record {result.records}: {result.error}"
        )
    return Check("OK", "audit", f"{party.audit}: {result.records} records chain to the head ({result.sealed} sealed)")


def check_ledger(party: Party) -> list[Check]:
    """Ledger integrity and agreement with the audit trail, then the budget left on each partition."""
    if party.ledger is None:
        return []
    from privacy.consistency import ledger_refusal
    from privacy.ledger import LedgerError, PrivacyLedger

    if not party.ledger.exists():
        refusal = ledger_refusal(None, party.audit) if party.audit.exists() else None
        if refusal:
            return [Check("FAIL", "ledger", refusal)]
        return [Check("WARN", "ledger", f"no privacy ledger at {party.ledger} yet (made at the first start)")]
    try:
        ledger = PrivacyLedger.open_existing(party.ledger)
        data = ledger.to_json()
        refusal = ledger_refusal(ledger, party.audit)
    except (OSError, sqlite3.Error, LedgerError) as exc:  # not a ledger at all: sqlite says so
        return [Check("FAIL", "ledger", f"{party.ledger}: {exc}")]
    if refusal:
        return [Check("FAIL", "ledger", f"{party.ledger} disagrees with the audit trail: {refusal}")]
    checks = [Check("OK", "ledger", f"{party.ledger}: {len(data['entries'])} entries, chain and audit agree")]
    low = []
    for part in data["partitions"]:
        label = part["label"] or "(genesis)"
        if part["status"] != "active" or part["epsilon_remaining"] < BUDGET_WARN * data["budget_epsilon"]:
            low.append(f"partition {label}: {part['epsilon_remaining']:.4f} left [{part['status']}]")
    summary = f"epsilon {data['epsilon_spent']:.4f} of {data['budget_epsilon']:.4f} spent"
    if low:
        checks.append(Check("WARN", "budget", f"{summary}; nearly or fully spent: {'; '.join(low)}"))
    else:
        checks.append(Check("OK", "budget", f"{summary}, {data['epsilon_remaining']:.4f} left"))
    return checks


def check_disk(party: Party) -> Check:
    where = party.state_dir
    while not where.exists() and where != where.parent:  # a state dir made at first start: its file system
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return Check("FAIL", "disk", f"cannot read free space under {where}: {exc.strerror}")
    share = usage.free / usage.total if usage.total else 0.0
    detail = f"{usage.free / (1 << 30):.1f} GiB free ({share:.0%}) under {where}"
    if share < DISK_FAIL_SHARE:
        return Check("FAIL", "disk", f"{detail}: the audit trail and ledger may fail to write")
    if share < DISK_WARN_SHARE or usage.free < DISK_WARN_BYTES:
        return Check("WARN", "disk", f"{detail}: low")
    return Check("OK", "disk", detail)


def _running_pid(endpoints: Path) -> int | None:
    """The pid the running party wrote into node.json / coordinator.json, if that process is alive."""
    try:
        pid = json.loads(endpoints.read_text(encoding="utf-8")).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's: a service account's
    return pid


def check_ports(party: Party) -> list[Check]:
    checks = []
    pid = _running_pid(party.endpoints)
    for what, host, port in party.ports:
        name = f"port {what}"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not a holder
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    checks.append(Check("FAIL", name, f"cannot bind {host}:{port}: {exc.strerror}"))
                elif pid is not None:
                    checks.append(Check("OK", name, f"{host}:{port} in use by the running {party.kind} (pid {pid})"))
                else:
                    checks.append(
                        Check("FAIL", name, f"{host}:{port} is held by another process; the {party.kind} cannot start")
                    )
                continue
        checks.append(Check("OK", name, f"{host}:{port} free"))
    return checks


def check_gpu(party: Party) -> Check:
    if not party.device.startswith("cuda"):
        return Check("OK", "gpu", f"not needed (device {party.device})")
    import torch  # only here: doctor on a CPU site never loads it

    if not torch.cuda.is_available():
        return Check("FAIL", "gpu", f"the config asks for {party.device} but torch sees no CUDA device")
    index = torch.device(party.device).index or 0
    if index >= torch.cuda.device_count():
        return Check("FAIL", "gpu", f"{party.device}: only {torch.cuda.device_count()} CUDA devices")
    return Check("OK", "gpu", f"{party.device}: {torch.cuda.get_device_name(index)}")


def run_checks(party: Party, *, now: datetime | None = None) -> list[Check]:
    """Every check, in a fixed order; `now` (timezone-aware) for certificate and CRL times."""
    when = now or datetime.now(UTC).replace(microsecond=0)
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: check_certificate(party, now=when),
        lambda: check_crl(party, now=when),
        lambda: check_audit(party),
        lambda: check_ledger(party),
        lambda: check_disk(party),
        lambda: check_ports(party),
        lambda: check_gpu(party),
    ]
    checks: list[Check] = []
    for step in steps:
        got = step()
        checks.extend(got if isinstance(got, list) else [got])
    return checks


def worst(checks: list[Check]) -> int:
    return max((EXIT[c.level] for c in checks), default=0)


def add_doctor_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `doctor` on the root parser's subcommands."""
    p = sub.add_parser(
        "doctor",
        help="check a node or coordinator: certificates, CRL, budget, audit, ledger, disk, ports, GPU",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the node's or coordinator's config (JSON) to check")
    p.add_argument("--json", action="store_true", help="print the checks as a JSON list instead of lines")
    p.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if not path.is_file():
        raise InvalidInput(f"no such file: {path}")
    checks = run_checks(read_party(path))
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
    return worst(checks)
