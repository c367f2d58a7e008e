"""The matching engine: a price-time priority book over records in canonical order.

Owns the book, the fills, order status, rewinding and finalizing.  Input is
a *record* ``(key, kind, oid, side, price, qty, owner)``: ``key`` is the
canonical sort key (any totally ordered value; for entries ``(hlc, hash)``
packed into bytes), ``kind`` one of GTC/IOC/MARKET/CANCEL/NOOP (a cancel's
``oid`` names the order it cancels), ``owner`` who placed the order (or who
cancels: a cancel only acts on its owner's own resting order).  Time priority
is key order, never arrival order.

Incremental: records that sort after the applied frontier are applied in
place.  The applied records, the fills and a short list of cancel effects
are the journal: every record boundary is a checkpoint, and undoing a record
needs only what the journal already holds, so the hot path pays one list
append per record for it and no copy of the book.  A late record rewinds to
the checkpoint just before its key and replays from there; the fills that
changed are reported as a ``Revision``; ``rewrite`` also takes records out
(entries that became void).  ``finalize`` makes everything at or below a key
final: it hands back the final fills and the final state of every order they
touched, drops closed orders and the journal below the key, and the fills
list keeps only the provisional tail.  A record at or below the floor raises
``RewindTooFar``.  ``restore`` starts from a final book; ``reload`` takes the
final book anew, in lists it is handed, once nothing is provisional.

Representation: per side a dict ``price -> deque`` of orders in time order
and a sorted list of prices with the best price last.  An order is a list
``[remaining, oid, qty, closed, side, price, key, owner]`` (``closed``:
quantity cancelled or expired; ``key`` lets a cancel find the order in its
level by binary search, since a level is in key order); a taker filled in
full on arrival never rests, and its record stands in ``orders`` as its
status.
Level volumes and counts are computed when asked, so no stored total can
drift from its orders.

An order id placed once is placed once: a later record with the id of an
order the engine holds (or of one in ``retired``, closed and final) places
nothing.  Two members can carry the same participant ticket; the first carry in
key order is the order, wherever the other one arrived.

A cancel that finds no order of its id leaves a *mark* (``marks``): an order
placed later in key order with that id, by the cancel's owner, is placed
cancelled (it neither trades nor rests).  A participant's order can move to a
later carry when its first carry is voided, past a cancel of it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Collection, Container, Hashable, Iterable, Sequence
from dataclasses import dataclass
from heapq import merge
from itertools import islice
from operator import itemgetter
from typing import Any, Final

from crdt.entry import BUY as BUY
from crdt.entry import GTC as GTC
from crdt.entry import IOC as IOC
from crdt.entry import SELL as SELL
from crdt.errors import ExchangeError

# record kinds: GTC and IOC as in crdt.entry, then the engine's own
MARKET: Final = 2
CANCEL: Final = 3
NOOP: Final = 4

_INF: Final = 1 << 62
_key_of = itemgetter(6)  # a resting order's canonical key
_rec_key = itemgetter(0)  # a record's canonical key
#: A market buy's limit: above every price, but below ``_INF`` (the empty ask side).
_NO_LIMIT: Final = _INF - 1

Record = tuple[Any, int, Any, int, int, int, Any]
Fill = tuple[Any, Any, int, int]  # taker oid, maker oid, price, qty
Order = list[Any]  # see the module docstring

OPEN: Final = "open"
PARTIAL: Final = "partially_filled"
FILLED: Final = "filled"
CANCELLED: Final = "cancelled"


class _Bottom:
    """Sorts before every key (the frontier of an empty engine)."""

    __slots__ = ()

    def __ge__(self, other: object) -> bool:
        return other is self

    def __lt__(self, other: object) -> bool:
        return other is not self


_BOTTOM: Final = _Bottom()


class _EveryId:
    """Contains every order id."""

    __slots__ = ()

    def __contains__(self, oid: object) -> bool:
        return True


_EVERY_ID: Final = _EveryId()


class RewindTooFar(ExchangeError):
    """A record sorts before the oldest kept checkpoint; rebuild from scratch."""

    code = "rewind_too_far"


@dataclass(frozen=True, slots=True, kw_only=True)
class Revision:
    """What a late record changed: fills that disappeared and fills that appeared."""

    revoked: tuple[Fill, ...]
    added: tuple[Fill, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderStatus:
    state: str
    qty: int
    filled: int
    remaining: int
    side: int
    price: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalOrder:
    """An order's state at the frontier, as ``finalize`` hands it over."""

    oid: Any
    owner: Any
    key: Any
    status: OrderStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalBatch:
    """What one ``finalize`` made final: fills ``first_seq...`` in order, and
    the orders they (or final records) touched, at the frontier."""

    first_seq: int
    fills: tuple[Fill, ...]
    orders: tuple[FinalOrder, ...]
    records: int
    #: ``(id, key)`` of the closed orders this call let go and keeps in ``retired``
    retired: tuple[tuple[Any, Any], ...] = ()
    #: the cancel records that became final here without finding their order (``marks``)
    marked: tuple[Record, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DepthLevel:
    price: int
    qty: int
    orders: int


class Engine:
    def __init__(self) -> None:
        self.bids: dict[int, deque[Order]] = {}
        self.asks: dict[int, deque[Order]] = {}
        self._bid_prices: list[int] = []  # ascending: best bid last
        self._ask_prices: list[int] = []  # negated, ascending: best ask last
        self.orders: dict[Any, Any] = {}  # oid -> Order, or the record of a taker filled at once
        self.fills: list[Fill] = []  # provisional fills (the final ones were handed over)
        self.fills_base = 0  # how many fills are final
        self._applied: list[Record] = []
        self._cancels: list[tuple[Order, int, Record]] = []
        self._floor: Any = None  # key of the oldest record that can be undone
        self._forgotten = 0  # records compacted out of the journal
        self.rewinds = 0  # times late records (or records taken out) rewound the book
        #: ids of closed orders that ``finalize`` dropped, and their keys: a repeat
        #: of one places nothing.  Only ids in ``repeatable`` are kept (every id
        #: unless told otherwise); the owner of the engine lets go of old ones.
        self.retired: dict[Any, Any] = {}
        self.repeatable: Container[Any] = _EVERY_ID
        #: order id -> the cancel records that found no order of that id (see the module doc); the
        #: owner of the engine lets go of old ones
        self.marks: dict[Any, list[Record]] = {}
        #: ``reaches(mark key, order key)``: does a mark apply to an order at that key (None: always)?
        #: Its owner bounds a mark's reach as it bounds how long marks are kept, so that letting one go
        #: changes no outcome
        self.mark_reach: Callable[[Any, Any], bool] | None = None

    # ---- entry points ----------------------------------------------------

    @property
    def frontier(self) -> Any:
        return self._applied[-1][0] if self._applied else self._floor

    @property
    def floor(self) -> Any:
        """Key at or below which everything is final (None before the first ``finalize``)."""
        return self._floor

    @property
    def records_applied(self) -> int:
        return self._forgotten + len(self._applied)

    def add(self, rec: Record) -> Revision | None:
        """Apply one record; a ``Revision`` when it sorted before the frontier."""
        applied = self._applied
        if applied:
            if rec[0] > applied[-1][0]:
                self._run((rec,))
                return None
        elif self._floor is None or rec[0] > self._floor:  # compacted to nothing: the floor is the frontier
            self._run((rec,))
            return None
        return self.rewrite((), [rec])

    def add_many(self, recs: Sequence[Record]) -> list[Revision]:
        """Apply records.  The run in key order after the frontier takes the fast
        path; whatever is left is merged in with one rewind, however many of the
        records are late (a catch-up page must not rewind once per record).  A
        ``Revision`` (at most one) compares the fills with those before the call."""
        n0 = len(self.fills)
        start = self._run(recs, 0)
        if start == len(recs):
            return []
        fast = self.fills[n0:]  # what the in-order part appended, before the rewind revises it
        rev = self.rewrite((), recs[start:])
        if not fast:
            return [rev]
        revoked = list(rev.revoked)
        added = list(rev.added)
        for f in fast:  # report the change against the state before this call
            if f in revoked:
                revoked.remove(f)
            else:
                added.append(f)
        return [Revision(revoked=tuple(revoked), added=tuple(added))]

    def owner(self, oid: Hashable) -> Any:
        o = self.orders.get(oid)
        if o is None:
            return None
        return o[6] if o.__class__ is tuple else o[7]

    def key_of(self, oid: Hashable) -> Any:
        o = self.orders.get(oid)
        if o is None:
            return None
        return o[0] if o.__class__ is tuple else o[6]

    # ---- the hot path ----------------------------------------------------

    def _run(self, recs: Sequence[Record], start: int = 0) -> int:
        """Apply ``recs[start:]`` while each sorts after the one before and after
        the frontier; return the index of the first record not applied."""
        bids, asks, orders, retired, marks = self.bids, self.asks, self.orders, self.retired, self.marks
        bid_prices, ask_prices = self._bid_prices, self._ask_prices
        fpush = self.fills.append
        apush = self._applied.append
        key_of = _key_of
        best_bid = bid_prices[-1] if bid_prices else -1
        best_ask = -ask_prices[-1] if ask_prices else _INF
        last: Any = self._applied[-1][0] if self._applied else (
            _BOTTOM if self._floor is None else self._floor)
        q: Any
        o: Any
        i = start - 1
        for i, rec in enumerate(islice(recs, start, None) if start else recs, start):
            key, kind, oid, side, price, qty, owner = rec
            if key <= last:
                return i
            last = key
            apush(rec)
            if kind < CANCEL:
                if oid in orders or oid in retired:
                    continue  # a repeat of an order placed before: it places nothing
                if marks and oid in marks and self._marked(marks[oid], owner, key):
                    orders[oid] = [0, oid, qty, qty, side, rec[4], key, owner]  # cancelled before it came
                    continue
                # the buy and sell branches mirror each other; they are written
                # out twice because this loop is the engine's whole cost
                if side == BUY:
                    if kind == MARKET:
                        price = _NO_LIMIT
                    while best_ask <= price:
                        q = asks[best_ask]
                        while q:
                            m = q[0]
                            mr = m[0]
                            if mr <= qty:
                                q.popleft()
                                m[0] = 0
                                fpush((oid, m[1], best_ask, mr))
                                qty -= mr
                                if not qty:
                                    break
                            else:
                                m[0] = mr - qty
                                fpush((oid, m[1], best_ask, qty))
                                qty = 0
                                break
                        if not q:
                            del asks[best_ask]
                            ask_prices.pop()
                            best_ask = -ask_prices[-1] if ask_prices else _INF
                        if not qty:
                            break
                    if not qty:  # filled at once: the record is its status
                        orders[oid] = rec
                    elif kind:  # IOC or market: the remainder expires
                        orders[oid] = [0, oid, rec[5], qty, side, rec[4], key, owner]
                    else:
                        o = orders[oid] = [qty, oid, rec[5], 0, side, price, key, owner]
                        q = bids.get(price)
                        if q is None:
                            q = bids[price] = deque()
                            if price > best_bid:
                                bid_prices.append(price)
                                best_bid = price
                            else:
                                insort(bid_prices, price)
                        q.append(o)
                else:
                    if kind == MARKET:
                        price = 0
                    while best_bid >= price:
                        q = bids[best_bid]
                        while q:
                            m = q[0]
                            mr = m[0]
                            if mr <= qty:
                                q.popleft()
                                m[0] = 0
                                fpush((oid, m[1], best_bid, mr))
                                qty -= mr
                                if not qty:
                                    break
                            else:
                                m[0] = mr - qty
                                fpush((oid, m[1], best_bid, qty))
                                qty = 0
                                break
                        if not q:
                            del bids[best_bid]
                            bid_prices.pop()
                            best_bid = bid_prices[-1] if bid_prices else -1
                        if not qty:
                            break
                    if not qty:
                        orders[oid] = rec
                    elif kind:
                        orders[oid] = [0, oid, rec[5], qty, side, rec[4], key, owner]
                    else:
                        o = orders[oid] = [qty, oid, rec[5], 0, side, price, key, owner]
                        q = asks.get(price)
                        if q is None:
                            q = asks[price] = deque()
                            if price < best_ask:
                                ask_prices.append(-price)
                                best_ask = price
                            else:
                                insort(ask_prices, -price)
                        q.append(o)
            elif kind == CANCEL:
                o = orders.get(oid)
                if o is None:
                    marks.setdefault(oid, []).append(rec)
                    continue
                if o.__class__ is not list or not o[0] or o[7] != owner:
                    continue
                p = o[5]
                book = bids if o[4] == BUY else asks
                q = book[p]
                j = bisect_left(q, key_of(o), key=key_of)  # a level is in key order
                del q[j]
                o[3] += o[0]
                o[0] = 0
                self._cancels.append((o, j, rec))
                if not q:
                    del book[p]
                    if o[4] == BUY:
                        del bid_prices[bisect_left(bid_prices, p)]
                        best_bid = bid_prices[-1] if bid_prices else -1
                    else:
                        del ask_prices[bisect_left(ask_prices, -p)]
                        best_ask = -ask_prices[-1] if ask_prices else _INF
        return i + 1

    def _marked(self, marks: list[Record], owner: Any, key: Any) -> bool:
        """Did ``owner`` cancel, before it came, the order at ``key``?"""
        reach = self.mark_reach
        return any(m[6] == owner and (reach is None or reach(m[0], key)) for m in marks)

    # ---- late arrivals ---------------------------------------------------

    def rewrite(self, remove: Collection[Any], add: Sequence[Record]) -> Revision:
        """Take out the records whose keys are in ``remove`` and merge in ``add``,
        with one rewind to the earliest of them; the fills that changed come
        back as a ``Revision``."""
        keys = [*remove, *(r[0] for r in add)]
        if not keys:
            return Revision(revoked=(), added=())
        first = min(keys)
        if self._floor is not None and first <= self._floor:
            raise RewindTooFar("record sorts at or before the final frontier")
        fills = self.fills
        n_before = len(fills)
        self.rewinds += 1
        undone, revoked_all = self._rewind_to(first)
        cut = len(fills)
        gone = set(remove)
        kept = [r for r in reversed(undone) if r[0] not in gone] if gone else undone[::-1]
        replay = list(merge(sorted(add, key=_rec_key), kept, key=_rec_key))
        if any(replay[i][0] == replay[i + 1][0] for i in range(len(replay) - 1)):
            self._run(undone[::-1])  # put back exactly what was there
            raise ValueError("a record with this key was already applied")
        done = self._run(replay)
        if done != len(replay):
            raise AssertionError("replay out of key order")
        added_all = fills[cut:]
        assert len(revoked_all) == n_before - cut
        old, new = set(revoked_all), set(added_all)
        return Revision(
            revoked=tuple(f for f in revoked_all if f not in new),
            added=tuple(f for f in added_all if f not in old),
        )

    def finalize(self, floor: Any) -> FinalBatch:
        """Make every record with a key at or below ``floor`` final: hand over
        their fills and the state at ``floor`` of every order they touched,
        forget closed orders and the journal below ``floor``."""
        applied = self._applied
        n = bisect_right(applied, floor, key=_rec_key)
        if self._floor is not None and floor <= self._floor:
            return FinalBatch(first_seq=self.fills_base, fills=(), orders=(), records=0)
        below = self._floor
        marked = tuple(r for ms in self.marks.values() for r in ms
                       if r[0] <= floor and (below is None or r[0] > below))
        undone: list[Record] = []
        if n < len(applied):
            undone, _ = self._rewind_to(applied[n][0])  # the state at ``floor``
        final_recs = list(applied)
        new_final = tuple(self.fills)
        touched: dict[Any, None] = {}
        for rec in final_recs:
            touched[rec[2]] = None
        for f in new_final:
            touched[f[1]] = None
        orders = self.orders
        out: list[FinalOrder] = []
        retired: list[tuple[Any, Any]] = []
        for oid in touched:
            o = orders.get(oid)
            if o is None:
                continue
            st = self.status(oid)
            assert st is not None
            if o.__class__ is tuple:
                out.append(FinalOrder(oid=oid, owner=o[6], key=o[0], status=st))
            else:
                out.append(FinalOrder(oid=oid, owner=o[7], key=o[6], status=st))
            if st.remaining == 0:
                del orders[oid]
                if oid in self.repeatable:
                    key = self.retired[oid] = o[0] if o.__class__ is tuple else o[6]
                    retired.append((oid, key))
        first_seq = self.fills_base
        self.fills_base += len(new_final)
        self.fills.clear()
        applied.clear()
        self._cancels.clear()
        self._floor = floor
        self._forgotten += len(final_recs)
        if undone:
            done = self._run(undone[::-1])
            assert done == len(undone), "replay of the provisional tail out of key order"
        return FinalBatch(first_seq=first_seq, fills=new_final, orders=tuple(out), records=len(final_recs),
                          retired=tuple(retired), marked=marked)

    def restore(self, resting: Iterable[Order], *, floor: Any, fills_base: int) -> None:
        """Start from a final book (orders as lists, any order) at ``floor``.
        The engine keeps the lists it is given (no copy: a copy of a million
        orders left as many freed lists scattered among the live ones, which
        the process never gave back), so hand it lists of its own."""
        if self._applied or self.orders:
            raise ValueError("restore into an empty engine only")
        for o in sorted(resting, key=_key_of):
            self.orders[o[1]] = o
            self._level(o[4], o[5]).append(o)
        self._floor = floor
        self.fills_base = fills_base

    def quiet(self) -> bool:
        """Nothing provisional: no record that can be undone, no provisional fill."""
        return not (self._applied or self.fills or self._cancels)

    def reload(self, read: Callable[[], Iterable[Order]]) -> None:
        """Hold the final book as ``read`` returns it (the lists ``restore``
        takes) in place of the lists held now; only with nothing provisional.
        The lists held now are let go before ``read`` runs, so that the new ones
        do not fill the gaps the old ones were scattered among."""
        if not self.quiet():
            raise ValueError("reload with provisional records")
        floor, fills_base = self._floor, self.fills_base
        self.orders, self.bids, self.asks = {}, {}, {}
        self._bid_prices, self._ask_prices = [], []
        self.restore(read(), floor=floor, fills_base=fills_base)

    def _rewind_to(self, key: Any) -> tuple[list[Record], list[Fill]]:
        """Undo every applied record with a key at or above ``key``; return them
        (newest first) and the fills they had produced."""
        applied, fills, orders = self._applied, self.fills, self.orders
        n_fills = len(fills)
        undone: list[Record] = []
        while applied and applied[-1][0] >= key:
            rec = applied.pop()
            undone.append(rec)
            _, kind, oid, side, price, _qty, _owner = rec
            if kind == CANCEL:
                m = self.marks.get(oid)
                if m and m[-1] is rec:
                    m.pop()
                    if not m:
                        del self.marks[oid]
                    continue
                c = self._cancels
                if c and c[-1][2] is rec:
                    o, i, _ = c.pop()
                    self._level(o[4], o[5]).insert(i, o)
                    o[0] = o[3]
                    o[3] = 0
                continue
            if kind == NOOP:
                continue
            held: Any = orders.get(oid)
            if held is None or (held[0] if held.__class__ is tuple else held[6]) != rec[0]:
                continue  # a repeat that placed nothing
            o = orders.pop(oid)
            if kind == GTC and o.__class__ is list and o[0]:
                book = self.bids if side == BUY else self.asks
                q = book[price]
                q.pop()
                if not q:
                    self._drop_level(side, price)
            maker_side = SELL if side == BUY else BUY
            while n_fills and fills[n_fills - 1][0] == oid:
                n_fills -= 1
                _, maker_id, fprice, fqty = fills[n_fills]
                m = orders[maker_id]
                if not m[0]:
                    self._level(maker_side, fprice).appendleft(m)
                m[0] += fqty
        rewound = fills[n_fills:]
        del fills[n_fills:]
        return undone, rewound

    def _level(self, side: int, price: int) -> deque[Order]:
        """The queue at ``price``, reopened when it had left the book."""
        book = self.bids if side == BUY else self.asks
        q = book.get(price)
        if q is None:
            q = book[price] = deque()
            if side == BUY:
                insort(self._bid_prices, price)
            else:
                insort(self._ask_prices, -price)
        return q

    def _drop_level(self, side: int, price: int) -> None:
        if side == BUY:
            del self.bids[price]
            del self._bid_prices[bisect_left(self._bid_prices, price)]
        else:
            del self.asks[price]
            del self._ask_prices[bisect_left(self._ask_prices, -price)]

    # ---- queries ---------------------------------------------------------

    def checkpoints(self) -> int:
        """How many records can still be undone."""
        return len(self._applied)

    def best(self, side: int) -> int | None:
        if side == BUY:
            return self._bid_prices[-1] if self._bid_prices else None
        return -self._ask_prices[-1] if self._ask_prices else None

    def depth(self, n: int) -> tuple[list[DepthLevel], list[DepthLevel]]:
        """Top ``n`` levels per side, best first: (bids, asks)."""
        bids = [
            DepthLevel(price=p, qty=sum(o[0] for o in self.bids[p]), orders=len(self.bids[p]))
            for p in reversed(self._bid_prices[-n:] if n else [])
        ]
        asks = [
            DepthLevel(price=-p, qty=sum(o[0] for o in self.asks[-p]), orders=len(self.asks[-p]))
            for p in reversed(self._ask_prices[-n:] if n else [])
        ]
        return bids, asks

    def resting(self, side: int) -> list[tuple[int, Any, int]]:
        """Resting orders of one side in priority order: (price, oid, remaining)."""
        if side == BUY:
            return [(p, o[1], o[0]) for p in reversed(self._bid_prices) for o in self.bids[p]]
        return [(-p, o[1], o[0]) for p in reversed(self._ask_prices) for o in self.asks[-p]]

    def resting_count(self) -> int:
        return sum(map(len, self.bids.values())) + sum(map(len, self.asks.values()))

    def status(self, oid: Hashable) -> OrderStatus | None:
        o = self.orders.get(oid)
        if o is None:
            return None
        if o.__class__ is tuple:  # a taker filled in full on arrival
            _, kind, _, side, price, qty, _ = o
            return OrderStatus(
                state=FILLED, qty=qty, filled=qty, remaining=0, side=side,
                price=0 if kind == MARKET else price,
            )
        remaining, _, qty, closed, side, price, _, _ = o
        filled = qty - remaining - closed
        if remaining:
            state = PARTIAL if filled else OPEN
        elif closed:
            state = CANCELLED
        else:
            state = FILLED
        return OrderStatus(
            state=state, qty=qty, filled=filled, remaining=remaining, side=side, price=price
        )

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` when the book is inconsistent."""
        for side, book, prices in (
            (BUY, self.bids, self._bid_prices),
            (SELL, self.asks, [-p for p in reversed(self._ask_prices)]),
        ):
            ordered = sorted(book)
            assert list(prices) == ordered, "price index out of sync with the levels"
            for price, q in book.items():
                assert q, f"empty level {price} left in the book"
                keys = [o[6] for o in q]
                assert keys == sorted(keys), f"level {price} is not in time (key) order"
                for o in q:
                    assert o[0] > 0, "resting order with no quantity"
                    assert o[4] == side and o[5] == price, "order in the wrong level"
                    assert self.orders.get(o[1]) is o, "resting order not indexed"
        bb, ba = self.best(BUY), self.best(SELL)
        assert bb is None or ba is None or bb < ba, f"book crossed: bid {bb} >= ask {ba}"
        for o in self.orders.values():
            if o.__class__ is tuple:
                continue
            assert o[0] >= 0 and o[3] >= 0, "negative quantity"
            assert o[0] + o[3] <= o[2], "conservation broken: filled beyond quantity"
