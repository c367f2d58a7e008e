"""One simulated node: the pure core, a disk, a clock and the replication
policy of the real node (push own entries to every peer, pull from a random
peer, gossip equivocation evidence, ask every peer for admission).

A *participant* node never asks to join and writes nothing: it holds a full
replica like any node, and its trader signs tickets (``Exchange.ticket``) and
sends each to a member that looks live.  The member validates and carries it
(a ``Carry`` entry of its own log) and answers once a majority certified that
entry; without an answer within ``TICKET_TIMEOUT_MS`` the participant sends
the same ticket to another member (at most ``TICKET_TRIES`` sends), as the
real node does over HTTP.

The disk holds what the real node commits to SQLite: every entry it accepted
(own ones before they are applied), equivocation evidence, and what
finalizing handed over (final fills, final orders, the checkpoint), written
together.  A crash loses memory, never the disk; a restart rebuilds from it
exactly as the real node does.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crdt.entry import Body, Cancel, Carry, Entry, Order
from crdt.errors import BadTicket, ExchangeError, ForeignCancel
from crdt.keys import SigningKey
from matching.engine import Fill, FinalOrder
from matching.exchange import Checkpoint, Exchange, NotCancellable, Params, Received
from sim.network import Network

SYNC_PAGE = 500
OFFSET_TTL_MS = 2_000  # a peer's clock reading older than this is not used
TICKET_TIMEOUT_MS = 250  # a participant sends its ticket to another member after this long unanswered
TICKET_TRIES = 4  # sends of one ticket before the participant gives up (its client hears no answer)
#: a member's refusals after which the participant gives up at once (another member would refuse too)
FINAL_REFUSALS = (BadTicket.__name__, ForeignCancel.__name__, NotCancellable.__name__)


@dataclass(slots=True)
class Sending:
    """A participant's ticket waiting for a member's answer."""

    carry: Carry
    deadline: int
    tried: list[int]


@dataclass(slots=True)
class Disk:
    entries: dict[bytes, list[Entry]] = field(default_factory=dict)
    evidence: dict[bytes, tuple[Entry, Entry]] = field(default_factory=dict)
    final_fills: list[Fill] = field(default_factory=list)
    final_orders: dict[bytes, FinalOrder] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    marked: list[Any] = field(default_factory=list)  # final cancels that found no order (FinalBatch.marked)
    network: bytes | None = None

    def commit(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        for e in entries:
            log = self.entries.setdefault(e.origin, [])
            if len(log) + 1 != e.seq:
                raise AssertionError(f"disk log of {e.origin.hex()[:8]} would get a gap or a rewrite at {e.seq}")
            log.append(e)


class SimNode:
    def __init__(self, index: int, key: SigningKey, params: Params, net: Network, rng: random.Random,
                 *, participant: bool = False) -> None:
        self.index = index
        self.participant = participant
        self.key = key
        self.node_id = key.public
        self.params = params
        self.net = net
        self.rng = rng
        self.disk = Disk()
        self.ex: Exchange | None = Exchange(key, params=params)
        self.skew_ms = 0  # this node's clock minus true time
        self.paused = False
        self.peers: list[int] = []
        self.offsets: dict[int, tuple[int, int]] = {}  # peer -> (offset, when measured)
        self.next_pull = 0
        self.next_join = 0
        self.restarts = 0
        self.revoked = 0
        self.voided: list[Entry] = []
        self.decisions: list[Any] = []
        self.log: list[str] = []
        # orders and cancels a trader wrote here, waiting for a majority's
        # certification (a crash drops them: their client never got an answer),
        # and those answered as placed (the real node's 201), by entry hash
        self.waiting: list[Entry] = []
        self.acked: dict[bytes, Entry] = {}
        # a member: the participants waiting for its answer on the tickets it
        # carries, by carrying entry hash, and the entry that carries each ticket
        # (memory: a crash forgets them)
        self.carrying: dict[bytes, list[int]] = {}
        self.carried: dict[bytes, Entry] = {}
        # a participant: its tickets waiting for an answer (a crash drops them), and
        # those a member answered as carried and certified, with the carrying entry
        self.sending: dict[bytes, Sending] = {}
        self.tickets_acked: dict[bytes, tuple[Carry, Entry]] = {}
        self.directory: dict[bytes, int] = {}  # node id -> index, to address a member

    @property
    def alive(self) -> bool:
        return self.ex is not None

    def wall(self, now: int) -> int:
        return now + self.skew_ms

    # ---- the shell's duties ----------------------------------------------------------

    def _absorb(self, r: Received, *, committed: Entry | None = None, from_disk: bool = False) -> None:
        """What the real node does with a core result: commit, persist finals."""
        assert self.ex is not None
        if not from_disk:
            self.disk.commit([e for e in r.merge.accepted if e is not committed])
        for origin in r.merge.evidence:
            ev = self.ex.replica.evidence()[origin]
            self.disk.evidence[origin] = (ev.first, ev.second)
        self.revoked += len(r.revoked)
        self.voided += r.voided
        self.voided += r.unadmitted
        self.decisions += r.decisions
        for batch in self.ex.take_finalized():
            assert batch.first_seq == len(self.disk.final_fills), "final fills out of step with the disk"
            self.disk.final_fills += batch.fills
            for fo in batch.orders:
                self.disk.final_orders[fo.oid] = fo
            self.disk.marked += batch.marked
            self.disk.checkpoint = self.ex.checkpoint()
        self.disk.network = self.ex.network

    def write(self, now: int, body: Body) -> Entry | None:
        """Prepare, commit, apply and push one own entry."""
        ex = self.ex
        assert ex is not None
        try:
            entry = ex.prepare(body, now_ms=self.wall(now))
        except ExchangeError:
            return None
        self._commit_own(now, entry)
        return entry

    def _commit_own(self, now: int, entry: Entry) -> None:
        ex = self.ex
        assert ex is not None
        self.disk.commit([entry])
        sub = ex.apply_own(entry, now_ms=self.wall(now), mono_ms=now)
        if sub.received is not None:
            self._absorb(sub.received, committed=entry)
        for p in self.peers:
            self._send(now, p, ("push", [entry]))

    def _send(self, now: int, dst: int, msg: tuple[Any, ...]) -> None:
        self.net.send(now, self.index, dst, (self.wall(now), msg))

    # ---- lifecycle ---------------------------------------------------------------------

    def found(self, now: int) -> None:
        assert self.ex is not None
        entry = self.ex.found(now_ms=self.wall(now))
        self.disk.commit([entry])
        sub = self.ex.apply_own(entry, now_ms=self.wall(now), mono_ms=now)
        assert sub.received is not None
        self._absorb(sub.received, committed=entry)

    def crash(self) -> None:
        self.ex = None
        self.paused = False
        self.waiting = []
        self.carrying = {}
        self.carried = {}
        self.sending = {}

    def stop(self, now: int) -> None:
        """A clean shutdown: a member writes its Leave and pushes it to every
        peer (as the real node does on SIGTERM), then the process ends."""
        if self.ex is not None and not self.paused:
            body = self.ex.leave_body()
            if body is not None:
                self.write(now, body)
        self.crash()

    def restart(self, now: int) -> None:
        ex = Exchange(self.key, network=self.disk.network, params=self.params)
        cp = self.disk.checkpoint
        bases = cp.bases if cp is not None else {}
        resting = []
        if cp is not None:
            for fo in self.disk.final_orders.values():
                st = fo.status
                if st.remaining:
                    resting.append([st.remaining, fo.oid, st.qty, st.qty - st.filled - st.remaining, st.side,
                                    st.price, fo.key, fo.owner])
        # closed final orders: a repeated carry of a ticket above the checkpoint must not place one again
        closed = [(fo.oid, fo.key) for fo in self.disk.final_orders.values() if not fo.status.remaining]
        entries = [e for o, log in self.disk.entries.items() for e in log[bases.get(o, (0,))[0]:]]
        marked = [(m[0], m[2], m[6]) for m in self.disk.marked]
        r = ex.load(cp, resting, entries, mono_ms=now, closed=closed if cp is not None else (),
                    marked=marked if cp is not None else ())
        for first, second in self.disk.evidence.values():
            ex.add_evidence(first, second, now_ms=self.wall(now))
        self.ex = ex
        self.restarts += 1
        self._absorb(r, committed=None, from_disk=True)

    # ---- steps ---------------------------------------------------------------------------

    def on_message(self, now: int, src: int, sent_wall: int, msg: tuple[Any, ...]) -> None:
        ex = self.ex
        assert ex is not None
        self.offsets[src] = (sent_wall - self.wall(now), now)
        fresh = [off for off, at in self.offsets.values() if now - at < OFFSET_TTL_MS]
        ex.clock_offset_ms = int(statistics.median_low([0, *fresh]))
        kind = msg[0]
        if kind == "push":
            self._absorb(ex.receive(msg[1], now_ms=self.wall(now), mono_ms=now))
            # what the real node's push reply says: how much of the pusher's log
            # this node certifies (committed already: _absorb wrote it to disk)
            pusher = next((e.origin for e in msg[1] if e.origin != self.node_id), None)
            if pusher is not None:
                n, view = ex.certifies(pusher)
                if n:
                    self._send(now, src, ("certified", self.node_id, n, view))
        elif kind == "certified":
            ex.note_certified(msg[1], msg[2], msg[3])
        elif kind == "sync":
            vv, has_ev = msg[1], msg[2]
            entries, more = delta(ex, self.disk, vv)
            ev = [v for o, v in sorted(self.disk.evidence.items()) if o not in has_ev][:4]
            self._send(now, src, ("sync_reply", entries, more, ev, ex.network))
        elif kind == "sync_reply":
            entries, more, evidence, network = msg[1], msg[2], msg[3], msg[4]
            if ex.network is None or network != ex.network:
                return
            self._absorb(ex.receive(entries, now_ms=self.wall(now), mono_ms=now))
            for first, second in evidence:
                r = ex.add_evidence(first, second, now_ms=self.wall(now))
                if r is not None:
                    self.disk.evidence[first.origin] = (first, second)
                    self._absorb(r)
            if more:
                self._pull(now, src)
        elif kind == "join":
            joiner, after = msg[1], msg[2]
            if ex.is_member() and ex.network is not None:
                vote = ex.admission_vote(joiner, after)
                if vote is not None:
                    self.write(now, vote)
                self._send(now, src, ("welcome", ex.network))
        elif kind == "welcome":
            if ex.network is None:
                ex.set_network(msg[1])
                self.disk.network = msg[1]
        elif kind == "ticket":
            self._carry(now, src, msg[1])
        elif kind == "carried":
            if self.sending.pop(msg[1].ticket, None) is not None:
                self.tickets_acked[msg[1].ticket] = (msg[1], msg[2])
        elif kind == "refused":
            self._refused(now, msg[1], msg[2])

    # ---- tickets ---------------------------------------------------------------------------

    def _carry(self, now: int, src: int, carry: Carry) -> None:
        """A member carries a participant's ticket: validate and write it, then
        answer once a majority certified the entry (``step``); a ticket this
        node carries already is answered as that one, never written twice."""
        ex = self.ex
        assert ex is not None
        entry = self.carried.get(carry.ticket)
        if entry is None or not ex.counts(entry):  # (a carry voided since counts nothing: carry it again)
            try:
                entry = ex.prepare(carry, now_ms=self.wall(now))
            except ExchangeError as exc:
                self._send(now, src, ("refused", carry.ticket, type(exc).__name__))
                return
            self._commit_own(now, entry)
            self.carried[carry.ticket] = entry
            self.waiting.append(entry)
        if entry.hash in self.acked:
            self._send(now, src, ("carried", carry, entry))
        elif src not in (waiters := self.carrying.setdefault(entry.hash, [])):
            waiters.append(src)

    def _refused(self, now: int, ticket: bytes, why: str) -> None:
        sending = self.sending.get(ticket)
        if sending is None:
            return
        if why in FINAL_REFUSALS:
            del self.sending[ticket]  # the client hears the refusal
        else:  # not a member (any more), a clock off, an order it has not seen yet: try another
            self._send_ticket(now, sending)

    def _send_ticket(self, now: int, sending: Sending) -> None:
        """Send a ticket to a member this node heard from lately (by the rng), one
        not tried yet if there is one; give up after ``TICKET_TRIES`` sends."""
        ex = self.ex
        assert ex is not None
        if len(sending.tried) >= TICKET_TRIES:
            self.sending.pop(sending.carry.ticket, None)
            return
        members = [i for m in ex.membership.members() if (i := self.directory.get(m)) is not None]
        heard = [i for i in members if (o := self.offsets.get(i)) is not None and now - o[1] < OFFSET_TTL_MS]
        fresh = [i for i in heard if i not in sending.tried] or [i for i in members if i not in sending.tried]
        choices = fresh or heard or members
        if not choices:
            self.sending.pop(sending.carry.ticket, None)
            return
        dst = self.rng.choice(choices)
        sending.tried.append(dst)
        sending.deadline = now + TICKET_TIMEOUT_MS
        self.sending[sending.carry.ticket] = sending
        self._send(now, dst, ("ticket", sending.carry))

    def _pull(self, now: int, dst: int) -> None:
        assert self.ex is not None
        self._send(now, dst, ("sync", self.ex.replica.digest_for_sync(), set(self.disk.evidence)))

    def step(self, now: int, pull_ms: int, join_ms: int) -> None:
        """Timers: merge due entries, write heartbeats or votes, pull, ask to join."""
        ex = self.ex
        assert ex is not None
        r, body = ex.tick(now_ms=self.wall(now), mono_ms=now)
        self._absorb(r)
        if body is not None:
            self.write(now, body)
        if self.waiting:
            done = [e for e in self.waiting if ex.certified(e)]
            if done:
                for e in done:
                    self.acked[e.hash] = e
                    for p in self.carrying.pop(e.hash, ()):
                        assert isinstance(e.body, Carry)
                        self._send(now, p, ("carried", e.body, e))
                self.waiting = [e for e in self.waiting if e.hash not in self.acked]
        if self.sending:
            for sending in [s for s in self.sending.values() if s.deadline <= now]:
                self._send_ticket(now, sending)  # no answer in time: the same ticket, another member
        if now >= self.next_pull and self.peers:
            self.next_pull = now + pull_ms
            self._pull(now, self.rng.choice(self.peers))
        if not self.participant and not ex.is_member() and now >= self.next_join and self.peers:
            # admission needs a majority of the members' votes: ask every peer
            self.next_join = now + join_ms
            for p in self.peers:
                self._send(now, p, ("join", self.node_id, ex.replica.length(self.node_id)))

    def trade(self, now: int, rng: random.Random) -> None:
        """A trader's order or cancel: a member's is written here and waits for
        certification before it counts as acknowledged; a participant's is a
        ticket sent to a member, acknowledged when the member answers."""
        ex = self.ex
        assert ex is not None
        if self.participant:
            if ex.network is None or not ex.clock_healthy():
                return
            # it cancels an order of its own once (no cancel of it waits for an answer), whether
            # or not it was answered for it (a cancel before the order's placement marks it)
            cancelling = {s.carry.inner.order_id for s in self.sending.values() if isinstance(s.carry.inner, Cancel)}
            answered = ex.engine.orders
            inner = self._order_or_cancel(rng, only=lambda oid: oid in answered and oid not in cancelling)
            try:
                carry = ex.ticket(inner, now_ms=self.wall(now))
            except ExchangeError:
                return
            self._send_ticket(now, Sending(carry=carry, deadline=0, tried=[]))
            return
        if not ex.is_member() or not ex.clock_healthy():
            return
        e = self.write(now, self._order_or_cancel(rng))
        if e is not None:
            self.waiting.append(e)

    def _order_or_cancel(self, rng: random.Random, only: Callable[[bytes], bool] | None = None) -> Order | Cancel:
        ex = self.ex
        assert ex is not None
        mine = [o[1] for o in ex.engine.orders.values() if o.__class__ is list and o[0] and o[7] == self.node_id
                and (only is None or only(o[1]))]
        if mine and rng.random() < 0.25:
            return Cancel(order_id=rng.choice(sorted(mine)))
        side = rng.randrange(2)
        r = rng.random()
        qty = rng.randint(1, 9)
        if r < 0.1:
            return Order(side=side, price=0, qty=qty, tif=1, market=True)
        price = 100 + rng.randint(-4, 4)
        return Order(side=side, price=price, qty=qty, tif=1 if r < 0.25 else 0)


def delta(ex: Exchange, disk: Disk, vv: dict[bytes, int]) -> tuple[list[Entry], bool]:
    """What a peer lacks: from memory, and from the disk below what memory holds."""
    segments, more = ex.replica.delta(vv, max_entries=SYNC_PAGE)
    out: list[Entry] = []
    for s in segments:
        out.extend(s.entries if s.entries is not None else disk.entries[s.origin][s.lo - 1:s.hi])
    return out, more
