"""Membership: which origins' entries are matched, derived from replicated entries.

A network is named by the hash of its genesis entry: its founder's ``Admit``
of itself at seq 1.  After that, admitting an origin is a majority decision of
the current members: each member that agrees writes ``Admit(member, after)``
in its own log (a vote), and the admission takes effect at the vote that
completes a majority of the members at that key, in canonical order.  The
admitted origin's entries with a seq above ``after`` (the highest ``after``
among the counted votes: its log length when it asked) and stamped after that
deciding vote (by canonical key) are matched.  A lone member is a majority of
one.  An eviction, once decided (see ``crdt.finality``), ends the evicted
origin's membership: its entries up to seq ``cut`` stay valid, every later one
is void until a fresh admission.  An origin proven to equivocate is never
admitted again past its fork: its log can no longer grow the same way on every
replica.

Membership is a pure function of the admission votes and eviction decisions
taken in canonical order, so every replica that holds the same entries
derives the same intervals.  Events at or below the stable frontier are folded
into a base snapshot, which is what a checkpoint stores, together with the
admission votes that have not decided anything yet (a later vote may still
complete their majority).
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass, replace
from hashlib import blake2b
from typing import Any

import msgpack


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The eviction of ``member`` decided at the vote with key ``at``: its log ends at ``cut``."""

    member: bytes
    at: bytes
    cut: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Interval:
    """One membership of an origin: its entries with key > ``start`` and
    ``after`` < seq (<= ``end_seq`` once closed) are valid; ``closed_at`` is the
    key of the vote that decided its eviction; ``admitter``/``admit_seq`` name
    the ``Admit`` vote that completed the majority (``start`` is its key), and
    ``voters`` every counted admission vote as ``(voter, seq)``."""

    start: bytes
    after: int
    admitter: bytes
    admit_seq: int
    end_seq: int | None = None
    closed_at: bytes | None = None
    voters: tuple[tuple[bytes, int], ...] = ()

    def covers(self, seq: int, key: bytes) -> bool:
        return key > self.start and seq > self.after and (self.end_seq is None or seq <= self.end_seq)

    def acts_at(self, seq: int, key: bytes) -> bool:
        """May the entry admit or vote: covered, and before the decision that closed it."""
        return self.covers(seq, key) and (self.closed_at is None or key < self.closed_at)

    def to_wire(self) -> list[Any]:
        return [self.start, self.after, self.admitter, self.admit_seq, self.end_seq, self.closed_at,
                [[v, seq] for v, seq in self.voters]]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Interval:
        start, after, admitter, admit_seq, end_seq, closed_at = raw[:6]
        voters = tuple((v, seq) for v, seq in raw[6]) if len(raw) > 6 else ((admitter, admit_seq),)
        return cls(start=start, after=after, admitter=admitter, admit_seq=admit_seq, end_seq=end_seq,
                   closed_at=closed_at, voters=voters)


Intervals = dict[bytes, list[Interval]]
#: admission votes that decided nothing yet: joiner -> voter -> (key, seq, after)
Pending = dict[bytes, dict[bytes, tuple[bytes, int, int]]]
#: the snapshot's entry for the base's pending admission votes (no origin is empty)
PENDING_KEY = b""


def majority(n: int) -> int:
    """The smallest number of members that is more than half of ``n``."""
    return n // 2 + 1


class Membership:
    def __init__(self, network: bytes | None = None) -> None:
        self._network = network
        self._base: Intervals = {}
        self._base_pending: Pending = {}  # admission votes at or below the base that decided nothing yet
        self._pending: Pending = {}
        # pending events above the base, in key order:
        # (key, 0, admitter, seq, entry hash, member, after) or (key, 1, member, cut)
        self._events: list[tuple[Any, ...]] = []
        self._intervals: Intervals = {}
        self._members: list[bytes] = []
        self._banned: dict[bytes, int] = {}  # origin -> stamp after which it is never admitted
        self._ends: dict[bytes, int] = {}  # origin -> effective end of a log proven to equivocate
        self.version = 0  # bumped whenever the derived intervals change
        self._fingerprint: tuple[int, bytes] = (-1, b"")
        self.revision = 0  # bumped on every input, also one that changes no interval (a vote that decides nothing)

    @property
    def network(self) -> bytes | None:
        """The hash of the genesis entry that names the network (None: not known yet)."""
        return self._network

    @network.setter
    def network(self, network: bytes | None) -> None:
        # admissions held from before the network was known are judged again:
        # the founder's genesis counts only once its hash is known to name the network
        if network != self._network:
            self._network = network
            self._derive()

    # ---- inputs ------------------------------------------------------------

    def add_admit(self, *, key: bytes, admitter: bytes, seq: int, entry_hash: bytes, member: bytes,
                  after: int) -> None:
        insort(self._events, (key, 0, admitter, seq, entry_hash, member, after))
        self._derive()

    def add_decision(self, d: Decision) -> None:
        insort(self._events, (d.at, 1, d.member, d.cut))
        self._derive()

    def set_end(self, origin: bytes, end: int) -> None:
        """``origin`` equivocated: its entries past seq ``end`` neither count nor act."""
        if self._ends.get(origin) != end:
            self._ends[origin] = end
            self._derive()

    def ban(self, origin: bytes, after_hlc: int) -> None:
        """No admission of ``origin`` stamped after ``after_hlc`` counts (it
        equivocated; ``after_hlc`` is the stamp of its log's effective end, which
        moves with that end)."""
        if self._banned.get(origin) != after_hlc:
            self._banned[origin] = after_hlc
            self._derive()

    def with_decision(self, d: Decision) -> Membership:
        """A copy of this membership with ``d`` applied too: what it will be once
        ``d`` is decided (the intervals are derived again, so votes ``d`` voids
        decide nothing in the copy)."""
        other = Membership(self._network)
        other._base = {o: list(ivs) for o, ivs in self._base.items()}
        other._base_pending = {m: dict(votes) for m, votes in self._base_pending.items()}
        other._events = list(self._events)
        other._banned = dict(self._banned)
        other._ends = dict(self._ends)
        other.add_decision(d)
        return other

    def remove_events(self, keys: Iterable[bytes]) -> None:
        """Forget admission votes whose entries became void (their writer was evicted)."""
        drop = set(keys)
        if drop:
            self._events = [ev for ev in self._events if ev[0] not in drop]
            for votes in self._base_pending.values():
                for voter in [v for v, (k, _, _) in votes.items() if k in drop]:
                    del votes[voter]
            self._derive()

    def compact(self, floor_key: bytes) -> None:
        """Fold events at or below ``floor_key`` into the base snapshot.  Votes
        that decided nothing by then stay as they are: only a vote above the
        floor can complete their majority, counted against the members there."""
        keep = [ev for ev in self._events if ev[0] > floor_key]
        if len(keep) == len(self._events):
            return
        self._base, self._base_pending = self._derive_upto(floor_key)
        self._events = keep

    # ---- queries -----------------------------------------------------------

    def intervals(self, origin: bytes) -> list[Interval]:
        return self._intervals.get(origin, [])

    def valid(self, origin: bytes, seq: int, key: bytes) -> bool:
        """Is entry ``seq`` (with canonical ``key``) of ``origin`` matched?"""
        if seq > self._ends.get(origin, seq):
            return False
        return any(iv.covers(seq, key) for iv in self._intervals.get(origin, ()))

    def acts(self, origin: bytes, seq: int, key: bytes) -> bool:
        """May entry ``seq`` of ``origin`` (at ``key``) admit or vote?"""
        if seq > self._ends.get(origin, seq):
            return False
        return any(iv.acts_at(seq, key) for iv in self._intervals.get(origin, ()))

    def fingerprint(self) -> bytes:
        """A short hash of the memberships open now (each member and the key
        its membership began at): two nodes with the same fingerprint count
        the same members."""
        if self._fingerprint[0] != self.version:
            rows = [[o, self._intervals[o][-1].start] for o in self._members]
            self._fingerprint = (self.version, blake2b(msgpack.packb(rows, use_bin_type=True),
                                                       digest_size=16).digest())
        return self._fingerprint[1]

    def members(self) -> list[bytes]:
        """Origins whose membership is open now, sorted (do not change the list)."""
        return self._members

    def is_member(self, origin: bytes) -> bool:
        ivs = self._intervals.get(origin)
        return bool(ivs) and ivs[-1].closed_at is None  # type: ignore[index]

    def ever_members(self) -> list[bytes]:
        return sorted(self._intervals)

    def members_at(self, key: bytes) -> list[bytes]:
        """Origins that are members at canonical position ``key``."""
        return sorted(o for o, ivs in self._intervals.items()
                      if any(iv.start < key and (iv.closed_at is None or iv.closed_at > key) for iv in ivs))

    def admitted_at(self, origin: bytes) -> bytes | None:
        """Start key of ``origin``'s open interval."""
        ivs = self._intervals.get(origin)
        if ivs and ivs[-1].closed_at is None:
            return ivs[-1].start
        return None

    def closed_cut(self, origin: bytes) -> int | None:
        """The cut of ``origin``'s last interval when it is closed."""
        ivs = self._intervals.get(origin)
        if ivs and ivs[-1].closed_at is not None:
            return ivs[-1].end_seq
        return None

    def depends_on(self, origin: bytes, key: bytes, x: bytes, cut: int) -> bool:
        """Does ``origin``'s membership at ``key`` rest on an ``Admit`` vote that
        ``x`` wrote past seq ``cut`` (one of the votes counted for it, or, in
        turn, for the membership of one of its voters)?"""
        todo = [(origin, key)]
        seen: set[tuple[bytes, bytes]] = set()
        while todo and len(seen) < 256:
            o, k = todo.pop()
            if (o, k) in seen:
                continue
            seen.add((o, k))
            iv = next((iv for iv in self._intervals.get(o, ())
                       if iv.start < k and (iv.closed_at is None or k < iv.closed_at)), None)
            if iv is None:
                continue
            for voter, seq in iv.voters:
                if voter == x and seq > cut:
                    return True
                if voter != o:
                    todo.append((voter, iv.start))
        return False

    def admits_past(self, voter: bytes, seq: int) -> bool:
        """Has ``voter`` admission votes past seq ``seq`` above the base (those an
        eviction of ``voter`` with that cut would void)?"""
        return any(ev[1] == 0 and ev[2] == voter and ev[3] > seq for ev in self._events)

    def voted(self, voter: bytes, member: bytes) -> bool:
        """Has ``voter`` an admission vote for ``member`` that decided nothing yet?"""
        return voter in self._pending.get(member, {})

    def admitting(self) -> dict[bytes, list[bytes]]:
        """Origins with admission votes that decided nothing yet, and their voters."""
        return {m: sorted(votes) for m, votes in self._pending.items() if votes}

    def decisions(self) -> list[Decision]:
        """Every eviction applied: those folded into the base and those above it."""
        out = [Decision(member=o, at=iv.closed_at, cut=iv.end_seq) for o, ivs in self._base.items() for iv in ivs
               if iv.closed_at is not None and iv.end_seq is not None]
        out += [Decision(member=ev[2], at=ev[0], cut=ev[3]) for ev in self._events if ev[1] == 1]
        return sorted(out, key=lambda d: d.at)

    def snapshot(self) -> dict[bytes, list[list[Any]]]:
        """The base intervals and the base's pending admission votes (under
        ``PENDING_KEY``), for a checkpoint (events above the floor replay from entries)."""
        out: dict[bytes, list[list[Any]]] = {o: [iv.to_wire() for iv in ivs] for o, ivs in self._base.items()}
        pending = [[m, v, k, seq, after] for m, votes in sorted(self._base_pending.items())
                   for v, (k, seq, after) in sorted(votes.items())]
        if pending:
            out[PENDING_KEY] = pending
        return out

    def restore(self, snapshot: dict[bytes, list[list[Any]]]) -> None:
        self._base = {o: [Interval.from_wire(iv) for iv in ivs] for o, ivs in snapshot.items() if o != PENDING_KEY}
        self._base_pending = {}
        for m, v, k, seq, after in snapshot.get(PENDING_KEY, ()):
            self._base_pending.setdefault(m, {})[v] = (k, seq, after)
        self._derive()

    # ---- derivation ----------------------------------------------------------

    def _derive_upto(self, floor_key: bytes | None) -> tuple[Intervals, Pending]:
        ivs: Intervals = {o: list(v) for o, v in self._base.items()}
        pending: Pending = {m: dict(votes) for m, votes in self._base_pending.items() if votes}
        # every decision known, above the floor too: a vote past its writer's cut is void
        # whether it arrived before the decision or after it (see _admit_vote)
        cuts: dict[bytes, list[tuple[bytes, int]]] = {}
        for ev in self._events:
            if ev[1] == 1:
                cuts.setdefault(ev[2], []).append((ev[0], ev[3]))
        for ev in self._events:
            if floor_key is not None and ev[0] > floor_key:
                break
            if ev[1] == 0:
                self._admit_vote(ivs, pending, ev, cuts)
            else:
                key, _, member, cut = ev
                cur = ivs.get(member)
                if cur and cur[-1].closed_at is None and cur[-1].start < key:
                    cur[-1] = replace(cur[-1], end_seq=cut, closed_at=key)
        return ivs, pending

    def _admit_vote(self, ivs: Intervals, pending: Pending, ev: tuple[Any, ...],
                    cuts: dict[bytes, list[tuple[bytes, int]]]) -> None:
        """One ``Admit`` in canonical order: the genesis, a vote that counts
        toward ``member``'s admission, or nothing.  The vote that completes a
        majority of the members at its key admits ``member`` there.  A vote
        past the cut of the eviction that ends its writer's membership (the
        first decision against the writer after the vote's key) is void: it
        counts nowhere, whether this node held it when the eviction was decided
        or it came later (replicas that counted it in one order and not in the
        other derived different admissions, and their digests never matched)."""
        key, _, admitter, seq, entry_hash, member, after = ev
        cur = ivs.get(member)
        if cur and (cur[-1].closed_at is None or cur[-1].closed_at > key):
            return  # already a member there
        banned = self._banned.get(member)
        if banned is not None and int.from_bytes(key[:8], "big") > banned:
            return
        if seq > self._ends.get(admitter, seq):
            return
        if entry_hash == self._network and admitter == member and seq == 1:  # the genesis
            ivs.setdefault(member, []).append(
                Interval(start=key, after=after, admitter=admitter, admit_seq=seq, voters=((admitter, seq),)))
            return
        if not any(iv.acts_at(seq, key) for iv in ivs.get(admitter, ())):
            return
        ends = [cut for at, cut in cuts.get(admitter, ()) if at > key]
        if ends and seq > ends[0]:
            return
        votes = pending.setdefault(member, {})
        votes[admitter] = (key, seq, after)
        members = {o for o, held in ivs.items() if held and held[-1].closed_at is None}
        counted = sorted(v for v in votes if v in members)
        if len(counted) < majority(len(members)):
            return
        ivs.setdefault(member, []).append(Interval(
            start=key, after=max(votes[v][2] for v in counted), admitter=admitter, admit_seq=seq,
            voters=tuple((v, votes[v][1]) for v in counted)))
        del pending[member]

    def _derive(self) -> None:
        self.revision += 1
        new, pending = self._derive_upto(None)
        self._pending = pending
        if new != self._intervals:
            self._intervals = new
            self._members = sorted(o for o, ivs in new.items() if ivs and ivs[-1].closed_at is None)
            self.version += 1
