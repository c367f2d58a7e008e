"""The relay rules of ``net/node.py`` (docs/REPLICATION.md), in one process:
a node with two peers, B and C, both members; the node's calls to its peers
are recorded instead of sent (the transport is the only thing replaced), and
its monotonic clock is a variable.  Real processes and real links are in
``tests/test_node_faults.py`` and the chaos suite."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from crdt.entry import Entry, Heartbeat, Order
from crdt.keys import SigningKey
from matching.exchange import Exchange
from net.config import NodeConfig
from net.node import PUSH_EVERY_S, RELAY_AFTER_S, RELAY_EVERY_S, Node
from net.peers import PeerRecord
from tests.conftest import NOW_MS, key_for


class Net:
    def __init__(self, tmp_path: Path) -> None:
        self.mono = 1000.0
        self.node = Node(NodeConfig(data_dir=tmp_path / "a", port=1), clock_ms=lambda: NOW_MS,
                         monotonic=lambda: self.mono)
        self.node._load()
        self.node._found()
        self.keys: dict[str, SigningKey] = {"b": key_for(31), "c": key_for(32)}
        self.sent: list[tuple[str, list[Entry]]] = []  # (peer, entries) of every push, in order
        self.holds: dict[str, dict[bytes, int]] = {}  # what each peer answers it holds

        self.dropping: set[str] = set()  # peers that lose what is pushed to them

        async def call(peer: Any, path: str, body: dict[str, Any]) -> Any:
            name = self.name_of(peer.record.node_id)
            wires = body["entries"]
            got = [e for e in self.node.exchange.replica.entries() if e.to_wire() in wires]
            self.sent.append((name, got))
            holds = self.holds.setdefault(name, {})
            for e in got:
                if name not in self.dropping and holds.get(e.origin, 0) == e.seq - 1:
                    holds[e.origin] = e.seq
            return {"has": dict(holds)}
        self.node._call = call  # type: ignore[method-assign]
        self.peers: dict[str, Exchange] = {}
        for name, key in self.keys.items():
            self.node.peers.offer(PeerRecord.create(key, f"http://10.0.0.{len(self.peers) + 2}:7001", NOW_MS),
                                  NOW_MS)
            assert self.node.admit(key.public, 0)
            ex = Exchange(key)
            assert self.node.exchange.network is not None
            ex.set_network(self.node.exchange.network)
            for voter_name, voter in self.peers.items():  # admission takes a majority: the members vote too
                self.node.flush()
                voter.receive(self.node.store.load_entries(), now_ms=NOW_MS)
                vote = voter.admission_vote(key.public, 0)
                assert vote is not None
                entry = voter.prepare(vote, now_ms=NOW_MS)
                voter.apply_own(entry, now_ms=NOW_MS)
                self.node.ingest([entry.to_wire()], peer=voter_name)
            self.peers[name] = ex
        for ex in self.peers.values():
            self.node.flush()
            ex.receive(self.node.store.load_entries(), now_ms=NOW_MS)  # memory holds the tail only
            assert ex.is_member()
        self.sent.clear()

    def relay_for(self, seconds: float) -> None:
        """The relay loop's rounds over ``seconds`` of the node's clock."""
        for _ in range(round(seconds / RELAY_EVERY_S)):
            self.mono += RELAY_EVERY_S
            self.node._relay()

    def name_of(self, node_id: bytes) -> str:
        return next(n for n, k in self.keys.items() if k.public == node_id)

    def write(self, name: str) -> Entry:
        ex = self.peers[name]
        e = ex.prepare(Heartbeat(), now_ms=NOW_MS)
        ex.apply_own(e, now_ms=NOW_MS)
        return e

    def from_peer(self, name: str, entries: list[Entry], *, down: list[str] = ()) -> None:  # type: ignore[assignment]
        sender = self.keys[name].public
        self.node.note_down(sender, [self.keys[d].public for d in down])
        self.node.ingest([e.to_wire() for e in entries], peer="test", peer_id=sender)

    async def settle(self) -> None:
        """Let the pushes (tasks) run; the clock moves on with them (a push waits out PUSH_EVERY_S)."""
        for _ in range(5):
            self.mono += PUSH_EVERY_S
            await asyncio.sleep(PUSH_EVERY_S)

    def to(self, name: str) -> list[Entry]:
        return [e for n, batch in self.sent if n == name for e in batch]


def run(tmp_path: Path, scenario: Callable[[Net], Awaitable[None]]) -> None:
    """The scenario on a fresh network, inside an event loop (pushes are tasks)."""
    async def main() -> None:
        net = Net(tmp_path)
        try:
            await scenario(net)
        finally:
            for task in list(net.node._tasks):
                task.cancel()
            await asyncio.gather(*net.node._tasks, return_exceptions=True)
            net.node.store.close()
    asyncio.run(main())


class TestRelay:
    def test_own_entries_go_to_every_peer_at_once(self, tmp_path: Path) -> None:
        async def scenario(net: Net) -> None:
            placed = net.node.submit(Order(side=0, price=100, qty=1))
            await net.settle()
            assert placed.entry in net.to("b") and placed.entry in net.to("c")
        run(tmp_path, scenario)

    def test_a_members_entry_goes_on_only_to_a_peer_that_still_lacks_it(self, tmp_path: Path) -> None:
        """B pushed two entries to us. C's replies say it holds the first (it
        had it from B): that one is not relayed; the second, which C still
        lacks RELAY_AFTER_S later, is relayed to C once, and never back to B."""
        async def scenario(net: Net) -> None:
            b = net.peers["b"]
            first = net.write("b")
            net.holds["c"] = {b.node_id: first.seq}
            net.from_peer("b", [first])
            net.node.submit(Heartbeat())  # a push to C: its reply says what C holds
            await net.settle()
            second = net.write("b")
            net.from_peer("b", [second])
            net.node._relay()
            await net.settle()
            assert second not in net.to("c")  # too fresh: B's own push may still be on its way
            net.relay_for(RELAY_AFTER_S + 2 * RELAY_EVERY_S)
            await net.settle()
            assert net.to("c").count(second) == 1 and first not in net.to("c")
            assert second not in net.to("b")  # an entry never goes back to its origin
            net.relay_for(1.0)  # no reply since: the relay is in flight, not repeated
            await net.settle()
            assert net.to("c").count(second) == 1
        run(tmp_path, scenario)

    def test_a_relayed_entry_the_peer_still_lacks_is_sent_again(self, tmp_path: Path) -> None:
        """C's reply to a later push says it still lacks what was relayed (a
        push it lost, or a gap it holds back): the relay sends it again."""
        async def scenario(net: Net) -> None:
            net.dropping.add("c")
            e = net.write("b")
            net.from_peer("b", [e])
            net.node.submit(Heartbeat())
            await net.settle()
            net.relay_for(RELAY_AFTER_S + 2 * RELAY_EVERY_S)
            await net.settle()
            assert net.to("c").count(e) == 1
            net.dropping.clear()
            net.node.submit(Heartbeat())  # its reply: still without e
            await net.settle()
            net.relay_for(RELAY_EVERY_S)
            await net.settle()
            assert net.to("c").count(e) == 2
            net.node.submit(Heartbeat())
            await net.settle()
            net.relay_for(1.0)  # C holds it now: nothing more
            await net.settle()
            assert net.to("c").count(e) == 2
        run(tmp_path, scenario)

    def test_entries_of_a_member_that_cannot_reach_a_peer_go_to_it_at_once(self, tmp_path: Path) -> None:
        async def scenario(net: Net) -> None:
            e = net.write("b")
            net.from_peer("b", [e], down=["c"])
            await net.settle()  # no relay round in between
            assert [x for x in net.to("c") if x.origin == e.origin] == [e]
        run(tmp_path, scenario)
