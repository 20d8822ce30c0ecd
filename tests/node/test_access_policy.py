"""The site access policy (node/policy.py, casbin) and API key lifecycle (node/api_keys.py), in-process.

Real-TLS requests against a node API under these policies: tests/node/test_access_policy_tls.py.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from federation.errors import InvalidInput
from federation.ops.layout import NodeLayout
from node.api_keys import DEFAULT_SCOPES, ApiKeys, KeyRecord, UnknownKey, digest, ensure_first_key, key_id
from node.policy import (
    SETTLE_S,
    PolicyFileError,
    SitePolicy,
    Subject,
    default_policy,
    ensure_policy,
    parse_policy,
)
from privacy.audit import AuditTrail, verify

SITE = "site-a"


def cert(name: str, role: str) -> Subject:
    return Subject("cert", name, role)


KEY = Subject("key", "key-0123456789ab", "key")


def records(audit: AuditTrail) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit.path.read_text().splitlines() if line.strip()]


@pytest.fixture
def audit(tmp_path: Path) -> AuditTrail:
    return AuditTrail(tmp_path / "audit.jsonl")


def edit(policy: SitePolicy, text: str) -> None:
    """Rewrite the policy file in place, as an editor may; the policy notices, and the change
    settles (node.policy.SETTLE_S): the next decision applies it."""
    policy.path.write_text(text)
    policy.refresh()
    time.sleep(SETTLE_S + 0.05)


def policy_with(tmp_path: Path, audit: AuditTrail, extra: str = "") -> SitePolicy:
    path = tmp_path / "access-policy.csv"
    path.write_text(default_policy(SITE) + extra)
    return SitePolicy(path, audit=audit)


# ---- decisions -------------------------------------------------------------------------------
def test_default_policy_admits_this_sites_organisation_and_refuses_others(tmp_path: Path, audit: AuditTrail) -> None:
    policy = policy_with(tmp_path, audit, "g, rita, site-a\ng, rex, site-b\ng, olga, site-a\n")
    # the OpenAI routes under mtls: this site's own node, not another hospital's
    assert policy.allows(cert("site-a", "node"), "chat")
    assert not policy.allows(cert("site-b", "node"), "chat")
    assert not policy.allows(cert("site-b", "node"), "completions")
    # reviewers: listed in this site's organisation, not another's, not unlisted
    assert policy.allows(cert("rita", "reviewer"), "explanations")
    assert not policy.allows(cert("rex", "reviewer"), "explanations")
    assert not policy.allows(cert("reviewer", "reviewer"), "explanations")
    # admins likewise, and a role is held to its own route family
    assert policy.allows(cert("olga", "admin"), "admin")
    assert not policy.allows(cert("rita", "reviewer"), "admin")
    assert not policy.allows(cert("olga", "admin"), "explanations")
    assert not policy.allows(cert("site-a", "node"), "explanations")
    # API keys: the OpenAI routes (within their scopes, node/access.py), never admin or explanations
    assert policy.allows(KEY, "chat") and policy.allows(KEY, "models") and policy.allows(KEY, "metrics")
    assert not policy.allows(KEY, "admin") and not policy.allows(KEY, "explanations")
    assert not policy.allows(Subject("key", "site-a", "node"), "chat")  # a key is no certificate
    assert not policy.allows(Subject("cert", "key-0123456789ab", "key"), "chat")


def test_an_empty_policy_refuses_everything(tmp_path: Path, audit: AuditTrail) -> None:
    path = tmp_path / "p.csv"
    path.write_text("# nothing allowed\n")
    policy = SitePolicy(path, audit=audit)
    for subject in (cert("site-a", "node"), cert("rita", "reviewer"), cert("olga", "admin"), KEY):
        for route in ("chat", "completions", "models", "metrics", "explanations", "admin"):
            assert not policy.allows(subject, route), (subject, route)
            assert not policy.allows(subject, route, "any-model")


def test_models_deny_wins_and_the_first_pass_only_denies_every_model(tmp_path: Path, audit: AuditTrail) -> None:
    policy = policy_with(
        tmp_path,
        audit,
        "p, key, *, key, *, chat, secret-*, deny\n"
        "p, cert, site-b, node, *, chat, shared-*, allow\n"
        "p, cert, *, *, *, metrics, *, deny\n",
    )
    # keys: every model but the secret ones; the route is still open before the model is known
    assert policy.allows(KEY, "chat")
    assert policy.allows(KEY, "chat", "base") and not policy.allows(KEY, "chat", "secret-v3")
    # site-b's node: admitted to chat for the shared models only
    assert policy.allows(cert("site-b", "node"), "chat")
    assert policy.allows(cert("site-b", "node"), "chat", "shared-v1")
    assert not policy.allows(cert("site-b", "node"), "chat", "site-a-v1")
    # a deny of every model closes the route even to an allowed party
    assert not policy.allows(cert("site-a", "node"), "metrics")
    # a model name longer than any real one is refused without being evaluated
    assert not policy.allows(KEY, "chat", "b" * 300)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("p, cert, *, superuser, *, chat, *, allow", "role 'superuser'"),
        ("p, cert, *, *, *, internal, *, allow", "route 'internal'"),
        ("p, cert, *, *, *, chat, *, maybe", "effect 'maybe'"),
        ("p, key, *, reviewer, *, chat, *, allow", "role is 'key'"),
        ("p, key, fsk-abc, key, *, chat, *, allow", "not a key id"),
        ("p, cert, *, *, *, chat, allow", "7 fields"),
        ("g, rita", "'g, NAME, ORG'"),
        ("g, Rita!, site-a", "not valid"),
        ("x, a, b", "starts with 'p' or 'g'"),
        ("p, cert, *, *, *, chat, a b, allow", "model pattern"),
    ],
)
def test_a_malformed_line_is_refused_with_its_line_number(line: str, message: str) -> None:
    with pytest.raises(PolicyFileError, match=rf"policy.csv line 3: .*{message}"):
        parse_policy(f"# header\np, key, *, key, *, chat, *, allow\n{line}\n", source="policy.csv")


def test_a_malformed_policy_at_start_is_an_error(tmp_path: Path, audit: AuditTrail) -> None:
    path = tmp_path / "p.csv"
    path.write_text("p, cert, *, *, *, everything, *, allow\n")
    with pytest.raises(PolicyFileError, match="line 1"):
        SitePolicy(path, audit=audit)
    with pytest.raises(PolicyFileError, match="cannot read"):
        SitePolicy(tmp_path / "missing.csv", audit=audit)


def test_first_start_writes_the_default_and_keeps_an_edited_one(tmp_path: Path) -> None:
    path = ensure_policy(tmp_path / "access-policy.csv", site=SITE)
    assert path.read_text() == default_policy(SITE)
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("g, rita, site-a\n")
    ensure_policy(path, site=SITE)
    assert path.read_text() == "g, rita, site-a\n"
    parse_policy(default_policy("another-site"), source="default")  # the default parses for any site


# ---- changes without restart -----------------------------------------------------------------
def test_an_edit_applies_at_the_next_decision_and_is_audited(tmp_path: Path, audit: AuditTrail) -> None:
    policy = policy_with(tmp_path, audit)
    old = hashlib.sha256(policy.path.read_bytes()).hexdigest()
    assert not policy.allows(cert("rita", "reviewer"), "explanations")
    policy.path.write_text(policy.path.read_text() + "g, rita, site-a\n")
    assert not policy.allows(cert("rita", "reviewer"), "explanations")  # not settled yet: still the old policy
    time.sleep(SETTLE_S + 0.05)  # the watcher thread (SitePolicy.watch) would look again meanwhile
    new = hashlib.sha256(policy.path.read_bytes()).hexdigest()
    assert policy.allows(cert("rita", "reviewer"), "explanations")
    changed = [r for r in records(audit) if r["action"] == "policy.changed"]
    assert len(changed) == 1
    assert changed[0]["details"]["old_sha256"] == old and changed[0]["details"]["new_sha256"] == new
    assert policy.sha256 == new
    edit(policy, policy.path.read_text())  # rewritten with the same content: no change
    policy.allows(KEY, "chat")
    assert [r["action"] for r in records(audit)].count("policy.changed") == 1
    assert verify(audit.path).ok


def test_a_malformed_edit_keeps_the_last_good_policy_and_is_audited_once(tmp_path: Path, audit: AuditTrail) -> None:
    policy = policy_with(tmp_path, audit, "g, rita, site-a\n")
    good = policy.sha256
    # a broken file that, were it half-read, would open the admin routes to everyone
    edit(policy, "p, cert, *, *, *, admin, *, allow\np, cert, *, *, *, bogus\n")
    for _ in range(3):
        assert not policy.allows(cert("site-b", "node"), "admin")
        assert policy.allows(cert("rita", "reviewer"), "explanations")  # the last good policy still holds
    invalid = [r for r in records(audit) if r["action"] == "policy.invalid"]
    assert len(invalid) == 1 and "line 2" in invalid[0]["details"]["error"]
    assert invalid[0]["details"]["kept_sha256"] == good and policy.sha256 == good
    policy.path.unlink()  # a deleted file opens nothing either (noticed at once: nothing to settle)
    assert policy.allows(cert("rita", "reviewer"), "explanations")
    assert not policy.allows(cert("site-b", "node"), "chat")
    assert [r["details"]["sha256"] for r in records(audit) if r["action"] == "policy.invalid"][-1] == "missing"
    edit(policy, "g, rita, site-a\n")  # a valid policy (of no rules) applies again
    assert not policy.allows(cert("rita", "reviewer"), "explanations")
    assert records(audit)[-1]["action"] == "policy.changed"


def test_decisions_during_in_place_rewrites_never_see_a_half_policy(tmp_path: Path, audit: AuditTrail) -> None:
    """Rewritten in place (truncated, then written), the file is for a moment empty or cut short:
    cut before its deny line, this policy would admit site-b. No decision sees that moment."""
    path = tmp_path / "access-policy.csv"
    base = "p, cert, *, node, *, chat, *, allow\n" + "".join(f"g, member{i}, site-a\n" for i in range(200))
    base += "p, cert, site-b, node, *, chat, *, deny\n"
    path.write_text(base)
    policy = SitePolicy(path, audit=audit)
    wrong: list[str] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            if policy.allows(cert("site-b", "node"), "chat"):
                wrong.append("site-b admitted")
            if not policy.allows(cert("site-a", "node"), "chat"):
                wrong.append("site-a refused")

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(6):
        for _ in range(20):  # rewrites in quick succession, then a pause long enough to settle
            path.write_text(base + f"g, rita{i}, site-a\n")
        time.sleep(SETTLE_S * 2)
    stop.set()
    for t in threads:
        t.join()
    assert wrong == []
    assert policy.rules.groupings[-1] == ("rita5", "site-a")
    assert 1 <= [r["action"] for r in records(audit)].count("policy.changed") <= 6


# ---- API keys --------------------------------------------------------------------------------
def test_keys_carry_scopes_and_expiry_and_only_digests_are_kept(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "api-keys.sha256")
    soon = datetime.now(UTC) + timedelta(days=30)
    key, record = keys.issue(scopes=["models", "chat", "models"], expires=soon, label="triage app")
    assert record.scopes == ("chat", "models") and record.id == key_id(digest(key))
    assert key not in keys.path.read_text() and digest(key) in keys.path.read_text()
    assert keys.lookup(key) == record and keys.verify(key) == record.id
    assert keys.lookup("fsk-not-a-key") is None
    assert record.refusal(datetime.now(UTC)) is None
    assert "expired at" in str(record.refusal(soon + timedelta(seconds=1)))
    with pytest.raises(InvalidInput, match="unknown API key scope admin"):
        keys.issue(scopes=["admin"])
    with pytest.raises(InvalidInput, match="not in the future"):
        keys.issue(expires=datetime.now(UTC) - timedelta(seconds=1))


def test_revocation_is_kept_for_the_inventory_and_refused(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "api-keys.sha256")
    first, a = keys.issue()
    second, b = keys.issue(scopes=["models"])
    revoked = keys.revoke(a.id)
    assert revoked.revoked is not None and "was revoked" in str(revoked.refusal(datetime.now(UTC)))
    assert keys.verify(first) is None and keys.verify(second) == b.id
    assert [r.id for r in keys.records()] == [a.id, b.id]
    assert keys.revoke(a.id).revoked == revoked.revoked  # revoking again changes nothing
    with pytest.raises(UnknownKey, match="fedseek key list"):
        keys.revoke("key-000000000000")


def test_bare_digest_lines_are_keys_with_default_scopes_and_bad_lines_open_nothing(tmp_path: Path) -> None:
    path = tmp_path / "api-keys.sha256"
    old = "fsk-from-before-scopes"
    path.write_text(f"{digest(old)}\n{{not json\n" + '{"sha256": "' + digest("fsk-x") + '", "scopes": ["root"]}\n')
    keys = ApiKeys(path)
    assert keys.lookup(old) == KeyRecord(id=key_id(digest(old)), sha256=digest(old), scopes=DEFAULT_SCOPES)
    assert keys.lookup("fsk-x") is None  # an unknown scope: that line's key works nowhere


def test_creates_and_revocations_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    keys = [ApiKeys(tmp_path / "api-keys.sha256") for _ in range(4)]  # as separate `fedseek key` runs
    made: list[KeyRecord] = []
    lock = threading.Lock()

    def work(k: ApiKeys) -> None:
        for _ in range(10):
            _, record = k.issue()
            with lock:
                made.append(record)
            k.revoke(record.id)

    threads = [threading.Thread(target=work, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    on_file = {r.id: r for r in ApiKeys(tmp_path / "api-keys.sha256").records()}
    assert set(on_file) == {r.id for r in made} and len(on_file) == 40
    assert all(r.revoked is not None for r in on_file.values())


def test_first_start_key_has_default_scopes(tmp_path: Path) -> None:
    layout = NodeLayout(tmp_path)
    keys = ensure_first_key(layout)
    record = keys.lookup(layout.api_key.read_text().strip())
    assert record is not None and record.scopes == DEFAULT_SCOPES and record.expires is None


def test_the_keys_lock_is_the_layouts(tmp_path: Path) -> None:
    layout = NodeLayout(tmp_path)
    keys = ensure_first_key(layout)
    assert keys.lock_path == layout.api_keys_lock and layout.api_keys_lock.exists()
