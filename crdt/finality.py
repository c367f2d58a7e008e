"""Finality: acknowledgements, the stable frontier, evictions and equivocation.

The argument is in ``docs/FINALITY.md``; in short:

- *completeness* ``c``: the lowest head stamp over the members' logs this node
  holds.  Logs are gap-free and stamps strictly increase along a log, so this
  node holds every member entry stamped at or below ``c``, and no member can
  add one there.
- *ack*: every entry a member writes carries ``(K, S, D)``: its completeness
  ``K``, its level-1 frontier ``S`` and ``D = digest(K)``, a hash over every
  member's log prefix up to ``K`` (origin, length, head hash: the hash chain
  commits to the whole prefix) and its memberships begun by ``K`` (admissions,
  and the evictions that closed them).  An ack *matches* here when this node computes
  the same digest at ``K``: both hold the same history up to ``K``.
- level 1, ``S``: the minimum over members of their newest matching ``K``:
  every member holds exactly this node's history up to ``S``.  A member never
  changes its history at or below its own ``S``.
- level 2, the stable frontier ``F``: the minimum over members of their newest
  matching ``S``.  Every member has fixed the same history up to ``F``, so every
  record at or below ``F`` is final on every honest node, and every node that
  reaches ``F`` has the same records below it.

Timers (silence, heartbeat spacing) run on a monotonic clock the caller
passes in, never on the wall clock, which may step.

A silent member stops ``c`` and so finality (never trading).  Past
``evict_after_ms`` the members that still hear a majority vote it out with
``Evict(X, cut)`` (``cut``: how much of X's log the voter holds; the voter's
view of X stays frozen there); a member that hears X again withdraws its vote
with ``Retract(X)``.  While X is contested, every member also acknowledges the
history *without* X.  The eviction takes effect at the vote that completes a
majority of live votes, once the votes lie below the frontier computed without
X; the cut is the highest cut in that majority.  Every entry of X past the cut
is void.  A voter's view of X thaws only once its retraction lies below that
frontier with no decision before it.  Decisions take effect in the canonical
order of their deciding votes.

Equivocation (two signed entries at one seq) ends the origin's log just before
the forked seq on every node, except what is already fixed: a node never cuts
below its own ``S`` or below an ``S`` another member published over the
uncut history.  From then on that log cannot grow, so it no longer bounds
completeness, and its writer is no longer asked to agree; it is voted out
like a silent member and never admitted again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import blake2b

import msgpack

from crdt.entry import NO_ACK, Ack, Entry, Evict, Heartbeat, Leave, Retract
from crdt.membership import Decision, Membership
from crdt.replica import Replica

#: Acks remembered per member, newest last (only the newest matching one counts).
ACKS_KEPT = 48
DEFAULT_EVICT_AFTER_MS = 10_000
DEFAULT_HEARTBEAT_MS = 50
DEFAULT_LIVENESS_MS = 3_000
#: a member whose log has not grown for this long while records wait here for
#: it (its head lies below them) is suspected at once, not after evict_after
DEFAULT_SUSPECT_AFTER_MS = 1_000


def hlc_of(key: bytes) -> int:
    return int.from_bytes(key[:8], "big")


@dataclass(frozen=True, slots=True, kw_only=True)
class Frontiers:
    """This node's view: completeness, level-1 stable, final (all HLC values)."""

    complete: int
    stable: int
    final: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Vote:
    """An ``Evict`` (``cut`` set) or a ``Retract`` (``cut`` None) against one member."""

    voter: bytes
    seq: int
    key: bytes
    cut: int | None
    since: int = 0  # an Evict's: the stamp of the admission it is against (0: any)


def _cut_of(votes: list[Vote]) -> int:
    """The cut of an eviction counted from ``votes``: the highest cut among
    them.  Entries past it are void; every entry that a majority of members
    certified lies at or below it, since that majority and the voters share a
    member, whose vote's cut covers what it certified.  An assumed vote (no
    key: ``_decision``'s worst case) may name any cut: the highest counts."""
    if any(v.cut is not None and not v.key for v in votes):
        return 1 << 62  # an assumed vote's cut is unknown: the worst case is the highest
    cuts = [v.cut for v in votes if v.cut is not None]
    return max(cuts) if cuts else 1 << 62


class Finality:
    def __init__(
        self,
        *,
        node_id: bytes,
        replica: Replica,
        membership: Membership,
        evict_after_ms: int = DEFAULT_EVICT_AFTER_MS,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        liveness_ms: int = DEFAULT_LIVENESS_MS,
        suspect_after_ms: int = DEFAULT_SUSPECT_AFTER_MS,
    ) -> None:
        self.node_id = node_id
        self.replica = replica
        self.membership = membership
        self.evict_after_ms = evict_after_ms
        self.heartbeat_ms = heartbeat_ms
        self.liveness_ms = min(liveness_ms, max(evict_after_ms // 3, 1))
        self.suspect_after_ms = min(suspect_after_ms, evict_after_ms)
        self._pending_hlc = 0  # the newest record not final here (0: none), as last told
        self._waiting_since: int | None = None  # since when records have waited here without a break
        self.complete = 0
        self.stable = 0
        self.final = 0
        # per contested member: the frontiers computed without it
        self.complete_x: dict[bytes, int] = {}
        self.stable_x: dict[bytes, int] = {}
        self.final_x: dict[bytes, int] = {}
        self._acks: dict[bytes, deque[Ack]] = {}  # member -> its recent acks
        # (member, contested member) -> its recent acks computed without the latter; kept
        # apart so that a member that lags behind a decision about itself still finds them
        self._sacks: dict[tuple[bytes, bytes], deque[tuple[int, int, bytes]]] = {}
        self._sack_mono: dict[tuple[bytes, bytes], int] = {}  # when each of those last arrived
        self._votes: dict[bytes, list[Vote]] = {}  # member -> every vote and retraction against it
        self._votes_revision = 0  # bumped whenever _votes changes
        self._timelines: dict[bytes, tuple[tuple[int, int, int], list[Vote]]] = {}
        self.my_votes: dict[bytes, int] = {}  # member -> cut at which this node's view of it is frozen
        self._forked_voters: set[bytes] = set()  # equivocators with a vote that may still count
        self._my_vote_mono: dict[bytes, int] = {}  # member -> when this node last voted against it
        # decided evictions whose suspect acks this node keeps publishing until its
        # final frontier passes the decision: a member that has not decided yet needs them
        self.closing: dict[bytes, bytes] = {}
        self._closing_from: dict[bytes, int] = {}  # decided member -> the final frontier when decided
        self.last_heard: dict[bytes, int] = {}
        self._leaves: dict[bytes, int] = {}  # origin -> seq of its newest Leave
        # this node wrote its Leave and is shutting down: it writes nothing more
        # (a restart starts with this False, and its first entry says it is back)
        self.leaving = False
        self._heads: dict[bytes, int] = {}  # origin -> effective length when last heard
        self._admitted: dict[bytes, bytes | None] = {}  # origin -> start of the membership last heard
        # equivocation: origin -> (fork seq, floor hlc nothing at or below which is cut)
        self._forks: dict[bytes, tuple[int, int]] = {}
        self.forks_version = 0  # bumped whenever an equivocating origin's effective end may move
        self._digests: dict[tuple[int, bytes | None, bool, object, int], bytes | None] = {}
        # contested member -> (stamp, the eviction its votes decide and the membership after it)
        self._hypotheses: dict[bytes, tuple[tuple[int, int, int], tuple[Decision, Membership] | None]] = {}
        self._every: tuple[tuple[int, int, int], tuple[tuple[Decision, ...], Membership] | None] | None = None
        self.last_own_ms = 0  # monotonic time of this node's newest entry
        self._mono = 0  # the latest monotonic time this node was given
        self._settled: dict[tuple[bytes, bytes], int] = {}  # (member, last vote key) -> when settled here
        self.decided: list[Decision] = []
        self.refused: set[tuple[bytes, bytes]] = set()  # decisions that would have undone final history

    # ---- effective logs --------------------------------------------------------

    def end(self, origin: bytes, *, cut_forks: bool = True) -> int:
        """Effective length of ``origin``'s log: what is held, ended before an equivocation."""
        n = self.replica.length(origin)
        if cut_forks and self._forks:
            fork = self._forks.get(origin)
            if fork is not None:
                n = min(n, self._fork_end(origin, fork))
        return n

    def ends(self) -> dict[bytes, int]:
        return {o: self.end(o) for o in self._forks}

    def _fork_end(self, origin: bytes, fork: tuple[int, int]) -> int:
        """Just before the forked seq, but never below what is fixed (the floor),
        and for a closed log never past its cut: what lies past it is void, and
        may be pruned (the cut itself stays pinned)."""
        seq, floor = fork
        keep = self._count_upto(origin, floor, cut_forks=False)
        cut = self.membership.closed_cut(origin)
        if cut is not None:
            return min(cut, max(seq - 1, keep if keep >= 0 else cut))
        return max(seq - 1, self.replica.base(origin)[0], keep)

    def _hlc_at(self, origin: bytes, seq: int) -> int:
        return self.replica.point(origin, seq)[1]

    def _count_upto(self, origin: bytes, k: int, *, cut_forks: bool = True) -> int:
        """How many entries of ``origin``'s effective log are stamped at or below ``k``
        (-1 when that reaches below what is in memory)."""
        tail = self.replica.tail(origin)
        base_seq, _, base_hlc = self.replica.base(origin)
        if base_hlc > k:
            return -1
        lo, hi = 0, len(tail)
        while lo < hi:
            mid = (lo + hi) // 2
            if tail[mid].hlc <= k:
                lo = mid + 1
            else:
                hi = mid
        n = base_seq + lo
        if cut_forks:
            n = min(n, self.end(origin))
        return n

    # ---- inputs --------------------------------------------------------------------

    def note_entries(self, entries: Iterable[Entry], mono_ms: int) -> None:
        """Record the acks, votes and retractions of newly merged entries."""
        me = self.node_id
        self._mono = max(self._mono, mono_ms)
        for e in entries:
            o = e.origin
            ack = e.ack
            if ack:
                q = self._acks.get(o)
                if q is None:
                    q = self._acks[o] = deque(maxlen=ACKS_KEPT)
                q.append(ack)
                if len(ack) == 7:
                    sq = self._sacks.get((o, ack[3]))
                    if sq is None:
                        sq = self._sacks[(o, ack[3])] = deque(maxlen=8)
                    sq.append((ack[4], ack[5], ack[6]))
                    self._sack_mono[(o, ack[3])] = mono_ms
            body = e.body
            if body.__class__ is Leave:
                self._leaves[o] = e.seq
            if isinstance(body, Evict | Retract) and o != body.member:
                cut, since = (body.cut, body.since) if isinstance(body, Evict) else (None, 0)
                self._votes.setdefault(body.member, []).append(
                    Vote(voter=o, seq=e.seq, key=e.key, cut=cut, since=since))
                self._votes_revision += 1
                if o == me and cut is not None:
                    self._my_vote_mono[body.member] = mono_ms
            if o == me:
                self.last_own_ms = max(self.last_own_ms, mono_ms)

    def heard(self, mono_ms: int) -> None:
        """Update when each member's log last grew."""
        self._mono = max(self._mono, mono_ms)
        for o in self.membership.members():
            n = self.end(o)
            start = self.membership.admitted_at(o)
            if self._heads.get(o) != n or self._admitted.get(o) != start:  # grew, or (re)admitted
                self._heads[o] = n
                self._admitted[o] = start
                self.last_heard[o] = mono_ms

    def reset_heard(self, mono_ms: int) -> None:
        """After a restart: give every member a fresh grace period."""
        for o in self.membership.members():
            self.last_heard[o] = mono_ms

    def add_fork(self, origin: bytes, seq: int) -> None:
        """Evidence that ``origin`` signed two entries at ``seq`` (its effective log
        ends before it, except what is fixed: see ``_fork_end``)."""
        old = self._forks.get(origin)
        if old is not None and seq >= old[0]:
            return  # known: the floor stays (raising it now would restore what was cut)
        floor = self.stable if old is None else max(old[1], self.stable)
        self._forks[origin] = (seq, floor)
        self._digests.clear()
        self.forks_version += 1

    def restore_fork(self, origin: bytes, seq: int, floor: int) -> None:
        self._forks[origin] = (seq, floor)
        self._digests.clear()
        self.forks_version += 1

    def has_forks(self) -> bool:
        return bool(self._forks)

    def forks(self) -> dict[bytes, tuple[int, int]]:
        return dict(self._forks)

    def invalidate(self) -> None:
        """History at or below some stamp changed (a decision, a cut): drop cached digests."""
        self._digests.clear()

    # ---- digests ----------------------------------------------------------------------

    def digest(self, k: int, *, without: bytes | None = None, cut_forks: bool = True,
               decided: bytes | None = None, every: bool = False) -> bytes | None:
        """Hash over every member's effective log prefix stamped at or below ``k``
        (``without`` one member), or None when that reaches below memory.  Without
        a member, or with its eviction ``decided`` as the votes held here decide
        it (see ``_hypothesis``), the memberships are those after that eviction;
        ``every``: after every eviction the votes held here decide (None unless
        they decide more than one), as a member that has decided them all
        computes its digests without ``without``."""
        membership: Membership = self.membership
        hypothesis: object = None
        if every:
            found = self._every_hypothesis() if without is not None else None
            # only for the first eviction of the chain: a frontier without a later one
            # would be used on this node's memberships, which lack the earlier decisions
            if found is None or found[0][0].member != without:
                return None
            hypothesis, membership = found
        else:
            target = without if without is not None else decided
            if target is not None:
                single = self._hypothesis(target)
                if single is not None:
                    hypothesis, membership = single
                elif decided is not None:
                    return None
        # the memberships' revision too: an admission vote that arrives late (from a log this
        # digest leaves out, or that is not complete to k) can move where an admission began
        cache_key = (k, without, cut_forks, hypothesis, self.membership.revision)
        if cache_key in self._digests:
            return self._digests[cache_key]
        rows = []
        for o in membership.ever_members():
            if o == without:
                continue
            ivs = [iv for iv in membership.intervals(o) if hlc_of(iv.start) <= k]
            if not ivs:
                continue
            last = ivs[-1]
            cut = last.end_seq if last.closed_at is not None else None
            try:
                if cut is not None and cut <= self.replica.length(o) and self._hlc_at(o, cut) <= k:
                    n = min(cut, self.end(o)) if cut_forks else cut  # a closed log, wholly at or below k
                else:
                    n = self._count_upto(o, k, cut_forks=cut_forks)
                    if n < 0:
                        self._digests[cache_key] = None
                        return None
                    if cut is not None:
                        n = min(n, cut)
                # the memberships too, with the evictions that closed them: two nodes
                # that derived different decisions from the same logs never match
                rows.append([o, n, self.replica.hash_at(o, n),
                             [[iv.start, iv.after, iv.end_seq, iv.closed_at] for iv in ivs]])
            except KeyError:
                # a cut that a vote received after this node let go of that part of the log names (a
                # hypothesis only: a decided cut is pinned): below memory, as for _count_upto
                self._digests[cache_key] = None
                return None
        d = blake2b(msgpack.packb([k, rows], use_bin_type=True), digest_size=32).digest()
        if len(self._digests) > 4096:
            self._digests.clear()
        self._digests[cache_key] = d
        return d

    def _hypothesis(self, x: bytes) -> tuple[Decision, Membership] | None:
        """The eviction of member ``x`` that the votes held here decide once they
        lie below the frontier without ``x``, and the membership it leaves; None
        while they decide nothing.  Digests *without* ``x`` commit to that
        membership: a vote ``x`` cast past the eviction's cut is void, and a
        node that has not decided yet must not count what it decided (an
        admission completed by that vote) where the decided ones no longer
        do, or their acks without ``x`` never match and nobody decides."""
        if not self.membership.is_member(x) or x not in self._votes:
            return None
        # every admission vote counts here (one that decides nothing in this node's
        # view may complete a majority once the eviction voids another)
        stamp = (self.membership.revision, self.forks_version, self._votes_revision)
        cached = self._hypotheses.get(x)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        d = self._decision(x, 1 << 62)
        found = None if d is None else (d, self.membership.with_decision(d))
        self._hypotheses[x] = (stamp, found)
        return found

    def _every_hypothesis(self) -> tuple[tuple[Decision, ...], Membership] | None:
        """Every eviction the votes held here decide, one after the other in
        canonical order (each judged on the membership the ones before it
        leave: the first can make a majority of the second's votes), and the
        membership after them all; None unless there are two or more.  A node
        that lags behind two decisions finds the members' acks without the
        first computed after both (the acks they published before the second
        may be gone), and would otherwise never decide the first."""
        stamp = (self.membership.revision, self.forks_version, self._votes_revision)
        if self._every is not None and self._every[0] == stamp:
            return self._every[1]
        real, timelines = self.membership, self._timelines
        decisions: list[Decision] = []
        membership = real
        try:
            for _ in range(len(self._votes)):
                self.membership, self._timelines = membership, {}
                found = [d for x in list(self._votes) if membership.is_member(x)
                         and (d := self._decision(x, 1 << 62)) is not None]
                if not found:
                    break
                d = min(found, key=lambda d: d.at)
                decisions.append(d)
                membership = membership.with_decision(d)
        finally:
            self.membership, self._timelines = real, timelines
        result = (tuple(decisions), membership) if len(decisions) > 1 else None
        self._every = (stamp, result)
        return result

    # ---- frontiers ---------------------------------------------------------------------

    def _head_hlc(self, o: bytes, *, without: bytes | None) -> int:
        """Stamp of ``o``'s effective head.  For the frontier of this node's acks,
        a member it voted against counts as frozen at the vote's cut; for a
        frontier *without* a contested member (which only decides that member's
        eviction) no view is frozen, or two contested members would hold each
        other up."""
        n = self.end(o)
        if without is None:
            cut = self.my_votes.get(o)
            if cut is not None:
                n = min(n, max(cut, self.replica.base(o)[0]))  # what is final stays final
        return self._hlc_at(o, n)

    def _completeness(self, without: bytes | None = None) -> int:
        members = self.membership.members()
        if not members:
            return 0
        c = 1 << 64
        for o in members:
            if o != without and o not in self._forks:  # a forked log never grows again
                c = min(c, self._head_hlc(o, without=without))
        for o in self.membership.ever_members():
            cut = self.membership.closed_cut(o)
            # a closed log held short of its cut holds completeness back until
            # the rest arrives (a forked one: short of its end, if that is lower)
            if cut is not None:
                fork = self._forks.get(o)
                if self.end(o) < (cut if fork is None else min(cut, self._fork_end(o, fork))):
                    c = min(c, self._hlc_at(o, self.end(o)))
        return 0 if c == 1 << 64 else c

    def _matched(self, m: bytes, complete: int, *, suspect: bytes | None) -> tuple[int, int]:
        """(K, S) of ``m``'s newest ack that matches this node's history, or (0, 0)."""
        q = self._acks.get(m) if suspect is None else self._sacks.get((m, suspect))
        found = 0, 0
        for ack in reversed(q or ()):
            k, s, d = ack[0], ack[1], ack[2]
            if k > complete:
                continue
            if self.digest(k, without=suspect) == d or (
                    suspect is not None and self.digest(k, without=suspect, every=True) == d):
                found = k, s
                break
        if suspect is not None and suspect == self.node_id:
            # this node voted out: a member that has decided it publishes no acks
            # without it for long, but its plain acks commit to the same history
            # with the eviction applied, which is what this node has to learn
            for ack in reversed(self._acks.get(m, ())):
                k, s, d = ack[0], ack[1], ack[2]
                if k <= found[0]:
                    break
                if k <= complete and self.digest(k, decided=suspect) == d:
                    return k, s
        return found

    def recompute(self) -> bool:
        """Recompute every frontier; True when the final frontier moved."""
        self._refresh_my_votes()
        members = self.membership.members()
        me = self.node_id
        c = self._completeness()
        # never below the final frontier: every member agreed on the history up to
        # it, so nobody can add an entry there.  A view frozen at a vote's cut can
        # stamp lower (the member wrote nothing since, in a membership begun after
        # that stamp), and acks at such a K reach below memory: none were published
        self.complete = max(self.complete, c, self.final) if members else 0
        ks, ss = [self.complete], []
        for m in members:
            # an origin proven to equivocate is not asked to agree, unless a vote
            # of its may still count: then its last acks before the fork, frozen
            # at that vote's cut, still hold the frontier (its log no longer
            # grows, so this holds finality back until its eviction retracts the vote)
            if m == me or (m in self._forks and m not in self._forked_voters):
                continue
            k, s = self._matched(m, self.complete, suspect=None)
            ks.append(k)
            ss.append(s)
        stable = min(ks) if me in members else (min(ks[1:]) if len(ks) > 1 else 0)
        self.stable = max(self.stable, stable)
        if me in members:
            ss.append(self.stable)
        before = self.final
        if ss:
            self.final = max(self.final, min(ss))
        self._recompute_contested(members)
        self._refresh_forks(members)
        return self.final != before

    def contested(self) -> list[bytes]:
        """Members with votes against them that are not settled: a live vote, or
        a retraction not yet below the frontier without them; and decided
        evictions not yet below the final frontier."""
        out = set(self.closing)
        for x in self._votes:
            if not self.membership.is_member(x):
                continue
            fx = self.final_x.get(x, 0)
            last = self._latest_votes(x)
            if not last:
                if self._own_vote_open(x):
                    out.add(x)  # kept, and acknowledged without x, until it settles
                continue
            if any(v.cut is not None or hlc_of(v.key) > fx for v in last.values()):
                out.add(x)
                continue
            # settled here; go on acknowledging without x a while longer: a member
            # that lags (or whose history changed since) needs fresh acks to settle it
            newest = max(v.key for v in last.values())
            since = self._settled.setdefault((x, newest), self._mono)
            if self._mono - since < 2 * self.evict_after_ms or self._owed(x, hlc_of(newest)):
                out.add(x)
        return sorted(out)

    def _owed(self, x: bytes, settles_at: int) -> bool:
        """Do other members still wait for this member's acks without ``x``?
        They do while they publish acks without ``x`` themselves (recently) and
        this member's newest published one does not yet reach the retraction
        that settles it.  A member that was not one while the others settled
        (voted out and admitted again meanwhile) settled here without writing
        a word, and the others, which count it again, waited for it for good."""
        me = self.node_id
        if x == me:
            return False  # nobody waits for acks of x without x
        mine = self._sacks.get((me, x))
        if mine and mine[-1][1] >= settles_at:
            return False
        return any(o != me and (o, x) in self._sack_mono and self._mono - self._sack_mono[(o, x)] < self.evict_after_ms
                   for o in self.membership.members())

    def _recompute_contested(self, members: list[bytes]) -> None:
        me = self.node_id
        for x, at in list(self.closing.items()):
            # past where it stood at the decision: every member's acks matched
            # since, and digests commit to decisions, so every member decided too
            if self.final > max(hlc_of(at), self._closing_from.get(x, 0)):
                del self.closing[x]
                self._closing_from.pop(x, None)
        contested = self.contested()
        for x in [x for x in self._votes if x not in contested and x not in self.closing
                  and self.membership.is_member(x)]:
            # every vote against it retracted and settled, long enough ago.  A vote that
            # does not count yet stays until it lies below the final frontier: it counts
            # once the admission its writer's membership (or its ``since``) rests on is
            # derived here, and a node that had dropped it decided another eviction than
            # the others (``--wide --storm --seed 125``)
            counted = {(v.voter, v.seq) for v in self._timeline(x)}
            keep = [v for v in self._votes[x] if (v.voter, v.seq) not in counted and hlc_of(v.key) > self.final]
            if len(keep) == len(self._votes[x]):
                continue
            if keep:
                self._votes[x] = keep
            else:
                del self._votes[x]
            self._votes_revision += 1
            self._timelines.pop(x, None)
        for table in (self.complete_x, self.stable_x, self.final_x):
            for x in [x for x in table if x not in contested and x not in self._votes]:
                del table[x]
        for x in contested:
            c = self._completeness(without=x)
            self.complete_x[x] = max(self.complete_x.get(x, 0), c, self.final)  # as for complete
            ks, ss = [self.complete_x[x]], []
            for m in members:
                if m in (me, x) or m in self._forks:
                    continue
                k, s = self._matched(m, self.complete_x[x], suspect=x)
                ks.append(k)
                ss.append(s)
            self.stable_x[x] = max(self.stable_x.get(x, 0), min(ks))
            ss.append(self.stable_x[x])
            self.final_x[x] = max(self.final_x.get(x, 0), min(ss))

    def _refresh_forks(self, members: list[bytes]) -> None:
        """Raise an equivocating origin's floor to the final frontier of the
        uncut history, as the members' published acks show it: what every
        member published as level-1 stable over the uncut history may already
        be final on a node that had not seen the evidence."""
        if not self._forks or not members:
            return
        uncut = 1 << 64
        for m in members:
            best = 0
            for ack in self._acks.get(m, ()):
                k, s, d = ack[0], ack[1], ack[2]
                if s > best and k <= self.complete and self.digest(k, cut_forks=False) == d:
                    best = s
            uncut = min(uncut, best)
        for origin, (seq, floor) in list(self._forks.items()):
            if uncut > floor:
                self._forks[origin] = (seq, uncut)
                self._digests.clear()
                self.forks_version += 1

    def frontiers(self) -> Frontiers:
        return Frontiers(complete=self.complete, stable=self.stable, final=self.final)

    # ---- evictions -------------------------------------------------------------------

    def _closed(self, x: bytes) -> bool:
        """Is ``x`` out: its eviction decided and no fresh admission since?"""
        return x in self.closing and not self.membership.is_member(x)

    def _timeline(self, x: bytes) -> list[Vote]:
        """Votes and retractions against ``x``'s current membership by members
        entitled to act, in key order."""
        votes = self._votes.get(x, ())
        stamp = (self.membership.version, self.forks_version, self._votes_revision)
        cached = self._timelines.get(x)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        start = self.membership.admitted_at(x)
        # a vote past the end of its writer's forked log never counts, whether
        # or not membership has been told of that end yet
        # a vote names the admission it is against: one stamped by a clock far
        # ahead may lie past the next admission, and is not against that one
        out = [] if start is None else sorted(
            (v for v in votes if v.key > start and v.since in (0, hlc_of(start))
             and self.membership.acts(v.voter, v.seq, v.key)
             and (v.voter not in self._forks or v.seq <= self.end(v.voter))),
            key=lambda v: v.key)
        # a voter that is voted out votes no more: each of its votes is retracted
        # at the decision that closed the membership it was cast in.  Every node
        # applies that decision at the same key, so every node sees the same
        # retraction; without it, a vote whose writer can no longer retract it
        # (an equivocator's, past its fork) would keep x under vote for good.
        ends: dict[tuple[bytes, bytes], Vote] = {}
        for v in out:
            if v.cut is None:
                continue
            iv = next((iv for iv in self.membership.intervals(v.voter) if iv.acts_at(v.seq, v.key)), None)
            if iv is not None and iv.closed_at is not None:
                ends[(v.voter, iv.closed_at)] = Vote(voter=v.voter, seq=v.seq, key=iv.closed_at, cut=None)
        if ends:
            out = sorted([*out, *ends.values()], key=lambda v: v.key)
        self._timelines[x] = (stamp, out)
        return out

    def _refresh_my_votes(self) -> None:
        """This node's frozen views: for each member X, the lowest cut among its
        own votes against X that may still count, a live one or one whose
        retraction is not yet below the frontier without X (and no decision
        before the retraction is pending).  A vote cast again after a retraction
        that has not settled does not thaw the first vote's cut: a decision can
        still come at the first vote, with that cut.  Also notes which voters
        proven to equivocate still have a vote that may count."""
        mine: dict[bytes, int] = {}
        forked: set[bytes] = set()
        for x in self._votes:
            if self._closed(x):
                continue
            cuts: dict[bytes, list[int]] = {}  # voter -> cuts of its votes against x that may still count
            settled = max(self.final_x.get(x, 0), self.final)
            for v in self._timeline(x):
                if v.voter != self.node_id and v.voter not in self._forks:
                    continue
                if v.cut is not None:
                    cuts.setdefault(v.voter, []).append(v.cut)
                elif hlc_of(v.key) <= settled and not self._pending_before(x, settled, v.key):
                    cuts.pop(v.voter, None)  # the retraction is settled: no decision can come before it
            if self.node_id in cuts:
                mine[x] = min(cuts[self.node_id])
            forked.update(o for o in cuts if o != self.node_id)
        self._forked_voters = forked
        if mine != self.my_votes:
            self.my_votes = mine
            self._digests.clear()

    def _pending_before(self, x: bytes, frontier: int, key: bytes) -> bool:
        """Could an eviction of ``x`` still be decided at a vote before ``key``
        (one held back for an earlier decision)?  A decision refused here never
        comes."""
        d = self._decision(x, frontier, before=key)
        return d is not None and (d.member, d.at) not in self.refused

    def _live_vote(self, x: bytes) -> Vote | None:
        """This node's own vote against ``x`` if it is live (not retracted)."""
        live = None
        for v in self._timeline(x):
            if v.voter == self.node_id:
                live = v if v.cut is not None else None
        return live

    def decide(self) -> list[Decision]:
        """The next eviction, if one is decided: the live, independent votes
        against a member reach a majority below the frontier computed without
        it.  Decisions take effect in the canonical order of their deciding
        votes, so one is held back while another could come earlier."""
        members = set(self.membership.members())
        candidates: list[Decision] = []
        for x in list(self._votes):
            if x not in members:
                # not a member here *yet* may still become one: its Admit can
                # arrive after votes against it.  Only votes below the final
                # frontier can never count (a later admission lies above it).
                if x not in self.closing:
                    keep = [v for v in self._votes[x] if hlc_of(v.key) > self.final]
                    if len(keep) == len(self._votes[x]):
                        continue
                    self._votes_revision += 1
                    if keep:
                        self._votes[x] = keep
                    else:
                        del self._votes[x]
                continue
            d = self._decision(x, self.final_x.get(x, 0))
            if d is not None:
                candidates.append(d)
        for d in sorted(candidates, key=lambda d: d.at):
            if self._earlier_possible(d):
                continue
            if d.cut < self._count_upto(d.member, self.final):
                # a voter named a cut below what is final here (it rejoined behind,
                # or holds another branch of a forked log): never undo what is final
                self.refused.add((d.member, d.at))
                continue
            self.decided.append(d)
            # this membership's votes are spent; later ones, against the member admitted
            # again, count against its next membership (a restarted node holds them at once)
            later = [v for v in self._votes[d.member] if v.key > d.at]
            self._votes_revision += 1
            if later:
                self._votes[d.member] = later
            else:
                del self._votes[d.member]
            self.my_votes.pop(d.member, None)
            self.closing[d.member] = d.at
            self._closing_from[d.member] = self.final
            self._digests.clear()
            return [d]
        return []

    def _decision(self, x: bytes, frontier: int, *, before: bytes | None = None,
                  assume: bytes | None = None, void: tuple[bytes, int] | None = None) -> Decision | None:
        """Walk the votes against ``x`` up to ``frontier`` (or key ``before``):
        the first vote at which live independent votes reach a majority.
        ``assume`` adds a vote of that member from the start (worst case);
        ``void`` (member, cut) leaves out that member's votes past the cut."""
        live: dict[bytes, Vote] = {}
        if assume is not None:
            live[assume] = Vote(voter=assume, seq=0, key=b"", cut=1 << 62)
        for v in self._timeline(x):
            if hlc_of(v.key) > frontier or (before is not None and v.key >= before):
                break
            if void is not None and v.voter == void[0] and v.seq > void[1]:
                continue
            if v.cut is None:
                if v.voter != assume:
                    live.pop(v.voter, None)
                continue
            live[v.voter] = v
            counted = self._independent(x, list(live.values()))
            if not counted:
                continue
            # the highest cut among the counted votes: every entry a majority of
            # members certified is held by one of them (see certifies()); a voter
            # that lags may name a cut below where this membership begins
            cut = max(_cut_of(counted), self.membership.intervals(x)[-1].after)
            if len(counted) >= self._electorate(x, v.key, cut) // 2 + 1:
                return Decision(member=x, at=v.key, cut=cut)
        return None

    def _electorate(self, x: bytes, key: bytes, cut: int) -> int:
        """How many members vote at ``key`` on evicting ``x`` with ``cut``: the
        members there once that eviction has voided the admission votes ``x``
        wrote past ``cut``.  A node that holds such a vote, and counted the
        member it admitted, must not need a larger majority than the nodes
        that decided without it (they would decide at different votes)."""
        if not self.membership.admits_past(x, cut):
            return len(self.membership.members_at(key))
        after = self.membership.with_decision(Decision(member=x, at=key, cut=cut))
        return len({*after.members_at(key), x})

    def _independent(self, x: bytes, votes: list[Vote]) -> list[Vote]:
        """Drop the votes of members whose membership rests on an ``Admit`` that
        ``x`` wrote past the cut (the eviction voids it, and with it their vote)."""
        counted = list(votes)
        while counted:
            cut = _cut_of(counted)
            keep = [v for v in counted if not v.key or not self.membership.depends_on(v.voter, v.key, x, cut)]
            if len(keep) == len(counted):
                return keep
            counted = keep
        return counted

    def _earlier_possible(self, d: Decision) -> bool:
        """Could another member's eviction be decided at a vote before ``d.at``?
        Votes by others below it are all known here (they lie below the frontier
        without ``d.member``); ``d.member``'s own may not be, and is then
        assumed cast."""
        x = d.member
        known = self.end(x) >= d.cut  # holding x's log through the cut: its counted votes are all here
        for y in self._votes:
            if y == x or not self.membership.is_member(y):
                continue
            # x's votes past the cut are void under d, and a node that holds x's log
            # only through the cut never sees them: counting them here held back, for
            # good, the one node that held them (x itself, whose votes they are)
            if self._decision(y, 1 << 62, before=d.at, assume=None if known else x, void=(x, d.cut)) is not None:
                return True
        return False

    def certifies(self, origin: bytes) -> int:
        """How much of ``origin``'s log this member certifies: its effective
        length here, or 0 when this node may not vouch for it (it is not a
        member or is leaving, ``origin`` is not a member here or equivocated,
        or an eviction vote of this node may still count).  What it certifies survives any eviction: a vote this
        node casts later names a cut at or above it, and a decision takes the
        highest cut among its voters, of which a majority shares a member
        with any majority that certified (see ``_cut_of``), when both count
        the same members: the certifying node tells its membership's
        fingerprint with it.  The shell answers with it only once those
        entries are durable."""
        m = self.membership
        me = self.node_id
        if origin == me or self.leaving or origin in self._forks:
            return 0
        if not m.is_member(me) or not m.is_member(origin) or self._live_vote(origin) is not None:
            return 0
        # an eviction vote of this node that may still count: the majority that
        # certifies must be a majority of the members that decide later
        if self.open_votes():
            return 0
        return self.end(origin)

    def open_votes(self) -> bool:
        """Has this node an eviction vote that may still count (live, or its
        retraction not settled)?  Admission votes do not count here: one that
        never completes (its joiner gave up) would stop this node certifying for
        good, and one admission between a certification and the decision that
        could void it is harmless (docs/FINALITY.md, section 7)."""
        return bool(self.my_votes) or any(self._live_vote(x) is not None or self._own_vote_open(x)
                                          for x in self._votes)

    def _own_vote_open(self, x: bytes) -> bool:
        """Has this node an eviction vote against ``x``, counted now or not, that
        may still count: its own newest vote or retraction against ``x`` is a
        vote, or a retraction not yet below the frontier without ``x`` (or the
        final one)?  A vote that does not act now (its writer's membership
        there rests on admissions not derived yet) acts once a late admission
        vote moves where that membership began: a member that certified while
        such a vote of its own did not count saw the eviction decided with it,
        and with its cut below what it had certified (``--wide --seed 67``)."""
        last = self._own_latest(x)
        if last is None:
            return False
        return last.cut is not None or hlc_of(last.key) > max(self.final_x.get(x, 0), self.final)

    def _own_latest(self, x: bytes) -> Vote | None:
        """This node's newest vote or retraction against ``x``'s current membership
        (any, while ``x`` is no member here), counted now or not.  A vote against
        an earlier membership never counts again (a decision spent it, or its
        ``since`` names another admission)."""
        me = self.node_id
        start = self.membership.admitted_at(x)
        last: Vote | None = None
        for v in self._votes.get(x, ()):
            if v.voter != me or (start is not None and (v.key <= start or v.since not in (0, hlc_of(start)))):
                continue
            if last is None or v.key > last.key:
                last = v
        return last

    def _own_vote_live(self, x: bytes) -> bool:
        last = self._own_latest(x)
        return last is not None and last.cut is not None

    def votes(self) -> dict[bytes, list[Vote]]:
        """The votes and retractions that count against each member."""
        return {x: self._timeline(x) for x in self._votes}

    # ---- what to write -------------------------------------------------------------------

    def own_ack(self) -> Ack:
        """The ack for this node's next entry.  While members are contested,
        successive entries take turns to carry the ack without each of them."""
        if not self.membership.is_member(self.node_id):
            return NO_ACK
        k = self.complete
        d = self.digest(k)
        if d is None:
            return NO_ACK
        ack: tuple[int | bytes, ...] = (k, self.stable, d)
        contested = [x for x in self.contested() if x != self.node_id]
        if contested:
            x = contested[self.replica.length(self.node_id) % len(contested)]
            kx = self.complete_x.get(x, 0)
            dx = self.digest(kx, without=x)
            if dx is not None:
                ack += (x, kx, self.stable_x.get(x, 0), dx)
        return ack

    def next_body(self, mono_ms: int, *, pending_hlc: int, newest_hlc: int = 0) -> Evict | Retract | Heartbeat | None:
        """What this member should write now, if anything: a vote or a
        retraction, else a heartbeat that moves finality (or shows it is alive).
        ``pending_hlc``: the newest record not final here (0: none);
        ``newest_hlc``: the newest record."""
        me = self.node_id
        self._pending_hlc = pending_hlc
        if not pending_hlc:
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = mono_ms
        members = self.membership.members()
        if me not in members or self.leaving:
            return None
        if self.left(me):
            return Heartbeat()  # back after a clean shutdown: say so before anyone votes
        # a node proven to equivocate votes no more: its entries past the fork are void
        majority = me not in self._forks and self._hears_majority(mono_ms, members)
        contested = [x for x in self.contested() if x != me and x in members] if me not in self._forks else []
        # a member whose votes are all retracted, waiting to settle, does not
        # hold up a vote against another: that one may be the silent member
        # whose log the settling waits for.  Nor does one whose live votes all
        # come from silent voters: a voter that crashed right after voting
        # would otherwise never be voted out (its eviction retracts its votes)
        voting = [x for x in contested if self._under_vote(x, mono_ms)]
        for x in contested:
            mine = self._live_vote(x)
            own_live = self._own_vote_live(x)  # counted now or not
            # a vote of this node that does not count now is retracted all the same: it may count later
            if (mine is not None or own_live) and self._alive(x, mono_ms) \
                    and self.last_heard.get(x, 0) > self._my_vote_mono.get(x, 0):
                return Retract(member=x)
            if mine is None and not own_live and majority and self._silent(x, mono_ms) and (
                    (voting == [x] and self._alone_silent(x, mono_ms, members)) or x in self._forks):
                return self._vote(x)  # join the vote under way (one member under vote at a time)
        if majority:
            # a proven equivocator is voted out whatever else is under vote: its
            # log never grows past its end, so a vote against it (cut at that
            # end) freezes nothing that another vote's frontier needs
            for x in members:
                if x != me and x in self._forks and self._silent(x, mono_ms) and self._live_vote(x) is None:
                    return self._vote(x)
        if majority and not voting and not any(self._live_vote(x) for x in self._votes):
            suspect = self._suspect(mono_ms, members)
            if suspect is not None:
                return self._vote(suspect)
        since = mono_ms - self.last_own_ms
        if since >= self.liveness_ms:
            return Heartbeat()
        if since < self.heartbeat_ms:
            return None
        if pending_hlc <= self.final and not self.contested():
            # final here, but the others reach it only through our published
            # frontiers: publish once more until they cover the newest record
            published = self._acks.get(me)
            last = published[-1] if published else ()
            if newest_hlc and len(last) >= 2 and min(last[0], last[1]) < newest_hlc <= self.stable:
                return Heartbeat()
            return None
        head = self.replica.head_info(me)[2]
        if head < pending_hlc or self._published() != self._ack_view(self.own_ack()):
            return Heartbeat()
        return None

    def _published(self) -> tuple[object, ...] | None:
        q = self._acks.get(self.node_id)
        return self._ack_view(q[-1]) if q else None

    @staticmethod
    def _ack_view(ack: Ack) -> tuple[object, ...]:
        """An ack without its digests: what changes when the frontiers move."""
        return tuple(x for i, x in enumerate(ack) if i not in (2, 6))

    def _under_vote(self, x: bytes, mono_ms: int) -> bool:
        """Is an eviction of ``x`` decided and closing, or a vote against it live
        whose voter this node still hears (or is this node)?"""
        if x in self.closing:
            return True
        return any(v.cut is not None and (v.voter == self.node_id or not self._silent(v.voter, mono_ms))
                   for v in self._latest_votes(x).values())

    def _latest_votes(self, x: bytes) -> dict[bytes, Vote]:
        """Each voter's newest vote or retraction against ``x``."""
        return {v.voter: v for v in self._timeline(x)}

    def _vote(self, x: bytes) -> Evict:
        start = self.membership.admitted_at(x)
        cut = self.end(x)
        fork = self._forks.get(x)
        if fork is not None:
            # a forked log: just before the fork, but never below what is final here.
            # Not this node's own fork end, whose floor is its level-1 frontier: the
            # highest cut counts, and it must not pass any node's end of that log
            # (each node's floor lies at or above every node's final frontier)
            fixed = self._count_upto(x, self.final, cut_forks=False)
            cut = min(cut, max(fork[0] - 1, fixed, self.replica.base(x)[0]))
        return Evict(member=x, cut=cut, since=0 if start is None else hlc_of(start))

    def left(self, x: bytes) -> bool:
        """Has ``x`` said it is shutting down: is a Leave the newest entry of its
        log here (and its log not cut before it), written in its current
        membership?  (A Leave from before its eviction says nothing about a
        member admitted again since: its later entries may be on their way.)"""
        seq = self._leaves.get(x)
        if seq is None:
            return False
        n = self.replica.length(x)
        if n > seq:
            del self._leaves[x]  # it wrote again: it is back
            return False
        if n != seq or self.end(x) != seq:
            return False
        ivs = self.membership.intervals(x)
        return bool(ivs) and ivs[-1].closed_at is None and seq > ivs[-1].after

    def leaves(self) -> list[bytes]:
        """Members that said they are shutting down and have not written since."""
        return [x for x in self.membership.members() if self.left(x)]

    def _silent(self, x: bytes, mono_ms: int) -> bool:
        # a member that left is silent at once, so nobody waits evict_after for it,
        # unless another member is under vote: one member under vote at a time
        # (two members that left one after the other, both voted on at once,
        # stalled finality for good once both came back, as two members
        # suspected at once did; the second now waits evict_after like a crash)
        if self.left(x) and not any(c != x for c in self.contested()):
            return True
        return mono_ms - self.last_heard.get(x, mono_ms) > self.evict_after_ms or self._lagging(x, mono_ms)

    def _lagging(self, x: bytes, mono_ms: int) -> bool:
        """Is ``x`` holding records back here without a sign of life?  Records
        have waited here for more than ``suspect_after_ms``, ``x``'s log stops
        below the newest of them, and has not grown for that long.  A live
        member writes an entry stamped above a record within a heartbeat of
        receiving it, so under load a crashed, paused or cut-off member is
        suspected within ``suspect_after_ms``; an idle network suspects no one
        before ``evict_after_ms``."""
        since = self._waiting_since
        me = self.node_id
        if since is None or x == me:
            return False
        if mono_ms - max(self.last_heard.get(x, mono_ms), since) <= self.suspect_after_ms:
            return False
        head = self._hlc_at(x, self.end(x))
        if head >= self._pending_hlc:
            return False
        heard_within = self.suspect_after_ms // 2
        # only in a calm network: every other member heard within half that time
        # (two members that fail together, or a moment apart, must not have the
        # first suspected alone: the vote could not be decided without the
        # second's acks, and its voters would certify nothing), none of them
        # holding more of x's log than this node does (its acks say how far it
        # is complete: past x's head here, x is alive and only slow to reach
        # this node), and no other member under vote or settling one.  With
        # several members silent, or links cut one way, nodes see different
        # members lagging, and votes against two members at once stall finality
        # (evict_after still applies)
        for o in self.membership.members():
            if o in (me, x):
                continue
            if mono_ms - self.last_heard.get(o, mono_ms) > heard_within:
                return False
            acks = self._acks.get(o)
            if acks and acks[-1] and acks[-1][0] > head:
                return False
        return all(c == x for c in self.contested())

    def _alive(self, x: bytes, mono_ms: int) -> bool:
        return (not self.left(x) and mono_ms - self.last_heard.get(x, mono_ms) <= self.evict_after_ms // 2
                and not self._lagging(x, mono_ms))

    def _hears_majority(self, mono_ms: int, members: list[bytes]) -> bool:
        """Does this node hear a majority of members (itself included)?  A node
        that does not may be the one cut off: it never starts or joins a vote."""
        alive = sum(1 for o in members if o == self.node_id or not self._silent(o, mono_ms))
        return alive >= len(members) // 2 + 1

    def _suspect(self, mono_ms: int, members: list[bytes]) -> bytes | None:
        # proven equivocators are voted out by a rule of their own (next_body)
        silent = [o for o in members if o != self.node_id and o not in self._forks and self._silent(o, mono_ms)]
        if len(silent) != 1 or not self._alone_silent(silent[0], mono_ms, members):
            # two members silent at once: a vote against one is decided only through the
            # other's acks without it, so it waits for one of them to come back anyway,
            # and meanwhile its voters certify nothing (every order answered no_quorum).
            # Without the vote the members still certify, and finality waits alike
            return None
        return silent[0]

    def _alone_silent(self, x: bytes, mono_ms: int, members: list[bytes]) -> bool:
        """Is ``x`` the only member silent here (proven equivocators apart, whose
        logs no longer hold anyone back), with no other member close to silent?
        Two members killed together fall silent one liveness interval apart at
        most (a heartbeat apart under load): the first must not be voted on
        alone."""
        near = max(self.evict_after_ms - self.liveness_ms - self.heartbeat_ms, self.evict_after_ms // 2)
        return not any(o not in (self.node_id, x) and o not in self._forks
                       and (self._silent(o, mono_ms) or mono_ms - self.last_heard.get(o, mono_ms) > near)
                       for o in members)

    def holding(self, mono_ms: int) -> tuple[bytes, int] | None:
        """The member whose log stops completeness, and for how long it has been silent."""
        members = self.membership.members()
        if len(members) < 2:
            return None
        lowest = min(members, key=lambda o: (self._head_hlc(o, without=None), o))
        return lowest, mono_ms - self.last_heard.get(lowest, mono_ms)
