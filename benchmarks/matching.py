"""Matching benchmark: engine throughput against a plain reference, the full core path, memory.

What it measures
----------------
1. **Matching throughput** (operations per second) of ``matching.engine.Engine.add_many`` replaying
   the fixed workload ``lob-seed42-200k.csv`` (200,000 GTC limit orders and cancels, see
   ``shared/workloads/README.md``), against ``reference``: a plain price-time book written here
   (``sortedcontainers.SortedDict`` of price -> ``deque`` of orders, a dict by id for cancels,
   ``deque.remove`` on cancel, trades at the maker's price), and, when it is importable,
   ``lightmatchingengine`` from PyPI.  Only matching is timed: each contender's input (engine
   records ``(key, kind, oid, side, price, qty)`` with the arrival index as key and the workload id
   as oid; the parsed operations for the others) is built before the clock starts.
2. **The full pure-core path** (reported, not asserted): the same workload mapped onto 4 origins
   (order ``id`` goes to origin ``id % 4``; a cancel goes to its order's origin, as the design
   requires), each operation turned into an ``Entry`` (``Order``/``Cancel`` body, ``check_body``,
   hash via ``entry_hash``, a dummy 64-byte signature: signing is left out), delivered in batches to
   ``matching.exchange.Exchange.receive(..., trusted=True)``, which merges them into the
   ``crdt.replica.Replica`` and matches them with the engine.  Everything from the parsed
   operations on is timed.
3. **Memory per resting order** on a book of 1,000,000 resting non-crossing GTC orders (bids at
   prices 1..5000, asks at 10001..15000, 100 orders per level), measured with ``tracemalloc``:
   everything the engine keeps alive after the caller dropped its input, once including the
   checkpoint journal (the applied records) and once after ``engine.finalize(n)`` (the book only).
4. **1% of records late**: the engine's records delivered through ``Engine.add_many`` one record a
   call and in batches of 100, first in key order, then with 1% of the records (chosen with
   ``random.Random(42)``) each delivered ``LATE_BY`` (50) records after its turn, so that each
   rewinds the book past the records delivered before it and replays them.  The late runs must end
   with the same fills and book as the in-order runs; the figure is ``late ÷ in order`` throughput
   for one record a call and for batches of 100 (reported, not asserted).

How
---
Every timed run happens in a fresh subprocess (``--worker NAME``), started with
``PYTHONHASHSEED=0``.  A worker parses the workload, builds its input, disables the garbage
collector around the timed call exactly as ``timeit`` does, times it with ``time.perf_counter``,
then checks the outcome against ``lob-seed42-200k.expected.json`` (maker fills, lots traded, the
final book) and prints one JSON line that also carries digests of its fills and of its final book.
The parent alternates the contenders (engine, reference, engine, reference, ...; the in-order and
late deliveries are interleaved for ``--late-runs`` rounds, which of the pair goes first
alternating, and the slower lightmatchingengine and core-path runs for ``--extra-runs`` rounds),
reports medians, and checks that every contender produced the same fills and the same book.
Nothing changes between runs: the workload is fixed (generated with seed 42), so are the memory
book and the choice of late records (seed 42).

The line before the last is ``late_ratio=R`` (one record a call, late ÷ in order); the last line is
``engine_ops_per_s=N reference_ops_per_s=M ratio=R``.  The exit status is non-zero
when any outcome check fails, when the engine is less than 1.8 times as fast as the reference, or
when the book needs more than 300 bytes per resting order (``--no-target`` disables the last two).

    .venv/bin/python benchmarks/matching.py                   # full run, 7 runs each
    .venv/bin/python benchmarks/matching.py --quick --no-target   # smoke test, 1 run each
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from time import perf_counter
from typing import Any, Final

# Run as a script, this file's directory comes first on sys.path, and this file is named
# ``matching``: put the repository root there instead so that ``matching`` is the package.
_HERE: Final = Path(__file__).resolve().parent
REPO: Final = _HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sortedcontainers import SortedDict  # noqa: E402

from crdt.entry import GENESIS, Admit, Cancel, Entry, Order, check_body, entry_hash  # noqa: E402
from crdt.keys import SigningKey  # noqa: E402
from matching.engine import BUY, CANCEL, GTC, SELL, Engine, Record  # noqa: E402
from matching.exchange import Exchange  # noqa: E402

WORKLOAD_DIR: Final = REPO.parent / "shared" / "workloads"
DEFAULT_WORKLOAD: Final = WORKLOAD_DIR / "lob-seed42-200k.csv"
SEED: Final = 42  # the workload's seed, and the seed that chooses the late records
TARGET_RATIO: Final = 1.8
TARGET_BYTES_PER_ORDER: Final = 300
MEMORY_ORDERS: Final = 1_000_000
CORE_ORIGINS: Final = 4
CORE_BATCH: Final = 1_000
CORE_BASE_MS: Final = 1_700_000_000_000
DUMMY_SIG: Final = bytes(64)
LME: Final = "lightmatchingengine"
LATE_SHARE: Final = 0.01  # records delivered late
LATE_BY: Final = 50  # a late record comes this many records after its turn
LATE_RUNS: Final = 5
#: delivery workers: name -> (late, records per add_many call)
DELIVERIES: Final = {"inorder1": (False, 1), "late1": (True, 1), "inorder100": (False, 100), "late100": (True, 100)}

LIMIT_OP: Final = 0
CANCEL_OP: Final = 1

#: One workload operation: (op, id, side, price, qty); a cancel has side, price and qty 0.
Op = tuple[int, int, int, int, int]
#: A fill with workload ids: (taker id, maker id, price, qty).
IdFill = tuple[int, int, int, int]
#: A resting order in priority order (best price first, then time): (side, price, id, remaining).
Resting = tuple[int, int, int, int]

OUTCOME_KEYS: Final = (
    "maker_fills", "traded_lots", "count", "buy_vol", "sell_vol",
    "best_bid", "best_ask", "bid_levels", "ask_levels",
)


# ---- workload and outcome ---------------------------------------------------


def load_workload(path: Path) -> list[Op]:
    ops: list[Op] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["op"] == "limit":
                side = BUY if row["side"] == "buy" else SELL
                if row["side"] not in ("buy", "sell"):
                    raise ValueError(f"bad side {row['side']!r}")
                ops.append((LIMIT_OP, int(row["id"]), side, int(row["price"]), int(row["qty"])))
            elif row["op"] == "cancel":
                ops.append((CANCEL_OP, int(row["id"]), 0, 0, 0))
            else:
                raise ValueError(f"unknown op {row['op']!r}")
    return ops


def expected_path(workload: Path) -> Path:
    return workload.with_name(workload.name.removesuffix(".csv") + ".expected.json")


def load_expected(workload: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(expected_path(workload).read_text())
    book: dict[str, Any] = raw.get("final_book", {})
    out = {k: book[k] if k in book else raw[k] for k in OUTCOME_KEYS}
    for k in ("ops", "limits", "cancels"):
        if k in raw:
            out[k] = raw[k]
    return out


def summarise(fills: Sequence[IdFill], resting: Sequence[Resting]) -> dict[str, Any]:
    bids = [r for r in resting if r[0] == BUY]
    asks = [r for r in resting if r[0] == SELL]
    return {
        "maker_fills": len(fills),
        "traded_lots": sum(f[3] for f in fills),
        "count": len(resting),
        "buy_vol": sum(r[3] for r in bids),
        "sell_vol": sum(r[3] for r in asks),
        "best_bid": max((r[1] for r in bids), default=None),
        "best_ask": min((r[1] for r in asks), default=None),
        "bid_levels": len({r[1] for r in bids}),
        "ask_levels": len({r[1] for r in asks}),
    }


def digest(values: Iterable[tuple[int, ...]]) -> str:
    h = blake2b(digest_size=16)
    for v in values:
        h.update(repr(v).encode())
    return h.hexdigest()


def mismatches(outcome: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [
        f"{k}: got {outcome[k]!r}, expected {expected[k]!r}"
        for k in OUTCOME_KEYS
        if outcome[k] != expected[k]
    ]


def timed(fn: Callable[[], object]) -> float:
    """Time one call with the garbage collector off, as ``timeit.Timer.timeit`` does."""
    gcold = gc.isenabled()
    gc.disable()
    try:
        t0 = perf_counter()
        fn()
        t1 = perf_counter()
    finally:
        if gcold:
            gc.enable()
    return t1 - t0


# ---- contender: the engine --------------------------------------------------


def engine_records(ops: Sequence[Op]) -> list[Record]:
    return [
        (i, CANCEL, oid, 0, 0, 0, None) if op == CANCEL_OP else (i, GTC, oid, side, price, qty, None)
        for i, (op, oid, side, price, qty) in enumerate(ops)
    ]


def engine_resting(engine: Engine) -> list[tuple[int, int, Any, int]]:
    return [
        (side, price, oid, remaining)
        for side in (BUY, SELL)
        for price, oid, remaining in engine.resting(side)
    ]


def run_engine(ops: Sequence[Op]) -> tuple[float, list[IdFill], list[Resting], dict[str, Any]]:
    records = engine_records(ops)
    engine = Engine()
    seconds = timed(lambda: engine.add_many(records))
    engine.check_invariants()
    return seconds, engine.fills, engine_resting(engine), {}


def late_order(records: Sequence[Record], share: float = LATE_SHARE, late_by: int = LATE_BY,
               seed: int = SEED) -> tuple[list[Record], int]:
    """``records`` in delivery order with ``share`` of them (chosen with
    ``random.Random(seed)``) each delivered right after the record ``late_by``
    places after it (or last); the delivery order and how many are late."""
    n = len(records)
    chosen = set(random.Random(seed).sample(range(n), round(n * share)))
    due: dict[int, list[int]] = {}
    for i in sorted(chosen):
        due.setdefault(min(i + late_by, n - 1), []).append(i)
    out: list[Record] = []
    for p, rec in enumerate(records):
        if p not in chosen:
            out.append(rec)
        for i in due.get(p, ()):
            out.append(records[i])
    assert len(out) == n
    return out, len(chosen)


def run_delivery(ops: Sequence[Op], late: bool, batch: int) -> tuple[float, list[IdFill], list[Resting],
                                                                        dict[str, Any]]:
    """The engine's records through ``add_many``, ``batch`` records a call, in
    key order or with some late; the calls' arguments are built before the clock starts."""
    records = engine_records(ops)
    n_late = 0
    if late:
        records, n_late = late_order(records)
    calls = [records[i:i + batch] for i in range(0, len(records), batch)]
    engine = Engine()
    revisions: list[int] = []

    def replay() -> None:
        add_many, keep = engine.add_many, revisions.append
        for recs in calls:
            if add_many(recs):
                keep(1)

    seconds = timed(replay)
    engine.check_invariants()
    extra = {"late": n_late, "late_by": LATE_BY if late else 0, "batch": batch, "rewinds": engine.rewinds,
             "revisions": len(revisions)}
    if late and not engine.rewinds:
        raise AssertionError("late delivery: no record rewound the book")
    if not late and engine.rewinds:
        raise AssertionError(f"in-order delivery rewound the book {engine.rewinds} times")
    return seconds, engine.fills, engine_resting(engine), extra


# ---- contender: the plain reference ----------------------------------------


@dataclass(slots=True, eq=False)
class RefOrder:
    oid: int
    side: int
    price: int
    qty: int


class ReferenceBook:
    """A plain price-time priority book: the way one would write it without tuning."""

    def __init__(self) -> None:
        self.bids: SortedDict = SortedDict()  # price -> deque[RefOrder]
        self.asks: SortedDict = SortedDict()
        self.by_id: dict[int, RefOrder] = {}
        self.fills: list[IdFill] = []

    def limit(self, oid: int, side: int, price: int, qty: int) -> None:
        if side == BUY:
            book, opposite, best = self.bids, self.asks, 0
        else:
            book, opposite, best = self.asks, self.bids, -1
        while qty and opposite:
            level_price, level = opposite.peekitem(best)
            if (level_price > price) if side == BUY else (level_price < price):
                break
            while qty and level:
                maker = level[0]
                traded = min(qty, maker.qty)
                self.fills.append((oid, maker.oid, level_price, traded))
                maker.qty -= traded
                qty -= traded
                if not maker.qty:
                    level.popleft()
                    del self.by_id[maker.oid]
            if not level:
                del opposite[level_price]
        if qty:
            order = RefOrder(oid, side, price, qty)
            level = book.get(price)
            if level is None:
                level = book[price] = deque()
            level.append(order)
            self.by_id[oid] = order

    def cancel(self, oid: int) -> None:
        order = self.by_id.pop(oid, None)
        if order is None:
            return
        book = self.bids if order.side == BUY else self.asks
        level = book[order.price]
        level.remove(order)
        if not level:
            del book[order.price]

    def resting(self) -> list[Resting]:
        out: list[Resting] = []
        for side, book, prices in (
            (BUY, self.bids, reversed(self.bids)), (SELL, self.asks, iter(self.asks))
        ):
            for price in prices:
                out.extend((side, price, o.oid, o.qty) for o in book[price])
        return out


def replay_reference(ref: ReferenceBook, ops: Sequence[Op]) -> None:
    for op, oid, side, price, qty in ops:
        if op == CANCEL_OP:
            ref.cancel(oid)
        else:
            ref.limit(oid, side, price, qty)


def run_reference(ops: Sequence[Op]) -> tuple[float, list[IdFill], list[Resting], dict[str, Any]]:
    ref = ReferenceBook()
    seconds = timed(lambda: replay_reference(ref, ops))
    return seconds, ref.fills, ref.resting(), {}


# ---- contender: lightmatchingengine (optional, PyPI) ------------------------


def lme_available() -> bool:
    try:
        importlib.import_module(f"{LME}.{LME}")
    except Exception:  # not installed, or broken: it is optional either way
        return False
    return True


def run_lme(ops: Sequence[Op]) -> tuple[float, list[IdFill], list[Resting], dict[str, Any]]:
    mod = importlib.import_module(f"{LME}.{LME}")
    # It numbers orders itself, 1, 2, ... in arrival order: the workload's ids must agree.
    ids = [oid for op, oid, *_ in ops if op == LIMIT_OP]
    if ids != list(range(1, len(ids) + 1)):
        raise SystemExit("lightmatchingengine needs limit ids 1, 2, ... in arrival order")
    lme_side = {BUY: mod.Side.BUY, SELL: mod.Side.SELL}
    inputs = [
        (op, oid, lme_side[side] if op == LIMIT_OP else 0, price, qty) for op, oid, side, price, qty in ops
    ]
    lme = mod.LightMatchingEngine()
    results: list[tuple[Any, list[Any]]] = []

    def replay() -> None:
        add, cancel, keep = lme.add_order, lme.cancel_order, results.append
        for op, oid, side, price, qty in inputs:
            if op == CANCEL_OP:
                cancel(oid, "X")
            else:
                keep(add("X", price, qty, side))

    seconds = timed(replay)
    fills: list[IdFill] = []
    for order, trades in results:
        taker = order.order_id
        fills.extend((taker, t.order_id, t.trade_price, t.trade_qty) for t in trades if t.order_id != taker)
    book = lme.order_books["X"]
    resting: list[Resting] = []
    for side, levels, prices in (
        (BUY, book.bids, sorted(book.bids, reverse=True)), (SELL, book.asks, sorted(book.asks))
    ):
        for price in prices:
            resting.extend((side, price, o.order_id, o.leaves_qty) for o in levels[price])
    return seconds, fills, resting, {}


# ---- the full pure-core path -----------------------------------------------


def origin_ids(n: int) -> list[bytes]:
    return [blake2b(b"benchmark origin %d" % k, digest_size=32).digest() for k in range(n)]


def replay_core(ex: Exchange, ops: Sequence[Op], origins: Sequence[bytes], batch: int) -> list[Entry]:
    """Build, hash and deliver one entry per operation; return the entries."""
    n = len(origins)
    seqs = [0] * n
    prevs = [GENESIS] * n
    order_hash: dict[int, bytes] = {}
    entries: list[Entry] = []
    pending: list[Entry] = []
    hlc = CORE_BASE_MS << 16  # one global stamp per op: canonical order = arrival order
    # membership first: origin 0 founds the network and admits the others
    prelude: list[Entry] = []
    for k in range(n):
        seq, hlc = seqs[0] + 1, hlc + 1
        body0 = Admit(member=origins[k], after=1 if k == 0 else 0)
        h = entry_hash(origins[0], seq, hlc, prevs[0], body0)
        prelude.append(Entry(origin=origins[0], seq=seq, hlc=hlc, prev=prevs[0], body=body0,
                             sig=DUMMY_SIG, hash=h))
        seqs[0], prevs[0] = seq, h
    ex.set_network(prelude[0].hash)
    got = ex.receive(prelude, now_ms=hlc >> 16, trusted=True)
    if got.merge.rejected or not all(ex.membership.is_member(o) for o in origins):
        raise AssertionError(f"core path: membership prelude refused {got.merge.rejected[:1]}")
    for op, oid, side, price, qty in ops:
        body: Order | Cancel
        if op == CANCEL_OP:
            body = Cancel(order_id=order_hash[oid])
        else:
            body = Order(side=side, price=price, qty=qty)
        check_body(body)
        k = oid % n
        origin, seq, prev = origins[k], seqs[k] + 1, prevs[k]
        hlc += 1
        h = entry_hash(origin, seq, hlc, prev, body)
        e = Entry(origin=origin, seq=seq, hlc=hlc, prev=prev, body=body, sig=DUMMY_SIG, hash=h)
        seqs[k], prevs[k] = seq, h
        if op == LIMIT_OP:
            order_hash[oid] = h
        entries.append(e)
        pending.append(e)
        if len(pending) == batch:
            got = ex.receive(pending, now_ms=hlc >> 16, trusted=True)
            if got.merge.rejected or got.revoked:
                raise AssertionError(f"core path: {got.merge.rejected[:1]} revoked={len(got.revoked)}")
            pending = []
    if pending:
        got = ex.receive(pending, now_ms=hlc >> 16, trusted=True)
        if got.merge.rejected or got.revoked:
            raise AssertionError(f"core path: {got.merge.rejected[:1]} revoked={len(got.revoked)}")
    return entries


def run_core(ops: Sequence[Op], batch: int) -> tuple[float, list[IdFill], list[Resting], dict[str, Any]]:
    origins = origin_ids(CORE_ORIGINS)
    ex = Exchange(SigningKey(blake2b(b"benchmark node %d" % SEED, digest_size=32).digest()))
    out: list[list[Entry]] = []
    seconds = timed(lambda: out.append(replay_core(ex, ops, origins, batch)))
    entries = out[0]
    wid = {e.hash: oid for e, (op, oid, *_) in zip(entries, ops, strict=True) if op == LIMIT_OP}
    engine = ex.engine
    engine.check_invariants()
    fills = [(wid[t], wid[m], p, q) for t, m, p, q in engine.fills]
    resting = [(side, price, wid[oid], rem) for side, price, oid, rem in engine_resting(engine)]
    extra = {
        "entries": ex.replica.entry_count(),
        "origins": len(ex.replica.origins()),
        "batch": batch,
    }
    if extra["entries"] != len(ops) + CORE_ORIGINS or extra["origins"] != CORE_ORIGINS:
        raise AssertionError(f"core path: replica holds {extra}")
    return seconds, fills, resting, extra


# ---- memory -----------------------------------------------------------------


def memory_levels(n: int) -> int:
    """Price levels per side: 5000 for a million orders, 100 orders per level at any size."""
    return max(1, min(5000, n // 200))


def resting_records(n: int) -> list[Record]:
    """``n`` non-crossing GTC orders, bid and ask alternately: bids at 1..5000, asks at
    10001..15000 (for a million orders; fewer levels for fewer orders), 100 orders per level."""
    levels = memory_levels(n)
    out: list[Record] = []
    for i in range(n):
        level = (i >> 1) % levels
        if i & 1:
            out.append((i, GTC, i + 1, SELL, 10_001 + level, 1 + i % 100, None))
        else:
            out.append((i, GTC, i + 1, BUY, 1 + level, 1 + i % 100, None))
    return out


def measure_memory(n: int) -> dict[str, Any]:
    gc.collect()
    gcold = gc.isenabled()
    gc.disable()  # a million small containers: collections would only slow the build
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        engine = Engine()
        records = resting_records(n)
        t0 = perf_counter()
        engine.add_many(records)
        build_s = perf_counter() - t0
        del records  # what stays is what the engine keeps alive
        gc.collect()
        with_journal = tracemalloc.get_traced_memory()[0] - base
        engine.finalize(n)
        gc.collect()
        book_only = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        if gcold:
            gc.enable()
    errors = []
    if engine.resting_count() != n or engine.fills:
        errors.append(f"expected {n} resting orders and no fills, "
                      f"got {engine.resting_count()} and {len(engine.fills)}")
    if n > 1 and (engine.best(BUY), engine.best(SELL)) != (memory_levels(n), 10_001):
        errors.append(f"unexpected best prices {engine.best(BUY)} / {engine.best(SELL)}")
    return {
        "contender": "memory",
        "orders": n,
        "with_journal_bytes": with_journal,
        "book_only_bytes": book_only,
        "per_order_with_journal": with_journal / n,
        "per_order_book_only": book_only / n,
        "build_seconds_traced": build_s,
        "mismatches": errors,
    }


# ---- worker -----------------------------------------------------------------


def worker(name: str, workload: Path, core_batch: int) -> dict[str, Any]:
    ops = load_workload(workload)
    expected = load_expected(workload)
    problems: list[str] = []
    counts = {"ops": len(ops), "limits": sum(op == LIMIT_OP for op, *_ in ops)}
    counts["cancels"] = counts["ops"] - counts["limits"]
    problems += [
        f"workload {k}: {v} != {expected[k]}" for k, v in counts.items() if k in expected and expected[k] != v
    ]
    if name == "engine":
        seconds, fills, resting, extra = run_engine(ops)
    elif name == "reference":
        seconds, fills, resting, extra = run_reference(ops)
    elif name == "lme":
        seconds, fills, resting, extra = run_lme(ops)
    elif name == "core":
        seconds, fills, resting, extra = run_core(ops, core_batch)
    elif name in DELIVERIES:
        seconds, fills, resting, extra = run_delivery(ops, *DELIVERIES[name])
    else:
        raise SystemExit(f"unknown worker {name!r}")
    outcome = summarise(fills, resting)
    problems += mismatches(outcome, expected)
    return {
        "contender": name,
        "ops": len(ops),
        "seconds": seconds,
        "ops_per_s": len(ops) / seconds,
        "outcome": outcome,
        "fills_digest": digest(fills),
        "book_digest": digest(resting),
        "mismatches": problems,
        **extra,
    }


# ---- parent -----------------------------------------------------------------


def spawn(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"contender": args[1], "crashed": f"exit {proc.returncode}: {tail}", "mismatches": [tail]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


LABELS: Final = {
    "engine": "engine",
    "reference": "reference",
    "lme": LME,
    "core": "core path",
    "inorder1": "in order 1/call",
    "late1": "1% late 1/call",
    "inorder100": "in order 100/call",
    "late100": "1% late 100/call",
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD,
                   help="workload CSV; the expected outcome is NAME.expected.json beside it")
    p.add_argument("--runs", type=int, default=7, help="timed runs each for engine and reference (>= 5)")
    p.add_argument("--extra-runs", type=int, default=3, help=f"timed runs each for {LME} and the core path")
    p.add_argument("--late-runs", type=int, default=LATE_RUNS,
                   help="timed runs each for the in-order and late deliveries (one a call, batches of 100)")
    p.add_argument("--core-batch", type=int, default=CORE_BATCH,
                   help="entries per receive() on the core path")
    p.add_argument("--memory-orders", type=int, default=MEMORY_ORDERS,
                   help="resting orders for the memory figure")
    p.add_argument("--quick", action="store_true", help="one run each (smoke test)")
    p.add_argument("--no-target", action="store_true", help="report the targets but do not fail on them")
    p.add_argument("--worker", choices=(*LABELS, "memory"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    workload: Path = a.workload.resolve()

    if a.worker == "memory":
        print(json.dumps(measure_memory(a.memory_orders)))
        return 0
    if a.worker:
        print(json.dumps(worker(a.worker, workload, a.core_batch)))
        return 0

    runs = 1 if a.quick else a.runs
    extra_runs = 1 if a.quick else min(a.extra_runs, runs)
    late_runs = 1 if a.quick else max(1, min(a.late_runs, runs))
    if not a.quick and runs < 5:
        p.error("--runs must be at least 5 (use --quick for a smoke test)")
    if not workload.is_file() or not expected_path(workload).is_file():
        p.error(f"need {workload} and {expected_path(workload).name} beside it")

    have_lme = lme_available()
    ops = load_workload(workload)
    n_limits = sum(op == LIMIT_OP for op, *_ in ops)
    print(f"workload   {workload} ({len(ops):,} ops: {n_limits:,} limits, {len(ops) - n_limits:,} cancels)")
    print(f"python     {sys.version.split()[0]} on {os.cpu_count()} CPUs; every run in a fresh subprocess "
          "(PYTHONHASHSEED=0), GC off around the timed call as in timeit, time.perf_counter")
    if not have_lme:
        print(f"note       {LME} is not importable here: skipped (pip install {LME} to include it)")

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in LABELS}
    order = ["engine", "reference"]
    for r in range(runs):
        late = []
        if r < late_runs:  # which of a pair goes first alternates from round to round
            for pair in (["inorder1", "late1"], ["inorder100", "late100"]):
                late += pair if r % 2 == 0 else pair[::-1]
        names = order + late + ((["lme"] if have_lme else []) + ["core"] if r < extra_runs else [])
        for name in names:
            args = ["--worker", name, "--workload", str(workload), "--core-batch", str(a.core_batch)]
            res = spawn(args)
            results[name].append(res)
            if "crashed" in res:
                print(f"run {r + 1}/{runs}  {LABELS[name]:<20} CRASHED {res['crashed']}")
                continue
            status = "ok" if not res["mismatches"] else "WRONG: " + "; ".join(res["mismatches"])
            print(f"run {r + 1}/{runs}  {LABELS[name]:<20} {res['seconds']:8.4f} s "
                  f"{fmt_rate(res['ops_per_s']):>11} ops/s  {status}")
    mem = spawn(["--worker", "memory", "--memory-orders", str(a.memory_orders)])

    failed: list[str] = []
    medians: dict[str, float] = {}
    digests: dict[str, set[tuple[str, str]]] = {}
    print()
    for name, rs in results.items():
        good = [x for x in rs if "crashed" not in x]
        for x in rs:
            failed += [f"{LABELS[name]}: {m}" for m in x["mismatches"]]
        if not good:
            continue
        rates = [x["ops_per_s"] for x in good]
        medians[name] = statistics.median(rates)
        digests[name] = {(x["fills_digest"], x["book_digest"]) for x in good}
        print(f"{LABELS[name]:<20} median {fmt_rate(medians[name]):>11} ops/s  "
              f"(min {fmt_rate(min(rates))}, max {fmt_rate(max(rates))}, {len(good)} runs)")
    if "core" in medians:
        print(f"core path: {medians['core'] / 1e3:,.0f}k ops/s for entries built (Order/Cancel bodies, "
              f"check_body, entry_hash, dummy signature) over {CORE_ORIGINS} origins, merged with "
              f"Exchange.receive(trusted=True) in batches of {a.core_batch:,}, matched by the engine "
              "(reported, not asserted)")
    for name in ("engine", "reference"):
        if name not in medians:
            failed.append(f"{LABELS[name]}: no successful run")
    all_digests: set[tuple[str, str]] = set().union(*digests.values())
    if len(all_digests) > 1:
        failed.append("contenders disagree: fills or final book differ ("
                      + ", ".join(f"{LABELS[n]}={sorted(d)}" for n, d in digests.items()) + ")")
    if failed:
        print("outcome    WRONG: see the FAIL lines below")
    else:
        exp = load_expected(workload)
        print(f"outcome    every run of {', '.join(LABELS[n] for n in digests)} matches the expected figures "
              f"({exp['maker_fills']:,} maker fills, {exp['traded_lots']:,} lots, {exp['count']:,} resting, "
              f"buy/sell volume {exp['buy_vol']:,}/{exp['sell_vol']:,}, "
              f"best {exp['best_bid']}/{exp['best_ask']}, "
              f"{exp['bid_levels']}/{exp['ask_levels']} levels) and each other (identical fills and book)")

    if "crashed" in mem:
        failed.append(f"memory: {mem['crashed']}")
    else:
        failed += [f"memory: {m}" for m in mem["mismatches"]]
        per_book = mem["per_order_book_only"]
        print(f"memory     {mem['orders']:,} resting orders (tracemalloc): "
              f"{mem['per_order_with_journal']:.0f} bytes/order with the checkpoint journal, "
              f"{per_book:.0f} bytes/order book only after finalize (target <= {TARGET_BYTES_PER_ORDER})")
        if per_book > TARGET_BYTES_PER_ORDER:
            msg = f"MEMORY TARGET MISSED: {per_book:.0f} bytes per resting order > {TARGET_BYTES_PER_ORDER}"
            print(msg if not a.no_target else msg + " (ignored: --no-target)")
            if not a.no_target:
                failed.append(msg)

    late_ratio = 0.0
    if all(name in medians for name in DELIVERIES):
        late_ratio = round(medians["late1"] / medians["inorder1"], 2)
        batch_ratio = medians["late100"] / medians["inorder100"]
        one = next(x for x in results["late1"] if "crashed" not in x)
        hundred = next(x for x in results["late100"] if "crashed" not in x)
        print(f"late       {one['late']:,} of {one['ops']:,} records ({LATE_SHARE:.0%}, chosen with seed {SEED}) "
              f"each delivered {LATE_BY} records after its turn, through Engine.add_many: "
              f"late ÷ in order = {late_ratio:.2f} one record a call "
              f"({fmt_rate(medians['late1'])} vs {fmt_rate(medians['inorder1'])} ops/s, "
              f"{one['rewinds']:,} rewinds), {batch_ratio:.2f} in batches of 100 "
              f"({fmt_rate(medians['late100'])} vs {fmt_rate(medians['inorder100'])} ops/s, "
              f"{hundred['rewinds']:,} rewinds) (reported, not asserted)")
    for batch in ("1", "100"):
        same = digests.get("inorder" + batch, set()) | digests.get("late" + batch, set())
        if len(same) > 1:
            failed.append(f"1% late {batch}/call: fills or final book differ from the in-order run")
    for name in DELIVERIES:
        if name not in medians:
            failed.append(f"{LABELS[name]}: no successful run")

    eng, ref = medians.get("engine", 0.0), medians.get("reference", 0.0)
    ratio = round(eng / ref, 2) if ref else 0.0
    if "lme" in medians and eng:
        print(f"{LME}: engine is {eng / medians['lme']:.1f}x as fast")
    if ratio < TARGET_RATIO and "engine" in medians and "reference" in medians:
        msg = f"SPEED TARGET MISSED: engine/reference = {ratio:.2f} < {TARGET_RATIO}"
        print(msg if not a.no_target else msg + " (ignored: --no-target)")
        if not a.no_target:
            failed.append(msg)
    for f in failed:
        print(f"FAIL       {f}")
    print(f"late_ratio={late_ratio:.2f}")
    print(f"engine_ops_per_s={eng:.0f} reference_ops_per_s={ref:.0f} ratio={ratio:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
