"""A site's fleet sidecar with a standby coordinator after the primary (`NodeConfig.coordinator` =
"primary:port,standby:port"): real stunnel processes on loopback, each coordinator a stunnel mTLS server
with the coordinator certificate in front of its own echo server.

The primary is used while it answers; once it is gone, the next connection goes to the standby (the
coordinator restored from a backup, `fedseek restore`); a malformed address list is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.ops.supervise import Managed, free_port
from federation.security import pki
from federation.security.sidecar import SidecarError, client_config, coordinator_addresses, make_sidecar, server_config
from tests.federation.security.test_sidecar import HOST, EchoServer, _exchange_local, _tls, _token


def test_addresses_are_listed_in_order_with_priority_failover(pki_dir: Path) -> None:
    tls = _tls(pki.load_leaf(pki_dir, "site-a"))
    text = client_config(
        tls=tls, accept="127.0.0.1:1", relay="127.0.0.1:2", connect="10.0.0.1:9443, 10.0.0.2:9443", server_name="c"
    )
    fleet = text.split("[fleet]", 1)[1].splitlines()
    assert [x for x in fleet if x.startswith("connect = ")] == ["connect = 10.0.0.1:9443", "connect = 10.0.0.2:9443"]
    assert "failover = prio" in fleet  # stunnel's default, round robin, would split a round between two SuperLinks
    assert coordinator_addresses("h:1") == ["h:1"]
    assert coordinator_addresses(["a:1", "[::1]:2"]) == ["a:1", "[::1]:2"]
    for bad in ("", "a:1,b", "a:0", "a:99999", "a:1,b c:2", ":1"):
        with pytest.raises(SidecarError, match=r"coordinator address|no coordinator address"):
            coordinator_addresses(bad)


def _coordinator(pki_dir: Path, workdir: Path, echo: EchoServer) -> tuple[Managed, int]:
    port = free_port()
    proc = make_sidecar(
        name="coordinator",
        config_text=server_config(
            tls=_tls(pki.load_leaf(pki_dir, "coordinator")), accept=f"{HOST}:{port}", connect=f"{HOST}:{echo.port}"
        ),
        workdir=workdir,
    )
    proc.start().wait_port(HOST, port, timeout=30)
    return proc, port


def test_the_site_fails_over_to_the_standby_when_the_primary_is_gone(pki_dir: Path, tmp_path: Path) -> None:
    primary_echo, standby_echo = EchoServer().start(), EchoServer().start()
    procs: list[Managed] = []
    try:
        primary, primary_port = _coordinator(pki_dir, tmp_path / "primary", primary_echo)
        standby, standby_port = _coordinator(pki_dir, tmp_path / "standby", standby_echo)
        procs += [primary, standby]
        port = free_port()
        site = make_sidecar(
            name="site",
            config_text=client_config(
                tls=_tls(pki.load_leaf(pki_dir, "site-a")),
                accept=f"{HOST}:{port}",
                relay=f"{HOST}:{free_port()}",
                connect=f"{HOST}:{primary_port},{HOST}:{standby_port}",
                server_name="localhost",
            ),
            workdir=tmp_path / "site",
        )
        procs.append(site)
        site.start().wait_port(HOST, port, timeout=30)
        ca = pki_dir / "ca" / "ca.pem"
        for _ in range(3):  # the primary, every time, while it is there
            token = _token()
            assert _exchange_local(port, ca, token) == token
            assert primary_echo.saw(token) and not standby_echo.saw(token)
        primary.stop()  # the primary host is gone: its port refuses
        token = _token()
        assert _exchange_local(port, ca, token) == token
        assert standby_echo.saw(token) and not primary_echo.saw(token)
    finally:
        for p in reversed(procs):
            p.stop()
        primary_echo.stop()
        standby_echo.stop()
