"""`fedseek demo`: a whole consortium on localhost, every part real, as separate processes.

Model, data, CA and certificates are generated; the coordinator and each hospital's node
agent run as their own `fedseek` processes; the rounds go over mTLS; the result is checked
through the same APIs a site's applications and reviewers use, and written to report.json.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fedseek_examples.demo.data import write_site_dataset

from federation.ops.atomic import write_atomic
from federation.ops.layout import CoordinatorLayout, NodeLayout
from federation.ops.supervise import Managed, ProcessError, free_port, log_tail, stop_all
from federation.protocol import config as cfg
from federation.security import pki
from node.data import exact_match, load_jsonl
from node.policy import add_members


def default_cache_dir() -> Path:
    """Where pretrained demo models are kept between runs: $FEDSEEK_CACHE, else the user's cache directory."""
    env = os.environ.get("FEDSEEK_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedseek"


@dataclass(frozen=True)
class DemoSettings:
    out: Path
    sites: int = 3
    rounds: int = 2
    keep_running: bool = False
    n_train: int = 1000
    """Training records per site. DP-SGD's noise on a step's mean gradient falls as 1/batch at a fixed
    sample rate, and the batch grows with the records. At 1,000 every site's exact match rose (by 0.27-0.45
    over five 2-site runs, examples/demo/README.md) while the 2-site test took 119-131 s on 2 cores with
    the base cached (72 s at the earlier 160 records, which learned nothing)."""
    n_eval: int = 60
    max_evals: int = 120
    start_timeout: float = 300.0
    run_timeout: float = 900.0
    n_accuracy: int = 60
    """Held-out records per site scored by exact match through the site's API, base and global adapter."""
    cache_dir: Path | None = None
    """Pretrained base models by cache key (default: `default_cache_dir()`)."""
    batch_size: int = 100
    """Expected (Poisson) DP-SGD batch at each site: a sample rate of batch_size / n_train."""
    local_epochs: int = 2
    """Passes over the site's records per round: 2 x 10 steps, the noise planned for all 20."""
    learning_rate: float = 0.01
    max_grad_norm: float = 0.1
    """Per-record clip: the records' gradients on the adapter measured 0.10-0.77 (median 0.24) on the base,
    so 1.0 clipped almost none of them while the noise, proportional to the clip, drowned their mean."""
    ffa_lora: bool = False
    """Train A and B (`RunSettings`' default). FFA-LoRA (B only, A the shared seed) measured no different
    here: one 2-site run 0.10 -> 0.53 and 0.33 -> 0.63, within A and B's five (0.45-0.55, 0.60-0.70),
    in the same time."""
    server_opt: str = "fedavg"
    """FedAvgM (0.9) over 2 rounds made some answers fragments ("itations") on 1,000 records a site."""

    def dp_settings(self) -> dict[str, Any]:
        """The demo's DP-LoRA settings under their `RunSettings` names: the run gets them, the report shows them."""
        names = ("batch_size", "local_epochs", "learning_rate", "max_grad_norm", "ffa_lora", "server_opt")
        return {name: getattr(self, name) for name in names}


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _fedseek(*args: str) -> list[str]:
    return [sys.executable, "-m", "federation.cli.main", *args]


def _wait_file(path: Path, proc: Managed, *, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        if not proc.alive():
            raise ProcessError(f"{proc.name} exited during start-up:\n{log_tail(proc.log_path)}")
        time.sleep(0.5)
    raise ProcessError(f"{proc.name} not ready within {timeout:.0f}s:\n{log_tail(proc.log_path)}")


def _prepare(settings: DemoSettings, names: list[str]) -> tuple[Path, Path]:
    from fedseek_examples.demo.pretrain import write_pretrained_tiny_model

    out = settings.out
    model_dir = out / "model" / "tiny-deepseek-v3"
    info = write_pretrained_tiny_model(
        model_dir, cache_dir=settings.cache_dir or default_cache_dir(), log=lambda line: say(line.strip())
    )
    how = "from the cache" if info["cached"] else f"in {info['seconds']:.0f} s ({info['cpu_seconds']:.0f} s of CPU)"
    say(
        f"tiny DeepSeek-V3 (MLA + MoE, real DeepSeek tokenizer) pretrained on {info['public_chats']} public "
        f"chats (no site's records, no findings-to-department pairs), {how}; final loss {info['final_loss']:.3f}"
    )
    for i, name in enumerate(names):
        write_site_dataset(
            out / "sites" / name / "data",
            site_index=i,
            n_sites=len(names),
            n_train=settings.n_train,
            n_eval=settings.n_eval,
        )
    say(f"generated non-IID synthetic clinical notes for {', '.join(names)}")
    pki_dir = out / "pki"
    if not (pki_dir / "ca" / "ca.pem").exists():
        # Demo only: the throwaway CA's passphrase sits next to (not inside) the PKI directory,
        # so `fedseek ca revoke|renew|crl --passphrase-file <out>/ca-passphrase` work on it.
        (out / "ca-passphrase").unlink(missing_ok=True)
        secret = pki.generate_passphrase_file(out / "ca-passphrase")
        pki.init_ca(pki_dir, consortium="fedseek-demo", passphrase=secret)
        pki.issue(pki_dir, "coordinator", role="coordinator", passphrase=secret)
        pki.issue(pki_dir, "reviewer", role="reviewer", passphrase=secret)
        pki.issue(pki_dir, "operator", role="admin", passphrase=secret)
        for name in names:
            pki.issue(pki_dir, name, role="node", passphrase=secret)
    from federation.security.flower_auth import ensure_auth_keypair

    keys_dir = pki_dir / "site-keys"
    keys_dir.mkdir(exist_ok=True)
    for name in names:
        pub = ensure_auth_keypair(pki_dir / name).public_key
        (keys_dir / f"{name}.pub").write_bytes(pub.read_bytes())
    say(f"consortium CA and certificates in {pki_dir}")
    return model_dir, pki_dir


def _sign_app(out: Path, pki_dir: Path, app_dir: Path) -> None:
    """FedSeek's app, signed with the consortium's app-publisher key where `fedseek run` looks for it:
    the sites run nothing else."""
    from federation.security.app_signing import FEDSEEK_APP_DIR, sign_app_dir

    key = pki.load_publisher_key(pki_dir, passphrase=pki.read_passphrase_file(out / "ca-passphrase"))
    approval = sign_app_dir(FEDSEEK_APP_DIR, app_dir, key)
    say(f"app {approval.app} {approval.version} signed with the consortium's app-publisher key {approval.key_id}")


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    out = settings.out.resolve()
    settings = DemoSettings(**{**settings.__dict__, "out": out})
    out.mkdir(parents=True, exist_ok=True)
    names = [f"hospital-{chr(ord('a') + i)}" for i in range(settings.sites)]
    model_dir, pki_dir = _prepare(settings, names)
    procs: list[Managed] = []
    try:
        fleet_port = free_port()
        coord_state = out / "coordinator"
        _sign_app(out, pki_dir, CoordinatorLayout(coord_state).signed_app)
        coordinator = Managed(
            name="coordinator",
            argv=_fedseek(
                "coordinator",
                "start",
                "--pki",
                str(pki_dir),
                "--state",
                str(coord_state),
                "--fleet-port",
                str(fleet_port),
            ),
            log_path=out / "logs" / "coordinator.log",
        ).start()
        procs.append(coordinator)
        coord_info = _wait_file(CoordinatorLayout(coord_state).endpoints, coordinator, timeout=settings.start_timeout)
        say(f"coordinator up: SuperLink {coord_info['superlink_socket']} (own netns), mTLS fleet {coord_info['fleet']}")

        node_states = []
        for name in names:
            site = out / "sites" / name
            conf = cfg.NodeConfig(
                name=name,
                model_dir=str(model_dir),
                data_dir=str(site / "data"),
                state_dir=str(site / "state"),
                pki_dir=str(pki_dir),
                coordinator=f"127.0.0.1:{fleet_port}",
                coordinator_admin=str(coord_info["admin"]),  # audit checkpoints witnessed between rounds too
                api_port=free_port(),
            )
            cfg.save(conf, site / "node.json")
            # The consortium's reviewer and operator are listed as this site's own: its access
            # policy refuses any reviewer or admin it has not listed (node/policy.py).
            add_members(NodeLayout(site / "state").access_policy, site=name, org=name, names=("reviewer", "operator"))
            procs.append(
                Managed(
                    name=name,
                    argv=_fedseek("node", "start", "--config", str(site / "node.json")),
                    log_path=out / "logs" / f"{name}.log",
                ).start()
            )
            node_states.append(site / "state")
        nodes = [
            _wait_file(NodeLayout(state).endpoints, proc, timeout=settings.start_timeout)
            for state, proc in zip(node_states, procs[1:], strict=True)
        ]
        for n in nodes:
            say(f"node {n['name']} up: OpenAI API {n['openai']}, fleet sidecar {n['fleet_sidecar']}")

        from coordinator.runs import run
        from federation.protocol.round_settings import RunSettings

        say(
            f"starting federated DP-LoRA run: {settings.rounds} rounds, {len(names)} sites of {settings.n_train} "
            f"records, expected batch {settings.batch_size}, {settings.local_epochs} epochs a round, clip "
            f"{settings.max_grad_norm:g}, lr "
            f"{settings.learning_rate:g}{', FFA-LoRA' if settings.ffa_lora else ''}; each site spending "
            f"{RunSettings.budget_share:.0%} of its remaining privacy budget (the rest stays for later runs)"
        )

        def progress(rec: dict[str, Any]) -> None:
            losses = ", ".join(f"{k} {v:.3f}" for k, v in sorted(rec.get("eval_loss", {}).items()))
            sha = str(rec["sha256"])[:12]
            say(
                f"round {rec['round']} done: {rec['version']} (sha256 {sha}) from {rec['accepted']}; eval loss {losses}"
            )

        run_settings = RunSettings(
            run_name=f"demo-{int(time.time())}",
            num_rounds=settings.rounds,
            min_nodes=len(names),
            **settings.dp_settings(),
        )
        summary = run(coord_state, settings=run_settings, timeout=settings.run_timeout, progress=progress)
        report = _check_sites(settings, names, nodes, node_states, summary, pki_dir, coord_info)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        say(f"report written to {out / 'report.json'}")
        if settings.keep_running:
            say("--keep-running: consortium stays up; press Ctrl-C to stop")
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stop.wait()
        return report
    finally:
        say("stopping every process the demo started")
        stop_all(procs)


def _client(pki_dir: Path, party: str) -> httpx.Client:
    """An HTTPS client presenting `party`'s consortium certificate (roles decide the routes)."""
    tls = ssl.create_default_context(cafile=str(pki_dir / "ca" / "ca.pem"))
    tls.load_cert_chain(str(pki_dir / party / "cert.pem"), str(pki_dir / party / "key.pem"))
    return httpx.Client(verify=tls, timeout=300)


def _check_sites(
    settings: DemoSettings,
    names: list[str],
    nodes: list[dict[str, Any]],
    node_states: list[Path],
    summary: dict[str, Any],
    pki_dir: Path,
    coord_info: dict[str, Any],
) -> dict[str, Any]:
    from openai import DefaultHttpxClient, OpenAI

    from privacy.audit import verify

    ca = pki_dir / "ca" / "ca.pem"
    version = summary["global_adapter"]["version"]
    sites = []
    with _client(pki_dir, "operator") as admin, _client(pki_dir, "reviewer") as reviewer:
        for node, state in zip(nodes, node_states, strict=True):
            client = OpenAI(  # the site's application, with the API key the node created on first start
                base_url=f"{node['openai']}/v1",
                api_key=NodeLayout(state).api_key.read_text().strip(),
                http_client=DefaultHttpxClient(verify=str(ca)),
            )
            served = [m.id for m in client.models.list().data]
            held_out = load_jsonl(state.parent / "data" / "eval.jsonl")[: settings.n_accuracy]
            messages = held_out[0].prompt_messages
            reply = client.chat.completions.create(model=version, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
            answer = reply.choices[0].message.content or ""
            say(f"{node['name']} serves {served}; answer from {reply.model} to a held-out note: {answer!r}")
            scores = {model: _accuracy(client, model, held_out) for model in ("base", version)}
            say(
                f"{node['name']} exact match on {len(held_out)} held-out notes: base {scores['base']:.2f}, "
                f"global adapter {scores[version]:.2f}"
            )
            status = admin.get(f"{node['openai']}/v1/admin/status").json()
            sites.append((node, state, status, reply.model, answer, scores["base"], scores[version], messages))
        say(f"requesting a SHAP explanation from {nodes[0]['name']} (max_evals={settings.max_evals})")
        expl = reviewer.post(
            f"{nodes[0]['openai']}/v1/explanations",
            # no `response`: the node explains the answer the model itself generates for this note
            json={"model": version, "messages": sites[0][7], "max_evals": settings.max_evals},
        )
        if expl.status_code != 200:
            raise RuntimeError(f"explanation failed: {expl.status_code} {expl.text[:300]}")
        explanation = expl.json()
        # The site keeps the report sealed; the reviewer fetches it and keeps their own copy.
        page = reviewer.get(f"{nodes[0]['openai']}{explanation['html']}")
        page.raise_for_status()
        explanation["html"] = str(settings.out / f"{explanation['id']}.html")
        write_atomic(Path(explanation["html"]), page.content, mode=0o600)
        say(f"explanation {explanation['id']}: top tokens {explanation['top_tokens']} -> {explanation['html']}")
    site_reports = []
    for node, _state, status, _served, answer, before, after, _messages in sites:
        audit_path = Path(status["audit_log"])
        result = verify(audit_path)
        say(f"audit trail of {node['name']}: {'verified' if result.ok else 'TAMPERED'} ({result.records} records)")
        privacy = status["privacy"]
        site_reports.append(
            {
                "name": node["name"],
                "epsilon": privacy["epsilon_spent"],
                "delta": privacy["delta"],
                "eval_loss_before": status["eval_loss_before"],
                "eval_loss_after": status["eval_loss_after"],
                "answer": answer,
                "accuracy_before": before,
                "accuracy_after": after,
                "ledger": [
                    {
                        k: e[k]
                        for k in (
                            "round",
                            "steps",
                            "sample_rate",
                            "noise_multiplier",
                            "accountant",
                            "epsilon_after",
                            "run_id",
                        )
                    }
                    for e in privacy["entries"]
                ],
                "audit_log": str(audit_path),
                "audit_records": result.records,
                "audit_verified": result.ok,
            }
        )
    glob = summary["global_adapter"]
    return {
        "rounds_completed": summary["rounds_completed"],
        "training": {
            "train_records_per_site": settings.n_train,
            "accuracy_records_per_site": settings.n_accuracy,
            **settings.dp_settings(),
        },
        "mtls": True,
        "endpoints": {
            "coordinator_fleet": coord_info["fleet"],
            "nodes": [{"name": n["name"], "openai": n["openai"], "fleet_sidecar": n["fleet_sidecar"]} for n in nodes],
        },
        "pki_dir": str(pki_dir),
        "sites": site_reports,
        "global_adapter": {
            "version": glob["version"],
            "sha256": glob["sha256"],
            "path": glob["path"],
            "lineage": glob["sites"],
        },
        "served_model": [s[3] for s in sites],
        "explanation": {
            "html": explanation["html"],
            "top_tokens": explanation["top_tokens"],
            "id": explanation["id"],
            "response": explanation.get("response"),
            "response_source": explanation.get("response_source"),
        },
        "rounds": summary["rounds"],
    }


def _accuracy(client: Any, model: str, records: list[Any]) -> float:
    """Exact match (`node.data.exact_match`) of the greedy answers the site's API gives under `model`."""
    hits = 0
    for record in records:
        reply = client.chat.completions.create(
            model=model, messages=record.prompt_messages, max_tokens=6, temperature=0
        )
        hits += exact_match(reply.choices[0].message.content or "", record.answer)
    return hits / len(records) if records else 0.0
