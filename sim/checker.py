"""The simulation's checker: the guarantees of finality, asserted after every step.

- every node's final fill sequence is a prefix of every other's (or extends it).
  Under a storm several nodes may equivocate, leaving no honest majority or no
  honest node at all, so there the nodes the plan makes equivocate are exempt
  from agreement (``exempt``); in a plain run the one equivocator is held to it;
- a node's final fills never shrink or change, across restarts too (an exempt
  node's as well);
- no member record ever arrives at or below a node's final frontier;
- after healing, all live replicas converge: one state hash, one final-fill
  digest, one book;
- an independent replay of the final entries through the naive reference
  matcher (``matching/reference.py``) gives the same final fills;
- no node acknowledges an order or cancel that is later voided: what a
  majority of members certified is never reported void, and after healing
  counts on every live node; and after healing, every order or cancel of a
  live member that counts is certified (none waits for good);
- participants (``sim.node``) are held to all of the above like any node, and
  a participant's order or cancel that a member answered as carried (its
  ``Carry`` entry certified) is never reported void by that member, and after
  healing counts and is final on every live node: the order, by its ticket's
  hash, is the participant's there, a cancelled order rests nowhere;
- the replay counts a ticket once: only its first carry in canonical order
  places the order (a participant that got no answer sends the same ticket to
  another member), and every final order's state on a node (its final orders
  on disk) equals the naive recount's.

A violation is a ``Violation`` with a short description; the simulation stops
at the first one and prints the trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from crdt.entry import TICKET_WINDOW_MS, Admit, Cancel, Carry, Entry, Order, ticket_valid
from crdt.membership import Decision
from matching.engine import CANCEL, GTC, IOC, MARKET, Fill, OrderStatus
from matching.reference import reference
from sim.node import SimNode


class Violation(AssertionError):
    """A guarantee of finality does not hold."""


@dataclass(slots=True)
class Checker:
    canon: list[Fill]  # the longest final fill sequence of the nodes held to agreement
    seen: dict[int, int]
    exempt: frozenset[int]  # nodes not held to agreement (they equivocate in a storm)
    own: dict[int, list[Fill]]  # an exempt node's final fills as last seen
    voided_seen: dict[int, int]  # how many of each node's void reports ``acknowledged`` has read
    carried_twice: int = 0  # tickets carried more than once among a node's final entries (the most seen)

    @classmethod
    def new(cls, exempt: frozenset[int] = frozenset()) -> Checker:
        return cls(canon=[], seen={}, exempt=exempt, own={}, voided_seen={})

    def step(self, nodes: Sequence[SimNode]) -> None:
        for n in nodes:
            fills = n.disk.final_fills
            k = self.seen.get(n.index, 0)
            if len(fills) < k:
                raise Violation(f"node {n.index}: final fills shrank from {k} to {len(fills)}")
            if n.index in self.exempt:
                mine = self.own.setdefault(n.index, [])
                if fills[:k] != mine:
                    raise Violation(f"node {n.index}: one of its own final fills changed")
                mine.extend(fills[k:])
                self.seen[n.index] = len(fills)
                continue
            common = min(len(fills), len(self.canon))
            for i in range(k, common):
                if fills[i] != self.canon[i]:
                    raise Violation(f"node {n.index}: final fill #{i} differs from another node's")
            if len(fills) > len(self.canon):
                self.canon.extend(fills[len(self.canon):])
            self.seen[n.index] = len(fills)
        live = sorted((n for n in nodes if n.ex is not None and n.index not in self.exempt),
                      key=lambda n: n.ex.finality.final if n.ex else 0)
        for a, b in pairwise(live):
            if len(a.disk.final_fills) > len(b.disk.final_fills) and a.ex and b.ex \
                    and a.ex.finality.final < b.ex.finality.final:
                raise Violation(f"node {b.index} is final further than node {a.index} but holds fewer final fills")
        for n in nodes:
            if n.ex is not None:
                if n.ex.anomalies:
                    raise Violation(f"node {n.index}: {n.ex.anomalies} member records arrived below its "
                                    "final frontier")
                if n.ex.engine.fills_base != len(n.disk.final_fills):
                    raise Violation(f"node {n.index}: engine says {n.ex.engine.fills_base} final fills, "
                                    f"the disk holds {len(n.disk.final_fills)}")

    def acknowledged(self, nodes: Sequence[SimNode]) -> None:
        """No node acknowledges an order or cancel that is later voided: one a
        majority of members certified is never reported void on the node that
        wrote it, unless that node equivocated before it (its log ends before
        the fork), or the storm makes it equivocate.  The same for a ticket a
        member carried and a participant was answered for: the member never
        reports its carrying entry void."""
        for n in nodes:
            seen = self.voided_seen.get(n.index, 0)
            self.voided_seen[n.index] = len(n.voided)
            if n.index in self.exempt or len(n.voided) == seen:
                continue
            forked = n.disk.evidence.get(n.node_id)  # it equivocated: its log ends before the fork
            for e in n.voided[seen:]:  # a void entry never counts again, so is never acknowledged later
                if forked is not None and e.seq >= forked[0].seq:
                    continue
                if e.hash in n.acked:
                    what = type(e.body).__name__.lower()
                    raise Violation(f"node {n.index}: its {what} seq {e.seq}, acknowledged as certified by a "
                                    "majority, was voided")
                if isinstance(e.body, Carry):
                    for p in nodes:
                        got = p.tickets_acked.get(e.body.ticket)
                        if got is not None and got[1].hash == e.hash:
                            raise Violation(f"node {n.index}: its carry (seq {e.seq}) of participant {p.index}'s "
                                            f"{_what(got[0])} {e.body.ticket.hex()[:12]}, acknowledged to the "
                                            "participant, was voided")

    def invariants(self, nodes: Sequence[SimNode]) -> None:
        for n in nodes:
            if n.ex is not None:
                try:
                    n.ex.engine.check_invariants()
                except AssertionError as exc:
                    raise Violation(f"node {n.index}: engine invariant: {exc}") from None

    def converged(self, nodes: Sequence[SimNode]) -> str | None:
        """None when every live node agrees and nothing is pending; else why not."""
        live = [n for n in nodes if n.ex is not None and not n.paused]
        members = [n for n in live if n.ex is not None and n.ex.is_member()]
        if not members:
            return "no live member"
        views = {}
        for n in live:
            ex = n.ex
            assert ex is not None
            if ex.pending():
                return f"node {n.index} has records that are not final"
            views[n.index] = (ex.state_hash(), ex.engine.fills_base, ex.final_digest, ex.book_hash())
        if len(set(views.values())) > 1:
            return "live nodes differ: " + ", ".join(f"{i}: {v[0].hex()[:8]}/{v[1]}/{v[3].hex()[:8]}"
                                                     for i, v in views.items())
        for n in live:
            if n.sending:
                return f"participant {n.index} has {len(n.sending)} tickets waiting for an answer"
        for n in members:
            assert n.ex is not None
            ex = n.ex
            stuck = [e for e in n.waiting if e.seq <= ex.finality.end(n.node_id)
                     and ex.membership.valid(n.node_id, e.seq, e.key)]
            if stuck:
                return f"node {n.index} has {len(stuck)} orders or cancels that count but no majority certified"
        for n in nodes:
            if n.index in self.exempt:
                continue
            forked = n.disk.evidence.get(n.node_id)
            for e in n.acked.values():
                if forked is not None and e.seq >= forked[0].seq:
                    continue
                for m in live:
                    assert m.ex is not None
                    if not m.ex.membership.valid(e.origin, e.seq, e.key) or e.seq > m.ex.finality.end(e.origin):
                        raise Violation(f"node {n.index}: its acknowledged {type(e.body).__name__.lower()} seq "
                                        f"{e.seq} does not count at node {m.index}")
        self._tickets_final(nodes, live)
        return None

    def _tickets_final(self, nodes: Sequence[SimNode], live: Sequence[SimNode]) -> None:
        """Every participant's acknowledged order or cancel counts and is final
        on every live node (participants included), once they all agree: the
        carrying entry counts and lies at or below the final frontier; an
        order is the participant's there (by its ticket's hash) and final; the
        order a cancel named rests nowhere."""
        by_id = {n.node_id: n for n in nodes}
        for p in nodes:
            for carry, e in p.tickets_acked.values():
                member = by_id.get(e.origin)
                if member is None or member.index in self.exempt:
                    continue
                forked = member.disk.evidence.get(member.node_id)
                if forked is not None and e.seq >= forked[0].seq:
                    continue  # the carrying member equivocated before it: its log ends at the fork
                what = f"participant {p.index}'s acknowledged {_what(carry)} {carry.ticket.hex()[:12]}"
                for m in live:
                    ex = m.ex
                    assert ex is not None
                    if not ex.membership.valid(e.origin, e.seq, e.key) or e.seq > ex.finality.end(e.origin):
                        raise Violation(f"{what} (carried by node {member.index}, seq {e.seq}) does not count at "
                                        f"node {m.index}")
                    if e.hlc > ex.finality.final:
                        raise Violation(f"{what} is not final at node {m.index}")
                    inner = carry.inner
                    if isinstance(inner, Order):
                        fo = m.disk.final_orders.get(carry.ticket)
                        owner = fo.owner if fo is not None else ex.owner(carry.ticket)
                        if owner != carry.owner:
                            raise Violation(f"{what} is not the participant's order at node {m.index}")
                        if fo is None and not ex.order_final(carry.ticket):
                            raise Violation(f"{what} is not final at node {m.index}")
                    else:
                        st = ex.status(inner.order_id)
                        if st is None and (fo := m.disk.final_orders.get(inner.order_id)) is not None:
                            st = fo.status
                        if st is not None and st.remaining:
                            raise Violation(f"{what} left its order resting at node {m.index}")

    def replay(self, node: SimNode, decisions: Sequence[Decision]) -> None:
        """Recompute the final fills from the node's entries with naive rules."""
        ex = node.ex
        assert ex is not None
        entries = [e for log in node.disk.entries.values() for e in log]
        final = ex.finality.final
        banned = {}
        for o in ex.finality.forks():
            end = ex.finality.end(o)
            banned[o] = ex.replica.point(o, end)[1] if end else 0
        valid = naive_validity(entries, decisions, node.disk.network, banned, ex.finality.ends())
        records: list[tuple[Any, ...]] = []
        for e in entries:
            if e.hlc > final or e.seq > ex.finality.end(e.origin) or not valid(e):
                continue
            body, owner, oid = e.body, e.origin, e.hash
            if isinstance(body, Carry):  # a participant's ticket: its owner's, within its window, signed
                if abs((body.stamp >> 16) - (e.hlc >> 16)) > TICKET_WINDOW_MS or not ticket_valid(body):
                    continue
                owner, oid, body = body.owner, body.ticket, body.inner
            if isinstance(body, Order):
                kind = MARKET if body.market else (IOC if body.tif == IOC else GTC)
                records.append((e.key, kind, oid, body.side, body.price, body.qty, owner))
            elif isinstance(body, Cancel):
                records.append((e.key, CANCEL, body.order_id, 0, 0, 0, owner))
        # only the first carry of a ticket in canonical order places it; the others place nothing
        records.sort(key=lambda r: r[0])
        placed: set[Any] = set()
        once: list[tuple[Any, ...]] = []
        for r in records:
            if r[1] != CANCEL:
                if r[2] in placed:
                    continue
                placed.add(r[2])
            once.append(r)
        self.carried_twice = max(self.carried_twice, len(records) - len(once))
        ref = reference(once)
        want = ref.fills
        got = node.disk.final_fills
        if want != got:
            first = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                         min(len(want), len(got)))
            raise Violation(f"node {node.index}: replay through the reference matcher gives {len(want)} final "
                            f"fills, the node {len(got)}; first difference at #{first}")
        for oid, placed_by in ((oid, ro.owner) for oid, ro in ref.orders.items()):  # a ticket's included
            fo = node.disk.final_orders.get(oid)
            st: OrderStatus | None = ref.status(oid)
            if fo is None or fo.status != st or fo.owner != placed_by:
                raise Violation(f"node {node.index}: final order {oid.hex()[:12]} is "
                                f"{None if fo is None else (fo.status, fo.owner.hex()[:8])}, the reference "
                                f"matcher says {(st, placed_by.hex()[:8])}")


def _what(carry: Carry) -> str:
    return "order" if isinstance(carry.inner, Order) else "cancel"


def naive_validity(entries: Sequence[Entry], decisions: Sequence[Decision], network: bytes | None,
                   banned: dict[bytes, int], ends: dict[bytes, int]) -> Any:
    """Membership from scratch: admission votes and eviction decisions in key
    order, an admission decided by the vote that completes a majority of the
    members there, no reuse of ``crdt.membership``."""
    events: list[tuple[bytes, int, Any]] = []
    for e in entries:
        if isinstance(e.body, Admit):
            events.append((e.key, 0, e))
    for d in decisions:
        events.append((d.at, 1, d))
    events.sort(key=lambda ev: (ev[0], ev[1]))
    intervals: dict[bytes, list[list[Any]]] = {}  # origin -> [start, cut, closed_at, after]

    def acts(origin: bytes, seq: int, key: bytes) -> bool:
        return any(key > s and seq > a and (c is None or seq <= c) and (at is None or key < at)
                   for s, c, at, a in intervals.get(origin, []))

    def is_open(origin: bytes, key: bytes) -> bool:
        ivs = intervals.get(origin, [])
        return bool(ivs) and (ivs[-1][2] is None or ivs[-1][2] > key)

    def void_later(origin: bytes, seq: int, key: bytes) -> bool:
        """Is this entry past the cut of an eviction decided after it?"""
        return any(d.member == origin and d.at > key and seq > d.cut for d in decisions)

    votes: dict[bytes, dict[bytes, tuple[int, int]]] = {}  # joiner -> voter -> (seq, after), undecided
    for key, kind, ev in events:
        if kind == 0:
            admit: Entry = ev
            assert isinstance(admit.body, Admit)
            member, by, seq = admit.body.member, admit.origin, admit.seq
            if is_open(member, key) or void_later(by, seq, key) or seq > ends.get(by, seq):
                continue
            if member in banned and int.from_bytes(key[:8], "big") > banned[member]:
                continue
            if admit.hash == network and seq == 1 and member == by:
                intervals.setdefault(member, []).append([key, None, None, admit.body.after])
            elif acts(by, seq, key):
                # a vote: the admission is decided by the one that completes a majority of the members now
                mine = votes.setdefault(member, {})
                mine[by] = (seq, admit.body.after)
                now_members = [o for o in intervals if is_open(o, key)]
                counted = [v for v in mine if v in now_members]
                if 2 * len(counted) > len(now_members):
                    intervals.setdefault(member, []).append([key, None, None, max(mine[v][1] for v in counted)])
                    del votes[member]
        else:
            dec: Decision = ev
            ivs = intervals.get(dec.member)
            if ivs and ivs[-1][2] is None and ivs[-1][0] < key:
                ivs[-1][1], ivs[-1][2] = dec.cut, key

    def valid(e: Entry) -> bool:
        return any(e.key > s and e.seq > a and (c is None or e.seq <= c)
                   for s, c, _, a in intervals.get(e.origin, []))

    return valid
