"""Config schemas of the node agent and the coordinator: dataclasses that round-trip to JSON.

Defaults are the safe choice (budget epsilon 1.0, loopback binds); a file may set any subset
of fields, and unknown fields are an error so that a typo never silently falls back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar, get_origin, get_type_hints

from federation.errors import InvalidInput

T = TypeVar("T")


class ConfigError(InvalidInput, ValueError):
    """A config file that is missing, malformed or has unknown fields."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    name: str
    model_dir: str
    data_dir: str
    state_dir: str
    pki_dir: str
    coordinator: str = "127.0.0.1:9443"  # host:port of the fleet endpoint; "primary,standby" fails over in order
    coordinator_name: str = "localhost"  # the name its certificate must carry
    # The coordinator's admin API (host:port, HTTPS): where the agent pushes its audit log's signed
    # checkpoint between rounds (node.checkpoint_push), every checkpoint_push_seconds (at most 60)
    # while it changed. Empty: only the rounds carry checkpoints to the witness.
    coordinator_admin: str = ""
    checkpoint_push_seconds: float = 30.0
    api_host: str = "127.0.0.1"
    api_port: int = 8443
    # Ports inside the SuperNode's private network namespace (node.agent; 0: its defaults)
    fleet_sidecar_port: int = 0  # where the SuperNode dials the fleet sidecar
    supernode_port: int = 0  # the SuperNode's Runtime API
    epsilon: float = 1.0  # the lifetime budget of this site's data; at most privacy_policy_epsilon
    delta: float = 0.0  # 0: choose 1 / (10 n) for n training records; must be below 1 / n
    privacy_policy_epsilon: float = 1.0  # the site's ceiling (DESIGN: epsilon <= 1.0); a budget above it is refused
    accountant: str = "rdp"
    device: str = "cpu"
    dtype: str = "auto"  # weights: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32 (node/model.py)
    max_length: int = 256
    secure_mode: bool = False
    # Applications reach the OpenAI routes with an API key ("api_key") or a consortium
    # client certificate ("mtls"); reviewers and admins always use certificates.
    openai_auth: str = "api_key"
    pki_poll_seconds: float = 5.0  # how often CRL and certificates are re-read (revocation bound: 60 s)
    # Data minimisation (privacy.minimise): the quasi-identifiers that data_dir/dataset.json declares must be
    # k-anonymous before a round; records in smaller classes may be dropped, up to this share, else no training.
    k_anonymity: int = 5
    max_suppression: float = 0.1
    # Encryption at rest (federation.security.at_rest): the site's key-encryption key, from
    # {"passphrase_file": PATH} or {"command": [ARGV, ...]} (a KMS/HSM client printing 32 bytes);
    # empty: training data and adapters are kept in clear (explanations stay sealed by the site key).
    kek: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Serving backend: "engine" (the node's own, one GPU) or "vllm": a vLLM OpenAI server the site runs
    # (tensor/expert parallel, multi-LoRA; node/upstream/vllm.py). The node keeps authentication, access
    # policy, audit, ledger and metrics in front of it and loads each deployed version into it as a LoRA.
    serving_backend: str = "engine"
    vllm_url: str = ""  # e.g. "http://10.0.0.5:8000": vLLM's OpenAI server (its /v1 routes), on a private network
    vllm_model: str = ""  # the base model's name in vLLM (`--served-model-name`); empty: the node's model name
    vllm_api_key_file: str = ""  # a file holding the key vLLM was started with (`--api-key`); empty: none
    # Where the node writes each version in PEFT's format for vLLM to load (empty: <state_dir>/vllm-lora),
    # and the same directory as the vLLM process sees it, if mounted elsewhere (empty: the same path).
    vllm_lora_dir: str = ""
    vllm_lora_dir_in_vllm: str = ""
    vllm_timeout_s: float = 600.0  # the longest a forwarded request may take (a long generation included)


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    pki_dir: str
    state_dir: str
    name: str = "coordinator"
    fleet_host: str = "127.0.0.1"
    fleet_port: int = 9443
    superlink_port: int = 0  # inside the SuperLink's own network namespace; 0: 9093
    site_keys_dir: str = ""  # directory of <site>.pub SuperNode keys to register
    pki_poll_seconds: float = 5.0  # how often the CRL and CA index are checked (revocation bound: 60 s)
    admin_host: str = "127.0.0.1"  # the admin API (HTTPS, admin certificates only)
    admin_port: int = 0  # 0: pick a free port; written to coordinator.json


def to_json(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _type_problem(expected: Any, value: Any) -> str | None:
    """Why `value` (parsed JSON) is not of the field type `expected`, or None when it is."""
    names = {bool: "true or false", int: "int", float: "number", str: "string", dict: "JSON object"}
    origin = get_origin(expected) or expected
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:  # JSON has one number type: 1 is a fine epsilon
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif origin in (str, dict):
        ok = isinstance(value, origin)
    else:
        return None  # a type this schema does not use: the dataclass takes it as given
    return None if ok else f"expected {names[origin]}, got {json.dumps(value)}"


def from_json(cls: type[T], data: dict[str, Any], *, source: str = "") -> T:
    """`cls` from a parsed JSON object, refusing unknown fields, missing ones and wrong types, each named.

    The message names every bad field (`node.json: field 'api_port': expected int, got "abc"`), on one
    line, so an operator fixes the file in one pass.
    """
    where = f"{source}: " if source else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    problems = [f"unknown {cls.__name__} fields: {', '.join(unknown)}"] if unknown else []
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    problems += [f"invalid {cls.__name__}: missing field {name!r}" for name in missing]
    for name, value in data.items():
        if name in fields and (why := _type_problem(hints[name], value)) is not None:
            problems.append(f"field {name!r}: {why}")
    if problems:
        raise ConfigError(where + "; ".join(problems))
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}invalid {cls.__name__}: {exc}") from exc


def load(cls: type[T], path: Path) -> T:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a JSON object")
    return from_json(cls, data, source=str(path))


def save(cfg: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(cfg), indent=2))
    return path
