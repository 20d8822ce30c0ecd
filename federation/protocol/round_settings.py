"""The settings of a federated run and what one train message tells a node, with one set of defaults.

`RunSettings` is what `fedseek run` chooses; `TrainInstruction` is what one train message
carries (the run's settings plus this round's fields); `RunConfig` is Flower's run config of
the FedSeek app (the settings plus the coordinator's registry directory). Each travels under
the kebab-case keys coordinators and nodes have always used (`num-rounds`, `learning-rate`, ...):
- Flower's run config: the FAB's `[tool.flwr.app.config]` table, overridden by TOML text given
  to `flwr run --run-config`, read by the ServerApp;
- a train message's `config` ConfigRecord, which the ClientApp relays as JSON to the node agent
  with `run-id` added.

Every decoder refuses an unknown key or a wrong type (`RoundSettingsError`, a 400), so a typo
such as `learning_rate` is an error instead of a silent fall back to the default. An absent key
takes the default below: an older coordinator that sends fewer keys still works.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from federation.errors import InvalidInput
from federation.protocol.names import NAME_RE, NAME_RULE

if TYPE_CHECKING:  # imported where used: `fedseek --help` reads the run defaults without numpy or Flower
    from flwr.app import ConfigRecord

    from federation.protocol import wire

Scalar = bool | int | float | str
"""What a Flower run config and a ConfigRecord entry hold here."""

_SHA256 = re.compile(r"[0-9a-f]{64}")

AGGREGATIONS = ("fedavg", "trimmed-mean", "median")
SERVER_OPTS = ("fedavg", "fedavgm", "fedadam")
"""The coordinator's step from the round's combined update to the next global adapter
(coordinator/server_opt.py): the combined update itself (`fedavg`, server lr 1), or FedOpt's momentum
(`fedavgm`) or Adam (`fedadam`) on the pseudo-gradient. Post-processing of DP output: no privacy cost."""
NOISE_SCHEDULES = ("constant", "equal-epsilon")
"""How each site spreads the run's epsilon over its rounds (privacy/ledger.py NOISE_SCHEDULES)."""
"""How the coordinator combines a round's accepted updates (coordinator/aggregate.py): `fedavg`, the mean
weighted by each site's example count; `trimmed-mean` and `median`, coordinate-wise and unweighted (a site
reports its own example count, so a robust mean must not let it buy weight)."""


class RoundSettingsError(InvalidInput, ValueError):
    """A run or round setting that is unknown, of the wrong type or out of range."""


def _keys(cls: type) -> dict[str, str]:
    """Wire key -> attribute of a settings class's own scalar fields (`num_rounds` travels as `num-rounds`)."""
    return {
        f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.default)
    }


def _items(obj: object) -> dict[str, Scalar]:
    """The wire items of a settings object's own scalar fields."""
    return {key: getattr(obj, name) for key, name in _keys(type(obj)).items()}


def _kwargs(cls: type, items: Mapping[str, object]) -> dict[str, Any]:
    """Constructor arguments of `cls` from the wire items it owns (absent ones keep their defaults)."""
    return {name: items[key] for key, name in _keys(cls).items() if key in items}


def _refuse_unknown(what: str, items: Mapping[str, object], known: Iterable[str]) -> None:
    known = sorted(known)
    unknown = sorted(set(items) - set(known))
    if unknown:
        raise RoundSettingsError(
            f"unknown {what} key {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}", code="unknown_key"
        )


def _check_types(obj: Any) -> None:
    """Refuse a field whose value is not of its default's type, and a nested one that is not a settings
    object. An int is taken, as a float, where a float is expected (TOML and JSON write 1 for 1.0); a
    bool is never taken for a number."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), type(f.default)
        if kind is float and type(value) is int:
            object.__setattr__(obj, f.name, float(value))  # frozen: normalised once, at construction
        elif type(value) is not kind:
            key = f.name.replace("_", "-")
            raise RoundSettingsError(
                f"{key} must be {kind.__name__}, not {type(value).__name__} ({value!r})", code="wrong_type"
            )


def _require(ok: bool, key: str, value: object, what: str) -> None:
    if not ok:
        raise RoundSettingsError(f"{key} must be {what}, not {value!r}", code="out_of_range")


@dataclass(frozen=True)
class RunSettings:
    """What `fedseek run` chooses for one federated run: the one place FedSeek's run defaults live."""

    run_name: str = "run"
    """Names the run's summary, `<registry>/runs/<run-name>.json`: a plain file-name stem."""
    num_rounds: int = 8
    """With `server-opt fedavgm` and the constant noise schedule, the settings that won the six-seed
    usefulness run (BENCHMARKS.md, H100 2026-12-06: worst seed 0.94 of pooled, median 1.00). Short runs
    (the demo's 1-2 rounds) should pass `server-opt fedavg`: momentum over few rounds carried the noisiest
    steps forward (4 rounds: 0.74 vs FedAvg's 0.79 on the hardest seed)."""
    min_nodes: int = 2
    """Sites that must answer the readiness query with yes before a round starts, and send valid updates
    in it; with fewer, the round trains nowhere, or makes no adapter, and the run ends `failed`."""
    round_timeout: float = 900.0
    """Seconds the coordinator waits for a round's replies, and before a round for `min-nodes` sites to connect;
    a train message expires after it (a site back later never trains a round already over)."""
    local_epochs: int = 1
    batch_size: int = 8
    """Expected (Poisson-sampled) DP-SGD batch size at each site."""
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0
    """Per-record gradient clipping bound of DP-SGD."""
    ffa_lora: bool = False
    """FFA-LoRA: train B only against the shared seeded A; B-only traffic after round 1."""
    budget_share: float = 0.5
    """Share of the privacy budget a site has left when the run starts that the run may spend there,
    spread over its rounds by `noise_schedule`: every run leaves the rest for the next (a demo can run again)."""
    secagg: bool = False
    """Secure aggregation (Flower's SecAgg+): the coordinator sees only the sum of the sites' adapter
    updates, never one site's; needs at least 3 ready sites (coordinator/secagg.py)."""
    aggregation: str = "fedavg"
    """How a round's accepted updates are combined: one of AGGREGATIONS."""
    trim_fraction: float = 0.2
    """`trimmed-mean`: share of the values dropped at each end of every coordinate, at least one each
    when three or more updates are combined (a fraction of three would otherwise drop nothing)."""
    noise_schedule: str = "constant"
    """How each site spreads the run's share of its budget over the run's rounds: one of NOISE_SCHEDULES."""
    server_opt: str = "fedavgm"
    """The coordinator's step from a round's combined update to the next global adapter: one of SERVER_OPTS."""
    server_lr: float = 1.0
    server_momentum: float = 0.9
    """`fedavgm`'s momentum; `fedadam`'s beta1 (its beta2 is 0.99, tau 1e-3)."""
    update_norm_ratio: float = 10.0
    """An update whose distance from the round's starting adapter is more than this many times the median
    of the other updates' distances is rejected (0: no bound). Honest DP-LoRA updates on the tiny model
    were 0.6-1.5x the others' median (a 3.3x spread of dataset sizes; the distance grows as the square
    root of a site's steps), one scaled x100 was 60-550x: coordinator/aggregate.py has the numbers."""

    def __post_init__(self) -> None:
        _check_types(self)
        _require(
            NAME_RE.fullmatch(self.run_name) is not None,  # the one name pattern: it becomes a file name
            "run-name",
            self.run_name,
            f"a plain name ({NAME_RULE})",
        )
        counts = {
            "num-rounds": self.num_rounds,
            "min-nodes": self.min_nodes,
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
        }
        for key, count in counts.items():
            _require(count >= 1, key, count, "a positive integer")
        sizes = {
            "round-timeout": self.round_timeout,
            "learning-rate": self.learning_rate,
            "max-grad-norm": self.max_grad_norm,
        }
        for key, size in sizes.items():
            _require(math.isfinite(size) and size > 0, key, size, "a finite number above 0")
        _require(0 < self.budget_share <= 1, "budget-share", self.budget_share, "a share in (0, 1]")
        _require(self.aggregation in AGGREGATIONS, "aggregation", self.aggregation, f"one of {AGGREGATIONS}")
        _require(  # SecAgg+ yields only the sum: a robust aggregate needs the single updates it hides
            not self.secagg or self.aggregation == "fedavg", "aggregation", self.aggregation, "fedavg with secagg"
        )
        _require(  # a trimmed mean or median needs each site's update; secure aggregation shows only their sum
            not self.secagg or self.aggregation == "fedavg",
            "aggregation",
            self.aggregation,
            "fedavg with secagg (the coordinator sees only the sum of the updates)",
        )
        _require(
            self.noise_schedule in NOISE_SCHEDULES, "noise-schedule", self.noise_schedule, f"one of {NOISE_SCHEDULES}"
        )
        _require(self.server_opt in SERVER_OPTS, "server-opt", self.server_opt, f"one of {SERVER_OPTS}")
        _require(math.isfinite(self.server_lr) and self.server_lr > 0, "server-lr", self.server_lr, "a number above 0")
        _require(0 <= self.server_momentum < 1, "server-momentum", self.server_momentum, "in [0, 1)")
        _require(0 <= self.trim_fraction < 0.5, "trim-fraction", self.trim_fraction, "a share in [0, 0.5)")
        _require(
            self.update_norm_ratio == 0 or 1 <= self.update_norm_ratio < math.inf,
            "update-norm-ratio",
            self.update_norm_ratio,
            "0 (no bound) or a finite number of at least 1",
        )

    def items(self) -> dict[str, Scalar]:
        """The settings under their wire keys (`RunSettings(**...)` of `from_items` reads them back)."""
        return _items(self)

    @classmethod
    def from_items(cls, items: Mapping[str, object]) -> RunSettings:
        """Settings from their wire keys; an unknown key or a wrong type is refused (RoundSettingsError)."""
        _refuse_unknown("run settings", items, _keys(cls))
        return cls(**_kwargs(cls, items))


@dataclass(frozen=True)
class TrainInstruction:
    """What one train message tells a node: the run's settings and this round's fields.

    `reply-factors` and `lora-a-sha256` are FFA-LoRA's: the coordinator asks for the whole
    adapter ("AB") until it knows the run's A, then for B only, naming A's digest. A string
    left empty is not known to the sender and is not sent: `lora-a-sha256` before the
    coordinator has A, and `run-id`, which Flower assigns and the ClientApp adds.
    `run-key` names the run in the site's ledger across its submissions (a run resumed with
    `fedseek run --resume` is a new Flower run of the same run); empty, the node uses `run-id`.
    `server-round` is the run's round, counted on across a resume.
    """

    run: RunSettings = RunSettings()
    server_round: int = 1
    reply_factors: wire.Factors = "AB"
    lora_a_sha256: str = ""
    run_id: str = ""
    run_key: str = ""

    def __post_init__(self) -> None:
        from federation.protocol.wire import FACTORS

        _check_types(self)
        _require(self.server_round >= 1, "server-round", self.server_round, "a positive integer")
        _require(self.reply_factors in FACTORS, "reply-factors", self.reply_factors, f"one of {FACTORS}")
        _require(
            not self.lora_a_sha256 or _SHA256.fullmatch(self.lora_a_sha256) is not None,
            "lora-a-sha256",
            self.lora_a_sha256,
            "a lowercase hex sha256",
        )
        _require(not self.run_key or NAME_RE.fullmatch(self.run_key) is not None, "run-key", self.run_key, NAME_RULE)

    @property
    def ledger_run(self) -> str:
        """The run a site's ledger charges this round to: `run-key`, else Flower's run id, else "local"."""
        return self.run_key or self.run_id or "local"

    def to_config_record(self) -> ConfigRecord:
        from flwr.app import ConfigRecord

        items = {**_items(self.run), **_items(self)}
        return ConfigRecord({k: v for k, v in items.items() if v != ""})

    @classmethod
    def from_config_record(cls, record: Mapping[str, object]) -> TrainInstruction:
        """The instruction in a train message's config (a ConfigRecord, or the JSON the agent receives)."""
        _refuse_unknown("train config", record, [*_keys(RunSettings), *_keys(cls)])
        return cls(run=RunSettings(**_kwargs(RunSettings, record)), **_kwargs(cls, record))


@dataclass(frozen=True)
class RunConfig:
    """Flower's run config of the FedSeek app: the run's settings and the coordinator's registry directory.

    `registry-dir` stays outside `RunSettings`: it is not chosen per run but is where this
    coordinator keeps its adapters, which `submit_run` reads from the coordinator's state file.
    Kept apart, it can never travel to nodes in a `TrainInstruction`. The FAB declares it
    empty only because Flower accepts overrides of declared keys alone.
    """

    settings: RunSettings = RunSettings()
    registry_dir: str = ""
    parent_version: str = ""
    """The registry version the run starts from ("": the shared seeded init); `fedseek run --parent`,
    or on `--resume` the run's last version."""
    start_round: int = 1
    """The run's round this submission starts at: after the last round a crashed submission started."""
    run_key: str = ""
    """The run's name in the sites' ledgers across submissions ("": this submission's Flower run id)."""

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self.start_round >= 1, "start-round", self.start_round, "a positive integer")
        _require(self.start_round <= self.settings.num_rounds, "start-round", self.start_round, "at most num-rounds")
        for key, name in (("parent-version", self.parent_version), ("run-key", self.run_key)):
            _require(not name or NAME_RE.fullmatch(name) is not None, key, name, f"empty or a plain name ({NAME_RULE})")

    def to_run_config(self) -> dict[str, Scalar]:
        return {**_items(self.settings), **_items(self)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> RunConfig:
        _refuse_unknown("run config", run_config, [*_keys(RunSettings), *_keys(cls)])
        return cls(settings=RunSettings(**_kwargs(RunSettings, run_config)), **_kwargs(cls, run_config))

    def to_toml(self) -> str:
        """A TOML document of the run config, for `flwr run --run-config <file>.toml`."""
        return "".join(f"{key} = {_toml_value(value)}\n" for key, value in self.to_run_config().items())


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    return repr(value)  # finite: the settings refuse inf and nan; repr keeps floats as floats ("900.0")


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quote, backslash and control characters escaped."""
    if c in '"\\':
        return "\\" + c
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
