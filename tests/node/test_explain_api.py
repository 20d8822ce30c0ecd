"""POST/GET /v1/explanations: granularity, stored results, background jobs, refusals, and `fedseek explain`."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from federation.cli.main import main
from federation.ops.supervise import free_port
from federation.protocol import wire
from federation.security import pki
from node.agent import start_api
from node.api import create_app
from node.explain_service import MAX_EVALS_LIMIT, ExplanationNotFound, Explanations
from node.service import NodeService
from node.site_keys import load_site_keys
from privacy.audit import sha256_hex, verify
from tests.node.peers import as_peer, policy_for, site_policy
from tests.node.tiny_service import tiny_service

# "Kussmaul" and "cardiology" must never reach the audit trail.
PROMPT = "Kussmaul breathing and ketones in urine. Glucose 31 mmol/L. Which department?"
RESPONSE = "cardiology"
REQUEST = {"model": "v1", "prompt": PROMPT, "response": RESPONSE, "max_evals": 30}
WORDS = 14  # Kussmaul|breathing|and|ketones|in|urine|.|Glucose|31|mmol/L|.|Which|department|?
POLL_LIMIT_S = 120.0  # a bound so a broken worker fails the test instead of hanging it


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    state = tmp_path_factory.mktemp("explain-state")
    svc = tiny_service(tiny_model_dir, site_data_dir, state, n_train=8, n_eval=2)
    rng = np.random.default_rng(1)
    v1 = {k: rng.normal(0.0, 0.05, v.shape).astype(np.float32) for k, v in svc.host.initial_arrays().items()}
    svc.deploy("v1", wire.sha256_of(v1), v1)
    return svc


@pytest.fixture(scope="module")
def client(service: NodeService) -> TestClient:
    """A reviewer (the role explanations need), without TLS: see tests/node/peers.py."""
    app = create_app(service, access=policy_for(service))
    return TestClient(app, headers=as_peer("rita", "reviewer"), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def explained(client: TestClient, service: NodeService) -> tuple[dict[str, Any], int]:
    """One synchronous word-level explanation, and the audit length before it."""
    before = len(service.audit)
    r = client.post("/v1/explanations", json={**REQUEST, "granularity": "word"})
    assert r.status_code == 200, r.text
    return r.json(), before


def audit_records(service: NodeService) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.audit.path.read_text().splitlines()]


def report_files(service: NodeService) -> set[str]:
    return {p.name for p in service.layout.explanations.iterdir()} if service.layout.explanations.exists() else set()


def poll(client: TestClient, explanation_id: str, *, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + POLL_LIMIT_S
    while True:
        r = client.get(f"/v1/explanations/{explanation_id}")
        assert r.status_code == 200, r.text
        if until(r.json()):
            return dict(r.json())
        assert time.monotonic() < deadline, f"gave up waiting; last state {r.json()}"
        time.sleep(0.05)


def assert_efficient(body: dict[str, Any]) -> None:
    values = np.array(body["values"])
    base, full = np.array(body["base_values"]), np.array(body["full_values"])
    assert values.shape == (len(body["features"]), len(body["output_tokens"]))
    assert np.all(np.abs(full - base) > 1e-3)  # otherwise the check below is vacuous
    np.testing.assert_allclose(values.sum(axis=0), full - base, rtol=1e-4, atol=0)  # per output token
    np.testing.assert_allclose(values.sum(axis=1), body["total"], rtol=1e-9)


# ---- synchronous --------------------------------------------------------------------------


def test_sync_explanation_has_every_field(explained: tuple[dict[str, Any], int], service: NodeService) -> None:
    body, _ = explained
    assert body["object"] == "explanation" and body["status"] == "completed"
    assert body["id"].startswith("expl-")
    assert body["model"] == "v1"
    assert body["adapter_sha256"] == service.host.adapters["v1"].sha256
    assert body["granularity"] == "word"
    assert body["method"] == "kernel"  # 2**14 coalitions do not fit in 30 evaluations: KernelSHAP estimates
    assert body["response"] == RESPONSE
    assert "".join(body["features"]) == PROMPT
    assert len(body["features"]) == WORDS
    response_ids = service.host.tokenizer(RESPONSE, add_special_tokens=False).input_ids
    assert len(body["output_tokens"]) == len(response_ids)
    assert "".join(body["output_tokens"]) == RESPONSE
    assert_efficient(body)
    tops = [t["feature"] for t in body["top_features"]]
    assert body["top_tokens"] == tops and 1 <= len(tops) <= 5
    assert all(t in [f.strip() for f in body["features"]] for t in tops)
    pairs = [(f.strip(), v) for f, v in zip(body["features"], body["total"], strict=True) if f.strip()]
    ranked = sorted(pairs, key=lambda fv: -abs(fv[1]))[: len(tops)]
    assert [(t["feature"], t["value"]) for t in body["top_features"]] == ranked
    assert body["created_at"].endswith("Z")
    assert body["html"] == f"/v1/explanations/{body['id']}/report.html"
    assert body["png"] == f"/v1/explanations/{body['id']}/plot.png"


def test_explanation_is_audited_by_hash_only(explained: tuple[dict[str, Any], int], service: NodeService) -> None:
    body, before = explained
    records = audit_records(service)
    assert len(records) == before + 1
    assert verify(service.audit.path).ok
    rec = records[-1]
    assert (rec["seq"], rec["hash"]) == (body["audit_record"]["seq"], body["audit_record"]["hash"])
    assert rec["action"] == "explain" and rec["resource"] == "v1"
    details = rec["details"]
    assert details["explanation_id"] == body["id"]
    messages = json.dumps([{"role": "user", "content": PROMPT}], sort_keys=True)
    keys = load_site_keys(service.layout.site_secret)
    assert details["prompt_hmac"] == keys.digest(messages) != sha256_hex(messages)  # keyed: no dictionary attack
    assert details["response_hmac"] == keys.digest(RESPONSE)
    assert not {"prompt_sha256", "response_sha256"} & set(details)
    assert details["granularity"] == "word" and details["max_evals"] == REQUEST["max_evals"]
    raw = service.audit.path.read_text()
    assert "Kussmaul" not in raw and RESPONSE not in raw


def test_get_returns_the_stored_result(
    explained: tuple[dict[str, Any], int], client: TestClient, service: NodeService
) -> None:
    body, _ = explained
    stored = service.layout.explanations / f"{body['id']}.json.sealed"
    assert b"Kussmaul" not in stored.read_bytes()  # the prompt is sealed at rest
    assert stored.stat().st_mode & 0o077 == 0  # clinical text: readable by the node's user only
    r = client.get(f"/v1/explanations/{body['id']}")
    assert r.status_code == 200
    assert r.json() == body


def test_report_and_plot_are_sealed_at_rest_and_served_to_reviewers(
    explained: tuple[dict[str, Any], int], client: TestClient, service: NodeService
) -> None:
    body, _ = explained
    sealed = sorted(p.name for p in service.layout.explanations.glob(f"{body['id']}.*"))
    assert sealed == [f"{body['id']}.{kind}.sealed" for kind in ("html", "json", "png")]
    for path in service.layout.explanations.glob(f"{body['id']}.*"):
        assert b"Kussmaul" not in path.read_bytes() and b"<html" not in path.read_bytes()
    page = client.get(body["html"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Kussmaul" in page.text and body["audit_record"]["hash"] in page.text
    assert page.headers["cache-control"] == "no-store"
    plot = client.get(body["png"])
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    assert client.get(body["html"], headers=as_peer("site-b", "node")).status_code == 403  # reviewers only


def test_a_sealed_file_moved_to_another_id_does_not_open(
    explained: tuple[dict[str, Any], int], client: TestClient, service: NodeService
) -> None:
    body, _ = explained
    other = "expl-" + "f" * 32
    src = service.layout.explanations / f"{body['id']}.json.sealed"
    dst = service.layout.explanations / f"{other}.json.sealed"
    dst.write_bytes(src.read_bytes())
    try:
        r = client.get(f"/v1/explanations/{other}")
        assert r.status_code == 500 and "does not open" in r.json()["error"]["message"]
    finally:
        dst.unlink()


@pytest.mark.parametrize(("granularity", "n_features"), [("sentence", 3), ("token", None)])
def test_other_granularities(
    client: TestClient, service: NodeService, granularity: str, n_features: int | None
) -> None:
    r = client.post("/v1/explanations", json={**REQUEST, "granularity": granularity, "max_evals": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["granularity"] == granularity and "".join(body["features"]) == PROMPT
    expected = n_features or len(service.host.tokenizer(PROMPT, add_special_tokens=False).input_ids)
    assert len(body["features"]) == expected
    assert body["method"] == ("shapley" if granularity == "sentence" else "owen")  # 2**3 coalitions fit in 20
    assert_efficient(body)


def test_non_finite_model_scores_are_a_clear_error_and_write_nothing(
    client: TestClient, service: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = service.host.response_logprobs

    def nan_scores(*args: Any, **kwargs: Any) -> np.ndarray:
        out = np.array(real(*args, **kwargs), dtype=np.float64)
        out[:, 0] = np.nan  # e.g. an fp16 overflow in a fine-tuned adapter
        return out

    monkeypatch.setattr(service.host, "response_logprobs", nan_scores)
    files = report_files(service)
    r = client.post("/v1/explanations", json=REQUEST)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "non_finite_scores" and "non-finite" in r.json()["error"]["message"]
    assert report_files(service) == files
    assert audit_records(service)[-1]["action"] == "explain.failed"


# ---- background ---------------------------------------------------------------------------


class GatedScorer:
    """Wraps the host's scorer and holds its ``block_at``-th call until released."""

    def __init__(self, real: Callable[..., np.ndarray], *, block_at: int) -> None:
        self.real, self.block_at, self.calls = real, block_at, 0
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.calls += 1
        if self.calls == self.block_at:
            self.release.wait(POLL_LIMIT_S)
        return self.real(*args, **kwargs)


@pytest.fixture
def gate(service: NodeService, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedScorer]:
    # Calls 1-2 are explain_text's base/full values, call 3 the explainer's first: after it
    # progress is > 0, and call 4 holds the job there until the test has seen it.
    scorer = GatedScorer(service.host.response_logprobs, block_at=4)
    monkeypatch.setattr(service.host, "response_logprobs", scorer)
    yield scorer
    scorer.release.set()


def test_background_job_reports_progress_then_completes(
    client: TestClient, service: NodeService, gate: GatedScorer
) -> None:
    before = len(service.audit)
    r = client.post("/v1/explanations", json={**REQUEST, "granularity": "word", "background": True})
    assert r.status_code == 202, r.text
    started = r.json()
    assert set(started) >= {"id", "object", "status"}
    assert started["object"] == "explanation" and started["status"] == "running"
    explanation_id = started["id"]

    running = poll(client, explanation_id, until=lambda s: s["status"] != "running" or s["progress"]["done"] > 0)
    assert running["status"] == "running", running
    assert 0 < running["progress"]["done"] <= running["progress"]["total"] == REQUEST["max_evals"]
    assert not (service.layout.explanations / f"{explanation_id}.json.sealed").exists()
    assert len(service.audit) == before  # audited when it completes, not before

    gate.release.set()
    done = poll(client, explanation_id, until=lambda s: s["status"] != "running")
    assert done["status"] == "completed", done
    assert done["id"] == explanation_id and "".join(done["features"]) == PROMPT
    assert_efficient(done)
    assert audit_records(service)[-1]["details"]["explanation_id"] == explanation_id


def test_background_failure_is_reported_and_audited(
    client: TestClient, service: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> np.ndarray:
        raise RuntimeError("GPU fell off the bus")

    monkeypatch.setattr(service.host, "response_logprobs", broken)
    files = report_files(service)
    r = client.post("/v1/explanations", json={**REQUEST, "background": True})
    assert r.status_code == 202, r.text
    failed = poll(client, r.json()["id"], until=lambda s: s["status"] != "running")
    assert failed["status"] == "failed"
    assert "GPU fell off the bus" in failed["error"]
    assert report_files(service) == files
    rec = audit_records(service)[-1]
    assert rec["action"] == "explain.failed" and rec["details"]["explanation_id"] == failed["id"]
    assert rec["details"]["error"] == "RuntimeError"


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        pytest.param({"model": "v9"}, 404, "'v9'", id="unknown-version"),
        pytest.param({"prompt": ""}, 400, "empty", id="empty-prompt"),
        pytest.param({"prompt": " \n\t"}, 400, "empty", id="blank-prompt"),
        pytest.param({"prompt": "fever " * 2100}, 400, "context of 2048 tokens", id="over-context"),
        pytest.param({"max_evals": MAX_EVALS_LIMIT + 1}, 400, f"limit of {MAX_EVALS_LIMIT}", id="over-budget"),
        pytest.param({"max_evals": 10**12}, 400, f"limit of {MAX_EVALS_LIMIT}", id="far-over-budget"),
        pytest.param({"granularity": "paragraph"}, 400, "granularity", id="bad-granularity"),
        pytest.param({"method": "exact"}, 400, "exact Shapley values need 2**", id="exact-over-budget"),
        pytest.param({"method": "lime"}, 400, "method", id="bad-method"),
        pytest.param({"response": ""}, 400, "response", id="empty-response"),
    ],
)
def test_refusals_write_nothing(
    client: TestClient,
    service: NodeService,
    payload: dict[str, Any],
    status: int,
    needle: str,
    background: bool,
) -> None:
    files, records = report_files(service), len(service.audit)
    r = client.post("/v1/explanations", json={**REQUEST, **payload, "background": background})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert "greater than" not in err["message"] and "less than" not in err["message"]  # not a schema range error
    assert report_files(service) == files
    assert len(service.audit) == records


@pytest.mark.parametrize(
    "path",
    [
        "/v1/explanations/..%2F..%2Fetc%2Fpasswd",
        "/v1/explanations/..",
        "/v1/explanations/%2e%2e",
        "/v1/explanations/expl-..%2Fetc",
        "/v1/explanations/expl-" + "0" * 32,
        "/v1/explanations/EXPL-" + "A" * 32,
    ],
)
def test_get_unknown_or_malformed_id_is_404(client: TestClient, path: str) -> None:
    r = client.get(path)
    # httpx resolves a bare `/..` segment: that request goes to `/v1`, an OpenAI path (API key: 401)
    expected = 401 if r.request.url.path == "/v1" else 404
    assert r.status_code == expected, r.text


def test_ids_never_name_paths(service: NodeService) -> None:
    service.layout.explanations.mkdir(parents=True, exist_ok=True)
    (service.layout.explanations.parent / "secret.json").write_text('{"leaked": true}')
    store = Explanations(service)
    for bad in ("../secret", "expl-../../secret", "expl-" + "0" * 32 + "/../../secret"):
        with pytest.raises(ExplanationNotFound):
            store.get(bad)


# ---- fedseek explain ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_url(service: NodeService, pki_dir: Path) -> Iterator[str]:
    """The node's API as `fedseek node start` serves it: real TLS, certificates, roles, and the
    site's access policy listing the test reviewers (tests/node/peers.py)."""
    site_policy(service.layout, audit=service.audit)
    api = start_api(service, pki.load_leaf(pki_dir, "site-a"), host="127.0.0.1", port=free_port())
    yield api.url
    api.stop()


def cli_identity(pki_dir: Path, name: str) -> list[str]:
    return [
        "--ca",
        str(pki_dir / "ca" / "ca.pem"),
        "--cert",
        str(pki_dir / name / "cert.pem"),
        "--key",
        str(pki_dir / name / "key.pem"),
    ]


def test_cli_explain_against_the_https_node(
    node_url: str, pki_dir: Path, client: TestClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "system", "content": "Triage."}, {"role": "user", "content": PROMPT}]))
    out = tmp_path / "result.json"
    argv = ["explain", "--node", node_url, *cli_identity(pki_dir, "reviewer"), "--messages-file", str(messages)]
    argv += ["--model", "v1", "--response", RESPONSE, "--granularity", "sentence", "--max-evals", "20"]
    assert main([*argv, "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["status"] == "completed" and result["granularity"] == "sentence"
    assert "".join(result["features"]) == PROMPT
    assert client.get(f"/v1/explanations/{result['id']}").json() == result
    printed = capsys.readouterr()
    assert result["html"] in printed.out
    assert result["top_features"][0]["feature"] in printed.out
    assert "20/20" in printed.err  # the progress bar ran to the end


def test_cli_explain_reports_refusal_in_one_line(
    node_url: str, pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.json"
    argv = ["explain", "--node", node_url, *cli_identity(pki_dir, "reviewer"), "--prompt", PROMPT]
    assert main([*argv, "--model", "v9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedseek: error: node answered 404: model 'v9'")
    assert not out.exists()


def test_cli_explain_with_a_node_certificate_is_refused_and_audited(
    node_url: str, pki_dir: Path, service: NodeService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real handshake: the certificate is valid, but a node may not ask for explanations."""
    before = len(service.audit)
    argv = ["explain", "--node", node_url, *cli_identity(pki_dir, "site-b"), "--prompt", PROMPT]
    assert main([*argv, "--out", str(tmp_path / "never.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedseek: error: node answered 403: the site's access policy does not allow site-b (node)")
    refusal = audit_records(service)[before:]
    assert [r["action"] for r in refusal] == ["access.refused"] and refusal[0]["actor"] == "site-b"


def test_certificate_from_another_ca_fails_the_handshake_and_is_audited(
    node_url: str, service: NodeService, pki_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-pki"
    pki.init_ca(other, consortium="not-our-consortium")
    pki.issue(other, "reviewer", role="reviewer")
    before = len(service.audit)
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(other / "reviewer" / "cert.pem"), str(other / "reviewer" / "key.pem"))
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=ctx, timeout=10) as http:
        http.get(f"{node_url}/v1/explanations/expl-" + "0" * 32)
    deadline = time.monotonic() + 10
    while len(service.audit) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    record = audit_records(service)[-1]
    assert record["action"] == "tls.refused"
    assert "unable to get local issuer certificate" in record["details"]["reason"]
