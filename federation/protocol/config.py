"""Config schemas of the node agent and the coordinator: dataclasses that round-trip to JSON.

Defaults are the safe choice (budget epsilon 1.0, loopback binds); a file may set any subset
of fields, and unknown fields are an error so that a typo never silently falls back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

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


def from_json(cls: type[T], data: dict[str, Any]) -> T:
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc


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
    return from_json(cls, data)


def save(cfg: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(cfg), indent=2))
    return path
