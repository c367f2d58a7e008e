"""Signed peer records and the table of known peers with their health.

A peer record ``{node id, url, last seen}`` is signed by the node it names,
so a relay can spread it but not forge it.  Failing peers back off
exponentially with jitter and are marked down; they are retried, and only
forgotten once their record is older than the TTL.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgpack
from tenacity import RetryCallState, wait_exponential_jitter

from crdt.keys import PUBLIC_LEN, SIGNATURE_LEN, SigningKey, is_weak_key, short_id, verify

RECORD_TAG = b"p2pex-peer-v1"
MAX_URL_LEN = 200
_backoff = wait_exponential_jitter(multiplier=0.25, max=15.0, jitter=0.25)


def backoff_seconds(failures: int) -> float:
    """Delay before retrying a peer after ``failures`` consecutive failures."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(failures, 1)
    return float(_backoff(state))


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRecord:
    node_id: bytes
    url: str
    last_seen: int  # ms, stamped by the node itself
    sig: bytes

    @staticmethod
    def signing_bytes(node_id: bytes, url: str, last_seen: int) -> bytes:
        packed: bytes = msgpack.packb([RECORD_TAG, node_id, url, last_seen], use_bin_type=True)
        return packed

    @classmethod
    def create(cls, key: SigningKey, url: str, now_ms: int) -> PeerRecord:
        sig = key.sign(cls.signing_bytes(key.public, url, now_ms))
        return cls(node_id=key.public, url=url, last_seen=now_ms, sig=sig)

    def to_wire(self) -> list[Any]:
        return [self.node_id, self.url, self.last_seen, self.sig]

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(self.to_wire(), use_bin_type=True)
        return packed

    @classmethod
    def from_wire(cls, raw: Any) -> PeerRecord | None:
        """A verified record, or None for anything malformed or badly signed."""
        if type(raw) is not list or len(raw) != 4:
            return None
        node_id, url, last_seen, sig = raw
        if (
            type(node_id) is not bytes or len(node_id) != PUBLIC_LEN
            or type(url) is not str or not 0 < len(url) <= MAX_URL_LEN
            or type(last_seen) is not int or not 0 <= last_seen < 1 << 63
            or type(sig) is not bytes or len(sig) != SIGNATURE_LEN
        ):
            return None
        if not url_ok(url) or is_weak_key(node_id):
            return None
        if not verify(node_id, sig, cls.signing_bytes(node_id, url, last_seen)):
            return None
        return cls(node_id=node_id, url=url, last_seen=last_seen, sig=sig)

    @classmethod
    def decode(cls, data: bytes) -> PeerRecord | None:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except Exception:
            return None
        return cls.from_wire(raw)


def url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:  # e.g. "http://[::1": a signed record must not crash the caller
        return False
    if parts.scheme != "http" or not host:
        return False
    return host not in ("0.0.0.0", "::")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


@dataclass(slots=True, kw_only=True)
class Peer:
    record: PeerRecord
    failures: int = 0
    next_try: float = 0.0  # monotonic seconds
    last_ok: float | None = None
    last_error: str = ""
    rtt_ms: float | None = None

    @property
    def state(self) -> str:
        if self.failures == 0:
            return "up" if self.last_ok is not None else "new"
        return "down"

    @property
    def short(self) -> str:
        return short_id(self.record.node_id)


#: Most peers a node tracks; records of unknown nodes beyond it are ignored.
MAX_PEERS = 256
#: How far ahead of our clock a record may be stamped.
MAX_RECORD_SKEW_MS = 60_000


class PeerTable:
    def __init__(self, self_id: bytes, *, ttl_ms: int, max_peers: int = MAX_PEERS) -> None:
        self.self_id = self_id
        self.ttl_ms = ttl_ms
        self.max_peers = max_peers
        self.peers: dict[bytes, Peer] = {}

    def offer(self, record: PeerRecord, now_ms: int) -> bool:
        """Add or refresh a verified record; True when it is new or newer.

        Stale records, records stamped in the future (they would never expire)
        and new nodes once the table is full are refused."""
        if (record.node_id == self.self_id or record.last_seen < now_ms - self.ttl_ms
                or record.last_seen > now_ms + MAX_RECORD_SKEW_MS):
            return False
        if record.node_id not in self.peers and len(self.peers) >= self.max_peers:
            return False
        peer = self.peers.get(record.node_id)
        if peer is None:
            self.peers[record.node_id] = Peer(record=record)
            return True
        if record.last_seen > peer.record.last_seen:
            if record.url != peer.record.url:
                peer.failures = 0
                peer.next_try = 0.0
            peer.record = record
            return True
        return False

    def expire(self, now_ms: int) -> list[bytes]:
        gone = [nid for nid, p in self.peers.items() if p.record.last_seen < now_ms - self.ttl_ms]
        for nid in gone:
            del self.peers[nid]
        return gone

    def ready(self, mono: float) -> list[Peer]:
        """Peers that may be called now (up, new, or down with backoff elapsed)."""
        return [p for p in self.peers.values() if p.next_try <= mono]

    def ok(self, peer: Peer, mono: float, rtt_ms: float) -> None:
        peer.failures = 0
        peer.next_try = 0.0
        peer.last_ok = mono
        peer.last_error = ""
        peer.rtt_ms = rtt_ms

    def failed(self, peer: Peer, mono: float, error: str) -> None:
        peer.failures += 1
        peer.last_error = error
        peer.next_try = mono + backoff_seconds(peer.failures)

    def records(self) -> list[PeerRecord]:
        return [p.record for p in self.peers.values()]
