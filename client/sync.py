"""``SyncClient``: the client API for scripts that do not run an event loop.

Owns one private event loop (an ``asyncio.Runner``) on which it runs a
``Client``; every method is the ``Client`` method of the same name, run to
completion.  It cannot be used from inside a running event loop (use
``Client`` there).  Ctrl-C during a call cancels it and raises
KeyboardInterrupt.  Close it (``with SyncClient(...) as c:``) to close the
connections and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from client.aio import MAX_PAGE, Client, Token
from client.discovery import DEFAULT_URL, read_token, resolve_url
from client.models import Book, Event, Fill, FillsPage, Latency, OrderView, Peer, Status

T = TypeVar("T")


class SyncClient:
    """A blocking client of one node; arguments as for ``Client``."""

    def __init__(self, url: str = DEFAULT_URL, token: Token = None, **options: Any) -> None:
        self.client = Client(url, token, **options)
        self._runner = asyncio.Runner()

    @classmethod
    def from_data_dir(cls, data_dir: str | Path, *, url: str | None = None, token: str | None = None,
                      **options: Any) -> Self:
        """As ``Client.from_data_dir``: the node of ``data_dir``, its cookie's token."""
        return cls(resolve_url(url, data_dir), token or (lambda: read_token(data_dir)), **options)

    @property
    def url(self) -> str:
        return self.client.url

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        try:
            self._run(self.client.close())
        finally:
            self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- the API (see Client) -------------------------------------------------------

    def place(self, side: str, qty: int, price: int | None = None, *, tif: str = "GTC", market: bool = False,
              cid: str | None = None, wait_final: float | None = None) -> OrderView:
        return self._run(self.client.place(side, qty, price, tif=tif, market=market, cid=cid, wait_final=wait_final))

    def cancel(self, order_id: str, *, cid: str | None = None) -> OrderView:
        return self._run(self.client.cancel(order_id, cid=cid))

    def order(self, order_id: str) -> OrderView:
        return self._run(self.client.order(order_id))

    def book(self, depth: int = 10) -> Book:
        return self._run(self.client.book(depth))

    def fills_page(self, *, since: int = 0, limit: int = 100, final: bool = False) -> FillsPage:
        return self._run(self.client.fills_page(since=since, limit=limit, final=final))

    def fills(self, *, since: int = 0, final: bool = False, page: int = MAX_PAGE) -> Iterator[Fill]:
        return self._iterate(self.client.fills(since=since, final=final, page=page))

    def status(self, *, verify: bool = False) -> Status:
        return self._run(self.client.status(verify=verify))

    def peers(self) -> tuple[Peer, ...]:
        return self._run(self.client.peers())

    def latency(self) -> Latency:
        return self._run(self.client.latency())

    def ready(self, *, timeout: float | None = None) -> bool:
        return self._run(self.client.ready(timeout=timeout))

    def stream(self, *, heartbeat: float = 20.0) -> Iterator[Event]:
        """Events as they come.  Between two ``next()`` calls the loop does not
        run, so a reader that dawdles falls behind (the node then ends the
        stream with an ``error`` event)."""
        return self._iterate(self.client.stream(heartbeat=heartbeat))

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> list[T]:
            try:
                return [await anext(agen)]
            except StopAsyncIteration:
                return []

        async def close() -> None:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                got = self._run(step())
                if not got:
                    return
                yield got[0]
        finally:
            with contextlib.suppress(RuntimeError):  # the runner was closed already
                self._run(close())
