"""A data dir belongs to one node process and to one network.

Real node processes on free 127.0.0.1 ports (``tests.nodes``), each wait
bounded.  Pinned here: a second process on a data dir in use is refused
before it touches anything; a start that fails before the node serves
leaves nothing that commits to a network; a data dir of one network refuses
peers of another and says so in one line that names both; a peer's error
answer is decoded into its code and detail, never logged as raw bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.nodes import CLI, HOST, ROOT, NodeProc, free_port, logs_on_failure, run_cli, stop_all, wait_until

EXIT_TIMEOUT = 20.0  # seconds for a refused process to exit (interpreter start-up on a busy machine)
JOIN_TIMEOUT = 30.0
WATCHED = ("endpoint", ".cookie", "node.key", "node.sqlite", "node.sqlite-wal", "node.sqlite-shm", ".lock")
RAW_BYTES = re.compile(r"b'\\x|b\"\\x")


def files_of(data_dir: Path) -> dict[str, tuple[bytes, int] | None]:
    """Bytes and mtime (ns) of the files a node keeps in its data dir (None: absent)."""
    out: dict[str, tuple[bytes, int] | None] = {}
    for name in WATCHED:
        path = data_dir / name
        out[name] = (path.read_bytes(), path.stat().st_mtime_ns) if path.exists() else None
    return out


def wait_exit(node: NodeProc, timeout: float = EXIT_TIMEOUT) -> int:
    """The exit status of a node process expected to end by itself (killed, and the test failed, if not)."""
    assert node.proc is not None
    try:
        return node.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        node.stop()
        raise AssertionError(f"{node.name} still ran {timeout:g} s after its start\n{node.logs()}") from None


def last_start_output(node: NodeProc) -> str:
    """What the node process wrote on stdout and stderr in its last start."""
    text = node.out_file.read_text(errors="replace")
    return text.rsplit("--- start ", 1)[-1].split("\n", 1)[1]


def stored_network(data_dir: Path) -> tuple[bytes | None, int]:
    """The network a data dir's database records, and how many entries it holds (read-only)."""
    db = sqlite3.connect(f"file:{data_dir / 'node.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE name = 'network'").fetchone()
        entries = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    finally:
        db.close()
    return (None if row is None else bytes(row[0])), int(entries)


def network_of(node: NodeProc) -> str:
    net = node.status()["finality"]["network"]
    assert isinstance(net, str) and len(net) == 64, net
    return net


@contextlib.contextmanager
def port_taken(kind: int, port: int) -> Iterator[None]:
    """Hold ``port`` on 127.0.0.1: a listening TCP socket, or a bound UDP one."""
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.bind((HOST, port))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield
    finally:
        sock.close()


@pytest.fixture
def founder(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeProc]:
    """A running node that founded its network (the live network of these tests)."""
    node = NodeProc(name="founder", port=free_port(), data_dir=tmp_path / "founder")
    try:
        with logs_on_failure(request, [node]):
            yield node.start()
    finally:
        node.stop()


class TestOneNodePerDataDir:
    """Bug: a second ``cli.py node`` on the data dir of a running node rewrote
    its ``endpoint`` and ``.cookie`` and wrote to its database (1,249 UNIQUE
    constraint failures in 34 s at the first node, which then refused the
    cookie the CLI read).  Now the data dir is locked: a second process exits
    at once, non-zero, with one line naming the pid that holds it, and
    changes nothing in the data dir."""

    def test_second_node_is_refused_and_touches_nothing(self, founder: NodeProc, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
        second = NodeProc(name="second", port=free_port(), data_dir=founder.data_dir)
        try:
            with logs_on_failure(request, [founder, second]):
                founder.freeze()  # it writes nothing meanwhile: every byte that changes is the second's
                try:
                    before = files_of(founder.data_dir)
                    started = time.monotonic()
                    second.start(wait=False)
                    status = wait_exit(second)
                    took = time.monotonic() - started
                    after = files_of(founder.data_dir)
                finally:
                    founder.thaw()
                assert status != 0
                lines = [line for line in last_start_output(second).splitlines() if line.strip()]
                assert len(lines) == 1, lines
                assert lines[0].startswith("error: ") and "in use" in lines[0], lines
                assert str(founder.data_dir) in lines[0] and f"pid {founder.pid}" in lines[0], lines
                assert took < EXIT_TIMEOUT
                for name in WATCHED:
                    assert after[name] == before[name], f"{name} changed"
                assert not second.log_file.exists() or "serving" not in second.log_file.read_text()
                # the first node still serves, and takes the token the CLI reads from the data dir
                done = run_cli("order", "buy", "1@100", "--data-dir", str(founder.data_dir), "--json")
                assert done.returncode == 0, done.stderr
        finally:
            second.stop()

    def test_trade_with_node_is_refused(self, founder: NodeProc, request: pytest.FixtureRequest) -> None:
        """``trade --with-node`` runs the data dir's node: on a data dir in use it stops at once."""
        with logs_on_failure(request, [founder]):
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "P2PEX_PORT": str(free_port())}
            proc = subprocess.Popen(
                [sys.executable, str(CLI), "trade", "--with-node", "--data-dir", str(founder.data_dir),
                 "--seconds", "1", "--wait-ready", "10"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, start_new_session=True)
            try:
                _, err = proc.communicate(timeout=EXIT_TIMEOUT)
            finally:
                if proc.poll() is None:  # it runs (with its node): end the group this test started
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate(timeout=5)
            assert proc.returncode != 0
            assert "in use" in err and f"pid {founder.pid}" in err, err
            assert founder.status()["ready"]

    def test_write_history_is_refused(self, founder: NodeProc) -> None:
        """The tests' and benchmarks' writer of a past into a data dir takes the lock too."""
        from net.datadir import DataDirInUse
        from tests.nodes import write_history

        before = files_of(founder.data_dir)["node.key"]
        with pytest.raises(DataDirInUse, match="in use"):
            write_history(founder.data_dir, [], start_ms=int(time.time() * 1000))
        assert files_of(founder.data_dir)["node.key"] == before


class TestFailedStartLeavesNoNetwork:
    """Bug: a first start that failed with "address already in use" had
    written its genesis already; restarted with ``--bootstrap`` to a live
    network, that data dir stayed in a one-member network of its own (and
    took and finalized an order alone).  Now a start that fails before the
    node serves commits to no network, and the next start joins."""

    @pytest.mark.parametrize("which", ["http", "dht"])
    def test_port_in_use_then_bootstrap_joins(self, founder: NodeProc, tmp_path: Path, which: str,
                                              request: pytest.FixtureRequest) -> None:
        port, dht_port = free_port(), free_port()
        node = NodeProc(name="late", port=port, data_dir=tmp_path / "late", extra_args=["--dht-port", str(dht_port)])
        try:
            with logs_on_failure(request, [founder, node]):
                held = (socket.SOCK_STREAM, port) if which == "http" else (socket.SOCK_DGRAM, dht_port)
                with port_taken(*held):
                    node.start(wait=False)
                    assert wait_exit(node) != 0
                out = last_start_output(node)
                assert "cannot listen" in out and str(held[1]) in out, out
                assert stored_network(node.data_dir) == (None, 0)
                assert not (node.data_dir / "endpoint").exists()
                node.bootstrap = [founder.port]
                node.start()
                net = network_of(founder)

                def joined() -> bool:
                    fin = node.status()["finality"]
                    return bool(fin["member"]) and fin["network"] == net

                wait_until(joined, timeout=JOIN_TIMEOUT, what="the late node a member of the live network",
                           nodes=[founder, node], interval=0.2)
                assert node.status()["network_conflict"] is None
                assert not RAW_BYTES.search(node.log_file.read_text())
        finally:
            node.stop()


class TestDataDirOfAnotherNetwork:
    """Bug: a data dir that had founded a network of its own, started with
    ``--bootstrap`` to a live network, stayed alone in its own (its peers
    answered 409 ``wrong_network`` and the node logged only an INFO line with
    raw msgpack bytes and showed the peer as down).  Now it logs one ERROR
    line naming both networks and what to do, and exits non-zero."""

    def test_founded_elsewhere_then_bootstrap_exits(self, founder: NodeProc, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
        other = NodeProc(name="other", port=free_port(), data_dir=tmp_path / "other")
        try:
            with logs_on_failure(request, [founder, other]):
                other.start()
                ours = network_of(other)
                assert other.stop() == 0
                theirs = network_of(founder)
                assert ours != theirs
                other.bootstrap = [founder.port]
                other.start(wait=False)
                assert wait_exit(other, JOIN_TIMEOUT) != 0
                log = other.log_file.read_text()
                errors = [line for line in log.splitlines() if " ERROR " in line]
                assert len(errors) == 1, errors
                for text in (errors[0], last_start_output(other)):
                    assert ours[:16] in text and theirs[:16] in text, text
                    assert "--data-dir" in text and "--bootstrap" in text, text
                assert not RAW_BYTES.search(log)
                # the live network did not take it in
                fin = founder.status()["finality"]
                assert fin["network"] == theirs and len(fin["members"]) == 1
        finally:
            other.stop()

    def test_genesis_with_bootstrap_keeps_running_and_shows_the_conflict(
            self, founder: NodeProc, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        """``--genesis --bootstrap`` founds a network on purpose next to another
        one: its node keeps running, drops the other network's peers and says
        so in one WARNING line, in ``/v1/status`` and in ``cli.py status``."""
        node = NodeProc(name="genesis", port=free_port(), data_dir=tmp_path / "genesis",
                        bootstrap=[founder.port], extra_args=["--genesis"])
        try:
            with logs_on_failure(request, [founder, node]):
                node.start()
                ours, theirs = network_of(node), network_of(founder)
                assert ours != theirs
                conflict = wait_until(lambda: node.status()["network_conflict"], timeout=JOIN_TIMEOUT,
                                      what="a network conflict in the status", nodes=[founder, node], interval=0.2)
                assert conflict["ours"] == ours and conflict["theirs"] == theirs and not conflict["fatal"]
                assert ours[:16] in conflict["detail"] and theirs[:16] in conflict["detail"]
                done = run_cli("status", "--data-dir", str(node.data_dir))
                assert done.returncode == 0 and theirs[:16] in done.stdout, done.stdout + done.stderr
                assert node.running() and node.status()["finality"]["network"] == ours
                log = node.log_file.read_text()
                warned = [line for line in log.splitlines() if theirs[:16] in line and " WARNING " in line]
                assert len(warned) == 1, warned
                assert not RAW_BYTES.search(log)
        finally:
            stop_all([node])


class TestPeerErrorBodies:
    """Bug: a peer's error answer was logged as its raw bytes
    (``HTTP 409: b'\\x82\\xa5error\\xadwrong_network...'``).  Now one function
    decodes it, msgpack or JSON, into its code and detail."""

    def test_msgpack_body(self) -> None:
        from net.wire import peer_error

        body = msgpack.packb({"error": "wrong_network", "detail": "this node belongs to network ab, not cd",
                              "net": b"\x01" * 32}, use_bin_type=True)
        exc = peer_error(409, body)
        assert (exc.status, exc.code, exc.network) == (409, "wrong_network", b"\x01" * 32)
        assert str(exc) == "HTTP 409 wrong_network: this node belongs to network ab, not cd"

    def test_json_body(self) -> None:
        from net.wire import peer_error

        exc = peer_error(503, b'{"error": "not_ready", "detail": "catching up"}')
        assert (exc.code, exc.detail, exc.network) == ("not_ready", "catching up", None)

    @pytest.mark.parametrize("body", [b"\x82\xa5error\xc1\xff", b"<html>bad gateway</html>", b"", b"\x00\x1b[31m"])
    def test_other_bodies_are_never_raw_bytes(self, body: bytes) -> None:
        from net.wire import peer_error

        text = str(peer_error(502, body))
        assert text.startswith("HTTP 502 http_error: ") and not RAW_BYTES.search(text), text
        assert all(c.isprintable() for c in text), text

    def test_link_answer(self) -> None:
        """A push answered on a peer link: the decoded map."""
        from net.wire import peer_error

        exc = peer_error(None, {"error": "too_large", "detail": "x" * 1000, "status": 413})
        assert exc.status == 413 and exc.code == "too_large" and len(exc.detail) <= 200


class TestWrongNetworkAnswer:
    """Bug: a peer's ``409 wrong_network`` was taken for an unreachable peer
    (logged at INFO with the raw body, the peer shown as down and called
    again).  Now the peer is dropped and not dialed again, the conflict names
    both networks, and it stops a node whose --bootstrap leads only there."""

    @staticmethod
    def node_with_peer(tmp_path: Path, bootstrap: tuple[tuple[str, int], ...]) -> tuple[Any, Any, bytes]:
        from net.config import NodeConfig
        from net.node import Node
        from net.peers import PeerRecord
        from net.wire import pack, peer_error
        from tests.conftest import NOW_MS, key_for

        node = Node(NodeConfig(data_dir=tmp_path / "n", port=1, bootstrap=bootstrap), clock_ms=lambda: NOW_MS)
        node._load()
        node._found()
        rec = PeerRecord.create(key_for(30), "http://127.0.0.1:7001", NOW_MS)
        assert node.peers.admit(rec, NOW_MS)[0]
        theirs = b"\x07" * 32
        ours = node.exchange.network
        assert ours is not None

        async def refuse(url: str, path: str, body: dict[str, Any], **_: Any) -> Any:
            raise peer_error(409, pack({"error": "wrong_network", "net": theirs,
                                        "detail": f"this node belongs to network {theirs.hex()[:16]}, "
                                                  f"not {ours.hex()[:16]}"}))

        node._request = refuse  # type: ignore[method-assign]
        return node, rec, theirs

    @pytest.mark.parametrize("bootstrap", [(), (("127.0.0.1", 9),)], ids=["alone", "bootstrap"])
    def test_peer_of_another_network_is_dropped(self, tmp_path: Path, bootstrap: tuple[tuple[str, int], ...],
                                                caplog: pytest.LogCaptureFixture) -> None:
        import asyncio

        from net.errors import PeerError
        from tests.conftest import NOW_MS

        node, rec, theirs = self.node_with_peer(tmp_path, bootstrap)
        try:
            peer = node.peers.peers[rec.node_id]
            with caplog.at_level("INFO", logger="p2pex.node"), pytest.raises(PeerError, match="wrong_network"):
                asyncio.run(node._call(peer, "/peer/v1/sync", {"from": node.node_id}))
            conflict = node.conflict
            assert conflict is not None and conflict.theirs == theirs and conflict.founded
            assert rec.node_id not in node.peers.peers and not node._offer(rec, NOW_MS)
            lines = [r.getMessage() for r in caplog.records if theirs.hex()[:16] in r.getMessage()]
            assert len(lines) == 1 and node.exchange.network.hex()[:16] in lines[0], lines
            assert not RAW_BYTES.search(caplog.text)
            assert conflict.fatal == bool(bootstrap) and (node.failure is not None) == bool(bootstrap)
            assert node._stopping.is_set() == bool(bootstrap)
        finally:
            node.store.close()
            node.lock.release()
