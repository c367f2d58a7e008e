"""A deliberately naive price-time matcher, the oracle for ``matching.engine``.

Nothing here is clever: every call recomputes the whole history from the
full list of records sorted by key, keeps the book as two plain lists and
finds the best maker by a linear scan.  It shares no code with the engine:
only the kind/side constants, which are part of the record format, and the
``OrderStatus`` value it answers with, so that statuses compare as values.

Rules (from DESIGN.md):

- records are applied in key order; arrival order never matters;
- a limit order trades against the opposite side while prices cross, best
  price first, then earliest key within a price; the trade price is the
  maker's price;
- GTC remainder rests, IOC remainder is dropped, MARKET is IOC with no limit;
- CANCEL removes the remaining quantity of a resting order of the same owner
  (no effect on an unknown, filled, expired or already cancelled order, on
  another owner's order, nor on an order whose key sorts after the cancel);
- NOOP changes nothing;
- a fill is ``(taker oid, maker oid, maker price, qty)``;
- a record is ``(key, kind, oid, side, price, qty, owner)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from matching.engine import BUY, CANCEL, CANCELLED, FILLED, GTC, MARKET, NOOP, OPEN, PARTIAL, SELL, OrderStatus

Record = tuple[Any, int, Any, int, int, int, Any]
Fill = tuple[Any, Any, int, int]


@dataclass(eq=False)  # identity: ``book.remove`` must remove this very order
class RefOrder:
    key: Any
    oid: Any
    kind: int
    side: int
    price: int
    qty: int
    owner: Any = None
    remaining: int = 0
    closed: int = 0
    resting: bool = False


@dataclass
class RefResult:
    fills: list[Fill] = field(default_factory=list)
    orders: dict[Any, RefOrder] = field(default_factory=dict)
    book: list[RefOrder] = field(default_factory=list)  # resting orders, in no particular order

    def resting(self, side: int) -> list[tuple[int, Any, int]]:
        """(price, oid, remaining) in priority order: best price, then earliest key."""
        mine = [o for o in self.book if o.side == side]
        if side == BUY:
            mine.sort(key=lambda o: (-o.price, o.key))
        else:
            mine.sort(key=lambda o: (o.price, o.key))
        return [(o.price, o.oid, o.remaining) for o in mine]

    def depth(self, side: int) -> list[tuple[int, int, int]]:
        """(price, total remaining, order count) per level, best first."""
        levels: list[tuple[int, int, int]] = []
        for price, _oid, remaining in self.resting(side):
            if levels and levels[-1][0] == price:
                p, q, n = levels[-1]
                levels[-1] = (p, q + remaining, n + 1)
            else:
                levels.append((price, remaining, 1))
        return levels

    def status(self, oid: Hashable) -> OrderStatus | None:
        o = self.orders.get(oid)
        if o is None:
            return None
        filled = o.qty - o.remaining - o.closed
        if o.remaining:
            state = PARTIAL if filled else OPEN
        elif o.closed:
            state = CANCELLED
        else:
            state = FILLED
        price = 0 if o.kind == MARKET else o.price
        return OrderStatus(
            state=state, qty=o.qty, filled=filled, remaining=o.remaining, side=o.side, price=price
        )


def _crosses(taker: RefOrder, maker: RefOrder) -> bool:
    if taker.kind == MARKET:
        return True
    if taker.side == BUY:
        return maker.price <= taker.price
    return maker.price >= taker.price


def _better(a: RefOrder, b: RefOrder) -> bool:
    """True when maker ``a`` has priority over maker ``b`` (same side)."""
    if a.price != b.price:
        return a.price < b.price if a.side == SELL else a.price > b.price
    return bool(a.key < b.key)


def reference(records: Iterable[Record]) -> RefResult:
    """Recompute book, fills and order states from scratch."""
    out = RefResult()
    marks: dict[Any, set[Any]] = {}  # order id -> owners of cancels that came before the order
    for key, kind, oid, side, price, qty, owner in sorted(records, key=lambda r: r[0]):
        if kind == NOOP:
            continue
        if kind == CANCEL:
            target = out.orders.get(oid)
            if target is None:
                marks.setdefault(oid, set()).add(owner)
                continue
            if target is not None and target.resting and target.owner == owner:
                target.closed += target.remaining
                target.remaining = 0
                target.resting = False
                out.book.remove(target)
            continue
        if oid in out.orders:
            continue  # a repeated id places nothing
        if owner in marks.get(oid, ()):  # its owner cancelled it before it came: placed cancelled
            out.orders[oid] = RefOrder(key=key, oid=oid, kind=kind, side=side, price=price, qty=qty, owner=owner,
                                       closed=qty)
            continue
        taker = RefOrder(key=key, oid=oid, kind=kind, side=side, price=price, qty=qty, owner=owner,
                         remaining=qty)
        out.orders[oid] = taker
        while taker.remaining:
            best: RefOrder | None = None
            for maker in out.book:  # linear scan over the whole book, every time
                if maker.side != side and _crosses(taker, maker):
                    if best is None or _better(maker, best):
                        best = maker
            if best is None:
                break
            traded = min(taker.remaining, best.remaining)
            out.fills.append((oid, best.oid, best.price, traded))
            taker.remaining -= traded
            best.remaining -= traded
            if not best.remaining:
                best.resting = False
                out.book.remove(best)
        if taker.remaining:
            if kind == GTC:
                taker.resting = True
                out.book.append(taker)
            else:  # IOC and MARKET: the remainder expires
                taker.closed = taker.remaining
                taker.remaining = 0
    return out
