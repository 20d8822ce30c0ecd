"""Tests for the conversion between FedSeek wire types and Flower records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from federation.protocol import records, wire
from federation.protocol.wire import PrivacyReport, WireError


def _adapter() -> wire.Arrays:
    rng = np.random.default_rng(7)
    return {
        "q.lora_A": rng.standard_normal((4, 8)).astype(np.float32),
        "q.lora_B": rng.standard_normal((8, 4)).astype(np.float32),
        "bias": rng.standard_normal(3).astype(np.float32),
    }


def _report(extra: dict[str, float] | None = None) -> PrivacyReport:
    return PrivacyReport(
        site="site-b",
        epsilon=0.91,
        delta=2e-4,
        steps=33,
        sample_rate=0.0625,
        noise_multiplier=0.95,
        max_grad_norm=0.5,
        accountant="prv",
        num_examples=160,
        train_loss=1.75,
        extra={} if extra is None else extra,
    )


def test_array_record_round_trip() -> None:
    arrays = _adapter()
    record = records.to_array_record(arrays)
    assert isinstance(record, ArrayRecord)
    assert set(record.keys()) == set(arrays)
    back = records.from_array_record(record)
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value)
    assert wire.sha256_of(back) == wire.sha256_of(arrays)


def test_to_array_record_handles_non_contiguous_input() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = records.from_array_record(records.to_array_record({"t": base.T}))
    np.testing.assert_array_equal(back["t"], base.T)


def test_array_record_survives_flower_serialisation() -> None:
    """What a SuperLink actually carries: the record deflated to bytes and inflated again."""
    record = records.to_array_record(_adapter())
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    copy = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(copy, ArrayRecord) and copy is not record
    back = records.from_array_record(copy)
    for name, value in _adapter().items():
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_array_record_is_wire_error(bad: float) -> None:
    arrays = _adapter()
    arrays["q.lora_B"][2, 1] = bad
    record = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    with pytest.raises(WireError, match=r"q\.lora_B"):
        records.from_array_record(record)


def test_float64_array_record_is_converted_to_float32() -> None:
    record = ArrayRecord({"w": Array(np.linspace(0, 1, 4, dtype=np.float64))})
    back = records.from_array_record(record)
    assert back["w"].dtype == np.float32
    np.testing.assert_allclose(back["w"], np.linspace(0, 1, 4), rtol=1e-7)


def test_privacy_report_config_record_round_trip_with_extra() -> None:
    report = _report(extra={"clip-fraction": 0.4, "grad-norm-p95": 0.9})
    cfg = records.report_to_config(report)
    assert isinstance(cfg, ConfigRecord)
    # flat layout: extra entries are namespaced, never nested
    assert cfg["extra.clip-fraction"] == 0.4
    assert cfg["extra.grad-norm-p95"] == 0.9
    assert "extra" not in cfg
    assert cfg["site"] == "site-b"
    assert cfg["num_examples"] == 160
    assert records.config_to_report(cfg) == report


def test_privacy_report_config_record_round_trip_without_extra() -> None:
    report = _report()
    cfg = records.report_to_config(report)
    assert not any(key.startswith("extra.") for key in cfg)
    assert records.config_to_report(cfg) == report


def test_config_record_missing_field_is_wire_error() -> None:
    cfg = records.report_to_config(_report())
    del cfg["epsilon"]
    with pytest.raises(WireError, match="malformed privacy report"):
        records.config_to_report(cfg)


def test_config_record_with_non_numeric_epsilon_is_wire_error() -> None:
    cfg = records.report_to_config(_report())
    cfg["epsilon"] = "unknown"
    with pytest.raises(WireError):
        records.config_to_report(cfg)


def test_report_metrics_carries_num_examples_for_fedavg_weighting() -> None:
    report = _report()
    metrics = records.report_metrics(report)
    assert isinstance(metrics, MetricRecord)
    assert metrics["num-examples"] == 160
    assert metrics["train-loss"] == pytest.approx(1.75)
    assert metrics["epsilon"] == pytest.approx(0.91)


# -- the adapter descriptor record (wire version 2) --------------------------------------


def _over_flower(content: RecordDict) -> RecordDict:
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    copy = inflate_object_from_contents(content.object_id, contents)
    assert isinstance(copy, RecordDict)
    return copy


@pytest.mark.parametrize("factors", ["AB", "B"])
def test_update_records_survive_flower_serialisation(factors: wire.Factors) -> None:
    full = _adapter()
    update = wire.AdapterUpdate.of(full, factors)
    content = _over_flower(RecordDict(records.update_records(update)))
    back = records.update_from_content(content)
    assert back.factors == factors
    assert back.lora_a_sha256 == wire.lora_a_sha256(full)
    assert back.arrays.keys() == update.arrays.keys()
    assert ("q.lora_A" in back.arrays) == (factors == "AB")
    assert dict(content.config_records[records.ADAPTER])["fedseek-wire"] == str(wire.WIRE_VERSION)


def test_reply_without_adapter_record_is_version_1_whole_adapter() -> None:
    content = RecordDict({records.ARRAYS: records.to_array_record(_adapter())})
    update = records.update_from_content(content)
    assert update.factors == "AB" and update.lora_a_sha256 == ""


def test_adapter_record_naming_another_lora_a_is_wire_error() -> None:
    content = RecordDict(records.update_records(wire.AdapterUpdate.of(_adapter(), "AB")))
    content.config_records[records.ADAPTER]["lora-a-sha256"] = "0" * 64
    with pytest.raises(WireError, match="do not match"):
        records.update_from_content(_over_flower(content))
