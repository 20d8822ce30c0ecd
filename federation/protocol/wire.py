"""The adapter wire format both sides share: LoRA arrays as safetensors bytes.

A LoRA update is a flat mapping of tensor name to float array. It travels inside Flower
records (converted at the edge, in the ClientApp / ServerApp) and over the node agent's
local HTTPS API as safetensors bytes, whose sha256 names an adapter version.

Wire version 2 adds which LoRA factors an update holds (`AdapterUpdate`): "AB" (the whole
adapter) or "B" (FFA-LoRA: A is the seeded init every site shares and never trains, so only
B travels, with `lora_a_sha256`, the sha256 of the site's A factors, to prove it). Over the
agent's HTTPS API the descriptor rides in the safetensors metadata (`fedseek-wire`,
`factors`, `lora-a-sha256`); in Flower replies it is the `adapter` ConfigRecord
(federation/protocol/records.py). A payload without it is version 1: the whole adapter.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from federation.errors import InvalidInput
from federation.protocol.versions import version_number

Arrays = dict[str, NDArray[np.float32]]

MAX_ADAPTER_BYTES = 512 * 1024 * 1024

WIRE_VERSION = 2
Factors = Literal["AB", "B"]
FACTORS: tuple[Factors, ...] = ("AB", "B")
_FACTOR_RE = re.compile(r"(^|\.)lora_([AB])(\.|$)")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class WireError(InvalidInput, ValueError):
    """A malformed, non-finite or mismatched adapter update."""


def validate_arrays(arrays: Mapping[str, NDArray[Any]], *, like: Mapping[str, NDArray[Any]] | None = None) -> Arrays:
    """Return float32 copies of `arrays` after checking they are finite (and shaped like `like`)."""
    out: Arrays = {}
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise WireError(f"adapter tensor {name!r} has non-numeric dtype {arr.dtype}")
        arr32 = arr.astype(np.float32, copy=False)
        if not np.all(np.isfinite(arr32)):
            raise WireError(f"adapter tensor {name!r} contains NaN or Inf")
        out[name] = arr32
    if like is not None:
        missing = sorted(set(like) - set(out))
        extra = sorted(set(out) - set(like))
        if missing or extra:
            raise WireError(f"adapter tensors differ from the expected set: missing {missing[:3]}, extra {extra[:3]}")
        for name, ref in like.items():
            if tuple(out[name].shape) != tuple(np.shape(ref)):
                raise WireError(f"adapter tensor {name!r} has shape {out[name].shape}, expected {np.shape(ref)}")
    return out


def encode(arrays: Mapping[str, NDArray[Any]], *, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise arrays to safetensors bytes (deterministic: keys sorted by safetensors)."""
    clean = validate_arrays(arrays)
    tensors = {k: np.ascontiguousarray(v) for k, v in clean.items()}
    md = dict(metadata or {})
    return bytes(st_save(tensors, metadata=md if (md or tensors) else None))


def decode(data: bytes) -> Arrays:
    """Parse safetensors bytes into validated float32 arrays."""
    if len(data) > MAX_ADAPTER_BYTES:
        raise WireError(f"adapter payload of {len(data)} bytes exceeds {MAX_ADAPTER_BYTES}")
    try:
        raw = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise WireError(f"malformed adapter payload: {exc}") from exc
    return validate_arrays(raw)


def sha256_of(arrays: Mapping[str, NDArray[Any]]) -> str:
    """Content hash of an adapter: sha256 of its canonical safetensors encoding."""
    return hashlib.sha256(encode(arrays)).hexdigest()


# ---- LoRA factors (FFA-LoRA) ---------------------------------------------------------------


def factor_of(name: str) -> Literal["A", "B"] | None:
    """Which LoRA factor a tensor is ("A", "B"), from its peft name; None for anything else."""
    m = _FACTOR_RE.search(name)
    return cast(Literal["A", "B"], m.group(2)) if m else None


def lora_a(arrays: Mapping[str, NDArray[np.float32]]) -> Arrays:
    """The A factors of an adapter (no copies)."""
    return {k: v for k, v in arrays.items() if factor_of(k) == "A"}


def lora_b(arrays: Mapping[str, NDArray[np.float32]]) -> Arrays:
    """Everything but the A factors: what an FFA-LoRA update carries."""
    return {k: v for k, v in arrays.items() if factor_of(k) != "A"}


def lora_a_sha256(arrays: Mapping[str, NDArray[np.float32]]) -> str:
    """sha256 of an adapter's A factors (their canonical safetensors encoding, names in order)."""
    return sha256_of(lora_a(arrays))


def _partner_a(name: str) -> str:
    return _FACTOR_RE.sub(lambda m: f"{m.group(1)}lora_A{m.group(3)}", name, count=1)


def with_lora_a(b_arrays: Mapping[str, NDArray[np.float32]], a_arrays: Mapping[str, NDArray[np.float32]]) -> Arrays:
    """A whole adapter from a B-only update and the A factors it was trained against.

    Every B needs its A and every A its B, so an update for another layout cannot be completed.
    """
    if lora_a(b_arrays):
        raise WireError("a B-only update must not hold lora_A tensors")
    if set(a_arrays) != set(lora_a(a_arrays)):
        raise WireError("the A factors to add hold tensors that are not lora_A")
    wanted = {_partner_a(k) for k in b_arrays if factor_of(k) == "B"}
    missing, extra = sorted(wanted - set(a_arrays)), sorted(set(a_arrays) - wanted)
    if missing or extra:
        raise WireError(f"lora_A factors do not pair with the B factors: missing {missing[:3]}, extra {extra[:3]}")
    return {**b_arrays, **a_arrays}


@dataclass(frozen=True)
class AdapterUpdate:
    """A site's reply: the whole adapter ("AB") or, under FFA-LoRA, its B factors only ("B").

    `lora_a_sha256` is the digest of the A factors the update was trained against ("" for a
    version-1 payload): the coordinator refuses an update whose A is not the run's.
    """

    arrays: Arrays
    factors: Factors = "AB"
    lora_a_sha256: str = ""

    @classmethod
    def of(cls, adapter: Arrays, factors: Factors) -> AdapterUpdate:
        """What to send from a whole adapter: all of it, or its B factors with A's digest."""
        digest = lora_a_sha256(adapter)
        return cls(adapter if factors == "AB" else lora_b(adapter), factors, digest)

    def check(self) -> AdapterUpdate:
        """Refuse an update whose descriptor does not match its arrays (WireError); return it."""
        if self.factors not in FACTORS:
            raise WireError(f"unknown LoRA factors {self.factors!r}; expected one of {FACTORS}")
        if self.lora_a_sha256 and not _SHA256_RE.match(self.lora_a_sha256):
            raise WireError("lora-a-sha256 is not a sha256 hex digest")
        if self.factors == "B":
            if lora_a(self.arrays):
                raise WireError(f"a B-only update holds lora_A tensors: {sorted(lora_a(self.arrays))[:3]}")
            if not any(factor_of(k) == "B" for k in self.arrays):
                raise WireError("a B-only update holds no lora_B tensors")
            if not self.lora_a_sha256:
                raise WireError("a B-only update must name the sha256 of its lora_A factors")
        elif self.lora_a_sha256 and lora_a_sha256(self.arrays) != self.lora_a_sha256:
            raise WireError("the update's lora_A factors do not match its lora-a-sha256")
        return self

    def descriptor(self) -> dict[str, str]:
        """The version-2 descriptor, as strings (safetensors metadata allows nothing else)."""
        return {"fedseek-wire": str(WIRE_VERSION), "factors": self.factors, "lora-a-sha256": self.lora_a_sha256}

    @classmethod
    def from_descriptor(cls, arrays: Arrays, descriptor: Mapping[str, Any]) -> AdapterUpdate:
        """Parse and check; an empty descriptor is a version-1 payload (the whole adapter)."""
        if not descriptor:
            return cls(arrays).check()
        try:
            version = int(descriptor["fedseek-wire"])
            factors = str(descriptor["factors"])
            digest = str(descriptor.get("lora-a-sha256", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed adapter descriptor: {exc}") from exc
        if not 1 <= version <= WIRE_VERSION:
            raise WireError(f"unsupported adapter wire version {version} (this side speaks up to {WIRE_VERSION})")
        return cls(arrays, cast(Factors, factors), digest).check()


def encode_update(update: AdapterUpdate) -> bytes:
    """Safetensors bytes of the update's arrays with its descriptor in the metadata."""
    return encode(update.check().arrays, metadata=update.descriptor())


def decode_update(data: bytes) -> AdapterUpdate:
    """Parse `encode_update` bytes (or version-1 bytes without a descriptor) and check them."""
    arrays = decode(data)
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    return AdapterUpdate.from_descriptor(arrays, {k: v for k, v in metadata.items() if k in _DESCRIPTOR_KEYS})


_DESCRIPTOR_KEYS = ("fedseek-wire", "factors", "lora-a-sha256")


def statements_of(value: object) -> list[dict[str, Any]]:
    """A list of signed statements (JSON objects) as a report or readiness answer carries them; their
    signatures are the coordinator's to check (`coordinator.witness`). TypeError if not such a list."""
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise TypeError("witness must be a list of signed statements (JSON objects)")
    return [dict(s) for s in value]


@dataclass(frozen=True)
class PrivacyReport:
    """What a site reports with each update so the coordinator can record lineage."""

    site: str
    epsilon: float
    delta: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    num_examples: int
    train_loss: float
    extra: dict[str, float] = field(default_factory=dict)
    witness: list[dict[str, Any]] = field(default_factory=list)
    """Signed statements backing the report (the ledger head after the round): `node.witness_statements`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyReport:
        try:
            return cls(
                site=str(data["site"]),
                epsilon=float(data["epsilon"]),
                delta=float(data["delta"]),
                steps=int(data["steps"]),
                sample_rate=float(data["sample_rate"]),
                noise_multiplier=float(data["noise_multiplier"]),
                max_grad_norm=float(data["max_grad_norm"]),
                accountant=str(data["accountant"]),
                num_examples=int(data["num_examples"]),
                train_loss=float(data["train_loss"]),
                extra={str(k): float(v) for k, v in dict(data.get("extra", {})).items()},
                witness=statements_of(data.get("witness", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed privacy report: {exc}") from exc


@dataclass(frozen=True)
class Readiness:
    """A site's answer to the coordinator's readiness query before a round: can it train the round?

    `ready` is the node's own plan of the round (the ledger's, nothing charged); `reason` says why
    not in one line. The coordinator starts a round only if at least `min-nodes` sites are ready.
    """

    site: str
    ready: bool
    reason: str = ""
    epsilon_spent: float = 0.0
    epsilon_remaining: float = 0.0
    witness: list[dict[str, Any]] = field(default_factory=list)
    """Signed statements of the site's state before the round (its ledger head): `node.witness_statements`."""
    num_examples: int = 0
    """The site's training records (0: not said). Under secure aggregation the coordinator scales SecAgg+'s
    fixed-point weights with the largest of them (coordinator/secagg.py), so it must know them beforehand."""
    latest_version: str = ""
    """The highest global version (`global-vNNNN`) installed at the site ("": none, or not said). The
    coordinator numbers its next version past it: a registry restored from an older backup must not reuse
    a number the site holds with other weights (federation/protocol/versions.py)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Readiness:
        try:
            ready = data["ready"]
            if not isinstance(ready, bool):
                raise TypeError(f"ready must be a bool, not {type(ready).__name__}")
            latest = data.get("latest_version", "")
            if latest != "" and version_number(latest) is None:
                raise ValueError(f"latest_version {str(latest)[:80]!r} is not a global version (global-vNNNN)")
            return cls(
                site=str(data["site"]),
                ready=ready,
                reason=str(data.get("reason", "")),
                epsilon_spent=float(data.get("epsilon_spent", 0.0)),
                epsilon_remaining=float(data.get("epsilon_remaining", 0.0)),
                witness=statements_of(data.get("witness", [])),
                num_examples=int(data.get("num_examples", 0)),
                latest_version=str(latest),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed readiness answer: {exc}") from exc
