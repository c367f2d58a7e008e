"""Connections a client cannot hoard, against a real node process.

Regressions: the node closed none of 1,000 slowloris connections (request
heads sent a line at a time, never finished); an idle keep-alive connection
lasted 3,630 s; there was no cap on connections; slow request bodies were
received without a time limit or a bound on the bytes held at once (50 slow
4 MiB bodies pinned 180 MB).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import NodeProc, free_port, http, logs_on_failure, report

SLOWLORIS = 300
HEADER_TIMEOUT = 2.0
KEEPALIVE = 3.0


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeProc]:
    n = NodeProc(name="solo", port=free_port(), data_dir=tmp_path / "solo",
                 extra_args=["--header-timeout", str(HEADER_TIMEOUT), "--keepalive-timeout", str(KEEPALIVE),
                             "--body-timeout", "2", "--max-connections", "400", "--max-receiving-mb", "8"])
    with logs_on_failure(request, [n]):
        try:
            yield n.start()
        finally:
            n.stop()


def closed(s: socket.socket) -> bool:
    """True once the peer closed (or reset) the connection; never blocks."""
    try:
        if not select.select([s], [], [], 0)[0]:
            return False
        return s.recv(4096) == b""
    except OSError:
        return True


def healthz_s(n: NodeProc) -> float:
    t0 = time.monotonic()
    assert http("GET", n.url + "/healthz", timeout=5).status == 200
    return time.monotonic() - t0


class TestConnections:
    def test_slowloris_connections_are_closed_and_healthz_answers(self, node: NodeProc,
                                                                  request: pytest.FixtureRequest) -> None:
        socks = []
        try:
            for _ in range(SLOWLORIS):
                s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                socks.append(s)
            t0 = time.monotonic()
            open_now = set(range(SLOWLORIS))
            slowest_health = 0.0
            for _ in range(40):  # at most 40 rounds of 0.25 s
                for i in list(open_now):
                    if closed(socks[i]):
                        open_now.discard(i)
                    else:
                        try:
                            socks[i].sendall(b"X-Slow: 1\r\n")  # one more header line, never the end
                        except OSError:
                            open_now.discard(i)
                slowest_health = max(slowest_health, healthz_s(node))
                if not open_now:
                    break
                time.sleep(0.25)
            took = time.monotonic() - t0
        finally:
            for s in socks:
                s.close()
        report(request, f"\n[figures] slowloris: {SLOWLORIS - len(open_now)} of {SLOWLORIS} closed in {took:.1f} s "
                        f"(header timeout {HEADER_TIMEOUT:g} s); /healthz at most {slowest_health * 1000:.0f} ms")
        assert not open_now, f"{len(open_now)} slowloris connections still open after {took:.1f} s"
        assert slowest_health < 2.0
        assert node.status()["http"]["header_timeouts"] >= SLOWLORIS

    def test_idle_keepalive_is_closed(self, node: NodeProc) -> None:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            s.settimeout(KEEPALIVE + 5)
            assert s.recv(4096) == b""  # closed by the node, not our timeout
            assert time.monotonic() - t0 < KEEPALIVE + 2

    def test_at_the_cap_new_connections_displace_idle_ones(self, tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
        n = NodeProc(name="capped", port=free_port(), data_dir=tmp_path / "capped",
                     extra_args=["--max-connections", "50"])
        with logs_on_failure(request, [n]):
            socks = []
            try:
                n.start()
                for _ in range(120):
                    socks.append(socket.create_connection(("127.0.0.1", n.port), timeout=5))
                time.sleep(0.5)
                assert healthz_s(n) < 2.0
                st = n.status()["http"]
                assert st["open"] <= 50 and st["displaced_at_cap"] >= 70, st
                assert sum(closed(s) for s in socks) >= 70
            finally:
                for s in socks:
                    s.close()
                n.stop()

    def test_slow_bodies_time_out_and_the_receive_budget_holds(self, node: NodeProc,
                                                              request: pytest.FixtureRequest) -> None:
        """Five 4 MiB bodies at once against an 8 MiB budget: some are refused
        with 503 busy and Retry-After; a body that stalls gets 408."""
        socks = []
        try:
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
                s.sendall(b"POST /peer/v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                          b"Content-Length: 4194304\r\n\r\n")
                socks.append(s)
            chunk = b"\x00" * 65536
            for _ in range(40):  # 2.5 MiB into each
                for s in socks:
                    try:
                        s.sendall(chunk)
                    except OSError:
                        pass
            replies = []
            for s in socks:  # then stall: each gets an answer within the body timeout
                s.settimeout(10)
                try:
                    replies.append(s.recv(4096))
                except OSError as exc:
                    replies.append(repr(exc).encode())
        finally:
            for s in socks:
                s.close()
        heads = [r.split(b"\r\n", 1)[0] for r in replies]
        report(request, f"[figures] 5 slow 4 MiB bodies, 8 MiB budget: {[h.decode(errors='replace') for h in heads]}")
        busy = [r for r in replies if b" 503 " in r.split(b"\r\n", 1)[0]]
        assert busy and all(b"Retry-After: 1" in r and b"busy" in r for r in busy), replies
        assert all(b" 503 " in h or b" 408 " in h for h in heads), heads
        assert node.status()["http"]["receiving_bytes"] == 0
