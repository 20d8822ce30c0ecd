"""`fedseek serve` the way a user runs it: the console script as its own process, the `openai`
client, a 64-client load on loopback, a clean stop, and the audit trail it leaves.

The server's memory is read from its own /proc entry, so the load test measures the server,
not the clients that share this machine with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from safetensors.numpy import save_file

from federation.ops.layout import NodeLayout
from federation.ops.supervise import free_port
from node.engine import ModelHost
from node.model import load_model
from privacy.audit import verify
from tests.load import chat_load

USER = [{"role": "user", "content": "Chest pain since this morning."}]
SLOTS, QUEUE = 8, 16


def fedseek() -> str:
    """The installed console script, next to this interpreter (what a user's shell finds)."""
    beside = Path(sys.executable).with_name("fedseek")
    return str(beside) if beside.exists() else shutil.which("fedseek") or "fedseek"


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    key: str
    state: NodeLayout
    log: Path
    early_statuses: Counter[int]

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS for the server process")


def write_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with the layout the model expects, as `fedseek serve --adapter` reads it."""
    model, tok = load_model(model_dir)
    rng = np.random.default_rng(7)
    arrays = {
        k: rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in ModelHost(model, tok, model_name="tiny").initial_arrays().items()
    }
    out.mkdir(parents=True)
    save_file(arrays, str(out / "adapter.safetensors"))
    return out


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve-cli")
    adapter = write_adapter(tiny_model_dir, root / "clinic-v1")
    port = free_port()
    state, log = root / "state", root / "serve.log"
    argv = [
        fedseek(),
        "serve",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        f"clinic-v1={adapter}",
        "--port",
        str(port),
        "--state",
        str(state),
        "--max-slots",
        str(SLOTS),
        "--max-queue",
        str(QUEUE),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        layout = NodeLayout(state)
        early = wait_ready_with_key(url, proc, log, layout.api_key)
        yield Served(proc, url, layout.api_key.read_text().strip(), layout, log, early)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_ready_with_key(url: str, proc: subprocess.Popen[bytes], log: Path, key_file: Path) -> Counter[int]:
    deadline = time.monotonic() + 60
    while not key_file.exists():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.05)
    key = key_file.read_text().strip()
    seen: Counter[int] = Counter()
    while time.monotonic() < deadline + 60:
        assert proc.poll() is None, f"fedseek serve exited {proc.returncode}:\n{log.read_text()}"
        try:
            r = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        seen[r.status_code] += 1
        if r.status_code == 200:
            return seen
        assert r.json()["error"]["message"], r.text  # 503 while loading, in OpenAI's error shape
        time.sleep(0.05)
    raise AssertionError(f"fedseek serve not ready:\n{log.read_text()}")


def test_only_503_before_the_model_is_loaded(served: Served) -> None:
    assert set(served.early_statuses) <= {200, 503}, served.early_statuses


def test_models_chat_and_stream_with_the_openai_client(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.key, max_retries=0, timeout=60)
    models = {m.id: m for m in client.models.list().data}
    assert "clinic-v1" in models and len(models) == 2, models
    base = next(m for m in models if m != "clinic-v1")
    assert getattr(models["clinic-v1"], "parent", None) == base

    reply = client.chat.completions.create(model="clinic-v1", messages=USER, max_tokens=4, seed=3)  # type: ignore[arg-type]
    assert reply.model == "clinic-v1" and reply.usage is not None and 0 < reply.usage.completion_tokens <= 4
    again = client.chat.completions.create(model="clinic-v1", messages=USER, max_tokens=4, seed=3)  # type: ignore[arg-type]
    assert again.choices[0].message.content == reply.choices[0].message.content

    chunks = list(
        client.chat.completions.create(
            model="clinic-v1",
            messages=USER,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 0 < usage.completion_tokens <= 4
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] in {"length", "stop"}

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="clinic-v9", messages=USER, max_tokens=2)  # type: ignore[arg-type]
    bad = openai.OpenAI(base_url=f"{served.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_64_clients_every_request_answered_or_429_memory_bounded(served: Served) -> None:
    """64 clients x 40 requests against 8 slots and a queue of 16: only 200 and 429, nothing lost."""
    clients, per_client = 64, 40
    body = {"model": "clinic-v1", "messages": USER, "max_tokens": 2}
    before = served.rss_mib()
    statuses, took = chat_load(
        url=served.url, key=served.key, body=body, clients=clients, per_client=per_client, backoff_s=0.05, timeout_s=120
    )
    grew = served.rss_mib() - before
    print(f"fedseek serve load: {dict(statuses)} in {took:.1f} s, server RSS {before:.0f} -> +{grew:.0f} MiB")
    assert sum(statuses.values()) == clients * per_client
    assert set(statuses) <= {200, 429} and statuses[200] > 0, statuses
    assert grew < 256, f"server RSS grew {grew:.0f} MiB under load"

    metrics = httpx.get(f"{served.url}/metrics", headers={"authorization": f"Bearer {served.key}"}).text
    gauges = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
    }
    assert gauges == {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}, gauges
    served_records = [line for line in served.state.audit.read_text().splitlines() if '"serve"' in line]
    assert len(served_records) >= statuses[200]


def test_sigterm_stops_cleanly_and_the_audit_trail_verifies(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0, served.log.read_text()
    result = verify(served.state.audit)
    assert result.ok and result.records > 0, result.error


@pytest.mark.parametrize(
    ("spec", "message"),
    [("clinic-v1", "--adapter wants NAME=DIR"), ("clinic-v1={missing}", "no adapter.safetensors")],
)
def test_bad_adapter_argument_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path, spec: str, message: str) -> None:
    spec = spec.format(missing=tmp_path / "nowhere")
    argv = [fedseek(), "serve", "--model", str(tiny_model_dir), "--adapter", spec, "--state", str(tmp_path / "s")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("fedseek: error:") and message in done.stderr, done.stderr


@pytest.mark.parametrize("model", ["nowhere", "empty"])
def test_a_bad_model_is_refused_before_any_state_is_written(tmp_path: Path, model: str) -> None:
    """A typo in --model must not leave a state directory (audit trail, API key) behind, and
    with no --state nothing is ever written into the current directory."""
    (tmp_path / "empty").mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    argv = [fedseek(), "serve", "--model", str(tmp_path / model), "--state", str(tmp_path / "s")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=work)
    assert done.returncode == 2 and done.stderr.startswith("fedseek: error: model "), done.stderr
    assert not (tmp_path / "s").exists()
    done = subprocess.run(
        [fedseek(), "serve", "--model", str(tmp_path / model)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")},
    )
    assert done.returncode == 2 and list(work.iterdir()) == [] and not (tmp_path / "xdg").exists()
