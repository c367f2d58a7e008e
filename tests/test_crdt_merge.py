"""The replicated state is a join-semilattice: merge is commutative, associative
and idempotent, buffered early entries merge once their gap fills, and the
digest/delta pair moves exactly what differs."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt import replica as replica_module
from crdt.entry import BUY, GENESIS, Entry, Heartbeat
from crdt.errors import BrokenChain, Equivocation
from crdt.replica import Replica, merged
from tests.conftest import (
    NOW_MS,
    LogBuilder,
    Op,
    build_logs,
    key_for,
    ops,
    prop,
    replica_snapshot,
    signed_entry,
)

N_REPLICAS = 3


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[LogBuilder], list[list[Entry]], int]:
    """1-5 origins with valid logs, and for each of three replicas a subset of the
    entries: a random prefix per origin plus some random later entries (which a
    replica can only buffer), and a seed for delivery order."""
    n_origins = draw(st.integers(1, 5))
    steps: list[Op] = draw(ops(n_origins, min_size=3 * n_origins, max_size=30))
    logs = build_logs(n_origins, steps)
    subsets: list[list[Entry]] = []
    for _ in range(N_REPLICAS):
        chosen: list[Entry] = []
        for log in logs:
            n = len(log.entries)
            prefix = draw(st.integers(0, n))
            chosen.extend(log.entries[:prefix])
            if prefix + 1 < n:
                extra = draw(st.lists(st.integers(prefix + 1, n - 1), max_size=3, unique=True))
                chosen.extend(log.entries[i] for i in extra)
        subsets.append(chosen)
    return logs, subsets, draw(st.integers(0, 2**32 - 1))


def deliver(replica: Replica, entries: Sequence[Entry], rng: random.Random) -> None:
    """Receive ``entries`` shuffled, in random batches."""
    pending = list(entries)
    rng.shuffle(pending)
    while pending:
        k = rng.randint(1, 4)
        batch, pending = pending[:k], pending[k:]
        result = replica.receive(batch, now_ms=NOW_MS)
        assert not result.rejected, result.rejected


def replica_of(entries: Sequence[Entry], rng: random.Random) -> Replica:
    r = Replica()
    deliver(r, entries, rng)
    return r


def expected_entries(logs: Sequence[LogBuilder], available: set[bytes]) -> list[Entry]:
    """The join: per origin, the longest gap-free prefix among ``available`` hashes,
    origin by origin (sorted) in seq order, which is the order of ``Replica.entries``."""
    out: list[Entry] = []
    for log in sorted(logs, key=lambda lg: lg.origin):
        for e in log.entries:
            if e.hash not in available:
                break
            out.append(e)
    return out


def state(r: Replica) -> tuple[object, ...]:
    """Merged state without the buffer: what ``merged`` is defined on."""
    return (r.state_hash(), r.version_vector(), r.entries(), sorted(r.evidence()))


class TestJoinSemilattice:
    @given(scenario())
    @prop(80)
    def test_merged_is_commutative_associative_idempotent(
        self, sc: tuple[list[LogBuilder], list[list[Entry]], int]
    ) -> None:
        logs, subsets, seed = sc
        rng = random.Random(seed)
        a, b, c = (replica_of(s, rng) for s in subsets)

        ab, ba = merged(a, b, now_ms=NOW_MS), merged(b, a, now_ms=NOW_MS)
        assert state(ab) == state(ba)

        left = merged(merged(a, b, now_ms=NOW_MS), c, now_ms=NOW_MS)
        right = merged(a, merged(b, c, now_ms=NOW_MS), now_ms=NOW_MS)
        assert state(left) == state(right)

        for x in (a, b, c, ab):
            assert state(merged(x, x, now_ms=NOW_MS)) == state(x)
            assert state(merged(x, Replica(), now_ms=NOW_MS)) == state(x)

        # the join is the per-origin longest prefix; neither input was changed
        have = {e.hash for r in (a, b) for e in r.entries()}
        assert ab.entries() == expected_entries(logs, have)
        assert state(a) == state(replica_of(subsets[0], random.Random(seed)))

    @given(scenario())
    @prop(80)
    def test_receive_depends_only_on_the_union_of_deliveries(
        self, sc: tuple[list[LogBuilder], list[list[Entry]], int]
    ) -> None:
        """Any delivery order, batching or repetition of the same sets of entries
        ends in the same state (buffer included): entries ahead of a gap wait."""
        logs, subsets, seed = sc
        rng = random.Random(seed)
        results = []
        for order in ((0, 1, 2), (2, 1, 0), (1, 0, 2, 1, 0)):
            r = Replica()
            for i in order:
                deliver(r, subsets[i], rng)
            results.append(replica_snapshot(r))
        assert results[0] == results[1] == results[2]

        union = {e.hash for s in subsets for e in s}
        r = Replica()
        for s in subsets:
            deliver(r, s, rng)
        expected = expected_entries(logs, union)
        assert r.entries() == expected
        assert r.buffered() == len(union) - len(expected)
        assert r.version_vector() == {
            lg.origin: n for lg in logs if (n := sum(1 for e in expected if e.origin == lg.origin))
        }

    @given(scenario())
    @prop(40)
    def test_merge_method_equals_merged(self, sc: tuple[list[LogBuilder], list[list[Entry]], int]) -> None:
        logs, subsets, seed = sc
        a = replica_of(subsets[0], random.Random(seed))
        b = replica_of(subsets[1], random.Random(seed + 1))
        joined = merged(a, b, now_ms=NOW_MS)
        a.merge(b, now_ms=NOW_MS)
        # ``a`` may also drain entries it had buffered, so it holds the join of
        # everything it was ever given with b's state
        given_to_a = {e.hash for e in subsets[0]} | {e.hash for e in b.entries()}
        assert a.entries() == expected_entries(logs, given_to_a)
        assert {e.hash for e in joined.entries()} <= {e.hash for e in a.entries()}
        again = a.merge(b, now_ms=NOW_MS)
        assert not again.accepted and not again.rejected
        assert again.duplicates == b.entry_count()


class TestDelta:
    @given(scenario())
    @prop(40)
    def test_delta_above_a_version_vector_brings_a_peer_level(
        self, sc: tuple[list[LogBuilder], list[list[Entry]], int]
    ) -> None:
        logs, subsets, seed = sc
        rng = random.Random(seed)
        a, b = replica_of(subsets[0], rng), replica_of(subsets[1], rng)
        missing, more = a.delta_entries(b.version_vector())
        assert not more
        vv = b.version_vector()
        # exactly the entries above b's vector, origin by origin in seq order
        assert missing == [e for e in a.entries() if e.seq > vv.get(e.origin, 0)]
        before = merged(a, b, now_ms=NOW_MS)
        b.receive(missing, now_ms=NOW_MS)
        given_to_b = {e.hash for e in subsets[1]} | {e.hash for e in a.entries()}
        assert b.entries() == expected_entries(logs, given_to_b)
        assert {e.hash for e in before.entries()} <= {e.hash for e in b.entries()}

    def test_delta_is_cut_at_max_entries(self) -> None:
        logs = build_logs(2, [Op(origin=i % 2, kind="heartbeat", side=0, price=1, qty=1, pick=0, dt=1)
                              for i in range(10)])
        r = Replica()
        for lg in logs:
            r.receive(lg.entries, now_ms=NOW_MS)
        out, more = r.delta_entries({}, max_entries=7)
        assert more and len(out) == 7
        assert out == r.entries()[:7]
        out, more = r.delta_entries({}, max_entries=10)
        assert not more and out == r.entries()
        assert r.delta(r.version_vector()) == ([], False)

    def test_delta_serves_the_origins_asked_first_before_the_others(self) -> None:
        """Regression: a joining node paged through a peer's strangers' entries
        (10,000 origins through a slow link) before it reached the member log
        holding its own admission, so it was not ready for over 20 s when the
        member's id happened to sort last."""
        logs = build_logs(3, [Op(origin=i % 3, kind="heartbeat", side=0, price=1, qty=1, pick=0, dt=1)
                              for i in range(9)])
        r = Replica()
        for lg in logs:
            r.receive(lg.entries, now_ms=NOW_MS)
        last = max(lg.origin for lg in logs)
        segments, more = r.delta({}, max_entries=3, first=[last])
        assert more and [s.origin for s in segments] == [last]
        segments, _ = r.delta({}, first=[last])
        assert [s.origin for s in segments] == [last, *sorted(lg.origin for lg in logs if lg.origin != last)]

    def test_delta_names_the_range_below_what_is_in_memory(self) -> None:
        """Entries pruned from memory (they are final) are read from the node's
        archive: the delta names their seq range instead of carrying them."""
        log = LogBuilder(key_for(0))
        for _ in range(6):
            log.heartbeat()
        r = Replica()
        r.receive(log.entries, now_ms=NOW_MS)
        assert r.prune(log.entries[3].hlc) == 4
        assert r.base(log.origin)[0] == 4 and r.log(log.origin) == log.entries[4:]
        assert r.version_vector() == {log.origin: 6}
        segments, more = r.delta({log.origin: 1}, max_entries=4)
        assert more
        assert [(s.lo, s.hi, s.entries) for s in segments] == [(2, 4, None), (5, 5, (log.entries[4],))]
        with pytest.raises(KeyError):
            r.delta_entries({}, max_entries=10)
        # the hash of the base stays known: the state hash and the chain still work
        before = r.state_hash()
        assert r.receive([log.heartbeat()], now_ms=NOW_MS).accepted == (log.entries[-1],)
        assert r.state_hash() != before

    def test_entries_below_the_pruned_base_cost_one_verification_per_batch(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Regression: every entry at or below the pruned base was verified one
        by one (to call a forgery a forgery, though nothing below the base can
        change): 100,000 entries re-sent while a fresh node caught up cost a
        signature check each, 65% of its catch-up time (11 s instead of 6)."""
        log = LogBuilder(key_for(0))
        for _ in range(6):
            log.heartbeat()
        r = Replica()
        r.receive(log.entries, now_ms=NOW_MS)
        r.prune(log.entries[3].hlc)
        real = replica_module._verify
        checks: list[Entry] = []
        monkeypatch.setattr(replica_module, "_verify", lambda e: checks.append(e) or real(e))
        forged = dataclasses.replace(log.entries[1], sig=bytes(64))  # a bad signature, below the base
        before = r.state_hash()
        got = r.receive([*log.entries[:3], forged], now_ms=NOW_MS)
        assert checks == [log.entries[0]] and got.accepted == () and got.rejected == () and got.duplicates == 4
        alone = r.receive([forged], now_ms=NOW_MS)  # one entry alone: checked, and called what it is
        assert [x.error.code for x in alone.rejected] == ["bad_signature"]
        assert r.state_hash() == before

    def test_version_vector_head_and_log(self) -> None:
        log = LogBuilder(key_for(0))
        log.heartbeat()
        log.order(0, 100, 1)
        r = Replica()
        r.receive(log.entries, now_ms=NOW_MS)
        assert r.version_vector() == {log.origin: 2}
        assert r.head(log.origin) == log.entries[-1]
        assert r.log(log.origin) == log.entries
        assert r.origins() == [log.origin]
        assert r.head_info(log.origin) == (2, log.entries[1].hash, log.entries[1].hlc)


class TestEvidenceInMerge:
    def test_merged_carries_evidence_from_either_side(self) -> None:
        a_log, b_log = LogBuilder(key_for(0)), LogBuilder(key_for(1))
        first = a_log.order(BUY, 100, 1)
        b_log.heartbeat()
        twin = signed_entry(a_log.key, seq=1, hlc=first.hlc, prev=first.prev, body=Heartbeat())
        honest, accuser = Replica(), Replica()
        honest.receive([*b_log.entries], now_ms=NOW_MS)
        accuser.receive([first, *b_log.entries], now_ms=NOW_MS)
        accuser.receive([twin], now_ms=NOW_MS)
        assert list(accuser.evidence()) == [a_log.origin]
        for out in (merged(honest, accuser, now_ms=NOW_MS), merged(accuser, honest, now_ms=NOW_MS)):
            assert list(out.evidence()) == [a_log.origin]
            assert out.state_hash() == accuser.state_hash()
            assert out.entries() == accuser.entries()
            # the twin is still refused after the merge
            assert type(out.receive([twin], now_ms=NOW_MS).rejected[0].error) is Equivocation

    def test_trusted_receive_skips_signatures_only(self) -> None:
        """``trusted`` is for a node's own fresh entries: no signature check, every
        other check still applies."""
        log = LogBuilder(key_for(0))
        e1 = log.heartbeat()
        unsigned = Entry(origin=e1.origin, seq=1, hlc=e1.hlc, prev=e1.prev, body=e1.body, sig=bytes(64),
                         hash=e1.hash)
        r = Replica()
        assert r.receive([unsigned], now_ms=NOW_MS, trusted=True).accepted == (unsigned,)
        broken = log.crafted(Heartbeat(), prev=GENESIS)
        assert type(r.receive([broken], now_ms=NOW_MS, trusted=True).rejected[0].error) is BrokenChain
