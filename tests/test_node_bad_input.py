"""Bad input against real node processes: malformed, oversized and
unauthenticated client requests, bad peer requests, and forged or tampered
entries pushed by a peer.  Each gets the documented error and changes
nothing: every node keeps the state hash it had before.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import msgpack
import pytest

from crdt.entry import BUY, GENESIS, Cancel, Order, decode_entry, entry_hash, make_entry
from crdt.keys import SigningKey, short_id
from net.peers import PeerRecord
from tests.nodes import (
    NodeProc,
    Reply,
    cluster,
    logs_on_failure,
    wait_converged,
    wait_order_everywhere,
    wait_until,
)

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_node_bad_input")

MSGPACK = "application/msgpack"
CLIENT_CAP = 64 * 1024
PEER_CAP = 4 * 1024 * 1024


@dataclass
class World:
    nodes: list[NodeProc]
    resting: str  # an open order of node a
    filled: str  # a filled order of node a
    cancelled: str  # a cancelled order of node a


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with cluster(tmp_path_factory.mktemp("bad"), ("a", "b", "c")) as nodes:
        a = nodes[0]
        resting = a.order("buy", 5, 10)["id"]
        filled = a.order("buy", 2, 20)["id"]
        assert a.order("sell", 2, 20)["fills"][0]["maker"] == filled
        cancelled = a.order("buy", 1, 5)["id"]
        assert a.cancel(cancelled).status == 200
        wait_order_everywhere(nodes, cancelled)
        wait_converged(nodes)
        yield World(nodes, resting, filled, cancelled)


@pytest.fixture
def allow_change() -> None:
    """Requested by a test that changes state on purpose (see ``unchanged``)."""


@pytest.fixture(autouse=True)
def unchanged(request: pytest.FixtureRequest, world: World) -> Iterator[None]:
    """Every test here must leave every node's state exactly as it found it:
    same state hash, version vector, book and fills on all three nodes."""
    with logs_on_failure(request, world.nodes):
        before = wait_converged(world.nodes)
        yield
        if "allow_change" not in request.fixturenames:
            for n in world.nodes:
                assert n.snapshot() == before, f"{n.name} changed state"


def assert_error(r: Reply, status: int, code: str) -> dict[str, Any]:
    assert r.status == status, r
    assert r.content_type.startswith("application/json"), r.content_type
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body
    return body  # type: ignore[no-any-return]


def assert_peer_error(r: Reply, status: int, code: str) -> None:
    assert r.status == status, r
    body = msgpack.unpackb(r.body, raw=False)
    assert set(body) == {"error", "detail"} and body["error"] == code, body


def chunked_post(node: NodeProc, path: str, size: int, content_type: str) -> Reply:
    """A POST without Content-Length (chunked), so the cap must be enforced while reading."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        chunks = (b" " * min(16384, size - i) for i in range(0, size, 16384))
        conn.request("POST", path, body=chunks, encode_chunked=True,
                     headers={"Content-Type": content_type, **node.auth()})
        resp = conn.getresponse()
        return Reply(resp.status, resp.read(), resp.getheader("Content-Type") or "")
    finally:
        conn.close()


# ---- client API ------------------------------------------------------------------


GOOD = {"side": "buy", "qty": 1, "price": 7}

UNPROCESSABLE = [
    ({**GOOD, "side": "hold"}, "bad_side"),
    ({**GOOD, "side": "BUY"}, "bad_side"),
    ({**GOOD, "side": 0}, "bad_side"),
    ({"qty": 1, "price": 7}, "bad_side"),
    ({**GOOD, "qty": 1.5}, "bad_qty"),
    ({**GOOD, "qty": 1.0}, "bad_qty"),
    ({**GOOD, "qty": -1}, "bad_qty"),
    ({**GOOD, "qty": 0}, "bad_qty"),
    ({**GOOD, "qty": 1 << 40}, "bad_qty"),
    ({**GOOD, "qty": 10**30}, "bad_qty"),
    ({**GOOD, "qty": True}, "bad_qty"),
    ({**GOOD, "qty": "10"}, "bad_qty"),
    ({**GOOD, "qty": None}, "bad_qty"),
    ({"side": "buy", "price": 7}, "bad_qty"),
    ({**GOOD, "price": 0}, "bad_price"),
    ({**GOOD, "price": -100}, "bad_price"),
    ({**GOOD, "price": 7.5}, "bad_price"),
    ({**GOOD, "price": False}, "bad_price"),
    ({**GOOD, "price": "7"}, "bad_price"),
    ({**GOOD, "price": 1 << 40}, "bad_price"),
    ({**GOOD, "price": 10**30}, "bad_price"),
    ({**GOOD, "market": False, "price": None}, "bad_price"),
    ({"side": "buy", "qty": 1, "market": False}, "bad_price"),
    ({**GOOD, "market": True}, "bad_price"),
    ({**GOOD, "market": "yes"}, "bad_market"),
    ({**GOOD, "market": 1}, "bad_market"),
    ({"side": "buy", "qty": 1, "market": True, "tif": "GTC"}, "bad_tif"),
    ({**GOOD, "tif": "FOK"}, "bad_tif"),
    ({**GOOD, "tif": ["GTC"]}, "bad_tif"),
    ({**GOOD, "user": "mallory"}, "unknown_field"),
]


class TestClientErrors:
    @pytest.mark.parametrize(("body", "code"), UNPROCESSABLE, ids=[json.dumps(b) for b, _ in UNPROCESSABLE])
    def test_bad_order_fields_422(self, world: World, body: dict[str, Any], code: str) -> None:
        for n in world.nodes[:2]:
            assert_error(n.request("POST", "/v1/orders", body), 422, code)

    @pytest.mark.parametrize("side", [["buy"], {"buy": 1}])
    def test_unhashable_side_422(self, world: World, side: object) -> None:
        """Regression: a list or map as ``side`` crashed the handler (500, plain
        text body) because it was looked up in a dict; now it is a 422."""
        assert_error(world.nodes[0].request("POST", "/v1/orders", {**GOOD, "side": side}), 422, "bad_side")

    def test_bad_values_in_msgpack_body_422(self, world: World) -> None:
        a = world.nodes[0]
        cases: list[tuple[dict[Any, Any], str]] = [
            ({**GOOD, "qty": 2.0}, "bad_qty"), ({**GOOD, "side": b"buy"}, "bad_side"),
            ({**GOOD, b"qty": 1}, "unknown_field"), ({"side": "buy", "qty": 1, "price": (1 << 64) - 1}, "bad_price")]
        for body, code in cases:
            r = a.request("POST", "/v1/orders", raw=msgpack.packb(body), content_type=MSGPACK)
            assert_error(r, 422, code)

    def test_unknown_keys_of_mixed_types_422(self, world: World) -> None:
        """Regression: a msgpack body with unknown keys of mixed types (an int
        and bytes) crashed the handler (500) while sorting them for the message."""
        body: dict[Any, Any] = {**GOOD, 5: 1, b"x": 1}
        r = world.nodes[0].request("POST", "/v1/orders", raw=msgpack.packb(body), content_type=MSGPACK)
        assert_error(r, 422, "unknown_field")

    @pytest.mark.parametrize("raw", [b"{bad", b"\xff\xfe", b'{"side": "buy", "qty": 1,}', b"NaNa",
                                     b'{"qty": ' + b"9" * 5000 + b"}"])
    def test_bad_json_400(self, world: World, raw: bytes) -> None:
        assert_error(world.nodes[0].request("POST", "/v1/orders", raw=raw), 400, "bad_json")

    def test_empty_body_is_an_empty_object(self, world: World) -> None:
        assert_error(world.nodes[0].request("POST", "/v1/orders", raw=b""), 422, "bad_side")

    @pytest.mark.parametrize("raw", [b"[]", b'"buy"', b"17", b"null"])
    def test_body_not_an_object_400(self, world: World, raw: bytes) -> None:
        assert_error(world.nodes[0].request("POST", "/v1/orders", raw=raw), 400, "bad_body")

    def test_bad_msgpack_400(self, world: World) -> None:
        r = world.nodes[0].request("POST", "/v1/orders", raw=b"\xc1", content_type=MSGPACK)
        assert_error(r, 400, "bad_msgpack")

    def test_oversized_body_413(self, world: World) -> None:
        a = world.nodes[0]
        padded = json.dumps({**GOOD, "pad": ""}).encode()
        huge = padded.replace(b'""', b'"' + b"x" * (CLIENT_CAP + 1 - len(padded)) + b'"')
        assert len(huge) == CLIENT_CAP + 1
        assert_error(a.request("POST", "/v1/orders", raw=huge), 413, "too_large")
        assert_error(a.request("POST", "/v1/orders", raw=b" " * (1 << 20)), 413, "too_large")
        assert_error(chunked_post(a, "/v1/orders", CLIENT_CAP + 100, "application/json"), 413, "too_large")
        # exactly at the cap is read (and then refused for what it says)
        assert_error(a.request("POST", "/v1/orders", raw=b" " * CLIENT_CAP), 400, "bad_json")

    @pytest.mark.parametrize("auth", ["none", "empty", "wrong", "other node's cookie", "basic scheme"])
    def test_missing_or_wrong_token_401(self, world: World, auth: str) -> None:
        a, b, _ = world.nodes
        header = {"none": None, "empty": "Bearer ", "wrong": "Bearer " + "0" * 64,
                  "other node's cookie": f"Bearer {b.token}", "basic scheme": f"Basic {a.token}"}[auth]
        headers = {} if header is None else {"Authorization": header}
        for method, path, body in (("POST", "/v1/orders", GOOD),
                                   ("DELETE", f"/v1/orders/{world.resting}", None)):
            assert_error(a.request(method, path, body, token=None, headers=headers), 401, "unauthorized")
        assert a.get(f"/v1/orders/{world.resting}")["status"] == "open"

    def test_authorization_that_is_not_utf8_401(self, world: World) -> None:
        """Regression: an ``Authorization`` header holding bytes that are not UTF-8
        made ``token.encode()`` raise in the handler, an HTTP 500 (the only 5xx
        in 150,000 generated requests); it is a wrong token, so 401."""
        a = world.nodes[0]
        for value in (b"Bearer \xff\xfe\xfd", b"Bearer " + a.token.encode()[:-1] + b"\xe9", b"\xff"):
            conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
            try:
                body = json.dumps(GOOD).encode()
                conn.putrequest("POST", "/v1/orders")
                conn.putheader("Authorization", value)
                conn.putheader("Content-Type", "application/json")
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                assert_error(Reply(resp.status, resp.read(), resp.getheader("Content-Type") or ""), 401,
                             "unauthorized")
            finally:
                conn.close()

    def test_oversized_body_on_a_route_that_reads_none_413(self, world: World) -> None:
        """Regression: DELETE /v1/orders/{id} never read its body, so a 64 KiB + 1
        body went through and the order was cancelled; every route now refuses
        a declared body over its cap."""
        a = world.nodes[0]
        assert_error(a.request("DELETE", f"/v1/orders/{world.resting}", raw=b" " * (CLIENT_CAP + 1)),
                     413, "too_large")
        assert_error(a.request("GET", "/v1/status", raw=b" " * (CLIENT_CAP + 1)), 413, "too_large")
        assert a.get(f"/v1/orders/{world.resting}")["status"] == "open"

    def test_oversized_is_refused_before_the_token_is_checked(self, world: World) -> None:
        a = world.nodes[0]
        assert_error(a.request("POST", "/v1/orders", raw=b" " * (1 << 20), token=None), 413, "too_large")
        # within the cap, no token: 401
        assert_error(a.request("POST", "/v1/orders", GOOD, token=None), 401, "unauthorized")

    def test_unknown_order_404(self, world: World) -> None:
        a, b, _ = world.nodes
        missing = "ab" * 32
        assert_error(a.request("GET", f"/v1/orders/{missing}"), 404, "unknown_order")
        assert_error(a.request("DELETE", f"/v1/orders/{missing}"), 404, "unknown_order")
        assert_error(b.request("DELETE", f"/v1/orders/{missing}"), 404, "unknown_order")

    @pytest.mark.parametrize("oid", ["abc", "zz" * 32, "ab" * 31, "ab" * 33])
    def test_malformed_order_id_400(self, world: World, oid: str) -> None:
        a = world.nodes[0]
        assert_error(a.request("GET", f"/v1/orders/{oid}"), 400, "bad_order_id")
        assert_error(a.request("DELETE", f"/v1/orders/{oid}"), 400, "bad_order_id")

    def test_cancel_filled_or_cancelled_409(self, world: World) -> None:
        a, b, _ = world.nodes
        assert a.get(f"/v1/orders/{world.filled}")["status"] == "filled"
        # the refusals as sent (status, content type, body), so raw requests, not the client
        assert_error(a.request("DELETE", f"/v1/orders/{world.filled}"), 409, "not_cancellable")
        assert_error(a.request("DELETE", f"/v1/orders/{world.cancelled}"), 409, "not_cancellable")
        # another node's order, even a resting one
        assert_error(b.request("DELETE", f"/v1/orders/{world.resting}"), 409, "foreign_order")

    @pytest.mark.parametrize("query", ["/v1/book?depth=x", "/v1/book?depth=0", "/v1/book?depth=100000",
                                       "/v1/fills?since=-1", "/v1/fills?limit=0", "/v1/fills?since=1e3",
                                       "/v1/fills?since=" + "9" * 5000])
    def test_bad_query_400(self, world: World, query: str) -> None:
        r = world.nodes[0].request("GET", query)
        assert r.status == 400, r
        assert r.json()["error"] in ("bad_depth", "bad_since", "bad_limit"), r

    def test_unknown_route_and_method(self, world: World) -> None:
        a = world.nodes[0]
        assert_error(a.request("GET", "/v1/nothing"), 404, "not_found")
        assert_error(a.request("PUT", "/v1/orders", GOOD), 405, "method_not_allowed")


# ---- peer API --------------------------------------------------------------------------


def peer_post(node: NodeProc, path: str, body: Any = None, raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else msgpack.packb(body, use_bin_type=True)
    return node.request("POST", path, raw=data, content_type=MSGPACK, token=None)


class TestPeerErrors:
    @pytest.mark.parametrize("path", ["/peer/v1/push", "/peer/v1/sync", "/peer/v1/peers"])
    def test_not_msgpack_400(self, world: World, path: str) -> None:
        a = world.nodes[0]
        for raw in (b"\xc1", b'{"entries": []}', b"\x92\x01"):
            assert_peer_error(peer_post(a, path, raw=raw), 400, "bad_msgpack")
        assert_peer_error(peer_post(a, path, [1, 2]), 400, "bad_body")

    @pytest.mark.parametrize("path", ["/peer/v1/push", "/peer/v1/sync", "/peer/v1/peers"])
    @pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/x-www-form-urlencoded",
                                              "multipart/form-data; boundary=x", ""])
    def test_peer_routes_refuse_other_content_types_415(self, world: World, path: str, content_type: str) -> None:
        """Regression: peer routes read any body as msgpack whatever its content
        type, so a web page could push to a node on 127.0.0.1 with a ``text/plain``
        POST (a simple request that needs no CORS preflight).  Now only
        ``application/msgpack`` is read; the rest is a 415 in the peer error shape."""
        a = world.nodes[0]
        e = make_entry(MALLORY, seq=1, hlc=now_hlc(), prev=GENESIS, body=Order(side=BUY, price=10, qty=5))
        body = msgpack.packb({"from": MALLORY.public, "entries": [e.to_wire()], "vv": {}, "records": []},
                             use_bin_type=True)
        r = a.request("POST", path, raw=body, content_type=content_type, token=None)
        assert_peer_error(r, 415, "unsupported_media_type")
        assert r.content_type.startswith(MSGPACK)
        assert MALLORY.public.hex() not in a.status()["version_vector"]

    def test_oversized_413(self, world: World) -> None:
        a = world.nodes[0]
        assert_peer_error(peer_post(a, "/peer/v1/push", raw=b"\x80" + b" " * PEER_CAP), 413, "too_large")
        assert_peer_error(chunked_post(a, "/peer/v1/push", PEER_CAP + 1000, MSGPACK), 413, "too_large")
        # a client route is capped lower than a peer route
        assert_error(a.request("POST", "/v1/orders", raw=b" " * (PEER_CAP + 1)), 413, "too_large")

    def test_bad_fields_400_or_422(self, world: World) -> None:
        a = world.nodes[0]
        assert_peer_error(peer_post(a, "/peer/v1/push", {"entries": "x"}), 400, "bad_entries")
        assert_peer_error(peer_post(a, "/peer/v1/push", {"entries": [0] * 8001}), 422, "oversize_entry")
        assert_peer_error(peer_post(a, "/peer/v1/sync", {"vv": [1]}), 400, "bad_vv")
        assert_peer_error(peer_post(a, "/peer/v1/sync", {"vv": {b"x": 1}}), 400, "bad_vv")
        assert_peer_error(peer_post(a, "/peer/v1/sync", {"vv": {b"x" * 32: -1}}), 400, "bad_vv")
        assert_peer_error(peer_post(a, "/peer/v1/sync", {"vv": {}, "max": 0}), 400, "bad_max")
        assert_peer_error(peer_post(a, "/peer/v1/sync", {"vv": {}, "max": 1.5}), 400, "bad_max")

    def test_garbage_peer_records_are_ignored(self, world: World) -> None:
        a = world.nodes[0]
        peers = a.peer_ids()
        mallory = SigningKey(blake2b(b"mallory record", digest_size=32).digest())
        bad_sig = [mallory.public, "http://127.0.0.1:9", int(time.time() * 1000), bytes(64)]
        # validly signed, but the URL does not parse (regression: this was a 500)
        bad_url = PeerRecord.create(mallory, "http://[::1", int(time.time() * 1000)).to_wire()
        r = peer_post(a, "/peer/v1/peers", {"records": [[1, 2, 3, 4], "x", None, bad_sig, bad_url]})
        assert r.status == 200, r
        assert a.peer_ids() == peers
        wait_until(lambda: "sent an invalid peer record" in a.log_file.read_text(), timeout=5,
                   what="invalid record warning", nodes=[a])


# ---- forged and tampered entries ---------------------------------------------------------


MALLORY = SigningKey(blake2b(b"p2pex test: mallory", digest_size=32).digest())


def now_hlc(offset_ms: int = 0) -> int:
    return (time.time_ns() // 1_000_000 + offset_ms) << 16


def tampered(signed: list[Any], **changes: Any) -> list[Any]:
    """A copy of the wire form of a signed entry with fields changed after signing."""
    wire = list(signed)
    body = list(wire[5])
    for name, value in changes.items():
        if name in ("side", "price", "qty"):
            body[{"side": 1, "price": 2, "qty": 3}[name]] = value
        else:
            wire[{"origin": 0, "seq": 1, "hlc": 2, "prev": 3, "sig": 6}[name]] = value
    wire[5] = body
    return wire


def push(node: NodeProc, entries: list[Any], sender: bytes = MALLORY.public) -> dict[str, Any]:
    r = peer_post(node, "/peer/v1/push", {"from": sender, "entries": entries})
    assert r.status == 200, r
    out: dict[str, Any] = msgpack.unpackb(r.body, raw=False)
    return out


def fetch_entries(node: NodeProc) -> list[list[Any]]:
    r = peer_post(node, "/peer/v1/sync", {"vv": {}, "max": 4000})
    assert r.status == 200, r
    entries: list[list[Any]] = msgpack.unpackb(r.body, raw=False)["entries"]
    return entries


def warnings(node: NodeProc, *needles: str) -> int:
    """How many WARNING lines of the node's log contain every needle."""
    return sum(1 for line in node.log_file.read_text(errors="replace").splitlines()
               if " WARNING " in line and all(s in line for s in needles))


class TestForgedEntries:
    def check_rejected(self, world: World, target: NodeProc, wire: list[Any], code: str,
                       sender: bytes = MALLORY.public) -> None:
        needles = ("127.0.0.1", short_id(sender), code)
        logged = warnings(target, *needles)
        reply = push(target, [wire], sender)
        assert reply["accepted"] == 0, reply
        assert [r["error"] for r in reply["rejected"]] == [code], reply
        assert reply["rejected"][0]["origin"] == wire[0].hex()
        assert reply["rejected"][0]["seq"] == wire[1]
        # logged as a warning naming the peer's address and its claimed id
        wait_until(lambda: warnings(target, *needles) > logged, timeout=5,
                   what=f"a warning about {code} in {target.name}'s log", nodes=[target])
        for n in world.nodes:
            assert MALLORY.public.hex() not in n.status()["version_vector"]

    def test_qty_changed_after_signing(self, world: World) -> None:
        e = make_entry(MALLORY, seq=1, hlc=now_hlc(), prev=GENESIS, body=Order(side=BUY, price=10, qty=5))
        self.check_rejected(world, world.nodes[1], tampered(e.to_wire(), qty=500), "bad_signature")

    def test_bad_signature(self, world: World) -> None:
        e = make_entry(MALLORY, seq=1, hlc=now_hlc(), prev=GENESIS, body=Order(side=BUY, price=10, qty=5))
        sig = bytes([e.sig[0] ^ 1]) + e.sig[1:]
        self.check_rejected(world, world.nodes[0], tampered(e.to_wire(), sig=sig), "bad_signature")
        self.check_rejected(world, world.nodes[0], tampered(e.to_wire(), sig=bytes(64)), "bad_signature")

    @pytest.mark.usefixtures("allow_change")
    def test_cancel_of_another_origins_order_changes_nothing(self, world: World) -> None:
        """A cancel acts only on its own origin's order (and only a member's
        entries are matched at all): stored and relayed, it cancels nothing."""
        eve = SigningKey(blake2b(b"p2pex test: eve", digest_size=32).digest())
        e = make_entry(eve, seq=1, hlc=now_hlc(), prev=GENESIS, body=Cancel(order_id=bytes.fromhex(world.resting)))
        assert push(world.nodes[2], [e.to_wire()])["accepted"] == 1
        wait_until(lambda: all(eve.public.hex() in n.status()["version_vector"] for n in world.nodes),
                   timeout=10, what="the cancel on every node", nodes=world.nodes)
        for n in world.nodes:
            assert n.get(f"/v1/orders/{world.resting}")["status"] == "open"

    def test_honest_entry_tampered_in_transit(self, world: World) -> None:
        """A real entry of node a, relayed to b with its qty raised."""
        a, b, _ = world.nodes
        a_id = bytes.fromhex(a.node_id())
        mine = [w for w in fetch_entries(a) if w[0] == a_id and w[5][0] == 1]
        assert mine
        self.check_rejected(world, b, tampered(mine[0], qty=mine[0][5][3] + 1), "bad_signature")

    def test_next_entry_of_another_origin_signed_by_the_wrong_key(self, world: World) -> None:
        """Impersonation: node a's next seq, correctly chained, signed by mallory."""
        a, _, c = world.nodes
        a_id = bytes.fromhex(a.node_id())
        head = decode_entry([w for w in fetch_entries(a) if w[0] == a_id][-1])
        body = Order(side=BUY, price=10, qty=1)
        hlc = now_hlc()
        h = entry_hash(a_id, head.seq + 1, hlc, head.hash, body)
        forged = [a_id, head.seq + 1, hlc, head.hash, [], body.to_wire(), MALLORY.sign(h)]
        self.check_rejected(world, c, forged, "bad_signature")

    def test_identity_key_forges_nothing(self, world: World) -> None:
        """Regression: an entry of the identity-point "origin" with the signature
        (identity, 0) verified whatever it said, so it was accepted and merged."""
        identity = (1).to_bytes(32, "little")
        body = Order(side=BUY, price=10, qty=5)
        hlc = now_hlc()
        forged = [identity, 1, hlc, GENESIS, [], body.to_wire(), identity + bytes(32)]
        assert entry_hash(identity, 1, hlc, GENESIS, body)  # well formed; only the key is weak
        self.check_rejected(world, world.nodes[1], forged, "bad_signature")
        for n in world.nodes:
            assert identity.hex() not in n.status()["version_vector"]

    def test_stamped_too_far_ahead(self, world: World) -> None:
        e = make_entry(MALLORY, seq=1, hlc=now_hlc(3_600_000), prev=GENESIS,
                       body=Order(side=BUY, price=10, qty=5))
        self.check_rejected(world, world.nodes[0], e.to_wire(), "clock_skew")

    @pytest.mark.parametrize(("change", "code"), [({"qty": 0}, "out_of_range"), ({"qty": 2.5}, "malformed_entry"),
                                                  ({"side": 7}, "out_of_range")])
    def test_malformed_entry_is_listed_as_rejected(self, world: World, change: dict[str, Any], code: str) -> None:
        """Regression: entries that failed to decode were only logged, and the
        push reply said ``rejected: []``; now they are listed with their
        origin and seq."""
        e = make_entry(MALLORY, seq=1, hlc=now_hlc(), prev=GENESIS, body=Order(side=BUY, price=10, qty=5))
        self.check_rejected(world, world.nodes[1], tampered(e.to_wire(), **change), code)

    def test_bad_entry_in_a_batch_of_good_ones_of_another_origin(self, world: World) -> None:
        """A batch that mixes honest duplicates with one forged entry: only the
        forged one is refused, and nothing changes."""
        a, b, _ = world.nodes
        honest = fetch_entries(a)
        e = make_entry(MALLORY, seq=1, hlc=now_hlc(), prev=GENESIS, body=Order(side=BUY, price=10, qty=5))
        reply = push(b, [*honest, tampered(e.to_wire(), price=11)])
        assert reply["accepted"] == 0
        assert [(r["origin"], r["error"]) for r in reply["rejected"]] == [(MALLORY.public.hex(), "bad_signature")]


class TestAfterAbuse:
    def test_honest_orders_still_replicate(self, world: World, allow_change: None) -> None:
        """Runs last: after every refusal above, the honest nodes still count each
        other as healthy peers and an honest order still reaches all of them."""
        c = world.nodes[2]
        for n in world.nodes:
            st = n.status()
            assert st["counts"]["equivocating_origins"] == 0
            assert all(p["state"] == "up" for p in st["peers"]), st["peers"]
        o = c.order("sell", 1, 1000)
        wait_order_everywhere(world.nodes, o["id"])
        wait_converged(world.nodes)
