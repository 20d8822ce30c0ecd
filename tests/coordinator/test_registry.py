"""Tests for the coordinator's versioned adapter registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.registry import AdapterRegistry, Manifest, RegistryError, SiteLineage
from federation.protocol import wire
from federation.protocol.names import InvalidNameError


def _adapter(seed: int) -> wire.Arrays:
    rng = np.random.default_rng(seed)
    return {
        "q.lora_A": rng.standard_normal((4, 8)).astype(np.float32),
        "q.lora_B": rng.standard_normal((8, 4)).astype(np.float32),
    }


def _lineage() -> list[SiteLineage]:
    return [
        SiteLineage(site="site-a", epsilon=0.8, delta=1e-5, num_examples=40, steps=10, noise_multiplier=1.1),
        SiteLineage(site="site-b", epsilon=0.6, delta=2e-5, num_examples=90, steps=22, noise_multiplier=0.9),
    ]


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "registry")


def test_empty_registry(registry: AdapterRegistry) -> None:
    assert registry.root.is_dir()
    assert registry.versions() == []
    assert registry.latest() is None


def test_versions_are_numbered_in_order(registry: AdapterRegistry) -> None:
    first = registry.save(_adapter(1), run="r", round=1, sites=_lineage(), parent=None)
    second = registry.save(_adapter(2), run="r", round=2, sites=_lineage(), parent=first.version)
    assert (first.version, second.version) == ("global-v0001", "global-v0002")
    assert registry.versions() == ["global-v0001", "global-v0002"]
    assert registry.latest() == "global-v0002"


def test_versions_sort_numerically_not_lexically(registry: AdapterRegistry) -> None:
    for n in (2, 9, 10, 10000):
        (registry.root / f"global-v{n:04d}").mkdir()
    (registry.root / "global-v12").mkdir()  # too few digits: not a version
    (registry.root / "runs").mkdir()
    (registry.root / "global-v0003").write_text("a file, not a version")
    assert registry.versions() == ["global-v0002", "global-v0009", "global-v0010", "global-v10000"]
    assert registry.save(_adapter(0), run="r", round=1, sites=[], parent=None).version == "global-v10001"


def test_versions_continue_after_reopening(registry: AdapterRegistry) -> None:
    registry.save(_adapter(1), run="r", round=1, sites=[], parent=None)
    reopened = AdapterRegistry(registry.root)
    assert reopened.save(_adapter(2), run="r2", round=1, sites=[], parent="global-v0001").version == "global-v0002"


def test_manifest_fields(registry: AdapterRegistry) -> None:
    arrays = _adapter(3)
    saved = registry.save(arrays, run="run-7", round=4, sites=_lineage(), parent="global-v0000")
    assert saved.sha256 == wire.sha256_of(arrays)
    assert saved.run == "run-7"
    assert saved.round == 4
    assert saved.parent == "global-v0000"
    assert saved.sites == _lineage()
    assert saved.created_at.endswith("Z")
    on_disk = json.loads((registry.root / saved.version / "manifest.json").read_text())
    assert on_disk["sha256"] == wire.sha256_of(arrays)
    assert on_disk["sites"][1] == {
        "site": "site-b",
        "epsilon": 0.6,
        "delta": 2e-5,
        "num_examples": 90,
        "steps": 22,
        "noise_multiplier": 0.9,
    }
    assert registry.manifest(saved.version) == saved


def test_parent_chain(registry: AdapterRegistry) -> None:
    parent: str | None = None
    for n in range(3):
        parent = registry.save(_adapter(n), run="r", round=n + 1, sites=[], parent=parent).version
    chain = []
    version: str | None = registry.latest()
    while version is not None:
        chain.append(version)
        version = registry.manifest(version).parent
    assert chain == ["global-v0003", "global-v0002", "global-v0001"]


def test_load_returns_saved_arrays_and_manifest(registry: AdapterRegistry) -> None:
    arrays = _adapter(4)
    saved = registry.save(arrays, run="r", round=1, sites=_lineage(), parent=None)
    loaded, manifest = registry.load(saved.version)
    assert manifest == saved
    assert set(loaded) == set(arrays)
    for name in arrays:
        np.testing.assert_array_equal(loaded[name], arrays[name])
    assert registry.path(saved.version).read_bytes() == wire.encode(arrays)


def test_manifest_json_round_trip() -> None:
    m = Manifest(
        version="global-v0001", sha256="0" * 64, parent=None, run="r", round=1, created_at="t", sites=_lineage()
    )
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_load_detects_tampered_values(registry: AdapterRegistry) -> None:
    saved = registry.save(_adapter(5), run="r", round=1, sites=[], parent=None)
    path = registry.path(saved.version)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last float: still a valid, finite safetensors file
    path.write_bytes(bytes(data))
    assert np.all(np.isfinite(wire.decode(bytes(data))["q.lora_B"]))
    with pytest.raises(RegistryError, match="sha256"):
        registry.load(saved.version)


def test_load_detects_a_substituted_adapter(registry: AdapterRegistry) -> None:
    saved = registry.save(_adapter(6), run="r", round=1, sites=[], parent=None)
    registry.path(saved.version).write_bytes(wire.encode(_adapter(7)))
    with pytest.raises(RegistryError, match="sha256"):
        registry.load(saved.version)


def test_load_of_garbage_adapter_is_registry_error(registry: AdapterRegistry) -> None:
    saved = registry.save(_adapter(6), run="r", round=1, sites=[], parent=None)
    registry.path(saved.version).write_bytes(b"\x00garbage")
    with pytest.raises(RegistryError, match="unreadable"):
        registry.load(saved.version)


def test_load_of_missing_adapter_is_registry_error(registry: AdapterRegistry) -> None:
    saved = registry.save(_adapter(6), run="r", round=1, sites=[], parent=None)
    registry.path(saved.version).unlink()
    with pytest.raises(RegistryError, match="unreadable"):
        registry.load(saved.version)


def test_missing_manifest_is_registry_error(registry: AdapterRegistry) -> None:
    saved = registry.save(_adapter(8), run="r", round=1, sites=[], parent=None)
    (registry.root / saved.version / "manifest.json").unlink()
    with pytest.raises(RegistryError, match="no readable manifest"):
        registry.manifest(saved.version)
    with pytest.raises(RegistryError):
        registry.load(saved.version)


def test_unknown_version_is_registry_error(registry: AdapterRegistry) -> None:
    with pytest.raises(RegistryError):
        registry.load("global-v0042")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"version": "global-v0001"}',
        '{"sites": [1], "x": 2}',
        pytest.param("[]", id="json-list"),
    ],
)
def test_malformed_manifest_is_registry_error(registry: AdapterRegistry, text: str) -> None:
    saved = registry.save(_adapter(8), run="r", round=1, sites=[], parent=None)
    (registry.root / saved.version / "manifest.json").write_text(text)
    with pytest.raises(RegistryError):
        registry.manifest(saved.version)


def test_no_temporary_directories_are_left(registry: AdapterRegistry) -> None:
    for n in range(3):
        registry.save(_adapter(n), run="r", round=n + 1, sites=[], parent=None)
    assert sorted(p.name for p in registry.root.iterdir()) == ["global-v0001", "global-v0002", "global-v0003"]
    for version in registry.versions():
        assert sorted(p.name for p in (registry.root / version).iterdir()) == ["adapter.safetensors", "manifest.json"]


def test_failed_save_leaves_nothing_behind(registry: AdapterRegistry) -> None:
    registry.save(_adapter(1), run="r", round=1, sites=[], parent=None)
    bad = _adapter(2)
    bad["q.lora_A"][0, 0] = np.nan
    with pytest.raises(wire.WireError):
        registry.save(bad, run="r", round=2, sites=[], parent="global-v0001")
    # a save that dies mid-write (unserialisable manifest) cleans up its temporary directory
    with pytest.raises(TypeError):
        registry.save(_adapter(3), run=object(), round=2, sites=[], parent=None)  # type: ignore[arg-type]
    assert [p.name for p in registry.root.iterdir()] == ["global-v0001"]
    assert registry.latest() == "global-v0001"


@pytest.mark.parametrize("version", ["/tmp/x", "../x", "a/b", "global-v0001/..", "site_local", "latest", "v1"])
def test_versions_that_are_not_registry_names_build_no_path(registry: AdapterRegistry, version: str) -> None:
    """Finding 4: a version reaches the file system only if it is a plain `global-vNNNN`."""
    for call in (registry.path, registry.manifest, registry.load):
        with pytest.raises(InvalidNameError):
            call(version)
