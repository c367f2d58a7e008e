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
    return Entry(origin=e.origin, seq=e.seq, hlc=e.hlc, prev=e.prev, body=e.body, sig=sig, hash=e.hash, ack=e.ack)


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
        raw[5] = Order(side=BUY, price=99, qty=1_000).to_wire()
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

    def test_clock_skew_far_beyond_the_wait_bound(self) -> None:
        r, a, _ = two_origins()
        ahead = pack(NOW_MS + DEFAULT_MAX_SKEW_MS + crdt.replica.MAX_FUTURE_MS + 1, 0)
        assert_rejected_unchanged(r, a.crafted(Heartbeat(), hlc=ahead), ClockSkew)

    def test_entry_from_the_future_waits_and_merges_when_the_clock_reaches_it(self) -> None:
        """Regression: an entry stamped past the skew bound used to be dropped;
        a node behind the others then refused every origin's entries.  It now
        waits in the buffer, is not dropped, and merges once due."""
        r, a, _ = two_origins()
        ahead = a.crafted(Heartbeat(), hlc=pack(NOW_MS + DEFAULT_MAX_SKEW_MS + 1, 0))
        before = replica_snapshot(r)[:3]
        result = r.receive([ahead], now_ms=NOW_MS)
        assert not result.accepted and not result.rejected and r.buffered() == 1
        assert replica_snapshot(r)[:3] == before
        assert not r.drain_due(NOW_MS).accepted
        assert r.drain_due(NOW_MS + 1).accepted == (ahead,)  # the bound is inclusive
        assert r.buffered() == 0

    def test_the_bound_follows_the_network_clock_when_this_node_is_behind(self) -> None:
        r, a, _ = two_origins()
        ahead = a.crafted(Heartbeat(), hlc=pack(NOW_MS + DEFAULT_MAX_SKEW_MS + 3_000, 0))
        r.clock_offset_ms = 3_000  # the peers' clocks are 3 s ahead of ours
        assert r.receive([ahead], now_ms=NOW_MS).accepted == (ahead,)

    def test_max_skew_is_configurable(self) -> None:
        a = LogBuilder(key_for(0))
        entry = a.crafted(Heartbeat(), hlc=pack(NOW_MS + 11, 0))
        r = Replica(max_skew_ms=10, max_future_ms=0)
        assert_rejected_unchanged(r, entry, ClockSkew)
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
    "6 fields": good_wire()[:6],
    "8 fields": [*good_wire(), b""],
    "origin 31 bytes": mutated((0,), bytes(31)),
    "origin as str": mutated((0,), "a" * 32),
    "seq as str": mutated((1,), "1"),
    "seq as bool": mutated((1,), True),
    "hlc as float": mutated((2,), 1.5),
    "prev 33 bytes": mutated((3,), bytes(33)),
    "ack not an array": mutated((4,), 0),
    "ack of 2 fields": mutated((4,), [1, 1]),
    "ack digest 31 bytes": mutated((4,), [1, 1, bytes(31)]),
    "ack stable as str": mutated((4,), [1, "1", bytes(32)]),
    "suspect ack id 31 bytes": mutated((4,), [1, 1, bytes(32), bytes(31), 1, 1, bytes(32)]),
    "sig 63 bytes": mutated((6,), bytes(63)),
    "sig missing": mutated((6,), None),
    "body not an array": mutated((5,), 1),
    "body empty": mutated((5,), []),
    "order body 5 fields": mutated((5,), [1, 0, 100, 2, 0]),
    "market flag as int": mutated((5, 5), 0),
    "price as float": mutated((5, 2), 100.0),
    "qty as bool": mutated((5, 3), True),
    "cancel body 3 fields": mutated((5,), [2, bytes(32), 0]),
    "cancel target 31 bytes": mutated((5,), [2, bytes(31)]),
    "heartbeat with a field": mutated((5,), [3, 0]),
    "admit without its after": mutated((5,), [4, bytes(32)]),
    "evict cut as str": mutated((5,), [5, bytes(32), "3"]),
    "retract member 33 bytes": mutated((5,), [6, bytes(33)]),
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

    @pytest.mark.parametrize("tag", [0, 9, 99, -1, "order", True, None], ids=repr)
    def test_unknown_body_type(self, tag: Any) -> None:
        raw = mutated((5,), [tag, 0, 100, 2, 0, False])
        with pytest.raises(UnknownBodyType):
            decode_entry(raw)
        with pytest.raises(UnknownBodyType):
            decode_entry_bytes(msgpack.packb(raw, use_bin_type=True))

    def test_oversize_entry(self) -> None:
        raw = mutated((5,), [3])
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
        big = [*good[0][:6], b"y" * MAX_ENTRY_BYTES]
        entries, bad = decode_entries([good[0], [1, 2], big, mutated((5,), [9]), good[1]], max_entries=5)
        assert entries == a.entries
        assert [type(x.error) for x in bad] == [MalformedEntry, OversizeEntry, UnknownBodyType]
        # what the bad items claim to be is kept for the refusal list
        assert [(x.origin, x.seq) for x in bad] == [(None, 2), (a.origin, 1), (a.origin, 1)]
        with pytest.raises(OversizeEntry):
            decode_entries(good * 3, max_entries=5)
        with pytest.raises(MalformedEntry):
            decode_entries({"entries": good}, max_entries=5)


class TestCancels:
    def test_the_replica_does_not_judge_whose_order_a_cancel_names(self) -> None:
        """Who may cancel is a matter of matching (a cancel acts only on its own
        origin's resting order): the replica would need every order ever placed
        in memory to judge it, and replicas that pruned differently would then
        disagree on what is valid."""
        r, a, b = two_origins()
        foreign = b.crafted(Cancel(order_id=a.orders[0]))
        unknown = b.crafted(Cancel(order_id=bytes([7]) * 32), seq=foreign.seq + 1, hlc=foreign.hlc + 1,
                            prev=foreign.hash)
        result = r.receive([foreign, unknown], now_ms=NOW_MS)
        assert result.accepted == (foreign, unknown) and not result.rejected

    def test_own_cancel_is_accepted_alone_and_in_the_same_batch_as_its_order(self) -> None:
        r, a, _ = two_origins()
        c1 = a.cancel(a.orders[0])
        o = a.order(SELL, 120, 1)
        c2 = a.cancel(o.hash)
        result = r.receive([c2, o, c1], now_ms=NOW_MS)
        assert result.accepted == (c1, o, c2) and not result.rejected


class TestEquivocation:
    def test_two_signed_entries_at_one_seq_are_kept_as_evidence(self) -> None:
        r, a, b = two_origins()
        stored = a.entries[1]
        twin = signed_entry(a.key, seq=2, hlc=stored.hlc, prev=stored.prev, body=Order(side=SELL, price=104,
                                                                                       qty=3))
        assert twin.hash != stored.hash
        vv, entries = r.version_vector(), r.entries()
        before = r.state_hash()
        result = r.receive([twin], now_ms=NOW_MS)
        only_rejection(result, Equivocation, twin)
        assert result.evidence == (a.origin,)
        # evidence kept, the twin not merged: the log keeps the branch it holds
        ev = r.evidence()
        assert list(ev) == [a.origin]
        assert ev[a.origin].first == stored and ev[a.origin].second == twin and ev[a.origin].seq == 2
        assert r.version_vector() == vv and r.entries() == entries
        assert r.state_hash() == before
        # cut just before the forked seq (what finality does), the state hash is
        # the same whichever branch a replica holds
        other = Replica()
        other.receive([a.entries[0], twin, *b.entries], now_ms=NOW_MS)
        assert other.state_hash({a.origin: 1}) == r.state_hash({a.origin: 1})
        # the evidence alone is proof for a fresh replica (it is what the node stores and gossips)
        fresh = Replica()
        assert fresh.restore_evidence(stored, twin)
        assert list(fresh.evidence()) == [a.origin]
        assert not Replica().restore_evidence(stored, stored)
        # the held branch goes on merging (finality decides what of it counts)
        nxt = a.heartbeat()
        assert r.receive([nxt], now_ms=NOW_MS).accepted == (nxt,)

    def test_evidence_with_a_lower_seq_replaces_a_higher_one(self) -> None:
        a = LogBuilder(key_for(0))
        for _ in range(4):
            a.heartbeat()
        twins = [signed_entry(a.key, seq=s, hlc=a.entries[s - 1].hlc, prev=a.entries[s - 1].prev,
                              body=Order(side=BUY, price=99, qty=s)) for s in (3, 2)]
        r = Replica()
        r.receive(a.entries, now_ms=NOW_MS)
        assert r.receive([twins[0]], now_ms=NOW_MS).evidence == (a.origin,)
        assert r.evidence()[a.origin].seq == 3
        assert r.receive([twins[1]], now_ms=NOW_MS).evidence == (a.origin,)
        assert r.evidence()[a.origin].seq == 2

    def test_a_successor_that_does_not_chain_makes_the_next_pull_ask_for_our_head_again(self) -> None:
        """Regression: a replica that held one branch of an equivocation never saw
        the other branch's entry at that seq (its vector says it has it), only
        its successors, refused as broken chains forever; no evidence ever
        formed.  Now the next pull asks for that seq again."""
        a = LogBuilder(key_for(0))
        a.heartbeat()
        first = a.heartbeat()
        twin = signed_entry(a.key, seq=2, hlc=first.hlc + 1, prev=first.prev, body=Heartbeat())
        after_twin = signed_entry(a.key, seq=3, hlc=first.hlc + 2, prev=twin.hash, body=Heartbeat())
        r = Replica()
        r.receive(a.entries, now_ms=NOW_MS)
        assert r.digest_for_sync()[a.origin] == 2
        result = r.receive([after_twin], now_ms=NOW_MS)
        assert [type(x.error) for x in result.rejected] == [BrokenChain]
        assert r.digest_for_sync()[a.origin] == 1
        assert r.receive([twin], now_ms=NOW_MS).evidence == (a.origin,)
        assert r.digest_for_sync()[a.origin] == 2

    def test_conflicting_entry_with_a_bad_signature_is_not_evidence(self) -> None:
        r, a, _ = two_origins()
        stored = a.entries[0]
        twin = signed_entry(a.key, seq=1, hlc=stored.hlc, prev=GENESIS, body=Heartbeat())
        assert_rejected_unchanged(r, with_sig(twin, tamper(twin.sig)), BadSignature)
        assert r.evidence() == {}

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


class TestBufferAbuse:
    """Issue: entries ahead of a gap were buffered without a signature check, and
    a later genuine entry with the same seq was ignored; 10,000 unsigned entries
    for an honest origin's next seqs slowed its replication from 0.7 s to 15 s,
    and the log blamed the honest sender."""

    def test_a_genuine_entry_displaces_a_forged_one_waiting_in_the_buffer(self) -> None:
        r, a, _ = two_origins()
        e3, e4 = a.heartbeat(), a.heartbeat()
        forged4 = with_sig(a.crafted(Order(side=SELL, price=1, qty=99), seq=4, hlc=e4.hlc, prev=e4.prev), bytes(64))
        assert r.receive([forged4], now_ms=NOW_MS, source="mallory").buffered == 1
        result = r.receive([e4], now_ms=NOW_MS, source="alice")
        assert [(x.seq, type(x.error), x.source) for x in result.rejected] == [(4, BadSignature, "mallory")]
        assert r.receive([e3], now_ms=NOW_MS, source="alice").accepted == (e3, e4)

    def test_a_forged_run_is_blamed_on_whoever_sent_it(self) -> None:
        r, a, _ = two_origins()
        e3, e4 = a.heartbeat(), a.heartbeat()
        r.receive([with_sig(e4, bytes(64))], now_ms=NOW_MS, source="mallory")
        result = r.receive([e3], now_ms=NOW_MS, source="alice")
        assert result.accepted == ()
        assert [(x.seq, x.source) for x in result.rejected] == [(4, "mallory")]
        assert r.receive([e3, e4], now_ms=NOW_MS, source="alice").accepted == (e3, e4)

    def test_one_sender_cannot_fill_the_buffer_for_everyone(self) -> None:
        a = LogBuilder(key_for(0))
        for _ in range(10):
            a.heartbeat()
        r = Replica(max_buffer_per_source=3)
        assert r.receive(a.entries[2:8], now_ms=NOW_MS, source="mallory").buffered == 3
        assert r.receive(a.entries[5:8], now_ms=NOW_MS, source="alice").buffered == 6

    def test_early_entries_are_evicted_by_age(self) -> None:
        a = LogBuilder(key_for(0))
        for _ in range(4):
            a.heartbeat()
        r = Replica(max_buffer_age_ms=1_000)
        r.receive(a.entries[2:], now_ms=NOW_MS)
        assert r.buffered() == 2
        assert r.expire(NOW_MS + 1_000) == 0
        assert r.expire(NOW_MS + 1_001) == 2 and r.buffered() == 0
        assert r.receive(a.entries, now_ms=NOW_MS + 2_000).accepted == tuple(a.entries)


class TestHeldWire:
    """The shell drops relayed duplicates before decoding them (each entry used
    to be decoded, re-encoded and hashed on every one of its relays)."""

    def test_a_held_entry_is_recognised_undecoded(self) -> None:
        r, a, b = two_origins()
        assert all(r.holds_wire(e.to_wire()) for e in [*a.entries, *b.entries])

    def test_another_entry_at_a_held_seq_is_not_dropped(self) -> None:
        r, _, _ = two_origins()
        other = LogBuilder(key_for(0))
        other.order(SELL, 99, 1)  # seq 1 of the same origin, different content: equivocation evidence
        assert not r.holds_wire(other.entries[0].to_wire())

    @pytest.mark.parametrize("item", [None, [], "x", [b"x", 1], [b"\x00" * 32, "1", 0, b"", [], [3], b""]])
    def test_anything_else_goes_to_the_decoder(self, item: Any) -> None:
        r, _, _ = two_origins()
        assert not r.holds_wire(item)

    def test_an_entry_not_held_yet_is_not_dropped(self) -> None:
        r, a, _ = two_origins()
        assert not r.holds_wire(a.order(BUY, 90, 1).to_wire())
