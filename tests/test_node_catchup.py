"""Catch-up through large peer replies over a slow link.

Regression test for the truncated-reply bug: the node read a peer's reply with
one ``StreamReader.read(cap)``, which returns what is buffered so far, so any
``/peer/v1/sync`` reply past about 128 KiB arrived cut short, failed to decode
and got a healthy peer backed off.  A node that needed such replies (many
origins in the version vector, or full pages of entries) never caught up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from hashlib import blake2b
from pathlib import Path

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crdt.entry import GENESIS, Heartbeat, Order, make_entry
from crdt.keys import SigningKey
from tests.linkproxy import SlowLink, slow_link
from tests.nodes import NodeProc, free_port, http, logs_on_failure, report, stop_all, wait_until

ORIGINS = 10_000  # one heartbeat each: a version vector of about 400 KB
ORDER_ORIGINS = 3
ORDERS_EACH = 4_000  # a full sync page of orders is about 0.8 MB
READ_TIMEOUT = 30.0  # seconds for one read of the catching-up node (see the test)


def _key(i: int) -> SigningKey:
    return SigningKey(blake2b(f"catch-up origin {i}".encode(), digest_size=32).digest())


def _wire_entries(now_ms: int) -> list[list[object]]:
    out: list[list[object]] = []
    for i in range(ORIGINS):
        out.append(make_entry(_key(i), seq=1, hlc=(now_ms - 60_000) << 16, prev=GENESIS,
                              body=Heartbeat()).to_wire())
    for j in range(ORDER_ORIGINS):
        key = _key(ORIGINS + j)
        prev = GENESIS
        for seq in range(1, ORDERS_EACH + 1):
            e = make_entry(key, seq=seq, hlc=(now_ms - 50_000 + seq) << 16, prev=prev,
                           body=Order(side=seq % 2, price=10_000 + (seq % 50) * (1 if seq % 2 else -1) * 3,
                                      qty=1 + seq % 7))
            prev = e.hash
            out.append(e.to_wire())
    return out


def _push(node: NodeProc, wires: list[list[object]]) -> None:
    for start in range(0, len(wires), 4_000):
        body = msgpack.packb({"entries": wires[start:start + 4_000]}, use_bin_type=True)
        r = http("POST", node.url + "/peer/v1/push", body,
                 headers={"Content-Type": "application/msgpack"}, timeout=30.0)
        assert r.status == 200, r


def merged_here(node: NodeProc) -> float:
    """Entries of other origins the node merged (``p2pex_entries_received``, every kind)."""
    text = http("GET", node.url + "/metrics", timeout=READ_TIMEOUT).body.decode()
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "p2pex_entries_received"
               for s in fam.samples if s.name == "p2pex_entries_received_total")


@pytest.fixture
def slow_pair(tmp_path: Path) -> Iterator[tuple[NodeProc, NodeProc, SlowLink]]:
    """Node ``a`` reachable by its peers only through a slow link; ``b`` not started."""
    proxy_port = free_port()
    a = NodeProc(name="a", port=free_port(), data_dir=tmp_path / "a",
                 extra_args=["--advertise", f"127.0.0.1:{proxy_port}", "--max-foreign-origins", "20000"])
    b = NodeProc(name="b", port=free_port(), data_dir=tmp_path / "b", bootstrap=[a.port],
                 extra_args=["--max-foreign-origins", "20000"])
    with slow_link(listen_port=proxy_port, target_port=a.port) as link:
        try:
            yield a, b, link
        finally:
            stop_all([a, b])


class TestLargeReplies:
    def test_catch_up_through_megabyte_replies_over_a_slow_link(
            self, request: pytest.FixtureRequest, slow_pair: tuple[NodeProc, NodeProc, SlowLink]) -> None:
        a, b, link = slow_pair
        with logs_on_failure(request, [a, b]):
            a.start()
            wires = _wire_entries(time.time_ns() // 1_000_000)
            _push(a, wires)
            total = a.status()["counts"]["entries"]
            assert total > len(wires)  # and a's own: its genesis, its heartbeats
            b.start()
            # Polled through cheap reads: /v1/status carries the version vector, about 0.8 MB of
            # JSON with these 10,000 origins, and five of those a second kept a loaded machine
            # busy.  A read still waits while b takes in a page (4,000 entries and two version
            # vectors of 10,000 origins in one step of its loop): seconds on a loaded machine.
            # The node promises no read latency while it catches up, only the catch-up itself
            # (the 90 s below), so a read may take up to READ_TIMEOUT.
            wait_until(lambda: merged_here(b) >= total, timeout=90.0,
                       what=f"b holding all {total} entries", nodes=[a, b], interval=0.2)
            # every pushed log, whole, at b: these origins write nothing more, so their heads
            # stay put (state hashes would not: a and b write liveness heartbeats)
            pushed = {_key(i).public.hex(): 1 for i in range(ORIGINS)}
            pushed |= {_key(ORIGINS + j).public.hex(): ORDERS_EACH for j in range(ORDER_ORIGINS)}
            vv = b.get("/v1/status", timeout=READ_TIMEOUT)["version_vector"]
            assert {o: vv.get(o, 0) for o in pushed} == pushed
            log = b.log_file.read_text()
            assert "incomplete input" not in log and "not valid msgpack" not in log
            report(request, f"[figures] caught up on {total} entries ({ORIGINS} origins) through a slow "
                            f"link; {link.bytes_forwarded / 1e6:.1f} MB forwarded")
