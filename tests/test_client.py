"""The client library (client/) against real node processes on 127.0.0.1.

Two meshed nodes (``pair``) serve the API tests: placing, cancelling and
reading orders, the book, fills page by page, status, latency, the event
stream and the error codes.  A node of its own (``solo``) is frozen with
SIGSTOP to show that a GET is retried and a write without a cid is not, and
one with tiny rate limits (``limited``) answers 429 with Retry-After.
Nothing mocks the network.  Each test keeps to its own price band and
cancels what it leaves resting, so tests never trade with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, ClientError, Event, Fill, Level, SyncClient
from tests.nodes import (
    NodeProc,
    free_port,
    logs_on_failure,
    make_nodes,
    start_network,
    stop_all,
    wait_converged,
    wait_order_everywhere,
    wait_until,
)

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_client")

THAW_AFTER_S = 1.5  # a frozen node is let go this long after the call starts
CALL_TIMEOUT_S = 1.0  # and the client gives up on each attempt after this


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    nodes = make_nodes(tmp_path_factory.mktemp("client"), ("a", "b"))
    try:
        start_network(nodes)
        yield nodes
    finally:
        stop_all(nodes)


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = NodeProc(name="solo", port=free_port(), data_dir=tmp_path_factory.mktemp("client-solo") / "solo")
    try:
        yield n.start()
    finally:
        stop_all([n])


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """A node that allows one read a second per address and one write a second."""
    n = NodeProc(name="limited", port=free_port(), data_dir=tmp_path_factory.mktemp("client-lim") / "limited",
                 extra_args=["--read-limit", "1/1", "--write-limit", "1/1"])
    try:
        yield n.start()
    finally:
        stop_all([n])


@pytest.fixture(autouse=True)
def _node_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    nodes = [request.getfixturevalue(name) for name in ("pair", "solo", "limited") if name in request.fixturenames]
    flat = [n for x in nodes for n in (x if isinstance(x, list) else [x])]
    with logs_on_failure(request, flat):
        yield


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def own_orders(n: NodeProc) -> int:
    return int(n.status()["counts"]["own_orders"])


async def cancel_quietly(c: Client, *ids: str) -> None:
    """Cancel what a test left resting (an order that filled meanwhile is fine)."""
    for oid in ids:
        try:
            await c.cancel(oid)
        except ClientError as exc:
            if exc.code != "not_cancellable":
                raise


async def until_known(c: Client, oid: str) -> None:
    """Wait (bounded) until the client's node knows order ``oid``."""
    for _ in range(600):
        try:
            await c.order(oid)
            return
        except ClientError as exc:
            if exc.code != "unknown_order":
                raise
        await asyncio.sleep(0.02)
    raise AssertionError(f"order {oid[:16]} never reached {c.url}")


class TestOrders:
    async def test_place_read_and_cancel(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        async with Client.from_data_dir(a.data_dir) as c:
            placed = await c.place("buy", 3, 201)
            assert (placed.status, placed.side, placed.price, placed.qty) == ("open", "buy", 201, 3)
            assert (placed.filled, placed.remaining, placed.fills) == (0, 3, ())
            assert (placed.tif, placed.market, placed.repeat) == ("GTC", False, False)
            assert placed.owner == a.node_id() and len(placed.id) == 64
            assert placed.raw["id"] == placed.id  # the node's reply, as it said it

            shown = await c.order(placed.id)
            assert (shown.id, shown.status, shown.price, shown.qty, shown.remaining) == \
                   (placed.id, "open", 201, 3, 3)

            cancelled = await c.cancel(placed.id)
            assert (cancelled.id, cancelled.status, cancelled.remaining) == (placed.id, "cancelled", 0)
            assert (await c.order(placed.id)).status == "cancelled"

    async def test_crossing_orders_fill_and_wait_final(self, pair: list[NodeProc]) -> None:
        a, b = pair
        async with Client.from_data_dir(a.data_dir) as ca, Client.from_data_dir(b.data_dir) as cb:
            maker = await ca.place("sell", 2, 300)
            await until_known(cb, maker.id)
            taker = await cb.place("buy", 2, 300, wait_final=20)
            assert taker.final and taker.status == "filled" and taker.detail is None
            assert len(taker.fills) == 1
            fill = taker.fills[0]
            assert isinstance(fill, Fill)
            assert (fill.taker, fill.maker, fill.price, fill.qty, fill.final) == (taker.id, maker.id, 300, 2, True)
            assert fill.taker_side == "buy" and isinstance(fill.seq, int)

    async def test_market_and_ioc_orders(self, pair: list[NodeProc]) -> None:
        a, b = pair
        async with Client.from_data_dir(a.data_dir) as ca, Client.from_data_dir(b.data_dir) as cb:
            bid = await ca.place("buy", 4, 310)
            await until_known(cb, bid.id)
            ioc = await cb.place("sell", 1, 310, tif="IOC")
            assert (ioc.tif, ioc.status, ioc.filled) == ("IOC", "filled", 1)
            market = await cb.place("sell", 3, market=True)
            assert market.market and market.tif == "IOC" and market.filled == 3
            assert sum(f.qty for f in market.fills) == 3
            with pytest.raises(ValueError):
                await cb.place("sell", 1, 310, market=True)
            await cancel_quietly(ca, bid.id)

    async def test_a_repeated_cid_places_and_cancels_once(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        before = own_orders(a)
        async with Client.from_data_dir(a.data_dir) as c:
            first = await c.place("buy", 1, 202, cid="client-test-1")
            again = await c.place("buy", 1, 202, cid="client-test-1")
            assert (first.repeat, again.repeat) == (False, True)
            assert again.id == first.id and again.cid == "client-test-1"
            assert own_orders(a) == before + 1
            done = await c.cancel(first.id, cid="client-cancel-1")
            repeat = await c.cancel(first.id, cid="client-cancel-1")
            assert done.status == repeat.status == "cancelled" and repeat.repeat


class TestReads:
    async def test_book_levels(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        async with Client.from_data_dir(a.data_dir) as c:
            ids = [(await c.place("buy", q, 401)).id for q in (4, 6)]
            ids.append((await c.place("sell", 7, 450)).id)
            book = await c.book(depth=1000)
            assert Level(price=401, qty=10, orders=2) in book.bids
            assert Level(price=450, qty=7, orders=1) in book.asks
            assert [lv.price for lv in book.bids] == sorted((lv.price for lv in book.bids), reverse=True)
            assert [lv.price for lv in book.asks] == sorted(lv.price for lv in book.asks)
            assert isinstance(book.state_hash, str) and book.raw["bids"]
            assert len((await c.book(depth=1)).bids) == 1
            await cancel_quietly(c, *ids)

    def test_fills_page_by_page(self, pair: list[NodeProc]) -> None:
        """Seven fills read 2 and 3 at a time follow ``next`` to the end and
        equal what the node serves in one page."""
        a, b = pair
        with SyncClient.from_data_dir(a.data_dir) as ca, SyncClient.from_data_dir(b.data_dir) as cb:
            wait_converged(pair)
            start = ca.fills_page(limit=1).total
            makers = [ca.place("sell", 1, 500).id for _ in range(7)]
            for oid in makers:
                wait_order_everywhere(pair, oid)
            taker = cb.place("buy", 7, 500, wait_final=20)
            assert taker.filled == 7 and len(taker.fills) == 7
            wait_converged(pair)

            page = ca.fills_page(since=start, limit=2)
            assert (len(page.fills), page.next) == (2, start + 2) and page.total == start + 7
            got = list(ca.fills(since=start, page=2))
            assert [f.seq for f in got] == list(range(start, start + 7))
            assert {f.maker for f in got} == set(makers) and {f.taker for f in got} == {taker.id}
            assert all(f.final and f.price == 500 and f.qty == 1 for f in got)
            served = [Fill.from_json(f) for f in a.get(f"/v1/fills?since={start}&limit=1000")["fills"]]
            assert got == served
            assert list(ca.fills(since=start, final=True, page=3)) == got
            everything = list(ca.fills())
            assert everything[start:] == got and len(everything) == start + 7
            with pytest.raises(ValueError):
                list(ca.fills(page=1001))

    async def test_status_peers_and_latency(self, pair: list[NodeProc]) -> None:
        a, b = pair
        async with Client(a.url) as c:  # reads need no token
            st = await c.status()
            assert (st.node_id, st.name, st.url, st.trading, st.ready) == (a.node_id(), "a", a.url, True, True)
            assert st.member and st.raw["finality"]["member"] is True
            assert re.fullmatch("[0-9a-f]{64}", st.state_hash)  # its form only: the value moves with heartbeats
            assert [p.id for p in st.peers] == [b.node_id()] and st.peers[0].state == "up"
            assert st.book_hash is None
            assert (await c.status(verify=True)).book_hash
            assert [p.url for p in await c.peers()] == [b.url]
            lat = await c.latency()
            assert all(isinstance(s, int) for s in lat.samples + lat.final_samples)
            assert await c.ready()

    def test_sync_client_from_the_data_dir(self, pair: list[NodeProc]) -> None:
        """The data dir alone names the node (``endpoint``) and its token (``.cookie``)."""
        a, _ = pair
        with SyncClient.from_data_dir(a.data_dir) as c:
            assert c.url == a.url
            o = c.place("sell", 2, 9_000, cid="sync-1")
            assert c.order(o.id).status == "open"
            assert Level(price=9_000, qty=2, orders=1) in c.book(depth=1000).asks
            assert c.status().node_id == a.node_id()
            assert c.cancel(o.id).status == "cancelled"


class TestStream:
    async def test_hello_fill_final_and_book_events(self, pair: list[NodeProc]) -> None:
        a, b = pair
        async with Client.from_data_dir(a.data_dir) as ca, Client.from_data_dir(b.data_dir) as cb:
            events: list[Event] = []
            stream = cb.stream()
            try:
                async with asyncio.timeout(60):
                    hello = await anext(stream)
                    assert hello.type == "hello" and hello.raw["node"] == b.node_id()
                    maker = await ca.place("sell", 2, 600)
                    await until_known(cb, maker.id)
                    taker = await cb.place("buy", 2, 600)
                    async for ev in stream:
                        events.append(ev)
                        if ev.type == "final" and any(f.taker == taker.id for f in ev.fills):
                            break
            finally:
                await stream.aclose()
        kinds = {ev.type for ev in events}
        assert {"fill", "final", "book"} <= kinds, kinds
        fill = next(ev.fill for ev in events if ev.type == "fill" and ev.fill and ev.fill.taker == taker.id)
        assert (fill.maker, fill.price, fill.qty, fill.final) == (maker.id, 600, 2, False)
        # the final event of this taker's fill (an earlier one may carry another test's fills)
        final = next(ev for ev in events if ev.type == "final" and any(f.taker == taker.id for f in ev.fills))
        mine = [f for f in final.fills if f.taker == taker.id]
        assert mine and mine[0].final and isinstance(mine[0].seq, int) and isinstance(final.frontier, int)
        book = next(ev for ev in events if ev.type == "book")
        assert set(book.raw) >= {"bids", "asks"}

    def test_sync_stream(self, pair: list[NodeProc]) -> None:
        _, b = pair
        with SyncClient(b.url) as c:
            stream = c.stream()
            first = next(stream)
            # the first book event follows the hello, but a fill, revoked or final event that
            # was already under way may come between them (a busy network's finality does)
            types = [next(stream).type]
            while types[-1] != "book" and len(types) < 50:
                types.append(next(stream).type)
            stream.close()
            assert first.type == "hello" and first.raw.get("book") is not None
            assert types[-1] == "book" and set(types[:-1]) <= {"fill", "revoked", "final", "order"}, types


class TestErrors:
    async def test_unknown_and_malformed_order_ids(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        async with Client.from_data_dir(a.data_dir) as c:
            with pytest.raises(ClientError) as err:
                await c.order("ab" * 32)
            assert (err.value.code, err.value.status) == ("unknown_order", 404)
            assert "ab" * 32 in err.value.detail and "(HTTP 404)" in str(err.value)
            with pytest.raises(ClientError) as err:
                await c.cancel("cd" * 32)
            assert (err.value.code, err.value.status) == ("unknown_order", 404)
            with pytest.raises(ClientError) as err:
                await c.order("xyz")
            assert (err.value.code, err.value.status) == ("bad_order_id", 400)

    async def test_out_of_range_fields_are_422(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        before = own_orders(a)
        async with Client.from_data_dir(a.data_dir) as c:
            for kwargs, code in (({"qty": 0, "price": 1}, "bad_qty"), ({"qty": 1, "price": 1 << 41}, "bad_price"),
                                 ({"qty": 1, "price": 1, "cid": "not ok"}, "bad_cid"),
                                 ({"qty": 1, "price": 1, "tif": "FOK"}, "bad_tif")):
                with pytest.raises(ClientError) as err:
                    await c.place("buy", **kwargs)
                assert (err.value.code, err.value.status) == (code, 422), kwargs
            with pytest.raises(ClientError) as err:
                await c.place("hold", 1, 1)
            assert (err.value.code, err.value.status) == ("bad_side", 422)
            with pytest.raises(ClientError) as err:
                await c.book(depth=0)
            assert (err.value.code, err.value.status) == ("bad_depth", 400)
        assert own_orders(a) == before

    async def test_a_reused_cid_is_409(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        async with Client.from_data_dir(a.data_dir) as c:
            o = await c.place("buy", 1, 203, cid="client-reuse")
            with pytest.raises(ClientError) as err:
                await c.place("buy", 2, 203, cid="client-reuse")
            assert (err.value.code, err.value.status) == ("cid_reused", 409)
            await cancel_quietly(c, o.id)

    async def test_wrong_or_missing_token(self, pair: list[NodeProc], tmp_path: Path) -> None:
        a, _ = pair
        before = own_orders(a)
        async with Client(a.url, "wrong") as c:
            with pytest.raises(ClientError) as err:
                await c.place("buy", 1, 204)
            assert (err.value.code, err.value.status) == ("unauthorized", 401)
            assert (await c.status()).node_id == a.node_id()  # reads need no token
        async with Client(a.url) as c:
            with pytest.raises(ClientError) as err:
                await c.place("buy", 1, 204)
            assert (err.value.code, err.value.status) == ("no_token", None)
        async with Client.from_data_dir(tmp_path, url=a.url) as c:  # a data dir without a cookie
            with pytest.raises(ClientError) as err:
                await c.cancel("ab" * 32)
            assert err.value.code == "no_token" and ".cookie" in err.value.detail
        assert own_orders(a) == before

    async def test_unreachable_node_and_bad_url(self) -> None:
        async with Client(dead_url(), "t", retry_pause=0.01) as c:
            with pytest.raises(ClientError) as err:
                await c.status()
            assert (err.value.code, err.value.status, err.value.network) == ("unreachable", None, True)
        with pytest.raises(ClientError) as err:
            Client("http://[::1")
        assert err.value.code == "bad_url"

    def test_sync_client_raises_the_same_errors(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        with SyncClient(a.url, "wrong") as c:
            with pytest.raises(ClientError) as err:
                c.order("ab" * 32)
            assert (err.value.code, err.value.status) == ("unknown_order", 404)
            with pytest.raises(ClientError) as err:
                c.place("buy", 1, 1)
            assert err.value.status == 401


class TestRetries:
    async def test_reads_retried_writes_without_cid_not(self) -> None:
        """Against a port where nothing listens: a GET is sent read_attempts
        times, a write without a cid once, a write with a cid write_attempts
        times."""
        async with Client(dead_url(), "t", read_attempts=3, write_attempts=4, retry_pause=0.01) as c:
            for call, retries in ((c.status(), 2), (c.order("ab" * 32), 2), (c.place("buy", 1, 1), 0),
                                  (c.cancel("ab" * 32), 0), (c.place("buy", 1, 1, cid="r-1"), 3),
                                  (c.cancel("ab" * 32, cid="r-2"), 3)):
                before = c.retries
                with pytest.raises(ClientError) as err:
                    await call
                assert err.value.code == "unreachable"
                assert c.retries - before == retries

    async def test_frozen_node(self, solo: NodeProc) -> None:
        """The node is stopped (SIGSTOP) and let go THAW_AFTER_S later, while
        each attempt gives up after CALL_TIMEOUT_S: a GET gets its answer from
        a retry; a write without a cid times out and is not sent again (the
        node carries out the one request it got); a write with a cid is
        retried and placed once."""
        before = own_orders(solo)
        async with Client.from_data_dir(solo.data_dir, timeout=CALL_TIMEOUT_S, read_attempts=6,
                                        write_attempts=6) as c:
            with frozen(solo):
                st = await c.status()
            assert st.node_id == solo.node_id() and c.retries >= 1

            retries = c.retries
            with frozen(solo), pytest.raises(ClientError) as err:
                await c.place("buy", 1, 5)
            assert (err.value.code, err.value.status) == ("timeout", None) and c.retries == retries
            wait_until(lambda: own_orders(solo) == before + 1, timeout=20, what="the one order", nodes=[solo])

            with frozen(solo):
                o = await c.place("buy", 1, 6, cid="frozen-1")
            assert c.retries > retries and (o.price, o.cid) == (6, "frozen-1")
        assert own_orders(solo) == before + 2

    async def test_rate_limited_read_waits_retry_after(self, limited: NodeProc) -> None:
        """429 with Retry-After: a read (and a write with a cid) waits and is
        sent again; a write without a cid is refused once, with the code."""
        async with Client.from_data_dir(limited.data_dir, read_attempts=3, write_attempts=3) as c:
            await c.status()
            await c.status()  # the second within a second is limited, then retried
            assert c.retries >= 1
            retries = c.retries
            first = await c.place("sell", 1, 700)
            with pytest.raises(ClientError) as err:
                await c.place("sell", 1, 701)
            assert (err.value.code, err.value.status) == ("rate_limited", 429)
            assert err.value.retry_after is not None and c.retries == retries
            again = await c.place("sell", 1, 702, cid="limited-1")
            assert c.retries > retries and again.id != first.id


@contextlib.contextmanager
def frozen(node: NodeProc) -> Iterator[None]:
    """SIGSTOP a node now and SIGCONT it THAW_AFTER_S later (and at the latest on exit)."""
    timer = threading.Timer(THAW_AFTER_S, node.thaw)
    node.freeze()
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        node.thaw()
