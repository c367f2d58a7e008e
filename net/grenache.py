"""Grenache interop: Bitfinex's grape DHT and its RPC over HTTP.

Owns the grape client (``announce`` and ``lookup``: a JSON string in reply is
the grape's error), the announce loop of a node started with ``--grape``
(every second, backing off per grape while it fails; a lone grape's "No
nodes to query" is not a failure), the RPC endpoint (``POST /`` on the
node's HTTP port, registered only with ``--grape``), the mapping of the seed
exchange's actions onto the client API (same validation, same errors, the
node's API token in the payload for writes), and the outbound calls of
``cli.py grenache`` (lookup, then request or map).

Wire format (grenache-nodejs-http): the request body is ``[rid, key,
payload]`` as JSON, gzipped both ways with the header ``grc-compress: gzip``;
the reply is always HTTP 200 with ``[rid, error or null, result]``.  A body
that does not parse gets 400 with ``[null, "ERR_REQUEST_PARSE", null]`` (the
Node server never answers it, and its clients wait for their timeout).
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import json
import logging
import random
import uuid
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from crdt.entry import MAX_PRICE, MAX_QTY
from crdt.errors import ExchangeError
from net import api
from net.errors import ApiError, Unauthorized, Unprocessable
from net.peers import backoff_seconds
from net.wire import CLIENT_BODY_CAP, read_body

if TYPE_CHECKING:
    from net.node import Node

log = logging.getLogger("p2pex.grenache")

SERVICE = "exchange_service"  # the seed exchange's service name
ANNOUNCE_EVERY_S = 1.0  # grenache clients re-announce every second
GRAPE_TIMEOUT_S = 3.0
CALL_TIMEOUT_S = 10.0
PARSE_ERROR = "ERR_REQUEST_PARSE"
NO_NODES = "No nodes to query"  # a lone grape's answer to an announce: nothing is wrong
BOOK_DEPTH = 10
MAX_FILLS = 1000
NOT_SUPPORTED = ("syncOrderbook", "announceMatch")


class GrenacheError(ExchangeError):
    """A grape or a Grenache peer that answered with an error, or not at all."""

    code = "grenache_error"


# ---- grapes -------------------------------------------------------------------------


class Grape:
    """One grape's HTTP API: ``POST /announce``, ``/lookup``, with ``{rid, data}``."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url.rstrip("/")

    async def _call(self, path: str, data: Any) -> Any:
        try:
            async with asyncio.timeout(GRAPE_TIMEOUT_S):
                async with self.session.post(self.url + path, json={"rid": str(uuid.uuid4()), "data": data}) as r:
                    text = await r.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise GrenacheError(f"grape {self.url}: {type(exc).__name__}: {exc}") from None
        try:
            out = json.loads(text)
        except ValueError:
            raise GrenacheError(f"grape {self.url}{path}: HTTP {r.status}, not JSON: {text[:80]!r}") from None
        if isinstance(out, str):  # the grape's way of saying it failed
            raise GrenacheError(out)
        return out

    async def announce(self, service: str, port: int) -> None:
        await self._call("/announce", [service, port])

    async def lookup(self, service: str) -> list[str]:
        out = await self._call("/lookup", service)
        if not isinstance(out, list) or not all(isinstance(a, str) for a in out):
            raise GrenacheError(f"grape {self.url}: a lookup answered {out!r}")
        return out


async def lookup(session: aiohttp.ClientSession, grapes: Sequence[str], service: str) -> list[str]:
    """Every address any grape knows for ``service`` (the first grape that
    answers; raises GrenacheError when none does)."""
    errors = []
    for url in grapes:
        try:
            return await Grape(session, url).lookup(service)
        except GrenacheError as exc:
            errors.append(str(exc))
    raise GrenacheError("; ".join(errors) or "no grape given")


class Announcer:
    """A node's announce loop: ``service`` at ``port`` on every grape, every
    second; a grape that fails is retried with exponential backoff and jitter,
    and said so once until it answers again."""

    def __init__(self, grapes: Sequence[str], service: str, port: int) -> None:
        self.grapes = list(grapes)
        self.service = service
        self.port = port
        self.announced = 0  # successful announces, all grapes together
        self.failing: dict[str, str] = {}  # grape -> its last error

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._one(Grape(session, url)) for url in self.grapes))

    async def _one(self, grape: Grape) -> None:
        failures = 0
        while True:
            try:
                await grape.announce(self.service, self.port)
                ok = True
            except GrenacheError as exc:
                ok = str(exc) == NO_NODES  # a lone grape keeps the announce anyway
                if not ok:
                    failures += 1
                    if grape.url not in self.failing:
                        log.warning("cannot announce %s: %s", self.service, exc)
                    self.failing[grape.url] = str(exc)
            if ok:
                if failures or self.announced == 0:
                    log.info("announced %s on grape %s (port %d)", self.service, grape.url, self.port)
                failures = 0
                self.failing.pop(grape.url, None)
                self.announced += 1
            await asyncio.sleep(ANNOUNCE_EVERY_S if not failures else backoff_seconds(failures))


# ---- the RPC endpoint -------------------------------------------------------------------


def add_routes(app: web.Application, service: str) -> None:
    """``POST /``: Grenache RPC for ``service`` (beside the web view's ``GET /``)."""

    async def handler(request: web.Request) -> web.Response:
        return await rpc(request, service)

    app.router.add_post("/", handler)


def _reply(body: Any, *, gz: bool, status: int = 200) -> web.Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = {}
    if gz:
        data = gzip.compress(data)
        headers["grc-compress"] = "gzip"
    return web.Response(body=data, status=status, content_type="application/json", headers=headers)


def _gunzip(data: bytes) -> bytes:
    """A gzipped body, refused past the client body cap once inflated."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, CLIENT_BODY_CAP + 1)
    if len(out) > CLIENT_BODY_CAP or d.unconsumed_tail:
        raise ValueError("the inflated body exceeds the cap")
    return out


async def rpc(request: web.Request, service: str) -> web.Response:
    """One Grenache request: ``[rid, key, payload]`` in, ``[rid, error, result]`` out."""
    gz = request.headers.get("grc-compress", "none").lower() == "gzip"
    raw = await read_body(request, CLIENT_BODY_CAP)  # the whole body (413 past the cap)
    try:
        msg = json.loads(_gunzip(raw) if gz else raw)
        if not isinstance(msg, list) or len(msg) != 3:
            raise ValueError("not [rid, key, payload]")
    except (ValueError, OSError, EOFError, zlib.error):
        return _reply([None, PARSE_ERROR, None], gz=gz, status=400)
    rid, key, payload = msg
    try:
        api.take_read(request.app, request.remote or "?")
        if key != service:
            raise ApiError(f"this node serves {service!r}, not {key!r}", code="unknown_service")
        result = await dispatch(request.app, payload)
        err = None
    except ApiError as exc:
        err, result = f"{exc.code}: {exc.detail}", None
    except ExchangeError as exc:  # a core refusal no branch mapped: nothing changed
        err, result = f"{exc.code}: {exc}", None
    except Exception:
        log.exception("internal error on a Grenache request")
        err, result = "internal: internal error; see the node's log", None
    request.app[api.NODE].metrics.http_requests.labels("grenache " + _action_label(payload),
                                                      "error" if err else "ok").inc()
    return _reply([rid, err, result], gz=gz)


def _action_label(payload: Any) -> str:
    action = payload.get("action") if isinstance(payload, dict) else None
    return action if action in ACTIONS or action in NOT_SUPPORTED else "?"


# ---- actions --------------------------------------------------------------------------


Action = Callable[[web.Application, dict[str, Any]], Awaitable[Any]]


async def dispatch(app: web.Application, payload: Any) -> Any:
    """Carry out one payload, ``{action, data}`` (the seed exchange) or
    ``{action, args: [data]}`` (grenache-cli), with ``token`` for writes."""
    if not isinstance(payload, dict):
        raise Unprocessable("the payload must be an object: {action, data} or {action, args}", code="bad_payload")
    action = payload.get("action")
    if action in NOT_SUPPORTED:
        raise ApiError(f"{action} is not supported: this network replicates its book by itself; every node "
                       f"holds it whole and computes every match", code="not_supported")
    run = ACTIONS.get(action) if isinstance(action, str) else None
    if run is None:
        raise Unprocessable(f"action must be one of {sorted(ACTIONS)}", code="unknown_action")
    data = payload.get("data")
    if data is None:
        args = payload.get("args")
        if isinstance(args, list) and args:
            data = args[0]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise Unprocessable("data (or args[0]) must be an object", code="bad_data")
    if action in WRITES:
        _check_token(app, payload.get("token"))
    return await run(app, data)


def _check_token(app: web.Application, token: Any) -> None:
    node: Node = app[api.NODE]
    if type(token) is not str or not token or not hmac.compare_digest(token.encode(), node.token.encode()):
        raise Unauthorized("writes need the node's API token as \"token\" in the payload "
                           "(the .cookie file in the node's data dir)")


def _integer(order: dict[str, Any], name: str, lo: int, hi: int, what: str) -> int:
    value = order.get(name)
    if type(value) is float:
        raise Unprocessable(f"{name} must be an integer number of {what}, not a float ({value!r})",
                            code=f"bad_{name}")
    if type(value) is not int:
        raise Unprocessable(f"{name} must be an integer number of {what}", code=f"bad_{name}")
    if not lo <= value <= hi:
        raise Unprocessable(f"{name} must be in [{lo}, {hi}]", code=f"bad_{name}")
    return value


def _levels(app: web.Application, depth: int = BOOK_DEPTH) -> dict[str, list[dict[str, int]]]:
    bids, asks = app[api.NODE].exchange.engine.depth(depth)
    return {"buyOrders": [{"price": lv.price, "amount": lv.qty, "orders": lv.orders} for lv in bids],
            "sellOrders": [{"price": lv.price, "amount": lv.qty, "orders": lv.orders} for lv in asks]}


async def submit_order(app: web.Application, data: dict[str, Any]) -> Any:
    order = data.get("order", data)
    if not isinstance(order, dict):
        raise Unprocessable("order must be an object {type, price, amount, id}", code="bad_order")
    side = order.get("type", order.get("side"))
    if side not in ("buy", "sell"):
        raise Unprocessable("type must be 'buy' or 'sell'", code="bad_side")
    body: dict[str, Any] = {"side": side, "qty": _integer(order, "amount", 1, MAX_QTY, "lots")}
    if order.get("market"):
        body["market"] = True
    else:
        body["price"] = _integer(order, "price", 1, MAX_PRICE, "ticks")
    if "tif" in order:
        body["tif"] = order["tif"]
    if order.get("id") is not None:
        cid = order["id"]
        body["cid"] = str(cid) if type(cid) is int else cid  # the client's id: a repeat places nothing
    node = app[api.NODE]
    api.require_writable(node)
    api.take_write(app)
    status, view = await api.place_order(app, body)
    return {"status": "success", "state": {**_levels(app), "matches": view.get("fills", [])},
            "result": {**view, "repeat": status == 200}}


async def cancel_order(app: web.Application, data: dict[str, Any]) -> Any:
    node = app[api.NODE]
    oid = api.parse_order_id(data.get("orderId", data.get("id")))
    api.require_writable(node)
    api.take_write(app)
    view = await api.cancel_order(node, oid, None)
    return {"status": "success", "state": _levels(app), "result": view}


async def get_orderbook(app: web.Application, data: dict[str, Any]) -> Any:
    depth = data.get("depth", BOOK_DEPTH)
    if type(depth) is not int or not 1 <= depth <= 1000:
        raise Unprocessable("depth must be an integer in [1, 1000]", code="bad_depth")
    node = app[api.NODE]
    return {"status": "success", "state": _levels(app, depth),
            "result": {**_levels(app, depth), "state_hash": node.exchange.state_hash().hex(),
                       "frontier": node.exchange.frontiers().final}}


async def get_order(app: web.Application, data: dict[str, Any]) -> Any:
    node = app[api.NODE]
    oid = api.parse_order_id(data.get("orderId", data.get("id")))
    view = api.order_view(node, oid)
    if view is None:
        raise ApiError(f"no order {oid.hex()}", code="unknown_order")
    return {"status": "success", "result": view}


async def get_fills(app: web.Application, data: dict[str, Any]) -> Any:
    """Fills by seq, as ``GET /v1/fills``: the final ones first (their seq never
    changes), then the provisional ones; each says whether it is final."""
    node = app[api.NODE]
    since, limit, final_only = data.get("since", 0), data.get("limit", 100), data.get("final", False)
    if type(since) is not int or since < 0:
        raise Unprocessable("since must be a non-negative integer", code="bad_since")
    if type(limit) is not int or not 1 <= limit <= MAX_FILLS:
        raise Unprocessable(f"limit must be an integer in [1, {MAX_FILLS}]", code="bad_limit")
    if type(final_only) is not bool:
        raise Unprocessable("final must be a boolean", code="bad_final")
    engine = node.exchange.engine
    base = engine.fills_base
    rows: list[dict[str, Any]] = []
    if since < base:
        rows += [api.final_fill_view(node, f) for f in node.final_fills(since, min(limit, base - since))]
    if not final_only:
        start = max(since, base)
        for i, fill in enumerate(engine.fills[start - base: start - base + limit - len(rows)], start=start):
            rows.append(api.fill_view(node, i, fill))
    total = base + (0 if final_only else len(engine.fills))
    return {"status": "success", "result": {"fills": rows, "next": since + len(rows), "total": total}}


ACTIONS: dict[str, Action] = {
    "submitOrder": submit_order,
    "cancelOrder": cancel_order,
    "getOrderbook": get_orderbook,
    "getOrder": get_order,
    "getFills": get_fills,
}
WRITES = frozenset({"submitOrder", "cancelOrder"})


# ---- outbound: cli.py grenache --------------------------------------------------------------


async def _post(session: aiohttp.ClientSession, address: str, rid: str, service: str, payload: Any,
                *, gz: bool, timeout: float) -> Any:
    """One request to one address: its ``[rid, err, result]`` checked; the
    result, or GrenacheError with the peer's error."""
    data = json.dumps([rid, service, payload]).encode()
    headers = {"Content-Type": "application/json", "grc-compress": "gzip" if gz else "none"}
    if gz:
        data = gzip.compress(data)
    async with asyncio.timeout(timeout):
        async with session.post(f"http://{address}/", data=data, headers=headers) as r:
            body = await r.read()
    # the Node server gzips its reply to a gzipped request without saying so in a header
    if (gz or r.headers.get("grc-compress", "none").lower() == "gzip") and body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    try:
        out = json.loads(body)
    except ValueError:
        raise GrenacheError(f"{address}: HTTP {r.status}, not a Grenache reply") from None
    if not isinstance(out, list) or len(out) != 3:
        raise GrenacheError(f"{address}: HTTP {r.status}, not a Grenache reply: {out!r}"[:200])
    if out[0] != rid:
        raise GrenacheError(f"{address}: the reply is for request {out[0]!r}, not {rid!r}")
    if out[1] is not None:
        raise GrenacheError(f"{address}: {out[1]}")
    return out[2]


async def call(grapes: Sequence[str], service: str, payload: Any, *, every: bool = False, gz: bool = False,
               timeout: float = CALL_TIMEOUT_S) -> list[dict[str, Any]]:
    """Look ``service`` up, then call one address (``every``: all of them).
    The addresses are shuffled, and an address that does not answer is
    skipped (a grape keeps dead entries until they expire).  One row per
    address tried: ``{address, result}`` or ``{address, error}``; with one
    address wanted, the rows end at the first that answered."""
    async with aiohttp.ClientSession() as session:
        addresses = await lookup(session, grapes, service)
        if not addresses:
            raise GrenacheError(f"no node announces {service!r} on {', '.join(grapes)}")
        random.shuffle(addresses)
        rows: list[dict[str, Any]] = []
        for address in addresses:
            rid = str(uuid.uuid4())
            try:
                rows.append({"address": address,
                             "result": await _post(session, address, rid, service, payload, gz=gz, timeout=timeout)})
            except GrenacheError as exc:
                rows.append({"address": address, "error": str(exc)})
                if not every:
                    return rows  # it answered: its error is the answer
                continue
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                rows.append({"address": address, "error": f"unreachable: {type(exc).__name__}: {exc}",
                             "dead": True})
                continue
            if not every:
                return rows
        return rows


async def lookup_addresses(grapes: Sequence[str], service: str) -> list[str]:
    async with aiohttp.ClientSession() as session:
        return await lookup(session, grapes, service)


__all__ = ["SERVICE", "Announcer", "Grape", "GrenacheError", "add_routes", "call", "dispatch", "lookup",
           "lookup_addresses", "rpc"]
