"""Sync benchmark: a fresh node's catch-up, the idle cost of anti-entropy, restart to ready.

What it measures
----------------
1. **Catch-up**: a one-node network whose founder's data dir holds ``--history`` orders
   (``benchmarks.finality.history``: buys and sells that mostly trade, so the book stays small,
   written with ``net.localnet.write_history``) is started and everything made final.  Then a
   fresh node (empty data dir, ``--bootstrap`` to the founder) is spawned, and timed from spawn
   to (a) ``/readyz`` 200 and (b) caught up: its ``version_vector`` equals the founder's for the
   founder's origin and its state hash equals the founder's (both read from ``/v1/status``, the
   founder first, every 50 ms).  Also reported: the peer bytes the fresh node received by then
   (``replication.peer_bytes_received``: the request and reply bodies of its own calls, nearly all
   sync pages) and sent, and entries per second (the founder's entries over the catch-up time).
2. **Idle bytes per anti-entropy round**: a 2-node network, idle, every node a member and
   everything final.  Over ``--idle`` seconds, the growth of ``peer_bytes_sent +
   peer_bytes_received`` on node ``a`` divided by the number of pulls ``a`` made (a pull is one
   ``/peer/v1/sync`` call to a random live peer every ``--pull-interval`` seconds, jittered;
   with one peer each is a sync call that ``b`` served, counted from ``b``'s ``/metrics``).  The
   figure is everything ``a`` sends and receives on its own calls in that time, per pull: the
   sync request (``a``'s version vector digest) and reply (``b``'s version vector, no entries
   when idle), plus ``a``'s pushes of its own heartbeats (one every 3 s while idle) and its
   peer-exchange calls (``/peer/v1/peers``: records and a proof); the calls of each kind are
   counted and shown.  Not included: what ``b``'s calls cost (they count on ``b``), HTTP headers
   and the DHT's UDP traffic.
3. **Restart to ready** with ``--restart-history`` orders and a tenth of that:
   ``benchmarks.finality.restart_figures`` (start on the history, finalize, SIGTERM, start again,
   spawn to ``/readyz`` 200).

Everything is seeded (``--seed``); the machine is shared, so figures move between runs.  The last
line is ``catchup_100k_s=X restart_1m_s=Y`` (catch-up to caught up, and restart to ready with the
larger history, whatever sizes were run).

    .venv/bin/python benchmarks/sync.py            # 100,000-order catch-up; restarts at 100,000 and 1,000,000
    .venv/bin/python benchmarks/sync.py --quick    # 10,000-order catch-up; restarts at 2,000 and 20,000
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.finality import history, restart_figures
from client import ClientError
from net.localnet import (
    POLL,
    NodeProc,
    all_logs,
    http,
    make_nodes,
    start_network,
    stop_all,
    wait_until,
    write_history,
)

PEER_ROUTES = ("/peer/v1/sync", "/peer/v1/push", "/peer/v1/peers")
_REQUESTS = re.compile(r'^p2pex_http_requests_total\{([^}]*)\}\s+([0-9.eE+]+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def peer_calls_served(node: NodeProc) -> dict[str, int]:
    """Peer calls ``node`` answered, by route (any status), from its ``/metrics``."""
    r = http("GET", node.url + "/metrics")
    assert r.status == 200, f"GET /metrics: {r!r}"
    out = dict.fromkeys(PEER_ROUTES, 0)
    for line in r.body.decode().splitlines():
        m = _REQUESTS.match(line)
        if m is None:
            continue
        labels = dict(_LABEL.findall(m.group(1)))
        route = labels.get("route", "")
        if route in out:
            out[route] += int(float(m.group(2)))
    return out


def peer_bytes(st: dict[str, Any]) -> int:
    rep = st["replication"]
    return int(rep["peer_bytes_sent"]) + int(rep["peer_bytes_received"])


def start_and_finalize(node: NodeProc, timeout: float) -> dict[str, Any]:
    """Start ``node``, wait for ``/readyz`` and until nothing is pending; its status."""
    node.start(wait=False)
    node.wait_ready(timeout=timeout)
    wait_until(lambda: not node.status()["finality"]["pending"], timeout=timeout, what=f"{node.name} final",
               nodes=[node], interval=0.2)
    return node.status()


# ---- 1: catch-up ------------------------------------------------------------------


def catchup_figures(base: Path, n: int, seed: int, extra_args: list[str], timeout: float) -> dict[str, Any]:
    founder, fresh = make_nodes(base, ("founder", "fresh"))
    founder.extra_args = fresh.extra_args = list(extra_args)
    t0 = time.monotonic()
    write_history(founder.data_dir, history(n, seed), start_ms=int(time.time() * 1000) - n - 60_000)
    written_s = time.monotonic() - t0
    nodes = [founder, fresh]
    try:
        t0 = time.monotonic()
        fst = start_and_finalize(founder, timeout)
        founder_start_s = time.monotonic() - t0
        origin = fst["node_id"]
        spawned = time.monotonic()
        fresh.start(wait=False)
        serving_s: float | None = None
        talking_s: float | None = None  # when its first peer call had an answer
        ready_s: float | None = None
        ready_body: dict[str, Any] = {}
        caught_s: float | None = None
        at: dict[str, Any] = {}
        founder_at: dict[str, Any] = {}
        deadline = spawned + timeout
        for _ in range(int(timeout / POLL) + 10):  # bounded in count as well as in time
            if not fresh.running():
                raise AssertionError(f"fresh exited with {fresh.proc and fresh.proc.returncode}\n"
                                     + all_logs(nodes))
            if ready_s is None:
                try:
                    r = http("GET", fresh.url + "/readyz", timeout=1.0)
                except OSError:  # not listening yet, or busy past the timeout
                    r = None
                if r is not None and serving_s is None:
                    serving_s = time.monotonic() - spawned
                if r is not None and r.status == 200:
                    ready_s = time.monotonic() - spawned
                    ready_body = r.json()
            if caught_s is None:
                try:
                    fs = founder.status()
                    st = fresh.status()
                except ClientError:  # the fresh node is not serving yet, or busy merging a page
                    pass
                else:
                    t = time.monotonic() - spawned
                    if talking_s is None and st["replication"]["peer_bytes_received"]:
                        talking_s = t
                    if (st["version_vector"].get(origin) == fs["version_vector"][origin]
                            and st["state_hash"] == fs["state_hash"]):
                        caught_s, at, founder_at = t, st, fs
            if ready_s is not None and caught_s is not None:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"fresh node not ready and caught up within {timeout:g} s "
                                     f"(ready after {ready_s} s)\n" + all_logs(nodes))
            time.sleep(POLL)
        assert ready_s is not None and caught_s is not None
        serving_s = min(serving_s if serving_s is not None else caught_s, caught_s)
        talking_s = min(talking_s if talking_s is not None else caught_s, caught_s)
    finally:
        stop_all(nodes)
    rep = at["replication"]
    entries = int(founder_at["counts"]["entries"])
    received = int(rep["peer_bytes_received"])
    return {
        "orders": n, "history_written_s": round(written_s, 1), "founder_start_to_final_s": round(founder_start_s, 1),
        "ready_s": round(ready_s, 2), "ready_detail": ready_body.get("detail", ""),
        "ready_synced": "synced_with" in ready_body, "caught_up_s": round(caught_s, 2),
        "entries": entries, "origin_seq": founder_at["version_vector"][origin],
        "entries_per_s": round(entries / caught_s) if caught_s else 0,
        "serving_s": round(serving_s, 2), "talking_s": round(talking_s, 2),
        "entries_per_s_talking": round(entries / (caught_s - talking_s)) if caught_s > talking_s else 0,
        "peer_bytes_received": received, "peer_bytes_sent": int(rep["peer_bytes_sent"]),
        "bytes_per_entry": round(received / entries, 1) if entries else 0.0,
        "pulled": int(rep["pulled"]), "final_fills": int(founder_at["counts"]["final_fills"]),
    }


# ---- 2: idle bytes per anti-entropy round ---------------------------------------------


def idle_figures(base: Path, seconds: float, extra_args: list[str]) -> dict[str, Any]:
    a, b = make_nodes(base, ("a", "b"))
    a.extra_args = b.extra_args = list(extra_args)
    nodes = [a, b]
    try:
        start_network(nodes, timeout=60)
        wait_until(lambda: not any(n.status()["finality"]["pending"] for n in nodes), timeout=60,
                   what="everything final", nodes=nodes, interval=0.2)
        time.sleep(5.0)  # let the peer exchange settle at its slowest period
        before, served_before = a.status(), peer_calls_served(b)
        t0 = time.monotonic()
        time.sleep(seconds)
        after, served_after = a.status(), peer_calls_served(b)
        elapsed = time.monotonic() - t0
        pending = any(n.status()["finality"]["pending"] for n in nodes)
    finally:
        stop_all(nodes)
    calls = {route: served_after[route] - served_before[route] for route in PEER_ROUTES}
    pulls = calls["/peer/v1/sync"]
    grown = peer_bytes(after) - peer_bytes(before)
    sent = after["replication"]["peer_bytes_sent"] - before["replication"]["peer_bytes_sent"]
    return {
        "seconds": round(elapsed, 1), "pulls": pulls, "pushes": calls["/peer/v1/push"],
        "exchanges": calls["/peer/v1/peers"], "bytes": grown, "bytes_sent": sent, "bytes_received": grown - sent,
        "bytes_per_round": round(grown / pulls) if pulls else 0,
        "own_entries": after["counts"]["own_entries"] - before["counts"]["own_entries"],
        "pending_at_end": pending,
    }


# ---- main -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--history", type=int, default=100_000,
                   help="orders in the founder's history for the catch-up (default 100,000)")
    p.add_argument("--restart-history", type=int, default=1_000_000,
                   help="orders in the larger restart history; a tenth of it is run too (default 1,000,000)")
    p.add_argument("--idle", type=float, default=20.0, help="seconds of the idle measurement (default 20)")
    p.add_argument("--pull-interval", type=float, default=0.5,
                   help="the nodes' --pull-interval, seconds between anti-entropy pulls (default 0.5)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for each start and catch-up")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="10,000-order catch-up, restarts at 2,000 and 20,000")
    p.add_argument("--skip-restart", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.history, args.restart_history = 10_000, 20_000
    node_args = ["--pull-interval", f"{args.pull_interval:g}"]
    with tempfile.TemporaryDirectory(prefix="p2pex-sync-") as tmp:
        c = catchup_figures(Path(tmp) / "catchup", args.history, args.seed, node_args, args.timeout)
        print(f"catch-up   founder with {c['orders']:,} orders of history ({c['entries']:,} entries, "
              f"{c['final_fills']:,} final fills; written in {c['history_written_s']} s, its start to all final "
              f"{c['founder_start_to_final_s']} s); a fresh node spawned with --bootstrap to it: ready after "
              f"{c['ready_s']} s ({c['ready_detail']}), caught up after {c['caught_up_s']} s "
              f"(version vector and state hash equal the founder's): {c['entries_per_s']:,} entries/s from spawn, "
              f"{c['entries_per_s_talking']:,} from the first answer to one of its peer calls ({c['talking_s']} s "
              f"after spawn; it answered HTTP after {c['serving_s']} s); "
              f"it received {c['peer_bytes_received']:,} peer bytes ({c['bytes_per_entry']} per entry) "
              f"and sent {c['peer_bytes_sent']:,}", flush=True)
        if not c["ready_synced"]:
            print("note       the fresh node was ready alone (--ready-timeout), not after a sync with the founder")
        i = idle_figures(Path(tmp) / "idle", args.idle, node_args)
        print(f"idle       2 nodes, every member final, {i['seconds']:g} s, --pull-interval {args.pull_interval:g}: "
              f"node a made {i['pulls']} pulls, {i['pushes']} pushes ({i['own_entries']} own entries: heartbeats) "
              f"and {i['exchanges']} peer exchanges; its peer bytes grew by {i['bytes']:,} "
              f"({i['bytes_sent']:,} sent, {i['bytes_received']:,} received): {i['bytes_per_round']:,} bytes per "
              f"anti-entropy round (the sync request and reply, plus its share of heartbeat pushes and peer "
              f"exchange; request and reply bodies of a's own calls only: no headers, no DHT)"
              + (" [something was pending at the end]" if i["pending_at_end"] else ""), flush=True)
        restart_s = float("nan")
        if not args.skip_restart:
            for n in (args.restart_history // 10, args.restart_history):
                r = restart_figures(Path(tmp) / "restart", n, args.seed)
                print(f"restart    {r['orders']:>9,} orders ({r['final_fills']:,} final fills, {r['db_mb']} MB "
                      f"SQLite): restart to ready {r['restart_to_ready_s']} s; RSS {r['rss_mb_restart']} MB after "
                      f"restart (first start to all final {r['first_start_to_final_s']} s)", flush=True)
                restart_s = r["restart_to_ready_s"]
        if args.history != 100_000 or args.restart_history != 1_000_000:
            print(f"note       sizes differ from the names of the last line: catch-up {args.history:,} orders, "
                  f"restart {args.restart_history:,} orders")
        print(f"catchup_100k_s={c['caught_up_s']:.2f} restart_1m_s={restart_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
