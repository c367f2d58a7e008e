"""Grenache interop across languages: real grapes (grenache-grape 1.0.0) and
the stock Node.js client and server (grenache-nodejs-http 1.0.2 and
grenache-nodejs-link 1.0.2, pinned in ``package-lock.json``) against real
node processes started with ``--grape``, all on 127.0.0.1.

Two grapes point at each other; two nodes of one network announce
``exchange_service``, one on each grape.  Through the Node client: an order
placed appears in ``GET /v1/book``, a crossing order fills, a cancel takes an
order off, a float price comes back as the error string, gzip works, and
``map`` reaches both nodes.  The other way round, ``cli.py grenache call``
reaches a Node ``PeerRPCServer``.

The packages are installed with ``npm ci`` on the first run (``.ci/run``
installs Node.js and npm where they are missing, so CI always runs this);
without ``node`` and ``npm`` the module skips, saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.npm import npm_ready
from tests.nodes import (
    CLI,
    ROOT,
    NodeProc,
    free_port,
    logs_on_failure,
    make_nodes,
    start_network,
    stop_all,
    tail,
    wait_until,
)

HERE = Path(__file__).resolve().parent
SERVICE = "exchange_service"
ECHO = "p2pex_interop_echo"
SETTLE_S = 30.0

pytestmark = pytest.mark.xdist_group("grenache_interop")


def grape_lookup(api_port: int, service: str) -> list[str]:
    body = json.dumps({"rid": str(uuid.uuid4()), "data": service}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{api_port}/lookup", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        out = json.loads(r.read())
    return out if isinstance(out, list) else []


def wait_for(what: str, check: Any, timeout: float = SETTLE_S) -> None:
    wait_until(check, timeout=timeout, what=what, interval=0.2, ignore=(OSError,))


class Lab:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.dht = [free_port(), free_port()]
        self.api = [free_port(), free_port()]
        self.nodes: list[NodeProc] = []

    def grape_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.api[i]}"

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.base / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=HERE, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_grapes(self) -> None:
        grape = str(HERE / "node_modules" / ".bin" / "grape")
        for i in (0, 1):
            self.spawn(f"grape{i}", [grape, "--b", "127.0.0.1", "--dp", str(self.dht[i]), "--aph", str(self.api[i]),
                                     "--bn", f"127.0.0.1:{self.dht[1 - i]}", "--dpa", "10000"])

    def client(self, payload: Any, *, grape: int = 0, mode: str = "request", gz: bool = False,
               service: str = SERVICE) -> dict[str, Any]:
        argv = ["node", str(HERE / "client.js"), "--grape", self.grape_url(grape), "--service", service,
                "--mode", mode, "--compress", "gzip" if gz else "none", "--timeout", "10000", json.dumps(payload)]
        done = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return out

    def close(self) -> None:
        stop_all(self.nodes)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    npm_ready()
    lab = Lab(tmp_path_factory.mktemp("grenache"))
    try:
        lab.start_grapes()
        a, b = make_nodes(lab.base, ("a", "b"))
        a.extra_args = ["--grape", lab.grape_url(0)]
        b.extra_args = ["--grape", lab.grape_url(1)]
        lab.nodes = [a, b]
        start_network(lab.nodes, timeout=SETTLE_S)
        want = {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
        wait_for("both nodes announced on both grapes",
                 lambda: all(set(grape_lookup(port, SERVICE)) >= want for port in lab.api))
        yield lab
    except BaseException:
        for log in lab.logs:
            print(f"--- {log.name} ---\n{tail(log, 30)}", file=sys.stderr)
        raise
    finally:
        lab.close()


def book_at(node: NodeProc, price: int, side: str) -> int:
    levels = node.get("/v1/book")["bids" if side == "buy" else "asks"]
    return sum(lv["qty"] for lv in levels if lv["price"] == price)


class TestStockGrenacheClient:
    def test_an_order_through_grenache_rests_crosses_and_cancels(self, lab: Lab,
                                                                 request: pytest.FixtureRequest) -> None:
        a = lab.nodes[0]
        with logs_on_failure(request, lab.nodes):
            order = {"action": "submitOrder", "token": a.token,
                     "data": {"order": {"id": "interop-1", "type": "sell", "price": 4242, "amount": 3,
                                        "clientId": "interop"}}}
            out = self._at(lab, a, order)
            assert out["ok"], out
            placed = out["result"]["result"]
            assert placed["status"] == "open" and placed["price"] == 4242
            wait_for("the order in every node's book", lambda: all(book_at(n, 4242, "sell") == 3 for n in lab.nodes))
            cross = {"action": "submitOrder", "token": a.token,
                     "data": {"order": {"type": "buy", "price": 4242, "amount": 1}}}
            out = self._at(lab, a, cross)
            assert out["ok"], out
            assert [(m["maker"], m["qty"]) for m in out["result"]["state"]["matches"]] == [(placed["id"], 1)]
            out = self._at(lab, a, {"action": "cancelOrder", "token": a.token, "data": {"orderId": placed["id"]}})
            assert out["ok"] and out["result"]["result"]["status"] == "cancelled", out
            wait_for("the order gone from every book", lambda: all(book_at(n, 4242, "sell") == 0 for n in lab.nodes))

    def test_a_float_comes_back_as_the_error_string(self, lab: Lab) -> None:
        a = lab.nodes[0]
        out = self._at(lab, a, {"action": "submitOrder", "token": a.token,
                                "data": {"order": {"type": "buy", "price": 99.5, "amount": 1}}})
        assert not out["ok"] and out["error"].startswith("bad_price: "), out
        assert book_at(a, 99, "buy") == 0 and book_at(a, 100, "buy") == 0

    def test_gzip(self, lab: Lab) -> None:
        out = lab.client({"action": "getOrderbook"}, gz=True)
        assert out["ok"] and out["result"]["status"] == "success", out

    def test_map_reaches_both_nodes(self, lab: Lab) -> None:
        out = lab.client({"action": "getOrderbook"}, mode="map")
        assert out["ok"], out
        assert len(out["result"]) == 2, out  # one answer per announced address: both nodes
        assert all(r["status"] == "success" and len(r["result"]["state_hash"]) == 64 for r in out["result"])

    def _at(self, lab: Lab, node: NodeProc, payload: Any) -> dict[str, Any]:
        """The payload through the stock client, to ``node``: the client picks one
        of the announced addresses at random, and a write needs the token of the
        node it lands on, so the other node's answer (unauthorized) is retried."""
        for _ in range(40):
            out = lab.client(payload)
            if out["ok"] or not out["error"].startswith("unauthorized"):
                return out
        raise AssertionError("the client never reached the node")


class TestPythonCallsNode:
    def test_cli_reaches_a_node_peer_rpc_server(self, lab: Lab) -> None:
        port = free_port()
        server = lab.spawn("echo", ["node", str(HERE / "server.js"), "--grape", lab.grape_url(1), "--service", ECHO,
                                    "--port", str(port)])
        try:
            wait_for("the echo server announced", lambda: f"127.0.0.1:{port}" in grape_lookup(lab.api[0], ECHO))
            payload = {"hello": "from python", "n": 1}
            done = subprocess.run([sys.executable, str(CLI), "grenache", "call", ECHO, json.dumps(payload),
                                   "--grape", lab.grape_url(0), "--gzip"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            row = json.loads(done.stdout)
            assert row["address"] == f"127.0.0.1:{port}"
            assert row["result"] == {"echo": payload, "server": "node"}
            done = subprocess.run([sys.executable, str(CLI), "grenache", "call", SERVICE,
                                   json.dumps({"action": "getOrderbook"}), "--map", "--grape", lab.grape_url(1)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            rows = json.loads(done.stdout)
            assert {r["address"] for r in rows} == {f"127.0.0.1:{n.port}" for n in lab.nodes}
            assert all(r["result"]["status"] == "success" for r in rows), rows
            done = subprocess.run([sys.executable, str(CLI), "grenache", "lookup", SERVICE,
                                   "--grape", lab.grape_url(1)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            assert set(json.loads(done.stdout)) >= {f"127.0.0.1:{n.port}" for n in lab.nodes}
        finally:
            server.terminate()
            server.wait(10)
