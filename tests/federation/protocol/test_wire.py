"""Tests for the adapter wire format (safetensors bytes) and the PrivacyReport schema."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from federation.protocol import wire
from federation.protocol.wire import PrivacyReport, WireError


def _adapter(seed: int = 0) -> wire.Arrays:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_A": rng.standard_normal((4, 16)).astype(np.float32),
        "layers.0.q_proj.lora_B": rng.standard_normal((16, 4)).astype(np.float32),
        "layers.1.v_proj.lora_A": rng.standard_normal((4, 16)).astype(np.float32),
    }


def _report(**overrides: Any) -> PrivacyReport:
    data: dict[str, Any] = {
        "site": "site-a",
        "epsilon": 0.83,
        "delta": 1e-5,
        "steps": 12,
        "sample_rate": 0.125,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "accountant": "rdp",
        "num_examples": 48,
        "train_loss": 2.5,
        "extra": {"clip-fraction": 0.25},
    }
    data.update(overrides)
    return PrivacyReport(**data)


# -- encode / decode ------------------------------------------------------------------


def test_encode_decode_round_trip_preserves_names_shapes_and_values() -> None:
    arrays = _adapter()
    decoded = wire.decode(wire.encode(arrays))
    assert set(decoded) == set(arrays)
    for name, value in arrays.items():
        assert decoded[name].dtype == np.float32
        assert decoded[name].shape == value.shape
        np.testing.assert_array_equal(decoded[name], value)


def test_encode_converts_integer_and_float64_tensors_to_float32() -> None:
    arrays = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.linspace(0, 1, 5, dtype=np.float64)}
    decoded = wire.decode(wire.encode(arrays))
    assert decoded["a"].dtype == np.float32
    assert decoded["b"].dtype == np.float32
    np.testing.assert_array_equal(decoded["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_allclose(decoded["b"], np.linspace(0, 1, 5), rtol=1e-7)


def test_encode_accepts_non_contiguous_arrays() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base.T  # Fortran-ordered view
    decoded = wire.decode(wire.encode({"t": view}))
    np.testing.assert_array_equal(decoded["t"], view)


def test_encode_is_independent_of_dict_insertion_order() -> None:
    arrays = _adapter()
    reversed_arrays = dict(reversed(list(arrays.items())))
    assert wire.encode(arrays) == wire.encode(reversed_arrays)


def test_empty_adapter_round_trips() -> None:
    assert wire.decode(wire.encode({})) == {}


# -- sha256 ---------------------------------------------------------------------------


def test_sha256_is_deterministic_and_matches_encoding() -> None:
    arrays = _adapter()
    digest = wire.sha256_of(arrays)
    assert digest == wire.sha256_of({k: v.copy() for k, v in arrays.items()})
    assert digest == hashlib.sha256(wire.encode(arrays)).hexdigest()
    assert len(digest) == 64
    assert int(digest, 16) >= 0  # lowercase hex


def test_sha256_survives_a_round_trip() -> None:
    arrays = _adapter()
    assert wire.sha256_of(wire.decode(wire.encode(arrays))) == wire.sha256_of(arrays)


def test_sha256_changes_with_a_single_value() -> None:
    arrays = _adapter()
    changed = {k: v.copy() for k, v in arrays.items()}
    changed["layers.0.q_proj.lora_B"][3, 2] += 1e-3
    assert wire.sha256_of(changed) != wire.sha256_of(arrays)


def test_sha256_changes_with_name_and_shape() -> None:
    arrays = _adapter()
    renamed = {("x." + k if i == 0 else k): v for i, (k, v) in enumerate(arrays.items())}
    reshaped = {k: (v.reshape(-1) if i == 0 else v) for i, (k, v) in enumerate(arrays.items())}
    digests = {wire.sha256_of(arrays), wire.sha256_of(renamed), wire.sha256_of(reshaped)}
    assert len(digests) == 3


# -- non-finite values ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_naming_the_tensor(bad: float) -> None:
    arrays = _adapter()
    arrays["layers.1.v_proj.lora_A"][0, 5] = bad
    for call in (wire.validate_arrays, wire.encode, wire.sha256_of):
        with pytest.raises(WireError, match=r"layers\.1\.v_proj\.lora_A"):
            call(arrays)


def test_decode_rejects_nan_inside_valid_safetensors_bytes() -> None:
    payload = st_save({"ok": np.zeros(3, np.float32), "poisoned": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(WireError, match="poisoned"):
        wire.decode(payload)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float64_values_overflowing_float32_are_rejected() -> None:
    with pytest.raises(WireError, match="huge"):
        wire.validate_arrays({"huge": np.array([1e300], dtype=np.float64)})


# -- shape / key mismatch vs `like` ---------------------------------------------------


def test_validate_against_like_accepts_matching_set() -> None:
    arrays = _adapter(1)
    out = wire.validate_arrays(arrays, like=_adapter(2))
    assert set(out) == set(arrays)


def test_validate_against_like_rejects_wrong_shape_naming_tensor() -> None:
    like = _adapter()
    arrays = {k: v.copy() for k, v in like.items()}
    arrays["layers.0.q_proj.lora_B"] = np.zeros((16, 8), np.float32)
    with pytest.raises(WireError, match=r"layers\.0\.q_proj\.lora_B.*shape"):
        wire.validate_arrays(arrays, like=like)


def test_validate_against_like_rejects_transposed_shape() -> None:
    like = _adapter()
    arrays = {k: v.T.copy() if k.endswith("lora_A") else v for k, v in like.items()}
    with pytest.raises(WireError, match="shape"):
        wire.validate_arrays(arrays, like=like)


def test_validate_against_like_rejects_missing_tensor() -> None:
    like = _adapter()
    arrays = dict(like)
    del arrays["layers.1.v_proj.lora_A"]
    with pytest.raises(WireError, match=r"missing \['layers\.1\.v_proj\.lora_A'\]"):
        wire.validate_arrays(arrays, like=like)


def test_validate_against_like_rejects_extra_tensor() -> None:
    like = _adapter()
    arrays = {**like, "smuggled": np.zeros(2, np.float32)}
    with pytest.raises(WireError, match=r"extra \['smuggled'\]"):
        wire.validate_arrays(arrays, like=like)


def test_validate_returns_float32_copies_not_aliases_of_non_float32_input() -> None:
    src = np.arange(4, dtype=np.float64)
    out = wire.validate_arrays({"t": src})
    out["t"][0] = 99.0
    assert src[0] == 0.0


# -- malformed bytes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not safetensors at all",
        b"\xff" * 64,
        (10**6).to_bytes(8, "little") + b"{}",  # header length beyond the payload
        (2).to_bytes(8, "little") + b"[]",  # header that is not an object
    ],
    ids=["empty", "text", "garbage", "short-header", "bad-header"],
)
def test_decode_rejects_malformed_bytes(payload: bytes) -> None:
    with pytest.raises(WireError, match="malformed adapter payload"):
        wire.decode(payload)


def test_decode_rejects_truncated_payload() -> None:
    payload = wire.encode(_adapter())
    with pytest.raises(WireError):
        wire.decode(payload[:-7])


def test_decode_rejects_oversized_payload_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = wire.encode(_adapter())
    monkeypatch.setattr(wire, "MAX_ADAPTER_BYTES", len(payload) - 1)
    with pytest.raises(WireError, match="exceeds"):
        wire.decode(payload)


# -- non-numeric dtypes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [np.array(["a", "b"]), np.array([object(), None], dtype=object), np.array([1 + 2j], dtype=np.complex64)],
    ids=["str", "object", "complex"],
)
def test_validate_rejects_non_numeric_dtype(value: np.ndarray) -> None:
    with pytest.raises(WireError, match=r"'weird'.*dtype"):
        wire.validate_arrays({"fine": np.zeros(2, np.float32), "weird": value})


def test_decode_rejects_boolean_tensor() -> None:
    payload = st_save({"mask": np.array([True, False])})
    with pytest.raises(WireError, match=r"'mask'.*non-numeric dtype bool"):
        wire.decode(payload)


# -- PrivacyReport --------------------------------------------------------------------


def test_privacy_report_dict_round_trip() -> None:
    report = _report()
    data = report.to_dict()
    assert data["site"] == "site-a"
    assert data["extra"] == {"clip-fraction": 0.25}
    assert PrivacyReport.from_dict(data) == report


def test_privacy_report_from_dict_coerces_types_and_defaults_extra() -> None:
    data = _report().to_dict()
    del data["extra"]
    data.update({"epsilon": "0.5", "steps": "7", "num_examples": 10.0})
    report = PrivacyReport.from_dict(data)
    assert report.epsilon == 0.5
    assert report.steps == 7 and isinstance(report.steps, int)
    assert report.num_examples == 10 and isinstance(report.num_examples, int)
    assert report.extra == {}


@pytest.mark.parametrize("missing", ["site", "epsilon", "delta", "steps", "num_examples", "accountant"])
def test_privacy_report_missing_field_is_wire_error(missing: str) -> None:
    data = _report().to_dict()
    del data[missing]
    with pytest.raises(WireError, match="malformed privacy report"):
        PrivacyReport.from_dict(data)


@pytest.mark.parametrize(
    ("key", "value"),
    [("epsilon", "lots"), ("steps", "twelve"), ("num_examples", None), ("extra", {"x": "y"}), ("extra", [1, 2])],
)
def test_privacy_report_bad_value_is_wire_error(key: str, value: Any) -> None:
    data = _report().to_dict()
    data[key] = value
    with pytest.raises(WireError, match="malformed privacy report"):
        PrivacyReport.from_dict(data)


@pytest.mark.parametrize("data", [None, ["site", "a"], "site-a"])
def test_privacy_report_from_non_mapping_is_wire_error(data: Any) -> None:
    with pytest.raises(WireError):
        PrivacyReport.from_dict(data)


# -- LoRA factors and the FFA-LoRA update (wire version 2) ------------------------------


def _lora(seed: int = 0, *, layers: int = 3, r: int = 4, d: int = 32) -> wire.Arrays:
    """A peft-named adapter: one A (r x d) and one B (d x r) per projection."""
    rng = np.random.default_rng(seed)
    out: wire.Arrays = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            out[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, d)).astype(np.float32)
            out[f"{prefix}.lora_B.weight"] = rng.standard_normal((d, r)).astype(np.float32)
    return out


@pytest.mark.parametrize(
    ("name", "factor"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "A"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "B"),
        ("layers.0.q_proj.lora_A", "A"),
        ("lora_B", "B"),
        ("layers.0.q_proj.mylora_A.weight", None),
        ("layers.0.q_proj.lora_AB.weight", None),
        ("layers.0.bias", None),
    ],
)
def test_factor_of_reads_the_peft_name(name: str, factor: str | None) -> None:
    assert wire.factor_of(name) == factor


def test_lora_a_and_lora_b_split_an_adapter() -> None:
    full = _lora()
    a, b = wire.lora_a(full), wire.lora_b(full)
    assert a and b and set(a) | set(b) == set(full) and not set(a) & set(b)
    assert all(".lora_A." in k for k in a) and all(".lora_B." in k for k in b)
    assert wire.with_lora_a(b, a).keys() == full.keys()


def test_lora_a_digest_covers_a_only_and_every_value() -> None:
    full = _lora()
    digest = wire.lora_a_sha256(full)
    assert digest == wire.sha256_of(wire.lora_a(full))
    other_b = {**full, **{k: v + 1 for k, v in wire.lora_b(full).items()}}
    assert wire.lora_a_sha256(other_b) == digest
    assert wire.lora_a_sha256(dict(reversed(list(full.items())))) == digest  # name order, not insertion order
    moved = {k: v.copy() for k, v in full.items()}
    name = next(iter(wire.lora_a(full)))
    moved[name][0, 0] = np.nextafter(moved[name][0, 0], np.float32(np.inf))
    assert wire.lora_a_sha256(moved) != digest


def test_b_only_update_round_trips_with_its_descriptor_at_about_half_the_bytes() -> None:
    full = _lora()
    update = wire.AdapterUpdate.of(full, "B")
    assert update.factors == "B" and set(update.arrays) == set(wire.lora_b(full))
    assert update.lora_a_sha256 == wire.lora_a_sha256(full)
    payload = wire.encode_update(update)
    back = wire.decode_update(payload)
    assert back.factors == "B" and back.lora_a_sha256 == update.lora_a_sha256
    assert back.arrays.keys() == update.arrays.keys()
    for k, v in update.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], v)
    whole = wire.encode_update(wire.AdapterUpdate.of(full, "AB"))
    assert wire.decode_update(whole).factors == "AB"
    assert len(payload) < 0.6 * len(whole)
    # the agent completes it with the A it trained against: the very adapter again
    assert wire.sha256_of(wire.with_lora_a(back.arrays, wire.lora_a(full))) == wire.sha256_of(full)


def test_version_1_payload_decodes_as_the_whole_adapter() -> None:
    full = _lora()
    update = wire.decode_update(wire.encode(full))
    assert update.factors == "AB" and update.lora_a_sha256 == ""
    assert wire.sha256_of(update.arrays) == wire.sha256_of(full)


def _payload(arrays: wire.Arrays, **metadata: str) -> bytes:
    return bytes(st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata))


@pytest.mark.parametrize(
    ("which", "metadata", "reason"),
    [
        ("full", {"factors": "AB", "lora-a-sha256": "0" * 64}, "do not match"),
        ("full", {"factors": "B", "lora-a-sha256": "DIGEST"}, "holds lora_A"),
        ("b", {"factors": "B", "lora-a-sha256": ""}, "must name the sha256"),
        ("b", {"factors": "B", "lora-a-sha256": "not-hex"}, "not a sha256"),
        ("b", {"factors": "A", "lora-a-sha256": "DIGEST"}, "unknown LoRA factors"),
        ("a", {"factors": "B", "lora-a-sha256": "DIGEST"}, "holds lora_A"),
        ("b", {"fedseek-wire": "3", "factors": "B", "lora-a-sha256": "DIGEST"}, "unsupported adapter wire version"),
        ("b", {"fedseek-wire": "two", "factors": "B"}, "malformed adapter descriptor"),
    ],
)
def test_inconsistent_descriptor_is_refused(which: str, metadata: dict[str, str], reason: str) -> None:
    full = _lora()
    arrays = {"full": full, "b": wire.lora_b(full), "a": wire.lora_a(full)}[which]
    metadata = {"fedseek-wire": "2", **metadata}
    if metadata.get("lora-a-sha256") == "DIGEST":
        metadata["lora-a-sha256"] = wire.lora_a_sha256(full)
    with pytest.raises(WireError, match=reason):
        wire.decode_update(_payload(arrays, **metadata))


def test_b_only_update_without_b_is_refused() -> None:
    with pytest.raises(WireError, match="no lora_B"):
        wire.AdapterUpdate({"bias": np.zeros(2, np.float32)}, "B", "0" * 64).check()


def test_with_lora_a_refuses_factors_that_do_not_pair() -> None:
    full = _lora()
    a, b = wire.lora_a(full), wire.lora_b(full)
    first = next(iter(a))
    with pytest.raises(WireError, match="missing"):
        wire.with_lora_a(b, {k: v for k, v in a.items() if k != first})
    with pytest.raises(WireError, match="extra"):
        wire.with_lora_a(b, {**a, "layers.9.q_proj.lora_A.weight": a[first]})
    with pytest.raises(WireError, match="must not hold lora_A"):
        wire.with_lora_a(full, a)
    with pytest.raises(WireError, match="not lora_A"):
        wire.with_lora_a(b, {**a, "bias": np.zeros(2, np.float32)})
