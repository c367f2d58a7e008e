"""Finality benchmark: time to final under load, an idle network's cost, and a
node's restart time and memory with a long history.

What it measures
----------------
1. **Time to final** on a healthy cluster on 127.0.0.1 (``python cli.py
   node`` processes, free ports: ``--members`` members, 5 by default, and
   ``--participants`` participants, none by default): an open-loop generator
   places ``--rate`` orders/s in total (spread evenly over the participants,
   or over the members when there are none: 70% GTC near the mid that
   rest, 20% priced to cross, 10% cancels of its own resting orders) for
   ``--seconds``.  Each node records, for its own orders and cancels, the delay
   from acceptance to the moment its fill/outcome is final there
   (``/v1/latency`` ``final_samples``); the figure is p50/p99 over all nodes.
   Also reported: accepted/s, errors, the time from the last order until
   every fill is final on every node, and the CPU time (user and system) of
   the node processes per accepted order: summed, per member and per
   participant.
2. **Idle network**: after the load, with nothing pending, how many entries
   and peer bytes (request and reply bodies of the calls a node makes,
   ``peer_bytes_sent`` + ``peer_bytes_received``) each member adds per minute.
3. **Restart with a long history**: a one-node network's data dir is given
   ``--history`` orders (buys and sells that mostly trade, so the book stays
   small); the node starts on it, finalizes everything and stops (SIGTERM);
   then it is started again and timed from spawn to ``/readyz``.  The node's
   RSS after each start shows memory bounded by resting orders and the tail,
   not by history.  The same is done with a tenth of the history, side by
   side, so the ratio shows how restart time and memory scale.

Everything is seeded (``--seed``); the machine is shared, so figures move
between runs.  The last line is
``final_p50_ms=A final_p99_ms=B idle_entries_per_member_min=C idle_bytes_per_member_min=D restart_s=E``.

    .venv/bin/python benchmarks/finality.py                         # 200 orders/s, 20 s; 1,000,000-order history
    .venv/bin/python benchmarks/finality.py --quick                 # 5 s of load, 10 s idle, 20,000-order history
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crdt.entry import BUY, SELL, Order
from net.localnet import NodeProc, all_final, make_nodes, start_network, stop_all, wait_until, write_history


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---- 1 and 2: a 5-node cluster -------------------------------------------------------


async def load(nodes: list[NodeProc], rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Open loop: request i is sent at t0 + i/rate whatever the replies do."""
    rng = random.Random(seed)
    resting: dict[str, list[str]] = {n.name: [] for n in nodes}
    counts: dict[str, float] = {"sent": 0, "ok": 0, "errors": 0}
    tasks: set[asyncio.Task[None]] = set()
    mid = 1000

    async def one(session: aiohttp.ClientSession, node: NodeProc, kind: str, body: dict[str, Any] | None,
                  oid: str | None) -> None:
        headers = {**node.auth(), "Content-Type": "application/json"}
        try:
            if kind == "cancel":
                async with session.delete(f"{node.url}/v1/orders/{oid}", headers=headers) as r:
                    await r.read()
                    ok = r.status in (200, 409)  # 409: filled meanwhile
            else:
                async with session.post(f"{node.url}/v1/orders", json=body, headers=headers) as r:
                    data = await r.json(content_type=None)
                    ok = r.status == 201
                    if ok and data.get("status") in ("open", "partially_filled"):
                        resting[node.name].append(data["id"])
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        counts["ok" if ok else "errors"] += 1

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=200)) as session:
        t0 = time.monotonic()
        total = int(rate * seconds)
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            node = nodes[i % len(nodes)]
            x = rng.random()
            side = rng.choice(("buy", "sell"))
            sign = 1 if side == "buy" else -1
            if x < 0.1 and resting[node.name]:
                oid = resting[node.name].pop(rng.randrange(len(resting[node.name])))
                t = asyncio.create_task(one(session, node, "cancel", None, oid))
            else:
                price = mid + sign * rng.randint(0, 5) if x < 0.3 else mid - sign * rng.randint(1, 20)
                body = {"side": side, "qty": rng.randint(1, 10), "price": price}
                t = asyncio.create_task(one(session, node, "order", body, None))
            counts["sent"] += 1
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks, return_exceptions=True)
        counts["seconds"] = round(time.monotonic() - t0, 2)
    return counts


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process used so far, in milliseconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def cluster_figures(base: Path, rate: float, seconds: float, idle_s: float, seed: int, *,
                    members: int = 5, participants: int = 0) -> dict[str, Any]:
    names = [f"m{i + 1}" for i in range(members)] + [f"p{i + 1}" for i in range(participants)]
    nodes = make_nodes(base, names, participants=participants)
    traders = nodes[members:] or nodes  # the load goes through the participants, if any
    try:
        start_network(nodes, timeout=120)
        cpu0 = {n.name: cpu_ms(n.pid) for n in nodes}
        counts = asyncio.run(load(traders, rate, seconds, seed))
        t_end = time.monotonic()
        wait_until(lambda: all_final(nodes), timeout=120, what="every fill final", nodes=nodes, interval=0.1)
        drain_s = time.monotonic() - t_end
        cpu = {n.name: cpu_ms(n.pid) - cpu0[n.name] for n in nodes}
        samples: list[float] = []
        for n in nodes:
            samples += n.get("/v1/latency")["final_samples"]
        time.sleep(5.0)  # let the last heartbeats settle
        before = [n.status() for n in nodes]
        time.sleep(idle_s)
        after = [n.status() for n in nodes]
        per_min = 60.0 / idle_s
        own = [(a["counts"]["own_entries"] - b["counts"]["own_entries"]) * per_min
               for a, b in zip(after, before, strict=True)]
        entries, part_entries = own[:members], own[members:]
        nbytes = [((a["replication"]["peer_bytes_sent"] + a["replication"]["peer_bytes_received"])
                   - (b["replication"]["peer_bytes_sent"] + b["replication"]["peer_bytes_received"])) * per_min
                  for a, b in zip(after[:members], before[:members], strict=True)]
        final_fills = after[0]["counts"]["final_fills"]
    finally:
        stop_all(nodes)
    return {
        "offered_per_s": rate, "accepted_per_s": round(counts["ok"] / counts["seconds"], 1), **counts,
        "final_fills": final_fills, "final_samples": len(samples),
        "final_p50_ms": percentile(samples, 50), "final_p99_ms": percentile(samples, 99),
        "final_max_ms": max(samples) if samples else float("nan"), "drain_s": round(drain_s, 2),
        "idle_entries_per_member_min": round(sum(entries) / len(entries), 1),
        "idle_bytes_per_member_min": round(sum(nbytes) / len(nbytes)),
        "idle_entries_per_participant_min": round(sum(part_entries) / len(part_entries), 1) if part_entries else 0,
        "cpu_ms_per_order": round(sum(cpu.values()) / max(counts["ok"], 1), 2),
        "cpu_ms_per_order_member": round(sum(cpu[n.name] for n in nodes[:members]) / members
                                         / max(counts["ok"], 1), 2),
        "cpu_ms_per_order_participant": round(sum(cpu[n.name] for n in nodes[members:]) / participants
                                              / max(counts["ok"], 1), 3) if participants else None,
        "members": members, "participants": participants,
    }


# ---- 3: restart with a long history --------------------------------------------------


def history(n: int, seed: int) -> list[Order]:
    """Alternate buys and sells priced to cross (buys at 1000-1002, sells at
    998-1000): nearly everything trades, only remainders rest."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        side = BUY if i % 2 == 0 else SELL
        price = 1000 + (rng.randint(0, 2) if side == BUY else rng.randint(-2, 0))
        out.append(Order(side=side, price=price, qty=rng.randint(1, 5)))
    return out


def restart_figures(base: Path, n: int, seed: int) -> dict[str, Any]:
    node = make_nodes(base, (f"h{n}",))[0]
    t0 = time.monotonic()
    write_history(node.data_dir, history(n, seed), start_ms=int(time.time() * 1000) - n - 60_000)
    written_s = time.monotonic() - t0
    try:
        t0 = time.monotonic()
        node.start(wait=False)
        node.wait_ready(timeout=1800)
        wait_until(lambda: not node.status()["finality"]["pending"], timeout=1800, what="history final",
                   nodes=[node], interval=0.5)
        first_s = time.monotonic() - t0
        st = node.status()
        first_rss = rss_kb(node.pid)
        node.stop()
        t0 = time.monotonic()
        node.start(wait=False)
        node.wait_ready(timeout=600)
        restart_s = time.monotonic() - t0
        time.sleep(1.0)
        rss = rss_kb(node.pid)
        st2 = node.status()
    finally:
        stop_all([node])
    db = node.data_dir / "node.sqlite"
    return {
        "orders": n, "history_written_s": round(written_s, 1), "first_start_to_final_s": round(first_s, 1),
        "restart_to_ready_s": round(restart_s, 2), "final_fills": st["counts"]["final_fills"],
        "resting": st2["counts"]["resting"], "entries_in_memory": st2["counts"]["entries_in_memory"],
        "rss_mb_first": round(first_rss / 1024, 1), "rss_mb_restart": round(rss / 1024, 1),
        "db_mb": round(db.stat().st_size / 2**20, 1) if db.exists() else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="orders per second over the cluster (default 200)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of load (default 20)")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement (default 30)")
    p.add_argument("--history", type=int, default=1_000_000, help="orders in the restart history (default 1,000,000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--members", type=int, default=5, help="members of the cluster (default 5)")
    p.add_argument("--participants", type=int, default=0,
                   help="participants besides the members; the load then goes through them (default 0)")
    p.add_argument("--quick", action="store_true", help="5 s load, 10 s idle, 20,000-order history")
    p.add_argument("--skip-restart", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.idle, args.history = 5.0, 10.0, 20_000
    with tempfile.TemporaryDirectory(prefix="p2pex-bench-") as tmp:
        c = cluster_figures(Path(tmp) / "cluster", args.rate, args.seconds, args.idle, args.seed,
                            members=args.members, participants=args.participants)
        through = f"{args.participants} participants" if args.participants else f"{args.members} members"
        print(f"load       {c['offered_per_s']:g} orders/s offered for {args.seconds:g} s through {through} "
              f"({args.members} members, {args.participants} participants): "
              f"{c['accepted_per_s']} accepted/s, {c['errors']} errors, {c['final_fills']} final fills")
        print(f"cpu        per order: {c['cpu_ms_per_order']} ms summed over all nodes; "
              f"{c['cpu_ms_per_order_member']} ms per member"
              + (f", {c['cpu_ms_per_order_participant']} ms per participant" if args.participants else ""))
        print(f"final      acceptance to final at the accepting node: p50 {c['final_p50_ms']:.0f} ms, "
              f"p99 {c['final_p99_ms']:.0f} ms, max {c['final_max_ms']:.0f} ms ({c['final_samples']} samples); "
              f"every fill final on all {args.members + args.participants} nodes {c['drain_s']} s after the last order")
        print(f"idle       per member per minute: {c['idle_entries_per_member_min']} entries, "
              f"{c['idle_bytes_per_member_min']} peer bytes (over {args.idle:g} s)"
              + (f"; per participant {c['idle_entries_per_participant_min']} entries" if args.participants else ""))
        restart_s = float("nan")
        if not args.skip_restart:
            rows = []
            for n in (args.history // 10, args.history):
                r = restart_figures(Path(tmp) / "restart", n, args.seed)
                rows.append(r)
                print(f"restart    {r['orders']:>9,} orders ({r['final_fills']:,} final fills, {r['db_mb']} MB "
                      f"SQLite): restart to ready {r['restart_to_ready_s']} s; RSS {r['rss_mb_restart']} MB after "
                      f"restart, {r['rss_mb_first']} MB after the first start; {r['resting']} resting, "
                      f"{r['entries_in_memory']} entries in memory (first start to all final "
                      f"{r['first_start_to_final_s']} s)", flush=True)
            small, big = rows
            t_ratio = big["restart_to_ready_s"] / max(small["restart_to_ready_s"], 1e-3)
            m_ratio = big["rss_mb_restart"] / max(small["rss_mb_restart"], 1e-3)
            print(f"scaling    10x the history: restart {t_ratio:.1f}x, RSS after restart {m_ratio:.2f}x")
            restart_s = big["restart_to_ready_s"]
        print(f"final_p50_ms={c['final_p50_ms']:.0f} final_p99_ms={c['final_p99_ms']:.0f} "
              f"cpu_ms_per_order={c['cpu_ms_per_order']} "
              f"idle_entries_per_member_min={c['idle_entries_per_member_min']} "
              f"idle_bytes_per_member_min={c['idle_bytes_per_member_min']} restart_s={restart_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
