"""Who a node admits as a peer, and where it sends requests, with real node
processes on 127.0.0.1.

Regressions:

- peer-table poisoning: 250 records signed by fresh keys, all naming one
  node's URL, entered the table (it held 256), so every order was pushed 160
  times and a new honest node found no room.  A record now enters the table
  only once the node at its URL signs a fresh challenge with the record's key,
  and the table holds one peer per URL;
- a peer that never proves its key gets no pushes and no pulls;
- signed records could aim a node's POSTs anywhere: at a path and query of
  another service on 127.0.0.1, or at a loopback address spelled ``127.1``,
  ``2130706433``, ``0x7f000001`` or ``0177.0.0.1`` past a filter that only
  knew ``127.0.0.1``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from hashlib import blake2b
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgpack
import pytest

from crdt.keys import SigningKey
from net.peers import PeerRecord
from tests.nodes import NodeProc, Reply, cluster, free_port, http, logs_on_failure, stop_all, wait_full_mesh, wait_until
from tests.test_node_faults import FakePeer

MSGPACK = "application/msgpack"


def fresh_key(tag: str, i: int) -> SigningKey:
    return SigningKey(blake2b(f"p2pex test: {tag} {i}".encode(), digest_size=32).digest())


def send_records(node: NodeProc, records: list[list[Any]]) -> Reply:
    r = http("POST", node.url + "/peer/v1/peers", msgpack.packb({"records": records}, use_bin_type=True),
             headers={"Content-Type": MSGPACK})
    assert r.status == 200, r
    return r


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Listener:
    """Counts every request that reaches a port on 127.0.0.1, whatever its path."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.hits.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def pair(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[NodeProc]]:
    with cluster(tmp_path, ("a", "b")) as nodes, logs_on_failure(request, nodes):
        yield nodes


class TestPeerProof:
    def test_fresh_keys_at_one_url_stay_out_of_the_table(self, pair: list[NodeProc], tmp_path: Path) -> None:
        a, b = pair
        b_id = b.node_id()
        flood = [PeerRecord.create(fresh_key("flood", i), b.url, now_ms()).to_wire() for i in range(250)]
        send_records(a, flood)
        time.sleep(1.5)  # several proof rounds
        st = a.status()
        assert [p["id"] for p in st["peers"]] == [b_id], st["peers"]
        # each entry a writes (its order, its heartbeats) is pushed once: to b, the only peer
        before, own_before = st["replication"]["pushed"], st["counts"]["own_entries"]
        a.order("buy", 1, 10)
        wait_until(lambda: a.status()["replication"]["pushed"] > before, timeout=5, what="a push", nodes=pair)
        time.sleep(0.3)
        st = a.status()
        assert 1 <= st["replication"]["pushed"] - before <= st["counts"]["own_entries"] - own_before
        # a new honest node still gets into the table
        c = NodeProc(name="c", port=free_port(), data_dir=tmp_path / "c", bootstrap=[a.port])
        try:
            c.start()
            wait_full_mesh([a, b, c])
            assert c.node_id() in a.peer_ids()
        finally:
            stop_all([c])

    def test_a_peer_that_never_proves_its_key_gets_nothing(self, pair: list[NodeProc]) -> None:
        a, b = pair
        with FakePeer({"/peer/v1/peers": {"records": []},
                       "/peer/v1/sync": {"entries": [], "more": False, "vv": {}}}, proves=False) as fake:
            for n in (a, b):
                send_records(n, [fake.record()])
            wait_until(lambda: fake.hits.get("/peer/v1/peers", 0) >= 2, timeout=10,
                       what="both nodes challenge the fake peer", nodes=pair)
            o = a.order("sell", 1, 1000)
            b.order("buy", 1, 1)
            time.sleep(1.5)  # pull rounds, pushes, exchange rounds
            assert not {"/peer/v1/push", "/peer/v1/link", "/peer/v1/sync"} & set(fake.hits), fake.hits
            assert fake.key.public.hex() not in a.peer_ids() | b.peer_ids()
            # the record is not relayed either: b never hears of it from a
            assert fake.hits.get("/peer/v1/peers", 0) <= 4, fake.hits
            assert b.get(f"/v1/orders/{o['id']}")["status"] == "open"

    def test_a_peer_whose_key_changed_at_its_url_is_replaced(self, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
        """One peer per URL: b restarts on the same port with a new key; a drops
        b's old key, which no longer proves, and admits the new one (with c:
        admission takes a majority of the members, and b's old key votes no more)."""
        with cluster(tmp_path, ("a", "b", "c")) as nodes, logs_on_failure(request, nodes):
            a, b, c = nodes
            old = b.node_id()
            b.stop()
            for name in ("node.key", "node.sqlite", "node.sqlite-wal", "node.sqlite-shm"):
                (b.data_dir / name).unlink(missing_ok=True)
            b.start()
            new = b.node_id()
            assert new != old
            wait_until(lambda: a.peer_ids() == {new, c.node_id()}, timeout=30, what="a holding b's new key only",
                       nodes=nodes, interval=0.2)


class TestPeerUrls:
    def test_records_aimed_at_other_services_are_never_dialed(self, tmp_path: Path,
                                                              request: pytest.FixtureRequest) -> None:
        loopback_node = NodeProc(name="lo", port=free_port(), data_dir=tmp_path / "lo")
        public_node = NodeProc(name="pub", port=free_port(), data_dir=tmp_path / "pub",
                               extra_args=["--peer-networks", "public"])
        nodes = [loopback_node, public_node]
        with Listener() as target, logs_on_failure(request, nodes):
            try:
                for n in nodes:
                    n.start()
                p = target.port
                # a node on loopback may dial loopback peers, but only at http://HOST:PORT
                shapes = [f"http://127.0.0.1:{p}/internal/admin?cmd=x&y=", f"http://127.0.0.1:{p}/",
                          f"http://user:pw@127.0.0.1:{p}", f"http://127.0.0.1:{p}#x", f"http://127.0.0.1:{p}?",
                          f"https://127.0.0.1:{p}", f"http://127.0.0.1:{p}/peer", f"HTTP://127.0.0.1:{p}/x"]
                send_records(loopback_node, [PeerRecord.create(fresh_key("shape", i), u, now_ms()).to_wire()
                                             for i, u in enumerate(shapes)])
                # a node that dials public addresses only: every spelling of loopback
                spellings = [f"http://{h}:{p}" for h in ("127.0.0.1", "127.1", "2130706433", "0x7f000001",
                                                        "0177.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]",
                                                        "127.000.000.001", "0.0.0.0")]
                send_records(public_node, [PeerRecord.create(fresh_key("spelling", i), u, now_ms()).to_wire()
                                           for i, u in enumerate(spellings)])
                time.sleep(2.0)  # many proof rounds
                assert target.hits == [], target.hits
                for n in nodes:
                    st = n.status()
                    assert st["peers"] == [] and st["peer_candidates"] == 0, st
            finally:
                stop_all(nodes)
