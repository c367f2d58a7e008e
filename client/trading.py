"""``TradingSession``: orders and cancels over one WebSocket (``GET /v1/trade``).

Owns the client side of a trading session: the connection (bearer token on
the upgrade), a reference per message, the task that reads answers and hands
each to the call that waits for it, a timeout per call, and turning a
refusal into the same ``ClientError`` an HTTP call raises.

A session costs the node a fraction of what one HTTP request per order does,
so a program that sends many orders should use one.  Calls are not retried:
after a network failure or a timeout, whether the order was placed is
unknown unless it carried a ``cid`` (send it again, on this or another
session, or over HTTP: the node places a cid once).

    async with Client.from_data_dir("data/node") as node:
        async with await node.trading() as session:
            orders = await asyncio.gather(*(session.place("buy", 1, 100 - i) for i in range(100)))
"""

from __future__ import annotations

import asyncio
import json
from types import TracebackType
from typing import Any, Self

import aiohttp

from client.errors import BAD_REPLY, DISCONNECTED, TIMEOUT, ClientError
from client.models import OrderView, parse

Answer = dict[str, Any]


class TradingSession:
    """One open ``/v1/trade`` connection; make it with ``Client.trading()``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._ws = ws
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self._closed: ClientError | None = None
        self._reader = asyncio.create_task(self._read())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def place(self, side: str, qty: int, price: int | None = None, *, tif: str = "GTC",
                    market: bool = False, cid: str | None = None) -> OrderView:
        """As ``Client.place`` (without ``wait_final``), over the session."""
        market = market or price is None
        if market and price is not None:
            raise ValueError("a market order has no price")
        msg: dict[str, Any] = {"op": "place", "side": side, "qty": qty}
        if cid is not None:
            msg["cid"] = cid
        if market:
            msg["market"] = True
        else:
            msg["price"] = price
            msg["tif"] = tif
        return await self._ask(msg)

    async def cancel(self, order_id: str, *, cid: str | None = None) -> OrderView:
        """As ``Client.cancel``, over the session."""
        msg: dict[str, Any] = {"op": "cancel", "id": order_id}
        if cid is not None:
            msg["cid"] = cid
        return await self._ask(msg)

    async def _ask(self, msg: dict[str, Any]) -> OrderView:
        if self._closed is not None:
            raise self._closed
        self._next += 1
        ref = msg["ref"] = self._next
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[ref] = answer
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    try:
                        await self._ws.send_str(json.dumps(msg))
                    except (aiohttp.ClientError, ConnectionResetError, RuntimeError) as exc:
                        raise ClientError(DISCONNECTED, f"{self.url}: the session broke: {exc}") from None
                    data = await asyncio.shield(answer)
            except TimeoutError:
                raise ClientError(TIMEOUT, f"{self.url}: no answer within {self.timeout:g} s") from None
        finally:
            self._waiting.pop(ref, None)
        status = data.get("status")
        if type(status) is not int:
            raise ClientError(BAD_REPLY, f"{self.url} answered without a status: {str(data)[:200]}")
        if status >= 400:
            retry = data.get("retry_after")
            raise ClientError.from_reply(status, data, url=self.url,
                                         retry_after=float(retry) if isinstance(retry, int | float) else None)
        return parse(OrderView.from_json, data.get("order"), f"{msg['op']} over {self.url}")

    async def _read(self) -> None:
        """Hand each answer to the call waiting for it; when the connection
        ends, every call still waiting fails with ``disconnected``."""
        reason = "the node closed the session"
        try:
            async for msg in self._ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    reason = "the node sent a message that is not JSON"
                    break
                ref = data.get("ref") if isinstance(data, dict) else None
                answer = self._waiting.get(ref) if type(ref) is int else None
                if answer is not None and not answer.done():
                    answer.set_result(data)
        except (aiohttp.ClientError, OSError) as exc:
            reason = f"the session broke: {exc}"
        finally:
            self._closed = ClientError(DISCONNECTED, f"{self.url}: {reason}")
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(self._closed)
        await self._ws.close()  # after a message it cannot read, the session is over
