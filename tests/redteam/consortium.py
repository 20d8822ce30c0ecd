"""A consortium's PKI and the coordinator's signed app, laid out for a real-process test."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from federation.ops.layout import CoordinatorLayout
from federation.security import pki
from federation.security.app_signing import FEDSEEK_APP_DIR, sign_app_dir
from federation.security.site_binding import register_site_key


def signed_consortium(base: Path, sites: Iterable[str]) -> tuple[Path, Path]:
    """CA, coordinator and node certificates (site keys registered) under `base/pki`, and FedSeek's app
    signed with the publisher key into the coordinator state `base/coord`; returns (pki dir, coordinator state)."""
    pki_dir = base / "pki"
    pki.init_ca(pki_dir, consortium="fedseek-redteam")
    pki.issue(pki_dir, "coordinator", role="coordinator")
    for site in sites:
        pki.issue(pki_dir, site, role="node")
        register_site_key(pki_dir, site)
    state = base / "coord"
    sign_app_dir(FEDSEEK_APP_DIR, CoordinatorLayout(state).signed_app, pki.load_publisher_key(pki_dir))
    return pki_dir, state
