"""Failover benchmark: how long finality stands still when members fail under load.

What it measures
----------------
A cluster of ``python cli.py node`` processes on 127.0.0.1 (free ports):
``--members`` members (5 by default) and ``--participants`` participants (2
by default).  An open-loop generator places ``--rate`` orders/s in total
through the participants (through the members that stay up when there are
none) for ``--before`` + ``--after`` seconds.  After ``--before`` seconds,
``--kill`` members (the last ones started) fail: ``kill -9`` by default,
SIGTERM with ``--term``, ``--gap`` seconds apart (0: at once).

Two observers, a surviving member and a participant, read ``/v1/status``
every 50 ms.  The figures:

- **longest gap**: the longest time, from the first failure to the end of
  the load, during which the observer held records that were not final and
  its final frontier did not move;
- **time to final**: acceptance to final at the accepting node, p50/p99 over
  the orders and cancels that became final after the first failure
  (``/v1/latency``);
- accepted/s and errors (``503 no_quorum`` among them) after the failure,
  and when the members voted each failed member out.

The machine is shared, so figures move between runs; the seed fixes the
orders.  The last line is
``gap_member_ms=A gap_participant_ms=B final_p50_ms=C final_p99_ms=D accepted_per_s=E``.

    .venv/bin/python benchmarks/failover.py                  # kill -9 one member of five
    .venv/bin/python benchmarks/failover.py --kill 2 --gap 3 # two, three seconds apart
    .venv/bin/python benchmarks/failover.py --term           # a clean stop (its Leave)
    .venv/bin/python benchmarks/failover.py --suspect-after 10  # a crash waits for --evict-after
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.finality import load, percentile
from net.localnet import NodeProc, make_nodes, start_network, stop_all

POLL_S = 0.05


async def observe(node: NodeProc, until: float, out: list[tuple[float, int, bool]]) -> None:
    """(time, final frontier, anything pending) at ``node`` every POLL_S until ``until``."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            try:
                async with session.get(f"{node.url}/v1/status") as r:
                    fin = (await r.json())["finality"]
                out.append((time.monotonic(), fin["frontier"], fin["pending"]))
            except (aiohttp.ClientError, TimeoutError, OSError, KeyError):
                pass
            await asyncio.sleep(POLL_S)


def longest_gap(samples: list[tuple[float, int, bool]], start: float) -> float:
    """Longest time after ``start`` with records pending and the frontier standing still."""
    worst, since, frontier = 0.0, None, None
    for t, f, pending in samples:
        if f != frontier or not pending:
            if since is not None and t >= start:
                worst = max(worst, t - max(since, start))
            since = t if pending else None
            frontier = f
        elif since is None:
            since = t
    if since is not None and samples:
        worst = max(worst, samples[-1][0] - max(since, start))
    return worst


async def run(nodes: list[NodeProc], traders: list[NodeProc], victims: list[NodeProc],
              args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    end = t0 + args.before + args.after
    watch: dict[str, list[tuple[float, int, bool]]] = {"member": [], "participant": []}
    observers = {"member": nodes[0]}
    if len(nodes) > args.members:
        observers["participant"] = nodes[args.members]
    tasks = [asyncio.create_task(observe(n, end + 0.5, watch[k])) for k, n in observers.items()]

    marks: dict[str, int] = {}

    async def fail() -> float:
        await asyncio.sleep(args.before)
        first = time.monotonic()
        for n in traders:  # what became final before the failure is left out
            marks[n.name] = len((await asyncio.to_thread(n.get, "/v1/latency"))["final_samples"])
        for i, v in enumerate(victims):
            if i and args.gap:
                await asyncio.sleep(args.gap)
            await asyncio.to_thread(v.stop if args.term else v.kill9)
        return first

    failing = asyncio.create_task(fail())
    await load(traders, args.rate, args.before, args.seed)
    counts = await load(traders, args.rate, args.after, args.seed + 1)
    first = await failing
    await asyncio.gather(*tasks)
    samples: list[float] = []
    for n in traders:
        got = await asyncio.to_thread(n.get, "/v1/latency")
        samples += got["final_samples"][marks.get(n.name, 0):]
    decisions = (await asyncio.to_thread(nodes[0].status))["finality"]["decisions"]
    return {
        "gap_member_s": longest_gap(watch["member"], first),
        "gap_participant_s": longest_gap(watch["participant"], first) if "participant" in observers else None,
        "final_p50_ms": percentile(samples, 50), "final_p99_ms": percentile(samples, 99),
        "samples": len(samples), "accepted_per_s": round(counts["ok"] / counts["seconds"], 1),
        "errors": int(counts["errors"]), "evicted": len(decisions),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=5, help="members of the cluster (default 5)")
    p.add_argument("--participants", type=int, default=2, help="participants; the load goes through them (default 2)")
    p.add_argument("--rate", type=float, default=100.0, help="orders per second in total (default 100)")
    p.add_argument("--before", type=float, default=5.0, help="seconds of load before the first failure (default 5)")
    p.add_argument("--after", type=float, default=15.0, help="seconds of load after it (default 15)")
    p.add_argument("--kill", type=int, default=1, help="members that fail (default 1)")
    p.add_argument("--gap", type=float, default=0.0, help="seconds between failures (default 0: at once)")
    p.add_argument("--term", action="store_true", help="SIGTERM (a clean stop) instead of kill -9")
    p.add_argument("--suspect-after", type=float, default=None,
                   help="the nodes' --suspect-after (default: theirs, 1 s; 10 leaves a crash to --evict-after)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not 0 < args.kill < args.members:
        p.error("--kill must leave at least one member")
    with tempfile.TemporaryDirectory(prefix="p2pex-failover-") as tmp:
        names = [f"m{i + 1}" for i in range(args.members)] + [f"p{i + 1}" for i in range(args.participants)]
        nodes = make_nodes(Path(tmp), names, participants=args.participants)
        if args.suspect_after is not None:
            for n in nodes:
                n.extra_args = [*n.extra_args, "--suspect-after", f"{args.suspect_after:g}"]
        victims = nodes[args.members - args.kill:args.members]
        traders = nodes[args.members:] or nodes[:args.members - args.kill]
        try:
            start_network(nodes, timeout=120)
            r = asyncio.run(run(nodes, traders, victims, args))
        finally:
            stop_all(nodes)
    how = "SIGTERM" if args.term else "kill -9"
    when = "at once" if args.kill == 1 or not args.gap else f"{args.gap:g} s apart"
    print(f"failure    {how} of {args.kill} of {args.members} members {when}, after {args.before:g} s of "
          f"{args.rate:g} orders/s through {len(traders)} {'participants' if args.participants else 'members'}; "
          f"{r['evicted']} voted out by the end")
    gp = r["gap_participant_s"]
    print(f"gap        longest time finality stood still with records pending: member {r['gap_member_s'] * 1000:.0f} ms"
          + ("" if gp is None else f", participant {gp * 1000:.0f} ms"))
    print(f"final      after the failure: p50 {r['final_p50_ms']:.0f} ms, p99 {r['final_p99_ms']:.0f} ms "
          f"({r['samples']} samples); {r['accepted_per_s']} accepted/s, {r['errors']} errors")
    print(f"gap_member_ms={r['gap_member_s'] * 1000:.0f} "
          f"gap_participant_ms={-1 if gp is None else round(gp * 1000)} "
          f"final_p50_ms={r['final_p50_ms']:.0f} final_p99_ms={r['final_p99_ms']:.0f} "
          f"accepted_per_s={r['accepted_per_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
