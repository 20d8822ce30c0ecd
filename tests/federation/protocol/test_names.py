"""The one name pattern for adapter versions and run names, and the reserved names."""

from __future__ import annotations

import pytest

from federation.errors import InvalidInput
from federation.protocol.names import RESERVED, InvalidNameError, check_adapter_name, check_name


@pytest.mark.parametrize("name", ["global-v0001", "v1", "clinic_v2", "a", "0", "x" * 64])
def test_plain_names_pass(name: str) -> None:
    assert check_adapter_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/tmp/x",
        "../x",
        "a/b",
        "..",
        ".hidden",
        "a..b",
        "v1.0",  # a '.' breaks peft's ModuleDict keys, and would allow '..'
        "-flag",
        "_private",
        "V1",  # lowercase only: no two names differ only by case
        "x" * 65,
        "a b",
        "a\nb",
        "a\\b",
        "caf\u00e9",
    ],
)
def test_path_like_and_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid adapter version") as info:
        check_adapter_name(name)
    assert isinstance(info.value, InvalidInput) and info.value.status == 400
    assert "\n" not in info.value.one_line() and len(info.value.one_line()) < 200


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_reserved_names_are_refused(name: str) -> None:
    assert check_name(name, what="run name") == name  # the pattern alone allows them
    with pytest.raises(InvalidNameError, match="is reserved"):
        check_adapter_name(name)


def test_caller_reserved_names_compare_case_insensitively() -> None:
    with pytest.raises(InvalidNameError, match="'qwen2-tiny' is reserved"):
        check_adapter_name("qwen2-tiny", reserved=("Qwen2-Tiny",))
    assert check_adapter_name("qwen2-tiny-ft", reserved=("Qwen2-Tiny",)) == "qwen2-tiny-ft"


def test_non_strings_are_refused() -> None:
    with pytest.raises(InvalidNameError, match="must be a string, not int"):
        check_adapter_name(7)
