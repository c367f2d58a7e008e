"""The deterministic simulator in ``make test``: seeds of whole networks in one
process (``sim.scenario.run``) under partitions, loss, crashes, pauses, skewed
and stepping clocks, evictions, equivocation and past-stamped entries, each
checked after every step (prefix-consistent final fills, none retracted,
convergence after healing, an independent replay of the final entries).
Seeds run in a process pool; a failing seed replays with
``python -m sim --seed N``.  The checker is shown to fail on a broken rule.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from sim.node import SimNode
from sim.scenario import run

#: Seeds run by ``make test`` (``python -m sim --seeds 1000`` runs more).
SEEDS = 200
STORM_SEEDS = 24


def _one(args: tuple[int, bool]) -> tuple[int, str | None, int]:
    seed, storm = args
    r = run(seed, storm=storm)
    return seed, r.violation, r.finals


def _run_many(seeds: range, *, storm: bool) -> list[tuple[int, str | None, int]]:
    workers = max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_one, [(s, storm) for s in seeds], chunksize=4))


class TestSimulatedNetworks:
    def test_seeds_keep_every_finality_guarantee(self) -> None:
        results = _run_many(range(SEEDS), storm=False)
        bad = [(s, v) for s, v, _ in results if v is not None]
        assert not bad, "\n".join(f"seed {s}: {v} (replay: python -m sim --seed {s})" for s, v in bad)
        # not vacuous: the seeds made fills final
        assert sum(f for _, _, f in results) > SEEDS * 10
        assert sum(1 for _, _, f in results if f) >= SEEDS * 9 // 10

    def test_storm_seeds_stay_safe(self) -> None:
        results = _run_many(range(STORM_SEEDS), storm=True)
        bad = [(s, v) for s, v, _ in results if v is not None]
        assert not bad, "\n".join(f"seed {s}: {v} (replay: python -m sim --seed {s} --storm)" for s, v in bad)

    def test_a_seed_replays_exactly(self) -> None:
        first, again = run(7, trace=True), run(7, trace=True)
        assert first.trace == again.trace and first.finals == again.finals


def _frontier_ignores_the_last_member(nd: SimNode) -> None:
    """A broken rule: completeness computed as if one member did not exist, so a
    node may call final what that member has not delivered yet."""
    ex = nd.ex
    assert ex is not None
    fin = ex.finality
    original = fin._completeness

    def broken(without: bytes | None = None, **_: Any) -> int:
        members = ex.membership.members()
        return original(without=members[-1] if members and without is None else without)

    fin._completeness = broken  # type: ignore[method-assign]


class TestCheckerCanFail:
    def test_a_frontier_that_ignores_a_member_is_caught(self) -> None:
        violations = []
        for seed in range(40):
            r = run(seed, rule=_frontier_ignores_the_last_member)
            if r.violation is not None:
                violations.append((seed, r.violation))
                if len(violations) >= 3:
                    break
        assert violations, "the checker found nothing wrong with a frontier that ignores a member"
