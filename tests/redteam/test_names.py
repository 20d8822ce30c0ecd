"""Finding 4, against a real node: `/internal/deploy` accepted any version string.

Before: an absolute version wrote adapter files outside the state directory (`adapters / "/tmp/x"`
is `/tmp/x`), and `site_local` overwrote the training adapter and became the default served
model. Now every version passes `federation.protocol.names.check_adapter_name` (one pattern,
reserved names) before the body is read, so the deploy is refused with a 400 and nothing is
written but one `deploy.refused` audit record.

The node is the one `fedseek node start` serves: its real HTTPS endpoint (mTLS, TLS 1.3) with
its real access policy, called the way the site's ClientApp calls it (`node.client_app.agent_client`:
the site's own node certificate and the agent token).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.ops.supervise import free_port
from federation.protocol import wire
from federation.security import pki
from node.agent import start_api
from node.client_app import CONFIG_HEADER, agent_client
from node.engine import TRAIN_ADAPTER
from node.service import NodeService
from privacy.audit import companion_paths
from tests.node.tiny_service import tiny_service

pytestmark = pytest.mark.e2e

GOOD = "global-v0001"


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, site_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeService:
    state = tmp_path_factory.mktemp("redteam-names-state")
    svc = tiny_service(tiny_model_dir, site_data_dir, state, n_train=4, n_eval=2)
    return svc


@pytest.fixture(scope="module")
def client_app_config(service: NodeService, pki_dir: Path) -> Iterator[dict[str, Any]]:
    """The node's API served as `fedseek node start` serves it, and the ClientApp's node config for it."""
    leaf = pki.load_leaf(pki_dir, "site-a")
    api = start_api(service, leaf, host="127.0.0.1", port=free_port())
    try:
        yield {
            "agent-url": api.url,
            "agent-token-file": str(service.layout.agent_token),
            "agent-ca": str(leaf.ca_cert),
            "agent-cert": str(leaf.cert),
            "agent-key": str(leaf.key),
            "site": "site-a",
        }
    finally:
        api.stop()


def _arrays(service: NodeService, seed: int) -> wire.Arrays:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.05, v.shape).astype(np.float32) for k, v in service.host.initial_arrays().items()}


def _deploy(node_config: dict[str, Any], version: str, arrays: wire.Arrays) -> Any:
    """POST /internal/deploy exactly as the ClientApp's `evaluate` does: a whole, correctly hashed adapter."""
    config = {"adapter-version": version, "adapter-sha256": wire.sha256_of(arrays), "run-id": "7"}
    with agent_client(node_config, timeout=120) as http:
        return http.post("/internal/deploy", content=wire.encode(arrays), headers={CONFIG_HEADER: json.dumps(config)})


def _tree(root: Path, *, skip: set[Path]) -> dict[str, str]:
    """Every file under `root` (but `skip`) with its content digest, and every directory."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p in skip:
            continue
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def deployed(service: NodeService, client_app_config: dict[str, Any]) -> wire.Arrays:
    """A legitimate deployment first: the default served model the attacks must not displace."""
    arrays = _arrays(service, seed=1)
    r = _deploy(client_app_config, GOOD, arrays)
    assert r.status_code == 200, r.text
    return arrays


def _attacks(base_model: str, outside: Path) -> list[str]:
    return [str(outside), f"../{outside.name}", "a/b", TRAIN_ADAPTER, base_model, "base", "latest", "V1", "x.y"]


def test_path_like_and_reserved_versions_are_refused_with_nothing_written(
    service: NodeService, client_app_config: dict[str, Any], deployed: wire.Arrays, tmp_path: Path
) -> None:
    """Finding 4: absolute, relative and nested paths, the training adapter's name and the base
    model's names are each refused (400, one line), and neither the state directory, nor /tmp,
    nor the served models change; the training adapter keeps its weights."""
    state = service.layout.root
    outside = Path("/tmp") / f"fedseek-redteam-{uuid.uuid4().hex[:12]}"
    audit_files = {service.layout.audit, *companion_paths(service.layout.audit)}  # head, checkpoint, tree
    before = _tree(state, skip=audit_files)
    parent_before = sorted(p.name for p in state.parent.iterdir())
    train_before = service.host.adapter_arrays(TRAIN_ADAPTER)
    models_before = service.models()
    audit_before = len(service.audit)
    attacks = _attacks(service.host.model_name, outside)

    for i, version in enumerate(attacks):
        r = _deploy(client_app_config, version, _arrays(service, seed=100 + i))
        assert r.status_code == 400, (version, r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_name", (version, error)
        message = error["message"]
        assert "\n" not in message and ("reserved" in message or "invalid adapter version" in message), message

    assert not outside.exists() and not (outside / "adapter.safetensors").exists()
    assert _tree(state, skip=audit_files) == before
    assert sorted(p.name for p in state.parent.iterdir()) == parent_before  # `../x` lands beside the state dir
    train_after = service.host.adapter_arrays(TRAIN_ADAPTER)
    assert all(np.array_equal(train_before[k], train_after[k]) for k in train_before)
    assert service.models() == models_before
    assert service.host.resolve(None) == GOOD  # the default served model is still the real deployment
    assert list(service.host.adapters) == [GOOD]

    refused = [json.loads(line) for line in service.audit.path.read_text().splitlines()][audit_before:]
    assert [r["action"] for r in refused] == ["deploy.refused"] * len(attacks)
    assert all(r["actor"] == "coordinator" and r["details"]["error"] for r in refused)


def test_a_plain_new_version_still_deploys(
    service: NodeService, client_app_config: dict[str, Any], deployed: wire.Arrays
) -> None:
    """Control: the same client and route accept a plain name, which becomes the default model."""
    r = _deploy(client_app_config, "global-v0002", _arrays(service, seed=2))
    assert r.status_code == 200, r.text
    assert service.host.resolve(None) == "global-v0002"
    assert (service.layout.adapters / "global-v0002" / "adapter.json").is_file()
