"""Free port numbers on 127.0.0.1 for local networks (the demo and the tests).

A port handed out here is bound by a node process a moment later.  Port 0
would let the kernel choose, but the kernel picks from its ephemeral range,
and that is where every outgoing connection takes its source port: in the
time between the check and the node's bind, a client connection of another
process can take the number, and the node then fails with "address already in
use".  So numbers come from below the ephemeral range (Linux's
``ip_local_port_range``), where no outgoing connection lands, starting at a
point drawn per process so that processes running side by side (parallel
test workers, two demos) scan different stretches.  Each number is checked
free for both TCP (HTTP) and UDP (the DHT, same number) before it is handed
out.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

HOST = "127.0.0.1"
#: The lowest number handed out, above the registered ports that services usually take.
LOW = 20_000
#: Where the kernel's ephemeral range starts when it cannot be read (Linux's default).
EPHEMERAL_DEFAULT = 32_768
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
ATTEMPTS = 500

_rng = random.SystemRandom()  # drawn from the OS: a forked child does not repeat its parent's start
_cursor: dict[int, int] = {}  # pid -> next number to try (a forked child draws its own start)


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range."""
    try:
        return int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_DEFAULT


def _bindable(port: int) -> bool:
    """Whether ``port`` is free for TCP and for UDP on HOST right now."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, port))
    except OSError:
        return False
    return True


def _kernel_choice(taken: set[int]) -> int:
    """A port the kernel picks (where there is no room below the ephemeral range)."""
    for _ in range(ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = int(tcp.getsockname()[1])
        if port not in taken and _bindable(port):
            taken.add(port)
            return port
    raise OSError("no port free for both TCP and UDP on 127.0.0.1")


def free_port(taken: set[int]) -> int:
    """A port number free for both TCP (HTTP) and UDP (the DHT, same number),
    below the ephemeral range; records it in ``taken``, so one caller never
    gets a number twice."""
    high = ephemeral_start()
    span = high - LOW
    if span < 100:
        return _kernel_choice(taken)
    pid = os.getpid()
    cursor = _cursor.get(pid)
    if cursor is None:
        cursor = LOW + _rng.randrange(span)
    for _ in range(ATTEMPTS):
        port = cursor
        cursor = LOW + (cursor + 1 - LOW) % span
        if port not in taken and _bindable(port):
            _cursor[pid] = cursor
            taken.add(port)
            return port
    _cursor[pid] = cursor
    raise OSError("no port free for both TCP and UDP on 127.0.0.1")


def percentile(sorted_values: list[int], pct: int) -> int:
    """The ``pct``-th percentile (nearest rank) of an ascending, non-empty list."""
    return sorted_values[min(len(sorted_values) - 1, len(sorted_values) * pct // 100)]
