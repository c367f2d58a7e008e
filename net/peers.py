"""Signed peer records and the table of known peers with their health.

A peer record ``{node id, url, last seen}`` is signed by the node it names,
so a relay can spread it but not forge it.  But anyone can sign a record
naming any URL with a fresh key, so a record only says where a node claims to
be: it enters the table of peers (the nodes this one pushes to, pulls from
and relays) only once the node at that URL has proved the key by signing a
fresh challenge (``proof_bytes``).  Until then it waits among a bounded set of
candidates.  The table holds one peer per URL: a newer proven record for a
URL replaces the peer that held it.

Failing peers back off exponentially with jitter and are marked down; they
are retried, and only forgotten once their record is older than the TTL.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgpack
from tenacity import RetryCallState, wait_exponential_jitter

from crdt.keys import PUBLIC_LEN, SIGNATURE_LEN, SigningKey, is_weak_key, short_id, verify
from net.addresses import MAX_URL_LEN, parse_peer_url

RECORD_TAG = b"p2pex-peer-v1"
PROOF_TAG = b"p2pex-proof-v1"
NONCE_LEN = 32
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
    """``http://HOST:PORT`` and nothing else (see ``net.addresses``); never a wildcard host."""
    parsed = parse_peer_url(url)
    return parsed is not None and parsed.host not in ("0.0.0.0", "::")


def proof_bytes(nonce: bytes, url: str) -> bytes:
    """What a node signs to prove it holds its key and answers at ``url``."""
    packed: bytes = msgpack.packb([PROOF_TAG, nonce, url], use_bin_type=True)
    return packed


def prove(key: SigningKey, nonce: bytes, url: str) -> bytes:
    return key.sign(proof_bytes(nonce, url))


def check_proof(node_id: bytes, url: str, nonce: bytes, proof: Any) -> bool:
    return type(proof) is bytes and verify(node_id, proof, proof_bytes(nonce, url))


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
    offset_ms: int | None = None  # its wall clock minus ours, from the last call
    offset_at: float = 0.0  # monotonic seconds of that measurement
    behind: int | None = None  # entries we held that it lacked, at its last sync reply

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

    def fresh(self, record: PeerRecord, now_ms: int) -> bool:
        """Neither stale nor stamped in the future (such a record would never expire)."""
        return (record.node_id != self.self_id and now_ms - self.ttl_ms <= record.last_seen
                <= now_ms + MAX_RECORD_SKEW_MS)

    def offer(self, record: PeerRecord, now_ms: int) -> bool:
        """Admit or refresh a *proven* record; True when it is new or newer."""
        return self.admit(record, now_ms)[0]

    def admit(self, record: PeerRecord, now_ms: int) -> tuple[bool, list[bytes]]:
        """Admit a proven record: (admitted, node ids of the peers it displaced).

        One peer per URL: another node holding the record's URL is displaced.
        Stale or future records, and new nodes once the table is full, are refused."""
        if not self.fresh(record, now_ms):
            return False, []
        peer = self.peers.get(record.node_id)
        holder = self.by_url(record.url)
        displaced = [holder.record.node_id] if holder is not None and holder is not peer else []
        if peer is None and len(self.peers) - len(displaced) >= self.max_peers:
            return False, []
        if peer is not None and record.last_seen <= peer.record.last_seen:
            return False, []
        for nid in displaced:
            del self.peers[nid]
        if peer is None:
            self.peers[record.node_id] = Peer(record=record)
            return True, displaced
        if record.url != peer.record.url:
            peer.failures = 0
            peer.next_try = 0.0
        peer.record = record
        return True, displaced

    def refresh(self, record: PeerRecord, now_ms: int) -> bool:
        """A newer record of a known peer at the URL it proved: taken without a new proof."""
        peer = self.peers.get(record.node_id)
        if peer is None or record.url != peer.record.url or record.last_seen <= peer.record.last_seen:
            return False
        if not self.fresh(record, now_ms):
            return False
        peer.record = record
        return True

    def by_url(self, url: str) -> Peer | None:
        for p in self.peers.values():
            if p.record.url == url:
                return p
        return None

    def remove(self, node_id: bytes) -> bool:
        return self.peers.pop(node_id, None) is not None

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


#: Most unproven records waiting for a proof.
MAX_CANDIDATES = 256
#: Records remembered as failed, so that one relayed again is not dialed again at once.
MAX_COOLING = 4096


class Candidates:
    """Unproven records, one per URL, each waiting for its proof; bounded.

    A record whose proof failed (or whose URL was refused or unreachable)
    cools down before the same (node, URL) pair is tried again."""

    def __init__(self, *, max_candidates: int = MAX_CANDIDATES) -> None:
        self.max_candidates = max_candidates
        self.waiting: dict[str, PeerRecord] = {}  # url -> record
        self.trying: set[str] = set()  # urls with a proof under way
        self._cooling: dict[tuple[bytes, str], float] = {}  # (node id, url) -> monotonic time it may be retried

    def __len__(self) -> int:
        return len(self.waiting)

    def offer(self, record: PeerRecord, mono: float) -> bool:
        """Queue a record for its proof; False when it is cooling, its URL has a
        candidate of another node already, or the set is full."""
        until = self._cooling.get((record.node_id, record.url))
        if until is not None:
            if until > mono:
                return False
            del self._cooling[(record.node_id, record.url)]
        current = self.waiting.get(record.url)
        if current is not None:
            if current.node_id == record.node_id and record.last_seen > current.last_seen:
                self.waiting[record.url] = record
            return False
        if record.url in self.trying or len(self.waiting) >= self.max_candidates:
            return False
        self.waiting[record.url] = record
        return True

    def take(self, n: int) -> list[PeerRecord]:
        """Up to ``n`` records to prove now (oldest offers first); they leave the set."""
        out: list[PeerRecord] = []
        for url in list(self.waiting):
            if len(out) >= n:
                break
            out.append(self.waiting.pop(url))
            self.trying.add(url)
        return out

    def done(self, record: PeerRecord, mono: float, *, cool_s: float = 0.0) -> None:
        """A proof attempt ended; ``cool_s`` > 0 when it failed."""
        self.trying.discard(record.url)
        if cool_s > 0:
            if len(self._cooling) >= MAX_COOLING:
                for key in [k for k, t in self._cooling.items() if t <= mono] or list(self._cooling)[:MAX_COOLING // 4]:
                    del self._cooling[key]
            self._cooling[(record.node_id, record.url)] = mono + cool_s
