"""Tests for the node and coordinator config schemas (JSON round trip, strict fields)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from federation.protocol.config import ConfigError, CoordinatorConfig, NodeConfig, from_json, load, save, to_json


def _node() -> NodeConfig:
    return NodeConfig(
        name="site-a",
        model_dir="/srv/model",
        data_dir="/srv/data",
        state_dir="/srv/state",
        pki_dir="/srv/pki",
        coordinator="10.0.0.5:9443",
        api_port=18443,
        epsilon=3.5,
        secure_mode=True,
    )


def test_node_config_save_load_round_trip(tmp_path: Path) -> None:
    cfg = _node()
    path = save(cfg, tmp_path / "deep" / "node.json")
    assert path.is_file()
    assert load(NodeConfig, path) == cfg


def test_coordinator_config_save_load_round_trip(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(pki_dir="/p", state_dir="/s", fleet_host="0.0.0.0", fleet_port=19443, site_keys_dir="/k")
    assert load(CoordinatorConfig, save(cfg, tmp_path / "coord.json")) == cfg


def test_saved_file_is_plain_json_with_every_field(tmp_path: Path) -> None:
    cfg = _node()
    data = json.loads(save(cfg, tmp_path / "node.json").read_text())
    assert data == to_json(cfg)
    assert set(data) == {f.name for f in dataclasses.fields(NodeConfig)}


def test_partial_file_uses_safe_defaults(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"name": "s", "model_dir": "m", "data_dir": "d", "state_dir": "st", "pki_dir": "p"}))
    cfg = load(NodeConfig, path)
    assert cfg.epsilon == 1.0
    assert cfg.api_host == "127.0.0.1"
    assert cfg.secure_mode is False


def test_unknown_field_is_config_error(tmp_path: Path) -> None:
    data = to_json(_node())
    data["epsilom"] = 8.0  # a typo must never silently fall back to the default
    path = tmp_path / "node.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="epsilom"):
        load(NodeConfig, path)


def test_unknown_field_in_from_json_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown CoordinatorConfig fields: bogus"):
        from_json(CoordinatorConfig, {"pki_dir": "p", "state_dir": "s", "bogus": 1})


def test_missing_required_field_is_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid NodeConfig"):
        from_json(NodeConfig, {"name": "site-a"})


@pytest.mark.parametrize("text", ["{not json", "", '{"name": "a",}'])
def test_malformed_json_is_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "node.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(NodeConfig, path)


@pytest.mark.parametrize("text", ["[]", '"node"', "null", "3"])
def test_non_object_json_is_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "node.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load(NodeConfig, path)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(NodeConfig, tmp_path / "absent.json")


def test_directory_instead_of_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(CoordinatorConfig, tmp_path)


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    path.write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(ConfigError):
        load(NodeConfig, path)
