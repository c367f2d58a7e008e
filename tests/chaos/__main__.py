"""``python -m tests.chaos``: run the chaos suite, or re-check a recorded history.

    python -m tests.chaos                    every nemesis (make chaos, about 10 minutes)
    python -m tests.chaos --quick            isolation, kill -9 with restart, pause (about 60 s)
    python -m tests.chaos --only split pause --seconds 20
    python -m tests.chaos --check logs/chaos/chaos-history.json

Exit status: 0 no violation, 1 violations, 2 this machine cannot run it
(the reason is printed: no root, no namespaces, no iptables).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.chaos.checker import check
from tests.chaos.history import History
from tests.chaos.nemesis import BY_NAME, QUICK
from tests.chaos.report import table, write
from tests.chaos.runner import Options, Unavailable, full_options, run_suite, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 60-second run of make test")
    p.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="NEMESIS",
                   help=f"run only these, in this order ({', '.join(BY_NAME)})")
    p.add_argument("--seconds", type=float, help="fault time of every nemesis (default: each its own, 10-60 s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=4.0, help="calls per second per client (default 4)")
    p.add_argument("--out", type=Path, default=Path("logs/chaos"), help="reports, history and node logs")
    p.add_argument("--keep-data", action="store_true", help="keep the nodes' data dirs")
    p.add_argument("--check", type=Path, metavar="HISTORY", help="judge a recorded history; run nothing")
    args = p.parse_args(argv)

    if args.check:
        history = History.from_json(json.loads(args.check.read_text()))
        verdict = check(history)
        write(verdict, history.meta, args.out)
        print(table(verdict))
        print("no violations" if verdict.ok else f"{verdict.violations} VIOLATION(S)")
        return 0 if verdict.ok else 1

    if args.seconds is not None and args.seconds < 5:
        p.error("--seconds must be at least 5")
    common = {"seed": args.seed, "rate": args.rate, "out": args.out, "keep_data": args.keep_data}
    if args.quick:
        options = Options(nemeses=tuple((n, args.seconds or s) for n, s in QUICK), warm_s=2.0,
                          converge_timeout_s=30.0, **common)
    else:
        options = full_options(only=args.only, seconds=args.seconds, **common)
    try:
        outcome = run_suite(options)
    except Unavailable as exc:
        print(f"chaos suite cannot run here: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; everything this run started was removed", file=sys.stderr)
        return 130
    print(summary(outcome))
    return 0 if outcome.verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
