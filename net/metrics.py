"""Prometheus metrics of a node, served at ``GET /metrics`` in the text format.

Owns one registry per node (several nodes can live in one process) with the
instruments the shell updates as things happen (entries received and refused,
fills, latencies, SQLite commit time, HTTP requests, event-loop lag) and a
collector that reads the rest from the node when scraped (orders and cancels,
pushed and pulled entries, peers by state, finality lag, engine rewinds).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crdt.entry import Admit, Cancel, Entry, Heartbeat, Leave, Order
from crdt.hlc import physical_ms

if TYPE_CHECKING:
    from net.node import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
LOOP_PROBE_S = 0.1
SUSTAINED_PROBES = 3


def entry_kind(e: Entry) -> str:
    body = e.body
    if isinstance(body, Order):
        return "order"
    if isinstance(body, Cancel):
        return "cancel"
    if isinstance(body, Heartbeat):
        return "heartbeat"
    return "membership" if isinstance(body, Admit | Leave) else "vote"


class NodeMetrics:
    def __init__(self, node: Node) -> None:
        self.registry = r = CollectorRegistry()
        self.entries_received = Counter(
            "p2pex_entries_received", "Entries of other origins merged here, by body kind", ["kind"], registry=r)
        self.entries_rejected = Counter(
            "p2pex_entries_rejected", "Entries refused, by reason (error code)", ["reason"], registry=r)
        self.fills = Counter(
            "p2pex_fills", "Fills made here, provisional when matched and final when they became final, by the "
            "taker's origin (this node or others)", ["state", "origin"], registry=r)
        self.revoked = Counter("p2pex_fills_revoked", "Provisional fills that went away before they were final",
                               registry=r)
        self.replication_latency = Histogram(
            "p2pex_replication_latency_seconds", "Acceptance at their origin to merge here, for entries of other "
            "origins (needs synchronised clocks)", buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_final = Histogram(
            "p2pex_time_to_final_seconds", "Acceptance to final, for this node's orders and cancels",
            buckets=LATENCY_BUCKETS, registry=r)
        self.sqlite_commit = Histogram(
            "p2pex_sqlite_commit_seconds", "Time of one SQLite transaction, by what it writes", ["what"],
            buckets=COMMIT_BUCKETS, registry=r)
        self.http_requests = Counter(
            "p2pex_http_requests", "HTTP requests served, by route and status", ["route", "status"], registry=r)
        self.loop_lag = Gauge("p2pex_event_loop_lag_seconds",
                              f"How late a {LOOP_PROBE_S:g} s sleep of the event loop woke up, last probe", registry=r)
        self.lags: deque[float] = deque([0.0] * SUSTAINED_PROBES, maxlen=SUSTAINED_PROBES)  # the last probes
        r.register(_Snapshot(node))

    def received(self, entries: list[Entry], own: bytes) -> None:
        kinds = Tally(entry_kind(e) for e in entries if e.origin != own)
        for kind, n in kinds.items():
            self.entries_received.labels(kind).inc(n)

    def rejected(self, codes: list[str]) -> None:
        for code, n in Tally(codes).items():
            self.entries_rejected.labels(code).inc(n)

    def observe_replication(self, now_ms: int, hlc: int) -> None:
        self.replication_latency.observe(max(now_ms - physical_ms(hlc), 0) / 1000)

    @contextmanager
    def commit(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sqlite_commit.labels(what).observe(time.perf_counter() - t0)

    async def probe_loop(self) -> None:
        """Sleep and see how late the loop wakes up: what every request waits extra."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LOOP_PROBE_S)
            lag = max(loop.time() - t0 - LOOP_PROBE_S, 0.0)
            self.lags.append(lag)
            self.loop_lag.set(lag)

    @property
    def sustained_lag_s(self) -> float:
        """The least lag of the last few probes: a loop that is late every time
        is over its capacity; one late probe is a pause (SIGSTOP, a full GC)."""
        return min(self.lags)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot(Collector):
    """What the node already counts, read when scraped."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        ex = node.exchange
        orders = CounterMetricFamily("p2pex_orders", "Orders in the merged logs, by origin", labels=["origin"])
        orders.add_metric(["self"], node.own_orders)
        orders.add_metric(["others"], node.others_orders)
        yield orders
        cancels = CounterMetricFamily("p2pex_cancels", "Cancels in the merged logs, by origin", labels=["origin"])
        cancels.add_metric(["self"], node.own_cancels)
        cancels.add_metric(["others"], node.others_cancels)
        yield cancels
        c = node.counters
        moved = CounterMetricFamily("p2pex_entries_replicated", "Entries pushed to peers and pulled from them",
                                    labels=["direction"])
        moved.add_metric(["pushed"], c["pushed"])
        moved.add_metric(["pulled"], c["pulled"])
        yield moved
        peer_bytes = CounterMetricFamily("p2pex_peer_bytes", "Bodies of this node's calls to peers",
                                         labels=["direction"])
        peer_bytes.add_metric(["sent"], c["peer_bytes_sent"])
        peer_bytes.add_metric(["received"], c["peer_bytes_received"])
        yield peer_bytes
        peers = GaugeMetricFamily("p2pex_peers", "Peers in the table, by state", labels=["state"])
        states = Tally(p["state"] for p in node.peer_views())
        for state in ("up", "down", "backoff"):
            states.setdefault(state, 0)
        for state, n in sorted(states.items()):
            peers.add_metric([state], n)
        yield peers
        yield GaugeMetricFamily("p2pex_peer_candidates", "Peer records waiting for their key proof",
                                value=len(node.candidates))
        pending = ex.pending()
        lag = max(node.clock_ms() - physical_ms(pending), 0) / 1000 if pending else 0.0
        yield GaugeMetricFamily("p2pex_finality_lag_seconds", "Age of the oldest record not final here", value=lag)
        yield GaugeMetricFamily("p2pex_members", "Members of the network", value=len(ex.membership.members()))
        yield GaugeMetricFamily("p2pex_uncertified_entries", "Entries of this node's log that no majority of "
                                "members has certified yet", value=max(ex.finality.end(ex.node_id)
                                                                       - ex.certified_upto(), 0)
                                if ex.is_member() else 0)
        yield CounterMetricFamily("p2pex_no_quorum", "Orders and cancels answered 503 no_quorum",
                                  value=c["no_quorum"])
        yield GaugeMetricFamily("p2pex_member", "1 while this node is a member, 0 as a participant (or joining)",
                                value=1 if ex.is_member() else 0)
        tickets = CounterMetricFamily("p2pex_tickets", "Participants' tickets carried and certified: this "
                                      "participant's (carried), and those this member carried (carries)",
                                      labels=["what"])
        tickets.add_metric(["carried"], c["carried"])
        tickets.add_metric(["carries"], c["carries"])
        yield tickets
        yield GaugeMetricFamily("p2pex_final_fills", "Fills final here", value=ex.engine.fills_base)
        yield GaugeMetricFamily("p2pex_provisional_fills", "Fills not final yet", value=len(ex.engine.fills))
        yield GaugeMetricFamily("p2pex_resting_orders", "Orders resting in the book", value=ex.engine.resting_count())
        yield GaugeMetricFamily("p2pex_entries_in_memory", "Entries above the final frontier, held in memory",
                                value=ex.replica.memory_entries())
        yield CounterMetricFamily("p2pex_engine_rewinds", "Times a late record rewound the book",
                                  value=ex.engine.rewinds)
        yield CounterMetricFamily("p2pex_engine_rebuilds", "Records that arrived at or below the final frontier "
                                  "(a rebuild would be needed; always 0)", value=ex.anomalies)
        yield GaugeMetricFamily("p2pex_clock_offset_seconds", "The peers' median clock minus this node's",
                                value=ex.clock_offset_ms / 1000)
        yield GaugeMetricFamily("p2pex_ready", "1 once the node is ready", value=1 if node.ready else 0)
