"""One simulated node: the pure core, a disk, a clock and the replication
policy of the real node (push own entries to every peer, pull from a random
peer, gossip equivocation evidence, ask every peer for admission).

The disk holds what the real node commits to SQLite: every entry it accepted
(own ones before they are applied), equivocation evidence, and what
finalizing handed over (final fills, final orders, the checkpoint), written
together.  A crash loses memory, never the disk; a restart rebuilds from it
exactly as the real node does.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from crdt.entry import Body, Cancel, Entry, Order
from crdt.errors import ExchangeError
from crdt.keys import SigningKey
from matching.engine import Fill, FinalOrder
from matching.exchange import Checkpoint, Exchange, Params, Received
from sim.network import Network

SYNC_PAGE = 500
OFFSET_TTL_MS = 2_000  # a peer's clock reading older than this is not used


@dataclass(slots=True)
class Disk:
    entries: dict[bytes, list[Entry]] = field(default_factory=dict)
    evidence: dict[bytes, tuple[Entry, Entry]] = field(default_factory=dict)
    final_fills: list[Fill] = field(default_factory=list)
    final_orders: dict[bytes, FinalOrder] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    network: bytes | None = None

    def commit(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        for e in entries:
            log = self.entries.setdefault(e.origin, [])
            if len(log) + 1 != e.seq:
                raise AssertionError(f"disk log of {e.origin.hex()[:8]} would get a gap or a rewrite at {e.seq}")
            log.append(e)


class SimNode:
    def __init__(self, index: int, key: SigningKey, params: Params, net: Network, rng: random.Random) -> None:
        self.index = index
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
        self.disk.commit([entry])
        sub = ex.apply_own(entry, now_ms=self.wall(now), mono_ms=now)
        if sub.received is not None:
            self._absorb(sub.received, committed=entry)
        for p in self.peers:
            self._send(now, p, ("push", [entry]))
        return entry

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
        entries = [e for o, log in self.disk.entries.items() for e in log[bases.get(o, (0,))[0]:]]
        r = ex.load(cp, resting, entries, mono_ms=now)
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
                self.waiting = [e for e in self.waiting if e.hash not in self.acked]
        if now >= self.next_pull and self.peers:
            self.next_pull = now + pull_ms
            self._pull(now, self.rng.choice(self.peers))
        if not ex.is_member() and now >= self.next_join and self.peers:
            # admission needs a majority of the members' votes: ask every peer
            self.next_join = now + join_ms
            for p in self.peers:
                self._send(now, p, ("join", self.node_id, ex.replica.length(self.node_id)))

    def trade(self, now: int, rng: random.Random) -> Entry | None:
        """A trader's order or cancel, written here; it waits for certification
        before it counts as acknowledged."""
        e = self._trade(now, rng)
        if e is not None:
            self.waiting.append(e)
        return e

    def _trade(self, now: int, rng: random.Random) -> Entry | None:
        ex = self.ex
        assert ex is not None
        if not ex.is_member() or not ex.clock_healthy():
            return None
        mine = [o[1] for o in ex.engine.orders.values() if o.__class__ is list and o[0] and o[7] == self.node_id]
        if mine and rng.random() < 0.25:
            return self.write(now, Cancel(order_id=rng.choice(sorted(mine))))
        side = rng.randrange(2)
        r = rng.random()
        qty = rng.randint(1, 9)
        if r < 0.1:
            return self.write(now, Order(side=side, price=0, qty=qty, tif=1, market=True))
        price = 100 + rng.randint(-4, 4)
        return self.write(now, Order(side=side, price=price, qty=qty, tif=1 if r < 0.25 else 0))


def delta(ex: Exchange, disk: Disk, vv: dict[bytes, int]) -> tuple[list[Entry], bool]:
    """What a peer lacks: from memory, and from the disk below what memory holds."""
    segments, more = ex.replica.delta(vv, max_entries=SYNC_PAGE)
    out: list[Entry] = []
    for s in segments:
        out.extend(s.entries if s.entries is not None else disk.entries[s.origin][s.lo - 1:s.hi])
    return out, more
