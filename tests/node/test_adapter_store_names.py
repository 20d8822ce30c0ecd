"""Finding 4 on disk: stored adapter versions are plain names, the directory they lie in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.protocol.names import InvalidNameError
from node import adapter_store
from node.engine import AdapterInfo


class NoHost:
    """restore_versions must refuse before it installs anything."""

    def install(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("installed a version that should have been refused")


def _stored(adapters: Path, directory: str, version: str) -> None:
    d = adapters / directory
    d.mkdir(parents=True)
    (d / adapter_store.META_FILE).write_text(json.dumps({"version": version, "sha256": "0" * 64, "created": 1}))


@pytest.mark.parametrize(("directory", "version"), [("v1", "v2"), ("v1", "../v1"), ("site_local", "site_local")])
def test_restore_refuses_a_version_that_is_not_its_plain_directory_name(
    tmp_path: Path, directory: str, version: str
) -> None:
    _stored(tmp_path, directory, version)
    with pytest.raises(InvalidNameError):
        adapter_store.restore_versions(NoHost(), tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["/tmp/x", "../x", "a/b", "site_local"])
def test_save_writes_nothing_for_a_path_like_or_reserved_version(tmp_path: Path, version: str) -> None:
    info = AdapterInfo(version=version, sha256="0" * 64, parent=None, created=1)
    with pytest.raises(InvalidNameError):
        adapter_store.save_version(tmp_path / "adapters", info, {"a": np.zeros(2, dtype=np.float32)})
    assert not (tmp_path / "adapters").exists()
