"""A trading loop against one node's client API, and the trader process.

``trade()`` submits random orders around a mid price through a node's client
API (with ``client.Client``, the one client library): GTC limit orders, a
share of them priced to cross the book, some IOC and market orders, and
cancels of its own resting orders.  It is paced at ``rate`` orders per second,
every call runs under a timeout, an order or cancel that timed out is sent
again with the same client id (``cid``, so it is placed once), failures
back off, and it ends after
``seconds``, ``max_orders`` or when ``stop`` is set, returning ``TradeStats``.

``wait_ready()`` polls ``/readyz`` with bounded exponential backoff, so a
trader that starts before its node never spins on refused connections.
``run_trader()`` is the ``cli.py trade`` process: optionally the node itself as
a child process (a trader is a node: only an order's origin may cancel it),
then readiness, then the loop; it stops both cleanly on ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from client import Client, ClientError

log = logging.getLogger("p2pex.trader")

READY_POLL_MAX_S = 2.0
WRITE_ATTEMPTS = 3  # an order or cancel that timed out is sent again, with the same cid
RETRY_PAUSE_S = 0.1  # before the first retry; doubling
REPORT_EVERY_S = 30.0
ERROR_BACKOFF_MAX_S = 2.0
NODE_STOP_GRACE_S = 10.0


class TraderError(Exception):
    """The trader cannot go on (node not ready in time, wrong token, seed node, node died)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TradeStats:
    submitted: int = 0  # orders the node accepted
    gtc: int = 0  # of which GTC limit orders
    ioc: int = 0  # of which IOC limit orders
    market: int = 0  # of which market orders
    filled_orders: int = 0  # accepted orders that traded on arrival (in full or in part)
    filled_qty: int = 0  # lots they traded on arrival
    cancels: int = 0  # cancels the node accepted
    cancel_misses: int = 0  # cancels refused because the order had filled or closed meanwhile
    errors: int = 0  # failed calls: timeouts, refused connections, HTTP errors
    seconds: float = 0.0  # time spent trading

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Counts:
    """Mutable tallies behind the frozen TradeStats."""

    def __init__(self) -> None:
        self.values = dict.fromkeys((f.name for f in fields(TradeStats) if f.name != "seconds"), 0)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] += n

    def freeze(self, seconds: float) -> TradeStats:
        return TradeStats(**self.values, seconds=round(seconds, 3))


async def _sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep, waking early when ``stop`` is set; True when stopped."""
    if stop is None:
        await asyncio.sleep(max(0.0, seconds))
        return False
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    return stop.is_set()


async def wait_ready(url: str, *, timeout: float, stop: asyncio.Event | None = None) -> bool:
    """Poll ``url/readyz`` until the node is ready (True) or ``stop`` is set (False).

    Backs off exponentially with jitter up to 2 s between polls; raises
    TraderError once ``timeout`` seconds pass without a ready answer.
    """
    url = url.rstrip("/")
    deadline = time.monotonic() + timeout
    delay = 0.1
    last = "no answer yet"
    rng = random.Random()
    async with Client(url, read_attempts=1) as client:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TraderError(f"node at {url} not ready after {timeout:g} s ({last})")
            try:
                if await client.ready(timeout=min(2.0, left)):
                    return True
                last = "HTTP 503 not_ready"
            except ClientError as exc:
                last = str(exc)
            pause = min(delay * (0.5 + rng.random()), max(0.0, deadline - time.monotonic()))
            if await _sleep_or_stop(pause, stop):
                return False
            delay = min(delay * 2, READY_POLL_MAX_S)


async def trade(
    url: str,
    token: str,
    *,
    rate: float,
    seconds: float | None,
    seed: int,
    mid: int,
    spread: int = 5,
    depth: int = 20,
    max_qty: int = 10,
    cross_share: float = 0.3,
    ioc_share: float = 0.1,
    market_share: float = 0.05,
    cancel_share: float = 0.25,
    max_resting: int = 50,
    timeout: float = 3.0,
    max_orders: int | None = None,
    stop: asyncio.Event | None = None,
) -> TradeStats:
    """Trade against the node at ``url`` until ``seconds`` pass, ``max_orders``
    are sent or ``stop`` is set (``seconds=None``: no time limit).

    Each step submits one order: a market order (``market_share``), an IOC
    limit order priced to cross (``ioc_share``), else a GTC limit order that
    crosses the mid by up to ``spread`` ticks (``cross_share``) or rests up to
    ``depth`` ticks away from it.  After a step, with probability
    ``cancel_share`` (always once more than ``max_resting`` of its orders may
    rest), it cancels one of its own resting orders, oldest first when over
    the cap.  Raises TraderError for a wrong token or a seed node.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if mid < 1 or spread < 0 or depth < 1 or max_qty < 1:
        raise ValueError("mid, depth and max_qty must be positive, spread not negative")
    rng = random.Random(seed)
    counts = _Counts()
    resting: list[str] = []  # ids of our GTC orders that rested on arrival
    start = time.monotonic()
    deadline = None if seconds is None else start + seconds
    sent = 0
    failures = 0  # consecutive failed calls, for the backoff
    paced_from, paced_n = start, 0
    next_report = start + REPORT_EVERY_S

    def done() -> bool:
        return ((stop is not None and stop.is_set())
                or (deadline is not None and time.monotonic() >= deadline)
                or (max_orders is not None and sent >= max_orders))

    def pick() -> tuple[str, str, int, int | None]:
        """The next order: its kind (gtc, ioc, market), side, qty and price (None: market)."""
        side = rng.choice(("buy", "sell"))
        sign = 1 if side == "buy" else -1
        qty = rng.randint(1, max_qty)
        roll = rng.random()
        if roll < market_share:
            return "market", side, qty, None
        if roll < market_share + ioc_share:
            return "ioc", side, qty, max(1, mid + sign * rng.randint(0, spread))
        if rng.random() < cross_share:
            price = mid + sign * rng.randint(0, spread)
        else:
            price = mid - sign * rng.randint(1, depth)
        return "gtc", side, qty, max(1, price)

    async def failed(exc: ClientError) -> bool:
        """Count and log a failed call, back off; True when trading should stop."""
        nonlocal failures
        counts.add("errors")
        if exc.status == 401:
            raise TraderError(f"the node at {url} refused the API token ({exc})")
        if exc.code == "seed_node":
            raise TraderError(f"the node at {url} is a seed node and takes no orders")
        failures += 1
        if failures in (1, 10) or failures % 100 == 0:
            log.warning("call to %s failed (%d in a row): %s", url, failures, exc)
        pause = min(0.05 * 2 ** min(failures, 10), ERROR_BACKOFF_MAX_S) * (0.5 + rng.random())
        return await _sleep_or_stop(pause, stop)

    # every order and cancel carries a fresh cid: the client sends it again after a
    # timeout or a lost connection, and the node carries it out at most once
    async with Client(url, token, timeout=timeout, write_attempts=WRITE_ATTEMPTS, retry_pause=RETRY_PAUSE_S,
                      connections=4) as client:
        while not done():
            # pace: the n-th order goes out at paced_from + n / rate; never burst to catch up
            due = paced_from + paced_n / rate
            now = time.monotonic()
            if due - now > 0:
                wait = due - now if deadline is None else min(due - now, deadline - now)
                if await _sleep_or_stop(wait, stop) or done():
                    break
            elif now - due > 1.0:
                paced_from, paced_n = now, 0
            paced_n += 1
            if now >= next_report:
                next_report = now + REPORT_EVERY_S
                log.info("trading: %s", counts.freeze(now - start).as_dict())
            kind, side, qty, price = pick()
            sent += 1
            try:
                out = await client.place(side, qty, price, tif="IOC" if kind == "ioc" else "GTC",
                                         market=kind == "market", cid=secrets.token_urlsafe(12))
            except ClientError as exc:
                if await failed(exc):
                    break
                continue
            failures = 0
            counts.add("submitted")
            counts.add(kind)
            if out.filled:
                counts.add("filled_orders")
                counts.add("filled_qty", out.filled)
            if kind == "gtc" and out.remaining:
                resting.append(out.id)
            if resting and (len(resting) > max_resting or rng.random() < cancel_share):
                oid = resting.pop(0 if len(resting) > max_resting else rng.randrange(len(resting)))
                try:
                    await client.cancel(oid, cid=secrets.token_urlsafe(12))
                    counts.add("cancels")
                except ClientError as exc:
                    if exc.code in ("not_cancellable", "unknown_order"):
                        counts.add("cancel_misses")
                    elif await failed(exc):
                        break
    return counts.freeze(time.monotonic() - start)


class NodeChild:
    """``cli.py node`` as a child process of the trader, sharing its stdout/stderr."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=subprocess.DEVNULL)
        log.info("started the node (pid %d): %s", self.proc.pid, " ".join(self.argv))

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, grace: float = NODE_STOP_GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.warning("the node (pid %d) ignored SIGTERM for %g s; killing it", proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return proc.returncode


async def run_trader(
    url: str,
    read_token: Callable[[], str],
    *,
    stop: asyncio.Event,
    node_argv: Sequence[str] | None = None,
    wait_ready_s: float,
    on_done: Callable[[TradeStats], None] | None = None,
    **trade_options: Any,
) -> TradeStats | None:
    """The trader process: [start the node,] wait for /readyz, read the token, trade.

    With ``node_argv`` the node runs as a child for as long as this runs: when
    trading ends (``seconds`` elapsed) it keeps serving as a replica until
    ``stop``; on ``stop`` the loop ends and the node gets SIGTERM.  If the
    node exits on its own, so does the trader (TraderError unless the node
    exited with status 0).  Returns the stats, or None when stopped before
    the node was ready.
    """
    child = NodeChild(node_argv) if node_argv is not None else None
    watcher: asyncio.Task[int] | None = None
    died = False

    def node_exited(task: asyncio.Task[int]) -> None:
        nonlocal died
        if stop.is_set():
            return
        status = None if task.cancelled() or task.exception() else task.result()
        if status == 0:  # the node was told to stop (e.g. Ctrl-C reached it first): so do we
            log.info("the node stopped; stopping")
        else:
            died = True
        stop.set()

    try:
        if child is not None:
            await child.start()
            watcher = asyncio.create_task(child.wait(), name="node-child")
            watcher.add_done_callback(node_exited)
        if not await wait_ready(url, timeout=wait_ready_s, stop=stop):
            if died:
                raise TraderError(f"the node exited before it was ready (status {child_status(child)})")
            return None
        log.info("node at %s is ready; trading", url)
        stats = await trade(url, read_token(), stop=stop, **trade_options)
        if on_done is not None:
            on_done(stats)
        if child is not None and not stop.is_set():
            log.info("trading done; the node keeps serving until SIGTERM")
            await stop.wait()
        if died:
            raise TraderError(f"the node exited unexpectedly (status {child_status(child)})")
        return stats
    finally:
        if watcher is not None:
            watcher.remove_done_callback(node_exited)
        if child is not None:
            status = await child.stop()
            if not died:
                log.info("node stopped (status %s)", status)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


def child_status(child: NodeChild | None) -> int | None:
    return None if child is None or child.proc is None else child.proc.returncode
