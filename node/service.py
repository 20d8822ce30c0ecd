"""The node agent's in-process state: model host, data, privacy ledger, audit trail.

Everything the HTTP layer (node/server.py) does goes through `NodeService`, so the same
logic is tested without sockets and every model call lands in the audit trail.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from federation import wire
from federation.config import NodeConfig
from node.data import TokenizedExample, collate, load_jsonl, tokenize
from node.engine import TRAIN_ADAPTER, AdapterInfo, Generation, ModelHost
from node.trainer import RoundResult, TrainingError, TrainSettings, evaluate_loss, per_sample_loss, train_round
from privacy.audit import AuditTrail
from privacy.ledger import Budget, PolicyError, PrivacyLedger


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class NodeState:
    eval_loss_before: float
    eval_loss_after: dict[str, float] = field(default_factory=dict)
    rounds_trained: int = 0


class NodeService:
    """What a site runs: one loaded model serving, training and explaining, all audited."""

    def __init__(
        self, config: NodeConfig, host: ModelHost, *, train: list[TokenizedExample], eval_data: list[TokenizedExample]
    ) -> None:
        budget = site_budget(config, len(train))  # refuse a bad policy before touching the state dir
        self.config = config
        self.host = host
        self.train_data = train
        self.eval_data = eval_data
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditTrail(self.state_dir / "audit.jsonl")
        self.ledger = PrivacyLedger(self.state_dir / "ledger.sqlite", budget=budget)
        self.adapters_dir = self.state_dir / "adapters"
        self.reports_dir = self.state_dir / "explanations"
        self.token = _ensure_token(self.state_dir / "agent.token")
        self.state = NodeState(eval_loss_before=evaluate_loss(host, eval_data, model="base"))
        self.train_lock = threading.Lock()
        self._restore_adapters()

    # ---- serving ------------------------------------------------------------------
    def chat(
        self, messages: list[dict[str, str]], *, model: str | None, actor: str, **kwargs: Any
    ) -> tuple[Generation, str, str]:
        """Generate a reply; returns (generation, served model id, audit record hash)."""
        name = self.host.resolve(model)
        served = self.host.model_name if name == "base" else name
        started = time.perf_counter()
        gen = self.host.generate(messages, model=name, **kwargs)
        rec = self.audit.append(
            actor=actor,
            action="serve",
            resource=served,
            details={
                "prompt_sha256": sha256_text(json.dumps(messages, sort_keys=True)),
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens,
                "latency_s": round(time.perf_counter() - started, 4),
            },
        )
        return gen, served, rec.hash

    def models(self) -> list[dict[str, Any]]:
        base = {
            "id": self.host.model_name,
            "object": "model",
            "created": 0,
            "owned_by": self.config.name,
            "parent": None,
        }
        versions = [
            {
                "id": a.version,
                "object": "model",
                "created": a.created,
                "owned_by": "consortium",
                "parent": a.parent or self.host.model_name,
                "sha256": a.sha256,
            }
            for a in self.host.adapters.values()
        ]
        return [base, *versions]

    # ---- federation ---------------------------------------------------------------
    def train(self, global_arrays: wire.Arrays | None, config: dict[str, Any]) -> RoundResult:
        run_id = str(config.get("run-id", "local"))
        server_round = int(config.get("server-round", 1))
        rounds = int(config.get("num-rounds", server_round))
        settings = TrainSettings(
            local_epochs=int(config.get("local-epochs", 1)),
            batch_size=int(config.get("batch-size", 8)),
            learning_rate=float(config.get("learning-rate", 2e-3)),
            max_grad_norm=float(config.get("max-grad-norm", 1.0)),
            secure_mode=self.config.secure_mode,
            freeze_lora_a=bool(config.get("ffa-lora", False)),
        )
        with self.train_lock:
            try:
                self._check_finite_start(global_arrays, settings.batch_size)
                result = train_round(
                    self.host,
                    self.ledger,
                    self.train_data,
                    site=self.config.name,
                    run_id=run_id,
                    round=server_round,
                    rounds_left=max(1, rounds - server_round + 1),
                    global_arrays=global_arrays,
                    settings=settings,
                )
            except Exception as exc:
                self.audit.append(
                    actor="coordinator",
                    action="train.refused",
                    resource=run_id,
                    details={"round": server_round, "error": str(exc)},
                )
                raise
            self.state.rounds_trained += 1
            self.audit.append(
                actor="coordinator",
                action="train",
                resource=run_id,
                details={
                    "round": server_round,
                    **{k: v for k, v in result.report.to_dict().items() if k != "extra"},
                    "update_sha256": wire.sha256_of(result.arrays),
                },
            )
            return result

    def _check_finite_start(self, global_arrays: wire.Arrays | None, batch_size: int) -> None:
        """Refuse, before the ledger is charged, a round whose loss is already NaN or infinite.

        A broken base model or start adapter would only burn budget: this catches it on the first
        records with the round's starting weights. A loss that turns non-finite during training
        is a crash midway, and stays charged.
        """
        if not self.train_data:
            return  # train_round refuses an empty dataset itself
        pad = int(self.host.tokenizer.pad_token_id)
        probe = collate(self.train_data[: max(1, batch_size)], pad_id=pad, left=True)
        with self.host.lock, torch.no_grad():
            self.host.reset_train_adapter(global_arrays)
            self.host.peft.set_adapter(TRAIN_ADAPTER)
            losses = per_sample_loss(self.host.peft, {k: v.to(self.host.device) for k, v in probe.items()})
        if not bool(torch.isfinite(losses).all()):
            raise TrainingError("non-finite loss before training (model or adapter is broken); round refused")

    def deploy(self, version: str, sha256: str, arrays: wire.Arrays, *, parent: str | None = None) -> dict[str, Any]:
        """Install a global adapter version, persist it, and score it on local eval data."""
        info = self.host.install(version, arrays, sha256=sha256, parent=parent)
        self._persist_adapter(info, arrays)
        loss = evaluate_loss(self.host, self.eval_data, model=version)
        self.state.eval_loss_after[version] = loss
        self.audit.append(
            actor="coordinator", action="deploy", resource=version, details={"sha256": sha256, "eval_loss": loss}
        )
        return {
            "site": self.config.name,
            "version": version,
            "sha256": sha256,
            "eval_loss": loss,
            "num_examples": len(self.eval_data),
        }

    def _persist_adapter(self, info: AdapterInfo, arrays: wire.Arrays) -> None:
        target = self.adapters_dir / info.version
        target.mkdir(parents=True, exist_ok=True)
        (target / "adapter.safetensors").write_bytes(wire.encode(arrays))
        (target / "adapter.json").write_text(
            json.dumps({"version": info.version, "sha256": info.sha256, "parent": info.parent, "created": info.created})
        )

    def _restore_adapters(self) -> None:
        """Serve the adapters deployed before a restart (checked against their sha256)."""
        if not self.adapters_dir.is_dir():
            return
        metas = [json.loads(p.read_text()) | {"dir": p.parent} for p in self.adapters_dir.glob("*/adapter.json")]
        for meta in sorted(metas, key=lambda m: (m["created"], m["version"])):
            arrays = wire.decode((meta["dir"] / "adapter.safetensors").read_bytes())
            self.host.install(
                meta["version"], arrays, sha256=meta["sha256"], parent=meta.get("parent"), created=meta["created"]
            )

    def status(self) -> dict[str, Any]:
        latest = self.host.latest_adapter()
        return {
            "name": self.config.name,
            "model": self.host.model_name,
            "serving": latest.version if latest else self.host.model_name,
            "rounds_trained": self.state.rounds_trained,
            "eval_loss_before": self.state.eval_loss_before,
            "eval_loss_after": self.state.eval_loss_after.get(latest.version) if latest else None,
            "privacy": self.ledger.to_json(),
            "audit_log": str(self.audit.path),
            "audit_records": len(self.audit),
        }


def site_budget(config: NodeConfig, n_records: int) -> Budget:
    """The budget the config asks for, refused unless it fits the site's policy.

    A delta of 1/n or more would allow releasing a whole record outright, so delta must stay
    below 1/n (default 1/(10 n)); epsilon may not exceed `privacy_policy_epsilon`.
    """
    if n_records < 1:
        raise PolicyError("the site has no training records (empty dataset); refusing")
    if not config.epsilon <= config.privacy_policy_epsilon:
        raise PolicyError(
            f"configured budget epsilon {config.epsilon:g} is looser than the site's policy "
            f"(epsilon <= {config.privacy_policy_epsilon:g}); refusing"
        )
    delta = config.delta if config.delta > 0 else 1.0 / (10 * n_records)
    if not delta < 1.0 / n_records:
        raise PolicyError(f"delta {delta:g} must be below 1/n = {1.0 / n_records:g} for {n_records} records; refusing")
    return Budget(epsilon=config.epsilon, delta=delta, accountant=config.accountant)


def _ensure_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token)
    return token


def load_site_data(config: NodeConfig, tokenizer: Any) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    data_dir = Path(config.data_dir)
    train = tokenize(load_jsonl(data_dir / "train.jsonl"), tokenizer, max_length=config.max_length)
    eval_data = tokenize(load_jsonl(data_dir / "eval.jsonl"), tokenizer, max_length=config.max_length)
    return train, eval_data
