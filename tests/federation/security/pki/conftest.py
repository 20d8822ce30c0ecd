from __future__ import annotations

from pathlib import Path

import pytest

from federation.security.pki import PASSPHRASE_ENV, init_ca
from tests.federation.security.pki.support import PASS


@pytest.fixture(autouse=True)
def _passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls without an explicit passphrase read it from the environment, as `fedseek ca` does."""
    monkeypatch.setenv(PASSPHRASE_ENV, PASS)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    init_ca(root)
    return root
