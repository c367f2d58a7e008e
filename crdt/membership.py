"""Membership: which origins' entries are matched, derived from replicated entries.

A network is named by the hash of its genesis entry: its founder's ``Admit``
of itself at seq 1.  After that, a member admits another origin with an
``Admit(member, after)`` entry in its own log: the admitted origin's entries
with a seq above ``after`` (its log length when it asked) and stamped after
that entry (by canonical key) are matched.  An eviction, once decided (see
``crdt.finality``), ends the evicted origin's membership: its entries up to
seq ``cut`` stay valid, every later one is void until a fresh admission.
An origin proven to equivocate is never admitted again past its fork: its log
can no longer grow the same way on every replica.

Membership is a pure function of the admissions and decisions taken in
canonical order, so every replica that holds the same entries derives the same
intervals.  Events at or below the stable frontier are folded into a base
snapshot, which is what a checkpoint stores.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any


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
    key of the deciding vote; ``admitter``/``admit_seq`` name the ``Admit``."""

    start: bytes
    after: int
    admitter: bytes
    admit_seq: int
    end_seq: int | None = None
    closed_at: bytes | None = None

    def covers(self, seq: int, key: bytes) -> bool:
        return key > self.start and seq > self.after and (self.end_seq is None or seq <= self.end_seq)

    def acts_at(self, seq: int, key: bytes) -> bool:
        """May the entry admit or vote: covered, and before the decision that closed it."""
        return self.covers(seq, key) and (self.closed_at is None or key < self.closed_at)

    def to_wire(self) -> list[Any]:
        return [self.start, self.after, self.admitter, self.admit_seq, self.end_seq, self.closed_at]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Interval:
        start, after, admitter, admit_seq, end_seq, closed_at = raw
        return cls(start=start, after=after, admitter=admitter, admit_seq=admit_seq, end_seq=end_seq,
                   closed_at=closed_at)


Intervals = dict[bytes, list[Interval]]


class Membership:
    def __init__(self, network: bytes | None = None) -> None:
        self._network = network
        self._base: Intervals = {}
        # pending events above the base, in key order:
        # (key, 0, admitter, seq, entry hash, member, after) or (key, 1, member, cut)
        self._events: list[tuple[Any, ...]] = []
        self._intervals: Intervals = {}
        self._members: list[bytes] = []
        self._banned: dict[bytes, int] = {}  # origin -> stamp after which it is never admitted
        self._ends: dict[bytes, int] = {}  # origin -> effective end of a log proven to equivocate
        self.version = 0  # bumped whenever the derived intervals change

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

    def remove_events(self, keys: Iterable[bytes]) -> None:
        """Forget admissions whose entries became void (their writer was evicted)."""
        drop = set(keys)
        if drop:
            self._events = [ev for ev in self._events if ev[0] not in drop]
            self._derive()

    def compact(self, floor_key: bytes) -> None:
        """Fold events at or below ``floor_key`` into the base snapshot."""
        keep = [ev for ev in self._events if ev[0] > floor_key]
        if len(keep) == len(self._events):
            return
        self._base = self._derive_upto(floor_key)
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
        """Does ``origin``'s membership at ``key`` rest on an ``Admit`` that ``x``
        wrote past seq ``cut`` (directly or through whoever admitted its admitter)?"""
        for _ in range(32):
            iv = next((iv for iv in self._intervals.get(origin, ())
                       if iv.start < key and (iv.closed_at is None or key < iv.closed_at)), None)
            if iv is None or iv.admitter == origin:
                return False
            if iv.admitter == x and iv.admit_seq > cut:
                return True
            origin, key = iv.admitter, iv.start
        return False

    def decisions(self) -> list[Decision]:
        """Every eviction applied: those folded into the base and those above it."""
        out = [Decision(member=o, at=iv.closed_at, cut=iv.end_seq) for o, ivs in self._base.items() for iv in ivs
               if iv.closed_at is not None and iv.end_seq is not None]
        out += [Decision(member=ev[2], at=ev[0], cut=ev[3]) for ev in self._events if ev[1] == 1]
        return sorted(out, key=lambda d: d.at)

    def snapshot(self) -> dict[bytes, list[list[Any]]]:
        """The base intervals, for a checkpoint (events above the floor replay from entries)."""
        return {o: [iv.to_wire() for iv in ivs] for o, ivs in self._base.items()}

    def restore(self, snapshot: dict[bytes, list[list[Any]]]) -> None:
        self._base = {o: [Interval.from_wire(iv) for iv in ivs] for o, ivs in snapshot.items()}
        self._derive()

    # ---- derivation ----------------------------------------------------------

    def _derive_upto(self, floor_key: bytes | None) -> Intervals:
        ivs: Intervals = {o: list(v) for o, v in self._base.items()}
        for ev in self._events:
            if floor_key is not None and ev[0] > floor_key:
                break
            key = ev[0]
            if ev[1] == 0:
                _, _, admitter, seq, entry_hash, member, after = ev
                cur = ivs.get(member)
                if cur and (cur[-1].closed_at is None or cur[-1].closed_at > key):
                    continue  # already a member there
                banned = self._banned.get(member)
                if banned is not None and int.from_bytes(key[:8], "big") > banned:
                    continue
                genesis = entry_hash == self._network and admitter == member and seq == 1
                if seq > self._ends.get(admitter, seq):
                    continue
                if genesis or any(iv.acts_at(seq, key) for iv in ivs.get(admitter, ())):
                    ivs.setdefault(member, []).append(
                        Interval(start=key, after=after, admitter=admitter, admit_seq=seq))
            else:
                _, _, member, cut = ev
                cur = ivs.get(member)
                if cur and cur[-1].closed_at is None and cur[-1].start < key:
                    cur[-1] = replace(cur[-1], end_seq=cut, closed_at=key)
        return ivs

    def _derive(self) -> None:
        new = self._derive_upto(None)
        if new != self._intervals:
            self._intervals = new
            self._members = sorted(o for o, ivs in new.items() if ivs and ivs[-1].closed_at is None)
            self.version += 1
