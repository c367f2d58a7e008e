"""In-process checks of the node shell's safety rules: the peer table's
bounds, commit before apply, restore after the clock stepped back, and the
store's refusal to overwrite an entry.  No sockets are opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from crdt.entry import BUY, SELL, Heartbeat, Order, encode_entry, make_entry
from crdt.hlc import Hlc
from matching.exchange import Exchange
from net.config import NodeConfig
from net.node import Node
from net.peers import MAX_RECORD_SKEW_MS, PeerRecord, PeerTable
from net.store import Store
from tests.conftest import NOW_MS, key_for


def record(i: int, last_seen: int) -> PeerRecord:
    return PeerRecord.create(key_for(100 + i), f"http://10.0.0.{i % 250 + 1}:7001", last_seen)


class TestPeerTable:
    def test_table_is_bounded(self) -> None:
        """Regression: any peer could grow the table without limit with records
        signed by fresh keys (3,000 records took a node to 820 MB)."""
        table = PeerTable(b"\0" * 32, ttl_ms=60_000, max_peers=5)
        accepted = [table.offer(record(i, NOW_MS), NOW_MS) for i in range(8)]
        assert accepted == [True] * 5 + [False] * 3
        assert len(table.peers) == 5
        # known peers still refresh when the table is full
        assert table.offer(record(0, NOW_MS + 1), NOW_MS + 1)

    def test_future_stamped_record_is_refused(self) -> None:
        """Regression: a record stamped far ahead never expired."""
        table = PeerTable(b"\0" * 32, ttl_ms=60_000)
        assert not table.offer(record(1, NOW_MS + MAX_RECORD_SKEW_MS + 1), NOW_MS)
        assert table.offer(record(2, NOW_MS + MAX_RECORD_SKEW_MS), NOW_MS)

    def test_stale_record_is_refused_and_expired(self) -> None:
        table = PeerTable(b"\0" * 32, ttl_ms=60_000)
        assert not table.offer(record(1, NOW_MS - 60_001), NOW_MS)
        assert table.offer(record(2, NOW_MS - 59_000), NOW_MS)
        assert table.expire(NOW_MS + 2_000) == [key_for(102).public]


class TestCommitBeforeApply:
    def test_failed_commit_changes_nothing(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Regression: submit changed the replica before the commit, so a failed
        write left an unacknowledged entry that peers could pull, and its seq
        was reused after a restart."""
        node = Node(NodeConfig(data_dir=tmp_path / "n", port=1), clock_ms=lambda: NOW_MS)
        try:
            node.submit(Order(side=BUY, price=100, qty=1))

            def failing(entries: object) -> None:
                raise sqlite3.OperationalError("disk I/O error")

            monkeypatch.setattr(node.store, "save_entries", failing)
            before = (node.exchange.state_hash(), node.exchange.replica.version_vector())
            with pytest.raises(sqlite3.OperationalError):
                node.submit(Order(side=SELL, price=100, qty=1))
            assert (node.exchange.state_hash(), node.exchange.replica.version_vector()) == before
            assert len(node.exchange.engine.fills) == 0
        finally:
            node.store.close()


class TestRestore:
    def test_restore_ignores_the_clock(self, tmp_path: Path) -> None:
        """Regression: restoring applied the 5 s skew bound to the node's own
        stored entries, so after the clock stepped back they were refused and
        the node reissued their sequence numbers with other hashes."""
        data = tmp_path / "n"
        key = key_for(6)
        store = Store(data)
        hlc, prev, seq = Hlc(), b"\0" * 32, 0
        later = NOW_MS + 3_600_000  # written while the clock was an hour ahead
        for _ in range(3):
            seq += 1
            e = make_entry(key, seq=seq, hlc=hlc.now(later), prev=prev, body=Heartbeat())
            store.save_entries([e])
            prev = e.hash
        ex = Exchange(key)
        ex.restore(store.load_entries())
        assert ex.replica.version_vector() == {key.public: 3}
        nxt = ex.prepare(Heartbeat(), now_ms=NOW_MS)  # the clock is now back
        assert nxt.seq == 4 and nxt.prev == prev and nxt.hlc > e.hlc
        store.close()

    def test_store_refuses_a_second_entry_at_one_seq(self, tmp_path: Path) -> None:
        key = key_for(7)
        store = Store(tmp_path)
        a = make_entry(key, seq=1, hlc=5 << 16, prev=b"\0" * 32, body=Heartbeat())
        b = make_entry(key, seq=1, hlc=6 << 16, prev=b"\0" * 32, body=Heartbeat())
        store.save_entries([a])
        with pytest.raises(sqlite3.IntegrityError):
            store.save_entries([b])
        assert store.load_entries() == [a]
        store.close()

    def test_evidence_round_trips(self, tmp_path: Path) -> None:
        key = key_for(8)
        a = make_entry(key, seq=1, hlc=5 << 16, prev=b"\0" * 32, body=Heartbeat())
        b = make_entry(key, seq=1, hlc=6 << 16, prev=b"\0" * 32, body=Heartbeat())
        store = Store(tmp_path)
        store.save_evidence(key.public, encode_entry(a), encode_entry(b))
        assert store.load_evidence() == [(a, b)]
        ex = Exchange(key_for(9))
        assert ex.replica.restore_evidence(a, b)
        assert ex.receive([make_entry(key, seq=2, hlc=7 << 16, prev=a.hash, body=Heartbeat())],
                          now_ms=NOW_MS).merge.accepted == ()
        store.close()
