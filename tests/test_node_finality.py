"""Finality with real node processes (docs/FINALITY.md): five nodes on
127.0.0.1 make fills final; a member killed with kill -9 is voted out and
finality resumes without changing any final fill; a member restarted before
the vote carries on; a member frozen past ``--evict-after`` gets the entries
it wrote after the cut voided and reported; a fresh key's past-stamped order
rewinds nothing; a node whose clock is off refuses orders; one member of two
cannot admit a joiner alone; a member stopped with SIGTERM says Leave and
holds finality back for nobody; a member that reaches no majority answers
503 no_quorum, and the order counts once the others certify it.

The five-node cluster is shared by the tests of ``TestFiveMembers`` (each
leaves it whole and converged); the clock, admission and shutdown tests
start their own three nodes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from crdt.entry import BUY, GENESIS, SELL, Order, make_entry
from crdt.keys import SigningKey
from tests.nodes import (
    NodeProc,
    all_final,
    finality,
    http,
    logs_on_failure,
    make_nodes,
    order_at,
    report,
    restart_stopped,
    start_network,
    stop_all,
    wait_converged,
    wait_until,
)

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_node_finality")

#: Seconds of silence before the members vote a member out (the default is 10).  A kill -9 and
#: restart must fit well inside it, and a process start takes seconds on a loaded 2-core machine
#: (the suite runs four test workers): at 4 s, a restarted member was sometimes voted out first.
EVICT_AFTER = 8.0
#: Bound on waiting for something the cluster must do by itself (a loaded machine is slow).
SETTLE = 30.0


def final_fills(node: NodeProc) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(1000):
        page = node.get(f"/v1/fills?final=true&since={len(out)}&limit=1000")
        out += page["fills"]
        if not page["fills"]:
            break
    return out


def cross(maker: NodeProc, taker: NodeProc, price: int, qty: int = 2) -> tuple[str, str]:
    """A resting sell at ``maker`` and a buy at ``taker`` that fills it."""
    sell = maker.order("sell", qty, price)
    wait_until(lambda: order_at(taker, sell['id']) is not None, timeout=SETTLE,
               what=f"{maker.name}'s sell known at {taker.name}", nodes=[maker, taker])
    buy = taker.order("buy", qty, price)
    return sell["id"], buy["id"]


def is_prefix(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> bool:
    return after[:len(before)] == before


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    nodes = make_nodes(tmp_path_factory.mktemp("finality"), ("a", "b", "c", "d", "e"))
    for n in nodes:
        n.extra_args = ["--evict-after", f"{EVICT_AFTER:g}"]
    try:
        start_network(nodes, timeout=SETTLE)
        yield nodes
    finally:
        stop_all(nodes)


@pytest.fixture
def members(request: pytest.FixtureRequest, five: list[NodeProc]) -> Iterator[list[NodeProc]]:
    with logs_on_failure(request, five):
        restart_stopped(five)
        wait_until(lambda: all(finality(n)["member"] for n in five), timeout=SETTLE,
                   what="every node a member", nodes=five)
        wait_converged(five)
        yield five


class TestFiveMembers:
    def test_fills_become_final_alike_everywhere(self, request: pytest.FixtureRequest,
                                                 members: list[NodeProc]) -> None:
        a, b, c, d, _ = members
        before = len(final_fills(a))
        sell, buy = cross(a, b, 101)
        t0 = time.monotonic()
        wait_until(lambda: all_final(members) and len(final_fills(a)) > before, timeout=SETTLE,
                   what="the fill final on all five", nodes=members)
        report(request, f"a fill became final on all five nodes {time.monotonic() - t0:.2f} s after the taker's ack")
        ref = final_fills(a)
        assert ref[-1]["taker"] == buy and ref[-1]["maker"] == sell and ref[-1]["final"] is True
        for n in members[1:]:
            assert final_fills(n) == ref, n.name
        for n in members:
            view = order_at(n, buy)
            assert view is not None and view["final"] is True and view["status"] == "filled", (n.name, view)
        # waiting for finality in the order call itself
        sell2 = c.order("sell", 1, 102)
        wait_until(lambda: order_at(d, sell2['id']) is not None, timeout=SETTLE,
                   what="sell known at d", nodes=[c, d])
        r = d.request("POST", "/v1/orders?wait=final&timeout=20", {"side": "buy", "qty": 1, "price": 102})
        assert r.status == 201, r
        got = r.json()
        assert got["final"] is True and got["fills"] and all(f["final"] for f in got["fills"]), got

    def test_member_restarted_before_the_vote_stays_a_member(self, members: list[NodeProc]) -> None:
        a = members[0]
        d = members[3]
        d_id = d.node_id()
        d.kill9()
        d.start()  # well within --evict-after
        wait_until(lambda: all(finality(n)["member"] for n in members), timeout=SETTLE,
                   what="d still a member", nodes=members)
        for n in members:
            fin = finality(n)
            assert d_id in fin["members"], n.name
            assert all(dec["member"] != d_id for dec in fin["decisions"]), (n.name, fin["decisions"])
        cross(a, d, 103)
        wait_until(lambda: all_final(members), timeout=SETTLE, what="d's fill final everywhere", nodes=members)

    def test_killed_member_is_voted_out_and_finality_resumes(self, request: pytest.FixtureRequest,
                                                             members: list[NodeProc]) -> None:
        a, b, c, _, e = members
        live = members[:4]
        e_id = e.node_id()
        wait_until(lambda: all_final(members), timeout=SETTLE, what="quiet start", nodes=members)
        finals_before = {n.name: final_fills(n) for n in live}
        e.kill9()
        t_kill = time.monotonic()
        cross(a, b, 104)  # a fill made while e is silent: provisional until e is voted out
        assert finality(a)["pending"]
        wait_until(lambda: all_final(live), timeout=EVICT_AFTER + SETTLE, what="finality back without e",
                   nodes=live)
        resumed = time.monotonic() - t_kill
        report(request, f"finality resumed {resumed:.1f} s after kill -9 of a member with a fill waiting "
                        f"(--suspect-after 1, --evict-after {EVICT_AFTER:g})")
        for n in live:
            fin = finality(n)
            assert e_id not in fin["members"], n.name
            assert [dec["member"] for dec in fin["decisions"]].count(e_id) == 1, (n.name, fin["decisions"])
            assert is_prefix(finals_before[n.name], final_fills(n)), f"a final fill changed at {n.name}"
        # back again: it learns that it was voted out and is admitted afresh
        e.start()
        wait_until(lambda: finality(e)["member"] and all(e_id in finality(n)["members"] for n in live),
                   timeout=SETTLE, what="e admitted again", nodes=members)
        cross(e, c, 105)
        wait_until(lambda: all_final(members), timeout=SETTLE, what="e trades again", nodes=members)
        for n in live:
            assert is_prefix(finals_before[n.name], final_fills(n)), n.name

    def test_member_frozen_past_the_vote_gets_later_entries_voided(self, request: pytest.FixtureRequest,
                                                                   members: list[NodeProc]) -> None:
        a = members[0]
        live = members[1:]
        a_id = a.node_id()
        wait_until(lambda: all_final(members), timeout=SETTLE, what="quiet start", nodes=members)
        finals_before = {n.name: final_fills(n) for n in live}
        a.freeze()
        try:
            wait_until(lambda: all(any(dec["member"] == a_id for dec in finality(n)["decisions"]) for n in live),
                       timeout=EVICT_AFTER + SETTLE, what="a voted out", nodes=live)
            # an order sent while a is frozen waits in its socket; a takes it on waking,
            # before it hears of the vote: stamped past its cut, so void
            placed: list[Any] = []
            t = threading.Thread(target=lambda: placed.append(
                a.request("POST", "/v1/orders", {"side": "sell", "qty": 3, "price": 106}, timeout=30.0)))
            t.start()
            time.sleep(0.5)
        finally:
            a.thaw()
        t.join(35.0)
        assert placed and placed[0].status in (201, 409, 503), placed
        wait_until(lambda: finality(a)["voided"], timeout=SETTLE, what="a reports its voided entries", nodes=[a])
        voided = finality(a)["voided"]
        report(request, f"a frozen past --evict-after: voided {voided}")
        assert voided[0]["entries"] >= 1 and voided[0]["cut"] >= 1, voided
        if placed[0].status == 201:
            oid = placed[0].json()["id"]
            wait_until(lambda: (order_at(a, oid) or {}).get("void") is True, timeout=SETTLE,
                       what="the order reported void", nodes=[a])
            for n in live:
                seen = order_at(n, oid)
                assert seen is None or seen.get("status") != "filled", (n.name, seen)
        for n in live:
            assert is_prefix(finals_before[n.name], final_fills(n)), n.name
        wait_until(lambda: finality(a)["member"] and all(a_id in finality(n)["members"] for n in live),
                   timeout=SETTLE, what="a admitted again", nodes=members)
        wait_converged(members)

    def test_past_stamped_order_from_a_fresh_key_rewinds_nothing(self, request: pytest.FixtureRequest,
                                                                 members: list[NodeProc]) -> None:
        """Regression: a fresh key's sell stamped in 1970 used to sort before every
        order, rewind the book and take an acknowledged trade for itself."""
        a, b, c, d, _ = members
        cross(a, b, 107)
        wait_until(lambda: all_final(members), timeout=SETTLE, what="the trade final", nodes=members)
        finals = {n.name: final_fills(n) for n in members}
        revoked = {n.name: n.status()["replication"]["revoked_fills"] for n in members}
        stranger = SigningKey(bytes(range(32)))
        past = make_entry(stranger, seq=1, hlc=(86_400_000 << 16), prev=GENESIS,
                          body=Order(side=SELL, price=1, qty=2))
        body = msgpack.packb({"entries": [past.to_wire()]}, use_bin_type=True)
        r = http("POST", c.url + "/peer/v1/push", body, headers={"Content-Type": "application/msgpack"})
        assert r.status in (200, 422), r
        buy_again = make_entry(stranger, seq=2, hlc=(86_400_001 << 16), prev=past.hash,
                               body=Order(side=BUY, price=200, qty=1))
        body = msgpack.packb({"entries": [buy_again.to_wire()]}, use_bin_type=True)
        http("POST", d.url + "/peer/v1/push", body, headers={"Content-Type": "application/msgpack"})
        # the cost of such entries: 100 fresh keys, each with one 1970-stamped order
        t0 = time.perf_counter()
        for i in range(100):
            k = SigningKey(bytes([i + 1]) * 32)
            e = make_entry(k, seq=1, hlc=((86_400_000 + i) << 16), prev=GENESIS, body=Order(side=SELL, price=1, qty=1))
            http("POST", c.url + "/peer/v1/push", msgpack.packb({"entries": [e.to_wire()]}, use_bin_type=True),
                 headers={"Content-Type": "application/msgpack"})
        report(request, f"100 past-stamped orders from fresh keys: {(time.perf_counter() - t0) * 10:.1f} ms per "
                        "push, answer included")
        time.sleep(1.0)
        wait_until(lambda: all_final(members), timeout=SETTLE, what="quiet again", nodes=members)
        for n in members:
            st = n.status()
            assert st["replication"]["revoked_fills"] == revoked[n.name], n.name
            assert is_prefix(finals[n.name], final_fills(n)), n.name
            assert order_at(n, past.hash.hex()) is None, f"{n.name} matched a non-member's order"
        wait_converged(members)


class TestClocks:
    def test_node_with_a_skewed_clock_refuses_orders_and_shows_offsets(self, request: pytest.FixtureRequest,
                                                                       tmp_path: Path) -> None:
        nodes = make_nodes(tmp_path, ("a", "b", "c"))
        nodes[2].extra_args = ["--clock-offset-ms", "4000"]
        try:
            with logs_on_failure(request, nodes):
                start_network(nodes, members=False)  # c's clock is off: it may not be admitted
                a, b, c = nodes

                def c_unhealthy() -> bool:
                    clock = c.status()["clock"]
                    return not clock["healthy"] and clock["offset_ms"] < -3000

                wait_until(c_unhealthy, timeout=SETTLE, what="c sees its clock 4 s off", nodes=nodes)
                r = c.request("POST", "/v1/orders", {"side": "buy", "qty": 1, "price": 100})
                assert r.status == 503 and r.json()["error"] == "clock_unhealthy", r
                assert "clock" in c.logs(200)
                offsets = {p["short"]: p["clock_offset_ms"] for p in a.status()["peers"]}
                c_short = c.status()["short_id"]
                assert offsets[c_short] is not None and offsets[c_short] > 3000, offsets
                report(request, f"offsets seen by a: {offsets}")
                # the healthy majority trades on, and c still follows the book
                sell = a.order("sell", 1, 100)
                assert a.status()["clock"]["healthy"] and b.status()["clock"]["healthy"]
                wait_until(lambda: order_at(c, sell['id']) is not None, timeout=SETTLE,
                           what="c holds a's order", nodes=nodes)
        finally:
            stop_all(nodes)


class TestAdmissionTakesAMajority:
    def test_one_member_of_two_cannot_admit_a_joiner_alone(self, request: pytest.FixtureRequest,
                                                           tmp_path: Path) -> None:
        """Regression (issue 20, the split brain): admission was unilateral, so in
        a network of members a and b split {a} | {b}, each side admitted a fresh
        node of its own, voted the other side's member out and finalized its own
        fills.  Here b is frozen: c, bootstrapping from a, gets a's vote but not
        a majority of {a, b}, so it stays out; once b thaws it votes too."""
        nodes = make_nodes(tmp_path, ("a", "b", "c"))
        a, b, c = nodes
        with logs_on_failure(request, nodes):
            try:
                start_network([a, b], timeout=SETTLE)
                c_id = None
                b.freeze()
                try:
                    c.start(wait=False)
                    wait_until(lambda: bool(finality(a)["admitting"]), timeout=SETTLE, what="a's vote for c",
                               nodes=[a, c])
                    c_id = c.node_id()
                    assert finality(a)["admitting"] == {c_id: [a.node_id()]}
                    time.sleep(3.0)  # several join rounds: a alone never admits
                    assert not finality(c)["member"] and c_id not in finality(a)["members"]
                finally:
                    b.thaw()
                wait_until(lambda: all(c_id in finality(n)["members"] for n in nodes) and finality(c)["member"],
                           timeout=SETTLE, what="c admitted by a and b", nodes=nodes)
                assert finality(a)["admitting"] == {}
            finally:
                stop_all(nodes)


class TestCleanShutdown:
    def test_a_member_stopped_with_sigterm_holds_finality_back_for_nobody(
            self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """A member that shuts down cleanly writes Leave, and the others vote it
        out at once: with --evict-after far longer than the test waits (so the
        eviction for silence cannot be what moves finality), a fill made after
        the stop becomes final; nothing the leaver wrote up to its Leave is
        voided; restarted, it is admitted again and trades."""
        nodes = make_nodes(tmp_path, ("a", "b", "c"))
        for n in nodes:
            n.extra_args = ["--evict-after", "600"]
        a, b, c = nodes
        with logs_on_failure(request, nodes):
            try:
                start_network(nodes, timeout=SETTLE)
                c_id = c.node_id()
                sell = c.order("sell", 2, 150)  # rests in c's log, which must survive its leave
                wait_until(lambda: all_final(nodes), timeout=SETTLE, what="quiet start", nodes=nodes)
                assert c.stop() == 0
                t_stop = time.monotonic()
                assert "left its network" in c.log_file.read_text(), c.logs(20)
                cross(a, b, 111)
                wait_until(lambda: all_final([a, b]), timeout=SETTLE, what="finality back without c",
                           nodes=[a, b])
                report(request, f"finality resumed {time.monotonic() - t_stop:.1f} s after c's SIGTERM "
                                f"(--evict-after 600)")
                for n in (a, b):
                    fin = finality(n)
                    assert c_id not in fin["members"], n.name
                    gone = [d for d in fin["decisions"] if d["member"] == c_id]
                    assert len(gone) == 1, (n.name, fin["decisions"])
                    got = order_at(n, sell["id"])
                    assert got is not None and got["status"] == "open" and not got.get("void"), (n.name, got)
                c.start()
                wait_until(lambda: finality(c)["member"] and all(c_id in finality(n)["members"] for n in (a, b)),
                           timeout=SETTLE, what="c admitted again", nodes=nodes)
                # nothing c wrote up to its Leave is void; only the heartbeat that says it is
                # back may be, when c restarts before it hears that it was voted out
                assert all(v["orders"] == 0 and v["entries"] <= 1 for v in finality(c)["voided"]), \
                    finality(c)["voided"]
                buy = a.order("buy", 2, 150)
                assert buy["fills"], buy  # c's sell from before its leave is still on the book
                wait_until(lambda: all_final(nodes), timeout=SETTLE, what="final everywhere again", nodes=nodes)
            finally:
                stop_all(nodes)


class TestCertification:
    def test_a_member_that_reaches_no_majority_answers_no_quorum(
            self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """An order is answered only once a majority of members certified it
        (docs/FINALITY.md, section 7).  With b and c frozen, a reaches no
        majority: its order is answered 503 no_quorum with the order's id, not
        201.  The order stays in a's log: once b and c thaw, they certify it,
        a retry with the same cid answers 200 for the same order, and it is on
        every node's book, not void."""
        nodes = make_nodes(tmp_path, ("a", "b", "c"))
        for n in nodes:
            n.extra_args = ["--evict-after", "600"]  # nobody is voted out while frozen
        a, b, c = nodes
        body = {"side": "buy", "qty": 1, "price": 90, "cid": "cert-1"}
        with logs_on_failure(request, nodes):
            try:
                start_network(nodes, timeout=SETTLE)
                placed = a.request("POST", "/v1/orders", body)
                assert placed.status == 201, placed  # a majority certifies at once
                b.freeze()
                c.freeze()
                try:
                    refused = a.request("POST", "/v1/orders", body | {"cid": "cert-2"})
                finally:
                    b.thaw()
                    c.thaw()
                assert refused.status == 503, refused
                answer = refused.json()
                assert answer["error"] == "no_quorum" and len(answer["id"]) == 64, answer
                oid = answer["id"]
                cert = finality(a)["certified"]  # what an operator sees: a's log short of a majority
                assert cert["upto"] < cert["length"] and cert["no_quorum"] == 1, cert
                # a retry with the cid is safe: it answers for the same order, 503 until
                # b and c (back, and pushed to again) have certified it
                retries: list[Any] = []
                wait_until(lambda: retries.append(a.request("POST", "/v1/orders", body | {"cid": "cert-2"}))
                           or retries[-1].status == 200, timeout=SETTLE, what="the retry answered 200", nodes=nodes)
                assert all(r.status == 503 for r in retries[:-1]), retries
                assert retries[-1].json()["id"] == oid and retries[-1].json()["repeat"] is True
                wait_until(lambda: all(order_at(n, oid) is not None for n in nodes), timeout=SETTLE,
                           what="the order on every node", nodes=nodes)
                wait_until(lambda: all_final(nodes), timeout=SETTLE, what="final everywhere", nodes=nodes)
                for n in nodes:
                    got = order_at(n, oid)
                    assert got is not None and got["status"] == "open" and not got.get("void"), (n.name, got)
                cert = finality(a)["certified"]
                assert set(cert["by"]) == {b.node_id(), c.node_id()} and cert["upto"] > 0, cert
            finally:
                stop_all(nodes)
