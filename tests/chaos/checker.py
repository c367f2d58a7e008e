"""The checker: a pure function from a recorded ``History`` to one row per nemesis.

No network, no clock, no files: ``check(history)`` reads the observations
and says what they prove.  Each nemesis owns the events recorded between the
previous check and its own check; a problem is counted in the row of the
check that first shows it, once.

Columns (``Row``), and what counts as a violation (V):

- converged (V when not): every live node showed the same state hash, the
  same book and the same fill list with the same final flags; with the
  seconds from heal to the first equal state hashes;
- lost (V): an acknowledged order that a live node does not hold (its entry
  is past the node's version vector, or ``GET /v1/orders/{id}`` said 404).
  An order a node reports as void (finality's eviction) is counted as void,
  not lost;
- acked voided (V): an acknowledged order that a node reports void (a node
  answers only once a majority of members certified the order, and then no
  eviction may void it: docs/FINALITY.md, section 7);
- cancel violations (V): a cancel acknowledged as final (``final: true`` in
  the reply, or the order read back later as cancelled and final) whose order
  later shows more filled than it did then;
- over-fills (V): an order whose fills on some node add up to more than its
  quantity;
- final retracted (V): a fill a node showed as final at position ``seq``
  that the node later showed different, or no longer showed;
- revoked (information): a fill a client or the observer saw, never final,
  that no live node shows at the check; with how long it had been visible
  (from the first sight to the last sample that missed it; the sampling
  period bounds the error);
- replay mismatches (V): fills and book levels where a node differs from the
  naive reference matcher replaying the node's entries under
  ``replay.counted_entries``, plus final fills that are not a prefix of it;
- client errors (information), by kind; crashes (V): node processes that
  exited without being killed; tracebacks (V): new tracebacks in node logs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crdt.entry import Carry, Entry, Order
from tests.chaos.history import Ack, Check, FillKey, History, NodeState, Phase, ShownFill
from tests.chaos.replay import decode_wire_hex, order_quantities, replay

#: Failed cancels that are an answer, not an error: the order had filled or closed.
CANCEL_MISSES = frozenset({"not_cancellable", "unknown_order"})
VOID_STATUSES = frozenset({"void", "voided"})
EXAMPLES = 5  # examples kept per kind of problem


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    name: str
    title: str
    supported: bool
    note: str = ""
    fault_s: float = 0.0
    converged: bool = False
    converge_s: float | None = None
    orders_acked: int = 0
    cancels_acked: int = 0
    lost: int = 0
    void: int = 0
    cancels_final: int = 0
    cancel_violations: int = 0
    cancels_overtaken: int = 0  # provisional cancels whose order filled further (allowed)
    overfills: int = 0
    final_fills: int = 0
    final_retracted: int = 0
    revoked: int = 0
    revoked_max_ms: int | None = None
    revoked_p50_ms: int | None = None
    replay_mismatches: int = 0
    client_errors: dict[str, int] = field(default_factory=dict)
    cancel_misses: int = 0
    crashes: int = 0
    tracebacks: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # fault actions, and packets the link faults hit
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def violations(self) -> int:
        if not self.supported:
            return 0
        return (int(not self.converged) + self.lost + self.void + self.cancel_violations + self.overfills
                + self.final_retracted + self.replay_mismatches + self.crashes + self.tracebacks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    rows: tuple[Row, ...]
    total: Row
    entry_conflicts: int = 0  # two different entries for one (origin, seq): an equivocation
    notes: tuple[str, ...] = ()

    @property
    def violations(self) -> int:
        return sum(r.violations for r in self.rows) + self.entry_conflicts

    @property
    def ok(self) -> bool:
        return self.violations == 0


def _key(f: ShownFill | FillKey) -> FillKey:
    return (f[0], f[1], f[2], f[3])


def _pct(sorted_values: list[int], pct: int) -> int:
    return sorted_values[min(len(sorted_values) - 1, len(sorted_values) * pct // 100)]


class _Entries:
    """Every entry the checks served, by (origin, seq) and by hash."""

    def __init__(self) -> None:
        self.by_pos: dict[tuple[str, int], Entry] = {}
        self.by_hash: dict[str, Entry] = {}
        self.conflicts: list[str] = []

    def add(self, wires: Iterable[str]) -> None:
        for wire in wires:
            e = decode_wire_hex(wire)
            pos = (e.origin.hex(), e.seq)
            old = self.by_pos.get(pos)
            if old is not None and old.hash != e.hash:
                self.conflicts.append(f"{pos[0][:8]}#{pos[1]}")
                continue
            self.by_pos[pos] = e
            self.by_hash[e.hash.hex()] = e

    def held_by(self, vv: Mapping[str, int]) -> tuple[list[Entry], int]:
        """The entries a node with version vector ``vv`` holds, and how many of
        them the checks never served (the snapshot is then incomplete)."""
        out: list[Entry] = []
        missing = 0
        for origin, top in vv.items():
            for seq in range(1, top + 1):
                e = self.by_pos.get((origin, seq))
                if e is None:
                    missing += 1
                else:
                    out.append(e)
        return out, missing


class _Judge:
    """Walks the history check by check, remembering what was already counted."""

    def __init__(self, history: History) -> None:
        self.h = history
        self.entries = _Entries()
        self.lost: set[str] = set()
        self.void: set[str] = set()
        self.bad_cancels: set[str] = set()
        self.overfilled: set[str] = set()
        self.revoked: set[FillKey] = set()
        self.first_seen: dict[FillKey, float] = {}
        self.ever_final: set[FillKey] = set()
        self.last_gone: dict[FillKey, float] = {}
        self.retracted: set[tuple[str, int, FillKey]] = set()
        self.final_map: dict[str, dict[int, FillKey]] = {}  # node -> final seq -> fill
        self.notes: list[str] = []
        self._events = self._timeline()
        self._cursor = 0

    def _timeline(self) -> list[tuple[float, int, Any]]:
        """Observations in time order (acks at their answer time)."""
        items: list[tuple[float, int, Any]] = []
        for a in self.h.acks:
            items.append((a.t1, 0, a))
        for s in self.h.seen:
            items.append((s.t, 1, s))
        for g in self.h.gone:
            items.append((g.t, 2, g))
        for ft in self.h.final_totals:
            items.append((ft.t, 3, ft))
        items.sort(key=lambda it: (it[0], it[1]))
        return items

    # ---- observations up to a check -------------------------------------------------

    def _advance(self, until: float, examples: dict[str, list[str]]) -> int:
        """Take in the observations up to ``until``; returns final fills retracted by them."""
        retracted = 0
        while self._cursor < len(self._events) and self._events[self._cursor][0] <= until:
            t, kind, ev = self._events[self._cursor]
            self._cursor += 1
            if kind == 0:
                for f in ev.fills:
                    self._saw(t, ev.node, None, f)
            elif kind == 1:
                retracted += self._saw(t, ev.node, ev.seq, ev.fill, examples)
            elif kind == 2:
                self.last_gone[_key(ev.fill)] = t
            else:
                known = self.final_map.setdefault(ev.node, {})
                for seq in sorted(s for s in known if s >= ev.total):
                    retracted += self._retract(ev.node, seq, known.pop(seq), f"{ev.node} final count fell to "
                                               f"{ev.total} at t={t:.1f}", examples)
        return retracted

    def _saw(self, t: float, node: str, seq: int | None, f: ShownFill,
             examples: dict[str, list[str]] | None = None) -> int:
        key = _key(f)
        self.first_seen.setdefault(key, t)
        if not f[4]:
            return 0
        self.ever_final.add(key)
        if seq is None:
            return 0
        known = self.final_map.setdefault(node, {})
        old = known.get(seq)
        known[seq] = key
        if old is not None and old != key:
            return self._retract(node, seq, old, f"{node} final #{seq} changed at t={t:.1f}", examples)
        return 0

    def _retract(self, node: str, seq: int, old: FillKey, why: str,
                 examples: dict[str, list[str]] | None) -> int:
        mark = (node, seq, old)
        if mark in self.retracted:
            return 0
        self.retracted.add(mark)
        if examples is not None:
            _example(examples, "final_retracted", f"{why}: was {old[0][:8]}x{old[1][:8]} {old[3]}@{old[2]}")
        return 1

    # ---- one check ---------------------------------------------------------------------

    def row(self, phase: Phase, check: Check | None, window: tuple[float, float], *, last: bool = False) -> Row:
        """The row of one nemesis.  ``window``: the times its events belong to; the
        last row also takes the exits after the last check (the final shutdown)."""
        if not phase.supported or check is None:
            return Row(name=phase.name, title=phase.title, supported=False,
                       note=phase.note or "not run")
        examples: dict[str, list[str]] = {}
        retracted = self._advance(check.t, examples)
        self.entries.add(check.entries)
        lists = self.h.fill_lists
        live = [n for n in check.nodes if n.alive and n.error is None]
        dead_answers = [n for n in check.nodes if n.alive and n.error is not None]
        node_fills: dict[str, tuple[ShownFill, ...]] = {n.node: lists.get(n.fills, ()) for n in live}

        # converged
        converged = bool(live) and not dead_answers and len({
            (n.state_hash, n.bids, n.asks, n.fills) for n in live}) == 1
        if not converged:
            shapes = Counter((n.state_hash or "?")[:12] for n in check.nodes if n.alive)
            _example(examples, "converged", f"state hashes {dict(shapes)}; no answer from "
                                            f"{[n.node for n in dead_answers]}")
        converge_s = None
        if converged and check.t_converged is not None:
            converge_s = round(max(0.0, check.t_converged - check.t_heal), 2)

        # final fills retracted at the check itself
        for n in live:
            known = self.final_map.setdefault(n.node, {})
            shown = node_fills[n.node]
            for seq, old in sorted(known.items()):
                now = shown[seq] if seq < len(shown) else None
                if now is None or not now[4] or _key(now) != old:
                    retracted += self._retract(n.node, seq, old, f"{n.node} final #{seq} at the check", examples)
                    known.pop(seq)
            for seq, f in enumerate(shown):
                if f[4]:
                    known[seq] = _key(f)
                    self.ever_final.add(_key(f))

        # the entries each live node holds
        held: dict[str, list[Entry]] = {}
        for n in live:
            entries, missing = self.entries.held_by(n.version_vector)
            if missing:
                self.notes.append(f"{phase.name}: {missing} entries of {n.node} were not served; its replay is "
                                  "skipped")
            else:
                held[n.node] = entries
        # an order's id: its entry's hash, or for a participant's order its ticket's (the member's entry carries it)
        ids_held = {node: {e.hash.hex() for e in es}
                    | {e.body.ticket.hex() for e in es if isinstance(e.body, Carry) and isinstance(e.body.inner, Order)}
                    for node, es in held.items()}

        # acknowledged orders void (a node says so), lost (a live node lacks them)
        acks = [a for a in self.h.acks if window[0] < a.t1 <= window[1]]
        void_now = 0
        for n in live:
            for oid, view in n.orders.items():
                if view is not None and oid not in self.void and (
                        view.get("void") is True or view.get("status") in VOID_STATUSES):
                    self.void.add(oid)
                    void_now += 1
        acked_orders = [a for a in self.h.acks if a.t1 <= check.t and a.op == "order" and a.ok and a.order_id]
        lost_now = 0
        for a in acked_orders:
            oid = str(a.order_id)
            if oid in self.lost or oid in self.void:
                continue
            missing_at = [n.node for n in live if n.node in ids_held and oid not in ids_held[n.node]]
            missing_at += [n.node for n in live if oid in n.orders and n.orders[oid] is None]
            if missing_at:
                self.lost.add(oid)
                lost_now += 1
                _example(examples, "lost", f"order {oid[:16]} acked by {a.node} at t={a.t1:.1f}, missing at "
                                           f"{sorted(set(missing_at))}")

        # filled quantity per order, per node
        filled: dict[str, Counter[str]] = {}
        for n in live:
            c: Counter[str] = Counter()
            for f in node_fills[n.node]:
                c[f[0]] += f[3]
                c[f[1]] += f[3]
            filled[n.node] = c

        # over-fills
        overfills = 0
        for node, es in held.items():
            qty = order_quantities(es)
            for oid, amount in filled[node].items():
                if oid in qty and amount > qty[oid] and oid not in self.overfilled:
                    self.overfilled.add(oid)
                    overfills += 1
                    _example(examples, "overfills", f"{node}: order {oid[:16]} filled {amount} of {qty[oid]}")

        # cancels: acknowledged as final in the reply, or read back as final later
        final_cancels: dict[str, tuple[float, int]] = {}
        for a in self.h.acks:
            if a.t1 <= check.t and a.op == "cancel" and a.ok and a.order_id and a.final is True \
                    and a.status == "cancelled":
                final_cancels.setdefault(a.order_id, (a.t1, a.filled or 0))
        for of in self.h.order_finals:
            if of.t <= check.t and of.status == "cancelled":
                final_cancels.setdefault(of.order_id, (of.t, of.filled))
        cancels_final = sum(1 for t, _ in final_cancels.values() if window[0] < t <= window[1])
        cancel_violations = overtaken = 0
        for oid, (t, before) in final_cancels.items():
            later = max((filled[n.node][oid] for n in live), default=0)
            views = [n.orders.get(oid) for n in live if oid in n.orders]
            if oid in self.bad_cancels:
                continue
            if later > before or any(v is not None and v.get("status") != "cancelled" for v in views):
                self.bad_cancels.add(oid)
                cancel_violations += 1
                _example(examples, "cancel_violations", f"order {oid[:16]} cancelled with {before} filled "
                                                        f"(final at t={t:.1f}), later {later} filled")
        for a in acks:
            if a.op == "cancel" and a.ok and a.order_id and a.order_id not in final_cancels:
                if max((filled[n.node][a.order_id] for n in live), default=0) > (a.filled or 0):
                    overtaken += 1

        # provisional fills revoked
        shown_now = {_key(f) for fills in node_fills.values() for f in fills}
        durations: list[int] = []
        for key, t0 in self.first_seen.items():
            if t0 > check.t or key in shown_now or key in self.revoked or key in self.ever_final:
                continue
            self.revoked.add(key)
            gone = self.last_gone.get(key, check.t)
            durations.append(round(max(0.0, gone - t0) * 1000))
        durations.sort()

        # the independent replay
        mismatches = 0
        replays: dict[tuple[tuple[tuple[str, int], ...], str], Any] = {}
        for n in live:
            if n.node not in held:
                continue
            fin = n.finality or {}
            vv_key = (tuple(sorted(n.version_vector.items())),
                      repr((fin.get("decisions"), sorted(dict(fin.get("forks") or {}).items()))))
            if vv_key not in replays:
                replays[vv_key] = replay(held[n.node], n.finality)
            ref = replays[vv_key]
            got = node_fills[n.node]
            miss = _replay_mismatch(got, ref.fills, n, ref.bids, ref.asks)
            if miss:
                _example(examples, "replay", f"{n.node}: {miss} differences from the reference replay "
                                             f"({len(got)} fills, reference {len(ref.fills)})")
            mismatches = max(mismatches, miss)

        # errors, crashes, tracebacks
        errors: Counter[str] = Counter()
        misses = 0
        for a in acks:
            if a.ok:
                continue
            if a.op == "cancel" and a.error in CANCEL_MISSES:
                misses += 1
            else:
                errors[str(a.error)] += 1
        crash_end = float("inf") if last else window[1]
        crashes = [e for e in self.h.node_events
                   if e.kind == "exit" and not e.expected and window[0] < e.t <= crash_end]
        for e in crashes:
            _example(examples, "crashes", f"{e.node} at t={e.t:.1f}: {e.detail}")
        tracebacks = sum(len(n.tracebacks) for n in check.nodes)
        for n in check.nodes:
            for tb in n.tracebacks:
                _example(examples, "tracebacks", f"{n.node}: {tb}")

        faults: Counter[str] = Counter()
        for fe in self.h.fault_events:
            if window[0] < fe.t <= window[1]:
                if fe.kind == "packets":
                    faults.update({f"packets {k}": v for k, v in fe.counts.items()})
                elif fe.kind not in ("nemesis", "heal-net"):
                    faults[fe.kind] += 1

        return Row(
            name=phase.name, title=phase.title, supported=True, note=phase.note,
            fault_s=round(phase.t_heal - phase.t_fault, 1), converged=converged, converge_s=converge_s,
            orders_acked=sum(1 for a in acks if a.op == "order" and a.ok),
            cancels_acked=sum(1 for a in acks if a.op == "cancel" and a.ok),
            lost=lost_now, void=void_now,
            cancels_final=cancels_final,
            cancel_violations=cancel_violations, cancels_overtaken=overtaken, overfills=overfills,
            final_fills=max((sum(1 for f in fills if f[4]) for fills in node_fills.values()), default=0),
            final_retracted=retracted, revoked=len(durations),
            revoked_max_ms=durations[-1] if durations else None,
            revoked_p50_ms=_pct(durations, 50) if durations else None,
            replay_mismatches=mismatches, client_errors=dict(sorted(errors.items())), cancel_misses=misses,
            crashes=len(crashes), tracebacks=tracebacks, faults=dict(sorted(faults.items())), examples=examples,
        )


def _replay_mismatch(got: tuple[ShownFill, ...], ref: tuple[FillKey, ...], node: NodeState,
                     bids: tuple[tuple[int, int, int], ...], asks: tuple[tuple[int, int, int], ...]) -> int:
    """Fills and book levels that differ between a node and the reference (fills
    as multisets, plus one if the same fills come in another order), plus final
    fills that are not the reference's prefix."""
    keys = [_key(f) for f in got]
    a, b = Counter(keys), Counter(ref)
    diff = sum(((a - b) + (b - a)).values())
    if not diff and keys != list(ref):
        diff = 1
    diff += len(set(node.bids) ^ set(bids)) + len(set(node.asks) ^ set(asks))
    final = [_key(f) for f in got if f[4]]
    diff += sum(1 for i, k in enumerate(final) if i >= len(ref) or ref[i] != k)
    return diff


def _example(examples: dict[str, list[str]], kind: str, text: str) -> None:
    bucket = examples.setdefault(kind, [])
    if len(bucket) < EXAMPLES:
        bucket.append(text)


def _total(rows: list[Row]) -> Row:
    ran = [r for r in rows if r.supported]
    errors: Counter[str] = Counter()
    for r in ran:
        errors.update(r.client_errors)
    maxes = [r.revoked_max_ms for r in ran if r.revoked_max_ms is not None]
    converge = [r.converge_s for r in ran if r.converge_s is not None]
    return Row(
        name="total", title="all nemeses", supported=bool(ran),
        fault_s=round(sum(r.fault_s for r in ran), 1), converged=all(r.converged for r in ran),
        converge_s=max(converge) if converge else None,
        orders_acked=sum(r.orders_acked for r in ran), cancels_acked=sum(r.cancels_acked for r in ran),
        lost=sum(r.lost for r in ran), void=sum(r.void for r in ran),
        cancels_final=sum(r.cancels_final for r in ran), cancel_violations=sum(r.cancel_violations for r in ran),
        cancels_overtaken=sum(r.cancels_overtaken for r in ran), overfills=sum(r.overfills for r in ran),
        final_fills=max((r.final_fills for r in ran), default=0),
        final_retracted=sum(r.final_retracted for r in ran), revoked=sum(r.revoked for r in ran),
        revoked_max_ms=max(maxes) if maxes else None, revoked_p50_ms=None,
        replay_mismatches=sum(r.replay_mismatches for r in ran), client_errors=dict(sorted(errors.items())),
        cancel_misses=sum(r.cancel_misses for r in ran), crashes=sum(r.crashes for r in ran),
        tracebacks=sum(r.tracebacks for r in ran),
    )


def check(history: History) -> Verdict:
    """Judge a recorded run: one row per nemesis, in the order they ran."""
    judge = _Judge(history)
    checks = {c.phase: c for c in history.checks}
    rows: list[Row] = []
    start = float("-inf")
    ran = [p.name for p in history.phases if p.supported and p.name in checks]
    for phase in history.phases:
        c = checks.get(phase.name) if phase.supported else None
        end = c.t if c is not None else start
        rows.append(judge.row(phase, c, (start, end), last=bool(ran) and phase.name == ran[-1]))
        if c is not None:
            start = end
    if judge.entries.conflicts:
        judge.notes.append(f"two different entries served for one (origin, seq): {judge.entries.conflicts[:5]}")
    return Verdict(rows=tuple(rows), total=_total(rows), entry_conflicts=len(judge.entries.conflicts),
                   notes=tuple(judge.notes))


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    def row(r: Row) -> dict[str, Any]:
        out = {name: getattr(r, name) for name in Row.__dataclass_fields__}
        out["violations"] = r.violations
        return out

    return {"ok": verdict.ok, "violations": verdict.violations, "rows": [row(r) for r in verdict.rows],
            "total": row(verdict.total), "entry_conflicts": verdict.entry_conflicts, "notes": list(verdict.notes)}


__all__ = ["Ack", "Row", "Verdict", "check", "verdict_json"]
