"""Peer links (``GET /peer/v1/link``, WebSocket): pushes between real node
processes on 127.0.0.1 go on one link per peer instead of a request each; a
link that breaks is opened again; a link from a stranger is held to the same
rules as a push request (msgpack only, the body cap, the peer rate limit,
entries verified).  Nothing mocks the network."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from hashlib import blake2b
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from crdt.entry import BUY, GENESIS, Order, make_entry
from crdt.keys import SigningKey
from tests.nodes import (
    NodeProc,
    cluster,
    free_port,
    logs_on_failure,
    stop_all,
    wait_order_everywhere,
    wait_until,
)
from tests.test_metrics import scrape, value

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_node_links")

MSGPACK = "application/msgpack"
PEER_CAP = 4 * 1024 * 1024
STRANGER = SigningKey(blake2b(b"p2pex test: link stranger", digest_size=32).digest())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    with cluster(tmp_path_factory.mktemp("links"), ("a", "b")) as nodes:
        yield nodes


@pytest.fixture(autouse=True)
def _node_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    nodes = request.getfixturevalue("pair") if "pair" in request.fixturenames else []
    with logs_on_failure(request, nodes):
        yield


def link_url(n: NodeProc) -> str:
    return n.url.replace("http://", "ws://") + "/peer/v1/link"


def pushes(n: NodeProc) -> tuple[float, float]:
    """Pushes the node answered: (on links, as requests)."""
    s = scrape(n)
    return (value(s, "p2pex_http_requests_total", route="/peer/v1/link push", status="200"),
            value(s, "p2pex_http_requests_total", route="/peer/v1/push", status="200"))


async def ask(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> Any:
    await ws.send_bytes(data)
    msg = await ws.receive(timeout=10)
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    return msgpack.unpackb(msg.data, raw=False)


def stranger_entry(seq: int = 1) -> list[Any]:
    e = make_entry(STRANGER, seq=seq, hlc=time.time_ns() // 1_000_000 << 16, prev=GENESIS,
                   body=Order(side=BUY, price=10, qty=5))
    return list(e.to_wire())


class TestLinks:
    def test_pushes_go_on_links(self, pair: list[NodeProc]) -> None:
        a, b = pair
        linked, requested = pushes(b)
        orders = [a.order("buy", 1, 10 + i) for i in range(20)]
        for o in orders:
            wait_order_everywhere(pair, o["id"], timeout=20)
        linked2, requested2 = pushes(b)
        assert linked2 > linked and requested2 == requested, (linked, linked2, requested, requested2)

    def test_a_link_is_opened_again_after_the_peer_restarts(self, tmp_path: Path,
                                                            request: pytest.FixtureRequest) -> None:
        with cluster(tmp_path, ("a", "b")) as nodes, logs_on_failure(request, nodes):
            a, b = nodes
            first = a.order("buy", 1, 5)
            wait_order_everywhere(nodes, first["id"], timeout=20)
            b.stop()
            b.start()
            before = pushes(b)[0]
            # of two members, the order waits for b's certification, which comes in the
            # replies to a's pushes to the restarted b; with a cid the client retries a
            # 503 no_quorum (a loaded machine may take longer than the node waits)
            second = a.order("buy", 1, 6, cid="after-restart")
            wait_until(lambda: pushes(b)[0] > before, timeout=30,
                       what="a pushes to the restarted b on a new link", nodes=nodes)
            wait_order_everywhere(nodes, second["id"], timeout=20)


class TestStrangerOnALink:
    async def test_bad_messages_get_the_codes_of_a_push_request(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(link_url(a), headers={"Content-Type": MSGPACK}, max_msg_size=0) as ws:
            bad = await ask(ws, b"\xc1")
            assert (bad["error"], bad["status"]) == ("bad_msgpack", 400), bad
            bad = await ask(ws, msgpack.packb([1, 2]))
            assert (bad["error"], bad["status"]) == ("bad_body", 400), bad
            bad = await ask(ws, msgpack.packb({"entries": "x"}))
            assert (bad["error"], bad["status"]) == ("bad_entries", 400), bad
            bad = await ask(ws, msgpack.packb({"entries": [0] * 8001}))
            assert (bad["error"], bad["status"]) == ("oversize_entry", 422), bad
            # a signed entry of a stranger is merged (not a member: it changes no book) and answered
            ok = await ask(ws, msgpack.packb({"entries": [stranger_entry()]}, use_bin_type=True))
            assert {"accepted", "rejected", "buffered", "has"} <= set(ok), ok
            # a forged one is refused by the core, entry by entry, as a request's would be
            forged = stranger_entry(2)
            forged[-1] = bytes(64)
            answer = await ask(ws, msgpack.packb({"entries": [forged]}, use_bin_type=True))
            assert answer["accepted"] == 0 and answer["rejected"], answer
            # text is not a peer's language: the node closes the link
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    async def test_a_message_over_the_peer_cap_closes_the_link(self, pair: list[NodeProc]) -> None:
        a, _ = pair
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(link_url(a), headers={"Content-Type": MSGPACK}, max_msg_size=0) as ws:
            try:
                await ws.send_bytes(b"\x80" + b" " * PEER_CAP)
                msg = await ws.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG or msg.type is aiohttp.WSMsgType.CLOSED
            except ConnectionError:
                pass  # closed while the message was still being sent
        # the node goes on: a new link answers
        async with aiohttp.ClientSession() as s, s.ws_connect(link_url(a), headers={"Content-Type": MSGPACK}) as ws:
            assert "has" in await ask(ws, msgpack.packb({"entries": []}))

    async def test_the_upgrade_needs_the_peer_content_type(self, pair: list[NodeProc]) -> None:
        """A web page can open a WebSocket to 127.0.0.1 but cannot set this header."""
        a, _ = pair
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(link_url(a))
            assert err.value.status == 415

    async def test_each_message_takes_from_the_peer_limit(self, tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
        n = NodeProc(name="tight", port=free_port(), data_dir=tmp_path / "tight",
                     extra_args=["--peer-limit", "0.5/5"])
        with logs_on_failure(request, [n]):
            try:
                n.start()
                await asyncio.sleep(2.0)  # the start's own peer calls come from elsewhere; let them pass
                async with aiohttp.ClientSession() as s, \
                        s.ws_connect(link_url(n), headers={"Content-Type": MSGPACK}) as ws:  # the upgrade: 1 call
                    answers = [await ask(ws, msgpack.packb({"entries": []})) for _ in range(12)]
                limited = [x for x in answers if x.get("error") == "rate_limited"]
                # 5 calls of burst, one of them the upgrade, plus one every 2 s: at least 5 of 12 refused
                assert len(limited) >= 5 and len(answers) - len(limited) >= 2, answers
                assert all(x["status"] == 429 and x["retry_after"] > 0 for x in limited), limited
            finally:
                stop_all([n])


class TestHungUpUpgrades:
    def test_an_upgrade_whose_caller_hung_up_is_not_an_internal_error(self, tmp_path: Path,
                                                                      request: pytest.FixtureRequest) -> None:
        """Regression: a node resumed after a pause found the link upgrades
        of peers that had given up on it meanwhile; writing the answer to a
        closing connection was logged as an internal error with a traceback
        (14 of them in one chaos run)."""
        n = NodeProc(name="paused", port=free_port(), data_dir=tmp_path / "paused")
        with logs_on_failure(request, [n]):
            try:
                n.start()
                upgrade = (b"GET /peer/v1/link HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                           b"Content-Type: application/msgpack\r\n\r\n")
                os.kill(n.pid, signal.SIGSTOP)
                try:
                    for _ in range(4):
                        with socket.create_connection(("127.0.0.1", n.port), timeout=5) as s:
                            s.sendall(upgrade)
                finally:
                    os.kill(n.pid, signal.SIGCONT)
                wait_until(lambda: n.status()["ready"], timeout=10, what="the node answers again", nodes=[n])
                time.sleep(0.5)
                log = n.log_file.read_text()
                assert "internal error" not in log and "Traceback" not in log, log[-3000:]
            finally:
                stop_all([n])


class TestStalledReaders:
    @pytest.mark.parametrize("route", ["link", "trade"])
    async def test_a_caller_that_stops_reading_does_not_hold_up_the_stop(
            self, tmp_path: Path, request: pytest.FixtureRequest, route: str) -> None:
        """Regression: the node closed its sessions and links one by one at
        stop, each waiting without limit to send; a peer or trader that sent
        much and read nothing kept the node from ever stopping (SIGTERM
        ignored until SIGKILL)."""
        n = NodeProc(name="stalled", port=free_port(), data_dir=tmp_path / "stalled",
                     extra_args=["--peer-limit", "0", "--write-limit", "0"])
        with logs_on_failure(request, [n]):
            try:
                n.start()
                async with aiohttp.ClientSession() as s:
                    held: list[aiohttp.ClientWebSocketResponse] = []  # open and unread until the stop is over
                    try:
                        async with asyncio.timeout(20):  # bounded: a node that stops reading blocks the sends
                            await send_unread(s, n, route, held)
                    except (ConnectionError, TimeoutError):
                        pass  # the node cut off a caller that did not read, or stopped reading from it
                    t0 = time.monotonic()
                    code = await asyncio.to_thread(n.stop, 15.0)
                    took = time.monotonic() - t0
                    for ws in held:
                        await ws.close()
                assert code == 0 and took < 10.0, (code, took)
            finally:
                stop_all([n])


async def send_unread(s: aiohttp.ClientSession, n: NodeProc, route: str,
                      held: list[aiohttp.ClientWebSocketResponse]) -> None:
    """Send much on a link or a session and read none of the answers."""
    if route == "link":
        ws = await s.ws_connect(link_url(n), headers={"Content-Type": MSGPACK}, max_msg_size=0)
        held.append(ws)
        junk = msgpack.packb({"entries": [[b"x" * 32, i] for i in range(3000)]})  # each answer lists 3000 refusals
        for _ in range(150):
            await ws.send_bytes(junk)
    else:
        ws = await s.ws_connect(n.url.replace("http://", "ws://") + "/v1/trade", headers=n.auth())
        held.append(ws)
        for _ in range(3000):
            await ws.send_str("x" * 3000)  # each answered with bad_json
    await asyncio.sleep(2.0)  # the node answers until the socket's buffers are full


class TestLinkCaps:
    async def test_links_past_the_cap_of_one_address_are_refused_with_503(self, pair: list[NodeProc]) -> None:
        """Sixteen links from one address at most (the pair's own links come
        from 127.0.0.1 too); past that the upgrade is a 503 and the caller
        pushes by request instead."""
        a, _ = pair
        async with aiohttp.ClientSession() as s:
            opened: list[aiohttp.ClientWebSocketResponse] = []
            try:
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    for _ in range(17):
                        opened.append(await s.ws_connect(link_url(a), headers={"Content-Type": MSGPACK}))
                assert err.value.status == 503 and len(opened) <= 16, (err.value.status, len(opened))
                assert "has" in await ask(opened[0], msgpack.packb({"entries": []}))  # the open ones still work
            finally:
                for ws in opened:
                    await ws.close()
            # once they are closed, a link opens again
            async with s.ws_connect(link_url(a), headers={"Content-Type": MSGPACK}) as ws:
                assert "has" in await ask(ws, msgpack.packb({"entries": []}))
