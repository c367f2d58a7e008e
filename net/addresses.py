"""Where a node may send requests: the shape of a peer URL, and the kinds of
address it may resolve to.

A peer URL is ``http://HOST:PORT`` and nothing else: no user info, path,
query or fragment, so a signed record cannot aim a node's POSTs at some other
service's endpoint.  Its host is resolved with ``getaddrinfo`` (which also
reads the legacy forms ``127.1``, ``2130706433``, ``0x7f000001`` and
``0177.0.0.1``), off the event loop, and every address it resolves to is
classified with ``ipaddress``.  Public addresses are always allowed;
loopback, private and link-local ones only when the node itself runs on that
kind of network (the ``auto`` policy, from the node's own URL) or when the
operator lists them; cloud metadata, unspecified, multicast and reserved
addresses never.

The same check runs in the resolver of the node's HTTP client
(``PeerResolver``), so a name that resolves to an allowed address when a
record is checked and to a refused one when it is dialed is still refused.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from net.threads import off_loop

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PUBLIC = "public"
PRIVATE = "private"
LOOPBACK = "loopback"
LINK_LOCAL = "link_local"
#: Kinds an operator may allow (``--peer-networks``).
KINDS = (PUBLIC, PRIVATE, LOOPBACK, LINK_LOCAL)
#: Kinds never dialed.
METADATA = "metadata"
NEVER = frozenset({METADATA, "unspecified", "multicast", "reserved"})

#: Instance metadata services (AWS, GCP and Azure share the IPv4 one; AWS's IPv6; Alibaba's).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200"))

MAX_URL_LEN = 200
_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$")


def classify(ip: IPAddress) -> str:
    """The kind of an address: public, private, loopback, link_local, or one never dialed."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return METADATA
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_link_local:
        return LINK_LOCAL
    if ip.is_multicast:
        return "multicast"
    if ip.is_global:
        return PUBLIC
    if ip.is_reserved:
        return "reserved"
    return PRIVATE  # RFC 1918, unique local, shared (CGNAT), documentation and other non-global ranges


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerUrl:
    host: str  # lower case; an IPv6 literal without brackets
    port: int


def parse_peer_url(url: str) -> PeerUrl | None:
    """``http://HOST:PORT`` with an explicit port and nothing else, or None."""
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_LEN or not url.isascii():
        return None
    if any(c in url for c in "@?#\\ \t\r\n") or not url.startswith("http://"):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme != "http" or parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    if port is None or not 0 < port < 65536 or not host:
        return None
    netloc = parts.netloc
    if netloc.startswith("["):
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                return None
        except ValueError:
            return None
    elif not _NAME.match(host):
        return None
    return PeerUrl(host=host, port=port)


def literal(host: str) -> IPAddress | None:
    """The address a host spells out in standard notation, or None (a name, or a legacy numeric form)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (blocking: call it in an executor)."""
    out: list[IPAddress] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if ip not in out:
                out.append(ip)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressPolicy:
    """The kinds of address a node may dial."""

    allowed: frozenset[str]

    def allows(self, ip: IPAddress) -> bool:
        return classify(ip) in self.allowed

    def refusal(self, ips: list[IPAddress]) -> str | None:
        """Why these addresses may not be dialed, or None when all may be."""
        for ip in ips:
            kind = classify(ip)
            if kind not in self.allowed:
                return f"{ip} is a {kind.replace('_', '-')} address"
        return None

    @classmethod
    def own_network(cls, own: list[IPAddress]) -> AddressPolicy:
        """``auto``: public addresses, plus the kinds of the node's own addresses
        (a node on 127.0.0.1 may dial loopback peers, one on 10.x private ones)."""
        return cls(allowed=frozenset({PUBLIC} | {classify(ip) for ip in own}) - NEVER)

    @classmethod
    def listed(cls, kinds: tuple[str, ...]) -> AddressPolicy:
        return cls(allowed=frozenset(kinds) - NEVER)


def parse_networks(text: str) -> tuple[str, ...] | None:
    """``--peer-networks``: ``auto`` (None) or a comma-separated list of kinds."""
    value = text.strip().lower().replace("-", "_")
    if value in ("", "auto"):
        return None
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown network kind {', '.join(bad) or text!r}: use auto or a list of "
                         f"{', '.join(k.replace('_', '-') for k in KINDS)}")
    return kinds


class AddressGuard:
    """Checks a peer URL before the node dials it; resolutions are cached for
    ``ttl_s`` and looked up in a daemon thread (``net.threads``), never on the loop."""

    def __init__(self, policy: AddressPolicy, *, ttl_s: float = 30.0, max_cached: int = 4096,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.ttl_s = ttl_s
        self.max_cached = max_cached
        self.monotonic = monotonic
        self._cache: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}

    def refusal_now(self, url: str) -> str | None:
        """What can be told without resolving: the URL's shape and a literal address."""
        parsed = parse_peer_url(url)
        if parsed is None:
            return "not an http://HOST:PORT URL"
        ip = literal(parsed.host)
        return None if ip is None else self.policy.refusal([ip])

    async def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be dialed, or None.  Raises OSError when its host
        does not resolve (a connectivity failure, not a refusal)."""
        parsed = parse_peer_url(url)
        if parsed is None:
            return "not an http://HOST:PORT URL"
        ip = literal(parsed.host)
        if ip is not None:
            return self.policy.refusal([ip])
        key = (parsed.host, parsed.port)
        now = self.monotonic()
        hit = self._cache.get(key)
        if hit is None or hit[0] < now:
            ips = await off_loop(resolve, parsed.host, parsed.port)
            if len(self._cache) >= self.max_cached:
                self._cache.clear()
            self._cache[key] = (now + self.ttl_s, ips)
        else:
            ips = hit[1]
        if not ips:
            raise OSError(f"{parsed.host} resolves to no address")
        return self.policy.refusal(ips)


class PeerResolver(AbstractResolver):
    """aiohttp's threaded resolver, less the addresses the guard's policy
    refuses, and with its lookups in daemon threads (``net.threads``): the
    loop's executor threads are waited for at exit, and a lookup stuck on a
    name server that does not answer kept a stopped node alive."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        infos = await off_loop(socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
        kept: list[ResolveResult] = []
        for fam, _, proto, _, sockaddr in infos:
            if fam not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = str(sockaddr[0])  # a scoped IPv6 address keeps its "%zone"
            if self._guard.policy.allows(ipaddress.ip_address(address.split("%", 1)[0])):
                kept.append(ResolveResult(hostname=host, host=address, port=int(sockaddr[1]), family=fam, proto=proto,
                                          flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not kept:
            raise OSError(f"{host} resolves only to addresses this node does not dial")
        return kept

    async def close(self) -> None:
        pass


__all__ = ["AddressGuard", "AddressPolicy", "PeerResolver", "PeerUrl", "classify", "parse_peer_url"]
