"""Typed results of the client API: orders, fills, book levels, status, peers,
latency and stream events.

Owns turning the node's JSON replies into frozen, slotted, keyword-only
dataclasses with integer prices and quantities.  Each top-level result keeps
the reply it was read from in ``raw`` (excluded from equality and repr), so a
caller can print exactly what the node said.  A reply of the wrong shape
raises ``ClientError`` with code ``bad_reply``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from client.errors import BAD_REPLY, ClientError

T = TypeVar("T")
Json = Mapping[str, Any]


def parse(kind: Callable[[Json], T], data: Any, what: str) -> T:
    """``kind(data)``, with a reply of the wrong shape as a ``bad_reply`` ClientError."""
    if not isinstance(data, Mapping):
        raise ClientError(BAD_REPLY, f"{what}: expected a JSON object, got {type(data).__name__}")
    try:
        return kind(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ClientError(BAD_REPLY, f"{what}: unexpected reply ({type(exc).__name__}: {exc})") from None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fill:
    """A trade: ``qty`` lots at ``price`` ticks between a taker and a resting
    maker order.  ``seq`` is its position in the node's fill list (a final
    fill's never changes; a provisional ``fill``/``revoked`` stream event has
    none); ``final``: it will never be revised."""

    seq: int | None
    id: str | None
    taker: str
    maker: str
    price: int
    qty: int
    taker_side: str | None
    final: bool

    @classmethod
    def from_json(cls, d: Json) -> Fill:
        return cls(seq=_int_or_none(d.get("seq")), id=d.get("id"), taker=str(d["taker"]), maker=str(d["maker"]),
                   price=int(d["price"]), qty=int(d["qty"]), taker_side=d.get("taker_side"),
                   final=bool(d.get("final", False)))


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderView:
    """An order as the node knows it (``GET /v1/orders/{id}``), or the reply to
    placing or cancelling it.  ``status``: open, partially_filled, filled,
    cancelled (or void: ``void`` is set for this node's order that an eviction
    voided).  ``fills``, ``tif`` and ``market`` are set in replies to
    ``place``; ``repeat`` when the node recognised the ``cid`` of an earlier
    request; ``detail`` when ``wait_final`` ran out."""

    id: str
    status: str
    side: str
    price: int
    qty: int
    filled: int
    remaining: int
    owner: str | None
    final: bool
    void: bool = False
    tif: str | None = None
    market: bool = False
    fills: tuple[Fill, ...] = ()
    cid: str | None = None
    repeat: bool = False
    detail: str | None = None
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Json) -> OrderView:
        return cls(
            id=str(d["id"]), status=str(d.get("status", "")), side=str(d.get("side") or ""),
            price=int(d.get("price") or 0), qty=int(d.get("qty") or 0), filled=int(d.get("filled") or 0),
            remaining=int(d.get("remaining") or 0), owner=d.get("owner"), final=bool(d.get("final", False)),
            void=bool(d.get("void", False)), tif=d.get("tif"), market=bool(d.get("market", False)),
            fills=tuple(Fill.from_json(f) for f in d.get("fills") or ()), cid=d.get("cid"),
            repeat=bool(d.get("repeat", False)), detail=d.get("detail"), raw=d,
        )



@dataclass(frozen=True, slots=True, kw_only=True)
class Level:
    """One price level of the book: ``qty`` lots in ``orders`` orders at ``price``."""

    price: int
    qty: int
    orders: int

    @classmethod
    def from_json(cls, d: Json) -> Level:
        return cls(price=int(d["price"]), qty=int(d["qty"]), orders=int(d["orders"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Book:
    """Depth of the book, best levels first on each side."""

    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    state_hash: str | None = None
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Json) -> Book:
        return cls(bids=tuple(Level.from_json(lv) for lv in d["bids"]),
                   asks=tuple(Level.from_json(lv) for lv in d["asks"]), state_hash=d.get("state_hash"), raw=d)


@dataclass(frozen=True, slots=True, kw_only=True)
class FillsPage:
    """One page of ``GET /v1/fills``: ``next`` is the ``since`` of the next page,
    ``total`` how many fills the node holds (final ones first)."""

    fills: tuple[Fill, ...]
    next: int
    total: int
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Json) -> FillsPage:
        return cls(fills=tuple(Fill.from_json(f) for f in d["fills"]), next=int(d["next"]), total=int(d["total"]),
                   raw=d)


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """A peer in the node's table, as ``/v1/status`` lists it."""

    id: str
    short: str
    url: str
    state: str  # up or down
    failures: int
    last_error: str | None
    rtt_ms: float | None
    clock_offset_ms: float | None
    behind_entries: int | None = None  # entries the node held that the peer lacked at its last sync
    latency_p50_ms: float | None = None  # acceptance at the peer to merge at the node, its recent entries
    latency_p99_ms: float | None = None

    @classmethod
    def from_json(cls, d: Json) -> Peer:
        behind = d.get("behind_entries")
        return cls(id=str(d["id"]), short=str(d.get("short") or str(d["id"])[:8]), url=str(d["url"]),
                   state=str(d["state"]), failures=int(d.get("failures") or 0), last_error=d.get("last_error"),
                   rtt_ms=_float_or_none(d.get("rtt_ms")), clock_offset_ms=_float_or_none(d.get("clock_offset_ms")),
                   behind_entries=None if behind is None else int(behind),
                   latency_p50_ms=_float_or_none(d.get("latency_p50_ms")),
                   latency_p99_ms=_float_or_none(d.get("latency_p99_ms")))


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """``GET /v1/status``: the fields most callers need, and the whole reply in
    ``raw`` (finality, clock, http, replication, version vector, ...)."""

    node_id: str
    short_id: str
    name: str
    url: str | None
    trading: bool
    ready: bool
    state_hash: str
    member: bool
    peers: tuple[Peer, ...]
    entries: int
    orders: int
    fills: int
    final_fills: int
    resting: int
    book_hash: str | None = None  # with verify=True
    network_conflict: str | None = None  # the latest peer met of another network, in one line
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Json) -> Status:
        c = d["counts"]
        return cls(
            node_id=str(d["node_id"]), short_id=str(d["short_id"]), name=str(d["name"]), url=d.get("url"),
            trading=bool(d["trading"]), ready=bool(d["ready"]), state_hash=str(d["state_hash"]),
            member=bool(d.get("finality", {}).get("member", False)),
            peers=tuple(Peer.from_json(p) for p in d["peers"]), entries=int(c["entries"]),
            orders=int(c["orders"]), fills=int(c["fills"]), final_fills=int(c["final_fills"]),
            resting=int(c["resting"]), book_hash=d.get("book_hash"),
            network_conflict=_conflict_line(d.get("network_conflict")), raw=d,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """``GET /v1/latency``: acceptance-to-visibility delays (ms) of other nodes'
    entries, and acceptance-to-final delays of this node's orders and cancels."""

    samples: tuple[int, ...]
    median_ms: float | None
    final_samples: tuple[int, ...]
    final_median_ms: float | None
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Json) -> Latency:
        return cls(samples=tuple(int(s) for s in d["samples"]), median_ms=_float_or_none(d.get("median_ms")),
                   final_samples=tuple(int(s) for s in d.get("final_samples", ())),
                   final_median_ms=_float_or_none(d.get("final_median_ms")), raw=d)


#: Event types of ``GET /v1/stream``.
EVENT_TYPES = frozenset({"hello", "fill", "revoked", "final", "order", "book", "error"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One message of the node's event stream.  ``type``: hello, fill
    (provisional), revoked (a provisional fill that went away), final (fills
    that became final, with the new ``frontier``), order, book (top of book,
    ``[price, qty]`` pairs in ``raw``), error (``error``/``detail``; the node
    closes the stream after it).  ``fill`` is set for fill and revoked,
    ``fills`` for final; everything else is in ``raw``."""

    type: str
    fill: Fill | None = None
    fills: tuple[Fill, ...] = ()
    frontier: int | None = None
    error: str | None = None
    detail: str | None = None
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Json) -> Event:
        fill = d.get("fill")
        return cls(type=str(d["type"]), fill=Fill.from_json(fill) if isinstance(fill, Mapping) else None,
                   fills=tuple(Fill.from_json(f) for f in d.get("fills") or ()),
                   frontier=_int_or_none(d.get("frontier")), error=d.get("error"), detail=d.get("detail"), raw=d)


def _conflict_line(conflict: Any) -> str | None:
    """``network_conflict`` of a status reply as its one line (None when there is none)."""
    if not isinstance(conflict, dict):
        return None
    return str(conflict.get("detail", ""))
