"""Rate limits and page sizes, against real node processes.

Regressions: one client placed 827 orders/s with nothing to slow it; four
clients reading ``/v1/fills?limit=10000`` (2.6 MB each) pushed ``/healthz``
to a 551 ms median.  Now writes are limited per client token, reads per
client address (weighted by page size) and peer calls per peer address, each
a 429 with ``Retry-After``; a fills page holds at most 1,000 rows, encoded
once; ``/healthz`` is never limited.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from crdt.entry import Order
from net.ratelimit import Buckets, Rate, parse_rate
from tests.nodes import NodeProc, free_port, http, logs_on_failure, report, wait_until, write_history

MSGPACK = "application/msgpack"


@pytest.fixture
def tight(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeProc]:
    n = NodeProc(name="tight", port=free_port(), data_dir=tmp_path / "tight",
                 extra_args=["--write-limit", "20/20", "--read-limit", "50/50", "--peer-limit", "30/30"])
    with logs_on_failure(request, [n]):
        try:
            yield n.start()
        finally:
            n.stop()


class TestLimits:
    def test_writes_over_the_limit_429_and_change_nothing(self, tight: NodeProc,
                                                          request: pytest.FixtureRequest) -> None:
        before = tight.status()["counts"]["own_orders"]
        codes = []
        for i in range(60):
            r = tight.request("POST", "/v1/orders", {"side": "buy", "qty": 1, "price": 1 + i % 5})
            codes.append(r.status)
            if r.status == 429:
                body = r.json()
                assert body["error"] == "rate_limited" and body["detail"], body
        placed = codes.count(201)
        report(request, f"\n[figures] 60 orders at once against --write-limit 20/20: {placed} placed, "
                        f"{codes.count(429)} refused with 429")
        assert codes.count(429) >= 20 and placed >= 20 and set(codes) <= {201, 429}
        assert tight.status()["counts"]["own_orders"] == before + placed

    def test_429_carries_retry_after(self, tight: NodeProc) -> None:
        import urllib.error
        import urllib.request

        seen = None
        for _ in range(200):
            try:
                urllib.request.urlopen(tight.url + "/v1/status", timeout=5).read()
            except urllib.error.HTTPError as exc:
                with exc:
                    assert exc.code == 429
                    seen = exc.headers.get("Retry-After")
                    break
        assert seen is not None and seen.isdigit() and int(seen) >= 1

    def test_reads_limited_per_address_healthz_never(self, tight: NodeProc) -> None:
        reads = [http("GET", tight.url + "/v1/book").status for _ in range(120)]
        assert reads.count(429) > 0 and reads.count(200) >= 50
        assert {http("GET", tight.url + "/healthz").status for _ in range(200)} == {200}
        assert {http("GET", tight.url + "/readyz").status for _ in range(100)} == {200}

    def test_peer_calls_limited_per_address(self, tight: NodeProc) -> None:
        body = msgpack.packb({"vv": {}, "max": 10})
        codes = [http("POST", tight.url + "/peer/v1/sync", body, headers={"Content-Type": MSGPACK})
                 for _ in range(80)]
        limited = [r for r in codes if r.status == 429]
        assert limited and sum(r.status == 200 for r in codes) >= 30
        assert msgpack.unpackb(limited[0].body, raw=False)["error"] == "rate_limited"

    def test_bucket_refills(self) -> None:
        now = [0.0]
        b = Buckets(Rate(per_s=10, burst=5), clock=lambda: now[0])
        assert [b.take("k") for _ in range(5)] == [0.0] * 5
        assert b.take("k") == pytest.approx(0.1)
        assert b.take("other") == 0.0  # another client has its own bucket
        now[0] = 0.5
        assert [b.take("k") == 0.0 for _ in range(6)] == [True] * 5 + [False]
        assert parse_rate("5000/10000") == Rate(per_s=5000, burst=10000)
        assert parse_rate("7") == Rate(per_s=7, burst=14)
        assert parse_rate("0") is None
        with pytest.raises(ValueError):
            parse_rate("fast")


class TestPages:
    def test_healthz_stays_fast_while_four_clients_read_fills(self, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
        n = NodeProc(name="reader", port=free_port(), data_dir=tmp_path / "reader")
        with logs_on_failure(request, [n]):
            try:
                write_history(n.data_dir, (Order(side=i % 2, price=100, qty=1) for i in range(20_000)),
                              start_ms=time.time_ns() // 1_000_000 - 60_000)
                n.start()
                wait_until(lambda: n.get("/v1/fills?limit=1")["total"] == 10_000, timeout=30,
                           what="10,000 fills", nodes=[n])
                r = http("GET", n.url + "/v1/fills?limit=10000")
                assert r.status == 400 and r.json()["error"] == "bad_limit", r
                assert len(n.get("/v1/fills?limit=1000")["fills"]) == 1000
                assert len(n.get("/v1/fills")["fills"]) == 100  # the default page
                stop = threading.Event()
                pages = [0]

                def hammer() -> None:
                    while not stop.is_set():
                        if http("GET", n.url + "/v1/fills?limit=1000", timeout=10).status == 200:
                            pages[0] += 1

                threads = [threading.Thread(target=hammer) for _ in range(4)]
                for t in threads:
                    t.start()
                try:
                    time.sleep(0.3)
                    lat = []
                    for _ in range(30):  # bounded: 30 probes
                        t0 = time.monotonic()
                        assert http("GET", n.url + "/healthz", timeout=5).status == 200
                        lat.append(time.monotonic() - t0)
                        time.sleep(0.05)
                finally:
                    stop.set()
                    for t in threads:
                        t.join(15)
                report(request, f"[figures] 4 clients reading 1,000-fill pages ({pages[0]} pages served): "
                                f"/healthz p50 {statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms")
                assert max(lat) < 2.0
            finally:
                n.stop()
