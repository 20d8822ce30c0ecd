"""The Flower ClientApp: a thin relay from the SuperNode to the running node agent.

The agent owns the model, the data, the ledger and the audit trail; the ClientApp only
converts Flower records to the wire format and back, and calls the agent's local API
(`/internal/train`, `/internal/ready`, `/internal/deploy`) over HTTPS with the site's own node certificate and
the agent's bearer token. Node config keys (from `flower-supernode --node-config`):
`agent-url`, `agent-token-file`, `agent-ca`, `agent-cert`, `agent-key`.

What travels is the agent's choice: under FFA-LoRA the train reply holds only the B factors
and the `adapter` record says so (wire version 2, see federation/protocol/wire.py); a B-only global
adapter is relayed as it is and the agent adds its own seeded A.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.protocol import records, wire
from federation.security import pki
from federation.security.peer_pin import pinned_client_context
from node.secagg import secagg_mod

app = ClientApp()

CONFIG_HEADER = "x-fedseek-config"
REPORT_HEADER = "x-fedseek-report"


def agent_client(node_config: dict[str, Any], *, timeout: float = 900.0) -> httpx.Client:
    """HTTPS to this site's agent with the site's certificate and the agent token.

    The agent must answer with this site's own node certificate (role and name pinned, not just
    127.0.0.1, which every node certificate names), checked before the token is sent.
    """
    token = Path(str(node_config["agent-token-file"])).read_text().strip()
    tls = pinned_client_context(
        ca_cert=str(node_config["agent-ca"]),
        role="node",
        name=_own_site(node_config),
        cert=str(node_config["agent-cert"]),
        key=str(node_config["agent-key"]),
    )
    return httpx.Client(
        base_url=str(node_config["agent-url"]),
        verify=tls,
        headers={"authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def _own_site(node_config: dict[str, Any]) -> str:
    """The site this ClientApp serves: the name on the site certificate it presents (the agent serves the same)."""
    return pki.read_identity(Path(str(node_config["agent-cert"]))).name


def _call(context: Context, path: str, msg: Message) -> httpx.Response:
    content = msg.content
    arrays = (
        records.from_array_record(content.array_records[records.ARRAYS])
        if records.ARRAYS in content.array_records
        else {}
    )
    config = dict(content.config_records[records.CONFIG]) if records.CONFIG in content.config_records else {}
    config["run-id"] = str(context.run_id)
    body = wire.encode(arrays) if arrays else b""
    with agent_client(dict(context.node_config)) as client:
        resp = client.post(path, content=body, headers={CONFIG_HEADER: json.dumps(config)})
    if resp.status_code != 200:
        raise RuntimeError(f"node agent refused {path}: {resp.status_code} {resp.text[:300]}")
    return resp


@app.train(mods=[secagg_mod])  # `fedseek run --secagg`: SecAgg+ masks the update (node/secagg.py)
def train(msg: Message, context: Context) -> Message:
    resp = _call(context, "/internal/train", msg)
    report = wire.PrivacyReport.from_dict(json.loads(resp.headers[REPORT_HEADER]))
    update = wire.decode_update(resp.content)  # under FFA-LoRA the agent sends B and A's digest only
    content = RecordDict(
        {
            **records.update_records(update),
            records.METRICS: records.report_metrics(report),
            records.PRIVACY: records.report_to_config(report),
            records.WITNESS: records.witness_to_config(report.witness),  # the signed ledger head after the round
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Install the named global adapter version on the agent, then report its eval loss."""
    resp = _call(context, "/internal/deploy", msg)
    result = resp.json()
    content = RecordDict(
        {
            records.METRICS: MetricRecord(
                {  # null: the version's loss is not a number (the site rolled it back, node/release.py)
                    "num-examples": int(result["num_examples"]),
                    "eval-loss": float("nan") if result["eval_loss"] is None else float(result["eval_loss"]),
                }
            ),
            records.SITE: ConfigRecord(
                {
                    "name": str(result["site"]),
                    "version": str(result["version"]),
                    # the site's gray release of it: candidate, stable, or retired (rolled back at once)
                    "release": str(result.get("release", "")),
                }
            ),
        }
    )
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The coordinator's readiness query before a round: the agent plans the round (nothing charged)
    and says whether this site can train it. An agent that does not answer makes this an error reply."""
    resp = _call(context, "/internal/ready", msg)
    answer = wire.Readiness.from_dict(resp.json())
    content = RecordDict(
        {
            records.READINESS: records.readiness_to_config(answer),
            records.WITNESS: records.witness_to_config(answer.witness),  # the signed ledger head before the round
        }
    )
    return Message(content, reply_to=msg)
