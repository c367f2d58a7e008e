"""``Client``: the asyncio client of a node's client API, over aiohttp.

Owns every HTTP and WebSocket call a program makes to a node: the routes and
their query parameters, the bearer token on writes, a timeout on every call,
retries, decoding replies into ``client.models`` and failures into one
``ClientError``.

Retries (tenacity): a read (GET) is sent up to ``read_attempts`` times after
a network failure, a timeout or a 429/503, with a short exponential backoff
(``retry_pause``, doubling, at most 1 s) or the node's ``Retry-After`` (at
most ``retry_after_max``).  A write (place, cancel) is sent once unless it
carries a client id (``cid``): the node places or cancels a repeated cid
only once and answers ``200`` with ``"repeat": true``, so a write with a
cid is sent up to ``write_attempts`` times on the same conditions.

Use it as ``async with Client(url, token) as c: ...`` (or call ``close()``);
the aiohttp session is made on first use, in the running event loop.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import yarl
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from client.discovery import DEFAULT_URL, read_token, resolve_url
from client.errors import (
    BAD_REPLY,
    BAD_URL,
    DISCONNECTED,
    NO_TOKEN,
    TIMEOUT,
    UNREACHABLE,
    ClientError,
)
from client.models import Book, Event, Fill, FillsPage, Latency, OrderView, Peer, Status, parse
from client.trading import TradingSession

#: Fills per page of ``GET /v1/fills``: the node's cap.
MAX_PAGE = 1000
#: The longest ``wait_final`` the node accepts, in seconds.
MAX_WAIT_FINAL_S = 60.0
MAX_PAUSE_S = 1.0

Token = str | Callable[[], str] | None


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and exc.retryable


class Client:
    """An asyncio client of one node.  ``token`` is the API token, or a
    function that returns it (read when a write needs it), or None for a
    client that only reads.  ``timeout`` bounds each attempt of each call,
    in seconds."""

    def __init__(self, url: str = DEFAULT_URL, token: Token = None, *, timeout: float = 5.0,
                 read_attempts: int = 3, write_attempts: int = 4, retry_pause: float = 0.2,
                 retry_after_max: float = 2.0, connections: int = 8) -> None:
        if timeout <= 0 or read_attempts < 1 or write_attempts < 1 or retry_pause < 0 or connections < 1:
            raise ValueError("timeout and connections must be positive, attempts at least 1")
        self.url = url.rstrip("/")
        try:
            parsed = yarl.URL(self.url)
        except ValueError as exc:
            raise ClientError(BAD_URL, str(exc)) from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ClientError(BAD_URL, "expected http://HOST:PORT")
        self.timeout = timeout
        self.read_attempts = read_attempts
        self.write_attempts = write_attempts
        self.retry_pause = retry_pause
        self.retry_after_max = retry_after_max
        self.connections = connections
        #: Requests sent again after a failure, over this client's life.
        self.retries = 0
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_data_dir(cls, data_dir: str | Path, *, url: str | None = None, token: str | None = None,
                      **options: Any) -> Self:
        """A client of the node whose data dir is ``data_dir``: its URL from the
        ``endpoint`` file (unless ``url``), its token from ``.cookie``, read
        when a write needs it (unless ``token``), so a node restart, which
        rewrites the cookie, needs no new client."""
        return cls(resolve_url(url, data_dir), token or (lambda: read_token(data_dir)), **options)

    # ---- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout))
        return self._session

    def token(self) -> str:
        """The API token (ClientError ``no_token`` when there is none)."""
        if self._token is None:
            raise ClientError(NO_TOKEN, "this client has no API token")
        return self._token if isinstance(self._token, str) else self._token()

    # ---- the API --------------------------------------------------------------------

    async def place(self, side: str, qty: int, price: int | None = None, *, tif: str = "GTC",
                    market: bool = False, cid: str | None = None, wait_final: float | None = None) -> OrderView:
        """Place an order: a limit order at ``price`` (``tif`` GTC or IOC), or a
        market order (``market=True``, or no price).  ``cid`` makes the call
        safe to retry (and retried).  ``wait_final``: seconds the node waits
        for the outcome to be final before it answers (at most 60); the reply
        says ``final`` and, if it was not final in time, ``detail``."""
        market = market or price is None
        if market and price is not None:
            raise ValueError("a market order has no price")
        body: dict[str, Any] = {"side": side, "qty": qty}
        if cid is not None:
            body["cid"] = cid
        if market:
            body["market"] = True
        else:
            body["price"] = price
            body["tif"] = tif
        params: dict[str, str] = {}
        timeout = self.timeout
        if wait_final is not None:
            params = {"wait": "final", "timeout": f"{wait_final:g}"}
            timeout = max(timeout, wait_final + 5)
        data = await self._call("POST", "/v1/orders", params=params, body=body, auth=True,
                                retry=cid is not None, timeout=timeout)
        return parse(OrderView.from_json, data, "POST /v1/orders")

    async def cancel(self, order_id: str, *, cid: str | None = None) -> OrderView:
        """Cancel one of this node's resting orders; the order as it stands after."""
        data = await self._call("DELETE", f"/v1/orders/{_quote(order_id)}", params={"cid": cid} if cid else None,
                                auth=True, retry=cid is not None)
        return parse(OrderView.from_json, data, "DELETE /v1/orders")

    async def order(self, order_id: str) -> OrderView:
        """An order by id (ClientError 404 ``unknown_order`` if the node has none)."""
        data = await self._call("GET", f"/v1/orders/{_quote(order_id)}")
        return parse(OrderView.from_json, data, "GET /v1/orders")

    async def book(self, depth: int = 10) -> Book:
        """The best ``depth`` price levels on each side."""
        return parse(Book.from_json, await self._call("GET", "/v1/book", params={"depth": str(depth)}), "GET /v1/book")

    async def fills_page(self, *, since: int = 0, limit: int = 100, final: bool = False) -> FillsPage:
        """One page of fills from ``since`` (final ones first, then provisional
        ones; ``final=True``: final ones only)."""
        params = {"since": str(since), "limit": str(limit)}
        if final:
            params["final"] = "true"
        return parse(FillsPage.from_json, await self._call("GET", "/v1/fills", params=params), "GET /v1/fills")

    async def fills(self, *, since: int = 0, final: bool = False, page: int = MAX_PAGE) -> AsyncIterator[Fill]:
        """Every fill from ``since`` on, fetched ``page`` at a time (at most
        1000), following each page's ``next``; ends at the last fill."""
        if not 1 <= page <= MAX_PAGE:
            raise ValueError(f"page must be in [1, {MAX_PAGE}]")
        cursor = since
        while True:
            p = await self.fills_page(since=cursor, limit=page, final=final)
            for f in p.fills:
                yield f
            if not p.fills or p.next >= p.total:
                return
            cursor = p.next

    async def status(self, *, verify: bool = False) -> Status:
        """The node's status; ``verify`` adds ``book_hash`` (a pass over every fill and order)."""
        data = await self._call("GET", "/v1/status", params={"verify": "1"} if verify else None)
        return parse(Status.from_json, data, "GET /v1/status")

    async def peers(self) -> tuple[Peer, ...]:
        """The node's peers, with their state, rtt and clock offset."""
        return (await self.status()).peers

    async def latency(self) -> Latency:
        return parse(Latency.from_json, await self._call("GET", "/v1/latency"), "GET /v1/latency")

    async def ready(self, *, timeout: float | None = None) -> bool:
        """``/readyz``: True once the node takes orders, False while it answers
        503 ``not_ready``; one attempt (callers poll)."""
        try:
            await self._call("GET", "/readyz", attempts=1, timeout=timeout)
        except ClientError as exc:
            if exc.status == 503 and exc.code == "not_ready":
                return False
            raise
        return True

    async def trading(self, *, heartbeat: float = 20.0) -> TradingSession:
        """A trading session (WebSocket ``/v1/trade``): orders and cancels as
        messages on one connection, far cheaper for the node than a request
        each.  Use it as ``async with await client.trading() as s: ...``;
        each of its calls is under this client's timeout and never retried."""
        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/trade"
        try:
            ws = await asyncio.wait_for(self._get_session().ws_connect(
                ws_url, heartbeat=heartbeat, headers={"Authorization": f"Bearer {self.token()}"}), self.timeout)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise ClientError.from_reply(401, {"error": "unauthorized", "detail": f"{ws_url} refused the "
                                                   "session: missing or wrong API token"}, url=ws_url) from None
            raise ClientError.from_reply(exc.status, None, url=ws_url) from None  # 429 or 503: retryable
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _network_error(exc, self.timeout) from None
        return TradingSession(ws, self.url, self.timeout)

    async def stream(self, *, heartbeat: float = 20.0) -> AsyncIterator[Event]:
        """The node's events (WebSocket ``/v1/stream``) as they happen: hello
        first, then fill, revoked, final, order and book events.  An ``error``
        event (``too_slow``: this reader fell behind) is the last one.  Ends
        when the node closes the stream.  Only connecting is under the timeout."""
        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/stream"
        try:
            ws = await asyncio.wait_for(self._get_session().ws_connect(ws_url, heartbeat=heartbeat), self.timeout)
        except aiohttp.WSServerHandshakeError as exc:
            raise ClientError(BAD_REPLY, f"{ws_url} refused the WebSocket handshake: {exc.message}",
                              exc.status) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _network_error(exc, self.timeout) from None
        async with ws:
            while True:
                try:
                    msg = await ws.receive()
                except (aiohttp.ClientError, OSError) as exc:
                    raise _network_error(exc, self.timeout) from None
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    raise ClientError(BAD_REPLY, f"{ws_url} sent a message that is not JSON") from None
                yield parse(Event.from_json, data, "stream event")

    # ---- requests ---------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None,
                    auth: bool = False, retry: bool = True, attempts: int | None = None,
                    timeout: float | None = None) -> Any:
        """One call: a GET is retried (``read_attempts``); a write only with
        ``retry`` (it carries a cid), up to ``write_attempts``."""
        if attempts is None:
            attempts = self.read_attempts if method == "GET" else (self.write_attempts if retry else 1)
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        seconds = self.timeout if timeout is None else timeout
        if attempts == 1:
            return await self._once(method, path, params, body, headers, seconds)
        data: Any = None
        async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts), wait=self._pause,
                                           retry=retry_if_exception(_retryable), before_sleep=self._count,
                                           reraise=True):
            with attempt:
                data = await self._once(method, path, params, body, headers, seconds)
        return data

    def _pause(self, state: RetryCallState) -> float:
        """The node's Retry-After when it sent one, else exponential backoff."""
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, ClientError) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry_after_max)
        return float(min(self.retry_pause * 2 ** (state.attempt_number - 1), MAX_PAUSE_S))

    def _count(self, state: RetryCallState) -> None:
        self.retries += 1

    async def _once(self, method: str, path: str, params: dict[str, str] | None, body: Any,
                    headers: dict[str, str], timeout: float) -> Any:
        url = self.url + path
        try:
            async with self._get_session().request(
                    method, url, params=params, json=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                raw = await resp.read()
                status = resp.status
                after = resp.headers.get("Retry-After", "")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _network_error(exc, timeout) from None
        try:
            data = json.loads(raw or b"null")
        except ValueError:
            if status >= 400:
                raise ClientError.from_reply(status, None, url=url, retry_after=_seconds(after)) from None
            raise ClientError(BAD_REPLY, f"{url} did not answer with JSON: is {self.url} a p2pex node?",
                              status) from None
        if status >= 400:
            raise ClientError.from_reply(status, data, url=url, retry_after=_seconds(after))
        return data


def _quote(order_id: str) -> str:
    return urllib.parse.quote(order_id, safe="")


def _seconds(header: str) -> float | None:
    return float(header) if header.isdigit() else None


def _network_error(exc: BaseException, timeout: float) -> ClientError:
    """A failure of the connection as a ClientError without a status."""
    if isinstance(exc, TimeoutError):
        return ClientError(TIMEOUT, f"timed out after {timeout:g} s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ClientError(UNREACHABLE, str(exc.os_error) or type(exc.os_error).__name__)
    if isinstance(exc, aiohttp.InvalidURL):
        return ClientError(BAD_URL, str(exc))
    return ClientError(DISCONNECTED, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
