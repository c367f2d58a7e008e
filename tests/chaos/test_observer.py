"""The observer against a scripted node that already speaks the finality
contract (final flags, ``?final=true`` paging, ``finality`` in the status,
final order states), on 127.0.0.1: what it records when final fills appear,
change or disappear, when provisional fills go away and when a cancelled
order becomes final, and that the checker then reports the retraction.
Today's node has no finality, so this is where that path runs before it lands."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from tests.chaos.checker import check
from tests.chaos.cluster import Cluster, Node
from tests.chaos.history import Check, FillKey, NodeState, Phase, Recorder
from tests.chaos.observer import Observer

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


@dataclass
class Script:
    """What the scripted node shows: fills (the first ``final`` of them final) and orders."""

    fills: list[FillKey] = field(default_factory=list)
    final: int = 0
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)

    def view(self, i: int, f: FillKey) -> dict[str, Any]:
        return {"seq": i, "id": f"f{i}", "taker": f[0], "maker": f[1], "price": f[2], "qty": f[3],
                "taker_side": "buy", "final": i < self.final}


@dataclass
class StubNode:
    name: str
    url: str

    def live(self) -> bool:
        return True


@dataclass
class StubCluster:
    nodes: dict[str, StubNode]

    def poll(self) -> list[str]:
        return []

    def scan_logs(self, name: str) -> tuple[list[str], int]:
        return [], 0


def app_for(script: Script) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        return web.json_response({"state_hash": "h", "counts": {"fills": len(script.fills)}, "version_vector": {},
                                  "finality": {"frontier": 1, "lag_ms": 5, "final_fills": script.final,
                                               "members": [], "network": "00", "member": True, "holding": None}})

    async def fills(request: web.Request) -> web.Response:
        since, limit = int(request.query.get("since", 0)), int(request.query.get("limit", 1000))
        shown = list(enumerate(script.fills))
        if request.query.get("final") == "true":
            shown = shown[:script.final]
        page = shown[since: since + limit]
        return web.json_response({"fills": [script.view(i, f) for i, f in page], "next": since + len(page),
                                  "total": len(shown)})

    async def order(request: web.Request) -> web.Response:
        view = script.orders.get(request.match_info["oid"])
        if view is None:
            return web.json_response({"error": "unknown_order", "detail": "no such order"}, status=404)
        return web.json_response(view)

    async def book(request: web.Request) -> web.Response:
        return web.json_response({"bids": [], "asks": []})

    app = web.Application()
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/fills", fills)
    app.router.add_get("/v1/orders/{oid}", order)
    app.router.add_get("/v1/book", book)
    return app


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    runner = web.AppRunner(app_for(script))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield script, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class TestObserverWithFinality:
    async def test_records_final_fills_their_retraction_and_final_cancels(self, scripted: tuple[Script, str]) -> None:
        script, url = scripted
        now = [0.0]
        rec = Recorder({})
        node = StubNode(name="n1", url=url)
        observer = Observer(cast(Cluster, StubCluster({"n1": node})), rec, lambda: now[0])
        async with aiohttp.ClientSession() as session:
            await observer.status(session, cast(Node, node))
            assert observer.finality

            script.fills, script.final = [(A, B, 100, 5), (C, B, 100, 1), (D, A, 99, 2)], 2
            now[0] = 1.0
            await observer.sample(session, cast(Node, node))
            assert [(s.seq, s.fill[4]) for s in rec.seen] == [(0, True), (1, True), (2, False)]

            script.fills[1] = (C, B, 100, 2)  # final fill #1 changed
            now[0] = 2.0
            await observer.sample(session, cast(Node, node))
            assert rec.seen[-1].seq == 1 and rec.seen[-1].fill == (C, B, 100, 2, True)

            script.fills, script.final = script.fills[:1], 1  # #1 and the provisional fill are gone
            now[0] = 3.0
            await observer.sample(session, cast(Node, node))
            assert [(t.node, t.total) for t in rec.final_totals] == [("n1", 1)]
            assert {g.fill for g in rec.gone} >= {(D, A, 99, 2)}

            observer.note_cancel("n1", D, None)
            script.orders[D] = {"id": D, "status": "cancelled", "filled": 2, "final": False}
            now[0] = 4.0
            await observer.sample(session, cast(Node, node))
            assert rec.order_finals == []
            script.orders[D]["final"] = True
            now[0] = 5.0
            await observer.sample(session, cast(Node, node))
            assert [(o.order_id, o.status, o.filled) for o in rec.order_finals] == [(D, "cancelled", 2)]

            now[0] = 6.0
            await observer.check(session, phase="p", t_heal=5.5, timeout=2.0, sample=[])
        assert rec.checks[0].t_converged == 6.0
        state = rec.checks[0].nodes[0]
        assert state.finality is not None and rec.fill_lists[state.fills] == ((A, B, 100, 5, True),)

        rec.phases.append(Phase(name="p", title="scripted", supported=True, t_fault=0.5, t_heal=5.5, t_end=6.0))
        row = check(rec.freeze()).rows[0]
        # #1 was retracted twice (5 lots became 2, then it vanished); the cancel was final and stayed put
        assert row.final_retracted == 2 and row.final_fills == 1
        assert row.cancels_final == 1 and row.cancel_violations == 0
        assert row.revoked == 1  # the provisional D x A fill


class TestCheckerOnAFinalNode:
    def test_converged_needs_equal_final_flags(self) -> None:
        rec = Recorder({})
        a = rec.fill_list(((A, B, 100, 5, True),))
        b = rec.fill_list(((A, B, 100, 5, False),))
        rec.checks.append(Check(phase="p", t=2.0, t_heal=1.0, t_converged=1.5, nodes=(
            NodeState(node="n1", alive=True, state_hash="h", fills=a),
            NodeState(node="n2", alive=True, state_hash="h", fills=b))))
        rec.phases.append(Phase(name="p", title="scripted", supported=True, t_heal=1.0, t_end=2.0))
        assert not check(rec.freeze()).rows[0].converged
