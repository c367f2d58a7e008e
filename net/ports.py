"""Free port numbers on 127.0.0.1 for local networks (the demo and the tests)."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port(taken: set[int]) -> int:
    """A port number free for both TCP (HTTP) and UDP (the DHT, same number).

    Binds TCP port 0, then UDP on the same number; skips and records the
    numbers in ``taken``, so one caller never gets a number twice."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = int(tcp.getsockname()[1])
            if port in taken:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
        taken.add(port)
        return port
    raise OSError("no port free for both TCP and UDP on 127.0.0.1")


def percentile(sorted_values: list[int], pct: int) -> int:
    """The ``pct``-th percentile (nearest rank) of an ascending, non-empty list."""
    return sorted_values[min(len(sorted_values) - 1, len(sorted_values) * pct // 100)]
