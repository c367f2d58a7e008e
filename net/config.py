"""Node settings: defaults, and parsing of host:port values."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from net.ratelimit import Rate

DEFAULT_RATE = Rate(per_s=5000, burst=10000)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 7001
    dht_port: int | None = None  # default: same number as the HTTP port (UDP)
    data_dir: Path = Path("data/node")
    bootstrap: tuple[tuple[str, int], ...] = ()
    advertise: str | None = None  # HOST or HOST:PORT peers should dial
    name: str = "node"
    trading: bool = True  # False: a seed node (DHT rendezvous and relay, no client writes)
    pull_interval: float = 0.5
    peer_timeout: float = 2.0
    peer_ttl_ms: int = 10 * 60 * 1000
    publish_interval: float = 2.0
    max_skew_ms: int = 5_000
    peer_networks: tuple[str, ...] | None = None  # kinds of address peers may have; None: auto
    max_connections: int = 1000
    header_timeout: float = 10.0  # seconds for a request head, from its first byte
    body_timeout: float = 30.0  # seconds for a request body
    keepalive_timeout: float = 30.0  # seconds an idle connection is kept
    max_receiving: int = 64 * 1024 * 1024  # bytes of request bodies being received at once
    write_limit: Rate | None = DEFAULT_RATE  # per client token; None: no limit
    read_limit: Rate | None = DEFAULT_RATE  # per client address
    peer_limit: Rate | None = DEFAULT_RATE  # per peer address
    ready_timeout: float = 3.0  # seconds to find a live peer to sync with before declaring "alone"
    genesis: bool = False  # found a new network even with bootstrap addresses (only with no state yet)
    member: bool = False  # ask the members to admit this node to the committee (else: a participant)
    max_members: int = 7  # a member votes to admit no one while the committee has this many
    evict_after: float = 10.0  # seconds of silence before the members vote a member out
    suspect_after: float = 1.0  # seconds a member may hold records back without writing before that vote
    heartbeat_ms: int = 50  # spacing of the entries that move finality while something is not final
    clock_offset_ms: int = 0  # added to the wall clock (tests that skew clocks)
    max_clock_offset_ms: int = 1_000  # off the peers' median by more than this: refuse orders
    max_loop_lag_ms: int = 500  # event loop later than this: refuse new orders and cancels (503 busy)
    max_foreign_origins: int = 1_000  # origins held that are not members
    grapes: tuple[str, ...] = ()  # Grenache grape URLs to announce on (none: no Grenache)
    grenache_service: str = "exchange_service"  # the service name announced and answered

    @property
    def udp_port(self) -> int:
        return self.port if self.dht_port is None else self.dht_port


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (or ``HOST`` with a default port; ``[v6]:PORT`` too)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, ""
    if not host:
        raise ValueError(f"no host in {value!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"no port in {value!r} (expected HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_text)


def resolve_udp(host: str, port: int) -> list[tuple[str, int]]:
    """IP addresses for a host name (the DHT library needs IPs); blocking."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    out: list[tuple[str, int]] = []
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET:
            addr = (str(sockaddr[0]), int(sockaddr[1]))
            if addr not in out:
                out.append(addr)
    return out
