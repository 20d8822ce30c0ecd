"""A lossy, slow cable between a host's switch port and the switch: the stand-in for `tc netem` where
the kernel has none (CONFIG_NET_SCH_NETEM unset, as on the dev box).

Run inside the switch's network namespace (`Hosts` does it); stdlib only:

    python -m tests.multihost.wire --host-port p2 --switch-port r2 --delay-ms 200 --loss-pct 5 --seed 1

Every Ethernet frame is relayed, unchanged, between the host's port and a veth whose peer is on the
bridge, with two AF_PACKET sockets. Frames from the host are held `delay-ms` and dropped with
probability `loss-pct` %, as `tc qdisc add dev eth0 root netem delay D loss L` does on the host's
own interface (its egress: the round trip grows by D); frames to the host pass at once. The kernel
still does everything else (ARP, TCP, its retransmissions): only the wire is emulated. The relayed
frames must be whole (checksums filled in, no GSO super-frames): `Hosts` turns those offloads off.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import random
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # a frame this host sent (our own relaying included): not to be relayed again


def _port(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((name, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    return sock


def relay(host_port: str, switch_port: str, *, delay_s: float, loss: float, seed: int) -> None:
    from_host, to_switch = _port(host_port), _port(switch_port)
    rng = random.Random(seed)
    held: list[tuple[float, int, bytes]] = []  # (due, sequence, frame): frames from the host on the slow wire
    seq = 0
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"wire {host_port}<->{switch_port}: delay {delay_s * 1000:g} ms, loss {loss * 100:g}%", flush=True)
    while not stop:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, frame = heapq.heappop(held)
            with contextlib.suppress(OSError):  # the switch port is down: lost, as on a cut cable
                to_switch.send(frame)
        timeout = max(0.0, held[0][0] - now) if held else 0.5
        try:
            readable, _, _ = select.select([from_host, to_switch], [], [], timeout)
        except InterruptedError:
            continue
        for sock in readable:
            while True:
                try:
                    frame, addr = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # a port went down; it comes back with the link
                if addr[2] == PACKET_OUTGOING:
                    continue
                if sock is from_host:
                    if rng.random() < loss:
                        continue
                    seq += 1
                    heapq.heappush(held, (time.monotonic() + delay_s, seq, frame))
                else:
                    with contextlib.suppress(OSError):
                        from_host.send(frame)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host-port", required=True)
    p.add_argument("--switch-port", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--loss-pct", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    relay(args.host_port, args.switch_port, delay_s=args.delay_ms / 1000, loss=args.loss_pct / 100, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
