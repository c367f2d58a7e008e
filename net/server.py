"""The node's HTTP listener, with bounds on what connections may hold.

aiohttp alone closed none of 1,000 slowloris connections, kept an idle
connection for an hour, had no cap on connections (at the fd limit it logged
an ``accept()`` traceback per attempt) and no bound on request bodies being
received at once (50 slow 4 MiB bodies pinned 180 MB).  Here:

- a **connection cap**: at the cap, a new connection displaces the oldest
  one that is idle or still sending its request head; if every connection
  is busy with a request, the new one is closed at once;
- a **header timeout**: a request head must be complete within it, from its
  first byte;
- a **keep-alive timeout**: an idle connection is closed after it;
- a **body timeout** and a **receive budget**, applied where bodies are read
  (``net.wire.read_body``): a body must arrive within the timeout (408), and the
  bytes of all bodies being received at once stay under the budget (503
  ``busy`` with ``Retry-After``), held until the request is answered.

``GuardedSite`` puts a thin protocol in front of aiohttp's for each
connection: it sees connections open and close and bytes arrive, and
``guard_middleware`` tells it when a request is being handled.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from net.errors import ApiError

log = logging.getLogger("p2pex.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

IDLE, HEAD, BUSY = 0, 1, 2
SWEEP_EVERY_S = 0.25
FD_RESERVE = 128  # descriptors kept for the database, peers, the DHT and logs


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    max_connections: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 30.0
    max_receiving: int = 64 * 1024 * 1024  # bytes of request bodies being received at once


def fd_bounded(max_connections: int) -> int:
    """The connection cap, kept below the process's descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(8, min(max_connections, soft - FD_RESERVE))


class _Conn(asyncio.Protocol):
    """One connection: forwards everything to aiohttp's handler, tells the guard."""

    __slots__ = ("guard", "inner", "made", "since", "state", "transport")

    def __init__(self, guard: Guard, inner: RequestHandler) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.since = guard.clock()
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's does not subclass asyncio.Transport, but has its methods)
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if not self.guard.opened(self):
            transport.abort()
            return
        self.made = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.state == IDLE:
            self.state, self.since = HEAD, self.guard.clock()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.made:
            self.inner.eof_received()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.closed(self)
        if self.made:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ReceiveBudget:
    """Bytes of request bodies being received at once, across requests."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


class Guard:
    def __init__(self, limits: ConnectionLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.max_connections = fd_bounded(limits.max_connections)
        self.clock = clock
        self.budget = ReceiveBudget(limits.max_receiving)
        self.conns: dict[asyncio.BaseTransport, _Conn] = {}  # insertion order: oldest first
        self.counters = {"accepted": 0, "refused_at_cap": 0, "displaced_at_cap": 0, "header_timeouts": 0,
                         "idle_timeouts": 0}

    def wrap(self, inner: RequestHandler) -> _Conn:
        return _Conn(self, inner)

    def opened(self, conn: _Conn) -> bool:
        """Admit a new connection; at the cap, displace the oldest idle or
        half-sent one, or refuse this one when all are busy."""
        assert conn.transport is not None
        if len(self.conns) >= self.max_connections:
            victim = next((c for c in self.conns.values() if c.state != BUSY), None)
            if victim is None:
                self.counters["refused_at_cap"] += 1
                return False
            self.counters["displaced_at_cap"] += 1
            self._close(victim)
        self.conns[conn.transport] = conn
        self.counters["accepted"] += 1
        return True

    def closed(self, conn: _Conn) -> None:
        if conn.transport is not None:
            self.conns.pop(conn.transport, None)

    def _close(self, conn: _Conn) -> None:
        if conn.transport is not None:
            self.conns.pop(conn.transport, None)
            conn.transport.abort()

    def abort_all(self) -> int:
        """Cut every connection at once (a stop that ran out of time); how many."""
        conns = list(self.conns.values())
        for conn in conns:
            self._close(conn)
        return len(conns)

    def busy(self, transport: asyncio.BaseTransport | None) -> _Conn | None:
        conn = self.conns.get(transport) if transport is not None else None
        if conn is not None:
            conn.state, conn.since = BUSY, self.clock()
        return conn

    def idle(self, conn: _Conn) -> None:
        conn.state, conn.since = IDLE, self.clock()

    def sweep(self) -> None:
        """Close connections whose request head is too slow, or idle too long."""
        now = self.clock()
        head_deadline = now - self.limits.header_timeout
        idle_deadline = now - self.limits.keepalive_timeout
        for conn in list(self.conns.values()):
            if conn.state == HEAD and conn.since < head_deadline:
                self.counters["header_timeouts"] += 1
                self._close(conn)
            elif conn.state == IDLE and conn.since < idle_deadline:
                self.counters["idle_timeouts"] += 1
                self._close(conn)

    async def sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive any one connection
                log.exception("connection sweep failed")

    def taker(self, request: web.Request) -> Callable[[int], None]:
        """For ``read_capped``: takes each chunk from the receive budget (503
        busy when it is spent) and notes it on the request, which gives it
        back when it is answered (``guard_middleware``)."""

        def take(n: int) -> None:
            if not self.budget.take(n):
                raise ApiError("the node is receiving too much at once; retry shortly", code="busy", status=503,
                               retry_after=1)
            request[TAKEN] = request.get(TAKEN, 0) + n

        return take

    def view(self) -> dict[str, Any]:
        return {"open": len(self.conns), "max": self.max_connections, "receiving_bytes": self.budget.used,
                "busy_refusals": self.budget.refused, **self.counters}


GUARD: web.AppKey[Guard] = web.AppKey("guard")
TAKEN = "p2pex_budget_taken"  # bytes of the receive budget a request holds


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Marks the connection busy while a request is handled; returns what the
    request took from the receive budget when it is answered."""
    guard = request.app[GUARD]
    conn = guard.busy(request.transport)
    try:
        return await handler(request)
    finally:
        guard.budget.give(request.get(TAKEN, 0))
        if conn is not None:
            guard.idle(conn)


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a ``Guard``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: Guard, *, backlog: int = 512) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> _Conn:
            return guard.wrap(server())

        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True)


def handler_args(limits: ConnectionLimits) -> dict[str, Any]:
    """aiohttp's own limits for each connection."""
    return {"keepalive_timeout": limits.keepalive_timeout, "max_line_size": 8190, "max_field_size": 8190,
            "max_headers": 64, "lingering_time": 2.0}

