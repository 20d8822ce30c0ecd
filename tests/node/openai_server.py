"""The OpenAI-compatible server the API tests share: a site (`create_serving_app` over the tiny
DeepSeek-V3 with two adapter versions, as `fedseek serve` runs it) on uvicorn on loopback.

tests/node/test_openai_api.py and test_openai_clients.py each serve one for their module; the vLLM
backend test mounts the node's own app with `uvicorn_on_loopback`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import uvicorn

from federation.ops.layout import NodeLayout
from federation.ops.supervise import free_port
from federation.protocol import wire
from node.access import AccessPolicy
from node.api import create_serving_app
from node.api_keys import ensure_first_key
from node.engine import ModelHost
from node.model import load_model
from node.service import Serving
from privacy.audit import AuditTrail
from tests.fake_peer import header_peer
from tests.node.peers import site_policy

USER = [{"role": "user", "content": "Chest pain since this morning."}]


class Site:
    def __init__(self, root: Path, model_dir: Path) -> None:
        model, tok = load_model(model_dir)
        self.host = ModelHost(model, tok, model_name=model_dir.name)
        layout = NodeLayout(root)
        self.audit = AuditTrail(layout.audit)
        keys = ensure_first_key(layout)
        self.key = layout.api_key.read_text().strip()
        self.policy = AccessPolicy(
            site="site-a",
            audit=self.audit,
            api_keys=keys,
            agent_token="-",
            policy=site_policy(layout, audit=self.audit),
            peer=header_peer,
        )
        self.serving = Serving(self.host, self.audit, owner="site-a", max_slots=8, max_queue=32)
        for seed, (version, parent) in enumerate([("v1", None), ("v2", "v1")], start=1):
            rng = np.random.default_rng(seed)
            arrays = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in self.host.initial_arrays().items()}
            self.host.install(version, arrays, sha256=wire.sha256_of(arrays), parent=parent)
        self.serving.sync_adapters()
        self.app = create_serving_app(lambda: self.serving, self.policy, name="site-a")
        self.url = ""  # set while served_site serves it

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.path.read_text().splitlines()]

    def client(self, *, timeout: float) -> openai.OpenAI:
        """The `openai` client on this site's server, with its API key (no retries: tests see every error)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=timeout)


@contextlib.contextmanager
def uvicorn_on_loopback(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def served_site(root: Path, model_dir: Path) -> Iterator[Site]:
    """A Site under `root` on a loopback server (`site.url`); its engine closed after the server stops."""
    site = Site(root, model_dir)
    try:
        with uvicorn_on_loopback(site.app) as url:
            site.url = url
            yield site
    finally:
        site.serving.close()
