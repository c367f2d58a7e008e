"""The clients: one per node, trading through that node's client API and
recording every call as an ``Ack``.

A client places random GTC limit orders (a share priced to cross), IOC and
market orders, and cancels its own resting orders, paced at ``rate`` calls a
second.  Every call runs under a timeout; a failed call backs off; the loop
ends at ``stop`` or after ``max_calls``, so it is bounded in count and time.

When the node takes a client order id (``cid``), every order carries one,
and an order whose answer was lost (timeout, dropped connection) is sent
again with the same cid, up to ``CID_RETRIES`` times: the node must answer
with the first result.  A node that refuses the field (today's node answers
422 ``unknown_field``) gets orders without it, and that is remembered.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.chaos.history import Ack, Recorder, ShownFill

CALL_TIMEOUT_S = 3.0
CID_RETRIES = 2
MAX_BACKOFF_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    rate: float = 4.0  # calls per second
    mid: int = 1000
    spread: int = 5  # how far a crossing order reaches past the mid
    depth: int = 15  # how far from the mid a resting order sits
    max_qty: int = 10
    cross_share: float = 0.35
    ioc_share: float = 0.15
    market_share: float = 0.05
    cancel_share: float = 0.25
    max_calls: int = 100_000


class CidSupport:
    """Shared by the clients: None until a node has answered an order with a cid."""

    def __init__(self) -> None:
        self.value: bool | None = None


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "payload"
    return type(exc).__name__


def _fills(raw: Any) -> tuple[ShownFill, ...]:
    out: list[ShownFill] = []
    if isinstance(raw, list):
        for f in raw:
            if isinstance(f, dict):
                out.append((str(f.get("taker")), str(f.get("maker")), int(f.get("price", 0)), int(f.get("qty", 0)),
                            f.get("final") is True))
    return tuple(out)


class Client:
    def __init__(self, *, node: str, url: str, token: Callable[[], str], rec: Recorder, clock: Callable[[], float],
                 seed: int, options: ClientOptions, cid: CidSupport, phase: str = "",
                 on_fills: Callable[[str, list[tuple[int, ShownFill]]], None] | None = None,
                 on_cancel: Callable[[str, str, bool | None], None] | None = None) -> None:
        self.node = node
        self.url = url
        self.token = token
        self.rec = rec
        self.clock = clock
        self.rng = random.Random(seed)
        self.opt = options
        self.cid = cid
        self.on_fills = on_fills
        self.on_cancel = on_cancel
        self.resting: list[str] = []  # our GTC orders that rested when placed
        self.calls = 0
        self.failures = 0
        self._next_cid = 0
        self._cid_prefix = f"{node}-{phase}-" if phase else f"{node}-"  # a client per phase: cids never repeat

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        next_at = self.clock() + self.rng.random() / self.opt.rate  # clients do not start in step
        while not stop.is_set() and self.calls < self.opt.max_calls:
            wait = next_at - self.clock()
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    break
                except TimeoutError:
                    pass
            next_at = max(next_at + 1.0 / self.opt.rate, self.clock() - 1.0)
            self.calls += 1
            if self.resting and self.rng.random() < self.opt.cancel_share:
                ok = await self._cancel(session)
            else:
                ok = await self._order(session)
            self.failures = 0 if ok else self.failures + 1
            if self.failures:
                pause = min(0.05 * 2 ** min(self.failures, 6), MAX_BACKOFF_S) * (0.5 + self.rng.random())
                next_at = max(next_at, self.clock() + pause)

    # ---- calls ---------------------------------------------------------------------

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str,
                    body: dict[str, Any] | None) -> tuple[int, Any]:
        """(status, decoded JSON body); a 401 after a node restart (new cookie) is retried once."""
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self.token()}", "Accept": "application/json"}
            async with session.request(method, self.url + path, json=body, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if resp.status == 401 and attempt == 0:
                    continue
                return resp.status, data
        raise AssertionError("unreachable")

    def _order_body(self) -> dict[str, Any]:
        o = self.opt
        side = self.rng.choice(("buy", "sell"))
        sign = 1 if side == "buy" else -1
        qty = self.rng.randint(1, o.max_qty)
        roll = self.rng.random()
        if roll < o.market_share:
            return {"side": side, "qty": qty, "market": True}
        if roll < o.market_share + o.ioc_share:
            return {"side": side, "qty": qty, "price": max(1, o.mid + sign * self.rng.randint(0, o.spread)),
                    "tif": "IOC"}
        if self.rng.random() < o.cross_share:
            price = o.mid + sign * self.rng.randint(0, o.spread)
        else:
            price = o.mid - sign * self.rng.randint(1, o.depth)
        return {"side": side, "qty": qty, "price": max(1, price), "tif": "GTC"}

    async def _order(self, session: aiohttp.ClientSession) -> bool:
        body = self._order_body()
        self._next_cid += 1
        cid = f"{self._cid_prefix}{self._next_cid:06d}"
        t0 = self.clock()
        retries = 0
        error = "none"
        for attempt in range(1 + CID_RETRIES):
            send = dict(body)
            if self.cid.value is not False:
                send["cid"] = cid
            try:
                status, data = await self._call(session, "POST", "/v1/orders", send)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = _error_kind(exc)
                if self.cid.value is True and attempt < CID_RETRIES:
                    retries += 1
                    await asyncio.sleep(0.3 + self.rng.random() * 0.4)
                    continue
                break
            if status == 422 and isinstance(data, dict) and data.get("error") == "unknown_field" and "cid" in send:
                self.cid.value = False  # this node takes no client order ids: send without
                try:
                    status, data = await self._call(session, "POST", "/v1/orders", body)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    error = _error_kind(exc)
                    break
            elif "cid" in send and status == 201:
                self.cid.value = True
            return self._record_order(t0, body, send.get("cid"), status, data, retries)
        self.rec.acks.append(Ack(t0=round(t0, 3), t1=round(self.clock(), 3), node=self.node, op="order",
                                 cid=cid if self.cid.value is not False else None, side=body["side"], qty=body["qty"],
                                 price=body.get("price"), tif=body.get("tif", "IOC"), ok=False, error=error,
                                 retries=retries))
        return False

    def _record_order(self, t0: float, body: dict[str, Any], cid: Any, status: int, data: Any, retries: int) -> bool:
        t1 = self.clock()
        common: dict[str, Any] = {"t0": round(t0, 3), "t1": round(t1, 3), "node": self.node, "op": "order",
                                  "cid": cid if isinstance(cid, str) else None, "side": body["side"],
                                  "qty": body["qty"], "price": body.get("price"), "tif": body.get("tif", "IOC"),
                                  "retries": retries}
        # 201 placed; 200 is the answer to a retried cid: the order the first attempt placed
        if status not in (200, 201) or not isinstance(data, dict) or not isinstance(data.get("id"), str):
            code = data.get("error") if isinstance(data, dict) else None
            self.rec.acks.append(Ack(**common, ok=False, error=f"http {status} {code or ''}".strip()))
            return False
        final = data.get("final")
        fills = _fills(data.get("fills"))
        self.rec.acks.append(Ack(
            **common, order_id=data["id"], ok=True, status=str(data.get("status")),
            filled=int(data.get("filled", 0)), remaining=int(data.get("remaining", 0)),
            final=final if isinstance(final, bool) else None, fills=fills))
        if self.on_fills is not None and fills:
            seqs = [f.get("seq") for f in data["fills"] if isinstance(f, dict)]
            self.on_fills(self.node, [(s, f) for s, f in zip(seqs, fills, strict=True) if isinstance(s, int)])
        if body.get("tif") == "GTC" and int(data.get("remaining", 0)) > 0:
            self.resting.append(data["id"])
        return True

    async def _cancel(self, session: aiohttp.ClientSession) -> bool:
        oid = self.resting.pop(self.rng.randrange(len(self.resting)))
        t0 = self.clock()
        try:
            status, data = await self._call(session, "DELETE", f"/v1/orders/{oid}", None)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.rec.acks.append(Ack(t0=round(t0, 3), t1=round(self.clock(), 3), node=self.node, op="cancel",
                                     order_id=oid, ok=False, error=_error_kind(exc)))
            self.resting.append(oid)  # unknown outcome: it may still rest; try again later
            return False
        t1 = self.clock()
        if status != 200 or not isinstance(data, dict):
            code = data.get("error") if isinstance(data, dict) else None
            kind = str(code) if code in ("not_cancellable", "unknown_order") else f"http {status} {code or ''}".strip()
            self.rec.acks.append(Ack(t0=round(t0, 3), t1=round(t1, 3), node=self.node, op="cancel", order_id=oid,
                                     ok=False, error=kind))
            return code in ("not_cancellable", "unknown_order")
        final = data.get("final")
        self.rec.acks.append(Ack(
            t0=round(t0, 3), t1=round(t1, 3), node=self.node, op="cancel", order_id=oid, ok=True,
            status=str(data.get("status")), filled=int(data.get("filled", 0)),
            remaining=int(data.get("remaining", 0)), final=final if isinstance(final, bool) else None))
        if self.on_cancel is not None and data.get("status") == "cancelled":
            self.on_cancel(self.node, oid, final if isinstance(final, bool) else None)
        return True
