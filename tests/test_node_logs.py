"""Logs that a stranger cannot flood.

Regressions: 8,000 malformed entries wrote as many log bytes as they carried
(1.3 MB of log for 1.2 MB sent: 10.7 GB an hour from two clients); every
malformed HTTP request logged a 590-byte traceback; junk DHT datagrams were
logged with the library's tracebacks.  Now refusals are summarised per batch
and per (peer, code), the first few per minute are shown and the rest
counted ("N more like this"), and the DHT's tracebacks stay out of the log.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from hashlib import blake2b
from pathlib import Path

import msgpack
import pytest

from crdt.entry import BUY, GENESIS, Order, make_entry
from crdt.keys import SigningKey
from net.logs import BadRequestFilter, RepeatFilter
from tests.nodes import NodeProc, free_port, http, logs_on_failure, report


@pytest.fixture
def solo(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeProc]:
    n = NodeProc(name="solo", port=free_port(), data_dir=tmp_path / "solo")
    with logs_on_failure(request, [n]):
        try:
            yield n.start()
        finally:
            n.stop()


def log_size(n: NodeProc) -> int:
    return n.log_file.stat().st_size


def settle(n: NodeProc) -> None:
    """Let the node write what it will (a /healthz round trip, then a pause)."""
    time.sleep(0.3)
    assert http("GET", n.url + "/healthz").status == 200
    time.sleep(0.2)


class TestFloodedLogs:
    def test_8000_malformed_entries(self, solo: NodeProc, request: pytest.FixtureRequest) -> None:
        key = SigningKey(blake2b(b"p2pex test: log flood", digest_size=32).digest())
        good = make_entry(key, seq=1, hlc=(time.time_ns() // 1_000_000 - 1000) << 16, prev=GENESIS,
                          body=Order(side=BUY, price=10, qty=5)).to_wire()
        bad = []
        for i in range(8000):
            w = list(good)
            w[1] = i + 1
            w[4] = [*w[4][:3], 0]  # qty 0
            bad.append(w)
        before = log_size(solo)
        sent = 0
        for start in range(0, 8000, 4000):
            body = msgpack.packb({"from": key.public, "entries": bad[start:start + 4000]}, use_bin_type=True)
            sent += len(body)
            r = http("POST", solo.url + "/peer/v1/push", body, headers={"Content-Type": "application/msgpack"})
            assert r.status == 200, r
        settle(solo)
        written = log_size(solo) - before
        report(request, f"\n[figures] 8,000 malformed entries: {sent} bytes sent, {written} log bytes written")
        assert written < 2_000, solo.logs()
        assert "more like it in this batch" in solo.log_file.read_text()

    def test_malformed_http_requests(self, solo: NodeProc, request: pytest.FixtureRequest) -> None:
        before = log_size(solo)
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", solo.port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
                assert b" 400 " in s.recv(100)
        settle(solo)
        written = log_size(solo) - before
        report(request, f"[figures] 100 malformed HTTP requests: {written} log bytes written")
        text = solo.log_file.read_text()
        assert "Traceback" not in text and written < 1_500, text[-3000:]
        solo.stop()
        assert "more like this" in solo.log_file.read_text()  # the rest counted, summarised at the latest on stop

    def test_junk_dht_datagrams(self, solo: NodeProc, request: pytest.FixtureRequest) -> None:
        before = log_size(solo)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for i in range(1000):
                u.sendto(b"\x00" + os.urandom(20) + b"\xc1junk" * (i % 5 + 1), ("127.0.0.1", solo.port))
                u.sendto(b"\x00" + os.urandom(20) + msgpack.packb(["find_node", [1]]), ("127.0.0.1", solo.port))
        time.sleep(1.0)
        settle(solo)
        solo.stop()  # tasks whose exceptions nobody read are reported when collected
        text = solo.log_file.read_text()
        written = len(text.encode()) - before
        report(request, f"[figures] 2,000 junk DHT datagrams: {written} log bytes written (stop included)")
        assert "Traceback" not in text and "never retrieved" not in text, text[-3000:]
        assert written < 500, text[-3000:]


class TestRepeatFilter:
    def test_first_few_per_window_then_a_summary(self, caplog: pytest.LogCaptureFixture) -> None:
        now = [0.0]
        f = RepeatFilter(shown=3, window_s=60.0, clock=lambda: now[0])
        logger = logging.getLogger("p2pex.test.repeats")

        def rec(peer: str, i: int) -> logging.LogRecord:
            return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "bad entry %d from %s",
                                     (i, peer), None, extra={"repeat_key": ("bad", peer)})

        assert [f.filter(rec("p1", i)) for i in range(10)] == [True] * 3 + [False] * 7
        assert f.filter(rec("p2", 0))  # another peer has its own budget
        now[0] = 61.0
        with caplog.at_level(logging.WARNING, logger="p2pex.test.repeats"):
            assert f.filter(rec("p1", 99))  # a new window; the last one is summarised
        assert any("7 more like this in the last 61 s" in r.getMessage() and "bad entry 3 from p1" in r.getMessage()
                   for r in caplog.records)

    def test_unkeyed_records_below_warning_pass(self) -> None:
        f = RepeatFilter(shown=1)
        logger = logging.getLogger("p2pex.test.info")
        info = [logger.makeRecord(logger.name, logging.INFO, __file__, 1, "hello", (), None) for _ in range(5)]
        assert all(f.filter(r) for r in info)
        warn = [logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "w %s", (i,), None) for i in range(3)]
        assert [f.filter(r) for r in warn] == [True, False, False]  # keyed by the template

    def test_bad_request_filter_drops_the_traceback(self) -> None:
        from aiohttp.http_exceptions import BadHttpMessage

        try:
            raise BadHttpMessage("Invalid character in Content-Length:\n\n  b'Content-Length: abc'")
        except BadHttpMessage:
            import sys

            exc_info = sys.exc_info()
        logger = logging.getLogger("aiohttp.server")
        r = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Error handling request from %s",
                              ("10.1.2.3",), exc_info)
        assert BadRequestFilter().filter(r)
        assert r.exc_info is None and r.levelno == logging.INFO
        assert r.getMessage().startswith("bad HTTP request from 10.1.2.3: 400, message: Invalid character")
