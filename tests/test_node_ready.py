"""Honest readiness: ``/readyz`` says ready only once the node has synced with
a live peer, or found none within the bound, and says which.

Regression: a restarted node answered ready before it had caught up, and
orders placed in that window matched against a stale book and were revised
for up to 1.5 s.
"""

from __future__ import annotations

import time
from hashlib import blake2b
from pathlib import Path

import msgpack
import pytest

from crdt.entry import GENESIS, Heartbeat, make_entry
from crdt.keys import SigningKey
from tests.nodes import NodeProc, cluster, free_port, http, logs_on_failure, stop_all, wait_until

ORIGINS = 4000  # entries the restarted node lacks: catching up takes a moment


def _push_heartbeats(node: NodeProc) -> None:
    now = time.time_ns() // 1_000_000
    wires = [make_entry(SigningKey(blake2b(f"ready origin {i}".encode(), digest_size=32).digest()), seq=1,
                        hlc=(now - 10_000) << 16, prev=GENESIS, body=Heartbeat()).to_wire() for i in range(ORIGINS)]
    for start in range(0, len(wires), 2000):
        r = http("POST", node.url + "/peer/v1/push", msgpack.packb({"entries": wires[start:start + 2000]}),
                 headers={"Content-Type": "application/msgpack"}, timeout=30)
        assert r.status == 200, r


class TestReadiness:
    def test_restarted_node_is_ready_only_once_caught_up(self, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
        with cluster(tmp_path, ("a", "b")) as nodes, logs_on_failure(request, nodes):
            a, b = nodes
            b.kill9()
            _push_heartbeats(a)  # written while b is down
            held = a.status()["counts"]["entries"]
            b.start(wait=False)
            first_ready = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # bounded: 20 s
                try:
                    r = http("GET", b.url + "/readyz", timeout=1)
                except OSError:
                    time.sleep(0.01)
                    continue
                if r.status == 200:
                    first_ready = r.json()
                    break
                assert r.status == 503 and r.json()["error"] == "not_ready", r
                assert r.json()["detail"]
                time.sleep(0.01)
            assert first_ready is not None, b.logs()
            at_ready = b.status()["counts"]["entries"]
            assert at_ready >= held, f"ready with {at_ready} of {held} entries"
            assert first_ready["synced_with"] == a.status()["short_id"] and "alone" not in first_ready

    def test_first_node_of_a_network_is_ready_alone_at_once(self, tmp_path: Path) -> None:
        n = NodeProc(name="first", port=free_port(), data_dir=tmp_path / "first")
        try:
            n.start()
            r = n.get("/readyz")
            assert r["ready"] is True and r["alone"] is True and "synced_with" not in r
            assert n.status()["ready"]
        finally:
            n.stop()

    def test_no_live_peer_within_the_bound_means_orders_wait_for_a_network(
            self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        """A bootstrap node that never answers: 503 not_ready (orders too) until
        the bound passes; then still 503, because a node told to join a network
        never founds one of its own (that would split the exchange in two)."""
        n = NodeProc(name="lonely", port=free_port(), data_dir=tmp_path / "lonely", bootstrap=[free_port()],
                     extra_args=["--ready-timeout", "2"])
        with logs_on_failure(request, [n]):
            try:
                n.start(wait=False)
                wait_until(lambda: _answers(n), timeout=20, what="lonely serving", nodes=[n])
                r = n.request("GET", "/readyz")
                assert r.status == 503 and r.json()["error"] == "not_ready", r
                order = n.request("POST", "/v1/orders", {"side": "buy", "qty": 1, "price": 5})
                assert order.status == 503 and order.json()["error"] == "not_ready", order
                wait_until(lambda: "network" in n.request("GET", "/readyz").json()["detail"], timeout=15,
                           what="the bound to pass", nodes=[n])
                r = n.request("GET", "/readyz")
                assert r.status == 503 and r.json()["detail"] == "looking for a network to join", r
                order = n.request("POST", "/v1/orders", {"side": "buy", "qty": 1, "price": 5})
                assert order.status == 503 and order.json()["error"] == "not_ready", order
                assert n.status()["finality"]["member"] is False
            finally:
                stop_all([n])


def _answers(n: NodeProc) -> bool:
    try:
        return http("GET", n.url + "/healthz", timeout=1).status == 200
    except OSError:
        return False
