"""The one rule for names that become keys, directories or file names: adapter versions and run names.

A version names a directory (`<adapters>/<version>/`, `<registry>/<version>/`), a peft adapter
(a `torch.nn.ModuleDict` key, where a '.' is refused and attribute names such as `train` collide)
and a model id an OpenAI client asks for; a run name is the stem of `<registry>/runs/<name>.json`.
So one pattern serves all: lowercase letters, digits, '_' and '-', starting with a letter or a
digit, at most 64 characters. No '/', no '.', so nothing path-like ('..', '/tmp/x', '.hidden')
fits. Lowercase only: two names never differ only by case (a case-insensitive file system would
merge them).

Reserved names are those the serving layer gives a meaning of its own; a version with one of them
would replace the training adapter (`site_local`) or shadow the base model (`base`, the base
model's served name) or the default (`latest`). Callers add names of their own (`reserved=`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from federation.errors import InvalidInput

__all__ = [
    "BASE_ALIAS",
    "LATEST_ALIAS",
    "NAME_RE",
    "NAME_RULE",
    "RESERVED",
    "TRAIN_ADAPTER",
    "InvalidNameError",
    "check_adapter_name",
    "check_name",
]

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
NAME_RULE = "1-64 lowercase letters, digits, '_' or '-', starting with a letter or digit"

TRAIN_ADAPTER = "site_local"
"""The site's private working copy of the LoRA adapter, trained each round and never served."""
BASE_ALIAS = "base"
"""The base model without any adapter (besides its own served name)."""
LATEST_ALIAS = "latest"
"""The newest deployed version (what a request without `model` gets)."""

RESERVED: frozenset[str] = frozenset({TRAIN_ADAPTER, BASE_ALIAS, LATEST_ALIAS})


class InvalidNameError(InvalidInput, ValueError):
    """A version or run name that does not fit the one pattern, or is reserved (400)."""

    default_code = "invalid_name"


def check_name(name: object, *, what: str) -> str:
    """`name` if it fits the pattern; raises InvalidNameError with a one-line reason otherwise."""
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, not {type(name).__name__}")
    if NAME_RE.fullmatch(name) is None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidNameError(f"invalid {what} {shown!r}: use {NAME_RULE}")
    return name


def check_adapter_name(name: object, *, what: str = "adapter version", reserved: Iterable[str] = ()) -> str:
    """`name` if it fits the pattern and is neither reserved here nor in `reserved` (compared
    case-insensitively: a base model served as `Qwen2-Tiny` also reserves `qwen2-tiny`)."""
    checked = check_name(name, what=what)
    taken = {r.casefold() for r in (*RESERVED, *reserved)}
    if checked.casefold() in taken:
        raise InvalidNameError(f"{what} {checked!r} is reserved on this node; choose another name")
    return checked
