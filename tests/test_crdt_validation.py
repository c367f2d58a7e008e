"""Every validation error, triggered by a crafted entry whose *only* fault is the
one under test, comes back typed and leaves the replicated state unchanged."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

import crdt.replica
from crdt.entry import (
    BUY,
    GENESIS,
    GTC,
    IOC,
    MAX_ENTRY_BYTES,
    MAX_PRICE,
    MAX_QTY,
    MAX_SEQ,
    SELL,
    Cancel,
    Entry,
    Heartbeat,
    Order,
    decode_entries,
    decode_entry,
    decode_entry_bytes,
    encode_entry,
    make_entry,
)
from crdt.errors import (
    BadSignature,
    BrokenChain,
    ClockSkew,
    Equivocation,
    ExchangeError,
    ForeignCancel,
    MalformedEntry,
    NonIncreasingHlc,
    OutOfRange,
    OversizeEntry,
    SequenceGap,
    UnknownBodyType,
    ValidationError,
)
from crdt.hlc import DEFAULT_MAX_SKEW_MS, pack
from crdt.replica import MergeResult, Replica
from tests.conftest import BASE_MS, NOW_MS, LogBuilder, key_for, replica_snapshot, signed_entry


def two_origins() -> tuple[Replica, LogBuilder, LogBuilder]:
    """A replica holding two entries of origin A and one of origin B."""
    a, b = LogBuilder(key_for(0)), LogBuilder(key_for(1))
    a.order(BUY, 100, 5)
    a.order(SELL, 105, 3)
    b.order(SELL, 101, 2)
    r = Replica()
    result = r.receive([*a.entries, *b.entries], now_ms=NOW_MS)
    assert len(result.accepted) == 3 and not result.rejected
    return r, a, b


def only_rejection(result: MergeResult, error: type[ValidationError], entry: Entry) -> ValidationError:
    assert not result.accepted
    assert len(result.rejected) == 1, result.rejected
    rej = result.rejected[0]
    assert type(rej.error) is error, rej.error
    assert rej.origin == entry.origin and rej.seq == entry.seq
    assert str(rej.error)  # a clear message
    return rej.error


def assert_rejected_unchanged(
    r: Replica, entry: Entry, error: type[ValidationError], *, now_ms: int = NOW_MS
) -> None:
    before = replica_snapshot(r)
    only_rejection(r.receive([entry], now_ms=now_ms), error, entry)
    assert replica_snapshot(r) == before
    # and the same entry offered again is still refused, still without effect
    only_rejection(r.receive([entry], now_ms=now_ms), error, entry)
    assert replica_snapshot(r) == before


def tamper(sig: bytes) -> bytes:
    return bytes([sig[0] ^ 1]) + sig[1:]


def with_sig(e: Entry, sig: bytes) -> Entry:
    return Entry(origin=e.origin, seq=e.seq, hlc=e.hlc, prev=e.prev, body=e.body, sig=sig, hash=e.hash)


class TestErrorTree:
    def test_every_validation_error_is_an_exchange_error_with_a_code(self) -> None:
        kinds = [BadSignature, BrokenChain, NonIncreasingHlc, ClockSkew, OutOfRange, UnknownBodyType,
                 MalformedEntry, OversizeEntry, ForeignCancel, Equivocation, SequenceGap]
        assert all(issubclass(k, ValidationError) and issubclass(k, ExchangeError) for k in kinds)
        codes = [k.code for k in kinds]
        assert len(set(codes)) == len(codes) and "invalid" not in codes


class TestSignature:
    def test_tampered_signature(self) -> None:
        r, a, _ = two_origins()
        good = a.crafted(Order(side=BUY, price=99, qty=1))
        assert_rejected_unchanged(r, with_sig(good, tamper(good.sig)), BadSignature)
        assert r.receive([good], now_ms=NOW_MS).accepted == (good,)

    def test_signed_by_another_key(self) -> None:
        r, a, _ = two_origins()
        good = a.crafted(Heartbeat())
        assert_rejected_unchanged(r, with_sig(good, key_for(7).sign(good.hash)), BadSignature)

    def test_first_entry_of_a_new_origin(self) -> None:
        r, _, _ = two_origins()
        c = LogBuilder(key_for(2))
        good = c.crafted(Heartbeat())
        assert_rejected_unchanged(r, with_sig(good, bytes(64)), BadSignature)

    def test_tampered_tip_refuses_the_run_at_the_cost_of_one_check(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only the newest entry's signature is checked.  When it fails the whole
        run is refused and nothing changes.  Regression: the replica used to walk
        back checking every signature, so one forged page of n entries cost n
        verifications (about 0.5 s of CPU for 8,000 entries)."""
        r, a, _ = two_origins()
        before = replica_snapshot(r)
        e3 = a.order(BUY, 98, 1)
        e4 = a.heartbeat()
        e5 = a.order(SELL, 110, 2)
        bad = with_sig(e5, tamper(e5.sig))
        checks = 0
        real_verify = crdt.replica.verify

        def counting(public: bytes, sig: bytes, message: bytes) -> bool:
            nonlocal checks
            checks += 1
            return real_verify(public, sig, message)

        monkeypatch.setattr(crdt.replica, "verify", counting)
        result = r.receive([bad, e4, e3], now_ms=NOW_MS)
        assert checks == 1
        assert result.accepted == ()
        assert [(x.seq, type(x.error)) for x in result.rejected] == [(5, BadSignature)]
        assert r.buffered() == 0
        assert replica_snapshot(r) == before
        # the genuine entries are still welcome afterwards
        assert r.receive([e5, e4, e3], now_ms=NOW_MS).accepted == (e3, e4, e5)

    def test_whole_batch_with_no_valid_signature_changes_nothing(self) -> None:
        r, a, _ = two_origins()
        e3, e4 = a.heartbeat(), a.heartbeat()
        before = replica_snapshot(r)
        result = r.receive([with_sig(e3, tamper(e3.sig)), with_sig(e4, tamper(e4.sig))], now_ms=NOW_MS)
        assert not result.accepted
        assert [(x.seq, type(x.error)) for x in result.rejected] == [(4, BadSignature)]  # the tip is the entry checked
        assert replica_snapshot(r) == before

    def test_forged_body_under_an_old_signature(self) -> None:
        """Changing the body changes the hash (recomputed on decode), so an old
        signature no longer covers it."""
        r, a, _ = two_origins()
        good = a.crafted(Order(side=BUY, price=99, qty=1))
        raw = good.to_wire()
        raw[4] = Order(side=BUY, price=99, qty=1_000).to_wire()
        forged = decode_entry(raw)
        assert forged.hash != good.hash
        assert_rejected_unchanged(r, forged, BadSignature)


class TestChainAndClock:
    def test_broken_chain(self) -> None:
        r, a, _ = two_origins()
        entry = a.crafted(Heartbeat(), prev=a.entries[0].hash)
        assert_rejected_unchanged(r, entry, BrokenChain)
        assert_rejected_unchanged(r, a.crafted(Heartbeat(), prev=GENESIS), BrokenChain)

    def test_first_entry_must_link_to_genesis(self) -> None:
        r, _, _ = two_origins()
        c = LogBuilder(key_for(2))
        assert_rejected_unchanged(r, c.crafted(Heartbeat(), prev=bytes([1]) * 32), BrokenChain)

    def test_equal_hlc_is_not_increasing(self) -> None:
        r, a, _ = two_origins()
        assert_rejected_unchanged(r, a.crafted(Heartbeat(), hlc=a.last_hlc), NonIncreasingHlc)

    def test_older_hlc_is_not_increasing(self) -> None:
        r, a, _ = two_origins()
        assert_rejected_unchanged(r, a.crafted(Heartbeat(), hlc=a.entries[0].hlc - 5), NonIncreasingHlc)

    def test_clock_skew(self) -> None:
        r, a, _ = two_origins()
        ahead = pack(NOW_MS + DEFAULT_MAX_SKEW_MS + 1, 0)
        assert_rejected_unchanged(r, a.crafted(Heartbeat(), hlc=ahead), ClockSkew)

    def test_clock_skew_bound_is_inclusive_and_moves_with_the_receiver_clock(self) -> None:
        r, a, _ = two_origins()
        ahead = a.crafted(Heartbeat(), hlc=pack(NOW_MS + DEFAULT_MAX_SKEW_MS + 1, 0))
        assert_rejected_unchanged(r, ahead, ClockSkew)
        # a millisecond later on the receiver's clock the same entry is fine
        assert r.receive([ahead], now_ms=NOW_MS + 1).accepted == (ahead,)
        at_limit = signed_entry(a.key, seq=4, hlc=pack(NOW_MS + DEFAULT_MAX_SKEW_MS + 1, 1),
                                prev=ahead.hash, body=Heartbeat())
        assert r.receive([at_limit], now_ms=NOW_MS + 1).accepted == (at_limit,)

    def test_max_skew_is_configurable(self) -> None:
        a = LogBuilder(key_for(0))
        entry = a.crafted(Heartbeat(), hlc=pack(NOW_MS + 11, 0))
        assert_rejected_unchanged(Replica(max_skew_ms=10), entry, ClockSkew)
        assert Replica(max_skew_ms=11).receive([entry], now_ms=NOW_MS).accepted == (entry,)


BAD_ORDERS = {
    "price 0": Order(side=BUY, price=0, qty=1),
    "price above MAX_PRICE": Order(side=SELL, price=MAX_PRICE + 1, qty=1),
    "qty 0": Order(side=BUY, price=100, qty=0),
    "qty above MAX_QTY": Order(side=BUY, price=100, qty=MAX_QTY + 1),
    "negative qty": Order(side=BUY, price=100, qty=-3),
    "side 2": Order(side=2, price=100, qty=1),
    "tif 2": Order(side=BUY, price=100, qty=1, tif=2),
    "market with a price": Order(side=BUY, price=100, qty=1, tif=IOC, market=True),
    "market GTC": Order(side=SELL, price=0, qty=1, tif=GTC, market=True),
}


class TestRanges:
    @pytest.mark.parametrize("body", BAD_ORDERS.values(), ids=BAD_ORDERS.keys())
    def test_out_of_range_order_is_rejected_by_the_replica(self, body: Order) -> None:
        r, a, _ = two_origins()
        assert_rejected_unchanged(r, a.crafted(body), OutOfRange)

    @pytest.mark.parametrize("body", BAD_ORDERS.values(), ids=BAD_ORDERS.keys())
    def test_out_of_range_order_is_refused_by_make_entry(self, body: Order) -> None:
        with pytest.raises(OutOfRange):
            make_entry(key_for(0), seq=1, hlc=pack(BASE_MS, 0), prev=GENESIS, body=body)

    @pytest.mark.parametrize("body", BAD_ORDERS.values(), ids=BAD_ORDERS.keys())
    def test_out_of_range_order_is_refused_on_the_wire(self, body: Order) -> None:
        wire = encode_entry(signed_entry(key_for(0), seq=1, hlc=pack(BASE_MS, 0), prev=GENESIS, body=body))
        with pytest.raises(OutOfRange):  # negative numbers too: the range, not the type, is wrong
            decode_entry_bytes(wire)

    def test_extreme_valid_values_pass(self) -> None:
        r = Replica()
        a = LogBuilder(key_for(0))
        a.order(BUY, 1, 1)
        a.order(SELL, MAX_PRICE, MAX_QTY)
        a.market(BUY, MAX_QTY)
        result = r.receive([decode_entry_bytes(encode_entry(e)) for e in a.entries], now_ms=NOW_MS)
        assert len(result.accepted) == 3 and not result.rejected

    @pytest.mark.parametrize(
        ("field", "value"),
        [(1, 0), (1, -1), (1, 1 << 63), (2, 0), (2, 1 << 64)],
        ids=["seq 0", "seq -1", "seq 2^63", "hlc 0", "hlc 2^64"],
    )
    def test_sequence_and_clock_ranges_on_the_wire(self, field: int, value: int) -> None:
        raw = LogBuilder(key_for(0)).crafted(Heartbeat()).to_wire()
        raw[field] = value
        with pytest.raises(OutOfRange):
            decode_entry(raw)


def good_wire() -> list[Any]:
    return LogBuilder(key_for(0)).crafted(Order(side=BUY, price=100, qty=2)).to_wire()


def mutated(path: tuple[int, ...], value: Any) -> list[Any]:
    raw = good_wire()
    target = raw
    for i in path[:-1]:
        target = target[i]
    target[path[-1]] = value
    return raw


MALFORMED: dict[str, Any] = {
    "not an array": {"origin": b"x"},
    "5 fields": good_wire()[:5],
    "7 fields": [*good_wire(), b""],
    "origin 31 bytes": mutated((0,), bytes(31)),
    "origin as str": mutated((0,), "a" * 32),
    "seq as str": mutated((1,), "1"),
    "seq as bool": mutated((1,), True),
    "hlc as float": mutated((2,), 1.5),
    "prev 33 bytes": mutated((3,), bytes(33)),
    "sig 63 bytes": mutated((5,), bytes(63)),
    "sig missing": mutated((5,), None),
    "body not an array": mutated((4,), 1),
    "body empty": mutated((4,), []),
    "order body 5 fields": mutated((4,), [1, 0, 100, 2, 0]),
    "market flag as int": mutated((4, 5), 0),
    "price as float": mutated((4, 2), 100.0),
    "qty as bool": mutated((4, 3), True),
    "cancel body 3 fields": mutated((4,), [2, bytes(32), 0]),
    "cancel target 31 bytes": mutated((4,), [2, bytes(31)]),
    "heartbeat with a field": mutated((4,), [3, 0]),
}


class TestWire:
    @pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
    def test_malformed_entry(self, raw: Any) -> None:
        with pytest.raises(MalformedEntry):
            decode_entry(raw)
        with pytest.raises(MalformedEntry):
            decode_entry_bytes(msgpack.packb(raw, use_bin_type=True))

    @pytest.mark.parametrize("data", [b"", b"\xc1", b"\x96\x01", encode_entry(
        LogBuilder(key_for(0)).crafted(Heartbeat())) + b"\x00"], ids=["empty", "reserved byte",
                                                                       "truncated", "trailing byte"])
    def test_not_msgpack(self, data: bytes) -> None:
        with pytest.raises(MalformedEntry):
            decode_entry_bytes(data)

    @pytest.mark.parametrize("tag", [0, 4, 99, -1, "order", True, None], ids=repr)
    def test_unknown_body_type(self, tag: Any) -> None:
        raw = mutated((4,), [tag, 0, 100, 2, 0, False])
        with pytest.raises(UnknownBodyType):
            decode_entry(raw)
        with pytest.raises(UnknownBodyType):
            decode_entry_bytes(msgpack.packb(raw, use_bin_type=True))

    def test_oversize_entry(self) -> None:
        raw = mutated((4,), [3])
        raw.append(b"x" * MAX_ENTRY_BYTES)  # would also be malformed: size is checked first
        data = msgpack.packb(raw, use_bin_type=True)
        assert len(data) > MAX_ENTRY_BYTES
        with pytest.raises(OversizeEntry):
            decode_entry_bytes(data)
        with pytest.raises(OversizeEntry):
            decode_entry_bytes(bytes(MAX_ENTRY_BYTES + 1))

    def test_size_cap_is_inclusive(self) -> None:
        data = encode_entry(LogBuilder(key_for(0)).crafted(Heartbeat()))
        padded = data + bytes(MAX_ENTRY_BYTES - len(data))
        assert len(padded) == MAX_ENTRY_BYTES
        with pytest.raises(MalformedEntry):  # not oversize: too long only because of trailing bytes
            decode_entry_bytes(padded)

    def test_decode_entries_sorts_good_from_bad(self) -> None:
        a = LogBuilder(key_for(0))
        good = [a.heartbeat().to_wire(), a.order(BUY, 100, 1).to_wire()]
        big = [*good[0][:5], b"y" * MAX_ENTRY_BYTES]
        entries, bad = decode_entries([good[0], [1, 2], big, mutated((4,), [9]), good[1]], max_entries=5)
        assert entries == a.entries
        assert [type(x.error) for x in bad] == [MalformedEntry, OversizeEntry, UnknownBodyType]
        # what the bad items claim to be is kept for the refusal list
        assert [(x.origin, x.seq) for x in bad] == [(None, 2), (a.origin, 1), (a.origin, 1)]
        with pytest.raises(OversizeEntry):
            decode_entries(good * 3, max_entries=5)
        with pytest.raises(MalformedEntry):
            decode_entries({"entries": good}, max_entries=5)


class TestCancels:
    def test_foreign_cancel(self) -> None:
        r, a, b = two_origins()
        assert_rejected_unchanged(r, b.crafted(Cancel(order_id=a.orders[0])), ForeignCancel)

    def test_cancel_of_an_unknown_order(self) -> None:
        r, a, _ = two_origins()
        assert_rejected_unchanged(r, a.crafted(Cancel(order_id=bytes([7]) * 32)), ForeignCancel)

    def test_cancel_of_a_heartbeat_is_not_a_cancel_of_an_order(self) -> None:
        r, a, _ = two_origins()
        hb = a.heartbeat()
        r.receive([hb], now_ms=NOW_MS)
        assert_rejected_unchanged(r, a.crafted(Cancel(order_id=hb.hash)), ForeignCancel)

    def test_own_cancel_is_accepted_alone_and_in_the_same_batch_as_its_order(self) -> None:
        r, a, _ = two_origins()
        c1 = a.cancel(a.orders[0])
        o = a.order(SELL, 120, 1)
        c2 = a.cancel(o.hash)
        result = r.receive([c2, o, c1], now_ms=NOW_MS)
        assert result.accepted == (c1, o, c2) and not result.rejected

    def test_foreign_cancel_in_a_batch_stops_the_run_at_it(self) -> None:
        r, a, b = two_origins()
        ok = b.heartbeat()
        bad = b.crafted(Cancel(order_id=a.orders[1]))
        result = r.receive([ok, bad], now_ms=NOW_MS)
        assert result.accepted == (ok,)
        assert [(x.seq, type(x.error)) for x in result.rejected] == [(bad.seq, ForeignCancel)]
        assert r.buffered() == 0


class TestEquivocation:
    def test_two_signed_entries_at_one_seq_freeze_the_origin(self) -> None:
        r, a, b = two_origins()
        stored = a.entries[1]
        twin = signed_entry(a.key, seq=2, hlc=stored.hlc, prev=stored.prev, body=Order(side=SELL, price=104,
                                                                                       qty=3))
        assert twin.hash != stored.hash
        vv, entries = r.version_vector(), r.entries()
        frozen_before = r.state_hash()
        only_rejection(r.receive([twin], now_ms=NOW_MS), Equivocation, twin)
        # evidence kept, state not merged; the state hash covers entries only, so a
        # replica that never saw the twin still agrees with this one
        ev = r.evidence()
        assert list(ev) == [a.origin]
        assert ev[a.origin].first == stored and ev[a.origin].second == twin
        assert r.version_vector() == vv and r.entries() == entries
        assert r.state_hash() == frozen_before
        # peers are told not to send the frozen origin at all
        assert r.digest_for_sync()[a.origin] == MAX_SEQ
        # the evidence alone re-freezes a fresh replica (it is what the node stores)
        fresh = Replica()
        assert fresh.restore_evidence(stored, twin)
        assert list(fresh.evidence()) == [a.origin]
        assert not Replica().restore_evidence(stored, stored)
        after = replica_snapshot(r)
        # later entries from the frozen origin are refused, even perfectly valid ones
        nxt = a.heartbeat()
        only_rejection(r.receive([nxt], now_ms=NOW_MS), Equivocation, nxt)
        assert replica_snapshot(r) == after
        # other origins carry on
        assert r.receive([b.heartbeat()], now_ms=NOW_MS).accepted == (b.entries[-1],)

    def test_conflicting_entry_with_a_bad_signature_is_not_evidence(self) -> None:
        r, a, _ = two_origins()
        stored = a.entries[0]
        twin = signed_entry(a.key, seq=1, hlc=stored.hlc, prev=GENESIS, body=Heartbeat())
        assert_rejected_unchanged(r, with_sig(twin, tamper(twin.sig)), BadSignature)
        assert r.evidence() == {}

    def test_buffered_entries_of_a_frozen_origin_are_dropped(self) -> None:
        r, a, _ = two_origins()
        a.heartbeat()
        ahead = a.heartbeat()
        assert r.receive([ahead], now_ms=NOW_MS).buffered == 1
        twin = signed_entry(a.key, seq=1, hlc=a.entries[0].hlc, prev=GENESIS, body=Heartbeat())
        r.receive([twin], now_ms=NOW_MS)
        assert r.buffered() == 0 and a.origin in r.evidence()

    def test_exact_duplicate_is_not_equivocation(self) -> None:
        r, a, _ = two_origins()
        before = replica_snapshot(r)
        result = r.receive(a.entries, now_ms=NOW_MS)
        assert result.duplicates == 2 and not result.accepted and not result.rejected
        assert replica_snapshot(r) == before


class TestGaps:
    def test_entries_ahead_of_a_gap_wait_and_merge_when_it_fills(self) -> None:
        r, a, _ = two_origins()
        e3, e4, e5 = a.heartbeat(), a.order(BUY, 97, 1), a.cancel(a.orders[0])
        before = replica_snapshot(r)[:3]
        result = r.receive([e5, e4], now_ms=NOW_MS)
        assert not result.accepted and not result.rejected
        assert result.buffered == 2 and r.buffered() == 2
        assert len(result.gaps) == 1 and isinstance(result.gaps[0], SequenceGap)
        assert "have seq 2" in str(result.gaps[0]) and "from seq 4" in str(result.gaps[0])
        assert replica_snapshot(r)[:3] == before  # hash, vector and entries untouched
        # a duplicate of a buffered entry is counted, not stored twice
        assert r.receive([e4], now_ms=NOW_MS).duplicates == 1 and r.buffered() == 2
        result = r.receive([e3], now_ms=NOW_MS)
        assert result.accepted == (e3, e4, e5)
        assert result.buffered == 0 and not result.gaps and r.buffered() == 0
        assert r.version_vector()[a.origin] == 5

    def test_bad_entry_ahead_of_a_gap_is_rejected_when_reached(self) -> None:
        r, a, _ = two_origins()
        e3 = a.heartbeat()
        bad4 = a.crafted(Heartbeat(), prev=GENESIS)
        assert r.receive([bad4], now_ms=NOW_MS).buffered == 1
        result = r.receive([e3], now_ms=NOW_MS)
        assert result.accepted == (e3,)
        assert [(x.seq, type(x.error)) for x in result.rejected] == [(4, BrokenChain)]
        assert r.buffered() == 0

    def test_buffer_is_bounded(self) -> None:
        a = LogBuilder(key_for(0))
        for _ in range(8):
            a.heartbeat()
        r = Replica(max_buffer_per_origin=3)
        result = r.receive(a.entries[2:], now_ms=NOW_MS)
        assert result.buffered == 3 and r.buffered() == 3  # seq 3, 4, 5 kept; 6, 7, 8 dropped
        r2 = Replica(max_buffer_total=2)
        assert r2.receive(a.entries[2:], now_ms=NOW_MS).buffered == 2 and r2.buffered() == 2

    def test_full_buffer_does_not_lock_out_the_gap_filler(self) -> None:
        """Regression: with an origin's buffer full of entries far ahead, the entry
        that fills the gap (seq head+1) was dropped like any other early entry, so
        the origin could never advance again on that replica."""
        a = LogBuilder(key_for(0))
        for _ in range(8):
            a.heartbeat()
        r = Replica(max_buffer_per_origin=3)
        r.receive(a.entries[5:], now_ms=NOW_MS)  # seq 6, 7, 8: the buffer is full
        assert r.buffered() == 3
        result = r.receive(a.entries[:1], now_ms=NOW_MS)
        assert [e.seq for e in result.accepted] == [1]
        result = r.receive(a.entries[1:5], now_ms=NOW_MS)  # a whole run, longer than the cap
        assert [e.seq for e in result.accepted] == [2, 3, 4, 5, 6, 7, 8]
        assert r.buffered() == 0 and r.version_vector() == {a.origin: 8}
        # the same with the global cap
        r = Replica(max_buffer_total=2)
        r.receive(a.entries[6:], now_ms=NOW_MS)
        assert r.receive(a.entries[:6], now_ms=NOW_MS).accepted == tuple(a.entries)
        assert r.buffered() == 0
