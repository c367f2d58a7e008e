"""The recorded history of a chaos run: what clients were told, what nodes showed.

Everything the checker judges is in a ``History``, and a ``History`` is plain
JSON (``to_json`` / ``from_json``), so a run can be saved, re-checked later
and hand-made in tests.  The records are observations, never judgements:

- ``Ack``: one client call and its answer (or the kind of failure), with the
  order id, the client order id (cid), the times and the node;
- ``FillSeen`` / ``FillGone``: the observer's samples of each node's fill
  list, kept as changes only (a fill first shown at a position, or shown
  final; a fill no longer shown where the sample looked);
- ``FinalTotal``: a node's count of final fills went down;
- ``OrderFinal``: a node said an order's state is final (``GET
  /v1/orders/{id}`` with ``"final": true``), read after a cancel;
- ``NodeEvent`` / ``FaultEvent``: what happened to processes and links;
- ``Check``: after each nemesis healed, every live node's state (hash,
  version vector, book, full fill list, sampled order views, new tracebacks
  in its logs) and the log entries the nodes served for the replay;
- ``Phase``: one nemesis, its times and whether this node supports it.

Times are seconds since the start of the run (monotonic clock).  Fill lists
are stored once per distinct content (``fill_lists``, keyed by digest).
``Recorder`` is the mutable collector the run appends to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

FORMAT_VERSION = 1

#: A fill as a node shows it: taker id, maker id, price, qty (ids in hex).
FillKey = tuple[str, str, int, int]
#: The same, with the node's ``final`` flag (False when the node has no such field).
ShownFill = tuple[str, str, int, int, bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """One client call.  ``ok`` is False when no acknowledgement came (``error``
    says why); an order that timed out may still have been accepted."""

    t0: float
    t1: float
    node: str
    op: str  # "order" | "cancel"
    cid: str | None = None  # client order id, when the node takes one
    order_id: str | None = None  # order: the id the node gave; cancel: the target
    side: str | None = None
    qty: int | None = None
    price: int | None = None  # None: market order
    tif: str | None = None
    ok: bool = True
    error: str | None = None
    status: str | None = None
    filled: int | None = None
    remaining: int | None = None
    final: bool | None = None  # the reply's "final" flag; None when absent
    fills: tuple[ShownFill, ...] = ()
    retries: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class FillSeen:
    t: float
    node: str
    seq: int
    fill: ShownFill


@dataclass(frozen=True, slots=True, kw_only=True)
class FillGone:
    t: float
    node: str
    fill: FillKey


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalTotal:
    t: float
    node: str
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderFinal:
    t: float
    node: str
    order_id: str
    status: str
    filled: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeEvent:
    """kinds: start, ready, kill, pause, resume, stop, exit (``expected`` False: a crash)."""

    t: float
    node: str
    kind: str
    detail: str = ""
    expected: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultEvent:
    """A fault action (kind: isolate, partition, cut, degrade, kill, restart, pause,
    resume, heal-net), or ``packets``: what the faults did to packets since the
    last such event (``counts``: cut, lost, duplicated, queued, delayed, reordered)."""

    t: float
    kind: str
    detail: str
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeState:
    """One live node at a check."""

    node: str
    alive: bool
    state_hash: str | None = None
    version_vector: dict[str, int] = field(default_factory=dict)
    bids: tuple[tuple[int, int, int], ...] = ()  # (price, qty, orders), best first
    asks: tuple[tuple[int, int, int], ...] = ()
    fills: str = ""  # key into History.fill_lists; "" when the node did not answer
    finality: dict[str, Any] | None = None  # the status "finality" object, when there is one
    orders: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # sampled GET /v1/orders/{id}
    tracebacks: tuple[str, ...] = ()  # last line of each new traceback in its logs
    error_lines: int = 0  # new ERROR log lines
    error: str | None = None  # why the snapshot is missing


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    phase: str
    t: float
    t_heal: float
    t_converged: float | None  # when every live node first showed the same state hash
    nodes: tuple[NodeState, ...]
    entries: tuple[str, ...] = ()  # wire entries (msgpack, hex) first served at this check


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase:
    name: str
    title: str
    supported: bool
    note: str = ""
    t_start: float = 0.0
    t_fault: float = 0.0
    t_heal: float = 0.0
    t_end: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    version: int = FORMAT_VERSION
    meta: dict[str, Any] = field(default_factory=dict)
    phases: tuple[Phase, ...] = ()
    acks: tuple[Ack, ...] = ()
    seen: tuple[FillSeen, ...] = ()
    gone: tuple[FillGone, ...] = ()
    final_totals: tuple[FinalTotal, ...] = ()
    order_finals: tuple[OrderFinal, ...] = ()
    node_events: tuple[NodeEvent, ...] = ()
    fault_events: tuple[FaultEvent, ...] = ()
    checks: tuple[Check, ...] = ()
    fill_lists: dict[str, tuple[ShownFill, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _plain(self)
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> History:
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"history format {raw.get('version')!r}, expected {FORMAT_VERSION}")
        history: History = _build(History, raw)
        return history

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


def fill_list_key(fills: tuple[ShownFill, ...]) -> str:
    return hashlib.blake2b(json.dumps(fills).encode(), digest_size=12).hexdigest()


class Recorder:
    """The mutable collector behind a ``History``; ``freeze`` makes the value."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = dict(meta)
        self.phases: list[Phase] = []
        self.acks: list[Ack] = []
        self.seen: list[FillSeen] = []
        self.gone: list[FillGone] = []
        self.final_totals: list[FinalTotal] = []
        self.order_finals: list[OrderFinal] = []
        self.node_events: list[NodeEvent] = []
        self.fault_events: list[FaultEvent] = []
        self.checks: list[Check] = []
        self.fill_lists: dict[str, tuple[ShownFill, ...]] = {}

    def fill_list(self, fills: tuple[ShownFill, ...]) -> str:
        key = fill_list_key(fills)
        self.fill_lists.setdefault(key, fills)
        return key

    def freeze(self) -> History:
        return History(
            meta=dict(self.meta), phases=tuple(self.phases), acks=tuple(self.acks), seen=tuple(self.seen),
            gone=tuple(self.gone), final_totals=tuple(self.final_totals), order_finals=tuple(self.order_finals),
            node_events=tuple(self.node_events),
            fault_events=tuple(self.fault_events), checks=tuple(self.checks), fill_lists=dict(self.fill_lists))


# ---- JSON <-> dataclasses ------------------------------------------------------------

T = TypeVar("T")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _build(tp: Any, raw: Any) -> Any:
    """``raw`` (from JSON) as an instance of the type ``tp`` (dataclasses, tuples,
    dicts, optionals and plain values)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], raw) if len(inner) == 1 else raw
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(raw, dict):
            raise ValueError(f"{tp.__name__}: expected an object, got {type(raw).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{tp.__name__}: unknown fields {sorted(unknown)}")
        return tp(**{k: _build(hints[k], v) for k, v in raw.items()})
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(raw, list):
            raise ValueError(f"expected a list for {tp}, got {type(raw).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v) for v in raw)
        if len(args) != len(raw):
            raise ValueError(f"expected {len(args)} items for {tp}, got {len(raw)}")
        return tuple(_build(a, v) for a, v in zip(args, raw, strict=True))
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(raw, dict):
            raise ValueError(f"expected an object for {tp}")
        return {k: _build(vt, v) for k, v in raw.items()}
    return raw
