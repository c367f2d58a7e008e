"""Orders a client can retry safely: the client order id ``cid``.

Regression: three orders whose requests timed out at the client while the
node was paused were carried out when it resumed, and a retry would have
placed them twice; there was no way to say "this is the same order".  Now a
repeat with the same ``cid`` places nothing and answers with the first
order, also after a restart (the id is committed with the order's entry),
and ``cli.py order`` and the trader send one and retry with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.nodes import CLI, ROOT, NodeProc, free_port, logs_on_failure

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_node_idempotency")

GOOD = {"side": "buy", "qty": 2, "price": 7}


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = NodeProc(name="solo", port=free_port(), data_dir=tmp_path_factory.mktemp("cid") / "solo")
    try:
        yield n.start()
    finally:
        n.stop()


@pytest.fixture(autouse=True)
def _logs(request: pytest.FixtureRequest, solo: NodeProc) -> Iterator[None]:
    with logs_on_failure(request, [solo]):
        if not solo.running():
            solo.start()
        yield


def own_orders(n: NodeProc) -> int:
    return int(n.status()["counts"]["own_orders"])


class TestClientOrderId:
    def test_repeat_places_nothing_and_answers_with_the_first_order(self, solo: NodeProc) -> None:
        before = own_orders(solo)
        first = solo.request("POST", "/v1/orders", {**GOOD, "cid": "order-1"})
        assert first.status == 201, first
        again = solo.request("POST", "/v1/orders", {**GOOD, "cid": "order-1"})
        assert again.status == 200, again
        a, b = first.json(), again.json()
        assert b["id"] == a["id"] and b["repeat"] is True and b["cid"] == "order-1"
        assert {k: b[k] for k in ("status", "filled", "remaining", "fills")} == \
               {k: a[k] for k in ("status", "filled", "remaining", "fills")}
        assert own_orders(solo) == before + 1
        # another cid is another order
        other = solo.request("POST", "/v1/orders", {**GOOD, "cid": "order-2"})
        assert other.status == 201 and other.json()["id"] != a["id"]

    def test_same_cid_for_a_different_order_409(self, solo: NodeProc) -> None:
        assert solo.request("POST", "/v1/orders", {**GOOD, "cid": "x1"}).status == 201
        r = solo.request("POST", "/v1/orders", {**GOOD, "qty": 3, "cid": "x1"})
        assert r.status == 409 and r.json()["error"] == "cid_reused", r

    @pytest.mark.parametrize("cid", ["", "a" * 65, "a b", "é", "a/b", 5, None, ["x"]])
    def test_bad_cid_422(self, solo: NodeProc, cid: Any) -> None:
        before = own_orders(solo)
        r = solo.request("POST", "/v1/orders", {**GOOD, "cid": cid})
        if cid is None:  # null means no cid
            assert r.status == 201, r
            return
        assert r.status == 422 and r.json()["error"] == "bad_cid", r
        assert own_orders(solo) == before

    def test_cancel_with_cid_repeats_as_200(self, solo: NodeProc) -> None:
        o = solo.order("sell", 1, 900)
        first = solo.request("DELETE", f"/v1/orders/{o['id']}?cid=c-1")
        assert first.status == 200 and first.json()["status"] == "cancelled", first
        again = solo.request("DELETE", f"/v1/orders/{o['id']}?cid=c-1")
        assert again.status == 200 and again.json()["repeat"] is True, again
        plain = solo.request("DELETE", f"/v1/orders/{o['id']}")  # without a cid: already cancelled
        assert plain.status == 409 and plain.json()["error"] == "not_cancellable"
        other = solo.order("sell", 1, 901)
        r = solo.request("DELETE", f"/v1/orders/{other['id']}?cid=c-1")
        assert r.status == 409 and r.json()["error"] == "cid_reused", r
        assert solo.get(f"/v1/orders/{other['id']}")["status"] == "open"

    def test_cid_survives_a_restart(self, solo: NodeProc) -> None:
        first = solo.request("POST", "/v1/orders", {**GOOD, "cid": "kept"}).json()
        solo.kill9()
        solo.start()
        before = own_orders(solo)
        again = solo.request("POST", "/v1/orders", {**GOOD, "cid": "kept"})
        assert again.status == 200 and again.json()["id"] == first["id"], again
        assert again.json()["fills"] == first["fills"]
        assert own_orders(solo) == before


class TestLostReply:
    def test_request_that_timed_out_during_a_pause_is_placed_once(self, solo: NodeProc) -> None:
        """The node is frozen (SIGSTOP) while the client sends; the client times
        out, the node resumes and carries the request out, the client retries
        with the same cid and gets the same order: placed once."""
        before = own_orders(solo)
        body = {**GOOD, "cid": "paused-1"}
        solo.freeze()
        try:
            with pytest.raises(OSError, match="timed out"):
                solo.request("POST", "/v1/orders", body, timeout=0.5)
        finally:
            solo.thaw()
        again = solo.request("POST", "/v1/orders", body)
        assert again.status in (200, 201), again
        assert own_orders(solo) == before + 1
        assert solo.get(f"/v1/orders/{again.json()['id']}")["qty"] == GOOD["qty"]

    def test_cli_order_retries_with_its_cid(self, solo: NodeProc) -> None:
        """``cli.py order`` with a 1 s timeout against a node frozen for 1.5 s:
        the first attempt times out, the retry returns the order, placed once."""
        before = own_orders(solo)
        solo.freeze()
        thaw = threading.Timer(1.5, solo.thaw)
        thaw.start()
        try:
            done = subprocess.run(
                [sys.executable, str(CLI), "order", "buy", "1@3", "--node", solo.url, "--data-dir",
                 str(solo.data_dir), "--timeout", "1", "--json"], cwd=ROOT, capture_output=True, text=True,
                timeout=30)
        finally:
            thaw.join()
            solo.thaw()
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["qty"] == 1 and out["price"] == 3
        time.sleep(0.2)
        assert own_orders(solo) == before + 1


class TestTraderRetries:
    def test_trader_retries_a_timed_out_order_with_the_same_cid(self) -> None:
        """A fake node that answers the first order only after the trader's
        timeout: the trader sends it again with the same cid, and counts one
        order, not an error."""
        import asyncio

        from aiohttp import web

        from net.trader import trade

        seen: list[dict[str, Any]] = []

        async def orders(request: web.Request) -> web.Response:
            body = await request.json()
            seen.append(body)
            if len(seen) == 1:
                await asyncio.sleep(1.0)  # the reply is lost: the client gave up after 0.3 s
            return web.json_response({"id": "ab" * 32, "status": "open", "filled": 0, "remaining": body["qty"]},
                                     status=201)

        async def main() -> Any:
            app = web.Application()
            app.router.add_post("/v1/orders", orders)
            runner = web.AppRunner(app)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            try:
                return await trade(f"http://127.0.0.1:{port}", "t", rate=200, seconds=None, seed=1, mid=100,
                                   max_orders=5, cancel_share=0.0, timeout=0.3)
            finally:
                await runner.cleanup()

        stats = asyncio.run(main())
        cids = [b["cid"] for b in seen]
        assert cids[0] == cids[1], cids  # the retry of the order whose reply was lost
        assert len(cids) == 6 and len(set(cids)) == 5 and all(16 <= len(c) <= 64 for c in cids)
        assert stats.submitted == 5 and stats.errors == 0, stats
