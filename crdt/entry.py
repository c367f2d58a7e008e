"""Log entries: bodies, acknowledgements, canonical encoding, hashing, signing,
wire decoding.

An entry is ``(origin, seq, hlc, prev, ack, body)``.  Its canonical bytes are
the msgpack encoding of that tuple as arrays in fixed field order; its hash is
BLAKE2b-256 of those bytes; the origin signs the hash.  On the wire an entry
is the same array with the signature appended.

A member carries a participant's order or cancel in a ``Carry`` entry: the
participant signs a *ticket* ``(owner, stamp, body)`` and any member writes it
into its own log (see ``docs/PARTICIPANTS.md``).

``ack`` is what a member says it holds when it writes the entry (see
``crdt.finality``): ``[]`` for a node that is not a member, ``[complete,
stable, digest]``, or that followed by ``[suspect, complete, stable, digest]``
computed without one member that is being voted out.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Final

import msgpack

from crdt.errors import MalformedEntry, OutOfRange, OversizeEntry, UnknownBodyType, ValidationError
from crdt.hlc import MAX_HLC
from crdt.keys import PUBLIC_LEN, SIGNATURE_LEN, SigningKey, verify

HASH_LEN: Final = 32
GENESIS: Final = bytes(HASH_LEN)
#: Prices are integer ticks in [1, MAX_PRICE]; quantities integer lots in [1, MAX_QTY].
MAX_PRICE: Final = (1 << 40) - 1
MAX_QTY: Final = (1 << 40) - 1
MAX_SEQ: Final = (1 << 63) - 1
#: Largest accepted wire encoding of one entry, in bytes.
MAX_ENTRY_BYTES: Final = 512

BUY: Final = 0
SELL: Final = 1
GTC: Final = 0
IOC: Final = 1

ORDER_TAG: Final = 1
CANCEL_TAG: Final = 2
HEARTBEAT_TAG: Final = 3
ADMIT_TAG: Final = 4
EVICT_TAG: Final = 5
RETRACT_TAG: Final = 6
LEAVE_TAG: Final = 7
CARRY_TAG: Final = 8

#: A ticket counts only in an entry stamped within this many milliseconds of
#: the ticket's own stamp, either way: so a ticket is carried within a bounded
#: time or never, and a replica remembers the tickets it placed for that long.
TICKET_WINDOW_MS: Final = 30_000
_TICKET_DOMAIN: Final = b"p2pex-ticket-v1"

#: ``()`` or ``(complete, stable, digest)`` or that plus ``(suspect, complete, stable, digest)``.
Ack = tuple[Any, ...]
NO_ACK: Final[Ack] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Order:
    """A limit order (``market=False``) or a market order (price 0, IOC)."""

    side: int
    price: int
    qty: int
    tif: int = GTC
    market: bool = False

    def to_wire(self) -> list[Any]:
        return [ORDER_TAG, self.side, self.price, self.qty, self.tif, self.market]


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Cancel the remaining quantity of ``order_id`` (an entry hash of the same origin)."""

    order_id: bytes

    def to_wire(self) -> list[Any]:
        return [CANCEL_TAG, self.order_id]


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """Keeps an origin's clock visible to others; changes no book state."""

    def to_wire(self) -> list[Any]:
        return [HEARTBEAT_TAG]


@dataclass(frozen=True, slots=True, kw_only=True)
class Admit:
    """Make ``member`` a member: its entries stamped after this one and with a
    seq above ``after`` (its log length when it asked) are matched.  Written by
    a member; the genesis entry of a network is its founder's ``Admit`` of
    itself at seq 1."""

    member: bytes
    after: int = 0

    def to_wire(self) -> list[Any]:
        return [ADMIT_TAG, self.member, self.after]


@dataclass(frozen=True, slots=True, kw_only=True)
class Evict:
    """A member's vote to remove ``member``, whose log it holds up to seq
    ``cut``.  ``since`` is the stamp of the ``Admit`` that began the membership
    the vote is against (0: whichever is current at the vote's key): a vote
    stamped by a clock far ahead can land, in canonical order, past the
    member's next admission, and must not count against that one."""

    member: bytes
    cut: int
    since: int = 0

    def to_wire(self) -> list[Any]:
        if self.since == 0:
            return [EVICT_TAG, self.member, self.cut]
        return [EVICT_TAG, self.member, self.cut, self.since]


@dataclass(frozen=True, slots=True, kw_only=True)
class Retract:
    """Withdraw this member's vote to remove ``member`` (it was heard again)."""

    member: bytes

    def to_wire(self) -> list[Any]:
        return [RETRACT_TAG, self.member]


@dataclass(frozen=True, slots=True, kw_only=True)
class Leave:
    """This member is shutting down cleanly, and this is its last entry: the
    other members vote it out at once instead of waiting for it to fall
    silent.  Nothing of its log is voided (it pushed everything before saying
    so).  An entry it writes later (a restart) shows it is back."""

    def to_wire(self) -> list[Any]:
        return [LEAVE_TAG]


def ticket_hash(owner: bytes, stamp: int, inner: Order | Cancel) -> bytes:
    """A ticket's id: what its owner signs, and, for an order, the order's id
    (the same whichever member carries it, however often)."""
    packed = msgpack.packb([_TICKET_DOMAIN, owner, stamp, inner.to_wire()], use_bin_type=True)
    return blake2b(packed, digest_size=HASH_LEN).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Carry:
    """A participant's order or cancel (``inner``), signed by its ``owner`` at
    its clock's ``stamp``, carried into the history by the member whose log
    holds this entry.  ``ticket`` (not on the wire) is its hash: the id of a
    carried order.  The entry's own stamp gives time priority; the ticket
    counts only where the entry's stamp is within ``TICKET_WINDOW_MS`` of
    ``stamp``, and only once per ticket (the first carry in canonical order)."""

    owner: bytes
    stamp: int
    inner: Order | Cancel
    sig: bytes
    ticket: bytes

    def to_wire(self) -> list[Any]:
        return [CARRY_TAG, self.owner, self.stamp, self.inner.to_wire(), self.sig]


def make_ticket(key: SigningKey, *, stamp: int, inner: Order | Cancel) -> Carry:
    """Sign a participant's order or cancel for a member to carry."""
    check_body(inner)
    h = ticket_hash(key.public, stamp, inner)
    return Carry(owner=key.public, stamp=stamp, inner=inner, sig=key.sign(h), ticket=h)


def ticket_valid(carry: Carry) -> bool:
    """True when the ticket's owner signed it (and ``ticket`` is its hash)."""
    h = ticket_hash(carry.owner, carry.stamp, carry.inner)
    return h == carry.ticket and verify(carry.owner, carry.sig, h)


Body = Order | Cancel | Heartbeat | Admit | Evict | Retract | Leave | Carry


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    origin: bytes
    seq: int
    hlc: int
    prev: bytes
    body: Body
    sig: bytes
    hash: bytes
    ack: Ack = NO_ACK

    @property
    def key(self) -> bytes:
        """Canonical sort key: ``(hlc, hash)`` as comparable bytes."""
        return self.hlc.to_bytes(8, "big") + self.hash

    def to_wire(self) -> list[Any]:
        return [self.origin, self.seq, self.hlc, self.prev, list(self.ack), self.body.to_wire(), self.sig]


def canonical_bytes(origin: bytes, seq: int, hlc: int, prev: bytes, body: Body, ack: Ack = NO_ACK) -> bytes:
    packed: bytes = msgpack.packb([origin, seq, hlc, prev, list(ack), body.to_wire()], use_bin_type=True)
    return packed


def entry_hash(origin: bytes, seq: int, hlc: int, prev: bytes, body: Body, ack: Ack = NO_ACK) -> bytes:
    return blake2b(canonical_bytes(origin, seq, hlc, prev, body, ack), digest_size=HASH_LEN).digest()


def key_of(hlc: int, hash_: bytes) -> bytes:
    return hlc.to_bytes(8, "big") + hash_


def check_body(body: Body) -> None:
    """Raise ``OutOfRange`` when a body's values are outside documented ranges."""
    if isinstance(body, Carry):
        check_body(body.inner)
    elif isinstance(body, Order):
        if body.side not in (BUY, SELL):
            raise OutOfRange(f"side must be 0 (buy) or 1 (sell), got {body.side}")
        if body.tif not in (GTC, IOC):
            raise OutOfRange(f"tif must be 0 (GTC) or 1 (IOC), got {body.tif}")
        if not 1 <= body.qty <= MAX_QTY:
            raise OutOfRange(f"qty must be in [1, {MAX_QTY}], got {body.qty}")
        if body.market:
            if body.price != 0 or body.tif != IOC:
                raise OutOfRange("a market order has price 0 and tif IOC")
        elif not 1 <= body.price <= MAX_PRICE:
            raise OutOfRange(f"price must be in [1, {MAX_PRICE}], got {body.price}")


def make_entry(
    key: SigningKey, *, seq: int, hlc: int, prev: bytes, body: Body, ack: Ack = NO_ACK
) -> Entry:
    """Build and sign the next entry of ``key``'s own log."""
    check_body(body)
    h = entry_hash(key.public, seq, hlc, prev, body, ack)
    return Entry(origin=key.public, seq=seq, hlc=hlc, prev=prev, body=body, sig=key.sign(h), hash=h, ack=ack)


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise MalformedEntry(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise OutOfRange(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _bytes(value: Any, name: str, length: int) -> bytes:
    if type(value) is not bytes or len(value) != length:
        raise MalformedEntry(f"{name} must be {length} bytes")
    return value


def decode_body(raw: Any) -> Body:
    if type(raw) is not list or not raw:
        raise MalformedEntry("body must be a non-empty array")
    tag = raw[0]
    if tag == ORDER_TAG and type(tag) is int:
        if len(raw) != 6:
            raise MalformedEntry("order body has 6 fields")
        market = raw[5]
        if type(market) is not bool:
            raise MalformedEntry("market flag must be a boolean")
        order = Order(
            side=_int(raw[1], "side", 0, 1),
            price=_int(raw[2], "price", 0, MAX_PRICE),
            qty=_int(raw[3], "qty", 1, MAX_QTY),
            tif=_int(raw[4], "tif", 0, 1),
            market=market,
        )
        check_body(order)
        return order
    if tag == CANCEL_TAG and type(tag) is int:
        if len(raw) != 2:
            raise MalformedEntry("cancel body has 2 fields")
        return Cancel(order_id=_bytes(raw[1], "order_id", HASH_LEN))
    if tag == HEARTBEAT_TAG and type(tag) is int:
        if len(raw) != 1:
            raise MalformedEntry("heartbeat body has 1 field")
        return Heartbeat()
    if tag == ADMIT_TAG and type(tag) is int:
        if len(raw) != 3:
            raise MalformedEntry("admit body has 3 fields")
        return Admit(member=_bytes(raw[1], "member", PUBLIC_LEN), after=_int(raw[2], "after", 0, MAX_SEQ))
    if tag == EVICT_TAG and type(tag) is int:
        if len(raw) not in (3, 4):
            raise MalformedEntry("evict body has 3 or 4 fields")
        since = _int(raw[3], "since", 1, MAX_HLC) if len(raw) == 4 else 0
        return Evict(member=_bytes(raw[1], "member", PUBLIC_LEN), cut=_int(raw[2], "cut", 0, MAX_SEQ), since=since)
    if tag == RETRACT_TAG and type(tag) is int:
        if len(raw) != 2:
            raise MalformedEntry("retract body has 2 fields")
        return Retract(member=_bytes(raw[1], "member", PUBLIC_LEN))
    if tag == LEAVE_TAG and type(tag) is int:
        if len(raw) != 1:
            raise MalformedEntry("leave body has 1 field")
        return Leave()
    if tag == CARRY_TAG and type(tag) is int:
        if len(raw) != 5:
            raise MalformedEntry("carry body has 5 fields")
        inner = decode_body(raw[3])
        if not isinstance(inner, Order | Cancel):
            raise MalformedEntry("a carried ticket holds an order or a cancel")
        owner = _bytes(raw[1], "ticket owner", PUBLIC_LEN)
        stamp = _int(raw[2], "ticket stamp", 1, MAX_HLC)
        return Carry(owner=owner, stamp=stamp, inner=inner, sig=_bytes(raw[4], "ticket sig", SIGNATURE_LEN),
                     ticket=ticket_hash(owner, stamp, inner))
    raise UnknownBodyType(f"unknown body type {tag!r}")


def decode_ack(raw: Any) -> Ack:
    """``[]``, ``[complete, stable, digest]`` or that plus ``[suspect, complete, stable, digest]``."""
    if type(raw) is not list or len(raw) not in (0, 3, 7):
        raise MalformedEntry("ack is an array of 0, 3 or 7 fields")
    if not raw:
        return NO_ACK
    out: list[Any] = [_int(raw[0], "ack complete", 0, MAX_HLC), _int(raw[1], "ack stable", 0, MAX_HLC),
                      _bytes(raw[2], "ack digest", HASH_LEN)]
    if len(raw) == 7:
        out += [_bytes(raw[3], "ack suspect", PUBLIC_LEN), _int(raw[4], "suspect ack complete", 0, MAX_HLC),
                _int(raw[5], "suspect ack stable", 0, MAX_HLC), _bytes(raw[6], "suspect ack digest", HASH_LEN)]
    return tuple(out)


def decode_entry(raw: Any) -> Entry:
    """Check one decoded wire value and build an ``Entry`` (signature not checked)."""
    if type(raw) is not list or len(raw) != 7:
        raise MalformedEntry("an entry is an array of 7 fields")
    origin = _bytes(raw[0], "origin", PUBLIC_LEN)
    seq = _int(raw[1], "seq", 1, MAX_SEQ)
    hlc = _int(raw[2], "hlc", 1, MAX_HLC)
    prev = _bytes(raw[3], "prev", HASH_LEN)
    ack = decode_ack(raw[4])
    body = decode_body(raw[5])
    sig = _bytes(raw[6], "sig", SIGNATURE_LEN)
    return Entry(
        origin=origin, seq=seq, hlc=hlc, prev=prev, body=body, sig=sig, ack=ack,
        hash=entry_hash(origin, seq, hlc, prev, body, ack),
    )


def decode_entry_bytes(data: bytes) -> Entry:
    """Decode one entry from its msgpack wire bytes, with the size cap."""
    if len(data) > MAX_ENTRY_BYTES:
        raise OversizeEntry(f"entry is {len(data)} bytes, cap is {MAX_ENTRY_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedEntry(f"not msgpack: {exc}") from None
    return decode_entry(raw)


def encode_entry(entry: Entry) -> bytes:
    packed: bytes = msgpack.packb(entry.to_wire(), use_bin_type=True)
    return packed


@dataclass(frozen=True, slots=True, kw_only=True)
class BadWireEntry:
    """A wire entry that did not decode, with its origin and seq as far as
    they could be read (for the refusal list and the log)."""

    origin: bytes | None
    seq: int | None
    error: ValidationError


def claimed(item: Any) -> tuple[bytes | None, int | None]:
    """The origin and seq an undecoded wire entry claims (None where it names none)."""
    if type(item) is not list:
        return None, None
    origin = item[0] if item and type(item[0]) is bytes and len(item[0]) == PUBLIC_LEN else None
    seq = item[1] if len(item) > 1 and type(item[1]) is int else None
    return origin, seq


def decode_entries(raw: Any, *, max_entries: int) -> tuple[list[Entry], list[BadWireEntry]]:
    """Decode an array of wire entries; bad ones become errors, good ones entries."""
    if type(raw) is not list:
        raise MalformedEntry("entries must be an array")
    if len(raw) > max_entries:
        raise OversizeEntry(f"at most {max_entries} entries per batch")
    good: list[Entry] = []
    bad: list[BadWireEntry] = []
    for item in raw:
        try:
            if len(msgpack.packb(item, use_bin_type=True)) > MAX_ENTRY_BYTES:
                raise OversizeEntry(f"entry over {MAX_ENTRY_BYTES} bytes")
            good.append(decode_entry(item))
        except ValidationError as exc:
            origin, seq = claimed(item)
            bad.append(BadWireEntry(origin=origin, seq=seq, error=exc))
    return good, bad
