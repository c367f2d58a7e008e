"""The node core (replica + engine): replicas fed the same entries through drops,
duplicates, reorders and gaps converge to the same state, book and fills byte
for byte; submitting and cancelling; the rebuild path."""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import matching.exchange as exchange_mod
from crdt.entry import BUY, IOC, SELL, Cancel, Entry, Heartbeat, Order
from crdt.errors import ForeignCancel
from crdt.hlc import physical_ms
from matching.engine import CANCELLED, FILLED, OPEN, PARTIAL, Revision
from matching.exchange import Exchange, NotCancellable, Received, UnknownOrder, fill_id, record_of
from tests.conftest import NOW_MS, LogBuilder, Op, build_logs, engine_view, key_for, ops, prop
from tests.reference_matcher import reference

OBSERVER_KEYS = 100  # observers get keys far from the origins' ones


def all_entries(logs: Sequence[LogBuilder]) -> list[Entry]:
    return [e for lg in logs for e in lg.entries]


def order_ids(entries: Sequence[Entry]) -> list[bytes]:
    return [e.hash for e in entries if isinstance(e.body, Order)]


def unreliable_delivery(ex: Exchange, entries: Sequence[Entry], rng: random.Random) -> list[Received]:
    """Deliver in random batches and order: ~20% dropped and redelivered at the end,
    ~15% duplicated into a later batch; gaps make the replica buffer."""
    pending = list(entries)
    rng.shuffle(pending)
    later: list[Entry] = []
    out: list[Received] = []
    while pending:
        k = rng.randint(1, 6)
        batch, pending = pending[:k], pending[k:]
        sent: list[Entry] = []
        for e in batch:
            roll = rng.random()
            if roll < 0.2:
                later.append(e)
                continue
            sent.append(e)
            if roll > 0.85:
                pending.insert(rng.randint(0, len(pending)), e)
        rng.shuffle(sent)
        out.append(ex.receive(sent, now_ms=NOW_MS))
    rng.shuffle(later)
    while later:
        k = rng.randint(1, 4)
        batch, later = later[:k], later[k:]
        out.append(ex.receive(batch, now_ms=NOW_MS))
    return out


def full_view(ex: Exchange, oids: Sequence[bytes]) -> tuple[object, ...]:
    return (ex.state_hash(), ex.replica.version_vector(), ex.replica.entries(), *engine_view(ex.engine, oids))


class TestConvergence:
    @given(
        n_origins=st.integers(2, 4),
        n_replicas=st.integers(2, 10),
        data=st.data(),
    )
    @prop(80)
    def test_replicas_converge_through_drops_duplicates_and_reorders(
        self, n_origins: int, n_replicas: int, data: st.DataObject
    ) -> None:
        steps: list[Op] = data.draw(ops(n_origins, min_size=12, max_size=50), label="ops")
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        logs = build_logs(n_origins, steps)
        entries = all_entries(logs)
        oids = order_ids(entries)

        # the ground truth: one replica that got everything in log order, in one batch
        truth = Exchange(key_for(OBSERVER_KEYS))
        result = truth.receive(entries, now_ms=NOW_MS)
        assert len(result.merge.accepted) == len(entries) and not result.merge.rejected
        want = full_view(truth, oids)
        ref = reference([record_of(e) for e in entries])
        assert truth.engine.fills == ref.fills

        rng = random.Random(seed)
        for i in range(n_replicas):
            ex = Exchange(key_for(OBSERVER_KEYS + 1 + i))
            received = unreliable_delivery(ex, entries, rng)
            assert all(not r.merge.rejected for r in received)
            assert ex.replica.buffered() == 0
            assert full_view(ex, oids) == want
            ex.engine.check_invariants()
            # nothing left to learn: a full redelivery is all duplicates
            again = ex.receive(entries, now_ms=NOW_MS)
            assert not again.merge.accepted and again.merge.duplicates == len(entries)
            assert msgpack.packb(ex.engine.fills) == msgpack.packb(ref.fills)

    def test_late_entry_rewinds_and_reports_revised_fills(self) -> None:
        a, b, c = (LogBuilder(key_for(i)) for i in range(3))
        ask = a.order(SELL, 100, 1, ms=NOW_MS - 30)
        early_bid = b.order(BUY, 101, 1, ms=NOW_MS - 20)
        late_bid = c.order(BUY, 100, 1, ms=NOW_MS - 10)
        ex = Exchange(key_for(OBSERVER_KEYS))
        ex.receive([ask, late_bid], now_ms=NOW_MS)
        assert ex.engine.fills == [(late_bid.hash, ask.hash, 100, 1)]
        got = ex.receive([early_bid], now_ms=NOW_MS)
        assert got.revisions == (Revision(revoked=((late_bid.hash, ask.hash, 100, 1),),
                                          added=((early_bid.hash, ask.hash, 100, 1),)),)
        assert not got.rebuilt
        status = ex.status(late_bid.hash)
        assert status is not None and status.state == OPEN


class TestRebuild:
    @pytest.mark.parametrize("keep", [0, 1, 3])
    @given(steps=ops(3, min_size=10, max_size=40), seed=st.integers(0, 2**32 - 1))
    @prop(25)
    def test_tiny_checkpoint_window_rebuilds_to_the_same_state(
        self, keep: int, steps: list[Op], seed: int
    ) -> None:
        logs = build_logs(3, steps)
        entries = all_entries(logs)
        oids = order_ids(entries)
        truth = Exchange(key_for(OBSERVER_KEYS))
        truth.receive(entries, now_ms=NOW_MS)
        ex = Exchange(key_for(OBSERVER_KEYS + 1))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(exchange_mod, "KEEP_CHECKPOINTS", keep)
            unreliable_delivery(ex, entries, random.Random(seed))
            assert ex.engine.checkpoints() <= max(keep * 5 // 4, len(entries))
        assert full_view(ex, oids) == full_view(truth, oids)
        assert ex.engine.fills == reference([record_of(e) for e in entries]).fills

    def test_late_entry_below_the_window_rebuilds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(exchange_mod, "KEEP_CHECKPOINTS", 2)
        a, b = LogBuilder(key_for(0)), LogBuilder(key_for(1))
        old_ask = a.order(SELL, 99, 1, ms=NOW_MS - 100)
        for i in range(6):
            b.order(SELL, 101 + i, 1, ms=NOW_MS - 50 + i)
        bid = b.order(BUY, 101, 1, ms=NOW_MS - 10)
        ex = Exchange(key_for(OBSERVER_KEYS))
        ex.receive(b.entries, now_ms=NOW_MS)
        assert ex.engine.fills == [(bid.hash, b.entries[0].hash, 101, 1)]
        assert ex.engine.checkpoints() <= 2 * 5 // 4 + 1
        got = ex.receive([old_ask], now_ms=NOW_MS)
        assert got.rebuilt and ex.rebuilds == 1 and got.revisions == ()
        assert ex.engine.fills == [(bid.hash, old_ask.hash, 99, 1)]
        ex.engine.check_invariants()


class TestSubmit:
    def test_submit_returns_status_and_immediate_fills(self) -> None:
        alice, bob = Exchange(key_for(0)), Exchange(key_for(1))
        ask = alice.submit(Order(side=SELL, price=100, qty=10), now_ms=NOW_MS)
        assert ask.fills == ()
        assert ask.status is not None and (ask.status.state, ask.status.remaining) == (OPEN, 10)
        assert ask.entry.seq == 1 and ask.entry.origin == alice.node_id
        assert physical_ms(ask.entry.hlc) == NOW_MS

        bob.receive([ask.entry], now_ms=NOW_MS + 1)
        bid = bob.submit(Order(side=BUY, price=101, qty=4), now_ms=NOW_MS + 1)
        assert bid.fills == ((bid.entry.hash, ask.entry.hash, 100, 4),)
        assert bid.status is not None and (bid.status.state, bid.status.filled) == (FILLED, 4)
        maker = bob.status(ask.entry.hash)
        assert maker is not None and (maker.state, maker.remaining) == (PARTIAL, 6)
        assert bob.owner(ask.entry.hash) == alice.node_id
        assert len(fill_id(bid.fills[0])) == 32

        ioc = bob.submit(Order(side=BUY, price=100, qty=9, tif=IOC), now_ms=NOW_MS + 1)
        assert ioc.fills == ((ioc.entry.hash, ask.entry.hash, 100, 6),)
        assert ioc.status is not None and (ioc.status.state, ioc.status.filled) == (CANCELLED, 6)
        assert ioc.entry.hlc > bid.entry.hlc  # same millisecond: the counter moves on

        alice.receive([bid.entry, ioc.entry], now_ms=NOW_MS + 2)
        assert alice.engine.fills == bob.engine.fills and alice.state_hash() == bob.state_hash()

    def test_market_order_on_an_empty_book(self) -> None:
        """Regression (engine ``KeyError``): a market buy with no asks must expire, not crash."""
        ex = Exchange(key_for(0))
        for side in (BUY, SELL):
            got = ex.submit(Order(side=side, price=0, qty=3, tif=IOC, market=True), now_ms=NOW_MS)
            assert got.fills == ()
            assert got.status is not None and (got.status.state, got.status.filled) == (CANCELLED, 0)

    def test_cancel_own_order(self) -> None:
        ex = Exchange(key_for(0))
        placed = ex.submit(Order(side=BUY, price=100, qty=5), now_ms=NOW_MS)
        done = ex.submit(Cancel(order_id=placed.entry.hash), now_ms=NOW_MS)
        assert done.status is not None and (done.status.state, done.status.remaining) == (CANCELLED, 0)
        assert ex.engine.resting(BUY) == []
        with pytest.raises(NotCancellable):
            ex.submit(Cancel(order_id=placed.entry.hash), now_ms=NOW_MS)

    def test_cancel_errors_are_typed_and_change_nothing(self) -> None:
        alice, bob = Exchange(key_for(0)), Exchange(key_for(1))
        ask = alice.submit(Order(side=SELL, price=100, qty=1), now_ms=NOW_MS)
        bob.receive([ask.entry], now_ms=NOW_MS)
        before = full_view(bob, [ask.entry.hash])
        with pytest.raises(ForeignCancel):
            bob.submit(Cancel(order_id=ask.entry.hash), now_ms=NOW_MS)
        with pytest.raises(UnknownOrder):
            bob.submit(Cancel(order_id=bytes(32)), now_ms=NOW_MS)
        hb = bob.heartbeat(now_ms=NOW_MS)
        with pytest.raises(UnknownOrder):  # a heartbeat is not an order
            bob.submit(Cancel(order_id=hb.hash), now_ms=NOW_MS)
        after = full_view(bob, [ask.entry.hash])
        assert after[3:] == before[3:]  # the heartbeat is the only change
        assert bob.replica.version_vector()[bob.node_id] == 1

        filled = bob.submit(Order(side=BUY, price=100, qty=1), now_ms=NOW_MS)
        with pytest.raises(NotCancellable):
            bob.submit(Cancel(order_id=filled.entry.hash), now_ms=NOW_MS)
        ioc = bob.submit(Order(side=BUY, price=90, qty=1, tif=IOC), now_ms=NOW_MS)
        with pytest.raises(NotCancellable):
            bob.submit(Cancel(order_id=ioc.entry.hash), now_ms=NOW_MS)

    def test_own_stamps_outrun_received_ones(self) -> None:
        """After receiving an entry stamped ahead of the local clock, the next own
        entry still sorts after it (so its fills are the tail of the fill list)."""
        a, ex = LogBuilder(key_for(0)), Exchange(key_for(1))
        ahead = a.order(SELL, 100, 2, ms=NOW_MS + 4_000)
        ex.receive([ahead], now_ms=NOW_MS)
        mine = ex.submit(Order(side=BUY, price=100, qty=1), now_ms=NOW_MS)
        assert mine.entry.hlc > ahead.hlc
        assert mine.fills == ((mine.entry.hash, ahead.hash, 100, 1),)

    def test_restore_rebuilds_the_same_state(self) -> None:
        ex = Exchange(key_for(0))
        ex.submit(Order(side=SELL, price=100, qty=3), now_ms=NOW_MS)
        ex.submit(Order(side=BUY, price=100, qty=1), now_ms=NOW_MS + 1)
        ex.heartbeat(now_ms=NOW_MS + 2)
        entries = ex.replica.entries()
        again = Exchange(key_for(0))
        again.restore(list(reversed(entries)))
        oids = order_ids(entries)
        assert full_view(again, oids) == full_view(ex, oids)
        nxt = again.submit(Heartbeat(), now_ms=NOW_MS)  # clock behind the restored log
        assert nxt.entry.seq == 4 and nxt.entry.hlc > entries[-1].hlc
