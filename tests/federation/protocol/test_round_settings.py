"""Run and round settings: one set of defaults, exact round trips, and refusal of unknown keys and wrong types."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

import federation.protocol
from federation.errors import InvalidInput
from federation.protocol.round_settings import RoundSettingsError, RunConfig, RunSettings, TrainInstruction

FAB = Path(federation.protocol.__file__).parent / "flower_app" / "pyproject.toml"
DIGEST = "ab" * 32

SETTINGS = RunSettings(
    run_name="trial-7",
    num_rounds=5,
    min_nodes=3,
    round_timeout=120.5,
    local_epochs=2,
    batch_size=32,
    learning_rate=5e-4,
    max_grad_norm=0.5,
    ffa_lora=True,
    budget_share=0.3,
    aggregation="trimmed-mean",
    trim_fraction=0.25,
    update_norm_ratio=4.0,
)


def _fab_config() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(FAB.read_text())["tool"]["flwr"]["app"]["config"]
    return table


# ---- one set of defaults ----------------------------------------------------------------------


def test_the_fab_declares_exactly_the_defaults() -> None:
    """Flower takes overrides of declared keys only, so the FAB repeats the defaults: it must not drift."""
    fab, defaults = _fab_config(), RunConfig().to_run_config()
    assert fab == defaults
    assert {k: type(v) for k, v in fab.items()} == {k: type(v) for k, v in defaults.items()}  # 900.0, not 900


def test_absent_keys_take_the_defaults() -> None:
    assert TrainInstruction.from_config_record({}) == TrainInstruction()
    assert RunConfig.from_run_config({}) == RunConfig()
    assert TrainInstruction.from_config_record({"num-rounds": 4}).run == RunSettings(num_rounds=4)


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instruction",
    [
        TrainInstruction(),
        TrainInstruction(run=SETTINGS, server_round=1, run_id="17"),
        TrainInstruction(run=SETTINGS, server_round=4, reply_factors="B", lora_a_sha256=DIGEST, run_id="17"),
    ],
)
def test_train_instruction_round_trips_through_a_config_record_and_the_agents_json(
    instruction: TrainInstruction,
) -> None:
    record = instruction.to_config_record()
    assert isinstance(record, ConfigRecord)
    assert TrainInstruction.from_config_record(record) == instruction
    relayed = json.loads(json.dumps(dict(record)))  # what the ClientApp sends the node agent
    assert TrainInstruction.from_config_record(relayed) == instruction


def test_the_wire_keeps_todays_keys_and_leaves_unknown_strings_off() -> None:
    record = TrainInstruction(run=SETTINGS, server_round=2).to_config_record()
    assert dict(record) == {
        "run-name": "trial-7",
        "num-rounds": 5,
        "min-nodes": 3,
        "round-timeout": 120.5,
        "local-epochs": 2,
        "batch-size": 32,
        "learning-rate": 5e-4,
        "max-grad-norm": 0.5,
        "ffa-lora": True,
        "budget-share": 0.3,
        "secagg": False,
        "aggregation": "trimmed-mean",
        "trim-fraction": 0.25,
        "noise-schedule": "constant",
        "server-opt": "fedavgm",
        "server-lr": 1.0,
        "server-momentum": 0.9,
        "update-norm-ratio": 4.0,
        "server-round": 2,
        "reply-factors": "AB",
    }  # no lora-a-sha256 before the coordinator knows A, no run-id before the ClientApp adds it


@pytest.mark.parametrize("registry_dir", ["/srv/fedseek/registry", 'C:\\runs\\"quoted" dir', "régistre\n\t\x7f"])
def test_run_config_round_trips_through_flowers_run_config_and_toml(registry_dir: str) -> None:
    config = RunConfig(SETTINGS, registry_dir=registry_dir)
    run_config = config.to_run_config()
    assert RunConfig.from_run_config(run_config) == config
    assert tomllib.loads(config.to_toml()) == run_config
    assert RunConfig.from_run_config(tomllib.loads(config.to_toml())) == config


def test_flower_accepts_the_toml_as_run_config_overrides(tmp_path: Path) -> None:
    """What `flwr run --run-config <file>` and the SuperLink do with it: parse, then fuse over the FAB's table."""
    path = tmp_path / "run-config.toml"
    path.write_text(RunConfig(SETTINGS, registry_dir="/srv/registry").to_toml())
    overrides = parse_config_args([str(path)])
    fused = fuse_dicts(flatten_dict(_fab_config()), overrides, check_keys=True)
    assert RunConfig.from_run_config(fused) == RunConfig(SETTINGS, registry_dir="/srv/registry")


def test_an_int_is_taken_where_a_float_is_expected() -> None:
    run = RunConfig.from_run_config({"learning-rate": 1, "round-timeout": 60}).settings
    assert (run.learning_rate, run.round_timeout) == (1.0, 60.0)
    assert type(run.learning_rate) is float and type(run.round_timeout) is float


# ---- refusals -----------------------------------------------------------------------------------


def _refused(call: Any, items: dict[str, Any]) -> RoundSettingsError:
    with pytest.raises(RoundSettingsError) as refused:
        call(items)
    err = refused.value
    assert isinstance(err, InvalidInput) and err.status == 400
    assert "\n" not in str(err)
    return err


@pytest.mark.parametrize(
    ("decode", "typo"),
    [
        (TrainInstruction.from_config_record, "learning_rate"),
        (TrainInstruction.from_config_record, "registry-dir"),  # the coordinator's own path never reaches nodes
        (TrainInstruction.from_config_record, "num-round"),
        (RunConfig.from_run_config, "learning_rate"),
        (RunConfig.from_run_config, "server-round"),  # a round field is not a run setting
    ],
)
def test_an_unknown_key_is_refused_naming_it_and_the_known_keys(decode: Any, typo: str) -> None:
    err = _refused(decode, {"learning-rate": 0.01, typo: 0.5})
    known = "known keys: aggregation, batch-size, budget-share, ffa-lora, learning-rate"
    assert f"key '{typo}'" in str(err) and known in str(err)
    assert err.code == "unknown_key"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num-rounds", 2.0, "num-rounds must be int, not float (2.0)"),
        ("num-rounds", True, "num-rounds must be int, not bool (True)"),
        ("learning-rate", "0.01", "learning-rate must be float, not str ('0.01')"),
        ("learning-rate", False, "learning-rate must be float, not bool"),
        ("ffa-lora", 1, "ffa-lora must be bool, not int (1)"),
        ("ffa-lora", "false", "ffa-lora must be bool, not str"),
        ("run-name", 7, "run-name must be str, not int"),
        ("aggregation", 1, "aggregation must be str, not int"),
        ("update-norm-ratio", "10", "update-norm-ratio must be float, not str"),
        ("server-round", "1", "server-round must be int, not str"),
        ("lora-a-sha256", None, "lora-a-sha256 must be str, not NoneType"),
    ],
)
def test_a_wrong_type_is_refused(key: str, value: object, message: str) -> None:
    err = _refused(TrainInstruction.from_config_record, {key: value})
    assert message in str(err) and err.code == "wrong_type"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-rounds", 0),
        ("min-nodes", -1),
        ("local-epochs", 0),
        ("batch-size", 0),
        ("round-timeout", 0.0),
        ("learning-rate", -1e-3),
        ("learning-rate", float("nan")),
        ("max-grad-norm", float("inf")),
        ("budget-share", 0.0),  # a run that may spend nothing could never train
        ("budget-share", 1.5),  # more than what remains
        ("budget-share", float("nan")),
        ("run-name", ""),
        ("run-name", "../elsewhere"),
        ("run-name", "-flag"),
        ("aggregation", "mean"),
        ("aggregation", "Median"),
        ("trim-fraction", -0.1),
        ("trim-fraction", 0.5),  # nothing would be left in the middle
        ("trim-fraction", float("nan")),
        ("update-norm-ratio", 0.5),  # would refuse every update above the median
        ("update-norm-ratio", -1.0),
        ("update-norm-ratio", float("inf")),
        ("update-norm-ratio", float("nan")),
        ("server-round", 0),
        ("reply-factors", "A"),
        ("lora-a-sha256", "XYZ"),
        ("lora-a-sha256", DIGEST.upper()),
    ],
)
def test_a_value_out_of_range_is_refused(key: str, value: object) -> None:
    err = _refused(TrainInstruction.from_config_record, {key: value})
    assert str(err).startswith(f"{key} must be ") and err.code == "out_of_range"


def test_constructing_bad_settings_in_code_is_refused_too() -> None:
    with pytest.raises(RoundSettingsError, match="batch-size must be a positive integer"):
        RunSettings(batch_size=0)
    with pytest.raises(RoundSettingsError, match="run must be RunSettings, not dict"):
        TrainInstruction(run={"num-rounds": 2})  # type: ignore[arg-type]


def test_the_robust_aggregation_settings_default_to_fedavg_with_a_norm_bound() -> None:
    """The default run averages as before (weighted FedAvg) and refuses updates 10x the others' median;
    0 turns the bound off, and every aggregation the coordinator knows is accepted."""
    run = RunSettings()
    assert (run.aggregation, run.trim_fraction, run.update_norm_ratio) == ("fedavg", 0.2, 10.0)
    assert RunSettings(update_norm_ratio=0).update_norm_ratio == 0.0
    for method in ("fedavg", "trimmed-mean", "median"):
        assert RunConfig.from_run_config({"aggregation": method}).settings.aggregation == method


@pytest.mark.parametrize("method", ["trimmed-mean", "median"])
def test_a_robust_aggregation_is_refused_with_secure_aggregation(method: str) -> None:
    """A coordinate-wise median or trimmed mean needs each site's update; under secagg only their sum exists."""
    err = _refused(RunConfig.from_run_config, {"secagg": True, "aggregation": method})
    assert "fedavg with secagg" in str(err) and err.code == "out_of_range"
    assert RunSettings(secagg=True).aggregation == "fedavg"


@pytest.mark.parametrize(
    ("key", "value"),
    [("noise-schedule", "front-loaded"), ("server-opt", "sgd"), ("server-lr", 0.0), ("server-momentum", 1.0)],
)
def test_a_bad_schedule_or_server_step_is_refused_by_key(key: str, value: object) -> None:
    with pytest.raises(RoundSettingsError, match=key):
        RunSettings.from_items({key: value})
