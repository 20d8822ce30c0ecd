"""The site access policy at the node's real HTTPS API: TLS 1.3, consortium certificates, API keys.

Issue 16: "access is decided by the role in the certificate alone, so any consortium reviewer or
admin reaches every site, and in `mtls` mode other hospitals' node certificates may call this
site's model". Here a site's policy file (node/policy.py, casbin) decides: a reviewer or admin
of another organisation and another hospital's node certificate are refused, API keys are held
to their scopes, expiry and revocation, and a policy edit applies without a restart, audited.
The node is the one `fedseek node start` serves (node.build.node_access, node.api.create_app,
federation.security.mtls_server), in `api_key` mode and, on a second port, in `mtls` mode.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation.ops.supervise import free_port
from federation.security import pki
from federation.security.mtls_server import HTTPSService, ServerTLS, audit_hook
from node.access import AccessPolicy
from node.api import create_app
from node.api_keys import ApiKeys
from node.build import node_access
from node.service import NodeService
from tests.node.tiny_service import tiny_service

# Parties of one consortium CA: two hospitals' nodes, reviewers and admins of either hospital.
PARTIES = {
    "site-a": "node",
    "site-b": "node",
    "rita": "reviewer",  # site-a's reviewer
    "rex": "reviewer",  # site-b's reviewer
    "olga": "admin",  # site-a's admin
    "ada": "admin",  # site-b's admin
}
# What site-a's operator adds to the default policy: who belongs to which organisation.
MEMBERS = "g, rita, site-a\ng, olga, site-a\ng, rex, site-b\ng, ada, site-b\n"
WAIT_S = 30.0


@dataclass
class Site:
    service: NodeService
    pki_dir: Path
    api_key_url: str  # openai_auth = "api_key"
    mtls_url: str  # openai_auth = "mtls"
    policy_text: str

    @property
    def policy_path(self) -> Path:
        return self.service.layout.access_policy

    def client(self, url: str, party: str | None = None, *, key: str | None = None) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca" / "ca.pem"))
        if party is not None:
            ctx.load_cert_chain(str(self.pki_dir / party / "cert.pem"), str(self.pki_dir / party / "key.pem"))
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=url, verify=ctx, timeout=120, headers=headers)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.service.layout.audit.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def site(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("access-policy")
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, consortium="fedseek-test")
    for name, role in PARTIES.items():
        pki.issue(pki_dir, name, role=role)  # type: ignore[arg-type]
    service = tiny_service(tiny_model_dir, site_data_dir, root / "state", n_train=8, n_eval=2)
    keyed = node_access(service)  # writes the default policy on first start, as the node does
    service.layout.access_policy.write_text(service.layout.access_policy.read_text() + MEMBERS)
    mutual = AccessPolicy(
        site="site-a",
        audit=service.audit,
        api_keys=keyed.api_keys,
        agent_token=service.token,
        policy=keyed.policy,  # one policy file, one watcher
        openai_auth="mtls",
    )
    leaf = pki.load_leaf(pki_dir, "site-a")
    tls = ServerTLS(cert=leaf.cert, key=leaf.key, ca_cert=leaf.ca_cert, crl=leaf.crl)
    servers = [
        HTTPSService.start(
            create_app(service, access=access),
            tls,
            host="127.0.0.1",
            port=free_port(),
            on_refusal=audit_hook(service.audit.append),
        )
        for access in (keyed, mutual)
    ]
    text = service.layout.access_policy.read_text()
    until(lambda: keyed.policy.sha256 == hashlib.sha256(text.encode()).hexdigest(), "the members are not applied")
    try:
        yield Site(service, pki_dir, servers[0].url, servers[1].url, text)
    finally:
        for server in servers:
            server.stop()
        keyed.policy.close()


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def set_policy(site: Site, text: str) -> None:
    """Rewrite the policy file, as an operator would, and wait until the node applies it."""
    site.policy_path.write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    until(lambda: any(r["details"].get("new_sha256") == digest for r in site.audit()), "policy change not applied")


@pytest.fixture
def restore_policy(site: Site) -> Iterator[None]:
    yield
    if site.policy_path.read_text() != site.policy_text:
        set_policy(site, site.policy_text)


def refusal_of(site: Site, before: int) -> dict[str, Any]:
    new = [r for r in site.audit()[before:] if r["action"] == "access.refused"]
    assert len(new) == 1, new
    return new[0]


def model_id(site: Site) -> str:
    with site.client(site.mtls_url, "site-a") as own:
        r = own.get("/v1/models")
    assert r.status_code == 200, r.text
    return str(r.json()["data"][0]["id"])


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "chest pain"}], "max_tokens": 2}


EXPLAIN = {"prompt": "chest pain radiating to the left arm", "response": "cardiology", "max_evals": 10}
NO_SUCH_EXPLANATION = "/v1/explanations/expl-" + "0" * 32


# ---- certificates ----------------------------------------------------------------------------
def test_a_reviewer_of_another_organisation_is_refused_by_policy(site: Site) -> None:
    for who in ("rex", "reviewer"):  # of site-b's organisation; of none this site listed
        if who == "reviewer":
            pki.issue(site.pki_dir, "reviewer", role="reviewer")
        before = len(site.audit())
        with site.client(site.api_key_url, who) as reviewer:
            r = reviewer.post("/v1/explanations", json=EXPLAIN)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["message"] == (
                f"the site's access policy does not allow {who} (reviewer) on explanations"
            )
            assert reviewer.get(NO_SUCH_EXPLANATION).status_code == 403
        refused = [  # other records may interleave (the issue of the second reviewer's certificate, checkpoints)
            (r["actor"], r["resource"], r["details"]["status"])
            for r in site.audit()[before:]
            if r["action"] == "access.refused"
        ]
        assert refused == [(who, "/v1/explanations", 403), (who, NO_SUCH_EXPLANATION, 403)]
    with site.client(site.api_key_url, "rita") as own:  # this site's reviewer is let through to the route
        assert own.get(NO_SUCH_EXPLANATION).status_code == 404


def test_an_admin_of_another_organisation_is_refused_by_policy(site: Site) -> None:
    with site.client(site.api_key_url, "ada") as other:
        r = other.get("/v1/admin/status")
    assert r.status_code == 403 and "does not allow ada (admin) on admin" in r.text
    with site.client(site.api_key_url, "olga") as own:
        r = own.get("/v1/admin/status")
    assert r.status_code == 200, r.text


def test_another_hospitals_node_certificate_is_refused_in_mtls_mode(site: Site) -> None:
    model = model_id(site)
    before = len(site.audit())
    with site.client(site.mtls_url, "site-b") as other:
        r = other.post("/v1/chat/completions", json=chat(model))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["message"] == "the site's access policy does not allow site-b (node) on chat"
    record = refusal_of(site, before)
    assert (record["actor"], record["details"]["role"]) == ("site-b", "node")
    assert record["resource"] == "/v1/chat/completions"
    with site.client(site.mtls_url, "site-b") as other:
        assert other.get("/v1/models").status_code == 403
    with site.client(site.mtls_url, "site-a") as own:  # the site's own certificate still is served
        r = own.post("/v1/chat/completions", json=chat(model))
    assert r.status_code == 200, r.text


# ---- API keys --------------------------------------------------------------------------------
def test_a_key_without_the_chat_scope_is_refused_on_chat(site: Site) -> None:
    key, record = ApiKeys(site.service.layout.api_key_digests).issue(scopes=["models"], label="dashboard")
    before = len(site.audit())
    with site.client(site.api_key_url, key=key) as app:
        assert app.get("/v1/models").status_code == 200
        r = app.post("/v1/chat/completions", json=chat(model_id(site)))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["message"] == f"API key {record.id} lacks the 'chat' scope for chat"
    assert refusal_of(site, before)["resource"] == "/v1/chat/completions"


def test_an_expired_key_is_refused(site: Site) -> None:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    key, record = ApiKeys(site.service.layout.api_key_digests).issue(scopes=["models"], expires=expires)
    with site.client(site.api_key_url, key=key) as app:
        if datetime.now(UTC) < expires:  # (a loaded machine may have taken the 3 s already)
            assert app.get("/v1/models").status_code == 200
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.5)
        r = app.get("/v1/models")
    assert r.status_code == 401, r.text
    assert r.json()["error"]["message"] == f"API key {record.id} expired at {expires:%Y-%m-%dT%H:%M:%SZ}"


def fedseek(*argv: str) -> str:
    """The operator's `fedseek` command, in a process of its own beside the running node."""
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli.main", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_revoked_key_is_refused_without_a_restart(site: Site) -> None:
    state = str(site.service.layout.root)
    made = json.loads(fedseek("key", "create", "--state", state, "--json", "--label", "revoked soon"))
    with site.client(site.api_key_url, key=made["key"]) as app:
        assert app.get("/v1/models").status_code == 200
        fedseek("key", "revoke", made["id"], "--state", state)
        r = app.get("/v1/models")
        assert r.status_code == 401, r.text
        assert r.json()["error"]["message"].startswith(f"API key {made['id']} was revoked at ")
    assert [r["action"] for r in site.audit() if r["resource"] == made["id"]] == ["key.created", "key.revoked"]


# ---- policy changes --------------------------------------------------------------------------
@pytest.mark.usefixtures("restore_policy")
def test_a_policy_edit_applies_without_a_restart_and_is_audited(site: Site) -> None:
    with site.client(site.mtls_url, "site-b") as other:
        assert other.get("/v1/models").status_code == 403
        old = hashlib.sha256(site.policy_path.read_bytes()).hexdigest()
        opened = site.policy_text + "p, cert, site-b, node, *, models, *, allow\n"
        set_policy(site, opened)
        assert other.get("/v1/models").status_code == 200  # site-b may now list the models, and only that
        assert other.post("/v1/chat/completions", json=chat(model_id(site))).status_code == 403
        changed = [r for r in site.audit() if r["action"] == "policy.changed"][-1]
        assert changed["details"]["old_sha256"] == old
        assert changed["details"]["new_sha256"] == hashlib.sha256(opened.encode()).hexdigest()

        # A malformed edit is refused and audited; the last good policy stays, nothing more opens.
        site.policy_path.write_text(opened + "p, cert, *, *, *, chat, *, allow\np, cert, broken\n")
        until(lambda: any(r["action"] == "policy.invalid" for r in site.audit()), "malformed policy not audited")
        invalid = [r for r in site.audit() if r["action"] == "policy.invalid"][-1]
        assert (
            "line" in invalid["details"]["error"]
            and invalid["details"]["kept_sha256"] == changed["details"]["new_sha256"]
        )
        assert other.get("/v1/models").status_code == 200
        assert other.post("/v1/chat/completions", json=chat(model_id(site))).status_code == 403


@pytest.mark.usefixtures("restore_policy")
def test_a_model_the_policy_denies_is_refused_after_the_body_names_it(site: Site) -> None:
    model = model_id(site)
    key = site.service.layout.api_key.read_text().strip()  # the first key: chat scope
    set_policy(site, site.policy_text + f"p, key, *, key, *, chat, {model[:4]}*, deny\n")
    before = len(site.audit())
    with site.client(site.api_key_url, key=key) as app:
        r = app.post("/v1/chat/completions", json=chat(model))
        assert r.status_code == 403, r.text
        assert f"model '{model}' on chat" in r.json()["error"]["message"]
        assert app.get("/v1/models").status_code == 200  # the route family is still open to the key
    record = refusal_of(site, before)
    assert record["resource"] == "/v1/chat/completions"
    assert not [r for r in site.audit()[before:] if r["action"] not in ("access.refused",)]  # nothing was served


@pytest.mark.usefixtures("restore_policy")
def test_models_lists_only_what_the_policy_lets_the_caller_use(site: Site) -> None:
    model = model_id(site)
    key = site.service.layout.api_key.read_text().strip()
    with site.client(site.api_key_url, key=key) as app:
        assert model in {m["id"] for m in app.get("/v1/models").json()["data"]}
        set_policy(site, site.policy_text + f"p, key, *, key, *, chat, {model}, deny\n")
        assert model in {m["id"] for m in app.get("/v1/models").json()["data"]}  # completions still takes it
        set_policy(site, site.policy_text + f"p, key, *, key, *, *, {model}, deny\n")
        listed = {m["id"] for m in app.get("/v1/models").json()["data"]}
        assert listed == {card["id"] for card in site.service.models()} - {model}  # the rest is still listed


@pytest.mark.usefixtures("restore_policy")
def test_a_key_asks_for_explanations_only_with_the_explain_scope_and_the_policys_leave(site: Site) -> None:
    keys = ApiKeys(site.service.layout.api_key_digests)
    explain, record = keys.issue(scopes=["explain"], label="audit tool")
    chat_only = site.service.layout.api_key.read_text().strip()
    with site.client(site.api_key_url, key=explain) as tool, site.client(site.api_key_url, key=chat_only) as app:
        r = tool.get(NO_SUCH_EXPLANATION)
        assert r.status_code == 403 and f"does not allow {record.id} on explanations" in r.text  # the default
        set_policy(site, site.policy_text + "p, key, *, key, *, explanations, *, allow\n")
        assert tool.get(NO_SUCH_EXPLANATION).status_code == 404  # admitted: there is no such explanation
        r = app.get(NO_SUCH_EXPLANATION)  # a key without the scope is no reviewer's credential
        assert r.status_code == 401 and "needs a client certificate with role 'reviewer'" in r.text
        assert tool.get("/v1/admin/status").status_code == 401  # admin routes take certificates only
