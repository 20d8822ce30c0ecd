"""Issue 17: a config file is checked field by field - types, unknown and missing fields - and every bad
field is named with the file, so an operator fixes it in one pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.protocol.config import ConfigError, CoordinatorConfig, NodeConfig, load

NODE = {"name": "site-a", "model_dir": "m", "data_dir": "d", "state_dir": "s", "pki_dir": "p"}


def _write(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "node.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("api_port", "abc", 'expected int, got "abc"'),
        ("api_port", 8443.5, "expected int, got 8443.5"),
        ("api_port", True, "expected int, got true"),
        ("epsilon", "1.0", 'expected number, got "1.0"'),
        ("secure_mode", "yes", 'expected true or false, got "yes"'),
        ("name", 7, "expected string, got 7"),
        ("kek", ["passphrase_file"], 'expected JSON object, got ["passphrase_file"]'),
    ],
)
def test_wrong_type_is_named_with_file_and_field(tmp_path: Path, field: str, value: object, expected: str) -> None:
    path = _write(tmp_path, {**NODE, field: value})
    with pytest.raises(ConfigError) as info:
        load(NodeConfig, path)
    assert str(info.value) == f"{path}: field {field!r}: {expected}"


def test_an_int_is_a_fine_float(tmp_path: Path) -> None:
    assert load(NodeConfig, _write(tmp_path, {**NODE, "epsilon": 1})).epsilon == 1


def test_every_bad_field_is_named_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.json"
    path.write_text(json.dumps({"state_dir": 3, "fleet_port": "9443", "fleet_prot": 9443}))
    with pytest.raises(ConfigError) as info:
        load(CoordinatorConfig, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for part in (
        "unknown CoordinatorConfig fields: fleet_prot",
        "missing field 'pki_dir'",
        "field 'state_dir': expected string, got 3",
        "field 'fleet_port': expected int, got \"9443\"",
    ):
        assert part in message
