"""HTTP routes: the client API (JSON, or msgpack on request, and a WebSocket
event stream) and the peer API (msgpack).  Handlers decode and validate, call
the node, encode the result; every refusal is ``{"error": code, "detail":
text}`` with its status.  Fills and orders say whether they are final: final
ones come from SQLite (they never change), provisional ones from memory."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import statistics
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web

from crdt.entry import BUY, GTC, IOC, MAX_PRICE, MAX_QTY, SELL, Cancel, Carry, Entry, Order, decode_body
from crdt.errors import BadTicket, ClockUnhealthy, ExchangeError, ForeignCancel, NotMember, ValidationError
from crdt.hlc import physical_ms
from crdt.keys import short_id
from matching.engine import OrderStatus
from matching.exchange import Exchange, NotCancellable, OrderAhead, UnknownOrder, fill_id
from net.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NoQuorum,
    NotFound,
    OtherNetwork,
    TooLarge,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from net.metrics import CONTENT_TYPE
from net.peers import NONCE_LEN, is_loopback_host, prove
from net.ports import percentile
from net.ratelimit import Buckets
from net.server import GUARD, guard_middleware
from net.store import CID_CANCEL, CID_ORDER
from net.webview import add_web_routes
from net.wire import (
    CARRY_PAGE,
    CARRY_PATH,
    CARRY_WAIT_S,
    CLIENT_BODY_CAP,
    MSGPACK,
    PEER_BODY_CAP,
    error_reply,
    pack,
    read_client_body,
    read_peer_body,
    reply,
    unpack,
    wants_msgpack,
)

if TYPE_CHECKING:
    from net.node import Node

log = logging.getLogger("p2pex.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NODE: web.AppKey[Node] = web.AppKey("node")
FILL_ROWS: web.AppKey[dict[int, bytes]] = web.AppKey("fill_rows")
FILL_ROWS_KEPT = 50_000  # encoded rows of final fills kept (about 13 MB)
WAIT_FINAL_S = 10.0  # default wait for ?wait=final
#: How long an order or cancel waits for a majority of members to certify it
#: before the answer is 503 no_quorum (docs/FINALITY.md, "Certification").
CERTIFY_TIMEOUT_S = 2.0
MAX_WAIT_FINAL_S = 60.0
FIRST_REPLIES: web.AppKey[OrderedDict[str, dict[str, Any]]] = web.AppKey("first_replies")
SIDES = {"buy": BUY, "sell": SELL}
SIDE_NAMES = {BUY: "buy", SELL: "sell"}
CLIENT_GONE = 499  # the status counted for a request whose caller hung up before the answer
MAX_FILLS_PAGE = 1000  # fills per /v1/fills page (was 10,000: 2.6 MB replies that stalled the loop)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by route (its pattern, not the path) and status."""
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource is not None else "unmatched"
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        _node(request).metrics.http_requests.labels(route, str(status)).inc()


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_reply(request, exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_reply(request, ApiError(str(exc.text), code="too_large", status=413))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error_reply(request, ApiError(exc.reason, code=exc.reason.lower().replace(" ", "_"),
                                                 status=exc.status))
        raise
    except ExchangeError as exc:  # a core refusal no handler mapped: still nothing changed
        return error_reply(request, ApiError(str(exc), code=exc.code, status=409))
    except ConnectionResetError:  # the caller hung up before the answer (a WebSocket's upgrade) went out
        return web.Response(status=CLIENT_GONE)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_reply(request, ApiError("internal error; see the node's log", code="internal",
                                             status=500))


@web.middleware
async def serving_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Peer calls wait until the node serves: between binding its port and
    going live (founding its network, if it does) it takes no entries."""
    if request.path.startswith("/peer/") and not _node(request).serving:
        raise ApiError("the node is starting or stopping", code="not_serving", status=503, retry_after=1)
    return await handler(request)


@web.middleware
async def peer_content_type_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Peer routes take msgpack only.  A web page can POST ``text/plain`` to any
    address without a CORS preflight, so a browser on the node's machine could
    otherwise be made to push to a node on 127.0.0.1; ``application/msgpack``
    needs a preflight, which the node never grants."""
    if (request.path.startswith("/peer/") and request.match_info.http_exception is None
            and request.content_type != MSGPACK):
        raise UnsupportedMediaType(f"peer routes take Content-Type: {MSGPACK}, not {request.content_type!r}")
    return await handler(request)


@web.middleware
async def body_cap_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a declared body over the cap on every route, also on routes that
    never read a body (a DELETE with 1 MiB attached used to go through)."""
    cap = PEER_BODY_CAP if request.path.startswith("/peer/") else CLIENT_BODY_CAP
    if request.content_length is not None and request.content_length > cap:
        raise TooLarge(f"body of {request.content_length} bytes exceeds the cap of {cap}")
    return await handler(request)


def _node(request: web.Request) -> Node:
    return request.app[NODE]


def _token_ok(request: web.Request) -> bool:
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else ""
    # Header bytes that are not UTF-8 arrive as surrogate escapes, which str.encode()
    # refuses: compare the raw bytes instead, so such a token is wrong, not a crash.
    given = token.encode("utf-8", "surrogateescape")
    return bool(token) and hmac.compare_digest(given, _node(request).token.encode())


def _require_token(request: web.Request) -> None:
    if not _token_ok(request):
        raise Unauthorized("missing or wrong API token (see the .cookie file in the node's data dir)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limiters:
    write: Buckets | None  # per client token
    read: Buckets | None  # per client address, weighted by cost
    peer: Buckets | None  # per peer address


LIMITERS: web.AppKey[Limiters] = web.AppKey("limiters")
UNLIMITED = frozenset({"/healthz", "/readyz"})


def _read_cost(request: web.Request) -> float:
    """What a read costs in tokens: its page size in hundreds of rows."""
    for name, path in (("limit", "/v1/fills"), ("depth", "/v1/book")):
        if request.path == path:
            text = request.query.get(name, "")
            return 1.0 + (int(text) / 100 if text.isdigit() and len(text) < 8 else 0.0)
    return 20.0 if request.path == "/v1/latency" else 1.0


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 with Retry-After past a token bucket: writes per client token, reads
    per client address, peer routes per peer address (see ``net.ratelimit``).
    Grenache RPC (``POST /``) takes its tokens itself: its refusals are
    Grenache replies (``net.grenache``)."""
    if request.path in UNLIMITED or (request.path == "/" and request.method == "POST"):
        return await handler(request)
    lim = request.app[LIMITERS]
    remote = request.remote or "?"
    cost = 1.0
    if request.path.startswith("/peer/"):
        buckets, key, what = lim.peer, ("peer", remote), "peer calls from this address"
    elif request.method in ("POST", "DELETE") and request.path.startswith("/v1/orders") and _token_ok(request):
        buckets, key, what = lim.write, ("token", ""), "writes with this token"  # one token per node
    else:
        buckets, key, what = lim.read, ("read", remote), "reads from this address"
        cost = _read_cost(request)
    if buckets is not None:
        wait = buckets.take(key, cost)
        if wait > 0:
            raise _rate_limited(buckets, what, wait)
    return await handler(request)


def _rate_limited(buckets: Buckets, what: str, wait: float) -> ApiError:
    return ApiError(f"too many {what}: {buckets.rate.per_s:g}/s, bursts of {buckets.rate.burst:g}",
                    code="rate_limited", status=429, retry_after=wait)


def _int_field(body: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = body.get(name)
    if type(value) is not int:
        raise Unprocessable(f"{name} must be an integer", code=f"bad_{name}")
    if not lo <= value <= hi:
        raise Unprocessable(f"{name} must be in [{lo}, {hi}]", code=f"bad_{name}")
    return value


def parse_order_id(text: Any) -> bytes:
    if type(text) is not str:
        raise BadRequest("order id must be 64 hex characters", code="bad_order_id")
    try:
        oid = bytes.fromhex(text)
    except ValueError:
        raise BadRequest("order id must be 64 hex characters", code="bad_order_id") from None
    if len(oid) != 32:
        raise BadRequest("order id must be 64 hex characters", code="bad_order_id")
    return oid


def status_view(node: Node, oid: bytes, st: OrderStatus, *, owner: bytes | None = None,
                final: bool | None = None) -> dict[str, Any]:
    owner = owner or node.exchange.owner(oid)
    return {
        "id": oid.hex(), "status": st.state, "side": SIDE_NAMES[st.side], "price": st.price,
        "qty": st.qty, "filled": st.filled, "remaining": st.remaining,
        "owner": owner.hex() if owner else None,
        "final": node.exchange.order_final(oid) if final is None else final,
    }


def order_view(node: Node, oid: bytes) -> dict[str, Any] | None:
    """An order as this node knows it: in memory while it rests or may still
    change, else its final state from SQLite; ``void`` for one of this node's
    orders that an eviction made void."""
    st = node.exchange.status(oid)
    if st is not None:
        view = status_view(node, oid, st)
    else:
        stored = node.final_order(oid)
        if stored is None:
            return _void_view(node, oid)
        view = status_view(node, oid, stored.status, owner=stored.owner, final=True)
    return view


def _void_view(node: Node, oid: bytes) -> dict[str, Any] | None:
    hexid = oid.hex()
    for v in node.voided:
        if hexid in v.orders:
            return {"id": hexid, "status": "void", "void": True, "final": True, "owner": node.node_id.hex(),
                    "detail": v.detail or f"this node was voted out; its entries past seq {v.cut} are void"}
    return None


def fill_view(node: Node, index: int, fill: tuple[Any, Any, int, int], *, final: bool = False,
              taker_side: int | None = None) -> dict[str, Any]:
    taker, maker, price, qty = fill
    if taker_side is None:
        taker_status = node.exchange.status(taker)
        taker_side = taker_status.side if taker_status else None
    return {
        "seq": index, "id": fill_id(fill), "taker": taker.hex(), "maker": maker.hex(),
        "price": price, "qty": qty, "taker_side": SIDE_NAMES.get(taker_side) if taker_side is not None else None,
        "final": final,
    }


def _fills_of_order(node: Node, oid: bytes, first_seq: int, fills: tuple[Any, ...]) -> list[dict[str, Any]]:
    """The fills an order made on arrival, final ones marked as such."""
    base = node.exchange.engine.fills_base
    return [fill_view(node, first_seq + i, f, final=first_seq + i < base, taker_side=None)
            for i, f in enumerate(fills)]


# ---- client API ----------------------------------------------------------------


CID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: First replies to orders placed with a client id, for a repeat (a restart forgets them).
REPLIES_KEPT = 10_000


def parse_cid(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str or not CID.fullmatch(value):
        raise Unprocessable("cid must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'", code="bad_cid")
    return value


async def post_order(request: web.Request) -> web.Response:
    """Place an order.  With ``cid`` (the client's id for it) a repeat places
    nothing and answers 200 with the order the first request placed."""
    _require_token(request)
    node = _node(request)
    require_writable(node)
    wait = _wait_final(request)
    body = await read_client_body(request)
    status, view = await place_order(request.app, body, wait=wait)
    return reply(request, view, status=status)


async def place_order(app: web.Application, body: Any, *, wait: float | None = None) -> tuple[int, dict[str, Any]]:
    """Validate a client's order and place it: ``(201, order)``, or ``(200,
    order)`` for a repeated ``cid``.  Raises ApiError for a refusal (nothing
    placed).  The caller has checked the token, readiness and capacity."""
    node = app[NODE]
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="bad_body")
    unknown = set(body) - {"side", "qty", "price", "tif", "market", "cid"}
    if unknown:
        raise Unprocessable(f"unknown fields: {sorted(unknown, key=repr)}", code="unknown_field")
    cid = parse_cid(body.get("cid"))
    raw_side = body.get("side")
    side = SIDES.get(raw_side) if isinstance(raw_side, str) else None  # a list or map is unhashable
    if side is None:
        raise Unprocessable("side must be 'buy' or 'sell'", code="bad_side")
    qty = _int_field(body, "qty", 1, MAX_QTY)
    market = body.get("market", "price" not in body)
    if type(market) is not bool:
        raise Unprocessable("market must be a boolean", code="bad_market")
    tif_text = body.get("tif", "IOC" if market else "GTC")
    if tif_text not in ("GTC", "IOC"):
        raise Unprocessable("tif must be 'GTC' or 'IOC'", code="bad_tif")
    if market:
        if "price" in body:
            raise Unprocessable("a market order has no price", code="bad_price")
        if tif_text != "IOC":
            raise Unprocessable("a market order is IOC", code="bad_tif")
        order = Order(side=side, price=0, qty=qty, tif=IOC, market=True)
    else:
        price = _int_field(body, "price", 1, MAX_PRICE)
        order = Order(side=side, price=price, qty=qty, tif=GTC if tif_text == "GTC" else IOC)
    if cid is not None:
        await node.cid_settled(CID_ORDER, cid)
        prior = node.client_request(CID_ORDER, cid)
        if prior is not None:
            first = app[FIRST_REPLIES].get(cid)
            # certified first, then the order as it stands (a void one is answered as such)
            await _certified(node, node.own_entry(prior.entry), prior.order_id, "order")
            return 200, _repeat_order(node, prior.order_id, cid, order, tif_text, first)
    # a participant's repeat sends the ticket it sent before, and is answered once a member says it is certified
    repeat = cid is not None and node.participant and node.ticket_sent(order, cid)
    try:
        result = await node.place(order, cid=cid)
    except REFUSALS as exc:
        raise refusal(exc) from None
    oid = result.order_id
    assert oid is not None
    await _certified(node, result.entry, oid, "order")
    if repeat:
        assert cid is not None
        return 200, _repeat_order(node, oid, cid, order, tif_text, app[FIRST_REPLIES].get(cid))
    if wait is not None:
        await node.until_final(result.entry.hlc, wait)
    view = order_view(node, oid)
    assert view is not None
    view["tif"] = tif_text
    view["market"] = market
    if wait is not None and view["final"]:
        view["fills"] = [fill_view(node, f.seq, (f.taker, f.maker, f.price, f.qty), final=True,
                                   taker_side=f.taker_side)
                         for f in node.final_fills(result.first_fill_seq, len(result.fills))] \
            if result.fills else []
    else:
        view["fills"] = _fills_of_order(node, oid, result.first_fill_seq, result.fills)
    if wait is not None and not view["final"]:
        view["detail"] = f"accepted, but not final within {wait:g} s"
    if cid is not None:
        view["cid"] = cid
        kept = app[FIRST_REPLIES]
        kept[cid] = view
        if len(kept) > REPLIES_KEPT:
            kept.popitem(last=False)
    return 201, view


def _repeat_order(node: Node, oid: bytes, cid: str, order: Order, tif_text: str,
                  first: dict[str, Any] | None) -> dict[str, Any]:
    """The answer to a repeated client id: the order the first request placed,
    as it stands now, with the fills of the first reply."""
    view = order_view(node, oid)
    assert view is not None  # committed with the entry, so the order is known
    if view.get("void"):
        return {**view, "cid": cid, "repeat": True}
    if (SIDES[view["side"]], view["qty"], view["price"]) != (order.side, order.qty, order.price):
        raise Conflict(f"cid {cid} already placed order {oid.hex()}, which is a different order",
                       code="cid_reused")
    view["tif"] = first["tif"] if first else tif_text
    view["market"] = order.market
    if first is not None:
        view["fills"] = first["fills"]
    else:  # a restart forgot the first reply: its fills are those with this order as taker
        fills, seq = node.exchange.fills_of(oid)
        view["fills"] = _fills_of_order(node, oid, seq, fills)
    view["cid"] = cid
    view["repeat"] = True
    return view


#: The core's refusals of an order, a cancel or a ticket, and how each is answered:
#: (code, status, Retry-After seconds or None).  Nothing was written.
_REFUSED: dict[type[ExchangeError], tuple[str, int, float | None]] = {
    NotMember: ("not_member", 503, 1), ClockUnhealthy: ("clock_unhealthy", 503, 5),
    BadTicket: ("bad_ticket", 503, 5), OrderAhead: ("order_ahead", 503, 1),
    UnknownOrder: ("unknown_order", 404, None), ForeignCancel: ("foreign_order", 409, None),
    NotCancellable: ("not_cancellable", 409, None),
}
REFUSALS = tuple(_REFUSED)


def refusal(exc: ExchangeError) -> ApiError:
    """The answer to one of the core's refusals (``REFUSALS``)."""
    code, status, retry_after = next(how for kind, how in _REFUSED.items() if isinstance(exc, kind))
    return ApiError(str(exc), code=code, status=status, retry_after=retry_after)


async def _certified(node: Node, entry: Entry | None, oid: bytes, what: str) -> bool:
    """Return once a majority of members certified this node's entry (an
    order or a cancel), or it is final: from then on no eviction can void it.
    Raises NoQuorum when that takes over CERTIFY_TIMEOUT_S.  An entry memory
    no longer holds (None) is below the base, which is final.  False, at
    once, for an entry that was voided (it never counts again)."""
    if entry is None or entry.origin != node.node_id:
        return True  # below the base (final), or a member's that carried this participant's ticket once certified
    if not node.exchange.counts(entry):
        return False
    if await node.until_certified(entry, CERTIFY_TIMEOUT_S):
        return True
    node.counters["no_quorum"] += 1
    raise NoQuorum(
        f"no majority of the members certified this {what} within {CERTIFY_TIMEOUT_S:g} s: it is not "
        "acknowledged. It stays in this node's log: it counts if its entries reach a majority before this "
        f"node is voted out, else it is void (GET /v1/orders/{oid.hex()} tells). A retry with the same cid "
        "through this node answers for the same order", order_id=oid, retry_after=CERTIFY_TIMEOUT_S)


def _wait_final(request: web.Request) -> float | None:
    """``?wait=final[&timeout=S]``: seconds to wait for the outcome to be final."""
    wait = request.query.get("wait")
    if wait is None:
        return None
    if wait != "final":
        raise BadRequest("wait must be 'final'", code="bad_wait")
    text = request.query.get("timeout", str(WAIT_FINAL_S))
    try:
        timeout = float(text)
    except ValueError:
        raise BadRequest("timeout must be a number of seconds", code="bad_timeout") from None
    if not 0 < timeout <= MAX_WAIT_FINAL_S:
        raise BadRequest(f"timeout must be in (0, {MAX_WAIT_FINAL_S:g}] seconds", code="bad_timeout")
    return timeout


async def delete_order(request: web.Request) -> web.Response:
    """Cancel an order.  With ``?cid=`` (the client's id for this cancel) a
    repeat changes nothing and answers 200 with the order as it stands."""
    _require_token(request)
    node = _node(request)
    require_writable(node)
    oid = parse_order_id(request.match_info["order_id"])
    view = await cancel_order(node, oid, parse_cid(request.query.get("cid")))
    return reply(request, view)


async def cancel_order(node: Node, oid: bytes, cid: str | None) -> dict[str, Any]:
    """Cancel one of this node's orders: the order as it stands after the
    cancel.  Raises ApiError for a refusal (nothing changed).  The caller has
    checked the token, readiness and capacity."""
    if cid is not None:
        await node.cid_settled(CID_CANCEL, cid)
        prior = node.client_request(CID_CANCEL, cid)
        if prior is not None:
            if prior.order_id != oid:
                raise Conflict(f"cid {cid} already cancelled order {prior.order_id.hex()}", code="cid_reused")
            if not await _certified(node, node.own_entry(prior.entry), oid, "cancel"):
                raise Conflict(f"the cancel with cid {cid} was voided (its node was voted out before it "
                               "reached a majority): the order stands; cancel it again", code="voided")
            view = order_view(node, oid)
            assert view is not None
            return {**view, "cid": cid, "repeat": True}
    repeat = cid is not None and node.participant and node.ticket_sent(Cancel(order_id=oid), cid)
    try:
        done = await node.place(Cancel(order_id=oid), cid=cid)
    except UnknownOrder as exc:
        if node.final_order(oid) is not None:
            raise Conflict(f"order {oid.hex()} is no longer resting", code="not_cancellable") from None
        raise refusal(exc) from None
    except REFUSALS as exc:
        raise refusal(exc) from None
    await _certified(node, done.entry, oid, "cancel")
    view = order_view(node, oid)
    assert view is not None
    if cid is not None:
        view["cid"] = cid
        if repeat:
            view["repeat"] = True
    return view


async def get_order(request: web.Request) -> web.Response:
    node = _node(request)
    oid = parse_order_id(request.match_info["order_id"])
    view = order_view(node, oid)
    if view is None:
        raise NotFound(f"no order {oid.hex()}", code="unknown_order")
    return reply(request, view)


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", code=f"bad_{name}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be in [{lo}, {hi}]", code=f"bad_{name}")
    return value


async def get_book(request: web.Request) -> web.Response:
    node = _node(request)
    depth = _query_int(request, "depth", 10, 1, 1000)
    bids, asks = node.exchange.engine.depth(depth)
    return reply(request, {
        "bids": [{"price": lv.price, "qty": lv.qty, "orders": lv.orders} for lv in bids],
        "asks": [{"price": lv.price, "qty": lv.qty, "orders": lv.orders} for lv in asks],
        "state_hash": node.exchange.state_hash().hex(),
    })


async def get_fills(request: web.Request) -> web.Response:
    """Fills by seq: the final ones (from SQLite; their seq never changes), then
    the provisional ones (from memory; they may still be revised).  With
    ``final=true`` only final fills, and ``next`` is a cursor that never needs
    to be read again."""
    node = _node(request)
    since = _query_int(request, "since", 0, 0, 1 << 62)
    limit = _query_int(request, "limit", 100, 1, MAX_FILLS_PAGE)
    final_only = request.query.get("final") in ("1", "true")
    base = node.exchange.engine.fills_base
    provisional = [] if final_only else node.exchange.engine.fills
    total = base + len(provisional)
    views: list[Any] = []
    if since < base:
        for f in node.final_fills(since, min(limit, base - since)):
            views.append(f)
    start = max(since, base)
    for i, fill in enumerate(provisional[start - base: start - base + limit - len(views)], start=start):
        views.append((i, fill))
    nxt = since + len(views)
    if wants_msgpack(request):
        rows_obj = [final_fill_view(node, v) if not isinstance(v, tuple) else fill_view(node, v[0], v[1])
                    for v in views]
        return reply(request, {"fills": rows_obj, "next": nxt, "total": total})
    # final rows never change: their JSON is encoded once and kept
    cache = request.app[FILL_ROWS]
    rows = []
    for v in views:
        if isinstance(v, tuple):
            rows.append(json.dumps(fill_view(node, v[0], v[1]), separators=(",", ":")).encode())
            continue
        hit = cache.get(v.seq)
        if hit is None:
            hit = cache[v.seq] = json.dumps(final_fill_view(node, v), separators=(",", ":")).encode()
            if len(cache) > FILL_ROWS_KEPT:
                del cache[next(iter(cache))]
        rows.append(hit)
    body = b'{"fills":[' + b",".join(rows) + b'],"next":%d,"total":%d}' % (nxt, total)
    return web.Response(body=body, content_type="application/json")


def final_fill_view(node: Node, f: Any) -> dict[str, Any]:
    return fill_view(node, f.seq, (f.taker, f.maker, f.price, f.qty), final=True, taker_side=f.taker_side)


def status_data(node: Node) -> dict[str, Any]:
    ex = node.exchange
    engine = ex.engine
    vv = ex.replica.version_vector()
    own = vv.get(node.node_id, 0)
    own_orders, own_cancels = node.own_orders, node.own_cancels
    lat = sorted(node.latencies)
    fin = sorted(node.final_latencies)
    return {
        "node_id": node.node_id.hex(), "short_id": node.short, "name": node.config.name,
        "url": node.url, "trading": node.config.trading, "ready": node.ready,
        "dht_joined": node.discovery.joined.is_set(),
        "peers": node.peer_views(),
        "peer_candidates": len(node.candidates),
        "http": node.http_guard.view(),
        "version_vector": {o.hex(): s for o, s in sorted(vv.items())},
        "state_hash": ex.state_hash().hex(),
        "counts": {
            "entries": ex.replica.entry_count(), "records": node.records, "own_entries": own,
            "own_orders": own_orders,
            "own_cancels": own_cancels, "orders": len(engine.orders),
            "fills": engine.fills_base + len(engine.fills), "final_fills": engine.fills_base,
            "provisional_fills": len(engine.fills), "resting": engine.resting_count(),
            "traded_qty": node.final_traded + sum(f[3] for f in engine.fills),
            "buffered": ex.replica.buffered(), "entries_in_memory": ex.replica.memory_entries(),
            "equivocating_origins": len(ex.replica.evidence()), "book_compactions": node.book_compactions,
        },
        "finality": finality_data(node),
        "network_conflict": None if node.conflict is None else node.conflict.view(),
        "grenache": None if node.grenache is None else {
            "service": node.grenache.service, "port": node.grenache.port, "grapes": node.grenache.grapes,
            "announces": node.grenache.announced, "failing": dict(node.grenache.failing)},
        "clock": {"offset_ms": ex.clock_offset_ms, "healthy": ex.clock_healthy(),
                  "limit_ms": node.config.max_clock_offset_ms},
        "replication": {
            **node.counters,
            "latency_samples": len(lat),
            "latency_p50_ms": percentile(lat, 50) if lat else None,
            "latency_p99_ms": percentile(lat, 99) if lat else None,
            "final_samples": len(fin),
            "final_p50_ms": percentile(fin, 50) if fin else None,
            "final_p99_ms": percentile(fin, 99) if fin else None,
        },
    }


def _stamp_at(ex: Exchange, origin: bytes, seq: int) -> int | None:
    try:
        return ex.replica.point(origin, seq)[1]
    except KeyError:  # pruned and not pinned: the end is below the final frontier anyway
        return None


def finality_data(node: Node) -> dict[str, Any]:
    """Members, the frontiers, how far finality lags and who holds it back."""
    ex = node.exchange
    fr = ex.frontiers()
    now = node.clock_ms()
    pending = ex.pending()
    holding = ex.finality.holding(node.mono_ms()) if pending else None
    votes = {x.hex(): [v.voter.hex() for v in vs if v.cut is not None] for x, vs in ex.finality.votes().items()}
    return {
        "network": ex.network.hex() if ex.network else None,
        "member": ex.is_member(),
        # member: of the committee; participant: trades through tickets members carry;
        # joining: started with --member, not admitted yet
        "role": "member" if ex.is_member() else ("participant" if not node.config.member else "joining"),
        "max_members": node.config.max_members,
        "members": [m.hex() for m in ex.membership.members()],
        "frontier": fr.final, "frontier_ms": physical_ms(fr.final) if fr.final else None,
        "stable": fr.stable, "complete": fr.complete,
        "final_fills": ex.engine.fills_base,
        "lag_ms": max(now - physical_ms(pending), 0) if pending else 0,
        "pending": bool(pending),
        "holding": None if holding is None else {"member": holding[0].hex(), "for_ms": holding[1]},
        "votes": votes,
        "admitting": {j.hex(): [v.hex() for v in vs] for j, vs in ex.membership.admitting().items()},
        "leaving": [m.hex() for m in ex.finality.leaves()],
        # how far a majority (this node included) certified this node's log, of its
        # length, and how far each member counted certified it (docs/FINALITY.md, 7)
        "certified": {"upto": ex.certified_upto(), "length": ex.finality.end(ex.node_id),
                      "by": {m.hex(): n for m, n in ex.certifiers().items()},
                      "no_quorum": node.counters["no_quorum"]},
        # tickets: this participant's that members carried, and participants' this member carried
        "tickets": {"carried": node.counters["carried"], "carries": node.counters["carries"]},
        "voided": [{"cut": v.cut, "entries": v.entries, "orders": len(v.orders), "at_ms": v.at_ms}
                   for v in node.voided],
        "decisions": [{"member": d.member.hex(), "at": d.at.hex(), "cut": d.cut}
                      for d in ex.membership.decisions()],
        "forks": {o.hex(): {"end": end, "end_hlc": _stamp_at(ex, o, end)} for o, end in ex.finality.ends().items()},
    }


async def get_status(request: web.Request) -> web.Response:
    """``?verify=1`` adds ``book_hash``, a digest of every fill and resting order
    (costs a pass over them), to check that replicas also matched alike."""
    data = status_data(_node(request))
    if request.query.get("verify") in ("1", "true"):
        data["book_hash"] = _node(request).exchange.book_hash().hex()
    return reply(request, data)


async def get_latency(request: web.Request) -> web.Response:
    """Raw delays (ms): acceptance to visibility of entries from other nodes
    (``samples``), and acceptance to final of orders and cancels here
    (``final_samples``)."""
    node = _node(request)
    lat, fin = list(node.latencies), list(node.final_latencies)
    return reply(request, {
        "samples": lat, "median_ms": statistics.median(lat) if lat else None,
        "final_samples": fin, "final_median_ms": statistics.median(fin) if fin else None})


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text format (``net/metrics.py``)."""
    return web.Response(body=_node(request).metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return reply(request, {"ok": True})


async def readyz(request: web.Request) -> web.Response:
    """Ready once the node synced with a live peer (``synced_with``: its short
    id) or found none within the bound (``alone``); 503 ``not_ready`` before."""
    node = _node(request)
    if not node.ready:
        detail = node.readiness.detail if node.serving else "the node is stopping"
        if node.serving and node.readiness.ready and not node.exchange.is_member():
            net = node.exchange.network
            detail = (f"waiting to be admitted to network {net.hex()[:16]}" if net
                      else "looking for a network to join")
        return _not_ready(request, detail)
    r = node.readiness
    out: dict[str, Any] = {"ready": True, "peers": len(node.peers.peers), "detail": r.detail}
    if r.synced_with is not None:
        out["synced_with"] = r.synced_with
    if r.alone:
        out["alone"] = True
    return reply(request, out)


def _not_ready(request: web.Request, detail: str) -> web.Response:
    return error_reply(request, ApiError(detail, code="not_ready", status=503, retry_after=1))


def _require_capacity(node: Node) -> None:
    """Backpressure: a node whose event loop runs late is over its capacity; a
    new order or cancel would only queue behind the others."""
    lag_ms = node.metrics.sustained_lag_s * 1000
    if lag_ms > node.config.max_loop_lag_ms:
        raise ApiError(f"the node is over its capacity (event loop {lag_ms:.0f} ms late); retry shortly",
                       code="busy", status=503, retry_after=1)


def require_writable(node: Node) -> None:
    """What an order or a cancel needs before it is read: a trading node that
    is ready and within its capacity."""
    if not node.config.trading:
        raise Conflict("this is a seed node; it takes no orders and holds none", code="seed_node")
    _require_ready(node)
    _require_capacity(node)


def _require_ready(node: Node) -> None:
    """Orders wait for readiness: one placed before the node caught up would
    match against a stale book and be revised moments later."""
    if not node.ready:
        detail = node.readiness.detail if not node.readiness.ready else "not a member of the network yet"
        raise ApiError(f"not ready to take orders yet: {detail}", code="not_ready", status=503, retry_after=1)


# ---- the event stream ------------------------------------------------------------


async def stream(request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/stream`` (WebSocket): one JSON event per message: ``fill``
    (provisional), ``revoked`` (a provisional fill that went away), ``final``
    (fills that became final, with the frontier), ``book`` (top of book,
    coalesced, at most 10 a second).  A reader that reads nothing loses the
    stream once a message waits SEND_TIMEOUT_S to be sent; a stop closes it
    with the sessions and links."""
    node = _node(request)
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=TRADE_MSG_CAP)  # it reads nothing from the client
    await ws.prepare(request)
    app = request.app
    transport = request.transport
    app[SOCKETS][ws] = transport
    sub = node.subscribe()
    reader = asyncio.create_task(_drain_ws(ws))
    last_book: Any = None
    try:
        await _send(ws, json.dumps({"type": "hello", "node": node.node_id.hex(), "frontier":
                                    node.exchange.frontiers().final, "book": _top(node)}), transport)
        while not ws.closed and not reader.done():
            try:
                async with asyncio.timeout(0.1):
                    ev: dict[str, Any] | None = await sub.queue.get()
            except TimeoutError:
                ev = None
            if sub.dropped:
                await _send(ws, json.dumps({"type": "error", "error": "too_slow",
                                            "detail": "the stream fell too far behind; reconnect"}), transport)
                break
            if ev is not None:
                await _send(ws, json.dumps(ev), transport)
            book = _top(node)
            if book != last_book:
                last_book = book
                await _send(ws, json.dumps({"type": "book", **book}), transport)
    finally:
        app[SOCKETS].pop(ws, None)
        node.subscribers.discard(sub)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await _close(ws, transport)
    return ws


async def _drain_ws(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends, so that a close is seen."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


# ---- the trading session ------------------------------------------------------------

#: Messages of one trading session being carried out at once; past it the
#: node reads no more from that socket until one is answered.
TRADE_INFLIGHT = 1_000
#: The largest message of a trading session (an order is about 100 bytes).
TRADE_MSG_CAP = 4096
TRADE_OPS = ("place", "cancel")
#: How long sending one message on a session or link (or closing it) may take.
SEND_TIMEOUT_S = 5.0
#: Open trading sessions, peer links and event streams, closed when the node stops.
SOCKETS: web.AppKey[dict[web.WebSocketResponse, asyncio.Transport | None]] = web.AppKey("sockets")
SHUTDOWN_CLOSE_S = 0.5  # how long a stop waits for each session, link or stream to close before cutting it


async def trade(request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/trade`` (WebSocket, bearer token on the upgrade): orders and
    cancels over one connection, one JSON message each, answered with the
    same status and body as ``POST /v1/orders`` and ``DELETE
    /v1/orders/{id}`` would, tagged with the message's ``ref``.  Messages are
    carried out in the order they arrive; their answers may come back in
    another order (a cancel waits for nothing a later order waits for)."""
    _require_token(request)  # before the upgrade: a browser cannot set the header
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=TRADE_MSG_CAP, compress=False)  # small messages
    await ws.prepare(request)
    app = request.app
    app[SOCKETS][ws] = request.transport
    transport = request.transport
    slots = asyncio.Semaphore(TRADE_INFLIGHT)
    tasks: set[asyncio.Task[None]] = set()
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                data: str | None = msg.data
            elif msg.type is WSMsgType.BINARY:
                data = None
            else:
                break
            await slots.acquire()  # released once the answer is sent: a client that does not read is not read
            task = asyncio.create_task(_trade_one(app, ws, data, slots, transport))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        app[SOCKETS].pop(ws, None)
        if tasks:  # what was read is carried out (and committed) even if nobody hears the answer
            await asyncio.gather(*tasks, return_exceptions=True)
        await _close(ws, transport)
    return ws


async def _trade_one(app: web.Application, ws: web.WebSocketResponse, data: str | None,
                     slots: asyncio.Semaphore, transport: asyncio.Transport | None) -> None:
    """Carry out one message of a trading session and answer it."""
    node = app[NODE]
    msg, ref, bad = _trade_message(data)
    op = "?"
    out: dict[str, Any]
    try:
        take_write(app)  # every message, well formed or not, as every request is
        if bad is not None:
            raise bad
        raw_op = msg.pop("op", None)
        if raw_op not in TRADE_OPS:
            raise BadRequest("op must be 'place' or 'cancel'", code="bad_op")
        op = raw_op
        require_writable(node)
        if op == "place":
            status, view = await place_order(app, msg)
        else:
            unknown = set(msg) - {"id", "cid"}
            if unknown:
                raise Unprocessable(f"unknown fields: {sorted(unknown, key=repr)}", code="unknown_field")
            status, view = 200, await cancel_order(node, parse_order_id(msg.get("id")), parse_cid(msg.get("cid")))
        out = {"ref": ref, "status": status, "order": view}
    except ApiError as exc:
        out = _trade_refusal(ref, exc)
    except ExchangeError as exc:  # a core refusal no branch mapped: still nothing changed
        out = _trade_refusal(ref, Conflict(str(exc), code=exc.code))
    except Exception:
        log.exception("internal error on a /v1/trade message")
        out = {"ref": ref, "status": 500, "error": "internal", "detail": "internal error; see the node's log"}
    node.metrics.http_requests.labels(f"/v1/trade {op}", str(out["status"])).inc()
    try:
        if not ws.closed:
            await _send(ws, json.dumps(out), transport)
    finally:
        slots.release()


def _trade_message(data: str | None) -> tuple[dict[str, Any], int | str | None, BadRequest | None]:
    """A session message as a map without its ``ref``, the ``ref``, and why
    the message is malformed (None when it is not)."""
    if data is None:
        return {}, None, BadRequest("messages are JSON text, not binary", code="bad_json")
    try:
        msg = json.loads(data)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        return {}, None, BadRequest("a message must be a JSON object", code="bad_json")
    ref = msg.pop("ref", None)
    if ref is None or type(ref) is int or (type(ref) is str and len(ref) <= 64):
        return msg, ref, None
    return msg, None, BadRequest("ref must be an integer or a string of at most 64 characters", code="bad_ref")


def _trade_refusal(ref: int | str | None, exc: ApiError) -> dict[str, Any]:
    out: dict[str, Any] = {"ref": ref, "status": exc.status, "error": exc.code, "detail": exc.detail,
                           **exc.fields()}
    if exc.retry_after is not None:
        out["retry_after"] = max(1, math.ceil(exc.retry_after))
    return out


async def _send(ws: web.WebSocketResponse, data: str | bytes, transport: asyncio.Transport | None) -> None:
    """One message, under SEND_TIMEOUT_S: a peer or client that stops reading
    loses its connection instead of holding the node's buffers (and its
    stop) for as long as it likes."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT_S):
            if isinstance(data, str):
                await ws.send_str(data)
            else:
                await ws.send_bytes(data)
    except TimeoutError:
        if transport is not None:
            transport.abort()
    except (ConnectionResetError, RuntimeError):
        pass  # the other side went away: what it asked for is done, the answer is lost


async def _close(ws: web.WebSocketResponse, transport: asyncio.Transport | None, *,
                 within: float = SEND_TIMEOUT_S, why: bytes = b"closing") -> None:
    """Close a session or link, waiting at most ``within`` seconds for the
    other side, then cutting the connection."""
    try:
        async with asyncio.timeout(within):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=why)
    except TimeoutError:
        if transport is not None:
            transport.abort()
    except (ConnectionResetError, RuntimeError):
        pass


def take_read(app: web.Application, remote: str, cost: float = 1.0) -> None:
    """One read from the caller address's bucket (the one ``GET`` requests take from)."""
    buckets = app[LIMITERS].read
    if buckets is not None:
        wait = buckets.take(("read", remote), cost)
        if wait > 0:
            raise _rate_limited(buckets, "reads from this address", wait)


def take_write(app: web.Application) -> None:
    """One write from the token's bucket (the one ``POST /v1/orders`` takes from)."""
    buckets = app[LIMITERS].write
    if buckets is not None:
        wait = buckets.take(("token", ""), 1.0)
        if wait > 0:
            raise _rate_limited(buckets, "writes with this token", wait)


async def _close_sockets(app: web.Application) -> None:
    """On shutdown: tell every trading session, peer link and event stream
    the node is going away, all at once, each under a timeout (a peer or
    client that does not read must not hold up the stop)."""
    await asyncio.gather(*(_close(ws, t, within=SHUTDOWN_CLOSE_S, why=b"the node is stopping")
                           for ws, t in tuple(app[SOCKETS].items())))


def _top(node: Node, depth: int = 10) -> dict[str, Any]:
    bids, asks = node.exchange.engine.depth(depth)
    return {"bids": [[lv.price, lv.qty] for lv in bids], "asks": [[lv.price, lv.qty] for lv in asks],
            "frontier": node.exchange.frontiers().final}


# ---- peer API --------------------------------------------------------------------


def _peer_label(request: web.Request, body: dict[str, Any]) -> tuple[str, bytes | None]:
    return request.remote or "?", _peer_label_of(body)


def _peer_label_of(body: dict[str, Any]) -> bytes | None:
    sender = body.get("from")
    return sender if type(sender) is bytes and len(sender) == 32 else None


async def peer_sync(request: web.Request) -> web.Response:
    node = _node(request)
    body = await read_peer_body(request)
    raw_vv = body.get("vv")
    if not isinstance(raw_vv, dict) or len(raw_vv) > 100_000:
        raise BadRequest("vv must be a map of origin -> seq", code="bad_vv")
    vv: dict[bytes, int] = {}
    for k, v in raw_vv.items():
        if type(k) is not bytes or len(k) != 32 or type(v) is not int or v < 0:
            raise BadRequest("vv must map 32-byte origins to sequence numbers", code="bad_vv")
        vv[k] = v
    limit = body.get("max", 4000)
    if type(limit) is not int or not 1 <= limit <= 4000:
        raise BadRequest("max must be in [1, 4000]", code="bad_max")
    _same_network(node, body)
    entries, more = node.delta_wires(vv, limit)
    out = {"entries": entries, "more": more, "vv": node.exchange.replica.version_vector(),
           "evidence": node.evidence_for(body.get("ev")), **_stamp(node)}
    return web.Response(body=pack(out), content_type="application/msgpack")


def _stamp(node: Node) -> dict[str, Any]:
    """What every peer reply carries: this node's wall clock and network."""
    return {"t": node.clock_ms(), "net": node.exchange.network}


def _same_network(node: Node, body: dict[str, Any]) -> None:
    theirs = body.get("net")
    ours = node.exchange.network
    if type(theirs) is bytes and ours is not None and theirs != ours:
        raise OtherNetwork(f"this node belongs to network {ours.hex()[:16]}, not {theirs.hex()[:16]}",
                           network=ours)


async def peer_join(request: web.Request) -> web.Response:
    """A node asks to be admitted: a member votes for it with ``Admit`` (it must
    have proven its key to this node first; the admission takes a majority of
    the members' votes) and names the network either way.  ``admitted``: this
    call wrote a vote."""
    node = _node(request)
    body = await read_peer_body(request)
    _same_network(node, body)
    joiner = body.get("from")
    after = body.get("after", 0)
    if type(joiner) is not bytes or len(joiner) != 32 or type(after) is not int or not 0 <= after < 1 << 62:
        raise BadRequest("from must be a 32-byte node id and after a log length", code="bad_join")
    admitted = False if body.get("participant") is True else node.admit(joiner, after)
    out = {"admitted": admitted, "member": node.exchange.is_member(), **_stamp(node)}
    return web.Response(body=pack(out), content_type="application/msgpack")


async def peer_push(request: web.Request) -> web.Response:
    node = _node(request)
    body = await read_peer_body(request)
    answer = _push_answer(node, body, request.remote or "?")
    answer.update(await node.certifies(_peer_label_of(body)))
    data = pack(answer)
    return web.Response(body=data, content_type="application/msgpack")


def _push_answer(node: Node, body: dict[str, Any], addr: str) -> dict[str, Any]:
    """Merge a peer's push; the answer (what was accepted, refused, held back,
    and what this node holds of each member).  Raises ApiError for a push it
    refuses as a whole."""
    nid = _peer_label_of(body)
    _same_network(node, body)
    entries = body.get("entries")
    if not isinstance(entries, list):
        raise BadRequest("entries must be an array", code="bad_entries")
    if nid is not None:
        node.note_down(nid, body.get("down"))
        node.peer_pushed(nid)
    try:
        result = node.ingest(entries, peer=addr, peer_id=nid)
    except ValidationError as exc:
        log.warning("peer %s (%s) sent a bad batch: %s", short_id(nid) if nid else "?", addr, exc)
        raise Unprocessable(str(exc), code=exc.code) from None
    rejected = [{"origin": r.origin.hex(), "seq": r.seq, "error": r.error.code}
                for r in result.merge.rejected]
    rejected += [{"origin": m.origin.hex() if m.origin else None, "seq": m.seq, "error": m.error.code}
                 for m in result.malformed]
    return {"accepted": len(result.merge.accepted), "rejected": rejected,
            "buffered": result.merge.buffered, "has": node.member_lengths(), **_stamp(node)}


#: A peer link that carries no push for this long is closed (the peer opens another).
LINK_IDLE_S = 60.0
#: Peer links open at once, in all and from one address: past either, the
#: upgrade is refused with 503 and that peer pushes by request instead (each
#: body then counts against the receive budget; a link message does not).
MAX_LINKS = 64
MAX_LINKS_PER_ADDRESS = 16
LINKS: web.AppKey[dict[str, int]] = web.AppKey("links")  # address -> links open from it


async def peer_link(request: web.Request) -> web.WebSocketResponse:
    """``GET /peer/v1/link`` (WebSocket, ``Content-Type: application/msgpack``
    on the upgrade): a peer's pushes on one connection.  Each binary message
    is a push body, answered in turn with what ``POST /peer/v1/push`` would
    answer, or with ``{"error", "detail", "status"}``.  Each message takes one
    call from the peer address's limit, as a request would."""
    node = _node(request)
    app = request.app
    addr = request.remote or "?"
    links = app[LINKS]
    if sum(links.values()) >= MAX_LINKS or links.get(addr, 0) >= MAX_LINKS_PER_ADDRESS:
        raise ApiError("too many peer links open; push by request", code="too_many_links", status=503,
                       retry_after=LINK_IDLE_S)
    # no permessage-deflate: it cost more CPU than any other part of sending a message
    ws = web.WebSocketResponse(max_msg_size=PEER_BODY_CAP, heartbeat=None, compress=False)
    await ws.prepare(request)
    links[addr] = links.get(addr, 0) + 1
    app[SOCKETS][ws] = request.transport
    transport = request.transport
    metric = node.metrics.http_requests
    try:
        while not ws.closed:
            try:
                msg = await ws.receive(timeout=LINK_IDLE_S)
            except TimeoutError:
                break
            if msg.type is not WSMsgType.BINARY:
                break  # a close, an error, or text: a peer speaks msgpack
            out: dict[str, Any]
            try:
                _take_peer_call(app, addr)
                body = unpack(msg.data)
                if not isinstance(body, dict):
                    raise BadRequest("a push must be a msgpack map", code="bad_body")
                out = _push_answer(node, body, addr)
                out.update(await node.certifies(_peer_label_of(body)))
                status = 200
            except ApiError as exc:
                status = exc.status
                out = {"error": exc.code, "detail": exc.detail, "status": exc.status, **exc.fields()}
                if exc.retry_after is not None:
                    out["retry_after"] = exc.retry_after
            except Exception:
                log.exception("internal error on a push from %s", addr)
                status = 500
                out = {"error": "internal", "detail": "internal error; see the node's log", "status": 500}
            metric.labels("/peer/v1/link push", str(status)).inc()
            await _send(ws, pack(out), transport)
    finally:
        app[SOCKETS].pop(ws, None)
        links[addr] -= 1
        if not links[addr]:
            del links[addr]
        await _close(ws, transport)
    return ws


async def peer_carry(request: web.Request) -> web.Response:
    """A participant's ticket (its signed order or cancel), for this member to
    carry in its own log.  Answered once a majority of the members certified
    the entry that carries it: ``seq`` (that entry's place in this member's log)
    and ``entries``, this log from the caller's ``has`` up to it (at most
    CARRY_PAGE); ``503 no_quorum`` when no majority certified it within
    CARRY_WAIT_S (the caller tries another member with the same ticket: it
    counts once however many carry it).  A ticket this member would not carry
    is refused with the core's error code."""
    node = _node(request)
    body = await read_peer_body(request)
    _same_network(node, body)
    has = body.get("has", 0)
    if type(has) is not int or not 0 <= has < 1 << 62:
        raise BadRequest("has must be a log length", code="bad_carry")
    try:
        ticket = decode_body(body.get("ticket"))
    except ValidationError as exc:
        raise Unprocessable(f"not a ticket: {exc}", code="bad_ticket") from None
    if not isinstance(ticket, Carry):
        raise Unprocessable("not a ticket: a carried order or cancel is expected", code="bad_ticket")
    what = "order" if isinstance(ticket.inner, Order) else "cancel"
    oid = ticket.ticket if isinstance(ticket.inner, Order) else ticket.inner.order_id
    try:
        entry = await node.carry(ticket)
    except BadTicket as exc:  # to a member, a ticket it will not carry is the caller's error
        raise Unprocessable(str(exc), code="bad_ticket") from None
    except REFUSALS as exc:
        raise refusal(exc) from None
    if not await node.until_certified(entry, CARRY_WAIT_S):
        raise NoQuorum(f"no majority of the members certified the entry carrying this {what} within "
                       f"{CARRY_WAIT_S:g} s", order_id=oid, retry_after=CARRY_WAIT_S)
    node.counters["carries"] += 1
    lo = max(has + 1, entry.seq - CARRY_PAGE + 1)
    entries = node.store.wire_range(node.node_id, lo, entry.seq) if lo <= entry.seq else []
    out = {"seq": entry.seq, "entries": entries, **_stamp(node)}
    return web.Response(body=pack(out), content_type="application/msgpack")


def _take_peer_call(app: web.Application, addr: str) -> None:
    """One call from the peer address's bucket (the one each peer request takes from)."""
    buckets = app[LIMITERS].peer
    if buckets is not None:
        wait = buckets.take(("peer", addr), 1.0)
        if wait > 0:
            raise _rate_limited(buckets, "peer calls from this address", wait)


async def peer_peers(request: web.Request) -> web.Response:
    """Peer exchange.  A caller's ``nonce`` (32 bytes) is a challenge: the reply's
    ``proof`` signs it with our key, together with our URL (``net.peers.prove``)."""
    node = _node(request)
    body = await read_peer_body(request)
    addr, _ = _peer_label(request, body)
    node.offer_records(body.get("records", []), source=addr)
    out: dict[str, Any] = {"records": node.records_for(is_loopback_host(addr)), "observed": addr,
                           **_stamp(node)}
    nonce = body.get("nonce")
    if type(nonce) is bytes and len(nonce) == NONCE_LEN and node.url is not None:
        out["proof"] = prove(node.key, nonce, node.url)
    data = pack(out)
    return web.Response(body=data, content_type="application/msgpack")


def build_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[guard_middleware, metrics_middleware, errors_middleware, serving_middleware,
                                       rate_limit_middleware, body_cap_middleware, peer_content_type_middleware],
                          client_max_size=PEER_BODY_CAP)
    app[NODE] = node
    cfg = node.config
    app[LIMITERS] = Limiters(
        write=None if cfg.write_limit is None else Buckets(cfg.write_limit),
        read=None if cfg.read_limit is None else Buckets(cfg.read_limit),
        peer=None if cfg.peer_limit is None else Buckets(cfg.peer_limit))
    app[GUARD] = node.http_guard
    app[FIRST_REPLIES] = OrderedDict()
    app[FILL_ROWS] = {}
    app[SOCKETS] = {}
    app[LINKS] = {}
    app.on_shutdown.append(_close_sockets)
    app.router.add_post("/v1/orders", post_order)
    app.router.add_delete("/v1/orders/{order_id}", delete_order)
    app.router.add_get("/v1/orders/{order_id}", get_order)
    app.router.add_get("/v1/book", get_book)
    app.router.add_get("/v1/fills", get_fills)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/latency", get_latency)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/v1/trade", trade)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_post("/peer/v1/sync", peer_sync)
    app.router.add_post("/peer/v1/push", peer_push)
    app.router.add_get("/peer/v1/link", peer_link)
    app.router.add_post("/peer/v1/peers", peer_peers)
    app.router.add_post("/peer/v1/join", peer_join)
    app.router.add_post(CARRY_PATH, peer_carry)
    add_web_routes(app)  # GET /: the web view (net/webview.py)
    return app


__all__ = ["ExchangeError", "build_app", "status_data"]
