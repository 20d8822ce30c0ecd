"""Conversion between FedSeek's wire types and Flower records, done once at the edge.

Reply layout of a training message (ClientApp -> ServerApp):
`arrays` (ArrayRecord of LoRA tensors), `metrics` (MetricRecord with `num-examples`), and
`privacy` (ConfigRecord holding a PrivacyReport).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from federation import wire

ARRAYS = "arrays"
METRICS = "metrics"
PRIVACY = "privacy"
CONFIG = "config"
SITE = "site"


def to_array_record(arrays: wire.Arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> wire.Arrays:
    """Validated float32 arrays from a Flower ArrayRecord (NaN/Inf raise WireError)."""
    return wire.validate_arrays({name: arr.numpy() for name, arr in record.items()})


def report_to_config(report: wire.PrivacyReport) -> ConfigRecord:
    data: dict[str, Any] = {k: v for k, v in report.to_dict().items() if k != "extra"}
    data.update({f"extra.{k}": float(v) for k, v in report.extra.items()})
    return ConfigRecord(data)


def config_to_report(record: ConfigRecord) -> wire.PrivacyReport:
    data: dict[str, Any] = {k: v for k, v in record.items() if not k.startswith("extra.")}
    data["extra"] = {k.removeprefix("extra."): v for k, v in record.items() if k.startswith("extra.")}
    return wire.PrivacyReport.from_dict(data)


def report_metrics(report: wire.PrivacyReport) -> MetricRecord:
    return MetricRecord(
        {"num-examples": report.num_examples, "train-loss": report.train_loss, "epsilon": report.epsilon}
    )
