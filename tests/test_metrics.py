"""``GET /metrics`` on real nodes: the Prometheus text format parses with
``prometheus_client.parser``, and the figures follow what the nodes did
(orders by origin, fills provisional and final, entries received, peers by
state, replication and time-to-final histograms, SQLite commits, HTTP
requests by route, refused entries by reason)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.nodes import NodeProc, http, make_nodes, start_network, stop_all, wait_until

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_metrics")


def scrape(node: NodeProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by (name, sorted labels)."""
    r = http("GET", node.url + "/metrics")
    assert r.status == 200, r
    assert r.content_type.startswith("text/plain"), r.content_type
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    nodes = make_nodes(tmp_path_factory.mktemp("metrics"), ("a", "b"))
    try:
        start_network(nodes)
        yield nodes
    finally:
        stop_all(nodes)


class TestMetrics:
    def test_figures_follow_what_the_nodes_did(self, pair: list[NodeProc], tmp_path: Path) -> None:
        a, b = pair
        sell = a.order("sell", 3, 100)
        wait_until(lambda: http("GET", f"{b.url}/v1/orders/{sell['id']}").status == 200, timeout=30,
                   what="sell at b", nodes=pair)
        b.order("buy", 2, 100)
        wait_until(lambda: all(not n.status()["finality"]["pending"] for n in pair), timeout=30,
                   what="fill final", nodes=pair)
        # an entry refused for a reason: garbage in a push
        http("POST", a.url + "/peer/v1/push", msgpack.packb({"entries": [[b"x", 1]]}),
             headers={"Content-Type": "application/msgpack"})

        sa, sb = scrape(a), scrape(b)
        assert value(sa, "p2pex_orders_total", origin="self") == 1
        assert value(sa, "p2pex_orders_total", origin="others") == 1
        assert value(sb, "p2pex_orders_total", origin="self") == 1
        assert value(sa, "p2pex_entries_received_total", kind="order") >= 1
        assert value(sa, "p2pex_entries_received_total", kind="heartbeat") >= 1
        # the fill: b's taker, final on both
        assert value(sb, "p2pex_fills_total", state="final", origin="self") == 1
        assert value(sa, "p2pex_fills_total", state="final", origin="others") == 1
        assert value(sa, "p2pex_final_fills") == 1 and value(sa, "p2pex_provisional_fills") == 0
        assert value(sa, "p2pex_finality_lag_seconds") == 0
        assert value(sa, "p2pex_members") == 2
        assert value(sa, "p2pex_peers", state="up") == 1
        assert value(sb, "p2pex_time_to_final_seconds_count") >= 1
        assert value(sa, "p2pex_replication_latency_seconds_count") >= 1
        assert value(sa, "p2pex_sqlite_commit_seconds_count", what="own") >= 1
        # what a node merged and what became final are committed by a group commit or by the next own entry
        assert value(sa, "p2pex_sqlite_commit_seconds_count", what="group") \
            + value(sa, "p2pex_sqlite_commit_seconds_count", what="own") >= 2
        assert sum(v for (n, _), v in sa.items() if n == "p2pex_entries_rejected_total") >= 1
        assert value(sa, "p2pex_http_requests_total", route="/v1/orders", status="201") == 1
        assert value(sa, "p2pex_http_requests_total", route="/v1/orders/{order_id}", status="200") == 0
        assert value(sb, "p2pex_http_requests_total", route="/v1/orders/{order_id}", status="200") >= 1
        assert value(sa, "p2pex_http_requests_total", route="/peer/v1/push", status="200") >= 1
        assert ("p2pex_event_loop_lag_seconds", ()) in sa
        assert value(sa, "p2pex_engine_rebuilds_total") == 0
        assert value(sa, "p2pex_ready") == 1
