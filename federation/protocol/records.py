"""Conversion between FedSeek's wire types and Flower records, done once at the edge.

Reply layout of a training message (ClientApp -> ServerApp):
`arrays` (ArrayRecord of LoRA tensors), `adapter` (ConfigRecord: `fedseek-wire`, the format
version; `factors`, "AB" or "B" for what `arrays` holds; `lora-a-sha256`, the digest of the
site's A factors), `metrics` (MetricRecord with `num-examples`), and `privacy` (ConfigRecord holding a
PrivacyReport). A reply without `adapter` is wire version 1: the whole adapter.

The train config (ServerApp -> ClientApp -> node agent) is a `round_settings.TrainInstruction`.
FFA-LoRA keys in the train and evaluate config:
`ffa-lora` (bool), `reply-factors` ("AB" while the coordinator lacks A, then "B") and, once
the coordinator knows A, `lora-a-sha256`; `arrays` then holds the B factors only.

Before each round the ServerApp sends a `query` message with the same `config` (the round's
TrainInstruction); the reply's `readiness` ConfigRecord is a `wire.Readiness`: alive, and can
this site train the round within its budget. Nothing is charged for it.

Both a query reply and a training reply carry `witness` (ConfigRecord, `statements`: a JSON list of
the site's signed statements about its own state, its `ledger.head` among them): the coordinator
checks them against what it witnessed before (`coordinator.witness`). One JSON string, because a
ConfigRecord holds scalars and lists of scalars only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from federation.protocol import wire

ARRAYS = "arrays"
METRICS = "metrics"
PRIVACY = "privacy"
CONFIG = "config"
SITE = "site"
ADAPTER = "adapter"
READINESS = "readiness"
WITNESS = "witness"

LEDGER_HEAD = "ledger.head"
"""The kind of the signed statement of a site's privacy ledger head (`node.witness_statements`)."""


def to_array_record(arrays: wire.Arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> wire.Arrays:
    """Validated float32 arrays from a Flower ArrayRecord (NaN/Inf raise WireError)."""
    return wire.validate_arrays({name: arr.numpy() for name, arr in record.items()})


def update_records(update: wire.AdapterUpdate) -> dict[str, ArrayRecord | MetricRecord | ConfigRecord]:
    """The `arrays` and `adapter` records of a training reply."""
    return {ARRAYS: to_array_record(update.check().arrays), ADAPTER: ConfigRecord(dict[str, Any](update.descriptor()))}


def update_from_content(content: RecordDict) -> wire.AdapterUpdate:
    """The checked update in a training reply (WireError if malformed; version 1 without `adapter`)."""
    arrays = from_array_record(content.array_records[ARRAYS])
    desc: Mapping[str, Any] = content.config_records.get(ADAPTER, {})
    return wire.AdapterUpdate.from_descriptor(arrays, dict(desc))


def serialized_size(content: RecordDict) -> int:
    """Bytes of `content` as Flower's object transport carries it (every nested object deflated)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def witness_to_config(statements: list[dict[str, Any]]) -> ConfigRecord:
    """The `witness` record of a reply: the site's signed statements as one JSON string."""
    return ConfigRecord({"statements": json.dumps(statements, sort_keys=True, separators=(",", ":"))})


def witness_from_content(content: RecordDict) -> list[dict[str, Any]]:
    """The signed statements of a reply (none if it has no `witness` record; WireError if malformed)."""
    if WITNESS not in content.config_records:
        return []
    try:
        return wire.statements_of(json.loads(str(content.config_records[WITNESS]["statements"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise wire.WireError(f"malformed witness record: {exc}") from exc


def report_to_config(report: wire.PrivacyReport) -> ConfigRecord:
    """The `privacy` record (its signed statements travel apart, in `witness_to_config`)."""
    data: dict[str, Any] = {k: v for k, v in report.to_dict().items() if k not in ("extra", "witness")}
    data.update({f"extra.{k}": float(v) for k, v in report.extra.items()})
    return ConfigRecord(data)


def config_to_report(record: ConfigRecord) -> wire.PrivacyReport:
    data: dict[str, Any] = {k: v for k, v in record.items() if not k.startswith("extra.") and k != "witness"}
    data["extra"] = {k.removeprefix("extra."): v for k, v in record.items() if k.startswith("extra.")}
    return wire.PrivacyReport.from_dict(data)


def report_from_content(content: RecordDict) -> wire.PrivacyReport:
    """The privacy report of a training reply with the reply's signed statements (KeyError without `privacy`)."""
    data = config_to_report(content.config_records[PRIVACY]).to_dict()
    return wire.PrivacyReport.from_dict({**data, "witness": witness_from_content(content)})


def report_metrics(report: wire.PrivacyReport) -> MetricRecord:
    return MetricRecord(
        {"num-examples": report.num_examples, "train-loss": report.train_loss, "epsilon": report.epsilon}
    )


def readiness_to_config(answer: wire.Readiness) -> ConfigRecord:
    """The `readiness` record of a query reply (ClientApp -> ServerApp); its signed statements travel
    apart, in `witness_to_config`."""
    return ConfigRecord({k: v for k, v in answer.to_dict().items() if k != "witness"})


def readiness_from_content(content: RecordDict) -> wire.Readiness:
    """The readiness answer in a query reply (WireError if absent or malformed)."""
    if READINESS not in content.config_records:
        raise wire.WireError("query reply holds no readiness record")
    data = {k: v for k, v in content.config_records[READINESS].items() if k != "witness"}
    return wire.Readiness.from_dict({**data, "witness": witness_from_content(content)})
