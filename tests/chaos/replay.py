"""The independent replay: which entries count, in which order, and what the
naive reference matcher (``matching/reference.py``) makes of them.

``counted_entries`` is THE rule, and the only place it lives: the checker
replays what it returns, in the order it returns it.  An Order or Cancel
entry counts when its origin was a member when it was stamped (admissions
and eviction decisions recomputed from scratch by ``sim.checker``'s naive
membership, not by ``crdt.membership``), it is not past its origin's
eviction cut, and not past the end of an equivocating origin's log; counted
entries apply in canonical order ``(hlc, entry hash)`` (docs/FINALITY.md).
The decisions and the ends of forked logs come from the node's
``/v1/status`` finality object: they are derived from the entries by vote
counting that the replay does not redo.

Nothing here uses the engine: entries become reference records by the
record format alone (kinds and sides are constants of that format).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from crdt.entry import BUY, IOC, SELL, TICKET_WINDOW_MS, Cancel, Carry, Entry, Order, decode_entry, ticket_valid
from crdt.hlc import physical_ms
from crdt.membership import Decision
from matching.engine import CANCEL, GTC, MARKET
from matching.reference import Record, reference
from sim.checker import naive_validity
from tests.chaos.history import FillKey


def decode_wire_hex(wire: str) -> Entry:
    """An entry from the hex of its msgpack wire encoding (as a check stores it)."""
    return decode_entry(msgpack.unpackb(bytes.fromhex(wire), raw=False, strict_map_key=False))


def counted_entries(entries: Iterable[Entry], finality: Mapping[str, Any] | None = None) -> list[Entry]:
    """The entries that make the book and the fills, in the order they apply.

    Without ``finality`` (a node that reports none) every Order and Cancel
    entry counts.  With it, only members' entries inside their membership,
    up to eviction cuts and the ends of forked logs.
    """
    held = list(entries)
    chosen = [e for e in held if isinstance(e.body, (Order, Cancel)) or _ticket_counts(e)]
    if finality is not None and finality.get("network"):
        decisions = [Decision(member=bytes.fromhex(d["member"]), at=bytes.fromhex(d["at"]), cut=int(d["cut"]))
                     for d in finality.get("decisions", ())]
        forks = {bytes.fromhex(o): f for o, f in dict(finality.get("forks", {})).items()}
        ends = {o: int(f["end"]) for o, f in forks.items()}
        banned = {o: int(f["end_hlc"]) for o, f in forks.items() if f.get("end_hlc") is not None}
        valid = naive_validity(held, decisions, bytes.fromhex(finality["network"]), banned, ends)
        chosen = [e for e in chosen if e.seq <= ends.get(e.origin, e.seq) and valid(e)]
    chosen.sort(key=lambda e: (e.hlc, e.hash))
    return chosen


def _ticket_counts(entry: Entry) -> bool:
    """A participant's ticket carried by a member (docs/PARTICIPANTS.md): it
    counts with its owner's signature, stamped within the window of the entry."""
    body = entry.body
    return (isinstance(body, Carry) and abs(physical_ms(body.stamp) - physical_ms(entry.hlc)) <= TICKET_WINDOW_MS
            and ticket_valid(body))


def to_record(position: int, entry: Entry) -> Record:
    """A reference record keyed by its position in the rule's order (a
    carried ticket is its owner's order or cancel, its id the ticket's)."""
    body = entry.body
    if isinstance(body, Carry):
        inner = body.inner
        if isinstance(inner, Cancel):
            return (position, CANCEL, inner.order_id.hex(), 0, 0, 0, body.owner)
        kind = MARKET if inner.market else (IOC if inner.tif == IOC else GTC)
        return (position, kind, body.ticket.hex(), inner.side, inner.price, inner.qty, body.owner)
    if isinstance(body, Cancel):
        return (position, CANCEL, body.order_id.hex(), 0, 0, 0, entry.origin)
    assert isinstance(body, Order)
    kind = MARKET if body.market else (IOC if body.tif == IOC else GTC)
    return (position, kind, entry.hash.hex(), body.side, body.price, body.qty, entry.origin)


@dataclass(frozen=True, slots=True, kw_only=True)
class Replayed:
    fills: tuple[FillKey, ...]  # in the order the reference made them
    bids: tuple[tuple[int, int, int], ...]  # (price, qty, orders), best first
    asks: tuple[tuple[int, int, int], ...]


def replay(entries: Iterable[Entry], finality: Mapping[str, Any] | None = None) -> Replayed:
    """Replay the counted entries through the reference matcher."""
    counted = counted_entries(entries, finality)
    result = reference(to_record(i, e) for i, e in enumerate(counted))
    return Replayed(
        fills=tuple((str(t), str(m), int(p), int(q)) for t, m, p, q in result.fills),
        bids=tuple(result.depth(BUY)), asks=tuple(result.depth(SELL)),
    )


def order_quantities(entries: Iterable[Entry]) -> dict[str, int]:
    """Every order's quantity, by id, whether or not the rule counts it."""
    out = {e.hash.hex(): e.body.qty for e in entries if isinstance(e.body, Order)}
    out.update((e.body.ticket.hex(), e.body.inner.qty) for e in entries
               if isinstance(e.body, Carry) and isinstance(e.body.inner, Order))
    return out
