"""Three real node processes on 127.0.0.1: replication of orders placed
through the CLI and the HTTP API, cancels, order status, and equal book,
fills and state hash everywhere.

One cluster is shared by the module (see ``trio``); each test keeps to its own
price band, reads fills from its own starting point, and whatever it leaves
resting is cancelled after it (``cancel_leftovers``), pass or fail, so no test
depends on what another one did.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.nodes import (
    NodeProc,
    cancel_leftovers,
    cli_json,
    cluster,
    logs_on_failure,
    report,
    run_cli,
    wait_converged,
    wait_order_everywhere,
    wait_until,
)

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_node_cluster")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    with cluster(tmp_path_factory.mktemp("trio"), ("a", "b", "c")) as nodes:
        yield nodes


@pytest.fixture(autouse=True)
def _each_test_on_its_own(request: pytest.FixtureRequest, trio: list[NodeProc]) -> Iterator[None]:
    """Node logs if the test failed; then whatever it left resting is cancelled,
    so the next test meets none of it (``cancel_leftovers``)."""
    with logs_on_failure(request, trio):
        yield
    cancel_leftovers(trio)


def cli_order(node: NodeProc, side: str, amount: str, *, json_out: bool) -> dict[str, Any]:
    """``python cli.py order`` against ``node``; with --json the reply, else the parsed text."""
    args = ["order", side, amount, "--node", node.url, "--data-dir", str(node.data_dir)]
    if json_out:
        out: dict[str, Any] = cli_json(*args)
        node.placed.append(out["id"])
        return out
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    m = re.search(r"^id ([0-9a-f]{64})$", done.stdout, re.MULTILINE)
    assert m, f"no order id in CLI output:\n{done.stdout}"
    node.placed.append(m.group(1))
    head = done.stdout.splitlines()[0]
    assert head.startswith(f"order {m.group(1)[:16]} {side} {amount}:"), head
    return {"id": m.group(1), "text": done.stdout}


def without_state_hash(book: dict[str, Any]) -> dict[str, Any]:
    """A book reply without its ``state_hash``, which moves with every
    heartbeat of a live network and so may differ between two equal books."""
    return {k: v for k, v in book.items() if k != "state_hash"}


def fills_after(node: NodeProc, start: int) -> list[tuple[str, str, int, int]]:
    fills = node.get(f"/v1/fills?since={start}")["fills"]
    return [(f["taker"], f["maker"], f["price"], f["qty"]) for f in fills]


class TestReplication:
    def test_crossing_orders_from_cli_and_http_converge(self, trio: list[NodeProc],
                                                        request: pytest.FixtureRequest) -> None:
        a, b, c = trio
        wait_converged(trio)
        start = a.get("/v1/fills?limit=1")["total"]
        delays: list[float] = []

        # a: resting buy through the CLI (--json)
        buy = cli_order(a, "buy", "10@100", json_out=True)
        assert (buy["status"], buy["remaining"], buy["fills"]) == ("open", 10, [])
        delays.append(wait_order_everywhere(trio, buy["id"]))

        # b: crossing sell through the CLI (text output); trades at the maker's price
        sell_b = cli_order(b, "sell", "4@99", json_out=False)
        assert "fill 4@100 against" in sell_b["text"]
        delays.append(wait_order_everywhere(trio, sell_b["id"]))

        # c: crossing sell over HTTP with the cookie token; 6 trade, 4 rest
        sell_c = c.order("sell", 10, 100)
        assert (sell_c["status"], sell_c["filled"], sell_c["remaining"]) == ("partially_filled", 6, 4)
        assert [(f["maker"], f["price"], f["qty"]) for f in sell_c["fills"]] == [(buy["id"], 100, 6)]
        delays.append(wait_order_everywhere(trio, sell_c["id"]))

        # a: buy over HTTP that takes 2 of c's rest
        buy2 = a.order("buy", 2, 101)
        assert buy2["status"] == "filled"
        delays.append(wait_order_everywhere(trio, buy2["id"]))

        snap = wait_converged(trio)
        expected = [
            (sell_b["id"], buy["id"], 100, 4),
            (sell_c["id"], buy["id"], 100, 6),
            (buy2["id"], sell_c["id"], 100, 2),
        ]
        for n in trio:
            assert fills_after(n, start) == expected, n.name
        assert {"price": 100, "qty": 2, "orders": 1} in snap["book"]["asks"]

        # order status is the same on every node
        for oid, state, filled in ((buy["id"], "filled", 10), (sell_c["id"], "partially_filled", 8)):
            views = [n.get(f"/v1/orders/{oid}") for n in trio]
            assert all(v == views[0] for v in views)
            assert (views[0]["status"], views[0]["filled"]) == (state, filled)

        # the CLI's status/book/fills --json agree with each other on every node
        records = {cli_json("status", "--node", n.url)["counts"]["records"] for n in trio}
        assert records == {snap["records"]}
        # (not the state hash each book reply carries: it moves with every heartbeat)
        books = [without_state_hash(cli_json("book", "--node", n.url, "--depth", "1000")) for n in trio]
        assert all(bk == books[0] for bk in books) and books[0]["asks"] == snap["book"]["asks"]
        fills = [cli_json("fills", "--node", n.url, "--since", str(start)) for n in trio]
        assert all(f == fills[0] for f in fills) and len(fills[0]["fills"]) == 3

        # c cancels its rest through the CLI; the cancel replicates
        done = cli_json("cancel", sell_c["id"], "--node", c.url, "--data-dir", str(c.data_dir))
        assert (done["status"], done["remaining"]) == ("cancelled", 0)
        wait_converged(trio)
        for n in trio:
            st = n.get(f"/v1/orders/{sell_c['id']}")
            assert (st["status"], st["filled"], st["remaining"]) == ("cancelled", 8, 0)
            assert {"price": 100, "qty": 2, "orders": 1} not in n.get("/v1/book")["asks"]

        report(request, "\n[figures] order accepted at one node -> visible on all three: "
                        + ", ".join(f"{d * 1000:.1f} ms" for d in delays)
                        + f" (median {statistics.median(delays) * 1000:.1f} ms)")
        lat = [n.get("/v1/latency")["median_ms"] for n in trio]
        report(request, f"[figures] per-node median acceptance-to-visibility of others' entries: {lat} ms")

    def test_cancel_over_http_and_cli(self, trio: list[NodeProc]) -> None:
        a, b, _ = trio
        # band: buys at 50, sells at 150
        bid = a.order("buy", 5, 50)
        ask = cli_order(b, "sell", "7@150", json_out=True)
        wait_order_everywhere(trio, bid["id"])
        wait_order_everywhere(trio, ask["id"])

        r = a.cancel(bid["id"])
        assert r.status == 200, r
        assert (r.json()["status"], r.json()["remaining"]) == ("cancelled", 0)
        done = run_cli("cancel", ask["id"], "--node", b.url, "--data-dir", str(b.data_dir))
        assert done.returncode == 0, done.stderr
        assert "cancelled" in done.stdout

        snap = wait_converged(trio)
        assert {"price": 50, "qty": 5, "orders": 1} not in snap["book"]["bids"]
        assert {"price": 150, "qty": 7, "orders": 1} not in snap["book"]["asks"]
        for n in trio:
            shown = cli_json("show", bid["id"], "--node", n.url)
            assert (shown["status"], shown["owner"]) == ("cancelled", a.node_id())
            assert n.get(f"/v1/orders/{ask['id']}")["status"] == "cancelled"

    def test_only_the_owner_can_cancel(self, trio: list[NodeProc]) -> None:
        a, b, _ = trio
        bid = a.order("buy", 1, 51)
        wait_order_everywhere(trio, bid["id"])
        before = wait_converged(trio)
        r = b.cancel(bid["id"])
        assert r.status == 409 and r.json()["error"] == "foreign_order", r
        assert b.snapshot() == before
        assert a.cancel(bid["id"]).status == 200
        wait_converged(trio)

    def test_market_and_ioc_orders_replicate(self, trio: list[NodeProc]) -> None:
        a, b, c = trio
        # band: 200..210, on an otherwise empty ask side above 150
        ask = c.order("sell", 3, 205)
        wait_order_everywhere(trio, ask["id"])
        ioc = b.order("buy", 5, 205, tif="IOC")
        assert (ioc["filled"], ioc["remaining"], ioc["tif"]) == (3, 0, "IOC"), ioc
        rest = c.order("sell", 2, 210)
        wait_order_everywhere(trio, rest["id"])
        mkt = a.order("buy", 1, market=True)
        assert (mkt["market"], mkt["tif"], mkt["filled"]) == (True, "IOC", 1), mkt
        assert [(f["maker"], f["price"]) for f in mkt["fills"]] == [(rest["id"], 210)]
        wait_converged(trio)
        for n in trio:
            assert n.get(f"/v1/orders/{ioc['id']}") == b.get(f"/v1/orders/{ioc['id']}")
            assert n.get(f"/v1/orders/{mkt['id']}")["remaining"] == 0
        assert c.cancel(rest["id"]).status == 200  # leave the band empty
        wait_converged(trio)

    def test_concurrent_crossing_orders_at_all_nodes_converge(self, trio: list[NodeProc]) -> None:
        """Orders posted at the three nodes at the same time, without waiting for
        replication: each node first matches against what it has seen, and late
        arrivals re-match in canonical order, so all nodes end with one book."""
        rng = random.Random(7)
        plans = [[("buy" if rng.random() < 0.5 else "sell", rng.randint(1, 5), rng.randint(700, 710))
                  for _ in range(15)] for _ in trio]

        def place(n: NodeProc, plan: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
            return [n.order(side, qty, price) for side, qty, price in plan]

        with ThreadPoolExecutor(len(trio)) as pool:
            placed = [o for batch in pool.map(place, trio, plans) for o in batch]
        snap = wait_converged(trio, min_entries=len(placed))
        bids, asks = snap["book"]["bids"], snap["book"]["asks"]
        assert not bids or not asks or bids[0]["price"] < asks[0]["price"], "crossed book"
        by_owner = {n.node_id(): n for n in trio}
        for o in placed:
            views = [n.get(f"/v1/orders/{o['id']}") for n in trio]
            assert views[0] == views[1] == views[2]
            v = views[0]
            assert v["filled"] + v["remaining"] <= v["qty"] and v["filled"] >= 0
            if v["remaining"]:
                assert by_owner[v["owner"]].cancel(o["id"]).status == 200
        wait_converged(trio)

    def test_status_reports_peers_and_counts(self, trio: list[NodeProc]) -> None:
        snap = wait_converged(trio)
        ids = {n.name: n.node_id() for n in trio}
        for n in trio:
            st = cli_json("status", "--node", n.url)
            assert st["counts"]["records"] == snap["records"]
            assert st["finality"]["member"] and len(st["finality"]["members"]) == 3
            assert st["ready"] and st["trading"] and st["name"] == n.name
            assert {p["id"] for p in st["peers"]} == {ids[m.name] for m in trio if m is not n}
            assert st["counts"]["buffered"] == 0 and st["counts"]["equivocating_origins"] == 0
            assert sum(st["version_vector"].values()) == st["counts"]["entries"]
        peers = cli_json("peers", "--node", trio[0].url)
        assert len(peers) == 2
        # per peer: how far behind it was at its last sync reply, and how fast its entries arrive here
        def measured() -> bool:
            views = trio[0].status()["peers"]
            return all(p["behind_entries"] is not None and p["latency_p50_ms"] is not None for p in views)

        wait_until(measured, timeout=30, what="per-peer lag and latency at a", nodes=trio)
        for p in trio[0].status()["peers"]:
            assert 0 <= p["behind_entries"] and 0 <= p["latency_p50_ms"] <= p["latency_p99_ms"], p


class TestFigures:
    def test_time_for_an_order_to_reach_all_three(self, trio: list[NodeProc],
                                                  request: pytest.FixtureRequest) -> None:
        """Recorded, not asserted: orders round-robin over the nodes, each
        timed from submission until every node answers GET /v1/orders/{id}."""
        delays = []
        for i in range(12):
            n = trio[i % 3]
            t0 = time.monotonic()
            o = n.order("buy", 1, 20 + i)  # band 20..31: never crosses
            acked = time.monotonic() - t0
            delays.append(acked + wait_order_everywhere(trio, o["id"]))
        wait_converged(trio)
        report(request, f"\n[figures] submit -> on all three nodes over {len(delays)} orders: "
                        f"median {statistics.median(delays) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms")
