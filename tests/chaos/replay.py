"""The independent replay: which entries count, in which order, and what the
naive reference matcher (``tests/reference_matcher.py``) makes of them.

``counted_entries`` is THE rule, and the only place it lives: the checker
replays what it returns, in the order it returns it.  Today every Order and
Cancel entry a node holds counts, in canonical order ``(hlc, entry hash)``
(DESIGN.md, "Matching").  Finality changes the rule (only members' entries
stamped inside their membership count; entries voided by an eviction do
not); that change belongs in this one function, and the checker follows.

Nothing here uses the engine: entries become reference records by the
record format alone (kinds and sides are constants of that format).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgpack

from crdt.entry import BUY, IOC, SELL, Cancel, Entry, Order, decode_entry
from matching.engine import CANCEL, GTC, MARKET
from tests.chaos.history import FillKey
from tests.reference_matcher import Record, reference


def decode_wire_hex(wire: str) -> Entry:
    """An entry from the hex of its msgpack wire encoding (as a check stores it)."""
    return decode_entry(msgpack.unpackb(bytes.fromhex(wire), raw=False, strict_map_key=False))


def counted_entries(entries: Iterable[Entry]) -> list[Entry]:
    """The entries that make the book and the fills, in the order they apply.

    Rule today: every Order and Cancel entry (heartbeats change nothing),
    sorted by canonical key ``(hlc, hash)``.  Finality will narrow it: keep
    only entries of members stamped inside their membership, and drop the
    entries an eviction voided.
    """
    chosen = [e for e in entries if isinstance(e.body, (Order, Cancel))]
    chosen.sort(key=lambda e: (e.hlc, e.hash))
    return chosen


def to_record(position: int, entry: Entry) -> Record:
    """A reference record keyed by its position in the rule's order."""
    body = entry.body
    if isinstance(body, Cancel):
        return (position, CANCEL, body.order_id.hex(), 0, 0, 0)
    assert isinstance(body, Order)
    kind = MARKET if body.market else (IOC if body.tif == IOC else GTC)
    return (position, kind, entry.hash.hex(), body.side, body.price, body.qty)


@dataclass(frozen=True, slots=True, kw_only=True)
class Replayed:
    fills: tuple[FillKey, ...]  # in the order the reference made them
    bids: tuple[tuple[int, int, int], ...]  # (price, qty, orders), best first
    asks: tuple[tuple[int, int, int], ...]


def replay(entries: Iterable[Entry]) -> Replayed:
    """Replay the counted entries through the reference matcher."""
    counted = counted_entries(entries)
    result = reference(to_record(i, e) for i, e in enumerate(counted))
    return Replayed(
        fills=tuple((str(t), str(m), int(p), int(q)) for t, m, p, q in result.fills),
        bids=tuple(result.depth(BUY)), asks=tuple(result.depth(SELL)),
    )


def order_quantities(entries: Iterable[Entry]) -> dict[str, int]:
    """Every order's quantity, by id, whether or not the rule counts it."""
    return {e.hash.hex(): e.body.qty for e in entries if isinstance(e.body, Order)}
