"""Memory benchmark: a node's RSS per resting order.

What it measures
----------------
For ``--orders`` resting orders (100,000 and 1,000,000 by default): a one-node network's data
dir is given a history of that many non-crossing GTC orders (``net.localnet.write_history``; bid
and ask alternately, bids at prices 1..5000 and asks at 10001..15000 for a million orders, 100
orders per level, fewer levels for fewer orders, as the memory book of
``benchmarks/matching.py``), so every order rests.  The node (``python cli.py node``) starts on
it; once ``/readyz`` answers 200, nothing is pending (``finality.pending`` false) and
``counts.resting`` equals N, and after one more second, its VmRSS is read from
``/proc/PID/status``.  The same node started on an empty one-node network (a fresh data dir: it
founds a network), measured the same way, is the baseline; the figure is ``(RSS - baseline) /
N``.  Target: at most 300 bytes per resting order (reported, not asserted).

Also shown, not part of the figure: the peak (VmHWM) of each start, and the RSS after the node is
stopped (SIGTERM) and started again on its own data dir (it then loads the final book from its
checkpoint instead of replaying the history), minus the baseline's RSS after the same restart.

The last line is ``rss_bytes_per_resting_order_100k=A rss_bytes_per_resting_order_1m=B`` (the
first and second size, whatever sizes were run).

    .venv/bin/python benchmarks/memory.py            # 100,000 and 1,000,000 resting orders
    .venv/bin/python benchmarks/memory.py --quick    # 20,000 and 100,000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crdt.entry import BUY, SELL, Order
from net.localnet import NodeProc, make_nodes, stop_all, wait_until, write_history

TARGET_BYTES_PER_ORDER = 300
SETTLE_S = 1.0  # after the conditions hold, before RSS is read


def proc_kb(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in kB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def levels_for(n: int) -> int:
    """Price levels per side: 5000 for a million orders, 100 orders per level at any size."""
    return max(1, min(5000, n // 200))


def resting_history(n: int) -> list[Order]:
    """``n`` GTC orders that never cross: bid and ask alternately, every bid below every ask."""
    levels = levels_for(n)
    out = []
    for i in range(n):
        level = (i >> 1) % levels
        if i & 1:
            out.append(Order(side=SELL, price=10_001 + level, qty=1 + i % 100))
        else:
            out.append(Order(side=BUY, price=1 + level, qty=1 + i % 100))
    return out


def measure(node: NodeProc, resting: int, timeout: float) -> dict[str, Any]:
    """Start ``node``, wait until it is ready, nothing is pending and ``resting``
    orders rest; its RSS and peak (kB) a second later, and the seconds it took."""
    t0 = time.monotonic()
    node.start(wait=False)
    node.wait_ready(timeout=timeout)

    def settled() -> bool:
        st = node.status()
        return not st["finality"]["pending"] and st["counts"]["resting"] == resting

    wait_until(settled, timeout=timeout, what=f"{node.name}: nothing pending and {resting} resting",
               nodes=[node], interval=0.2)
    seconds = time.monotonic() - t0
    time.sleep(SETTLE_S)
    st = node.status()
    if st["finality"]["pending"] or st["counts"]["resting"] != resting:
        raise AssertionError(f"{node.name} moved: pending={st['finality']['pending']}, "
                             f"resting={st['counts']['resting']}")
    return {"rss_kb": proc_kb(node.pid, "VmRSS"), "hwm_kb": proc_kb(node.pid, "VmHWM"),
            "seconds": round(seconds, 1), "entries": st["counts"]["entries"],
            "entries_in_memory": st["counts"]["entries_in_memory"]}


def node_memory(base: Path, name: str, n: int, timeout: float) -> dict[str, Any]:
    """A node with ``n`` resting orders of history (0: an empty one-node network),
    measured at its first start and again after a restart."""
    node = make_nodes(base, (name,))[0]
    written_s = 0.0
    if n:
        t0 = time.monotonic()
        write_history(node.data_dir, resting_history(n), start_ms=int(time.time() * 1000) - n - 60_000)
        written_s = time.monotonic() - t0
    try:
        first = measure(node, n, timeout)
        node.stop()
        again = measure(node, n, timeout)
    finally:
        stop_all([node])
    db = node.data_dir / "node.sqlite"
    return {"orders": n, "written_s": round(written_s, 1), "first": first, "restart": again,
            "db_mb": round(db.stat().st_size / 2**20, 1) if db.exists() else None}


def per_order(m: dict[str, Any], base: dict[str, Any], which: str) -> float:
    return float(m[which]["rss_kb"] - base[which]["rss_kb"]) * 1024 / int(m["orders"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--orders", type=int, nargs=2, default=[100_000, 1_000_000], metavar=("SMALL", "LARGE"),
                   help="resting orders of the two measurements (default 100,000 and 1,000,000)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for each start")
    p.add_argument("--quick", action="store_true", help="20,000 and 100,000 resting orders")
    args = p.parse_args(argv)
    if args.quick:
        args.orders = [20_000, 100_000]
    with tempfile.TemporaryDirectory(prefix="p2pex-memory-") as tmp:
        base = node_memory(Path(tmp), "empty", 0, args.timeout)
        print(f"baseline   empty one-node network: RSS {base['first']['rss_kb'] / 1024:.1f} MB "
              f"(peak {base['first']['hwm_kb'] / 1024:.1f} MB); after a restart "
              f"{base['restart']['rss_kb'] / 1024:.1f} MB", flush=True)
        figures = []
        for n in args.orders:
            m = node_memory(Path(tmp), f"resting{n}", n, args.timeout)
            first, again = per_order(m, base, "first"), per_order(m, base, "restart")
            figures.append(first)
            f, r = m["first"], m["restart"]
            print(f"resting    {n:>9,} orders ({levels_for(n):,} levels a side, {m['db_mb']} MB SQLite, history "
                  f"written in {m['written_s']} s): RSS {f['rss_kb'] / 1024:.1f} MB "
                  f"(peak {f['hwm_kb'] / 1024:.1f} MB, {f['seconds']} s from spawn to all final): "
                  f"{first:.0f} bytes per resting order over the baseline (target <= {TARGET_BYTES_PER_ORDER}); "
                  f"after a restart RSS {r['rss_kb'] / 1024:.1f} MB, {again:.0f} bytes per resting order "
                  f"(peak {r['hwm_kb'] / 1024:.1f} MB, ready and settled in {r['seconds']} s; "
                  f"{r['entries_in_memory']:,} entries in memory)", flush=True)
        if args.orders != [100_000, 1_000_000]:
            print(f"note       sizes differ from the names of the last line: {args.orders[0]:,} and "
                  f"{args.orders[1]:,} resting orders")
        print(f"rss_bytes_per_resting_order_100k={figures[0]:.0f} rss_bytes_per_resting_order_1m={figures[1]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
