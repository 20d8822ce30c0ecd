"""Where a node is built: from a `NodeConfig` to a `NodeService`, or to `fedseek serve`'s serving alone.

`build_node` is what `fedseek node start` runs (after `node.agent.preflight`): model and site
data from disk, then `assemble_node`, which makes every part in the order that refuses a bad
input before the state directory is touched: the site's budget against its policy, then the
audit trail, ledger, agent token, the adapters deployed before a restart, and the serving
engine over the model. `node_access` is who may call that node's API.

`fedseek serve` is the same model, adapters and engine with no federation: `serving_access`
and `build_serving`. Where each file lives is `federation.ops.layout.NodeLayout`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.errors import FedSeekError, Unavailable
from federation.ops.atomic import ensure_secret, private_dir
from federation.ops.layout import NodeLayout
from federation.protocol.config import NodeConfig
from federation.security.at_rest import AtRestError, Envelope, site_envelope, write_kek_state
from federation.security.signed_statement import load_private_key
from node import adapter_store
from node.access import AccessPolicy
from node.api_keys import ensure_first_key
from node.data import SiteData, TokenizedExample, examples_sha256, load_jsonl, partition_files, tokenize
from node.engine import ModelHost
from node.minimise import load_minimised, record_minimisation
from node.model import ModelLoadError, load_model
from node.policy import site_policy
from node.service import NodeParts, NodeService, Serving
from node.site_keys import load_site_keys
from node.witness_statements import node_key_path
from privacy.audit import AuditTrail
from privacy.audit_payload import PayloadSealer, PayloadSealingTrail
from privacy.checkpoints import CheckpointSigner
from privacy.consistency import LedgerMismatch, ledger_refusal
from privacy.kanonymity import KAnonymityRefused
from privacy.ledger import Budget, LedgerError, PolicyError, PrivacyLedger, read_budget

__all__ = [
    "NodeStartError",
    "ServeOptions",
    "assemble_node",
    "build_node",
    "build_serving",
    "load_site_data",
    "node_access",
    "serving_access",
    "site_budget",
]


log = logging.getLogger("fedseek.node")


class NodeStartError(Unavailable):
    """The node refuses to start; the message is one line for the operator."""


# ---- a federated node ------------------------------------------------------------------------
def build_node(config: NodeConfig) -> NodeService:
    """The node `fedseek node start` runs; a model or dataset that cannot be read is a NodeStartError."""
    try:
        model, tokenizer = load_model(config.model_dir, device=config.device, dtype=config.dtype)
    except ModelLoadError as exc:
        raise NodeStartError(str(exc)) from exc
    envelope = _site_envelope(config)
    if envelope is not None:
        _warn_in_clear(Path(config.data_dir))
    try:
        train, eval_data = load_site_data(config, tokenizer, envelope=envelope)  # by partition: each budget's cover
    except ValueError as exc:
        raise NodeStartError(f"bad site data: {exc}") from exc
    except AtRestError as exc:
        raise NodeStartError(exc.one_line()) from exc
    host = ModelHost(model, tokenizer, model_name=Path(config.model_dir).name)
    return assemble_node(config, host, train=train, eval_data=eval_data, envelope=envelope)


def _warn_in_clear(data_dir: Path) -> None:
    """A site with a KEK still reads training data kept in clear (it may be mid-migration); it says so."""
    try:
        clear = [
            p.name for p in [*partition_files(data_dir), data_dir / "eval.jsonl"] if p.suffix == ".jsonl" and p.exists()
        ]
    except ValueError:
        return  # the data's own error is raised when it is read
    if clear:
        log.warning("site data in clear at a site with a KEK: %s (run `fedseek keys encrypt`)", ", ".join(clear))


def _site_envelope(config: NodeConfig) -> Envelope | None:
    """The site's KEK envelope (None without `config.kek`): a KEK that cannot be had, or is not the
    one the site's files are under, stops the start with one line."""
    try:
        return site_envelope(config.kek, NodeLayout(Path(config.state_dir)).kek, create=False)
    except AtRestError as exc:
        raise NodeStartError(exc.one_line()) from exc


def assemble_node(
    config: NodeConfig,
    host: ModelHost,
    *,
    train: Sequence[TokenizedExample],
    eval_data: list[TokenizedExample],
    dataset_sha256: str | None = None,
    envelope: Envelope | None = None,
) -> NodeService:
    """A node around a model already loaded (tests and benchmarks share one model between nodes).

    Raises PolicyError, before the state directory is created or changed, if the configured
    budget is outside the site's policy or there is no training data. `train` is a `SiteData`
    (`build_node`: one partition per batch file) or plain records, one partition named by
    `dataset_sha256` (else by a fingerprint of the tokenized examples). A new ledger is made for
    the first partition and registers the others it starts with; later batches only through
    `fedseek budget add-partition`, and a batch the ledger does not hold is not trained on.
    A ledger that disagrees with the audit trail does not stop the node: it serves, and refuses
    to train (`privacy.consistency`; the reason is audited once here).
    """
    data = (
        train
        if isinstance(train, SiteData)
        else SiteData.single(train, sha256=dataset_sha256 or examples_sha256(train))
    )
    layout = NodeLayout(Path(config.state_dir))
    budget = site_budget(config, len(data), stored=_stored_budget(layout.ledger))
    if envelope is None and config.kek:
        envelope = _site_envelope(config)  # a KEK that is not the site's: refused before anything is written
    private_dir(layout.root)  # 0700: the audit trail, ledger, keys and adapters are the site's alone
    if envelope is not None and not layout.kek.exists():  # the site's first KEK: its id (and salt) kept
        write_kek_state(layout.kek, envelope)
    audit = _audit_trail(layout, config, envelope)  # signed checkpoints, witnessed each round
    ledger = PrivacyLedger(layout.ledger, budget=budget, dataset_sha256=data.fingerprints[0], audit=audit)
    if ledger.created:  # the data the site started with: the rest of its batches, registered with the genesis
        for part in data.partitions[1:]:
            ledger.add_partition(part.sha256, label=part.name, actor="node", details={"records": len(part.examples)})
    mismatch = ledger_refusal(ledger, audit, dataset_sha256=data.fingerprints)
    _report_unregistered(data, ledger, audit, site=config.name)
    if mismatch is not None:
        log.warning("training refused: %s", mismatch)
        audit.append(actor="node", action="ledger.mismatch", resource=config.name, details={"error": mismatch})
    below_k = record_minimisation(data, audit, site=config.name)  # below k: serve, never train
    refusal = _training_refusal(mismatch=mismatch, below_k=below_k)
    token = _ensure_token(layout.agent_token)
    try:  # encrypted under the KEK (or refused: another KEK, none configured, altered): one line naming the file
        adapter_store.restore_versions(host, layout.adapters, envelope=envelope)
    except AtRestError as exc:
        audit.append(actor="node", action="at_rest.refused", resource=config.name, details={"error": exc.one_line()})
        raise NodeStartError(exc.one_line()) from exc
    keys = load_site_keys(layout.site_secret, envelope=envelope)
    # Serving through vLLM, the node's own engine would hold a KV cache and CUDA graphs that never serve.
    serving = Serving(host, audit, owner=config.name, keys=keys, local_engine=config.serving_backend == "engine")
    parts = NodeParts(
        config=config,
        layout=layout,
        host=host,
        serving=serving,
        audit=audit,
        ledger=ledger,
        agent_token=token,
        train=data,
        eval_data=eval_data,
        training_refusal=refusal,
    )
    return NodeService(parts)


def _training_refusal(*, mismatch: str | None, below_k: str | None) -> FedSeekError | None:
    """What every round is refused with (409), each reason with its own code: data that cannot be made
    k-anonymous (`KAnonymityRefused`, checked first: that data must never be trained on), else a ledger
    that disagrees with the audit trail (`LedgerMismatch`); None when the node may train."""
    if below_k is not None:
        return KAnonymityRefused(below_k)
    return LedgerMismatch(mismatch) if mismatch is not None else None


def _stored_budget(path: Path) -> Budget | None:
    """The budget an existing ledger holds (None: no ledger, or one `PrivacyLedger` will refuse itself)."""
    try:
        return read_budget(path) if path.exists() else None
    except LedgerError:
        return None


def _report_unregistered(data: SiteData, ledger: PrivacyLedger, audit: AuditTrail, *, site: str) -> None:
    """Batches the ledger does not hold are not trained on: say so once per start, in the log and the audit trail."""
    held = set(ledger.chain().fingerprints())
    new = [part for part in data.partitions if part.sha256 not in held]
    if not new:
        return
    names = ", ".join(part.name for part in new)
    log.warning("not training on %s: not in the privacy ledger (register with `fedseek budget add-partition`)", names)
    details = {"batches": [{"name": p.name, "sha256": p.sha256, "records": len(p.examples)} for p in new]}
    audit.append(actor="node", action="data.unregistered", resource=site, details=details)


def _audit_trail(layout: NodeLayout, config: NodeConfig, envelope: Envelope | None) -> AuditTrail:
    """The site's audit trail; with a KEK, records' free-text fields sealed under it (privacy.audit_payload)."""
    if envelope is None:
        return AuditTrail(layout.audit, signer=_audit_signer(config))
    sealer = PayloadSealer(envelope, layout.audit_payload_keys)
    return PayloadSealingTrail(layout.audit, payload=sealer, signer=_audit_signer(config))


def _audit_signer(config: NodeConfig) -> CheckpointSigner | None:
    """The site's node key, to sign its audit log's checkpoints (`privacy.checkpoints`) as the site.
    None, logged, while the key does not exist yet (`fedseek ca issue` makes it): checkpoints unsigned."""
    path = node_key_path(Path(config.pki_dir), config.name)
    try:
        return CheckpointSigner(key=load_private_key(path), origin=config.name)
    except (OSError, ValueError, FedSeekError) as exc:
        log.warning("audit checkpoints unsigned: node key %s unreadable (%s)", path, exc)
        return None


def node_access(service: NodeService) -> AccessPolicy:
    """Who may call a node's API: its API keys (the first one made on first start), the agent
    token on /internal, consortium certificates for the rest (node/access.py's table), as the
    site's access policy file allows (node/policy.py; the default written on first start)."""
    return AccessPolicy(
        site=service.config.name,
        audit=service.audit,
        api_keys=ensure_first_key(service.layout),
        agent_token=service.token,
        policy=site_policy(service.layout, site=service.config.name, audit=service.audit),
        openai_auth=service.config.openai_auth,  # type: ignore[arg-type]  # checked by AccessPolicy
    )


def site_budget(config: NodeConfig, n_records: int, *, stored: Budget | None = None) -> Budget:
    """The budget the config asks for, refused unless it fits the site's policy.

    A delta of 1/n or more would allow releasing a whole record outright, so delta must stay
    below 1/n (default 1/(10 n)); epsilon may not exceed `privacy_policy_epsilon`. With the
    default, a ledger's `stored` delta is kept while it is still below 1/n: data that grows
    each month must not tighten delta at every start (which would raise every partition's epsilon).
    """
    if n_records < 1:
        raise PolicyError("the site has no training records (empty dataset); refusing")
    if not config.epsilon <= config.privacy_policy_epsilon:
        raise PolicyError(
            f"configured budget epsilon {config.epsilon:g} is looser than the site's policy "
            f"(epsilon <= {config.privacy_policy_epsilon:g}); refusing"
        )
    delta = config.delta if config.delta > 0 else 1.0 / (10 * n_records)
    if config.delta <= 0 and stored is not None and stored.delta < 1.0 / n_records:
        delta = stored.delta
    if not delta < 1.0 / n_records:
        raise PolicyError(f"delta {delta:g} must be below 1/n = {1.0 / n_records:g} for {n_records} records; refusing")
    return Budget(epsilon=config.epsilon, delta=delta, accountant=config.accountant)


def load_site_data(
    config: NodeConfig, tokenizer: Any, *, envelope: Envelope | None = None
) -> tuple[SiteData, list[TokenizedExample]]:
    """Training records by partition (`node.data.partition_files`) and the evaluation records (each
    file in clear or, with the site's KEK `envelope`, encrypted)."""
    data_dir = Path(config.data_dir)
    train = load_minimised(config, tokenizer, envelope=envelope)  # by partition, k-anonymous and redacted
    eval_data = tokenize(
        load_jsonl(data_dir / "eval.jsonl", envelope=envelope), tokenizer, max_length=config.max_length
    )
    return train, eval_data


def _ensure_token(path: Path) -> str:
    """The agent token, made on first start; the local ClientApp reads it from this file."""
    return ensure_secret(path, lambda: secrets.token_urlsafe(32).encode("ascii")).decode("ascii").strip()


# ---- serving alone (`fedseek serve`) ---------------------------------------------------------
@dataclass(frozen=True)
class ServeOptions:
    """What `fedseek serve` serves: a checkpoint, named adapter directories, the engine's bounds."""

    model_dir: Path
    adapters: Mapping[str, Path] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "auto"
    max_slots: int = 8
    max_queue: int = 64
    max_model_len: int = 4096


def serving_access(layout: NodeLayout) -> AccessPolicy:
    """`fedseek serve`'s API keys (the first one left in `layout.api_key`) and its one audit
    trail, which serving and access refusals alike append to. There are no /internal routes,
    so the agent token is a random one nobody holds."""
    private_dir(layout.root)
    audit = AuditTrail(layout.audit)
    return AccessPolicy(
        site="local",
        audit=audit,
        api_keys=ensure_first_key(layout),
        agent_token=secrets.token_urlsafe(32),
        policy=site_policy(layout, site="local", audit=audit),
    )


def build_serving(options: ServeOptions, *, audit: AuditTrail, layout: NodeLayout | None = None) -> Serving:
    """Model, adapters and engine: what `build_node` serves, minus the federation. With `layout`,
    prompt digests are keyed by its site secret (else by a key that dies with the process)."""
    model, tokenizer = load_model(options.model_dir, device=options.device, dtype=options.dtype)
    host = ModelHost(model, tokenizer, model_name=options.model_dir.name)
    for name, directory in options.adapters.items():
        adapter_store.install_from_dir(host, name, directory)
    return Serving(
        host,
        audit,
        owner="local",
        max_slots=options.max_slots,
        max_queue=options.max_queue,
        max_model_len=options.max_model_len,
        keys=load_site_keys(layout.site_secret) if layout is not None else None,
    )
