"""Grenache RPC on a real node process (``--grape``): the seed exchange's
actions in both payload shapes, with the client API's validation and errors,
the token for writes, gzip, and the refusals (a float, a body that does not
parse, an action this network does not need).  Here the grape is not
running, which a node must tolerate: it serves RPC and says in its status
that it cannot announce.  ``tests/interop/`` runs real grapes and the npm
client against it."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.nodes import NodeProc, free_port, http, logs_on_failure

SERVICE = "exchange_service"
DEAD_GRAPE = "http://127.0.0.1:9"  # the discard port: nothing answers there


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = NodeProc(name="grenache", port=free_port(), data_dir=tmp_path_factory.mktemp("grenache") / "n")
    n.extra_args = ["--grape", DEAD_GRAPE]
    try:
        yield n.start()
    finally:
        n.stop()


def rpc(node: NodeProc, payload: Any, *, rid: str = "r-1", service: str = SERVICE, gz: bool = False,
        raw: bytes | None = None) -> tuple[int, Any]:
    body = raw if raw is not None else json.dumps([rid, service, payload]).encode()
    headers = {"Content-Type": "application/json", "grc-compress": "gzip" if gz else "none"}
    if gz:
        body = gzip.compress(body)
    r = http("POST", node.url + "/", body, headers=headers)
    data = gzip.decompress(r.body) if gz else r.body
    return r.status, json.loads(data)


def ok(node: NodeProc, payload: Any, **kw: Any) -> Any:
    status, (rid, err, result) = rpc(node, payload, **kw)
    assert status == 200 and err is None, (status, err)
    assert rid == kw.get("rid", "r-1")
    return result


def refused(node: NodeProc, payload: Any) -> str:
    status, (_, err, result) = rpc(node, payload)
    assert status == 200 and result is None and isinstance(err, str), (status, err, result)
    return err


def submit(node: NodeProc, side: str, price: Any, amount: Any, **extra: Any) -> dict[str, Any]:
    return {"action": "submitOrder", "token": node.token, "clientId": "c1",
            "data": {"order": {"type": side, "price": price, "amount": amount, **extra}}}


def book(node: NodeProc) -> dict[str, Any]:
    out: dict[str, Any] = node.get("/v1/book")
    return out


class TestGrenacheRpc:
    def test_orders_cross_and_cancel_as_on_the_client_api(self, node: NodeProc,
                                                          request: pytest.FixtureRequest) -> None:
        with logs_on_failure(request, [node]):
            sell = ok(node, submit(node, "sell", 500, 5, id="seed-1"))
            assert sell["status"] == "success"
            order = sell["result"]
            assert (order["status"], order["side"], order["price"], order["qty"]) == ("open", "sell", 500, 5)
            assert {"price": 500, "amount": 5, "orders": 1} in sell["state"]["sellOrders"]
            assert node.get(f"/v1/orders/{order['id']}")["remaining"] == 5
            # grenache-cli's shape: {action, args: [data]}
            buy = ok(node, {"action": "submitOrder", "token": node.token,
                            "args": [{"type": "buy", "price": 500, "amount": 2}]})
            fills = buy["state"]["matches"]
            assert [(f["maker"], f["price"], f["qty"]) for f in fills] == [(order["id"], 500, 2)]
            assert all(isinstance(f["final"], bool) for f in fills)
            got = ok(node, {"action": "getOrder", "data": {"orderId": order["id"]}})["result"]
            assert (got["filled"], got["remaining"]) == (2, 3)
            cancelled = ok(node, {"action": "cancelOrder", "token": node.token, "data": {"orderId": order["id"]}})
            assert cancelled["result"]["status"] == "cancelled"
            assert not [a for a in book(node)["asks"] if a["price"] == 500]

    def test_the_book_is_the_client_apis(self, node: NodeProc) -> None:
        ok(node, submit(node, "buy", 90, 4))
        ok(node, submit(node, "sell", 910, 1))
        got = ok(node, {"action": "getOrderbook"})["result"]
        want = book(node)
        assert [[lv["price"], lv["amount"]] for lv in got["buyOrders"]] == [[lv["price"], lv["qty"]]
                                                                           for lv in want["bids"]]
        assert [[lv["price"], lv["amount"]] for lv in got["sellOrders"]] == [[lv["price"], lv["qty"]]
                                                                            for lv in want["asks"]]

    def test_fills_say_whether_they_are_final(self, node: NodeProc) -> None:
        ok(node, submit(node, "sell", 300, 1))
        ok(node, submit(node, "buy", 300, 1))
        page = ok(node, {"action": "getFills", "data": {"since": 0, "limit": 1000}})["result"]
        assert page["fills"] and page["total"] == len(node.get("/v1/fills?limit=1000")["fills"])
        assert all(isinstance(f["final"], bool) for f in page["fills"])
        final = ok(node, {"action": "getFills", "data": {"final": True}})["result"]
        assert all(f["final"] for f in final["fills"])

    def test_a_repeated_order_id_places_nothing(self, node: NodeProc) -> None:
        first = ok(node, submit(node, "sell", 777, 1, id="same-id"))["result"]
        again = ok(node, submit(node, "sell", 777, 1, id="same-id"))["result"]
        assert again["id"] == first["id"] and again["repeat"] and not first["repeat"]
        assert [a["qty"] for a in book(node)["asks"] if a["price"] == 777] == [1]

    def test_a_body_that_arrives_in_pieces_is_read_whole(self, node: NodeProc) -> None:
        """Regression: the endpoint read the body with one ``content.read(n)``,
        which returns what is buffered so far; a body whose second half came
        in a later packet was answered ERR_REQUEST_PARSE."""
        body = json.dumps(["r-pieces", SERVICE, {"action": "getOrderbook"}]).encode()
        head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(head + body[:10])
            time.sleep(0.3)
            sock.sendall(body[10:])
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status_line, _, rest = reply.partition(b"\r\n")
        assert b" 200 " in status_line, reply[:300]
        rid, err, result = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert (rid, err, result["status"]) == ("r-pieces", None, "success")

    def test_gzip_both_ways(self, node: NodeProc) -> None:
        out = ok(node, {"action": "getOrderbook", "data": {"depth": 3}}, gz=True)
        assert out["status"] == "success"


class TestGrenacheRefusals:
    @pytest.mark.parametrize(("field", "value", "code"), [("price", 100.5, "bad_price"),
                                                           ("amount", 2.0, "bad_amount"),
                                                           ("price", "100", "bad_price"),
                                                           ("amount", 0, "bad_amount")])
    def test_only_integer_ticks_and_lots(self, node: NodeProc, field: str, value: Any, code: str) -> None:
        before = book(node)
        order = {"price": 100, "amount": 2, field: value}
        err = refused(node, submit(node, "buy", order["price"], order["amount"]))
        assert err.startswith(f"{code}: "), err
        if type(value) is float:
            assert "not a float" in err
        assert book(node)["bids"] == before["bids"]  # nothing placed

    def test_writes_need_the_token(self, node: NodeProc) -> None:
        before = book(node)
        for token in (None, "", "wrong"):
            payload = submit(node, "buy", 100, 1)
            if token is None:
                del payload["token"]
            else:
                payload["token"] = token
            assert refused(node, payload).startswith("unauthorized: ")
        after = book(node)  # the levels; the state hash moves with every liveness entry
        assert (after["bids"], after["asks"]) == (before["bids"], before["asks"])

    def test_reads_are_open(self, node: NodeProc) -> None:
        ok(node, {"action": "getOrderbook"})

    @pytest.mark.parametrize("action", ["syncOrderbook", "announceMatch"])
    def test_what_this_network_does_by_itself_is_not_supported(self, node: NodeProc, action: str) -> None:
        assert refused(node, {"action": action, "data": {}}).startswith("not_supported: ")

    def test_unknown_actions_and_payloads(self, node: NodeProc) -> None:
        assert refused(node, {"action": "launchRocket"}).startswith("unknown_action: ")
        assert refused(node, ["not", "a", "map"]).startswith("bad_payload: ")
        assert refused(node, {"action": "getOrder", "data": {"orderId": "zz"}}).startswith("bad_order_id: ")
        assert refused(node, {"action": "getOrder", "data": {"orderId": "ab" * 32}}).startswith("unknown_order: ")

    def test_another_service_name_is_refused(self, node: NodeProc) -> None:
        status, (_, err, _) = rpc(node, {"action": "getOrderbook"}, service="other_service")
        assert status == 200 and err.startswith("unknown_service: ")

    @pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"a": 1}', b"\xff\xfe"])
    def test_a_body_that_does_not_parse_is_answered(self, node: NodeProc, raw: bytes) -> None:
        """The Node server never answers these, so its clients wait for their timeout."""
        status, body = rpc(node, None, raw=raw)
        assert (status, body) == (400, [None, "ERR_REQUEST_PARSE", None])


class TestGrenacheStatus:
    def test_a_grape_that_does_not_answer_is_shown_and_rpc_still_works(self, node: NodeProc) -> None:
        gren = node.status()["grenache"]
        assert gren["service"] == SERVICE and gren["grapes"] == [DEAD_GRAPE]
        assert gren["port"] == node.port and DEAD_GRAPE in gren["failing"]
        ok(node, {"action": "getOrderbook"})

    def test_off_without_a_grape(self, tmp_path: Any) -> None:
        n = NodeProc(name="plain", port=free_port(), data_dir=tmp_path / "plain")
        try:
            n.start()
            assert n.status()["grenache"] is None
            r = http("POST", n.url + "/", json.dumps(["r", SERVICE, {"action": "getOrderbook"}]).encode(),
                     headers={"Content-Type": "application/json"})
            assert r.status == 405, r
        finally:
            n.stop()
