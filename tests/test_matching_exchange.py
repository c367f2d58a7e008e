"""The node core (replica, membership, finality, engine).

Replicas fed the same entries through drops, duplicates, reorders and gaps
converge to the same state, book and fills byte for byte; only members'
entries are matched; submitting and cancelling; fills become final and stay
final; a silent member is voted out; an equivocating member's fork is cut the
same way everywhere; a restart from a checkpoint gives the same state.

Multi-node tests run the pure core in lockstep in this process (every entry
reaches every node at once, unless a test holds some back): no sockets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.entry import BUY, GENESIS, IOC, SELL, Admit, Cancel, Entry, Evict, Heartbeat, Order, make_entry
from crdt.errors import ClockUnhealthy, ForeignCancel, NotMember, WrongNetwork
from crdt.hlc import physical_ms
from crdt.keys import SigningKey
from crdt.membership import Decision, Membership
from matching.engine import CANCELLED, FILLED, OPEN, PARTIAL, Fill, FinalOrder
from matching.exchange import (
    Exchange,
    NotCancellable,
    Params,
    Received,
    UnknownOrder,
    _Effects,
    fill_id,
    record_of,
)
from matching.reference import reference
from tests.conftest import (
    NOW_MS,
    LogBuilder,
    Op,
    admit_all,
    build_logs,
    engine_view,
    genesis_of,
    key_for,
    ops,
    prop,
    signed_entry,
)

OBSERVER_KEYS = 100  # observers get keys far from the origins' ones


def all_entries(logs: Sequence[LogBuilder]) -> list[Entry]:
    return [e for lg in logs for e in lg.entries]


def order_ids(entries: Sequence[Entry]) -> list[bytes]:
    return [e.hash for e in entries if isinstance(e.body, Order)]


def records(entries: Sequence[Entry]) -> list[object]:
    return [r for r in (record_of(e) for e in entries) if r is not None]


def observer(i: int, network: bytes) -> Exchange:
    return Exchange(key_for(OBSERVER_KEYS + i), network=network)


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


def late_bid_world() -> tuple[list[Entry], Entry, Entry, Entry, Exchange]:
    """Three members; a's ask at 100, b's bid at 101 stamped before c's bid
    at 100; an observer.  Delivered without b's bid (``first``: a's log, b's
    vote that completes c's admission, c's bid), c's bid takes the ask; b's
    bid then arrives late and takes it in its place."""
    a, b, c = (LogBuilder(key_for(i)) for i in range(3))
    admit_all([a, b, c], ms=NOW_MS - 1_000)
    ask = a.order(SELL, 100, 1, ms=NOW_MS - 30)
    early_bid = b.order(BUY, 101, 1, ms=NOW_MS - 20)
    late_bid = c.order(BUY, 100, 1, ms=NOW_MS - 10)
    return [*a.entries, b.entries[0], late_bid], ask, early_bid, late_bid, observer(0, a.entries[0].hash)


class Lockstep:
    """Exchanges that hear each other at once, on one shared clock, in this process."""

    def __init__(self, n: int, *, params: Params | None = None, key_offset: int = 0) -> None:
        self.now = NOW_MS
        self.params = params or Params(heartbeat_ms=10, liveness_ms=200, evict_after_ms=600)
        self.nodes = [Exchange(key_for(key_offset + i), params=self.params) for i in range(n)]
        self.down: set[int] = set()  # nodes that neither write nor hear
        self.log: list[Entry] = []  # everything written, in order
        self.finals: dict[int, list[Fill]] = {i: [] for i in range(n)}
        self.final_orders: dict[int, dict[bytes, FinalOrder]] = {i: {} for i in range(n)}
        self.retired: dict[int, list[tuple[bytes, bytes]]] = {i: [] for i in range(n)}  # as the node keeps them
        genesis = self.nodes[0].found(now_ms=self.now)
        self._apply(0, genesis)
        for j, ex in enumerate(self.nodes[1:], start=1):
            ex.set_network(self.nodes[0].network or b"")
            for v in range(j // 2 + 1):  # admission takes a majority of the members so far
                while not self.nodes[v].is_member():
                    self.deliver()  # its own admission has not reached it yet
                self._apply(v, self.nodes[v].prepare(Admit(member=ex.node_id, after=0), now_ms=self.now))
        self.deliver()

    def _apply(self, i: int, entry: Entry) -> None:
        self.nodes[i].apply_own(entry, now_ms=self.now)
        self.log.append(entry)
        self._collect(i)

    def _collect(self, i: int) -> None:
        for batch in self.nodes[i].take_finalized():
            assert batch.first_seq == len(self.finals[i])
            self.finals[i] += batch.fills
            for fo in batch.orders:
                self.final_orders[i][fo.oid] = fo
            self.retired[i] += batch.retired

    def write(self, i: int, body: object) -> Entry:
        entry = self.nodes[i].prepare(body, now_ms=self.now)  # type: ignore[arg-type]
        self._apply(i, entry)
        return entry

    def deliver(self) -> None:
        for i, ex in enumerate(self.nodes):
            if i not in self.down:
                ex.receive(list(self.log), now_ms=self.now)
                self._collect(i)

    def run(self, ms: int, *, step: int = 5) -> None:
        for _ in range(ms // step):
            self.now += step
            for i, ex in enumerate(self.nodes):
                if i in self.down:
                    continue
                _, body = ex.tick(now_ms=self.now)
                self._collect(i)
                if body is not None:
                    self._apply(i, ex.prepare(body, now_ms=self.now))
            self.deliver()

    def live(self) -> list[Exchange]:
        return [ex for i, ex in enumerate(self.nodes) if i not in self.down]


class Jittered(Lockstep):
    """Like ``Lockstep``, but each entry reaches each node after 0 to 6 steps."""

    def __init__(self, n: int, *, params: Params, rng: random.Random) -> None:
        self.rng = rng
        self.steps = 0
        self.due: dict[int, dict[int, int]] = {}  # node -> log index -> step it arrives
        super().__init__(n, params=params)

    def deliver(self) -> None:
        self.steps += 1
        for i, ex in enumerate(self.nodes):
            due = self.due.setdefault(i, {})
            for k in range(len(due), len(self.log)):
                due[k] = self.steps + self.rng.randint(0, 6)
            ex.receive([self.log[k] for k, t in due.items() if t <= self.steps], now_ms=self.now)
            self._collect(i)


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
        logs = build_logs(n_origins, steps, members=True)
        network = genesis_of(logs)
        entries = all_entries(logs)
        oids = order_ids(entries)

        # the ground truth: one replica that got everything in log order, in one batch
        truth = observer(0, network)
        result = truth.receive(entries, now_ms=NOW_MS)
        assert len(result.merge.accepted) == len(entries) and not result.merge.rejected
        want = full_view(truth, oids)
        ref = reference(records(entries))
        assert truth.engine.fills == ref.fills

        rng = random.Random(seed)
        for i in range(n_replicas):
            ex = observer(1 + i, network)
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
        first, ask, early_bid, late_bid, ex = late_bid_world()
        ex.receive(first, now_ms=NOW_MS)
        assert ex.engine.fills == [(late_bid.hash, ask.hash, 100, 1)]
        got = ex.receive([early_bid], now_ms=NOW_MS)
        assert got.revoked == ((late_bid.hash, ask.hash, 100, 1),)
        assert got.added == ((early_bid.hash, ask.hash, 100, 1),)
        status = ex.status(late_bid.hash)
        assert status is not None and status.state == OPEN


def _key(hlc: int, tag: int) -> bytes:
    return hlc.to_bytes(8, "big") + bytes([tag]) * 32


def _four_members(genesis: bytes, a: bytes, b: bytes, c: bytes, d: bytes) -> Membership:
    """a founds (genesis key ``genesis``); a and b admit b, c and d in turn."""
    m = Membership(genesis[8:])
    m.add_admit(key=genesis, admitter=a, seq=1, entry_hash=genesis[8:], member=a, after=1)
    for i, o in enumerate((b, c, d)):
        m.add_admit(key=_key(11 + i, 1), admitter=a, seq=2 + i, entry_hash=bytes([i]) * 32, member=o, after=0)
        m.add_admit(key=_key(11 + i, 2), admitter=b, seq=1 + i, entry_hash=bytes([9 + i]) * 32, member=o, after=0)
    return m


class TestQuorumAdmission:
    """Admission is a majority decision of the current members (issue 20: a
    single member admitting alone let each side of a partition grow a
    majority of its own)."""

    def _two_members(self) -> tuple[LogBuilder, LogBuilder, LogBuilder]:
        a, b, c = (LogBuilder(key_for(i)) for i in range(3))
        from tests.conftest import admit_all
        admit_all([a, b], ms=NOW_MS - 1_000)  # a founds and admits b alone: a majority of one
        return a, b, c

    def test_one_member_of_two_cannot_admit_and_the_second_vote_decides(self) -> None:
        a, b, c = self._two_members()
        first = a.append(Admit(member=c.origin, after=3), ms=NOW_MS - 500)
        ex = observer(0, a.entries[0].hash)
        ex.receive([*a.entries], now_ms=NOW_MS)
        assert ex.membership.is_member(b.origin) and not ex.membership.is_member(c.origin)
        assert ex.membership.admitting() == {c.origin: [a.origin]}
        second = b.append(Admit(member=c.origin, after=5), ms=NOW_MS - 400)
        ex.receive([second], now_ms=NOW_MS)
        assert ex.membership.is_member(c.origin) and ex.membership.admitting() == {}
        (iv,) = ex.membership.intervals(c.origin)
        # decided at the vote that completes the majority, with the highest after among the votes
        assert iv.start == max(first.key, second.key) and iv.after == 5
        assert sorted(iv.voters) == sorted([(a.origin, first.seq), (b.origin, second.seq)])

    def test_votes_of_non_members_and_repeated_votes_do_not_count(self) -> None:
        a, b, c = self._two_members()
        d = LogBuilder(key_for(3))
        votes = [a.append(Admit(member=c.origin, after=0), ms=NOW_MS - 500),
                 a.append(Admit(member=c.origin, after=0), ms=NOW_MS - 400),
                 d.append(Admit(member=c.origin, after=0), ms=NOW_MS - 300)]
        ex = observer(0, a.entries[0].hash)
        ex.receive([*a.entries, *b.entries, *votes[2:]], now_ms=NOW_MS)
        assert not ex.membership.is_member(c.origin)

    def test_a_member_votes_once_per_joiner_and_never_for_itself(self) -> None:
        net = Lockstep(2)
        joiner = key_for(7).public
        a = net.nodes[0]
        vote = a.admission_vote(joiner, 4)
        assert vote == Admit(member=joiner, after=4)
        net.write(0, vote)
        net.deliver()
        assert a.admission_vote(joiner, 4) is None  # cast, waiting for a majority
        assert not a.membership.is_member(joiner)
        assert a.admission_vote(a.node_id, 0) is None
        b = net.nodes[1]
        other = b.admission_vote(joiner, 2)
        assert other is not None and other.after == 2  # what the joiner says, or what b holds of its log
        net.write(1, other)
        net.deliver()
        assert all(ex.membership.is_member(joiner) for ex in net.nodes)
        assert a.membership.intervals(joiner)[0].after == 4  # the highest among the votes
        assert b.admission_vote(joiner, 2) is None  # a member already

    def test_undecided_votes_survive_compaction_and_a_checkpoint(self) -> None:
        """A vote below the floor that decided nothing yet still counts when a
        later vote completes the majority, counted against the members there;
        a node that compacted must decide exactly as one that did not."""
        a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
        genesis = _key(10, 9)

        def base() -> Membership:
            m = Membership(genesis[8:])
            m.add_admit(key=genesis, admitter=a, seq=1, entry_hash=genesis[8:], member=a, after=1)
            m.add_admit(key=_key(11, 1), admitter=a, seq=2, entry_hash=b"x" * 32, member=b, after=0)
            m.add_admit(key=_key(12, 1), admitter=a, seq=3, entry_hash=b"y" * 32, member=c, after=2)
            return m

        plain, compacted = base(), base()
        compacted.compact(_key(13, 0))
        restored = Membership(genesis[8:])
        restored.restore(compacted.snapshot())
        for m in (plain, compacted, restored):
            assert not m.is_member(c) and m.voted(a, c)
            m.add_admit(key=_key(14, 2), admitter=b, seq=1, entry_hash=b"z" * 32, member=c, after=1)
            assert m.is_member(c)
        assert plain.intervals(c) == compacted.intervals(c) == restored.intervals(c)
        assert plain.intervals(c)[0].after == 2

    def test_a_vote_past_its_writers_cut_counts_nowhere_whenever_it_arrives(self) -> None:
        """Regression, a way for a 2|3 split (chaos ``split``) to stop finality
        for good after the heal: a minority member, not yet voted out, votes
        to admit its voted-out partner, and is then voted out itself with a cut
        below that vote.  A node that held the vote when it decided that
        eviction dropped it as void; a node whose copy of the vote came after
        the decision counted it, since at the vote's key its writer was still a
        member.  The two derived different admissions, and digests commit to
        admissions, so their acks never matched again."""
        a, b, c, d, x = (bytes([i]) * 32 for i in (1, 2, 3, 4, 5))
        genesis = _key(10, 9)
        void_vote = dict(key=_key(20, 3), admitter=c, seq=9, entry_hash=b"v" * 32, member=x, after=3)
        c_out = Decision(member=c, at=_key(30, 1), cut=8)  # c's vote (seq 9) is past its cut

        def members() -> Membership:
            return _four_members(genesis, a, b, c, d)

        held, late = members(), members()
        held.add_admit(**void_vote)  # the vote first, then the decision that makes it void
        held.remove_events([void_vote["key"]])
        held.add_decision(c_out)
        late.add_decision(c_out)  # the decision first, then the vote
        late.add_admit(**void_vote)
        for m in (held, late):
            # a's and b's votes, before c's eviction: with c's void vote they would be 3 of 4
            m.add_admit(key=_key(25, 1), admitter=a, seq=9, entry_hash=b"a" * 32, member=x, after=3)
            m.add_admit(key=_key(26, 2), admitter=b, seq=9, entry_hash=b"b" * 32, member=x, after=3)
            assert not m.is_member(x)
            # d's vote, after c's eviction: 3 of the 3 members
            m.add_admit(key=_key(40, 4), admitter=d, seq=9, entry_hash=b"d" * 32, member=x, after=3)
            assert m.is_member(x)
        assert held.intervals(x) == late.intervals(x)
        assert held.intervals(x)[0].start == _key(40, 4)

    def test_a_joiner_admitted_by_a_vote_from_a_clock_ahead_writes_once_its_clock_passes_it(self) -> None:
        """Regression (found by the simulator's check that every order a node
        wrote counts or is reported void; seeds 79, 82, 86, 109, 166 and five
        more of 0-299): the vote that decided a joiner's admission was stamped
        by a voter whose clock was ahead, beyond what the joiner's clock
        observes.  The joiner saw itself a member and accepted orders, stamped
        before that vote, so they counted nowhere and were never reported.
        It now writes nothing until its clock passes the deciding vote."""
        a, b = (LogBuilder(key_for(i)) for i in range(2))
        from tests.conftest import admit_all
        admit_all([a, b], ms=NOW_MS - 2_000)
        joiner = Exchange(key_for(9), network=a.entries[0].hash)
        joiner.receive([e for log in (a, b) for e in log.entries], now_ms=NOW_MS)
        a.append(Admit(member=joiner.node_id, after=0), ms=NOW_MS)
        ahead = b.append(Admit(member=joiner.node_id, after=0), ms=NOW_MS + 5_000)  # b's clock is 5 s ahead
        joiner.receive([a.entries[-1], ahead], now_ms=NOW_MS)
        assert joiner.is_member() and joiner.membership.admitted_at(joiner.node_id) == ahead.key
        with pytest.raises(NotMember, match="ahead of its clock"):
            joiner.prepare(Order(side=BUY, price=100, qty=5), now_ms=NOW_MS + 100)
        order = joiner.prepare(Order(side=BUY, price=100, qty=5), now_ms=NOW_MS + 5_001)
        joiner.apply_own(order, now_ms=NOW_MS + 5_001)
        assert order.key > ahead.key and joiner.membership.valid(joiner.node_id, order.seq, order.key)
        assert joiner.status(order.hash) is not None

    def test_a_joiner_whose_admission_a_void_vote_completed_reports_its_orders_void(self) -> None:
        """Regression (``make chaos``, ``split``, with digests without a member
        committing to the memberships its eviction leaves): a joiner got two
        votes of four members, the split came, and the third vote, from a
        member on its side, completed its admission in its own view.  It
        traded as a member.  Once it decided that member's eviction, with a
        cut before the vote, its admission was undone and its orders counted
        nowhere: seven acknowledged orders answered 404 on every node, itself
        included.  They are now reported void on the joiner."""
        a, b, c, d = (LogBuilder(key_for(i)) for i in range(4))
        from tests.conftest import admit_all
        admit_all([a, b, c, d], ms=NOW_MS - 2_000)
        joiner = Exchange(key_for(9), network=a.entries[0].hash)
        joiner.receive([e for log in (a, b, c, d) for e in log.entries], now_ms=NOW_MS - 1_000)
        a.append(Admit(member=joiner.node_id, after=0), ms=NOW_MS - 900)
        b.append(Admit(member=joiner.node_id, after=0), ms=NOW_MS - 900)
        joiner.receive([a.entries[-1], b.entries[-1]], now_ms=NOW_MS - 900)
        assert not joiner.is_member()  # 2 of 4
        cut = len(c.entries)
        vote = c.append(Admit(member=joiner.node_id, after=0), ms=NOW_MS - 800)  # past the cut below
        joiner.receive([vote], now_ms=NOW_MS - 800)
        assert joiner.is_member()  # 3 of 4, in its own view
        order = joiner.prepare(Order(side=BUY, price=100, qty=5), now_ms=NOW_MS - 700)
        joiner.apply_own(order, now_ms=NOW_MS - 700)
        assert joiner.status(order.hash) is not None
        # the majority's eviction of c, at its deciding vote, with c's cut before c's vote
        deciding = a.append(Evict(member=c.origin, cut=cut), ms=NOW_MS - 600)
        fx = _Effects()
        joiner._decide(Decision(member=c.origin, at=deciding.key, cut=cut), fx)
        joiner._check_own(fx)  # what settling after a decision does
        assert not joiner.is_member()
        assert fx.unadmitted == [order] and not fx.voided
        joiner._check_own(fx)
        assert fx.unadmitted == [order]  # reported once

    def test_a_membership_with_an_eviction_applied_is_the_one_the_decided_nodes_derive(self) -> None:
        """``Membership.with_decision``, what digests *without* a contested member
        commit to (the fix for ``python -m sim --schedule admission-split``): a
        node that has not decided c's eviction yet counts c's vote for x, which
        completes x's admission in its view only; with the eviction applied,
        the copy derives what the decided nodes derive, and the original is
        untouched until the decision is taken."""
        a, b, c, d, x = (bytes([i]) * 32 for i in (1, 2, 3, 4, 5))
        genesis = _key(10, 9)
        c_out = Decision(member=c, at=_key(30, 1), cut=8)

        def members() -> Membership:
            m = _four_members(genesis, a, b, c, d)
            m.add_admit(key=_key(19, 1), admitter=a, seq=9, entry_hash=b"a" * 32, member=x, after=3)
            m.add_admit(key=_key(19, 2), admitter=b, seq=9, entry_hash=b"b" * 32, member=x, after=3)
            m.add_admit(key=_key(20, 3), admitter=c, seq=9, entry_hash=b"v" * 32, member=x, after=3)  # past c's cut
            m.add_admit(key=_key(40, 4), admitter=d, seq=9, entry_hash=b"d" * 32, member=x, after=3)
            return m

        undecided, decided = members(), members()
        decided.add_decision(c_out)
        assert undecided.intervals(x)[0].start == _key(20, 3)  # c's vote completed 3 of 4
        assert decided.intervals(x)[0].start == _key(40, 4)  # void: d's completed 3 of 3
        before = undecided.revision
        after = undecided.with_decision(c_out)
        assert after.intervals(x) == decided.intervals(x) and after.intervals(c) == decided.intervals(c)
        assert undecided.intervals(x)[0].start == _key(20, 3) and undecided.revision == before


class TestMembership:
    def test_entries_of_a_non_member_are_kept_and_relayed_but_never_matched(self) -> None:
        net = Lockstep(2)
        ask = net.write(0, Order(side=SELL, price=100, qty=5))
        net.deliver()
        stranger = LogBuilder(key_for(50))
        bid = stranger.order(BUY, 101, 5, ms=net.now)
        for ex in net.nodes:
            got = ex.receive([bid], now_ms=net.now)
            assert got.merge.accepted == (bid,)  # stored (and so relayed)
            assert ex.engine.fills == [] and ex.status(bid.hash) is None
            st = ex.status(ask.hash)
            assert st is not None and st.remaining == 5

    def test_a_past_stamped_entry_from_a_fresh_key_cannot_rewrite_a_trade(self) -> None:
        """Regression: a fresh key's sell stamped in 1970 sorted before every
        order and turned an acknowledged trade into the attacker's, at the CPU
        cost of a rewind (or a rebuild) per such entry."""
        net = Lockstep(2)
        ask = net.write(0, Order(side=SELL, price=100, qty=5))
        net.deliver()
        bid = net.write(1, Order(side=BUY, price=100, qty=5))
        net.deliver()
        trade = (bid.hash, ask.hash, 100, 5)
        assert all(ex.engine.fills == [trade] for ex in net.nodes)
        attacker = SigningKey(bytes(range(7, 39)))
        old = make_entry(attacker, seq=1, hlc=1_000 << 16, prev=GENESIS, body=Order(side=SELL, price=90, qty=5))
        for ex in net.nodes:
            got = ex.receive([old], now_ms=net.now)
            assert got.merge.accepted == (old,) and got.revoked == () and got.added == ()
            assert ex.engine.fills == [trade] and ex.anomalies == 0

    def test_entries_stamped_before_the_admission_are_never_matched(self) -> None:
        net = Lockstep(1)
        late = Exchange(key_for(9), params=net.params)
        early = late.key
        # an order signed before it was admitted (a node cannot do this through prepare)
        pre = make_entry(early, seq=1, hlc=(net.now - 500) << 16, prev=GENESIS,
                         body=Order(side=BUY, price=200, qty=1))
        net.write(0, Order(side=SELL, price=100, qty=1))
        net.write(0, Admit(member=late.node_id, after=0))
        got = net.nodes[0].receive([pre], now_ms=net.now)
        assert got.merge.accepted == (pre,) and net.nodes[0].engine.fills == []

    def test_writing_needs_membership_and_one_network(self) -> None:
        lone = Exchange(key_for(0))
        with pytest.raises(NotMember):
            lone.prepare(Order(side=BUY, price=1, qty=1), now_ms=NOW_MS)
        net = Lockstep(1)
        with pytest.raises(WrongNetwork):
            net.nodes[0].set_network(bytes(32))
        with pytest.raises(WrongNetwork):
            net.nodes[0].found(now_ms=NOW_MS)


class TestFinality:
    def test_a_lone_member_is_final_at_once(self) -> None:
        net = Lockstep(1)
        ask = net.write(0, Order(side=SELL, price=100, qty=5))
        bid = net.write(0, Order(side=BUY, price=100, qty=2))
        ex = net.nodes[0]
        assert ex.frontiers().final >= bid.hlc
        assert net.finals[0] == [(bid.hash, ask.hash, 100, 2)]
        assert ex.engine.fills == [] and ex.engine.fills_base == 1
        assert ex.order_final(ask.hash) and ex.pending() == 0

    def test_fills_become_final_everywhere_in_the_same_order(self) -> None:
        net = Lockstep(4)
        rng = random.Random(7)
        for _ in range(60):
            i = rng.randrange(4)
            net.write(i, Order(side=rng.randrange(2), price=100 + rng.randint(-2, 2), qty=rng.randint(1, 5)))
            if rng.random() < 0.5:
                net.deliver()
            net.run(5)
        net.run(300)
        finals = [net.finals[i] for i in range(4)]
        assert finals[0] and all(f == finals[0] for f in finals)
        assert all(ex.pending() == 0 for ex in net.nodes)
        assert len({ex.final_digest for ex in net.nodes}) == 1
        # and they are what the naive reference finds in the same entries
        want = reference(records([e for e in net.log if e.origin in {x.node_id for x in net.nodes}])).fills
        assert finals[0] == want

    def test_heartbeats_stop_when_everything_is_final(self) -> None:
        net = Lockstep(3)
        net.write(0, Order(side=SELL, price=100, qty=1))
        net.run(200)
        assert all(ex.pending() == 0 for ex in net.nodes)
        written = len(net.log)
        net.run(1_000)  # nothing to make final: only a liveness entry per member every 200 ms
        assert len(net.log) - written <= 3 * (1_000 // 200 + 1)

    @pytest.mark.parametrize("seed", [22, 29, 34, 43])
    def test_a_node_final_first_still_publishes_its_frontiers(self, seed: int) -> None:
        """Regression: a member that reached the final frontier in the same step
        as its own level-1 frontier wrote nothing more, so the others, who need
        its published frontier, waited for its next liveness entry (3 s)."""
        rng = random.Random(seed)
        net = Jittered(4, params=Params(heartbeat_ms=10, liveness_ms=3_000, evict_after_ms=60_000), rng=rng)
        net.run(300)
        for _ in range(4):
            net.write(rng.randrange(4), Order(side=rng.randrange(2), price=100 + rng.randint(-2, 2),
                                              qty=rng.randint(1, 5)))
            net.run(5)
        net.run(1_000)  # simulated time: a third of the liveness interval
        assert all(ex.pending() == 0 for ex in net.nodes)

    def test_a_silent_member_is_voted_out_and_finality_resumes(self) -> None:
        net = Lockstep(4)
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(100)
        gone = net.nodes[3].node_id
        net.down.add(3)
        bid = net.write(1, Order(side=BUY, price=100, qty=2))
        net.run(300)
        assert all(ex.frontiers().final < bid.hlc for ex in net.live())  # held back by the silent member
        before = [list(net.finals[i]) for i in range(3)]
        net.run(1_000)
        for i, ex in enumerate(net.live()):
            assert not ex.membership.is_member(gone)
            assert ex.frontiers().final >= bid.hlc
            assert net.finals[i][:len(before[i])] == before[i]  # nothing final changed
        assert len({tuple(net.finals[i]) for i in range(3)}) == 1

    def test_entries_held_before_the_network_is_known_count_once_it_is(self) -> None:
        """Regression: a joining node that received the founder's log before the
        member's welcome named the network never saw the genesis as one, had no
        members, and never became ready (a catch-up test through a slow link
        failed whenever the member's log came early in the sync)."""
        founder, joiner = Exchange(key_for(0)), Exchange(key_for(1))
        genesis = founder.found(now_ms=NOW_MS)
        founder.apply_own(genesis, now_ms=NOW_MS)
        admit = founder.prepare(Admit(member=joiner.node_id, after=0), now_ms=NOW_MS)
        founder.apply_own(admit, now_ms=NOW_MS)
        joiner.receive([genesis, admit], now_ms=NOW_MS)
        assert joiner.membership.members() == []
        assert founder.network is not None
        joiner.set_network(founder.network)
        assert joiner.membership.is_member(founder.node_id) and joiner.is_member()

    def test_digests_commit_to_eviction_decisions(self) -> None:
        """Two nodes holding the same logs but not the same decisions must not
        match each other's acks (storm seed 351: a node that had lost the votes
        against itself finalized its own voided entries)."""
        net = Lockstep(3)
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(100)
        ex = net.nodes[0]
        fin = ex.finality
        k = fin.complete
        before = fin.digest(k)
        x = net.nodes[2].node_id
        last = ex.replica.tail(x)[-1]
        ex.membership.add_decision(Decision(member=x, at=last.key, cut=last.seq))
        fin.invalidate()
        assert ex.replica.length(x) == last.seq  # the same log
        assert fin.digest(k) != before

    def test_a_member_back_before_the_eviction_stays_a_member(self) -> None:
        net = Lockstep(3)
        net.run(50)
        net.down.add(2)
        net.run(300)  # shorter than evict_after
        net.down.clear()
        net.deliver()
        net.run(800)
        assert all(ex.membership.is_member(net.nodes[2].node_id) for ex in net.nodes)
        assert len({ex.frontiers().final for ex in net.nodes}) <= 2

    def test_an_equivocating_member_is_cut_the_same_way_everywhere(self) -> None:
        """Regression: two replicas that first saw different branches of an
        equivocating origin kept different prefixes of it for good (and so
        different state hashes)."""
        net = Lockstep(4)
        net.run(100)
        liar = net.nodes[3]
        seq, prev, _ = liar.replica.head_info(liar.node_id)
        a = liar.prepare(Order(side=BUY, price=105, qty=3), now_ms=net.now)
        b = make_entry(liar.key, seq=seq + 1, hlc=a.hlc + 1, prev=prev, body=Order(side=SELL, price=95, qty=3),
                       ack=a.ack)
        net.down.add(3)
        net.nodes[0].receive([a], now_ms=net.now)
        net.nodes[1].receive([b], now_ms=net.now)
        assert net.nodes[0].state_hash() != net.nodes[1].state_hash()
        for ex in net.live():  # the evidence spreads the way the nodes gossip it
            ev = [x.replica.evidence() for x in net.live()]
            ex.receive([a], now_ms=net.now)
            ex.receive([b], now_ms=net.now)
            del ev
        net.run(1_500)
        live = net.live()
        assert len({ex.state_hash() for ex in live}) == 1
        assert all(ex.finality.end(liar.node_id) == seq for ex in live)
        assert all(not ex.membership.is_member(liar.node_id) for ex in live)
        assert len({tuple(net.finals[i]) for i in range(3)}) == 1

    def test_a_voter_that_crashes_right_after_voting_is_voted_out(self) -> None:
        """Regression: a member voted against a live member and crashed.  Its
        vote stayed live, so the live member counted as under vote, nobody
        started a vote against the crashed voter, and finality stalled until
        it came back.  Now a vote whose voter is silent holds up no vote, and
        the voter's eviction retracts its vote."""
        net = Lockstep(4, params=Params(heartbeat_ms=10, liveness_ms=200, evict_after_ms=150))
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(50)
        voter, target = net.nodes[3], net.nodes[2].node_id
        net.write(3, Evict(member=target, cut=voter.finality.end(target)))
        net.run(10)
        net.down.add(3)
        bid = net.write(1, Order(side=BUY, price=100, qty=2))
        net.run(100)
        assert all(target in ex.finality.contested() for ex in net.live())
        net.run(600)
        for ex in net.live():
            assert not ex.membership.is_member(voter.node_id)
            assert ex.membership.is_member(target)
            assert ex.frontiers().final >= bid.hlc
            assert ex.finality.contested() == []
        assert len({tuple(net.finals[i]) for i in range(3)}) == 1

    def test_a_node_restarted_from_before_an_eviction_keeps_the_votes_of_the_next_one(self) -> None:
        """Regression: a member was voted out, admitted again, and voted out
        again.  A node restarted from a checkpoint older than the first
        eviction reloads the votes of both at once; deciding the first deleted
        them all, so it never decided the second while the others did, and
        finality stalled for good on every node (their digests commit to
        decisions).  A decision now spends only the votes up to it."""
        net = Lockstep(4, params=Params(heartbeat_ms=10, liveness_ms=200, evict_after_ms=150))
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(50)
        x = net.nodes[3]
        net.down.add(3)
        net.run(600)
        assert all(not ex.membership.is_member(x.node_id) for ex in net.live())
        net.down.discard(3)
        net.deliver()
        for v in (0, 1):  # admitted again by two of the three members
            net.write(v, Admit(member=x.node_id, after=x.replica.length(x.node_id)))
        net.run(100)
        assert all(ex.membership.is_member(x.node_id) for ex in net.nodes)
        net.down.add(3)
        net.run(300)  # voted out again
        assert [d.member for d in net.nodes[0].membership.decisions()] == [x.node_id] * 2
        restarted = Exchange(net.nodes[1].key, network=net.nodes[1].network, params=net.params)
        restarted.load(None, [], list(net.log), mono_ms=net.now)  # no checkpoint: from before the first
        net.nodes[1] = restarted
        bid = net.write(1, Order(side=BUY, price=100, qty=2))
        net.run(1_000)
        want = net.nodes[0].membership.decisions()
        for ex in net.live():
            assert ex.membership.decisions() == want
            assert ex.frontiers().final >= bid.hlc and ex.pending() == 0

    def test_a_forked_log_matched_in_full_when_its_prefix_arrives_after_the_evidence(self) -> None:
        """Regression (simulator seed 1383): a node that got the evidence of an
        equivocation while it held only part of the forker's log told membership
        that the log ended there, and never moved that end as the rest of the
        log arrived.  It left those entries unmatched while its digests
        committed to them, and finalized different fills from the other nodes."""
        net = Lockstep(3)
        net.run(100)
        liar, late = net.nodes[2], net.nodes[1]
        net.down.add(2)
        held_back = []
        for price in (101, 102, 103):
            e = liar.prepare(Order(side=BUY, price=price, qty=1), now_ms=net.now)
            liar.apply_own(e, now_ms=net.now)
            held_back.append(e)
        seq, prev, _ = liar.replica.head_info(liar.node_id)
        a = liar.prepare(Order(side=BUY, price=105, qty=3), now_ms=net.now)
        b = make_entry(liar.key, seq=seq + 1, hlc=a.hlc + 1, prev=prev, body=Order(side=SELL, price=95, qty=3),
                       ack=a.ack)
        late.add_evidence(a, b, now_ms=net.now)
        assert late.finality.end(liar.node_id) < seq  # it holds a prefix only
        late.receive(held_back, now_ms=net.now)
        assert late.finality.end(liar.node_id) == seq
        for e in held_back:  # matched as far as the effective end reaches
            assert late.status(e.hash) is not None
        net.nodes[0].receive([*held_back, a, b], now_ms=net.now)
        net.run(1_500)
        assert net.nodes[0].state_hash() == late.state_hash()
        assert net.finals[0] == net.finals[1]
        assert net.final_orders[0] == net.final_orders[1]


class TestSuspicion:
    """Under load, a member that holds records back without writing is voted out
    after ``suspect_after_ms``, not ``evict_after_ms`` (docs/FINALITY.md, section 4)."""

    PARAMS = Params(heartbeat_ms=10, liveness_ms=200, evict_after_ms=60_000, suspect_after_ms=100)

    def test_a_member_that_holds_orders_back_is_voted_out_within_suspect_after(self) -> None:
        net = Lockstep(4, params=self.PARAMS)
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(100)
        gone = net.nodes[3].node_id
        net.down.add(3)
        bid = net.write(1, Order(side=BUY, price=100, qty=2))
        before = [list(net.finals[i]) for i in range(3)]
        net.run(80)
        assert all(ex.frontiers().final < bid.hlc for ex in net.live())  # not suspected yet
        net.run(400)  # far less than evict_after (60 s)
        for i, ex in enumerate(net.live()):
            assert not ex.membership.is_member(gone)
            assert ex.frontiers().final >= bid.hlc and ex.pending() == 0
            assert net.finals[i][:len(before[i])] == before[i]  # nothing final changed
        assert len({tuple(net.finals[i]) for i in range(3)}) == 1

    def test_an_idle_network_suspects_no_one(self) -> None:
        net = Lockstep(4, params=self.PARAMS)
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(200)
        net.down.add(3)
        net.run(1_000)  # nothing waits for it: no vote before evict_after
        assert not any(isinstance(e.body, Evict) for e in net.log)
        assert all(ex.membership.is_member(net.nodes[3].node_id) for ex in net.live())

    def test_members_that_keep_writing_are_never_suspected(self) -> None:
        net = Lockstep(4, params=self.PARAMS)
        for t in range(40):
            net.write(t % 4, Order(side=BUY if t % 2 else SELL, price=100 + t % 3, qty=1))
            net.run(50)
        assert not any(isinstance(e.body, Evict) for e in net.log)

    def test_two_members_holding_back_at_once_wait_for_evict_after(self) -> None:
        """Nodes that see two members lagging may see different ones; votes
        against two members at once stall finality, so neither is suspected
        early (finality waits, as for any two members failing together)."""
        net = Lockstep(5, params=self.PARAMS)
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(100)
        net.down.update({3, 4})
        net.write(1, Order(side=BUY, price=100, qty=2))
        net.run(1_000)
        assert not any(isinstance(e.body, Evict) for e in net.log)


class TestTwoSilent:
    """Two members silent at once: a vote against one is decided only through the
    other's acks without it, so nobody votes until one of them is back; the
    members meanwhile go on certifying (docs/FINALITY.md, section 4)."""

    def test_no_vote_while_two_members_are_silent_and_the_other_is_voted_out_once_one_is_back(self) -> None:
        net = Lockstep(5, params=Params(heartbeat_ms=10, liveness_ms=200, evict_after_ms=150))
        net.write(0, Order(side=SELL, price=100, qty=5))
        net.run(100)
        back, gone = net.nodes[3], net.nodes[4].node_id
        net.down.update({3, 4})
        bid = net.write(1, Order(side=BUY, price=100, qty=2))
        net.run(1_000)  # far past evict_after
        assert not any(isinstance(e.body, Evict) for e in net.log)
        for ex in net.live():
            assert not ex.finality.open_votes()  # so it certifies: orders are still answered
            assert ex.frontiers().final < bid.hlc  # finality waits, as before
        net.down.discard(3)
        net.run(1_000)
        for ex in net.live():
            assert not ex.membership.is_member(gone)
            assert ex.membership.is_member(back.node_id)
            assert ex.frontiers().final >= bid.hlc
        assert len({tuple(net.finals[i]) for i in range(4)}) == 1


class TestLeave:
    """A member that shuts down cleanly writes ``Leave``: the others vote it out
    at once instead of waiting evict_after for its silence."""

    PARAMS = Params(heartbeat_ms=10, liveness_ms=200, evict_after_ms=60_000)

    def leave(self, net: Lockstep, i: int) -> Entry:
        body = net.nodes[i].leave_body()
        assert body is not None
        entry = net.write(i, body)
        net.deliver()  # the leaver pushes it before it stops
        net.down.add(i)
        return entry

    def test_finality_goes_on_without_waiting_for_silence(self) -> None:
        net = Lockstep(4, params=self.PARAMS)
        net.write(0, Order(side=SELL, price=100, qty=5))
        mine = net.write(3, Order(side=SELL, price=101, qty=2))
        net.run(100)
        gone = net.nodes[3].node_id
        self.leave(net, 3)
        bid = net.write(1, Order(side=BUY, price=101, qty=6))
        net.run(500)  # far less than evict_after (60 s)
        for ex in net.live():
            assert not ex.membership.is_member(gone)
            assert ex.frontiers().final >= bid.hlc
            assert ex.pending() == 0
        assert len({tuple(net.finals[i]) for i in range(3)}) == 1
        assert (bid.hash, mine.hash, 101, 1) in net.finals[0]  # the leaver's ask still counts

    def test_nothing_the_leaver_wrote_is_voided(self) -> None:
        net = Lockstep(3, params=self.PARAMS)
        net.run(50)
        last = net.write(2, Order(side=SELL, price=100, qty=1))
        leave = self.leave(net, 2)
        net.run(500)
        for ex in net.live():
            d = ex.membership.decisions()
            assert [x.member for x in d] == [net.nodes[2].node_id]
            assert d[0].cut == leave.seq  # the whole log counts
            assert ex.status(last.hash) is not None and ex.order_final(last.hash)

    def test_a_member_back_before_the_vote_is_decided_stays_a_member(self) -> None:
        """A restart right after a clean shutdown: the node's first entry says
        it is back, and the votes against it are retracted."""
        net = Lockstep(4, params=self.PARAMS)
        net.run(50)
        back = net.nodes[3]
        self.leave(net, 3)
        net.nodes[3] = restarted = Exchange(back.key, network=back.network, params=self.PARAMS)
        restarted.load(None, [], [e for e in net.log], mono_ms=net.now)
        assert restarted.finality.left(back.node_id)
        _, body = restarted.tick(now_ms=net.now)
        assert isinstance(body, Heartbeat)  # written before anyone can decide on it
        net._apply(3, restarted.prepare(body, now_ms=net.now))
        net.down.clear()
        net.deliver()
        net.run(800)
        for ex in net.nodes:
            assert ex.membership.is_member(back.node_id)
            assert ex.finality.contested() == []
            assert ex.finality.leaves() == []

    def test_a_lone_member_does_not_leave(self) -> None:
        net = Lockstep(1, params=self.PARAMS)
        assert net.nodes[0].leave_body() is None

    def test_after_its_leave_a_node_writes_nothing(self) -> None:
        net = Lockstep(3, params=self.PARAMS)
        net.run(50)
        body = net.nodes[1].leave_body()
        assert body is not None
        net.write(1, body)
        assert net.nodes[1].leave_body() is None
        with pytest.raises(NotMember):
            net.nodes[1].prepare(Order(side=BUY, price=100, qty=1), now_ms=net.now)
        for _ in range(50):
            net.now += 5
            assert net.nodes[1].tick(now_ms=net.now)[1] is None


class TestSubmit:
    def test_submit_returns_status_and_immediate_fills(self) -> None:
        net = Lockstep(2)
        alice, bob = net.nodes
        ask = alice.submit(Order(side=SELL, price=100, qty=10), now_ms=NOW_MS)
        assert ask.fills == ()
        assert ask.status is not None and (ask.status.state, ask.status.remaining) == (OPEN, 10)
        assert ask.entry.origin == alice.node_id
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
        assert alice.state_hash() == bob.state_hash() and alice.book_hash() == bob.book_hash()

    def test_entries_prepared_in_a_row_chain_and_apply_in_order(self) -> None:
        """The shell commits several own entries in one transaction: each is
        prepared after the one before (``after``), then all are applied in
        order, with the same result as submitting them one by one."""
        net = Lockstep(2)
        alice, bob = net.nodes
        ask = alice.prepare(Order(side=SELL, price=100, qty=5), now_ms=NOW_MS)
        bid = alice.prepare(Order(side=BUY, price=101, qty=2), now_ms=NOW_MS, after=ask)
        beat = alice.prepare(Heartbeat(), now_ms=NOW_MS, after=bid)
        assert [e.seq for e in (ask, bid, beat)] == [ask.seq, ask.seq + 1, ask.seq + 2]
        assert (bid.prev, beat.prev) == (ask.hash, bid.hash) and ask.hlc < bid.hlc < beat.hlc
        assert alice.replica.length(alice.node_id) == ask.seq - 1  # nothing applied yet
        alice.apply_own(ask, now_ms=NOW_MS)
        got = alice.apply_own(bid, now_ms=NOW_MS)
        alice.apply_own(beat, now_ms=NOW_MS)
        assert got.fills == ((bid.hash, ask.hash, 100, 2),)
        bob.receive([ask, bid, beat], now_ms=NOW_MS)
        assert bob.state_hash() == alice.state_hash()
        with pytest.raises(ValueError):  # only an own entry not applied yet can be followed
            alice.prepare(Heartbeat(), now_ms=NOW_MS, after=bid)

    def test_market_order_on_an_empty_book(self) -> None:
        """Regression (engine ``KeyError``): a market buy with no asks must expire, not crash."""
        ex = Lockstep(1).nodes[0]
        for side in (BUY, SELL):
            got = ex.submit(Order(side=side, price=0, qty=3, tif=IOC, market=True), now_ms=NOW_MS)
            assert got.fills == ()
            assert got.status is not None and (got.status.state, got.status.filled) == (CANCELLED, 0)

    def test_cancel_own_order(self) -> None:
        net = Lockstep(2)
        ex = net.nodes[0]
        placed = ex.submit(Order(side=BUY, price=100, qty=5), now_ms=NOW_MS)
        done = ex.submit(Cancel(order_id=placed.entry.hash), now_ms=NOW_MS)
        assert done.status is not None and (done.status.state, done.status.remaining) == (CANCELLED, 0)
        assert ex.engine.resting(BUY) == []
        with pytest.raises(NotCancellable):
            ex.submit(Cancel(order_id=placed.entry.hash), now_ms=NOW_MS)

    def test_cancel_errors_are_typed_and_change_nothing(self) -> None:
        net = Lockstep(2)
        alice, bob = net.nodes
        ask = alice.submit(Order(side=SELL, price=100, qty=1), now_ms=NOW_MS)
        bob.receive([ask.entry], now_ms=NOW_MS)
        before = full_view(bob, [ask.entry.hash])
        with pytest.raises(ForeignCancel):
            bob.submit(Cancel(order_id=ask.entry.hash), now_ms=NOW_MS)
        with pytest.raises(UnknownOrder):
            bob.submit(Cancel(order_id=bytes(32)), now_ms=NOW_MS)
        assert full_view(bob, [ask.entry.hash]) == before

    def test_a_foreign_cancel_written_by_hand_changes_nothing(self) -> None:
        """Only the origin of an order may cancel it: a cancel entry naming
        another origin's order is stored but acts on nothing."""
        net = Lockstep(2)
        alice, bob = net.nodes
        ask = net.write(0, Order(side=SELL, price=100, qty=3))
        net.deliver()
        seq, prev, _ = bob.replica.head_info(bob.node_id)
        forged = make_entry(bob.key, seq=seq + 1, hlc=bob.hlc.now(net.now), prev=prev,
                            body=Cancel(order_id=ask.hash), ack=bob.finality.own_ack())
        for ex in (alice, bob):
            ex.receive([forged], now_ms=net.now)
            st = ex.status(ask.hash)
            assert st is not None and st.remaining == 3

    def test_clock_far_from_the_peers_refuses_orders(self) -> None:
        net = Lockstep(1)
        ex = net.nodes[0]
        ex.clock_offset_ms = 3_000  # the peers' clocks are 3 s ahead
        with pytest.raises(ClockUnhealthy):
            ex.prepare(Order(side=BUY, price=100, qty=1), now_ms=NOW_MS)
        assert ex.prepare(Heartbeat(), now_ms=NOW_MS).body == Heartbeat()  # it still takes part
        ex.clock_offset_ms = -400
        ex.prepare(Order(side=BUY, price=100, qty=1), now_ms=NOW_MS)

    def test_a_fast_clock_does_not_drag_the_others(self) -> None:
        """Regression: nodes adopted the stamps of a node 4 s fast, so a node 3 s
        slow then refused everyone's entries as 7 s ahead."""
        net = Lockstep(2)
        fast = LogBuilder(key_for(60))
        ahead = fast.order(SELL, 100, 1, ms=NOW_MS + 4_000)
        ex = net.nodes[1]
        ex.receive([ahead], now_ms=NOW_MS)
        mine = ex.prepare(Order(side=BUY, price=99, qty=1), now_ms=NOW_MS)
        assert physical_ms(mine.hlc) < NOW_MS + 1_000
        # a node that is itself behind the network does adopt the network's time
        ex.clock_offset_ms = 3_000
        ex.receive([fast.order(SELL, 100, 1, ms=NOW_MS + 3_000)], now_ms=NOW_MS)
        assert physical_ms(ex.prepare(Heartbeat(), now_ms=NOW_MS).hlc) >= NOW_MS + 3_000


class TestTakerOrigins:
    """Regression: ``p2pex_fills_total{origin}`` looked a provisional fill's
    taker up with ``owner`` after the call, when a closed taker (filled in
    full, IOC, market) that became final within the call had left the engine
    and so counted as another node's.  ``Received.taker_origins`` carries the
    origin with every added fill; a final fill's taker is among the orders of
    the batch that made it final, with its owner."""

    @staticmethod
    def origins(got: Received | None) -> list[bytes]:
        assert got is not None
        assert set(got.taker_origins) == {f[0] for f in got.added}
        return [got.taker_origins[f[0]] for f in got.added]

    @staticmethod
    def final_owners(ex: Exchange) -> tuple[list[Fill], dict[bytes, bytes]]:
        """The fills made final since the last call and the owners of their orders."""
        fills: list[Fill] = []
        owners: dict[bytes, bytes] = {}
        for batch in ex.take_finalized():
            fills += batch.fills
            owners.update((fo.oid, fo.owner) for fo in batch.orders)
        return fills, owners

    def test_every_kind_of_taker_on_a_lone_member(self) -> None:
        ex = Lockstep(1).nodes[0]
        me = ex.node_id
        ex.take_finalized()
        takers = {  # the ask placed first, the taker: one fill each
            "filled in full": (2, Order(side=BUY, price=100, qty=2)),
            "ioc, the rest expires": (1, Order(side=BUY, price=100, qty=3, tif=IOC)),
            "market, the rest expires": (1, Order(side=BUY, price=0, qty=2, tif=IOC, market=True)),
            "partially filled, resting": (1, Order(side=BUY, price=100, qty=3)),
        }
        for what, (ask_qty, body) in takers.items():
            ask = ex.submit(Order(side=SELL, price=100, qty=ask_qty), now_ms=NOW_MS)
            got = ex.submit(body, now_ms=NOW_MS)
            taker = got.entry.hash
            assert got.fills == ((taker, ask.entry.hash, 100, ask_qty),), what
            assert ex.frontiers().final >= got.entry.hlc, what  # a lone member: final within the call
            assert self.origins(got.received) == [me], what
            assert ex.owner(taker) == (me if what.endswith("resting") else None), what  # what was looked up
            fills, owners = self.final_owners(ex)
            assert fills == list(got.fills) and owners[taker] == me, what

    def test_a_taker_from_another_origin_then_cancelled(self) -> None:
        net = Lockstep(2)
        alice, bob = net.nodes
        ask = net.write(0, Order(side=SELL, price=100, qty=3))
        net.deliver()
        before = len(net.finals[0])
        bids = [net.write(1, Order(side=BUY, price=0, qty=1, tif=IOC, market=True)),
                net.write(1, Order(side=BUY, price=100, qty=5))]  # fills 2, 3 rest
        net.write(1, Cancel(order_id=bids[1].hash))
        got = alice.receive(net.log, now_ms=net.now)
        assert got.added == ((bids[0].hash, ask.hash, 100, 1), (bids[1].hash, ask.hash, 100, 2))
        assert self.origins(got) == [bob.node_id] * 2
        net.run(100)
        assert alice.pending() == 0 and alice.engine.orders == {}  # final and closed: forgotten
        fills, owners = net.finals[0][before:], net.final_orders[0]  # what alice's batches handed over
        assert fills == list(got.added) and [owners[f[0]].owner for f in fills] == [bob.node_id] * 2

    def test_fills_revised_by_a_late_entry(self) -> None:
        first, ask, early_bid, late_bid, ex = late_bid_world()
        assert self.origins(ex.receive(first, now_ms=NOW_MS)) == [late_bid.origin]
        got = ex.receive([early_bid], now_ms=NOW_MS)
        assert got.added == ((early_bid.hash, ask.hash, 100, 1),)
        assert self.origins(got) == [early_bid.origin]


class TestRestart:
    def test_a_checkpoint_and_the_entries_above_it_give_the_same_state(self) -> None:
        net = Lockstep(3)
        rng = random.Random(3)
        for _ in range(40):
            net.write(rng.randrange(3), Order(side=rng.randrange(2), price=100 + rng.randint(-2, 2),
                                              qty=rng.randint(1, 4)))
            net.run(10)
        ex = net.nodes[1]
        cp = ex.checkpoint()
        # the final book: the orders resting at the frontier, as the node stores them
        resting = [[fo.status.remaining, fo.oid, fo.status.qty, fo.status.qty - fo.status.filled - fo.status.remaining,
                    fo.status.side, fo.status.price, fo.key, fo.owner]
                   for fo in net.final_orders[1].values() if fo.status.remaining]
        bases = cp.bases
        stored = [e for e in net.log if e.seq > bases.get(e.origin, (0,))[0]]
        again = Exchange(ex.key, network=cp.network, params=net.params)
        again.load(cp, resting, stored, mono_ms=net.now)
        assert again.state_hash() == ex.state_hash()
        assert again.book_hash() == ex.book_hash()
        assert again.engine.fills_base == ex.engine.fills_base
        assert again.frontiers().final == ex.frontiers().final
        nxt = again.prepare(Heartbeat(), now_ms=NOW_MS)  # the clock is behind the restored log
        assert nxt.seq == ex.replica.length(ex.node_id) + 1 and nxt.hlc > ex.replica.head_info(ex.node_id)[2]

    def test_memory_holds_the_tail_not_the_history(self) -> None:
        net = Lockstep(2)
        rng = random.Random(5)
        for _ in range(200):
            net.write(rng.randrange(2), Order(side=rng.randrange(2), price=100 + rng.randint(-1, 1), qty=1))
            net.run(10)
        net.run(200)
        for ex in net.nodes:
            assert ex.replica.memory_entries() < 20  # entries at or below the frontier are pruned
            assert ex.replica.entry_count() == len([e for e in net.log])  # though counted
            assert len(ex.engine.orders) == ex.engine.resting_count()  # closed final orders forgotten


def test_signed_entry_helper_matches_make_entry() -> None:
    key = key_for(0)
    made = make_entry(key, seq=1, hlc=5, prev=GENESIS, body=Heartbeat())
    assert signed_entry(key, seq=1, hlc=5, prev=GENESIS, body=Heartbeat()) == made
