"""Free ports for servers that tests and the benchmark start, chosen so nothing takes them first."""
from __future__ import annotations

import random
import socket
from pathlib import Path


def _listening_ports() -> range:
    """Ports a server may listen on: below the kernel's range for outgoing connections.

    A port the kernel hands out (bind to 0) comes from the same range it takes the source port of
    every outgoing connection from. Between choosing it and the server binding it, any connection
    on the machine (a load generator's, another test worker's, or the server's own parts talking to
    each other, as SeaweedFS's do at start) can take it, and the server fails with "address
    already in use". A port below that range is never taken that way.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, low) if low > 11000 else range(0)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free right now, chosen at random outside the outgoing range.

    Random, so test workers starting servers at once rarely try the same one; each is checked by
    binding it, and all are held open together until the last is found, so none repeats.
    """
    candidates = _listening_ports()
    sockets: list[socket.socket] = []
    try:
        for _ in range(50 * count):
            if len(sockets) == count:
                break
            s = socket.socket()
            try:
                s.bind((host, random.choice(candidates) if candidates else 0))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        if len(sockets) < count:
            raise RuntimeError(f"found {len(sockets)} free ports of the {count} needed")
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
