"""The adapter wire format both sides share: LoRA arrays as safetensors bytes.

A LoRA update is a flat mapping of tensor name to float array. It travels inside Flower
records (converted at the edge, in the ClientApp / ServerApp) and over the node agent's
local HTTPS API as safetensors bytes, whose sha256 names an adapter version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

Arrays = dict[str, NDArray[np.float32]]

MAX_ADAPTER_BYTES = 512 * 1024 * 1024


class WireError(ValueError):
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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed privacy report: {exc}") from exc
