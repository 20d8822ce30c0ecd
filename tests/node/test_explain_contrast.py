"""Contrastive explanations, faithfulness and lineage through the node's real HTTPS API and
`fedseek explain --contrast`: "why cardiology rather than neurology?" on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from federation.ops.supervise import free_port
from federation.protocol import wire
from federation.security import pki
from federation.security.peer_pin import pinned_client_context
from node.agent import start_api
from node.api import create_app
from node.client_app import CONFIG_HEADER
from node.service import NodeService
from tests.node.peers import as_peer, policy_for, site_policy
from tests.node.tiny_service import tiny_service

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "Triage. Answer with one department."
PROMPT = "Chest pain and troponin high, ECG shows ST elevation. Which department?"
RESPONSE = " cardiology"
FOIL = " neurology"
LINEAGE = {
    "parent": None,
    "run": "unit-run",
    "round": 1,
    "sites": [{"site": "site-a", "epsilon": 0.731, "delta": 1e-5}, {"site": "site-b", "epsilon": 1.402, "delta": 1e-5}],
}


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    svc = tiny_service(tiny_model_dir, site_data_dir, tmp_path_factory.mktemp("contrast-state"), n_train=8, n_eval=2)
    # A larger-than-trained adapter so log-probs move with the prompt (the base model is near uniform).
    rng = np.random.default_rng(0)
    v1 = {k: rng.normal(0.0, 0.5, v.shape).astype(np.float32) for k, v in svc.host.initial_arrays().items()}
    # Deployed as the ClientApp deploys: /internal/deploy with the coordinator's config, lineage included.
    config = {
        "adapter-version": "global-v0001",
        "adapter-sha256": wire.sha256_of(v1),
        "adapter-lineage": json.dumps(LINEAGE),
    }
    agent = TestClient(create_app(svc, access=policy_for(svc)), raise_server_exceptions=False)
    headers = {"authorization": f"Bearer {svc.token}", **as_peer("site-a", "node"), CONFIG_HEADER: json.dumps(config)}
    r = agent.post("/internal/deploy", content=wire.encode(v1), headers=headers)
    assert r.status_code == 200, r.text
    return svc


def test_deploy_keeps_the_lineage_with_the_version(service: NodeService) -> None:
    meta = json.loads((service.layout.adapters / "global-v0001" / "adapter.json").read_text())
    assert meta["lineage"] == LINEAGE and meta["sha256"] == service.host.adapters["global-v0001"].sha256


@pytest.fixture(scope="module")
def node_url(service: NodeService, pki_dir: Path) -> Iterator[str]:
    site_policy(service.layout, audit=service.audit)
    api = start_api(service, pki.load_leaf(pki_dir, "site-a"), host="127.0.0.1", port=free_port())
    yield api.url
    api.stop()


@pytest.fixture(scope="module")
def reviewer(node_url: str, pki_dir: Path) -> Iterator[httpx.Client]:
    """A reviewer's HTTPS client, as `fedseek explain` builds it."""
    tls = pinned_client_context(ca_cert=str(pki_dir / "ca" / "ca.pem"), role="node")
    tls.load_cert_chain(str(pki_dir / "reviewer" / "cert.pem"), str(pki_dir / "reviewer" / "key.pem"))
    with httpx.Client(base_url=node_url, verify=tls, timeout=300) as http:
        yield http


@pytest.fixture(scope="module")
def contrasted(node_url: str, pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """`fedseek explain --contrast`, run as a reviewer runs it (its own process), against the HTTPS
    node: its result and what it printed."""
    tmp = tmp_path_factory.mktemp("cli")
    messages = tmp / "messages.json"
    messages.write_text(json.dumps([{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]))
    out = tmp / "result.json"
    argv = [str(Path(sys.executable).parent / "fedseek"), "explain", "--node", node_url]
    argv += ["--ca", str(pki_dir / "ca" / "ca.pem")]
    argv += ["--cert", str(pki_dir / "reviewer" / "cert.pem"), "--key", str(pki_dir / "reviewer" / "key.pem")]
    argv += ["--messages-file", str(messages), "--response", RESPONSE, "--contrast", FOIL, "--max-evals", "60"]
    argv += ["--model", "global-v0001"]  # a candidate until gray release promotes it: named, not the default
    proc = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def _logprob(service: NodeService, text: str, user: str) -> float:
    ids = service.host.tokenizer(text, add_special_tokens=False).input_ids
    msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]]
    return float(np.asarray(service.host.response_logprobs(msgs, ids, model="global-v0001")).sum())


def test_contrast_is_efficient_and_matches_the_model(
    contrasted: tuple[dict[str, Any], str], service: NodeService
) -> None:
    body, _ = contrasted
    assert body["status"] == "completed" and body["granularity"] == "word"  # words by default
    c = body["contrast"]
    assert (c["response"], c["foil"]) == (RESPONSE, FOIL)
    # the two responses' log-probs, scored independently of the explanation
    assert c["response_logprob"] == pytest.approx(_logprob(service, RESPONSE, PROMPT), abs=1e-4)
    assert c["foil_logprob"] == pytest.approx(_logprob(service, FOIL, PROMPT), abs=1e-4)
    values = np.array(body["values"])
    assert values.shape == (len(body["features"]), 1) and len(body["output_tokens"]) == 1
    change = c["difference"] - c["difference_masked"]
    assert abs(change) > 1e-3  # the prompt moves the difference: the check below is not vacuous
    assert abs(float(values.sum()) - change) <= 1e-4  # efficiency, within 1e-4
    assert body["full_values"][0] == pytest.approx(c["difference"], abs=1e-9)
    assert body["base_values"][0] == pytest.approx(c["difference_masked"], abs=1e-9)
    p = body["probabilities"]
    assert p["response"] == pytest.approx(np.exp(c["response_logprob"]))
    assert p["contrast"] == pytest.approx(np.exp(c["foil_logprob"]))


def test_contrast_carries_faithfulness_lineage_and_summary(contrasted: tuple[dict[str, Any], str]) -> None:
    body, printed = contrasted
    f = body["faithfulness"]
    for key in ("deletion_auc", "insertion_auc"):
        assert 0.0 <= f[key] <= 1.0
    assert f["deletion"]["fractions"][0] == 0.0 and f["deletion"]["fractions"][-1] == 1.0
    # the curves' endpoints are the difference with and without the prompt, as a preference in [0, 1]
    # (scored again in other batches: float32 kernels differ in the last bits)
    c = body["contrast"]
    assert f["p_full"] == pytest.approx(1 / (1 + np.exp(-c["difference"])), abs=1e-5)
    assert f["p_empty"] == pytest.approx(1 / (1 + np.exp(-c["difference_masked"])), abs=1e-5)
    assert f["comprehensiveness"] == pytest.approx(
        f["p_full"] - f["deletion"]["probabilities"][f["deletion"]["steps"].index(f["top_k"])]
    )
    assert body["lineage"]["sites"] == LINEAGE["sites"]
    assert body["lineage"]["version"] == "global-v0001" and body["lineage"]["run"] == "unit-run"
    assert body["response_source"] == "supplied"
    assert body["summary"].startswith("The words that favoured \u201ccardiology\u201d over \u201cneurology\u201d") or (
        body["summary"].startswith("No word favoured")
    )
    assert body["summary"] in printed  # the CLI prints it first
    assert all("label" in t and "index" in t for t in body["top_features"])


def test_report_over_https_shows_contrast_lineage_and_curves(
    contrasted: tuple[dict[str, Any], str], reviewer: httpx.Client
) -> None:
    body, _ = contrasted
    r = reviewer.get(body["html"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "Why \u201ccardiology\u201d rather than \u201cneurology\u201d?" in page
    assert "<td>site-a</td><td class='num'>0.731</td>" in page and "<td>site-b</td><td class='num'>1.402</td>" in page
    assert '<polyline class="deletion"' in page and '<polyline class="insertion"' in page
    assert "supplied by the reviewer" in page


def test_generated_answer_is_marked_generated(reviewer: httpx.Client, service: NodeService) -> None:
    r = reviewer.post(
        "/v1/explanations", json={"model": "global-v0001", "prompt": PROMPT, "max_tokens": 2, "max_evals": 20}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response_source"] == "generated" and body["contrast"] is None
    page = reviewer.get(body["html"]).text
    assert "generated by the model (adapter global-v0001)" in page
    record = json.loads(service.audit.path.read_text().splitlines()[-1])
    assert record["action"] == "explain" and record["details"]["response_source"] == "generated"


@pytest.mark.parametrize(
    ("contrast", "needle"),
    [(RESPONSE, "same text"), ("", "contrast response is empty")],
    ids=["same-as-response", "empty"],
)
def test_contrast_refusals_write_nothing(
    reviewer: httpx.Client, service: NodeService, contrast: str, needle: str
) -> None:
    records = len(service.audit)
    r = reviewer.post(
        "/v1/explanations",
        json={"model": "global-v0001", "prompt": PROMPT, "response": RESPONSE, "contrast": contrast, "max_evals": 20},
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert len(service.audit) == records
