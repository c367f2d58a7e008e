"""The incremental engine against the naive reference matcher, after every step,
with records arriving in any order (late ones rewind and replay), plus
revisions, compaction and hand-written scenarios."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from matching.engine import (
    BUY,
    CANCEL,
    CANCELLED,
    FILLED,
    GTC,
    IOC,
    MARKET,
    NOOP,
    OPEN,
    PARTIAL,
    SELL,
    Engine,
    Fill,
    Order,
    Record,
    Revision,
    RewindTooFar,
)
from matching.reference import RefResult, reference
from tests.conftest import prop

KINDS = (GTC, GTC, GTC, GTC, IOC, MARKET, CANCEL, CANCEL, NOOP)


@dataclass(frozen=True)
class Step:
    """One generated record before keys and oids are assigned (shrinks well)."""

    kind: int
    side: int
    price: int
    qty: int
    target: int  # a cancel names record ``target % n``
    delay: int  # how many places earlier than its arrival the record sorts
    cut: bool  # end the current delivery batch after this record
    compact: int | None  # compact(keep) before this record (compaction test only)
    repeat: bool = False  # an order repeats an earlier order's id and fields (a ticket carried twice)


STEP = st.builds(
    Step,
    kind=st.sampled_from(KINDS),
    side=st.sampled_from((BUY, SELL)),
    price=st.integers(96, 104),
    qty=st.integers(1, 9),
    target=st.integers(0, 99),
    delay=st.one_of(st.just(0), st.just(0), st.integers(1, 40)),
    cut=st.booleans(),
    compact=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 6)),
    repeat=st.sampled_from((False, False, False, True)),
)


OWNERS = ("alice", "bob")


def to_records(steps: Sequence[Step]) -> list[Record]:
    """Records in *arrival* order.  Record i has oid ``o<i>`` and the unique key
    ``(i - delay) * 100 + i``: with delay 0 it arrives in key order, with a delay
    it is a late arrival that sorts before up to ``delay`` earlier arrivals.  A
    cancel names any record (maybe itself, a cancel, a later order or an order
    that is already gone)."""
    n = len(steps)
    assert n < 100
    out: list[Record] = []
    for i, s in enumerate(steps):
        key = (i - s.delay) * 100 + i
        if s.kind == CANCEL:  # a cancel acts only on its owner's own order: here, half of the time
            out.append((key, CANCEL, f"o{s.target % n}", 0, 0, 0, OWNERS[(s.target + s.qty) % 2]))
        elif s.kind == NOOP:
            out.append((key, NOOP, f"o{i}", 0, 0, 0, OWNERS[i % 2]))
        else:
            placed = [r for r in out if r[1] < CANCEL]
            if s.repeat and placed:  # the same order again, at its own key: it must place nothing
                first = placed[s.target % len(placed)]
                out.append((key, *first[1:]))
                continue
            price = 0 if s.kind == MARKET else s.price
            out.append((key, s.kind, f"o{i}", s.side, price, s.qty, OWNERS[i % 2]))
    return out


def records(max_size: int = 40) -> st.SearchStrategy[list[Record]]:
    return st.lists(STEP, min_size=6, max_size=max_size).map(to_records)


def batches(steps: Sequence[Step]) -> list[int]:
    """Delivery batch sizes (1 means ``add``, more means ``add_many``)."""
    sizes = [0]
    for s in steps:
        sizes[-1] += 1
        if s.cut:
            sizes.append(0)
    return [x for x in sizes if x]


def assert_matches_reference(engine: Engine, recs: Sequence[Record]) -> RefResult:
    """Book, fills, depth and every order's status equal the reference's."""
    ref = reference(recs)
    engine.check_invariants()
    assert engine.fills == ref.fills
    for side in (BUY, SELL):
        assert engine.resting(side) == ref.resting(side)
    bids, asks = engine.depth(1_000)
    assert [(x.price, x.qty, x.orders) for x in bids] == ref.depth(BUY)
    assert [(x.price, x.qty, x.orders) for x in asks] == ref.depth(SELL)
    assert engine.best(BUY) == (ref.depth(BUY)[0][0] if ref.depth(BUY) else None)
    assert engine.best(SELL) == (ref.depth(SELL)[0][0] if ref.depth(SELL) else None)
    assert engine.resting_count() == len(ref.book)
    for rec in recs:
        assert engine.status(rec[2]) == ref.status(rec[2])
    assert_conserved(engine.fills, recs)
    return ref


def assert_conserved(fills: Sequence[Fill], recs: Sequence[Record]) -> None:
    qty = {r[2]: r[5] for r in recs if r[1] < CANCEL}
    traded: Counter[Any] = Counter()
    for taker, maker, _price, q in fills:
        assert q > 0
        traded[taker] += q
        traded[maker] += q
    assert all(traded[oid] <= qty[oid] for oid in traded)


def assert_revision(rev: Revision, before: Sequence[Fill], after: Sequence[Fill]) -> None:
    """A revision names exactly the fills that disappeared and appeared."""
    assert len(set(rev.revoked)) == len(rev.revoked) and len(set(rev.added)) == len(rev.added)
    assert set(rev.revoked) == set(before) - set(after)
    assert set(rev.added) == set(after) - set(before)
    assert Counter(before) - Counter(rev.revoked) + Counter(rev.added) == Counter(after)


class TestDifferential:
    @given(st.lists(STEP, min_size=6, max_size=60))
    @prop(200)
    def test_engine_equals_reference_after_every_step(self, steps: list[Step]) -> None:
        recs = to_records(steps)
        engine = Engine()
        seen: list[Record] = []
        pos = 0
        for size in batches(steps):
            batch = recs[pos:pos + size]
            pos += size
            before = list(engine.fills)
            if size == 1:
                late = bool(seen) and batch[0][0] < max(r[0] for r in seen)
                rev = engine.add(batch[0])
                seen.extend(batch)
                assert (rev is not None) == late
                if rev is not None:
                    assert_revision(rev, before, engine.fills)
            else:
                revs = engine.add_many(batch)
                seen.extend(batch)
                for rev in revs:
                    assert not set(rev.revoked) & set(rev.added)
            assert engine.records_applied == len(seen)
            assert engine.frontier == max(r[0] for r in seen)
            assert_matches_reference(engine, seen)

    @given(records(max_size=40), st.data())
    @prop(60)
    def test_arrival_order_never_matters(self, recs: list[Record], data: st.DataObject) -> None:
        a, b = Engine(), Engine()
        a.add_many(sorted(recs))
        for rec in data.draw(st.permutations(recs)):
            b.add(rec)
        assert a.fills == b.fills
        assert (a.resting(BUY), a.resting(SELL)) == (b.resting(BUY), b.resting(SELL))
        assert [a.status(r[2]) for r in recs] == [b.status(r[2]) for r in recs]


class TestFinalize:
    @given(st.lists(STEP, min_size=6, max_size=40))
    @prop(150)
    def test_finalize_hands_over_exactly_what_lies_below_the_floor(self, steps: list[Step]) -> None:
        """Finalizing at a floor hands over the fills of the records at or below it
        and the state there of every order they touched; the engine then holds
        only the provisional tail and the resting orders, and everything it
        reports still equals the reference's.  A record at or below the floor
        raises ``RewindTooFar`` and changes nothing."""
        engine = Engine()
        final_fills: list[Fill] = []
        final_orders: dict[Any, Any] = {}
        floor: Any = None
        seen: list[Record] = []
        for step, rec in zip(steps, to_records(steps), strict=True):
            if step.compact is not None and seen:
                keys = sorted(r[0] for r in seen)
                candidate = keys[min(step.compact, len(keys) - 1)]
                if floor is None or candidate > floor:
                    floor = candidate
                    batch = engine.finalize(floor)
                    assert batch.first_seq == len(final_fills)
                    final_fills += batch.fills
                    ref_below = reference([r for r in seen if r[0] <= floor])
                    assert final_fills == ref_below.fills
                    for fo in batch.orders:
                        want = ref_below.status(fo.oid)
                        assert want is not None
                        assert (fo.status.state, fo.status.filled, fo.status.remaining) == (
                            want.state, want.filled, want.remaining)
                        final_orders[fo.oid] = fo
                    assert engine.fills_base == len(final_fills)
            if floor is not None and rec[0] <= floor:
                snapshot = (list(engine.fills), engine.resting(BUY), engine.resting(SELL))
                with pytest.raises(RewindTooFar):
                    engine.add(rec)
                assert (list(engine.fills), engine.resting(BUY), engine.resting(SELL)) == snapshot
                continue
            engine.add(rec)
            seen.append(rec)
            ref = reference(seen)
            assert final_fills + engine.fills == ref.fills
            engine.check_invariants()
            for side in (BUY, SELL):
                assert engine.resting(side) == ref.resting(side)
            # memory: an order still held is resting, or something above the floor touched it
            above = {r[2] for r in seen if floor is None or r[0] > floor}
            above |= {f[1] for f in engine.fills}
            for oid, o in engine.orders.items():
                resting = o.__class__ is list and o[0] > 0
                assert resting or oid in above

    def test_finalize_then_late_record_raises(self) -> None:
        e = Engine()
        for k in range(10):
            e.add((k * 10, GTC, f"s{k}", SELL, 100 + k, 1, "x"))
        batch = e.finalize(60)
        assert batch.records == 7 and batch.fills == () and e.checkpoints() == 3
        assert {fo.oid for fo in batch.orders} == {f"s{k}" for k in range(7)}
        with pytest.raises(RewindTooFar):
            e.add((60, GTC, "late", BUY, 200, 1, "x"))
        with pytest.raises(RewindTooFar):
            e.add_many([(55, GTC, "late", BUY, 200, 1, "x")])
        rev = e.add((75, GTC, "b", BUY, 200, 2, "x"))  # above the floor: fine
        assert rev is not None and rev.added == (("b", "s0", 100, 1), ("b", "s1", 101, 1))
        assert e.finalize(50).records == 0  # below the floor: nothing more to hand over

    def test_closed_orders_leave_memory_once_final(self) -> None:
        e = Engine()
        e.add_many([(1, GTC, "s", SELL, 100, 2, "x"), (2, GTC, "b", BUY, 100, 2, "y"),
                    (3, GTC, "r", SELL, 101, 5, "x"), (4, GTC, "c", SELL, 102, 1, "x"),
                    (5, CANCEL, "c", 0, 0, 0, "x")])
        batch = e.finalize(5)
        assert batch.fills == (("b", "s", 100, 2),) and e.fills == []
        states = {fo.oid: fo.status.state for fo in batch.orders}
        assert states == {"s": FILLED, "b": FILLED, "r": OPEN, "c": CANCELLED}
        assert set(e.orders) == {"r"}  # only the resting order is still held
        assert e.status("s") is None and e.resting(SELL) == [(101, "r", 5)]

    def test_a_final_book_restores_into_a_fresh_engine(self) -> None:
        recs: list[Record] = [(i, GTC, f"o{i}", i % 2, 100 + (i % 5) - 2 * (i % 2), 1 + i % 4, "x")
                              for i in range(1, 40)]
        e = Engine()
        e.add_many(recs)
        batch = e.finalize(30)
        resting = [list(o) for o in e.orders.values() if o.__class__ is list and o[0] > 0 and o[6] <= 30]
        fresh = Engine()
        fresh.restore(resting, floor=30, fills_base=batch.first_seq + len(batch.fills))
        fresh.add_many([r for r in recs if r[0] > 30])
        assert fresh.fills == e.fills and fresh.fills_base == e.fills_base
        assert (fresh.resting(BUY), fresh.resting(SELL)) == (e.resting(BUY), e.resting(SELL))
        fresh.check_invariants()

    def test_reload_holds_the_lists_read_in_place_of_the_book(self) -> None:
        """A quiet engine takes its final book anew (a node holds it in new
        objects after a long replay): the lists it held are let go before the
        new ones are read, and matching goes on over the new ones."""
        recs: list[Record] = [(i, GTC, f"o{i}", i % 2, 100 + (i % 5) - 2 * (i % 2), 1 + i % 4, "x")
                              for i in range(1, 40)]
        e = Engine()
        e.add_many(recs)
        e.finalize(39)
        assert e.quiet()
        before = (e.resting(BUY), e.resting(SELL), e.fills_base, e.floor)
        old = [o for o in e.orders.values() if o.__class__ is list]
        held_when_read: list[int] = []

        def read() -> list[Order]:
            held_when_read.append(len(e.orders))
            return [list(o) for o in old]

        e.reload(read)
        assert held_when_read == [0]
        assert (e.resting(BUY), e.resting(SELL), e.fills_base, e.floor) == before
        assert all(e.orders[o[1]] is not o for o in old)
        e.check_invariants()
        best_ask = e.best(SELL)
        assert best_ask is not None
        e.add((40, GTC, "t", BUY, best_ask, 1, "y"))
        assert e.fills and e.fills[0][0] == "t"
        assert not e.quiet()
        with pytest.raises(ValueError):
            e.reload(read)

    def test_rewrite_takes_records_out(self) -> None:
        """Entries that become void (an evicted member's, past its cut) leave the
        book: the engine rewinds once and replays without them."""
        recs: list[Record] = [(1, GTC, "s", SELL, 100, 2, "x"), (2, GTC, "v", SELL, 99, 2, "void"),
                              (3, GTC, "b", BUY, 100, 3, "y")]
        e = Engine()
        e.add_many(recs)
        assert e.fills == [("b", "v", 99, 2), ("b", "s", 100, 1)]
        rev = e.rewrite([2], [])
        assert e.fills == [("b", "s", 100, 2)]
        assert rev.revoked == (("b", "v", 99, 2), ("b", "s", 100, 1)) and rev.added == (("b", "s", 100, 2),)
        assert e.status("v") is None
        assert_matches_reference(e, [recs[0], recs[2]])


class TestOwnership:
    def test_a_cancel_acts_only_on_its_owners_order(self) -> None:
        e = Engine()
        e.add_many([(1, GTC, "s", SELL, 100, 5, "alice"), (2, CANCEL, "s", 0, 0, 0, "mallory")])
        assert e.resting(SELL) == [(100, "s", 5)]
        e.add((3, CANCEL, "s", 0, 0, 0, "alice"))
        assert e.resting(SELL) == []
        assert e.owner("s") == "alice"


class TestScenarios:
    def test_price_then_time_priority_at_the_makers_price(self) -> None:
        e = Engine()
        e.add_many([
            (1, GTC, "s1", SELL, 102, 2, "x"),
            (2, GTC, "s2", SELL, 101, 2, "x"),
            (3, GTC, "s3", SELL, 101, 2, "x"),
            (4, GTC, "b", BUY, 102, 5, "x"),
        ])
        assert e.fills == [("b", "s2", 101, 2), ("b", "s3", 101, 2), ("b", "s1", 102, 1)]
        assert e.resting(SELL) == [(102, "s1", 1)]
        assert e.status("s1") is not None and e.status("s1").state == PARTIAL  # type: ignore[union-attr]
        assert e.status("b") is not None and e.status("b").state == FILLED  # type: ignore[union-attr]

    def test_ioc_remainder_expires_and_gtc_remainder_rests(self) -> None:
        e = Engine()
        e.add((1, GTC, "s", SELL, 100, 2, "x"))
        e.add((2, IOC, "i", BUY, 100, 5, "x"))
        e.add((3, GTC, "g", SELL, 99, 4, "x"))
        e.add((4, GTC, "b", BUY, 99, 1, "x"))
        assert e.fills == [("i", "s", 100, 2), ("b", "g", 99, 1)]
        st_i = e.status("i")
        assert st_i is not None and (st_i.state, st_i.filled, st_i.remaining) == (CANCELLED, 2, 0)
        assert e.resting(BUY) == [] and e.resting(SELL) == [(99, "g", 3)]

    def test_market_buy_on_an_empty_book(self) -> None:
        """Regression: a market buy used ``price = _INF`` while an empty ask side is
        also ``_INF``, so ``while best_ask <= price`` looked up ``asks[_INF]`` and
        raised ``KeyError`` (empty book, or a book the order swept clean)."""
        e = Engine()
        assert e.add((1, MARKET, "m", BUY, 0, 5, "x")) is None
        s = e.status("m")
        assert s is not None and (s.state, s.filled, s.remaining) == (CANCELLED, 0, 0)
        e.add((2, GTC, "a", SELL, 100, 3, "x"))
        e.add((3, GTC, "a2", SELL, 1 << 40, 1, "x"))
        e.add((4, MARKET, "m2", BUY, 0, 9, "x"))
        assert e.fills == [("m2", "a", 100, 3), ("m2", "a2", 1 << 40, 1)]
        s = e.status("m2")
        assert s is not None and (s.state, s.filled, s.price) == (CANCELLED, 4, 0)
        e.add((5, MARKET, "m3", SELL, 0, 1, "x"))  # the mirror case always worked
        # and via the late path: a market buy that arrives late sweeps again
        e.add((0, MARKET, "m0", BUY, 0, 1, "x"))
        assert e.fills[0] == ("m2", "a", 100, 3)
        e.check_invariants()

    def test_market_sell_takes_every_bid_level(self) -> None:
        e = Engine()
        e.add_many([(1, GTC, "b1", BUY, 1, 1, "x"), (2, GTC, "b2", BUY, 50, 1, "x"), (3, MARKET, "m", SELL, 0, 3, "x")])
        assert e.fills == [("m", "b2", 50, 1), ("m", "b1", 1, 1)]
        assert e.resting(BUY) == []

    def test_cancel_removes_only_the_remaining_quantity(self) -> None:
        e = Engine()
        e.add_many([(1, GTC, "s", SELL, 100, 5, "x"), (2, GTC, "b", BUY, 100, 2, "x"), (3, CANCEL, "s", 0, 0, 0, "x")])
        s = e.status("s")
        assert s is not None and (s.state, s.filled, s.remaining) == (CANCELLED, 2, 0)
        assert e.resting(SELL) == []
        e.add((4, CANCEL, "s", 0, 0, 0, "x"))  # twice: no effect
        e.add((5, CANCEL, "nobody", 0, 0, 0, "x"))
        # a late order that would have taken the rest before the cancel
        rev = e.add((2.5, GTC, "b2", BUY, 100, 9, "x"))
        assert rev is not None and rev.added == (("b2", "s", 100, 3),) and rev.revoked == ()
        s = e.status("s")
        assert s is not None and (s.state, s.filled) == (FILLED, 5)
        b2 = e.status("b2")
        assert b2 is not None and (b2.state, b2.remaining) == (PARTIAL, 6)

    def test_late_order_revises_fills(self) -> None:
        e = Engine()
        e.add_many([(10, GTC, "s", SELL, 100, 1, "x"), (30, GTC, "b_late", BUY, 100, 1, "x")])
        assert e.fills == [("b_late", "s", 100, 1)]
        rev = e.add((20, GTC, "b_early", BUY, 101, 1, "x"))
        assert rev == Revision(revoked=(("b_late", "s", 100, 1),), added=(("b_early", "s", 100, 1),))
        assert e.resting(BUY) == [(100, "b_late", 1)]
        b = e.status("b_late")
        assert b is not None and b.state == OPEN

    def test_duplicate_key_is_refused_without_changing_anything(self) -> None:
        """Regression: re-adding an applied record below the frontier undid the newer
        records, replayed them and raised ``ValueError``, but left the undone fills in
        place, so every fill after that key appeared twice."""
        e = Engine()
        e.add_many([(1, GTC, "a", SELL, 100, 3, "x"), (2, GTC, "b", BUY, 100, 2, "x"), (3, GTC, "c", BUY, 100, 1, "x"),
                    (4, CANCEL, "a", 0, 0, 0, "x")])
        fills, book = list(e.fills), (e.resting(BUY), e.resting(SELL))
        for dup in ((1, GTC, "a", SELL, 100, 3, "x"), (3, GTC, "c", BUY, 100, 1, "x"), (4, CANCEL, "a", 0, 0, 0, "x")):
            with pytest.raises(ValueError):
                e.add(dup)
            assert e.fills == fills and (e.resting(BUY), e.resting(SELL)) == book
            e.check_invariants()
        assert e.records_applied == 4

    def test_depth_is_limited_and_aggregated(self) -> None:
        e = Engine()
        e.add_many([(1, GTC, "a", SELL, 105, 1, "x"), (2, GTC, "b", SELL, 103, 2, "x"),
                    (3, GTC, "c", SELL, 103, 4, "x"),
                    (4, GTC, "d", BUY, 99, 7, "x"), (5, GTC, "e", BUY, 98, 1, "x")])
        bids, asks = e.depth(1)
        assert [(x.price, x.qty, x.orders) for x in bids] == [(99, 7, 1)]
        assert [(x.price, x.qty, x.orders) for x in asks] == [(103, 6, 2)]
        assert e.depth(0) == ([], [])
        assert [x.price for x in e.depth(10)[1]] == [103, 105]

    def test_unknown_status_and_empty_engine(self) -> None:
        e = Engine()
        assert e.status("x") is None and e.best(BUY) is None and e.best(SELL) is None
        assert e.frontier is None and e.records_applied == 0 and e.add_many([]) == []
        e.check_invariants()


class TestInvariantsCanFail:
    def test_crossed_book_is_detected(self) -> None:
        e = Engine()
        e.add_many([(1, GTC, "a", SELL, 100, 1, "x"), (2, GTC, "b", BUY, 99, 1, "x")])
        e.check_invariants()
        e.bids[99][0][5] = 101  # an order claiming another price
        with pytest.raises(AssertionError):
            e.check_invariants()

    def test_empty_level_and_overfill_are_detected(self) -> None:
        e = Engine()
        e.add((1, GTC, "a", SELL, 100, 1, "x"))
        e.asks[100][0][0] = 0
        with pytest.raises(AssertionError):
            e.check_invariants()
        e = Engine()
        e.add((1, GTC, "a", SELL, 100, 1, "x"))
        e.orders["a"][3] = 5  # closed beyond the order's quantity
        with pytest.raises(AssertionError):
            e.check_invariants()

    def test_reference_disagrees_with_a_wrong_engine(self) -> None:
        """The differential check is not vacuous: a plausible wrong rule (trade at the
        taker's price) is caught."""
        recs: list[Record] = [(1, GTC, "s", SELL, 100, 1, "x"), (2, GTC, "b", BUY, 101, 1, "x")]
        e = Engine()
        e.add_many(recs)
        e.fills[0] = ("b", "s", 101, 1)
        with pytest.raises(AssertionError):
            assert_matches_reference(e, recs)


class TestCatchUpPage:
    def test_a_page_of_late_records_rewinds_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Regression: add_many rewound and replayed once per late record, so a
        catch-up page of n entries older than the frontier cost O(n^2) undo/redo."""
        recs: list[Record] = []
        for i in range(300):
            side = BUY if i % 2 else SELL
            price = 100 + (i % 7) - (3 if side == BUY else 0)
            recs.append((i * 2, GTC, f"o{i}", side, price, 1 + i % 5, "x"))
        frontier = (10_000, GTC, "late-frontier", BUY, 101, 3, "x")
        engine = Engine()
        engine.add(frontier)
        before = list(engine.fills)
        rewinds = 0
        original = engine._rewind_to

        def counting(key: Any) -> tuple[list[Record], list[Fill]]:
            nonlocal rewinds
            rewinds += 1
            return original(key)

        monkeypatch.setattr(engine, "_rewind_to", counting)
        shuffled = recs[::-1]  # arrival order does not matter
        revisions = engine.add_many(shuffled)
        assert rewinds == 1
        assert len(revisions) == 1
        assert_revision(revisions[0], before, engine.fills)
        assert_matches_reference(engine, [*recs, frontier])
