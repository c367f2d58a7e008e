"""The sans-I/O node core: one replica, membership, finality and one engine.

Owns turning entries into engine records (only members' entries inside their
membership are matched), submitting the node's own orders, cancels,
heartbeats, admissions and votes, merging received entries, keeping the
engine in step with the replica, reporting the fills each call added (with
their takers' origins, read before the takers can leave the engine) and
revoked, making records final as the stable frontier moves, and holding the
resting book anew in compact objects after a long replay (``compact_book``).
The shell supplies the wall clock (milliseconds) on each call and carries
out what comes back: it commits entries before applying its own and after
merging others', persists what ``take_finalized`` hands over, and pushes new
entries to peers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from hashlib import blake2b
from typing import Any

import msgpack

from crdt.entry import (
    GENESIS,
    TICKET_WINDOW_MS,
    Admit,
    Body,
    Cancel,
    Carry,
    Entry,
    Heartbeat,
    Leave,
    Order,
    make_entry,
    make_ticket,
    ticket_valid,
)
from crdt.errors import (
    BadTicket,
    ClockUnhealthy,
    ExchangeError,
    ForeignCancel,
    NotMember,
    TooManyOrigins,
    WrongNetwork,
)
from crdt.finality import (
    DEFAULT_EVICT_AFTER_MS,
    DEFAULT_HEARTBEAT_MS,
    DEFAULT_LIVENESS_MS,
    DEFAULT_SUSPECT_AFTER_MS,
    Finality,
    Frontiers,
    hlc_of,
)
from crdt.hlc import Hlc, pack, physical_ms
from crdt.keys import SigningKey, short_id
from crdt.membership import Decision, Membership
from crdt.replica import MergeResult, Rejection, Replica
from matching.engine import (
    BUY,
    CANCEL,
    GTC,
    IOC,
    MARKET,
    SELL,
    Engine,
    Fill,
    FinalBatch,
    OrderStatus,
    Record,
    Revision,
)

#: Far above any wall clock: restored entries are exempt from the skew bound.
_NO_CLOCK = 1 << 62


class UnknownOrder(ExchangeError):
    code = "unknown_order"


class NotCancellable(ExchangeError):
    code = "not_cancellable"


class OrderAhead(ExchangeError):
    """A participant's cancel that this member would stamp at or before the
    order it cancels (the order was carried by a clock ahead of this one): it
    would cancel nothing.  Another member, or this one a moment later, can."""

    code = "order_ahead"


def floor_key(hlc: int) -> bytes:
    """The greatest canonical key stamped at ``hlc``: records at or below it are those with stamp <= hlc."""
    return hlc.to_bytes(8, "big") + b"\xff" * 32


def _kind(order: Order) -> int:
    return MARKET if order.market else (IOC if order.tif == IOC else GTC)


def record_of(entry: Entry) -> Record | None:
    """The engine record of a member's entry, or None (it trades nothing).  A
    carried ticket is its owner's order (id: the ticket's hash) or cancel, at
    the carrying entry's key; it counts only with a valid signature and a stamp
    within ``TICKET_WINDOW_MS`` of the entry's."""
    body = entry.body
    if isinstance(body, Order):
        return (entry.key, _kind(body), entry.hash, body.side, body.price, body.qty, entry.origin)
    if isinstance(body, Cancel):
        return (entry.key, CANCEL, body.order_id, 0, 0, 0, entry.origin)
    if isinstance(body, Carry):
        if abs(physical_ms(body.stamp) - physical_ms(entry.hlc)) > TICKET_WINDOW_MS or not ticket_valid(body):
            return None
        inner = body.inner
        if isinstance(inner, Order):
            return (entry.key, _kind(inner), body.ticket, inner.side, inner.price, inner.qty, body.owner)
        return (entry.key, CANCEL, inner.order_id, 0, 0, 0, body.owner)
    return None


def _mark_reaches(mark: bytes, order: bytes) -> bool:
    """A cancel's mark applies to an order carried no later than twice the
    ticket window after the cancel: an honest participant signs a cancel after
    its order, so every carry of the order lies within that reach, and a mark
    is kept exactly that long (``Exchange.ticket_horizon``)."""
    return physical_ms(hlc_of(order)) <= physical_ms(hlc_of(mark)) + 2 * TICKET_WINDOW_MS


def order_id_of(entry: Entry) -> bytes | None:
    """The id of the order an entry places or cancels (None for other entries)."""
    body = entry.body
    if isinstance(body, Carry):
        return body.ticket if isinstance(body.inner, Order) else body.inner.order_id
    if isinstance(body, Order):
        return entry.hash
    if isinstance(body, Cancel):
        return body.order_id
    return None


def fill_id(fill: Fill) -> str:
    """Deterministic id of a fill: one fill per (taker, maker) pair."""
    return blake2b(fill[0] + fill[1], digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    max_skew_ms: int = 5_000
    evict_after_ms: int = DEFAULT_EVICT_AFTER_MS
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    liveness_ms: int = DEFAULT_LIVENESS_MS
    #: a member silent this long while records wait for it is voted out (see ``Finality._lagging``)
    suspect_after_ms: int = DEFAULT_SUSPECT_AFTER_MS
    #: a node whose clock is further than this from its peers' median refuses orders
    max_clock_offset_ms: int = 1_000
    #: origins held that are not members (anyone can make a key); entries of more are refused
    max_foreign_origins: int | None = None
    #: a member votes to admit no one while the committee has this many members
    max_members: int = 7


@dataclass(frozen=True, slots=True, kw_only=True)
class Submitted:
    entry: Entry
    status: OrderStatus | None
    fills: tuple[Fill, ...]
    first_fill_seq: int = 0  # global seq of fills[0]
    received: Received | None = None
    order_id: bytes | None = None  # the order placed or cancelled (a carried order's id is its ticket's)


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    merge: MergeResult
    added: tuple[Fill, ...] = ()  # provisional fills that appeared
    #: the origin of the taker of every fill in ``added``, by taker id: once final,
    #: a closed taker (filled in full, IOC or market, cancelled) leaves the engine,
    #: on a lone member within this very call, and ``owner`` no longer knows it
    taker_origins: Mapping[bytes, bytes] = field(default_factory=dict)
    revoked: tuple[Fill, ...] = ()  # provisional fills that went away
    finalized: bool = False  # the stable frontier moved: see ``take_finalized``
    decisions: tuple[Decision, ...] = ()
    voided: tuple[Entry, ...] = ()  # this node's own entries that became void
    #: this node's own entries that counted and count no more, though no eviction
    #: of this node voided them: its admission was undone (see ``_check_own``)
    unadmitted: tuple[Entry, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """What a restart needs besides the entries above the bases and the final book."""

    network: bytes | None
    final: int
    stable: int
    fills_base: int
    final_digest: bytes
    bases: dict[bytes, tuple[int, bytes, int]]
    membership: dict[bytes, list[list[Any]]]
    forks: dict[bytes, tuple[int, int]]
    pins: dict[tuple[bytes, int], tuple[bytes, int]] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class _Effects:
    added: list[Fill] = field(default_factory=list)
    taker_origins: dict[bytes, bytes] = field(default_factory=dict)
    revoked: list[Fill] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    voided: list[Entry] = field(default_factory=list)
    unadmitted: list[Entry] = field(default_factory=list)
    finalized: bool = False


class Exchange:
    def __init__(self, key: SigningKey, *, network: bytes | None = None, params: Params | None = None) -> None:
        self.key = key
        self.node_id = key.public
        self.params = params or Params()
        p = self.params
        self.replica = Replica(max_skew_ms=p.max_skew_ms)
        self.membership = Membership(network)
        self.finality = Finality(
            node_id=self.node_id, replica=self.replica, membership=self.membership,
            evict_after_ms=p.evict_after_ms, heartbeat_ms=p.heartbeat_ms, liveness_ms=p.liveness_ms,
            suspect_after_ms=p.suspect_after_ms)
        self.hlc = Hlc()
        self.engine = Engine()
        self.clock_offset_ms = 0  # the network's clock minus ours (median over peers)
        self.final_digest = bytes(32)  # chained hash of every final fill, in order
        self.anomalies = 0  # member records that arrived at or below the final frontier (must stay 0)
        self._applied: dict[bytes, dict[bytes, Record]] = {}  # origin -> key -> record above the frontier
        self._newest_record = 0  # stamp of the newest matched non-heartbeat entry
        self._batches: list[FinalBatch] = []
        self._loading = False  # replaying stored entries: those at or below the floor are already final
        self._membership_version = self.membership.version
        self._fork_ends: dict[bytes, tuple[int, int]] = {}  # what membership was last told: origin -> (end, stamp)
        # own entries above the base that counted when last looked at (see _check_own)
        self._own_counted: set[int] = set()
        self._own_checked = 0  # own log length when last looked at
        self._own_revision = self.membership.revision
        # member -> how much of this node's log it certified, and the fingerprint of
        # the memberships it counted (see certified())
        self._certified: dict[bytes, tuple[int, bytes]] = {}
        # the stamp of the entry that carried each ticket (until final passes it far)
        self._tickets: dict[bytes, int] = {}
        self.engine.repeatable = self._tickets
        self.engine.mark_reach = _mark_reaches

    # ---- network and membership ------------------------------------------------

    @property
    def network(self) -> bytes | None:
        return self.membership.network

    def set_network(self, network: bytes) -> None:
        """Join the network named ``network`` (the hash of its genesis entry)."""
        if self.membership.network is not None and self.membership.network != network:
            raise WrongNetwork(f"this node belongs to network {self.membership.network.hex()[:16]}")
        self.membership.network = network

    def is_member(self) -> bool:
        return self.membership.is_member(self.node_id)

    def found(self, *, now_ms: int) -> Entry:
        """Genesis: found a new network with this node as its first member."""
        if self.membership.network is not None or self.replica.length(self.node_id):
            raise WrongNetwork("this node already belongs to a network")
        entry = make_entry(self.key, seq=1, hlc=self.hlc.now(now_ms), prev=GENESIS,
                           body=Admit(member=self.node_id, after=1))
        self.membership.network = entry.hash
        return entry

    def admission_vote(self, joiner: bytes, after: int) -> Admit | None:
        """The vote this member writes for ``joiner``, which proved its key and
        says its log holds ``after`` entries, or None: this node is not a
        member, ``joiner`` is one already or is proven to equivocate, or this
        node's vote for it is already cast and waiting for a majority.  The
        admission takes effect once a majority of the members voted
        (``crdt.membership``); the joiner asks every member it reaches."""
        m = self.membership
        if not self.is_member() or m.is_member(joiner) or joiner in self.replica.evidence():
            return None
        if joiner == self.node_id or m.voted(self.node_id, joiner):
            return None
        if len(m.members()) >= self.params.max_members:
            return None  # the committee is full: the joiner stays a participant
        return Admit(member=joiner, after=max(after, self.replica.length(joiner)))

    def leave_body(self) -> Leave | None:
        """What this node writes as it shuts down cleanly: a ``Leave`` when it is
        a member of a network of more than one member (the others then vote it
        out at once instead of waiting ``evict_after`` for its silence), else
        nothing.  The shell commits it, applies it (``apply_own``: the node then
        writes nothing more) and pushes it to every peer it can reach before it
        stops."""
        if not self.is_member() or self.finality.leaving or len(self.membership.members()) < 2:
            return None
        return Leave()

    # ---- certification -------------------------------------------------------------

    def certifies(self, origin: bytes) -> tuple[int, bytes]:
        """How much of ``origin``'s log this node vouches for
        (``Finality.certifies``), and the fingerprint of the memberships it
        counts, to tell ``origin``."""
        return self.finality.certifies(origin), self.membership.fingerprint()

    def note_certified(self, member: bytes, length: int, view: bytes) -> bool:
        """``member`` certified this node's log up to ``length``, counting the
        memberships with fingerprint ``view``; True when that is news."""
        old = self._certified.get(member)
        if old is not None and old[1] == view and length <= old[0]:
            return False
        if not self.membership.is_member(member):
            return False
        self._certified[member] = (length, view)
        return True

    def certified(self, entry: Entry) -> bool:
        """Has a majority of the members (this node included) certified this
        node's own ``entry``, which counts, each counting the same members as
        this node (or is it final)?  Then no eviction can void it: the answer
        to the client that wrote it may say it is placed."""
        if not self.counts(entry):
            return False
        return entry.hlc <= self.finality.final or entry.seq <= self.certified_upto()

    def counts(self, entry: Entry) -> bool:
        """Does this node's own ``entry`` count (not voided, not past a fork)?"""
        return entry.seq <= self.finality.end(self.node_id) and \
            self.membership.valid(self.node_id, entry.seq, entry.key)

    def certifiers(self) -> dict[bytes, int]:
        """The members whose certification of this node's log counts now (same
        fingerprint as this node's), and how far each certified it."""
        view = self.membership.fingerprint()
        return {m: c[0] for m in self.membership.members() if m != self.node_id
                and (c := self._certified.get(m)) is not None and c[1] == view}

    def certified_upto(self) -> int:
        """How far a majority of the members (this node included) certified
        this node's log, each counting the same members as this node (0: not
        at all)."""
        members = self.membership.members()
        me = self.node_id
        if me not in members or self.finality.open_votes():
            return 0  # this node counts itself by the rule it certifies others by
        lengths = sorted(self.certifiers().values(), reverse=True)
        need = len(members) // 2  # besides this node
        if need == 0:
            return self.finality.end(me)
        return min(self.finality.end(me), lengths[need - 1]) if len(lengths) >= need else 0

    # ---- writing -----------------------------------------------------------------

    def clock_healthy(self) -> bool:
        return abs(self.clock_offset_ms) <= self.params.max_clock_offset_ms

    def prepare(self, body: Body, *, now_ms: int, after: Entry | None = None) -> Entry:
        """Validate a body and sign it as the next entry of our log, changing no
        state but the clock: the shell commits the entry, then calls ``apply_own``.
        ``after``: an own entry prepared and not applied yet (the shell commits
        several in one transaction, then applies them in order); the new entry
        follows it instead of the log's head."""
        if not self.is_member():
            raise NotMember("this node is not a member of its network yet (or any more)")
        if self.finality.leaving:
            raise NotMember("this node has left its network: it is shutting down")
        admitted = self.membership.admitted_at(self.node_id)
        if admitted is not None and max(pack(now_ms, 0), self.hlc.last + 1) <= hlc_of(admitted):
            # the vote that decided the admission came from a clock ahead, past what this
            # node's clock observes: an entry stamped before that vote would count nowhere
            raise NotMember(
                f"this node's admission was decided at a stamp {physical_ms(hlc_of(admitted)) - now_ms} ms "
                "ahead of its clock (a voter's clock is ahead); it writes once its clock passes that stamp")
        if isinstance(body, Order | Cancel):
            self._check_trading(body, self.node_id)
        elif isinstance(body, Carry):
            # a ticket carried before, by this member or another: once more is a repeat that changes
            # nothing (refusing it would leave the participant no way to get a carry certified)
            self._check_trading(body.inner, body.owner, order=body.ticket not in self._tickets)
        if isinstance(body, Carry):
            self.check_ticket(body, now_ms=now_ms)
            if isinstance(body.inner, Cancel):
                placed = self.engine.key_of(body.inner.order_id)
                if placed is not None and hlc_of(placed) >= max(pack(now_ms, 0), self.hlc.last + 1):
                    raise OrderAhead(f"order {body.inner.order_id.hex()} is stamped ahead of this member's clock: "
                                     "a cancel stamped now would sort before it")
        if after is None:
            seq, prev, _ = self.replica.head_info(self.node_id)
        else:
            if after.origin != self.node_id or after.seq < self.replica.length(self.node_id):
                raise ValueError("after must be an own entry not applied yet")
            seq, prev = after.seq, after.hash
        return make_entry(self.key, seq=seq + 1, hlc=self.hlc.now(now_ms), prev=prev, body=body,
                          ack=self.finality.own_ack())

    def _check_trading(self, body: Order | Cancel, owner: bytes, *, order: bool = True) -> None:
        """Refuse an order or cancel by ``owner`` that this node will not write
        or carry: a clock too far off, a cancel (``order``: looked at) of an
        order that is unknown, someone else's, or no longer resting."""
        if not self.clock_healthy():
            raise ClockUnhealthy(
                f"this node's clock is {-self.clock_offset_ms} ms off its peers' median "
                f"(limit {self.params.max_clock_offset_ms} ms); fix the clock (NTP) before trading")
        if order and isinstance(body, Cancel):
            placed_by = self.engine.owner(body.order_id)
            if placed_by is None:
                raise UnknownOrder(f"no resting order {body.order_id.hex()}")
            if placed_by != owner:
                raise ForeignCancel("only the node that placed an order can cancel it")
            status = self.engine.status(body.order_id)
            if status is None or status.remaining == 0:
                raise NotCancellable(f"order {body.order_id.hex()} is no longer resting")

    def check_ticket(self, carry: Carry, *, now_ms: int) -> None:
        """Raise ``BadTicket`` for a participant's ticket this member will not
        carry: a signature that does not verify, or a stamp more than half the
        ticket window from this node's clock (so that the carrying entry's stamp
        lies well inside the window, where the ticket counts)."""
        if abs(physical_ms(carry.stamp) - now_ms) > TICKET_WINDOW_MS // 2:
            raise BadTicket(f"the ticket's stamp is {physical_ms(carry.stamp) - now_ms} ms from this member's "
                            f"clock (limit {TICKET_WINDOW_MS // 2} ms)")
        if not ticket_valid(carry):
            raise BadTicket("the ticket's signature does not verify")

    def ticket(self, inner: Order | Cancel, *, now_ms: int) -> Carry:
        """Sign this node's order or cancel as a ticket for a member to carry
        (a participant trades this way: it writes no log of its own)."""
        self._check_trading(inner, self.node_id)
        return make_ticket(self.key, stamp=self.hlc.now(now_ms), inner=inner)

    def apply_own(self, entry: Entry, *, now_ms: int, mono_ms: int | None = None) -> Submitted:
        before = self.engine.fills_base + len(self.engine.fills)  # our entry is the newest: its fills come after
        result = self.receive([entry], now_ms=now_ms, mono_ms=mono_ms, trusted=True)
        if not result.merge.accepted:
            raise result.merge.rejected[0].error
        if entry.body.__class__ is Leave:
            self.finality.leaving = True
        return self.submitted(entry, before, result)

    def submitted(self, entry: Entry, before: int, result: Received | None = None) -> Submitted:
        """What an order or cancel entry did, just applied: its order's state
        and the fills it took (those numbered ``before`` and on)."""
        target = order_id_of(entry)
        body = entry.body
        places = isinstance(body, Order) or (isinstance(body, Carry) and isinstance(body.inner, Order))
        fills, first = self.fills_of(target, since=before) if places and target is not None else ((), 0)
        return Submitted(entry=entry, status=None if target is None else self._status_now(target), fills=fills,
                         first_fill_seq=first, received=result, order_id=target)

    def _status_now(self, oid: bytes) -> OrderStatus | None:
        """An order's status, also when it just became final and left memory."""
        st = self.engine.status(oid)
        if st is None:
            for batch in reversed(self._batches):
                for fo in batch.orders:
                    if fo.oid == oid:
                        return fo.status
        return st

    def fills_of(self, taker: bytes, *, since: int = 0) -> tuple[tuple[Fill, ...], int]:
        """The fills of taker ``taker`` (provisional, or final and not yet handed
        over) and the global seq of the first; only fills from global seq
        ``since`` on are searched."""
        for fills, base in ((self.engine.fills, self.engine.fills_base),
                            *((b.fills, b.first_seq) for b in reversed(self._batches))):
            if base + len(fills) <= since:
                continue
            for i in range(len(fills) - 1, max(since - base, 0) - 1, -1):
                if fills[i][0] == taker:
                    j = i
                    while j and fills[j - 1][0] == taker:
                        j -= 1
                    return tuple(fills[j:i + 1]), base + j
        return (), 0

    def submit(self, body: Body, *, now_ms: int) -> Submitted:
        """Prepare and apply in one step (no storage in between: tests and simulations)."""
        return self.apply_own(self.prepare(body, now_ms=now_ms), now_ms=now_ms)

    def tick(self, *, now_ms: int, mono_ms: int | None = None) -> tuple[Received, Body | None]:
        """Time passed: merge waiting entries whose stamps are now due, drop stale
        early entries, and say what this node should write now (a heartbeat
        that moves finality or shows it is alive, or a vote), if anything.
        ``now_ms`` is the wall clock, ``mono_ms`` a monotonic one for timers
        (default: the wall clock)."""
        mono = now_ms if mono_ms is None else mono_ms
        self.replica.expire(now_ms)
        merge = self.replica.drain_due(now_ms)
        received = self._after_merge(merge, mono, now_ms)
        self.finality.heard(mono)
        return received, self.finality.next_body(mono, pending_hlc=self.pending(), newest_hlc=self._newest_record)

    # ---- receiving -----------------------------------------------------------------

    def receive(self, entries: Iterable[Entry], *, now_ms: int, mono_ms: int | None = None,
                trusted: bool = False, source: str | None = None) -> Received:
        refused: list[Rejection] = []
        if self.params.max_foreign_origins is not None and not trusted:
            entries, refused = self._cap_foreign(list(entries))
        merge = self.replica.receive(entries, now_ms=now_ms, trusted=trusted, source=source)
        if refused:
            merge = replace(merge, rejected=merge.rejected + tuple(refused))
        return self._after_merge(merge, now_ms if mono_ms is None else mono_ms, now_ms)

    def _cap_foreign(self, entries: list[Entry]) -> tuple[list[Entry], list[Rejection]]:
        """Refuse entries of new origins that are not members once the node holds
        the most such origins it takes (an anonymous peer can make keys at will)."""
        cap = self.params.max_foreign_origins
        assert cap is not None
        members = set(self.membership.ever_members())
        new = {e.origin for e in entries if e.origin not in members and not self.replica.length(e.origin)
               and not self.replica.waiting(e.origin)}
        if not new:
            return entries, []
        held = sum(1 for o in self.replica.origins() if o not in members)
        room = max(cap - held, 0)
        allowed = set(sorted(new)[:room])
        keep = [e for e in entries if e.origin not in new or e.origin in allowed]
        refused = [Rejection(origin=e.origin, seq=e.seq, error=TooManyOrigins(
            f"{short_id(e.origin)} is not a member and this node already holds {held} such origins"))
            for e in entries if e.origin in new and e.origin not in allowed]
        return keep, refused

    def add_evidence(self, first: Entry, second: Entry, *, now_ms: int) -> Received | None:
        """Equivocation evidence from a peer or storage; None when it proves nothing new."""
        known = self.replica.evidence().get(first.origin)
        if not self.replica.restore_evidence(first, second):
            return None
        if known is not None and known.seq <= first.seq:
            return None
        self.finality.add_fork(first.origin, first.seq)
        fx = _Effects()
        self._resync([first.origin], fx)
        self._settle(fx)
        return self._received(MergeResult(accepted=(), rejected=(), gaps=(), buffered=0, duplicates=0,
                                          evidence=(first.origin,)), fx)

    def _after_merge(self, merge: MergeResult, mono_ms: int, now_ms: int | None = None) -> Received:
        fx = _Effects()
        accepted = merge.accepted
        if not accepted and not merge.evidence:
            return self._received(merge, fx)
        if now_ms is None:
            now_ms = mono_ms
        self.finality.note_entries(accepted, mono_ms)
        for origin in merge.evidence:
            self.finality.add_fork(origin, self.replica.evidence()[origin].seq)
        bound = now_ms + max(self.clock_offset_ms, 0) + self.params.max_clock_offset_ms
        newest = 0
        for e in accepted:
            if e.hlc > newest and physical_ms(e.hlc) <= bound:
                newest = e.hlc
            body = e.body
            if isinstance(body, Admit):
                self.membership.add_admit(key=e.key, admitter=e.origin, seq=e.seq, entry_hash=e.hash,
                                          member=body.member, after=body.after)
        if newest:
            self.hlc.observe(newest)
        if self.membership.version != self._membership_version or merge.evidence:
            self._membership_version = self.membership.version
            self._resync(self._origins_to_resync(merge.evidence), fx)
        else:
            self._apply(accepted, fx)
        self._settle(fx)
        return self._received(merge, fx)

    def _received(self, merge: MergeResult, fx: _Effects) -> Received:
        return Received(merge=merge, added=tuple(fx.added), taker_origins=fx.taker_origins,
                        revoked=tuple(fx.revoked), finalized=fx.finalized, decisions=tuple(fx.decisions),
                        voided=tuple(fx.voided), unadmitted=tuple(fx.unadmitted))

    def _is_matched(self, e: Entry) -> bool:
        return e.seq <= self.finality.end(e.origin) and self.membership.valid(e.origin, e.seq, e.key)

    def _apply(self, entries: Sequence[Entry], fx: _Effects) -> None:
        """The fast path: newly merged entries, membership unchanged."""
        recs: list[Record] = []
        for e in entries:
            body = e.body
            if body.__class__ is Heartbeat or not self._is_matched(e):
                continue
            if e.hlc > self._newest_record:
                self._newest_record = e.hlc
            rec = self._record(e)
            if rec is None:
                continue
            if self.engine.floor is not None and rec[0] <= self.engine.floor:
                if not self._loading:
                    self.anomalies += 1  # cannot happen for a member: completeness
                continue
            self._applied.setdefault(e.origin, {})[rec[0]] = rec
            recs.append(rec)
        if recs:
            recs.sort(key=lambda r: r[0])
            self._engine_change(lambda: self.engine.add_many(recs), fx)

    def _record(self, e: Entry) -> Record | None:
        rec = record_of(e)
        body = e.body
        if rec is not None and isinstance(body, Carry):
            # the ids of the orders carried tickets placed (the engine keeps them once closed), and of
            # the tickets themselves, cancels too (carrying one again is a harmless repeat: prepare)
            self._tickets.setdefault(body.ticket, e.hlc)
        return rec

    def _forget_tickets(self, final: int) -> None:
        """A closed ticket order's id stays known (``Engine.retired``) for as
        long as another carry of the ticket could still count, so that a late
        repeat places nothing: until ``final`` is twice the ticket window past
        the entry that placed it."""
        tickets, retired = self._tickets, self.engine.retired
        horizon = self.ticket_horizon(final)
        while tickets:  # oldest first, as they were met (a late one waits for those met before it)
            t, h = next(iter(tickets.items()))
            if h >= horizon:
                break
            del tickets[t]
            retired.pop(t, None)
        marks = self.engine.marks
        if marks:  # cancels that found no order: one can come no later than twice the window after
            for oid in [oid for oid, ms in marks.items() if all(hlc_of(m[0]) < horizon for m in ms)]:
                del marks[oid]

    @staticmethod
    def ticket_horizon(final: int) -> int:
        """The stamp below which no entry that placed a ticket order can have a
        repeat still to come, once ``final`` is the final frontier: any carry
        of a ticket lies within the window of its stamp, so two carries of one
        ticket lie within twice the window of each other."""
        return pack(max(0, physical_ms(final) - 2 * TICKET_WINDOW_MS), 0)

    def _origins_to_resync(self, evidence: Iterable[bytes]) -> list[bytes]:
        out = set(self._applied) | set(self.membership.ever_members()) | set(evidence)
        return sorted(out)

    def _resync(self, origins: Iterable[bytes], fx: _Effects) -> None:
        """Bring the engine in line with which in-memory entries are matched now
        (after a membership change, a decision or an equivocation cut)."""
        remove: list[bytes] = []
        add: list[Record] = []
        floor = self.engine.floor
        for o in origins:
            current = self._applied.get(o, {})
            want: dict[bytes, Record] = {}
            for e in self.replica.tail(o):
                if floor is not None and e.key <= floor:
                    continue
                if e.body.__class__ is Heartbeat or not self._is_matched(e):
                    continue
                rec = self._record(e)
                if rec is not None:
                    want[rec[0]] = rec
            remove += [k for k in current if k not in want]
            add += [r for k, r in want.items() if k not in current]
            if want:
                self._applied[o] = want
            else:
                self._applied.pop(o, None)
        if remove or add:
            self._engine_change(lambda: [self.engine.rewrite(remove, add)], fx)
        # final records never become void: what memory no longer holds still counts
        self._newest_record = max(self._newest_matched(), min(self._newest_record, self.finality.final))

    def _newest_matched(self) -> int:
        """Stamp of the newest matched non-heartbeat entry in memory: entries
        that became void (an eviction's cut, a fork's end) no longer count,
        or the node would call records pending that nobody matches."""
        newest = 0
        for o in self._origins_to_resync(()):
            for e in reversed(self.replica.tail(o)):  # stamps rise along a log
                if e.hlc <= newest:
                    break
                if e.body.__class__ is not Heartbeat and self._is_matched(e):
                    newest = e.hlc
                    break
        return newest

    def _engine_change(self, change: Any, fx: _Effects) -> None:
        """Run an engine change and collect the fills it added and revoked."""
        fills = self.engine.fills
        n0 = len(fills)
        revisions: list[Revision] = change()
        if not revisions:
            self._note_added(fills[n0:], fx)
            return
        for rev in revisions:
            fx.revoked += rev.revoked
            self._note_added(rev.added, fx)

    def _note_added(self, added: Sequence[Fill], fx: _Effects) -> None:
        """Collect fills that appeared, with their takers' origins, read now:
        a fill's taker is in the engine until the next ``finalize``."""
        fx.added += added
        origins = fx.taker_origins
        owner = self.engine.owner
        for f in added:
            taker = f[0]
            if taker not in origins:
                origins[taker] = owner(taker)

    def _settle(self, fx: _Effects) -> None:
        """Move the frontiers and decide evictions until nothing changes, then
        make final what the frontier passed."""
        self._tell_membership(fx)
        for _ in range(16):
            self.finality.recompute()
            decisions = self.finality.decide()
            for d in decisions:
                self._decide(d, fx)
            if not self._tell_membership(fx) and not decisions:
                break
        self._check_own(fx)
        floor = self.engine.floor
        if floor is None or floor_key(self.finality.final) > floor:
            self._finalize(fx)

    def _tell_membership(self, fx: _Effects) -> bool:
        """Bring membership and the engine in line with the forks' ends and the
        decisions; True when anything changed.  An equivocating log's effective
        end moves with new evidence, a raised floor and simply with its entries
        arriving: membership must follow every move before the next decision is
        looked for, or this node matches a shorter log than its digests commit to."""
        changed = False
        if self.finality.has_forks():
            for origin in self.finality.forks():
                end = self.finality.end(origin)
                told = (end, self.replica.point(origin, end)[1] if end else 0)
                if self._fork_ends.get(origin) != told:
                    self._fork_ends[origin] = told
                    self.membership.set_end(origin, end)
                    self.membership.ban(origin, told[1])
                    changed = True
        if self.membership.version != self._membership_version:
            self._membership_version = self.membership.version
            changed = True
        if changed:
            self._resync(self._origins_to_resync(self.finality.forks()), fx)
        return changed

    def _decide(self, d: Decision, fx: _Effects) -> None:
        fx.decisions.append(d)
        self.replica.pin(d.member, d.cut)
        past = [e for e in self.replica.tail(d.member) if e.seq > d.cut]
        self.membership.add_decision(d)
        # past the cut, and not in a later membership: a node that applies the
        # decision after holding the member's entries of its next admission (a
        # late decider, or a restart replaying both) must not void those, nor
        # drop that membership's admission votes
        void = [e for e in past if not self.membership.valid(d.member, e.seq, e.key)]
        self.membership.remove_events(e.key for e in void if isinstance(e.body, Admit))
        self.finality.invalidate()
        if d.member == self.node_id:
            fx.voided += void
            self._own_counted.difference_update(e.seq for e in void)

    def _check_own(self, fx: _Effects) -> None:
        """Own entries that counted and count no more, though no eviction of this
        node voided them: its admission was undone (the vote that completed it
        became void, or an earlier admission changed the majority it needed).
        Each is reported once, in ``unadmitted``."""
        me = self.node_id
        base = self.replica.base(me)[0]
        tail = self.replica.tail(me)
        length = base + len(tail)
        for e in tail[max(self._own_checked - base, 0):]:
            if self.membership.valid(me, e.seq, e.key):
                self._own_counted.add(e.seq)
        self._own_checked = length
        if self.membership.revision == self._own_revision:
            return
        self._own_revision = self.membership.revision
        for seq in sorted(self._own_counted):
            if seq <= base:
                self._own_counted.discard(seq)  # final: counted for good
                continue
            e = tail[seq - base - 1]
            if not self.membership.valid(me, e.seq, e.key):
                self._own_counted.discard(seq)
                fx.unadmitted.append(e)

    def _finalize(self, fx: _Effects) -> None:
        f = self.finality.final
        if not f:
            return
        key = floor_key(f)
        batch = self.engine.finalize(key)
        self._forget_tickets(f)
        digest = self.final_digest
        for taker, maker, price, qty in batch.fills:  # chained fill by fill: batches differ between nodes
            digest = blake2b(b"%s%s%s%d:%d" % (digest, taker, maker, price, qty), digest_size=32).digest()
        self.final_digest = digest
        self._batches.append(batch)
        for o in list(self._applied):
            recs = self._applied[o]
            for k in [k for k in recs if k <= key]:
                del recs[k]
            if not recs:
                del self._applied[o]
        self.replica.prune(f, self._prune_limits())
        self.membership.compact(key)
        fx.finalized = True

    def _prune_limits(self) -> dict[bytes, int]:
        """Entries that must stay in memory although they are at or below the
        frontier: an equivocating log's end, and every cut a vote names (the
        decision's cut is pinned, and must still be there to pin)."""
        limits = {o: self.finality.end(o) for o in self.finality.forks()}
        for o, seq in self.replica.pin_limits().items():
            limits[o] = min(limits.get(o, seq), seq)
        final_key = floor_key(self.finality.final)
        for x, votes in self.finality.votes().items():
            cuts = [v.cut for v in votes if v.cut is not None]
            if cuts:
                limits[x] = min(limits.get(x, 1 << 62), *cuts)
            if not self.membership.is_member(x):
                continue
            # a vote against a member stays in memory (so a restart, which rebuilds the votes from
            # the entries above the checkpoint's bases, counts it too) until it cannot matter: while
            # no retraction of it has become final, a vote stamped before that retraction may still
            # arrive and complete a majority with it
            for i, v in enumerate(votes):
                if v.cut is None:
                    continue
                retracted = next((r for r in votes[i + 1:] if r.voter == v.voter), None)
                if retracted is None or retracted.key > final_key:
                    limits[v.voter] = min(limits.get(v.voter, 1 << 62), v.seq - 1)
        return limits

    def take_finalized(self) -> list[FinalBatch]:
        """What became final since the last call, for the shell to persist."""
        out, self._batches = self._batches, []
        return out

    # ---- restart -----------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        known = self.replica.origins()
        return Checkpoint(
            network=self.network, final=self.finality.final, stable=self.finality.stable,
            fills_base=self.engine.fills_base, final_digest=self.final_digest,
            bases={o: self.replica.base(o) for o in known if self.replica.base(o)[0]},
            membership=self.membership.snapshot(), forks=self.finality.forks(), pins=self.replica.pins(),
        )

    def compact_book(self) -> int:
        """Hold the resting book anew, in one pass, once the engine is quiet
        (``ValueError`` otherwise); how many orders rest.  After a long replay
        or catch-up the book's orders lie scattered among the freed remains of
        the entries that made them, memory the process cannot give back: the
        book is packed into one buffer, let go, and unpacked into objects that
        lie together, as after a restart (one object per owner and per price)."""
        engine = self.engine
        if not engine.quiet():
            raise ValueError("compact the book with provisional records")
        packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        for o in engine.orders.values():
            if o.__class__ is list and o[0]:
                packer.pack(o)
        packed: bytes | None = packer.bytes()
        del packer

        def unpack() -> list[list[Any]]:
            # one order at a time, each owner and price swapped for the one object kept of it at once:
            # unpacking the whole book first would leave a freed owner and price between every two orders
            nonlocal packed
            assert packed is not None
            unpacker = msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=len(packed) + 1)
            unpacker.feed(packed)
            packed = None
            owners: dict[bytes, bytes] = {}
            prices: dict[int, int] = {}
            book: list[list[Any]] = []
            for o in unpacker:
                o[5] = prices.setdefault(o[5], o[5])
                o[7] = owners.setdefault(o[7], o[7])
                book.append(o)
            return book

        engine.reload(unpack)
        return len(engine.orders)

    def load(self, checkpoint: Checkpoint | None, resting: Iterable[list[Any]], entries: Iterable[Entry],
             *, mono_ms: int, closed: Iterable[tuple[bytes, bytes]] = (),
             marked: Iterable[tuple[bytes, bytes, bytes]] = ()) -> Received:
        """Restart: the final state at the checkpoint, then the entries above it
        (committed by this node before it acknowledged them, so not re-verified,
        and exempt from the clock bound: the clock may have stepped back since).
        ``closed``: ``(id, key)`` of the carried orders that final let go
        (``FinalBatch.retired``) and that a repeat of their ticket could still
        reach (the shell keeps them); a repeat must not place them again.
        ``marked``: ``(key, id, owner)`` of the final cancels that found no
        order (``FinalBatch.marked``) and whose order could still come."""
        if checkpoint is not None:
            if checkpoint.network is not None:
                self.membership.network = checkpoint.network
            for o, (seq, h, hlc) in checkpoint.bases.items():
                self.replica.restore_base(o, seq, h, hlc)
            for (o, seq), (h, hlc) in checkpoint.pins.items():
                self.replica.restore_pin(o, seq, h, hlc)
            self.membership.restore(checkpoint.membership)
            self._membership_version = self.membership.version
            for o, (seq, floor) in checkpoint.forks.items():
                self.finality.restore_fork(o, seq, floor)
            self.finality.final = self.finality.stable = self.finality.complete = 0
            self.finality.final = checkpoint.final
            self.finality.stable = checkpoint.stable
            resting = list(resting)
            self.engine.restore(resting, floor=floor_key(checkpoint.final), fills_base=checkpoint.fills_base)
            horizon = self.ticket_horizon(checkpoint.final)
            for held in resting:  # a resting ticket order closes later: it must be retired then
                if hlc_of(held[6]) >= horizon:
                    self._tickets[held[1]] = hlc_of(held[6])
            for oid, key in closed:  # by stamp, as _forget_tickets keeps them
                if hlc_of(key) >= horizon:
                    self.engine.retired[oid] = key
                    self._tickets[oid] = hlc_of(key)
            for key, oid, owner in marked:
                if hlc_of(key) >= horizon:
                    self.engine.marks.setdefault(oid, []).append((key, CANCEL, oid, 0, 0, 0, owner))
            self.final_digest = checkpoint.final_digest
            self.hlc.observe(checkpoint.final)
        own = self.replica.head_info(self.node_id)[2]
        self.hlc.observe(own)
        self._loading = True
        try:
            received = self.receive(entries, now_ms=_NO_CLOCK, mono_ms=mono_ms, trusted=True)
        finally:
            self._loading = False
        self.hlc.observe(self.replica.head_info(self.node_id)[2])
        self.finality.reset_heard(mono_ms)
        return received

    # ---- reading -----------------------------------------------------------------

    def frontiers(self) -> Frontiers:
        return self.finality.frontiers()

    def status(self, order_id: bytes) -> OrderStatus | None:
        return self.engine.status(order_id)

    def owner(self, order_id: bytes) -> bytes | None:
        owner = self.engine.owner(order_id)
        return owner if isinstance(owner, bytes) else None

    def order_final(self, order_id: bytes) -> bool:
        """Is the order's state in memory final (nothing above the frontier touches it)?"""
        key = self.engine.key_of(order_id)
        if key is None or key > floor_key(self.finality.final):
            return False
        if any(f[1] == order_id or f[0] == order_id for f in self.engine.fills):
            return False
        return not any(r[1] == CANCEL and r[2] == order_id for recs in self._applied.values()
                       for r in recs.values())

    def state_hash(self) -> bytes:
        return self.replica.state_hash(self.finality.ends())

    def book_hash(self) -> bytes:
        """Digest of the fills (final ones through their chained digest) and the
        resting book: equal on replicas that matched alike."""
        engine = self.engine
        h = blake2b(digest_size=32)
        h.update(self.final_digest)
        h.update(b"%d;" % engine.fills_base)
        for taker, maker, price, qty in engine.fills:
            h.update(b"F%s%s%d:%d;" % (taker, maker, price, qty))
        for side in (BUY, SELL):
            for price, oid, remaining in engine.resting(side):
                h.update(b"R%d:%s%d:%d;" % (side, oid, price, remaining))
        return h.digest()

    def pending(self) -> int:
        """Stamp of the newest matched record not final yet, or 0."""
        return self._newest_record if self._newest_record > self.finality.final else 0
