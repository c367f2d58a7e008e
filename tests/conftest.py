"""Shared helpers for the pure-core tests: fixed keys, fixed clock, log builders,
workload strategies and snapshots.

Everything is deterministic: keys come from fixed seeds, time from the fixed
``NOW_MS``, and every hypothesis test runs derandomized with no example
database (see ``prop``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from hashlib import blake2b
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from crdt.entry import (
    BUY,
    GENESIS,
    GTC,
    IOC,
    NO_ACK,
    SELL,
    Ack,
    Admit,
    Body,
    Cancel,
    Entry,
    Heartbeat,
    Order,
    entry_hash,
    make_entry,
)
from crdt.hlc import Hlc
from crdt.keys import SigningKey
from crdt.replica import Replica
from matching.engine import Engine

#: The fixed "wall clock" of every test (2023-11-14T22:13:20Z).  Never the real clock.
NOW_MS = 1_700_000_000_000
#: Entries of generated workloads are stamped from here on, well inside the skew bound.
BASE_MS = NOW_MS - 60_000


def prop(max_examples: int) -> settings:
    """Hypothesis settings: derandomized (a fixed seed per test), no database, no deadline."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@cache
def key_for(i: int) -> SigningKey:
    """The i-th test identity, from a fixed seed."""
    return SigningKey(blake2b(f"p2pex test key {i}".encode(), digest_size=32).digest())


def signed_entry(key: SigningKey, *, seq: int, hlc: int, prev: bytes, body: Body, ack: Ack = NO_ACK) -> Entry:
    """A correctly hashed and signed entry, *without* the range checks of
    ``make_entry``: lets a test build an entry whose only fault is the one under test."""
    h = entry_hash(key.public, seq, hlc, prev, body, ack)
    return Entry(origin=key.public, seq=seq, hlc=hlc, prev=prev, body=body, sig=key.sign(h), hash=h, ack=ack)


class LogBuilder:
    """Builds one origin's valid log: seq 1, 2, ...; hash chain; strictly increasing HLC."""

    def __init__(self, key: SigningKey, *, start_ms: int = BASE_MS) -> None:
        self.key = key
        self.hlc = Hlc()
        self.ms = start_ms
        self.entries: list[Entry] = []
        self.orders: list[bytes] = []  # hashes of this origin's orders, oldest first

    @property
    def origin(self) -> bytes:
        return self.key.public

    @property
    def next_seq(self) -> int:
        return len(self.entries) + 1

    @property
    def prev(self) -> bytes:
        return self.entries[-1].hash if self.entries else GENESIS

    @property
    def last_hlc(self) -> int:
        return self.entries[-1].hlc if self.entries else 0

    def append(self, body: Body, *, ms: int | None = None) -> Entry:
        if ms is not None:
            self.ms = ms
        e = make_entry(self.key, seq=self.next_seq, hlc=self.hlc.now(self.ms), prev=self.prev, body=body)
        self.entries.append(e)
        if isinstance(body, Order):
            self.orders.append(e.hash)
        return e

    def order(
        self, side: int, price: int, qty: int, *, tif: int = GTC, ms: int | None = None
    ) -> Entry:
        return self.append(Order(side=side, price=price, qty=qty, tif=tif), ms=ms)

    def market(self, side: int, qty: int, *, ms: int | None = None) -> Entry:
        return self.append(Order(side=side, price=0, qty=qty, tif=IOC, market=True), ms=ms)

    def cancel(self, order_id: bytes, *, ms: int | None = None) -> Entry:
        return self.append(Cancel(order_id=order_id), ms=ms)

    def heartbeat(self, *, ms: int | None = None) -> Entry:
        return self.append(Heartbeat(), ms=ms)

    def crafted(
        self, body: Body, *, seq: int | None = None, hlc: int | None = None, prev: bytes | None = None
    ) -> Entry:
        """The next entry with any field overridden, validly signed, *not* appended."""
        return signed_entry(
            self.key,
            seq=self.next_seq if seq is None else seq,
            hlc=self.last_hlc + 1 if hlc is None else hlc,
            prev=self.prev if prev is None else prev,
            body=body,
        )


# ---- generated workloads ------------------------------------------------------

OP_KINDS = ("gtc", "gtc", "gtc", "ioc", "market", "cancel", "heartbeat")


@dataclass(frozen=True)
class Op:
    """One step of a generated multi-origin workload."""

    origin: int
    kind: str
    side: int
    price: int
    qty: int
    pick: int  # which earlier own order a cancel targets (modulo their count)
    dt: int  # milliseconds the shared clock advances before this op


def ops(n_origins: int, *, min_size: int = 0, max_size: int = 30) -> st.SearchStrategy[list[Op]]:
    """Operations by ``n_origins`` origins; prices in a narrow band so orders cross."""
    op = st.builds(
        Op,
        origin=st.integers(0, n_origins - 1),
        kind=st.sampled_from(OP_KINDS),
        side=st.sampled_from((BUY, SELL)),
        price=st.integers(97, 103),
        qty=st.integers(1, 8),
        pick=st.integers(0, 1_000),
        dt=st.sampled_from((0, 0, 1, 2, 5)),
    )
    return st.lists(op, min_size=min_size, max_size=max_size)


def build_logs(n_origins: int, steps: Sequence[Op], *, key_offset: int = 0,
               members: bool = False) -> list[LogBuilder]:
    """Turn ops into one valid log per origin.  A shared clock advances by ``dt``;
    every origin has its own HLC, so stamps of different origins can tie (then the
    entry hash breaks the tie).  With ``members`` the first origin founds a
    network and admits the others first (see ``genesis_of``), so that their
    entries are matched."""
    logs = [LogBuilder(key_for(key_offset + i)) for i in range(n_origins)]
    if members:
        admit_all(logs, ms=BASE_MS - 1_000)
    ms = BASE_MS
    for s in steps:
        ms += s.dt
        log = logs[s.origin]
        if s.kind == "gtc":
            log.order(s.side, s.price, s.qty, ms=ms)
        elif s.kind == "ioc":
            log.order(s.side, s.price, s.qty, tif=IOC, ms=ms)
        elif s.kind == "market":
            log.market(s.side, s.qty, ms=ms)
        elif s.kind == "cancel" and log.orders:
            log.cancel(log.orders[s.pick % len(log.orders)], ms=ms)
        else:
            log.heartbeat(ms=ms)
    return logs


def admit_all(logs: Sequence[LogBuilder], *, ms: int) -> None:
    """The first log founds a network (its genesis ``Admit`` of itself) and the
    others are admitted one by one: admission is a majority decision, so the
    first half-plus-one of the members so far each vote for the next (one
    millisecond later each round, so that a fresh member's vote lies after its
    admission); nothing else is written yet."""
    founder = logs[0]
    assert not founder.entries
    founder.append(Admit(member=founder.origin, after=1), ms=ms)
    for j, other in enumerate(logs[1:], start=1):
        for voter in logs[:j // 2 + 1]:
            voter.append(Admit(member=other.origin, after=0), ms=ms + j)


def genesis_of(logs: Sequence[LogBuilder]) -> bytes:
    """The network id of logs built with ``members=True``."""
    return logs[0].entries[0].hash


# ---- snapshots ----------------------------------------------------------------


def replica_snapshot(r: Replica) -> tuple[Any, ...]:
    """Everything observable about a replica's merged state."""
    return (
        r.state_hash(),
        r.version_vector(),
        r.entries(),
        r.buffered(),
        sorted(r.evidence()),
    )


def engine_view(engine: Engine, order_ids: Sequence[Any] = ()) -> tuple[Any, ...]:
    """Book, fills (also as msgpack bytes) and order states of an engine."""
    fills = list(engine.fills)
    return (
        engine.depth(1_000),
        engine.resting(BUY),
        engine.resting(SELL),
        fills,
        msgpack.packb(fills, use_bin_type=True),
        [engine.status(oid) for oid in order_ids],
    )
