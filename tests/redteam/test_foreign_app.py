"""Finding 1 (second half), real processes: a site runs only app bundles the consortium signed.

Before: whoever reached the SuperLink's Control API ran any app bundle's ClientApp, as the
agent's user, at every site, and nothing was recorded there. Now each site's SuperNode runs with
`--isolation process` and hands its tasks only to the site's app guard (`node/app_guard`), which
checks the bundle's app-publisher signature against the site's `publishers.json` before the
bundle is unpacked, answers the ServerApp with the refusal, and writes `clientapp.refused` (or
`clientapp.approved`) to the site's audit trail.

One coordinator (`fedseek coordinator start`) and one real node agent (`fedseek node start`);
the coordinator's operator submits, through `fedseek run`'s own path (`coordinator.runs`):
a foreign bundle whose ClientApp would write a marker file at the site, unsigned, signed with a
key of the operator's own, and carrying the consortium's genuine signature of FedSeek's app;
then the signed FedSeek app, which still trains a round.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from coordinator import runs
from coordinator.runs import run, submit_run
from federation.ops import netns
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, free_port
from federation.protocol import config as cfg
from federation.protocol.round_settings import RunSettings
from federation.security import pki
from federation.security.app_signing import FEDSEEK_APP_DIR, SIGNATURE_FILE, sign_app_dir
from privacy.audit import verify
from tests.e2e.fleet import start_coordinator, stop, wait_activated, wait_json
from tests.redteam.consortium import signed_consortium
from tests.redteam.procnet import process_tree

pytestmark = pytest.mark.e2e

SITE = "site-a"

CLIENT_APP = """
import os
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # Stand-in for arbitrary code at the site: anything it could do, it could leave this marker.
    Path({marker!r}).write_text(f"ran as uid {{os.getuid()}} in {{os.getcwd()}}")
    return Message(RecordDict({{"m": MetricRecord({{"ran": 1.0}})}}), reply_to=msg)
"""

SERVER_APP = """
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    start = time.time()
    nodes = []
    while not nodes and time.time() - start < 60:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    sent = time.time()
    messages = [
        Message(RecordDict({{"c": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="train") for n in nodes
    ]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=120):
        error = reply.error.reason if reply.has_error() else None
        replies.append({{"at": time.time(), "error": error}})
    Path({result!r}).write_text(json.dumps({{"nodes": nodes, "sent": sent, "replies": replies}}))
"""


@pytest.fixture(scope="module")
def consortium(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, site_data_dir: Path
) -> Iterator[dict[str, Any]]:
    """A coordinator with the consortium's signed app and one site's real node agent, both started."""
    base = tmp_path_factory.mktemp("foreign-app")
    pki_dir, state = signed_consortium(base, [SITE])
    fleet_port = free_port()
    procs: list[Managed] = []
    try:
        coordinator, info = start_coordinator(
            base, ["--pki", str(pki_dir), "--state", str(state), "--fleet-port", str(fleet_port)]
        )
        procs.append(coordinator)
        site_state = base / SITE / "state"
        node_config = cfg.save(
            cfg.NodeConfig(
                name=SITE,
                model_dir=str(tiny_model_dir),
                data_dir=str(site_data_dir),
                state_dir=str(site_state),
                pki_dir=str(pki_dir),
                coordinator=f"127.0.0.1:{fleet_port}",
                api_port=free_port(),
            ),
            base / SITE / "node.json",
        )
        node = Managed(
            name=SITE,
            argv=[sys.executable, "-m", "federation.cli.main", "node", "start", "--config", str(node_config)],
            log_path=base / SITE / "agent.log",
        ).start()
        procs.append(node)
        wait_json(NodeLayout(site_state).endpoints, node, timeout=300)
        assert wait_activated(info, 1, timeout=120), CoordinatorLayout(state).superlink_log.read_text()[-3000:]
        yield {"base": base, "pki": pki_dir, "state": state, "site_state": site_state, "node": node}
    finally:
        stop(procs)


def foreign_app(where: Path, *, marker: Path, result: Path) -> Path:
    """An app bundle of the operator's own: FedSeek's run settings (so `fedseek run`'s config is
    accepted), its own code, a ClientApp that would leave `marker` at the site."""
    app = where / "foreign-app"
    (app / "foreign_pkg").mkdir(parents=True)
    pyproject = (FEDSEEK_APP_DIR / "pyproject.toml").read_text()
    pyproject = pyproject.replace('name = "fedseek-lora"', 'name = "foreign-app"')
    pyproject = pyproject.replace('publisher = "fedseek"', 'publisher = "mallory"')
    pyproject = pyproject.replace("coordinator.server_app:app", "foreign_pkg.server:app")
    pyproject = pyproject.replace("node.client_app:app", "foreign_pkg.client:app")
    (app / "pyproject.toml").write_text(pyproject)
    (app / "foreign_pkg" / "__init__.py").write_text("")
    (app / "foreign_pkg" / "client.py").write_text(CLIENT_APP.format(marker=str(marker)))
    (app / "foreign_pkg" / "server.py").write_text(SERVER_APP.format(result=str(result)))
    return app


def site_records(site_state: Path, action: str) -> list[dict[str, Any]]:
    path = NodeLayout(site_state).audit
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["action"] == action]


def wait_for(path: Path, node: Managed, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert node.alive(), node.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path} not written in {timeout}s"
        time.sleep(0.2)
    return dict(json.loads(path.read_text()))


@pytest.mark.parametrize("signing", ["unsigned", "operator-key", "borrowed-signature"])
def test_foreign_bundle_never_runs_at_the_site(
    consortium: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signing: str
) -> None:
    """Finding 1: the foreign ClientApp is refused before it is unpacked; the ServerApp hears why
    within seconds; the refusal is in the site's audit trail; the marker never appears."""
    # `fedseek run` refuses an unsigned directory itself, a courtesy, not a boundary: whoever holds
    # the Control API runs plain `flwr run`. Submit exactly what is given.
    monkeypatch.setattr(runs, "signed_app", lambda state_dir, app_dir=None: app_dir)
    marker, result = tmp_path / "marker", tmp_path / "serverapp-result.json"
    app = foreign_app(tmp_path, marker=marker, result=result)
    if signing == "operator-key":  # signed, but not with the consortium's app-publisher key
        signed = tmp_path / "signed" / "foreign-app"
        sign_app_dir(app, signed, ed25519.Ed25519PrivateKey.generate())
        app = signed
    elif signing == "borrowed-signature":  # the consortium's genuine signature, of FedSeek's app
        shutil.copy(CoordinatorLayout(consortium["state"]).signed_app / SIGNATURE_FILE, app / SIGNATURE_FILE)
    before = len(site_records(consortium["site_state"], "clientapp.refused"))

    submitted = time.time()
    submit_run(consortium["state"], settings=RunSettings(run_name=f"foreign-{signing}", min_nodes=1), app_dir=app)
    seen = wait_for(result, consortium["node"], timeout=240)

    assert len(seen["nodes"]) == 1 and len(seen["replies"]) == 1, seen
    (reply,) = seen["replies"]
    assert reply["error"] is not None and "AppRefused" in reply["error"], reply
    reason = {"unsigned": "not signed", "operator-key": "not a publisher", "borrowed-signature": "content differs"}
    assert reason[signing] in reply["error"], reply
    print(f"\n[{signing}] submission -> ServerApp holds the site's refusal: {reply['at'] - submitted:.1f} s")

    records = site_records(consortium["site_state"], "clientapp.refused")[before:]
    assert len(records) == 1, records
    details = records[0]["details"]
    assert details["app"] == "mallory/foreign-app" and reason[signing] in details["reason"], details
    assert records[0]["actor"] == "app-guard" and details["fab_sha256"]
    assert verify(NodeLayout(consortium["site_state"]).audit).ok  # agent and guard share one chain
    time.sleep(2)  # a task process that got past the check would have written by now
    assert not marker.exists(), marker.read_text()
    guard_home = NodeLayout(consortium["site_state"]).app_guard_home
    assert not list(guard_home.rglob("client.py"))  # never unpacked


def runtime_api(node: Managed) -> str:
    """The site SuperNode's Runtime API address, from its command line."""
    for pid in process_tree(node.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if any(a.endswith("flower-supernode") for a in argv[:2]):
            return f"127.0.0.1:{argv[argv.index('--port') + 1]}"
    raise AssertionError("no SuperNode in the node agent's process tree")


def acquire_task(address: str, secret: bytes | None) -> int:
    """HTTP status of AcquireTask, as Flower's own SuperExec sends it (with `secret`, if given)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})
            )
        )
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
    )
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
        return 200
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code
    finally:
        client.close()


# AcquireTask from inside the SuperNode's namespace, the only place its Runtime API is
# (tests/redteam/test_site_local_service.py shows no other local user gets there at all).
INSIDE = """
import sys
from pathlib import Path
from tests.redteam.test_foreign_app import acquire_task
given = {"none": None, "guess": b"a guess"}
print(acquire_task(sys.argv[1], given[sys.argv[2]] if sys.argv[2] in given else Path(sys.argv[2]).read_bytes()))
"""


def acquire_task_inside(site_state: Path, address: str, secret: str) -> int:
    """`acquire_task` run in the namespace of the site's SuperNode (`secret`: none, guess or a path)."""
    done = netns.run_inside(
        NodeLayout(site_state).runtime_socket,
        [sys.executable, "-c", INSIDE, address, secret],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_only_the_app_guard_takes_the_sites_tasks(consortium: dict[str, Any]) -> None:
    """Finding 1: a local user at the site cannot stand in for the guard: the SuperNode hands a task
    (and its token) only to a caller holding the SuperExec secret, a 0600 file of the agent's user
    (and its Runtime API is only inside the namespace it shares with the guard)."""
    address = runtime_api(consortium["node"])
    secret = NodeLayout(consortium["site_state"]).superexec_secret
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_uid == os.geteuid()
    assert acquire_task_inside(consortium["site_state"], address, "none") == 401
    assert acquire_task_inside(consortium["site_state"], address, "guess") == 401
    assert acquire_task_inside(consortium["site_state"], address, str(secret)) == 200  # with the secret: served


def test_the_signed_fedseek_app_still_trains(consortium: dict[str, Any]) -> None:
    """Finding 1, the other side: the consortium's signed app runs a real round at the guarded site."""
    before = len(site_records(consortium["site_state"], "clientapp.approved"))
    summary = run(consortium["state"], settings=RunSettings(run_name="signed", num_rounds=1, min_nodes=1), timeout=600)
    assert summary["status"] == "finished" and summary["rounds_completed"] == 1
    approved = site_records(consortium["site_state"], "clientapp.approved")[before:]
    assert {r["details"]["app"] for r in approved} == {"fedseek/fedseek-lora"}  # train, then evaluate
    key_ids = set(json.loads(pki.party_publishers(consortium["pki"], SITE).read_text())["publishers"][0].values())
    assert all(r["details"]["key_id"] in key_ids for r in approved)
    assert verify(NodeLayout(consortium["site_state"]).audit).ok
