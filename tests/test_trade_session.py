"""The trading session (``GET /v1/trade``, WebSocket) against real node
processes on 127.0.0.1: orders and cancels as messages, answered like the
HTTP routes, in arrival order, under the token and the write limit; and the
client library's ``TradingSession`` over it.  Nothing mocks the network."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from client import Client, ClientError
from tests.nodes import NodeProc, cluster, free_port, logs_on_failure, stop_all

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_trade_session")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    with cluster(tmp_path_factory.mktemp("trade"), ("a", "b")) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """A node that allows ten writes, then one a second."""
    n = NodeProc(name="limited", port=free_port(), data_dir=tmp_path_factory.mktemp("trade-lim") / "limited",
                 extra_args=["--write-limit", "1/10"])
    try:
        yield n.start()
    finally:
        stop_all([n])


@pytest.fixture(autouse=True)
def _node_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    nodes = [request.getfixturevalue(name) for name in ("pair", "limited") if name in request.fixturenames]
    flat = [n for x in nodes for n in (x if isinstance(x, list) else [x])]
    with logs_on_failure(request, flat):
        yield


def ws_url(n: NodeProc) -> str:
    return n.url.replace("http://", "ws://") + "/v1/trade"


async def answers(ws: aiohttp.ClientWebSocketResponse, count: int) -> dict[Any, dict[str, Any]]:
    """The next ``count`` answers, by ref (each within 10 s)."""
    out: dict[Any, dict[str, Any]] = {}
    for _ in range(count):
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        out[data["ref"]] = data
    return out


class TestTradeRoute:
    async def test_messages_are_carried_out_in_arrival_order(self, pair: list[NodeProc]) -> None:
        """Takers sent before a cancel of their maker, with no answer awaited in
        between, trade with the maker first; the cancel then finds it filled.
        Committed with them (a provisional fill can still be revised, and the
        cancel would then apply), it is answered 200 with the order as it
        stands; committed after the fills became final (a loaded machine
        splits the burst over commits, and an answer now waits for
        certification), it is refused as no longer resting.  Either way the
        maker is filled, never cancelled."""
        a, _ = pair
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(a), headers=a.auth()) as ws:
            await ws.send_str(json.dumps({"op": "place", "ref": 0, "side": "sell", "qty": 3, "price": 451}))
            maker = (await answers(ws, 1))[0]["order"]
            for round_ in range(5):
                await ws.send_str(json.dumps({"op": "place", "ref": f"t{round_}", "side": "buy", "qty": 1,
                                              "price": 451, "tif": "IOC"}))
            await ws.send_str(json.dumps({"op": "cancel", "ref": "c", "id": maker["id"]}))
            got = await answers(ws, 6)
        assert [got[f"t{i}"]["order"]["filled"] for i in range(5)] == [1, 1, 1, 0, 0], got
        cancel = got["c"]
        assert (cancel["status"] == 200 and cancel["order"]["status"] == "filled") or \
            (cancel["status"] == 409 and cancel["error"] == "not_cancellable"), cancel

    async def test_place_and_cancel_in_one_burst(self, pair: list[NodeProc]) -> None:
        """Many orders and a cancel sent without waiting for answers: each is
        answered once, with its ref."""
        a, _ = pair
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(a), headers=a.auth()) as ws:
            await ws.send_str(json.dumps({"op": "place", "ref": 1, "side": "buy", "qty": 2, "price": 401,
                                          "cid": "trade-burst"}))
            first = (await answers(ws, 1))[1]
            assert first["status"] == 201 and first["order"]["status"] == "open", first
            oid = first["order"]["id"]
            burst = [{"op": "place", "ref": f"p{i}", "side": "buy", "qty": 1, "price": 402} for i in range(20)]
            burst.append({"op": "cancel", "ref": "c", "id": oid})
            for m in burst:
                await ws.send_str(json.dumps(m))
            got = await answers(ws, len(burst))
            assert {got[f"p{i}"]["status"] for i in range(20)} == {201}
            assert got["c"]["status"] == 200 and got["c"]["order"]["status"] == "cancelled", got["c"]
            for i in range(20):
                await ws.send_str(json.dumps({"op": "cancel", "ref": i, "id": got[f"p{i}"]["order"]["id"]}))
            assert {g["status"] for g in (await answers(ws, 20)).values()} == {200}
            # a repeated cid places nothing: the first order, as it stands now
            await ws.send_str(json.dumps({"op": "place", "ref": 2, "side": "buy", "qty": 2, "price": 401,
                                          "cid": "trade-burst"}))
            again = (await answers(ws, 1))[2]
            assert again["status"] == 200 and again["order"]["id"] == oid and again["order"]["repeat"], again
        # what the session placed is an order like any other: the other node sees it cancelled
        async with Client.from_data_dir(a.data_dir) as c:
            assert (await c.order(oid)).status == "cancelled"

    async def test_refusals_carry_the_ref_and_the_http_codes(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        cases: list[tuple[Any, str, int, str]] = [
            ({"op": "place", "ref": "side", "side": "hold", "qty": 1, "price": 1}, "side", 422, "bad_side"),
            ({"op": "place", "ref": "qty", "side": "buy", "qty": 0, "price": 1}, "qty", 422, "bad_qty"),
            ({"op": "place", "ref": "f", "side": "buy", "qty": 1, "price": 1, "x": 1}, "f", 422, "unknown_field"),
            ({"op": "cancel", "ref": "unknown", "id": "ab" * 32}, "unknown", 404, "unknown_order"),
            ({"op": "cancel", "ref": "badid", "id": "zz"}, "badid", 400, "bad_order_id"),
            ({"op": "cancel", "ref": "noid"}, "noid", 400, "bad_order_id"),
            ({"op": "trade", "ref": "op"}, "op", 400, "bad_op"),
            ({"op": "place", "ref": ["not", "a", "ref"]}, None, 400, "bad_ref"),
            ([1, 2], None, 400, "bad_json"),
        ]
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(a), headers=a.auth()) as ws:
            for msg, _, _, _ in cases:
                await ws.send_str(json.dumps(msg))
            await ws.send_str("{not json")
            await ws.send_bytes(b"\x81\xa2op\xa5place")
            got = [json.loads((await ws.receive(timeout=10)).data) for _ in range(len(cases) + 2)]
        by_ref: dict[Any, list[dict[str, Any]]] = {}
        for g in got:
            by_ref.setdefault(g["ref"], []).append(g)
        for _, ref, status, code in cases:
            match = [g for g in by_ref[ref] if g["error"] == code]
            assert match and match[0]["status"] == status and match[0]["detail"], (ref, code, by_ref.get(ref))
        assert sorted(g["error"] for g in by_ref[None]) == ["bad_json", "bad_json", "bad_json", "bad_ref"]

    async def test_the_upgrade_needs_the_token(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await s.ws_connect(ws_url(a), headers=headers)
                assert err.value.status == 401

    async def test_messages_take_from_the_write_limit(self, limited: NodeProc) -> None:
        """Each message is a write: past the token's bucket, 429 with retry_after, nothing placed."""
        before = limited.status()["counts"]["own_orders"]
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(limited), headers=limited.auth()) as ws:
            for i in range(30):
                await ws.send_str(json.dumps({"op": "place", "ref": i, "side": "buy", "qty": 1, "price": 10}))
            got = await answers(ws, 30)
        statuses = [g["status"] for g in got.values()]
        # a burst of 10, then one a second: well under 20 placed however slow the machine is
        assert set(statuses) <= {201, 429} and 10 <= statuses.count(201) <= 20, statuses
        refused = [g for g in got.values() if g["status"] == 429]
        assert all(g["error"] == "rate_limited" and g["retry_after"] >= 1 for g in refused), refused
        assert limited.status()["counts"]["own_orders"] == before + statuses.count(201)


class TestTradingSession:
    async def test_place_fill_and_cancel(self, pair: list[NodeProc]) -> None:
        a, b = pair
        async with Client.from_data_dir(a.data_dir) as ca, Client.from_data_dir(b.data_dir) as cb:
            async with await ca.trading() as session:
                resting = await asyncio.gather(*(session.place("sell", 1, 500 + i) for i in range(5)))
                assert [o.status for o in resting] == ["open"] * 5 and len({o.id for o in resting}) == 5
                cancelled = await session.cancel(resting[4].id)
                assert (cancelled.id, cancelled.status) == (resting[4].id, "cancelled")
                with pytest.raises(ClientError) as err:
                    await session.cancel(resting[4].id)
                assert (err.value.code, err.value.status) == ("not_cancellable", 409)
                with pytest.raises(ClientError) as err:
                    await session.place("buy", 0, 1)
                assert (err.value.code, err.value.status) == ("bad_qty", 422)
            for o in resting[:4]:  # the other node sees them, and can take them
                for _ in range(500):
                    try:
                        await cb.order(o.id)
                        break
                    except ClientError:
                        await asyncio.sleep(0.02)
            async with await cb.trading() as session:
                taker = await session.place("buy", 4, 503, tif="IOC")
            assert (taker.filled, len(taker.fills)) == (4, 4), taker

    async def test_wrong_token_and_a_stopped_node(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        n = NodeProc(name="gone", port=free_port(), data_dir=tmp_path_factory.mktemp("trade-gone") / "gone")
        n.start()
        try:
            async with Client(n.url, "wrong") as c:
                with pytest.raises(ClientError) as err:
                    await c.trading()
                assert (err.value.code, err.value.status) == ("unauthorized", 401)
            async with Client.from_data_dir(n.data_dir, timeout=2.0) as c:
                session = await c.trading()
                assert (await session.place("buy", 1, 7)).status == "open"
                n.stop()
                with pytest.raises(ClientError) as err:
                    for _ in range(100):  # bounded: the node is gone, so the first or a later call fails
                        await session.place("buy", 1, 7)
                assert err.value.code in ("disconnected", "timeout"), err.value
                await session.close()
        finally:
            stop_all([n])
