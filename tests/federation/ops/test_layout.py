"""State-directory layouts: every path under its root, none shared, none two names for one file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from federation.ops.layout import CoordinatorLayout, NodeLayout

LAYOUTS = [NodeLayout, CoordinatorLayout]
DIRECTORY_ENTRIES = {"logs", "control", "sockets"}  # the entries other entries may live in


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("root", [Path("/srv/fedseek/state"), Path("relative/state")])
def test_every_path_stays_inside_root(layout: type[NodeLayout | CoordinatorLayout], root: Path) -> None:
    paths = layout(root).paths()
    assert paths, "a layout with no entries"
    for name, path in paths.items():
        rel = path.relative_to(root)  # raises if outside
        assert rel.parts and ".." not in rel.parts, name
        assert path.is_absolute() == root.is_absolute(), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_two_entries_share_a_path(layout: type[NodeLayout | CoordinatorLayout]) -> None:
    paths = layout(Path("/state")).paths()
    assert len(set(paths.values())) == len(paths)
    for name, path in paths.items():
        for other, inner in paths.items():
            if other != name and path in inner.parents:
                assert name in DIRECTORY_ENTRIES, f"{other} lies inside {name}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_at_two_roots_share_no_path(layout: type[NodeLayout | CoordinatorLayout]) -> None:
    a, b = layout(Path("/sites/a/state")), layout(Path("/sites/b/state"))
    assert not set(a.paths().values()) & set(b.paths().values())


def test_layouts_are_relative_to_root_and_frozen(tmp_path: Path) -> None:
    node = NodeLayout(tmp_path)
    assert node.ledger == tmp_path / "ledger.sqlite"  # the names existing state directories already use
    assert node.audit == tmp_path / "audit.jsonl"
    assert node.endpoints == tmp_path / "node.json"
    assert CoordinatorLayout(tmp_path).endpoints == tmp_path / "coordinator.json"
    assert NodeLayout(tmp_path / "moved").ledger == tmp_path / "moved" / "ledger.sqlite"
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.root = tmp_path / "elsewhere"  # type: ignore[misc]
    assert node == NodeLayout(tmp_path) and hash(node) == hash(NodeLayout(tmp_path))


def test_paths_lists_every_property() -> None:
    node = NodeLayout(Path("/state"))
    assert set(node.paths()) >= {"audit", "ledger", "agent_token", "api_key", "api_key_digests", "adapters"}
    assert "root" not in node.paths()
    assert all(getattr(node, name) == path for name, path in node.paths().items())
