"""``python -m sim --seeds 1000`` runs seeds 0..999 and prints a summary;
``python -m sim --seed N`` replays one seed and prints its trace;
``--schedule split-brain`` (or ``split-brain-fresh``) runs the pinned
schedule of ``sim.scenario.split_brain`` instead of a planned one;
``--schedule admission-split`` an admission completed during a split by a
member being voted out (``sim.scenario.admission_split``), which used to
stall finality for good; ``--schedule clean-stop`` (or ``clean-stop-crash``)
that of ``sim.scenario.clean_stop``, and ``--schedule stop-skew`` that of
``sim.scenario.stop_skew``, ``--schedule stale-admission`` that of
``sim.scenario.stale_admission``; ``--stops`` makes every crash of a plan
a clean shutdown (a member's Leave first).  A run prints the longest time
node 0 held records that were not final while its frontier stood still.
Runs have participants as the seed draws them (``--participants N``: N in
every run)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from sim.scenario import Schedule, admission_split, clean_stop, run, split_brain, stale_admission, stop_skew, wide

SCHEDULES: dict[str, Callable[[], Schedule]] = {
    "split-brain": split_brain,
    "split-brain-fresh": lambda: split_brain(fresh=True),
    "admission-split": admission_split,  # used to stall for good (docs/FINALITY.md)
    "clean-stop": clean_stop,
    "clean-stop-crash": lambda: clean_stop(crash=True),
    "stop-skew": stop_skew,  # used to stall for good (a vote from a clock ahead)
    "stale-admission": stale_admission,  # certification used to stop for good
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__)
    p.add_argument("--seeds", type=int, default=100, help="run seeds 0..N-1 (default 100)")
    p.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seed", type=int, default=None, help="replay this one seed and print its trace")
    p.add_argument("--storm", action="store_true",
                   help="overlap every kind of fault; check safety only (finality may stall for good)")
    p.add_argument("--stops", action="store_true",
                   help="every planned crash is a clean shutdown instead (a member's Leave first)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="run a pinned schedule of faults instead of a planned one")
    p.add_argument("--wide", action="store_true",
                   help="overlapping partitions into two or three groups, one-way links, crashes, pauses and "
                        "clocks past the limit, all healed by the end; every guarantee checked, liveness included")
    p.add_argument("--participants", type=int, default=None,
                   help="this many participants in every run (default: as the seed draws, 0-6)")
    args = p.parse_args(argv)
    schedule = None if args.schedule is None else SCHEDULES[args.schedule]()
    if args.seed is not None:
        r = run(args.seed, trace=True, storm=args.storm, stops=args.stops,
                schedule=wide(args.seed) if args.wide else schedule, participants=args.participants)
        print("\n".join(r.trace))
        print(f"seed {r.seed}: {r.nodes} nodes, {r.participants} participants, {r.steps} steps, {r.finals} final "
              f"fills, {r.revoked} "
              f"revoked provisional fills, {r.evictions} evictions, {r.restarts} restarts, {r.acked} acknowledged "
              f"orders and cancels, {r.tickets} acknowledged participants' tickets ({r.carried_twice} carried "
              f"twice), longest finality "
              f"gap at node 0 {r.max_final_gap_ms} ms: "
              + ("ok" if r.violation is None else f"VIOLATION: {r.violation}"))
        return 0 if r.violation is None else 1
    start = time.monotonic()
    totals = {"steps": 0, "finals": 0, "revoked": 0, "evictions": 0, "restarts": 0, "acked": 0, "participants": 0,
              "tickets": 0, "carried_twice": 0}
    failed: list[int] = []
    for seed in range(args.first, args.first + args.seeds):
        r = run(seed, storm=args.storm, stops=args.stops, schedule=wide(seed) if args.wide else schedule,
                participants=args.participants)
        for k in totals:
            totals[k] += getattr(r, k)
        if r.violation is not None:
            failed.append(seed)
            again = (f"python -m sim --seed {seed}" + (" --storm" if args.storm else "")
                     + (" --wide" if args.wide else "")
                     + (" --stops" if args.stops else "")
                     + (f" --participants {args.participants}" if args.participants is not None else "")
                     + (f" --schedule {args.schedule}" if args.schedule else ""))
            print(f"seed {seed}: VIOLATION: {r.violation}  (replay: {again})", flush=True)
    secs = time.monotonic() - start
    print(f"{args.seeds} seeds, {totals['steps']} steps, {totals['finals']} final fills, {totals['revoked']} "
          f"revoked provisional fills, {totals['evictions']} evictions, {totals['restarts']} restarts, "
          f"{totals['acked']} acknowledged orders and cancels, {totals['participants']} participants, "
          f"{totals['tickets']} acknowledged participants' tickets ({totals['carried_twice']} carried twice), "
          f"{len(failed)} violations; {args.seeds / secs * 60:.0f} seeds per minute")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
