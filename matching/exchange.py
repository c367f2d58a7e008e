"""The sans-I/O node core: one replica, one own log, one engine.

Owns turning entries into engine records, submitting the node's own orders
and cancels, merging received entries and keeping the engine in step with
the replica.  The shell supplies the wall clock (milliseconds) on each call
and carries out persistence and replication of what comes back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import blake2b

from crdt.entry import GENESIS, Body, Cancel, Entry, Heartbeat, Order, make_entry
from crdt.errors import ExchangeError, ForeignCancel
from crdt.hlc import MAX_HLC, Hlc
from crdt.keys import SigningKey
from crdt.replica import MergeResult, Replica
from matching.engine import (
    BUY,
    CANCEL,
    GTC,
    IOC,
    MARKET,
    NOOP,
    SELL,
    Engine,
    Fill,
    OrderStatus,
    Record,
    Revision,
    RewindTooFar,
)

#: Checkpoints kept for late arrivals; older late entries rebuild the engine.
KEEP_CHECKPOINTS = 200_000


class UnknownOrder(ExchangeError):
    code = "unknown_order"


class NotCancellable(ExchangeError):
    code = "not_cancellable"


def record_of(entry: Entry) -> Record:
    body = entry.body
    if isinstance(body, Order):
        kind = MARKET if body.market else (IOC if body.tif == IOC else GTC)
        return (entry.key, kind, entry.hash, body.side, body.price, body.qty)
    if isinstance(body, Cancel):
        return (entry.key, CANCEL, body.order_id, 0, 0, 0)
    return (entry.key, NOOP, entry.hash, 0, 0, 0)


def fill_id(fill: Fill) -> str:
    """Deterministic id of a fill: one fill per (taker, maker) pair."""
    return blake2b(fill[0] + fill[1], digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Submitted:
    entry: Entry
    status: OrderStatus | None
    fills: tuple[Fill, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    merge: MergeResult
    revisions: tuple[Revision, ...]
    rebuilt: bool


class Exchange:
    def __init__(self, key: SigningKey, *, max_skew_ms: int = 5_000) -> None:
        self.key = key
        self.node_id = key.public
        self.replica = Replica(max_skew_ms=max_skew_ms)
        self.hlc = Hlc()
        self.engine = Engine()
        self.rebuilds = 0
        self.own_orders = 0  # orders and cancels in this node's own log
        self.own_cancels = 0

    # ---- writing -----------------------------------------------------

    def submit(self, body: Body, *, now_ms: int) -> Submitted:
        """Append a body to this node's own log and apply it (no storage in between)."""
        return self.apply_own(self.prepare(body, now_ms=now_ms), now_ms=now_ms)

    def prepare(self, body: Body, *, now_ms: int) -> Entry:
        """Validate a body and sign it as the next entry of our log, changing no
        state but the clock: the shell commits the entry, then calls ``apply_own``."""
        if isinstance(body, Cancel):
            if self.replica.order_origin(body.order_id) is None:
                raise UnknownOrder(f"no order {body.order_id.hex()}")
            if self.replica.order_origin(body.order_id) != self.node_id:
                raise ForeignCancel("only the node that placed an order can cancel it")
            status = self.engine.status(body.order_id)
            if status is None or status.remaining == 0:
                raise NotCancellable(f"order {body.order_id.hex()} is no longer resting")
        head = self.replica.head(self.node_id)
        return make_entry(
            self.key,
            seq=head.seq + 1 if head else 1,
            hlc=self.hlc.now(now_ms),
            prev=head.hash if head else GENESIS,
            body=body,
        )

    def apply_own(self, entry: Entry, *, now_ms: int) -> Submitted:
        n_fills = len(self.engine.fills)
        result = self.receive([entry], now_ms=now_ms, trusted=True)
        if not result.merge.accepted:
            raise result.merge.rejected[0].error
        body = entry.body
        target = body.order_id if isinstance(body, Cancel) else entry.hash
        # an own entry carries the newest stamp, so its fills are the tail
        fills = tuple(self.engine.fills[n_fills:])
        return Submitted(entry=entry, status=self.engine.status(target), fills=fills)

    def heartbeat(self, *, now_ms: int) -> Entry:
        return self.submit(Heartbeat(), now_ms=now_ms).entry

    def restore(self, entries: Iterable[Entry]) -> Received:
        """Load entries from local storage: verified when first accepted, and
        exempt from the clock-skew bound (the clock may have stepped back since)."""
        return self.receive(entries, now_ms=MAX_HLC, trusted=True)

    def receive(self, entries: Iterable[Entry], *, now_ms: int, trusted: bool = False) -> Received:
        merge = self.replica.receive(entries, now_ms=now_ms, trusted=trusted)
        if not merge.accepted:
            return Received(merge=merge, revisions=(), rebuilt=False)
        for e in merge.accepted:
            if e.origin == self.node_id:
                if isinstance(e.body, Order):
                    self.own_orders += 1
                elif isinstance(e.body, Cancel):
                    self.own_cancels += 1
        self.hlc.observe(max(e.hlc for e in merge.accepted))
        recs = sorted((record_of(e) for e in merge.accepted), key=lambda r: r[0])
        try:
            revisions = tuple(self.engine.add_many(recs))
        except RewindTooFar:
            self._rebuild()
            return Received(merge=merge, revisions=(), rebuilt=True)
        if self.engine.checkpoints() > KEEP_CHECKPOINTS * 5 // 4:
            self.engine.compact(KEEP_CHECKPOINTS)
        return Received(merge=merge, revisions=revisions, rebuilt=False)

    def _rebuild(self) -> None:
        self.rebuilds += 1
        engine = Engine()
        engine.add_many(sorted((record_of(e) for e in self.replica.entries()), key=lambda r: r[0]))
        self.engine = engine

    # ---- reading -----------------------------------------------------

    def status(self, order_id: bytes) -> OrderStatus | None:
        return self.engine.status(order_id)

    def owner(self, order_id: bytes) -> bytes | None:
        return self.replica.order_origin(order_id)

    def state_hash(self) -> bytes:
        return self.replica.state_hash()

    def book_hash(self) -> bytes:
        """Digest of the fills and the resting book: equal on replicas that matched alike."""
        engine = self.engine
        h = blake2b(digest_size=32)
        for taker, maker, price, qty in engine.fills:
            h.update(b"F%s%s%d:%d;" % (taker, maker, price, qty))
        for side in (BUY, SELL):
            for price, oid, remaining in engine.resting(side):
                h.update(b"R%d:%s%d:%d;" % (side, oid, price, remaining))
        return h.digest()
