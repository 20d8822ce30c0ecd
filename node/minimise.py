"""A site's training data, minimised before any round may use it (`privacy.minimise`).

`load_minimised` reads each data partition as `node.data.load_partitions` does (fingerprinted by
its bytes as stored, so the privacy ledger accounts the file the site holds), makes its declared
quasi-identifiers k-anonymous under the site's policy (`NodeConfig.k_anonymity`,
`max_suppression`), rewrites the notes to match and redacts direct identifiers, then tokenizes
what is left. Each partition is made k-anonymous on its own, so any set of partitions a round
samples from is too.

A partition that cannot reach k within the policy does not stop the node: it serves, and every
round is refused (409, `train.refused`) with the reason, as a ledger mismatch is. That
partition is held only at the most general form its records allow, never as read.
`record_minimisation` audits what changed (`data.minimised`) or why not (`data.refused`) once per
start, and returns the refusal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from federation.protocol.config import NodeConfig
from federation.security.at_rest import Envelope
from node.data import (
    DataError,
    DataPartition,
    Example,
    SiteData,
    TokenizedExample,
    partition_files,
    read_data_bytes,
    read_partition,
)
from node.data import tokenize as tokenize_examples
from privacy.audit import AuditTrail
from privacy.kanonymity import KAnonymityPolicy, KAnonymityRefused
from privacy.minimise import DatasetConfig, MinimisationReport, load_dataset_config, minimise_records

__all__ = ["MinimisedSiteData", "PartitionMinimisation", "load_minimised", "record_minimisation"]

log = logging.getLogger("fedseek.node")


@dataclass(frozen=True)
class PartitionMinimisation:
    """One partition's report, or why it could not be made k-anonymous."""

    name: str
    sha256: str
    report: MinimisationReport
    refusal: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"partition": self.name, "sha256": self.sha256, **self.report.to_json()}


class MinimisedSiteData(SiteData):
    """A `SiteData` whose partitions were minimised, with what that changed in each."""

    def __init__(self, partitions: Sequence[DataPartition], minimisation: Sequence[PartitionMinimisation]) -> None:
        super().__init__(partitions)
        self.minimisation: tuple[PartitionMinimisation, ...] = tuple(minimisation)

    @property
    def refusal(self) -> str | None:
        """Why no round may train on this data (the first partition below k), else None."""
        return next((m.refusal for m in self.minimisation if m.refusal is not None), None)


def policy_of(config: NodeConfig) -> KAnonymityPolicy:
    return KAnonymityPolicy(k=config.k_anonymity, max_suppression=config.max_suppression)


def _records(path: Path, examples: list[Example], sha256: str, envelope: Envelope | None) -> list[dict[str, Any]]:
    """The JSON records behind `examples`, read again and held to the same fingerprint (one file, one read
    as far as the ledger is concerned: a file rewritten in between is refused)."""
    data = read_data_bytes(path, envelope=envelope)
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != sha256:
        raise DataError(f"{Path(path).name} changed while it was read; start again")
    lines = [line for line in data.decode("utf-8-sig").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    if len(records) != len(examples):
        raise DataError(f"{Path(path).name}: {len(records)} records but {len(examples)} examples")
    return records


def _as_example(original: Example, record: dict[str, Any]) -> Example:
    """`original` with the minimised text of its record (the shape node.data accepted already)."""
    if isinstance(record.get("messages"), list):
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]
    else:
        messages = [
            {"role": "user", "content": str(record["prompt"])},
            {"role": "assistant", "content": str(record["completion"])},
        ]
    return replace(original, messages=messages)


def _minimise_partition(
    path: Path, *, dataset: DatasetConfig, policy: KAnonymityPolicy, envelope: Envelope | None = None
) -> tuple[str, list[Example], PartitionMinimisation]:
    sha256, examples = read_partition(path, envelope=envelope)
    records = _records(path, examples, sha256, envelope)
    refusal = None
    try:
        result = minimise_records(records, dataset=dataset, policy=policy)
    except KAnonymityRefused as exc:
        refusal = f"data minimisation: {Path(path).name}: {exc.one_line()}"
        # Held (never trained on) at the most general form these records allow: one class of all of them.
        result = minimise_records(records, dataset=dataset, policy=KAnonymityPolicy(k=len(records), max_suppression=0))
    except ValueError as exc:  # a record without a declared quasi-identifier
        raise DataError(f"{Path(path).name}: {exc}") from exc
    kept = [_as_example(examples[i], record) for i, record in zip(result.kept, result.records, strict=True)]
    return sha256, kept, PartitionMinimisation(Path(path).name, sha256, result.report, refusal)


def load_minimised(config: NodeConfig, tokenizer: Any, *, envelope: Envelope | None = None) -> MinimisedSiteData:
    """Every training partition of the site's data directory (encrypted ones opened with `envelope`),
    minimised then tokenized."""
    data_dir = Path(config.data_dir)
    dataset = load_dataset_config(data_dir)
    policy = policy_of(config)
    parts: list[DataPartition] = []
    reports: list[PartitionMinimisation] = []
    for path in partition_files(data_dir):
        sha256, examples, report = _minimise_partition(path, dataset=dataset, policy=policy, envelope=envelope)
        tokenized = tokenize_examples(examples, tokenizer, max_length=config.max_length)
        parts.append(DataPartition(sha256=sha256, name=path.name, examples=tokenized))
        reports.append(report)
    return MinimisedSiteData(parts, reports)


def record_minimisation(data: Sequence[TokenizedExample], audit: AuditTrail, *, site: str) -> str | None:
    """Audit what minimisation did to each partition (`data.minimised`, or `data.refused` below k);
    the refusal that keeps every round from training, else None. Plain records (tests): nothing to say."""
    if not isinstance(data, MinimisedSiteData):
        return None
    for part in data.minimisation:
        if part.refusal is not None:
            log.warning("training refused: %s", part.refusal)
            audit.append(
                actor="node", action="data.refused", resource=site, details={**part.to_json(), "error": part.refusal}
            )
        else:
            audit.append(actor="node", action="data.minimised", resource=site, details=part.to_json())
    return data.refusal
