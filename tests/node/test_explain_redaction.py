"""Issue 16, data minimisation: direct identifiers never reach a stored explanation (node/explain_service.py).

A reviewer explains a prompt that names the patient, their record number and phone number, and a response
naming a doctor. The explanation (features, response, HTML report, all sealed at rest) and its audit
record carry placeholders only; the audit record counts what was redacted; the prompt HMAC is still
of the text as sent, so it matches the request's `serve` record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from node.explain_service import ExplainRequest, Explanations
from node.service import NodeService
from node.site_keys import load_site_keys
from tests.node.tiny_service import tiny_service

PROMPT = "Mr John Smith, MRN 00991234, tel 020 7946 0958: crushing chest pain. Which department?"
RESPONSE = "cardiology, Dr Patel"
SECRETS = ("John", "Smith", "00991234", "7946", "0958", "Patel")


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    return tiny_service(tiny_model_dir, site_data_dir, tmp_path_factory.mktemp("state"), n_train=4, n_eval=2)


def test_identifiers_are_redacted_before_an_explanation_is_made_or_stored(service: NodeService) -> None:
    explanations = Explanations(service)
    request = ExplainRequest(prompt=PROMPT, response=RESPONSE, granularity="word", max_evals=20)
    job = explanations.validate(request, requested_by="rita")
    result = explanations.run(job)

    assert (
        "".join(result["features"])
        == "Mr [NAME], MRN [RECORD-NUMBER], tel [PHONE]: crushing chest pain. Which department?"
    )
    assert result["response"] == "cardiology, Dr [NAME]"
    assert not any(s in json.dumps(result) for s in SECRETS)
    assert explanations.get(result["id"]) == result  # what was stored (sealed) is the redacted result
    html = explanations.report(result["id"], "html").decode()
    assert "crushing" in html and not any(s in html for s in SECRETS)

    record = [json.loads(line) for line in service.audit.path.read_text().splitlines()][-1]
    assert record["action"] == "explain" and record["details"]["explanation_id"] == result["id"]
    assert record["details"]["redacted"] == {"name": 2, "record_number": 1, "phone": 1}
    keys = load_site_keys(service.layout.site_secret)
    sent = json.dumps([{"role": "user", "content": PROMPT}], sort_keys=True)
    assert record["details"]["prompt_hmac"] == keys.digest(sent)  # as sent: it matches the serve record
    assert record["details"]["response_hmac"] == keys.digest(RESPONSE)
    assert not any(s in service.audit.path.read_text() for s in SECRETS)


def test_a_failed_background_job_does_not_quote_identifiers(
    service: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    explanations = Explanations(service)

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError(f"could not score {PROMPT!r}")  # an error that quotes the prompt

    monkeypatch.setattr(service.host, "response_logprobs", broken)
    job = explanations.validate(ExplainRequest(prompt=PROMPT, response=RESPONSE, max_evals=20), requested_by="rita")
    explanations.submit(job)
    deadline = time.monotonic() + 600  # a bound so a broken worker fails the test instead of hanging it
    while explanations.get(job.id)["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    failed = explanations.get(job.id)
    assert failed["status"] == "failed" and "crushing chest pain" in failed["error"]
    assert not any(s in failed["error"] for s in SECRETS)
