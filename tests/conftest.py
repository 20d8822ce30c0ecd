"""Shared fixtures: the tiny seeded DeepSeek-V3 model, a site's synthetic data and a PKI, made once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Test CAs are throwaway: their passphrase comes from the environment, as `fedseek ca` also allows.
os.environ.setdefault("FEDSEEK_CA_PASSPHRASE", "fedseek-test-ca-passphrase")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from node.model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-deepseek-v3")


@pytest.fixture(scope="session")
def site_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedseek_examples.demo.data import write_site_dataset

    out = tmp_path_factory.mktemp("site-data")
    write_site_dataset(out, site_index=0, n_sites=3, n_train=48, n_eval=12)
    return out


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A consortium CA with a coordinator, two sites and a reviewer."""
    from federation.security import pki

    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root, consortium="fedseek-test")
    pki.issue(root, "coordinator", role="coordinator")
    pki.issue(root, "reviewer", role="reviewer")
    for name in ("site-a", "site-b"):
        pki.issue(root, name, role="node")
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model's matmuls are too small to split; two threads only add sync cost.

    Module-scoped, for modules that score the tiny model many times: `pytestmark = pytest.mark.usefixtures(...)`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    """Daemons set a private umask (077) at start; one started in-process must not change later tests' files."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)
