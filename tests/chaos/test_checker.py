"""The checker on hand-made histories: no network, no processes.

A small consistent world (two origins, a few crossing orders, signed entries,
nodes that show exactly what the reference replay says) is judged clean;
then each test breaks one thing the way a faulty node would (an acknowledged
order missing, a final fill that changes or vanishes, an over-fill, a fill
the replay does not make, a final cancel that fills later, a crash, replicas
that differ) and the checker must count it and fail the run.
"""

from __future__ import annotations

import dataclasses
import json
from hashlib import blake2b
from pathlib import Path
from typing import Any

import pytest

from crdt.entry import BUY, GENESIS, GTC, IOC, SELL, Body, Cancel, Entry, Order, encode_entry, make_entry
from crdt.hlc import Hlc
from crdt.keys import SigningKey
from tests.chaos.__main__ import main
from tests.chaos.checker import check
from tests.chaos.cluster import tracebacks_in
from tests.chaos.history import (
    Ack,
    Check,
    FillGone,
    FillSeen,
    FinalTotal,
    History,
    NodeEvent,
    NodeState,
    Phase,
    Recorder,
    ShownFill,
)
from tests.chaos.replay import counted_entries, replay
from tests.chaos.report import markdown, table
from tests.test_purity import FORBIDDEN, imported_roots

T0_MS = 1_700_000_000_000


def key(i: int) -> SigningKey:
    return SigningKey(blake2b(f"chaos checker key {i}".encode(), digest_size=32).digest())


class Log:
    """One origin's valid log."""

    def __init__(self, i: int) -> None:
        self.key = key(i)
        self.hlc = Hlc()
        self.entries: list[Entry] = []

    def add(self, body: Body, ms: int) -> Entry:
        prev = self.entries[-1].hash if self.entries else GENESIS
        e = make_entry(self.key, seq=len(self.entries) + 1, hlc=self.hlc.now(T0_MS + ms), prev=prev, body=body)
        self.entries.append(e)
        return e


class World:
    """Two nodes' logs with crossing orders; node views that match the reference."""

    def __init__(self) -> None:
        a, b = Log(1), Log(2)
        self.logs = {"n1": a, "n2": b}
        self.sell = a.add(Order(side=SELL, price=100, qty=5, tif=GTC), 1)
        self.sell2 = a.add(Order(side=SELL, price=101, qty=3, tif=GTC), 2)
        self.buy = b.add(Order(side=BUY, price=101, qty=6, tif=GTC), 3)  # 5@100, 1@101
        self.rest = b.add(Order(side=BUY, price=90, qty=4, tif=GTC), 4)
        self.cancel = b.add(Cancel(order_id=self.rest.hash), 5)
        self.ioc = b.add(Order(side=BUY, price=101, qty=1, tif=IOC), 6)  # 1@101
        self.entries = a.entries + b.entries
        ref = replay(self.entries)
        self.fills: tuple[ShownFill, ...] = tuple((*f, False) for f in ref.fills)
        self.bids, self.asks = ref.bids, ref.asks

    def vv(self) -> dict[str, int]:
        return {log.key.public.hex(): len(log.entries) for log in self.logs.values()}

    def acks(self) -> list[Ack]:
        return [
            Ack(t0=1.0, t1=1.1, node="n1", op="order", order_id=self.sell.hash.hex(), side="sell", qty=5,
                price=100, tif="GTC", status="open", filled=0, remaining=5),
            Ack(t0=1.2, t1=1.3, node="n1", op="order", order_id=self.sell2.hash.hex(), side="sell", qty=3,
                price=101, tif="GTC", status="open", filled=0, remaining=3),
            Ack(t0=1.4, t1=1.5, node="n2", op="order", order_id=self.buy.hash.hex(), side="buy", qty=6,
                price=101, tif="GTC", status="filled", filled=6, remaining=0, fills=self.fills[:2]),
            Ack(t0=1.6, t1=1.7, node="n2", op="order", order_id=self.rest.hash.hex(), side="buy", qty=4,
                price=90, tif="GTC", status="open", filled=0, remaining=4),
            Ack(t0=1.8, t1=1.9, node="n2", op="cancel", order_id=self.rest.hash.hex(), status="cancelled",
                filled=0, remaining=0),
        ]

    def state(self, node: str, rec: Recorder, **changes: Any) -> NodeState:
        fills = changes.pop("fills", self.fills)
        base = NodeState(node=node, alive=True, state_hash="h1", version_vector=self.vv(), bids=self.bids,
                         asks=self.asks, fills=rec.fill_list(tuple(fills)))
        return dataclasses.replace(base, **changes)

    def history(self, *, acks: list[Ack] | None = None, nodes: dict[str, dict[str, Any]] | None = None,
                seen: list[FillSeen] | None = None, gone: list[FillGone] | None = None,
                final_totals: list[FinalTotal] | None = None, events: list[NodeEvent] | None = None,
                entries: list[Entry] | None = None, phases: list[Phase] | None = None) -> History:
        rec = Recorder({"seed": 1})
        rec.acks += acks if acks is not None else self.acks()
        rec.seen += seen or []
        rec.gone += gone or []
        rec.final_totals += final_totals or []
        rec.node_events += events or []
        states = tuple(self.state(name, rec, **(nodes or {}).get(name, {})) for name in ("n1", "n2"))
        served = self.entries if entries is None else entries
        rec.checks.append(Check(phase="isolate", t=10.0, t_heal=8.0, t_converged=8.5, nodes=states,
                                entries=tuple(encode_entry(e).hex() for e in served)))
        rec.phases += phases or [Phase(name="isolate", title="one node isolated", supported=True, t_start=0.0,
                                       t_fault=2.0, t_heal=8.0, t_end=10.0)]
        return rec.freeze()


def final(fills: tuple[ShownFill, ...], n: int) -> tuple[ShownFill, ...]:
    """The first ``n`` fills marked final, as a node with finality shows them."""
    return tuple((f[0], f[1], f[2], f[3], i < n) for i, f in enumerate(fills))


class TestCleanHistory:
    def test_a_consistent_world_has_no_violation(self) -> None:
        w = World()
        assert len(w.fills) == 3, w.fills
        v = check(w.history())
        row = v.rows[0]
        assert v.ok, v
        assert row.converged and row.converge_s == 0.5
        assert (row.orders_acked, row.cancels_acked, row.lost, row.overfills, row.replay_mismatches) == (4, 1, 0, 0, 0)
        assert row.revoked == 0 and row.revoked_max_ms is None

    def test_history_survives_json(self) -> None:
        w = World()
        h = w.history(seen=[FillSeen(t=2.0, node="n1", seq=0, fill=w.fills[0])])
        again = History.from_json(json.loads(h.dumps()))
        assert again == h
        assert check(again) == check(h)

    def test_the_rule_orders_by_stamp_then_hash_and_skips_heartbeats(self) -> None:
        w = World()
        shuffled = list(reversed(w.entries))
        assert counted_entries(shuffled) == sorted(w.entries, key=lambda e: (e.hlc, e.hash))


class TestTheCheckerFails:
    def test_lost_acknowledged_order(self) -> None:
        """n2 acknowledged an order that no node holds: its entry never reached anyone."""
        w = World()
        ghost = Log(3).add(Order(side=SELL, price=120, qty=1, tif=GTC), 7)
        acks = [*w.acks(), Ack(t0=2.0, t1=2.1, node="n2", op="order", order_id=ghost.hash.hex(), side="sell",
                                qty=1, price=120, tif="GTC", status="open", filled=0, remaining=1)]
        v = check(w.history(acks=acks))
        assert not v.ok
        assert v.rows[0].lost == 1
        assert "order " + ghost.hash.hex()[:16] in v.rows[0].examples["lost"][0]

    def test_lost_order_behind_one_nodes_version_vector(self) -> None:
        w = World()
        vv = w.vv()
        vv[w.logs["n2"].key.public.hex()] -= 3  # n2 lost its last three entries (buy@90, cancel, IOC)
        v = check(w.history(nodes={"n2": {"version_vector": vv, "state_hash": "h2"}}))
        assert v.rows[0].lost == 1  # the buy@90 was acknowledged; the IOC never was
        assert not v.rows[0].converged

    def test_order_answered_404(self) -> None:
        w = World()
        oid = w.sell.hash.hex()
        v = check(w.history(nodes={"n1": {"orders": {oid: None}}}))
        assert v.rows[0].lost == 1 and not v.ok

    def test_void_order_is_not_lost_but_is_a_violation(self) -> None:
        """An acknowledged order an eviction voided: no node matches it (nor need
        hold it), and one says so.  It counts as voided, not lost, and that is a
        violation: a node answers only once a majority certified the order."""
        w = World()
        ghost = Log(3).add(Order(side=SELL, price=120, qty=1, tif=GTC), 7)
        acks = [*w.acks(), Ack(t0=2.0, t1=2.1, node="n2", op="order", order_id=ghost.hash.hex(), side="sell",
                                qty=1, price=120, tif="GTC", status="open", filled=0, remaining=1)]
        v = check(w.history(acks=acks, nodes={"n1": {"orders": {ghost.hash.hex(): {"status": "void"}}}}))
        assert v.rows[0].lost == 0 and v.rows[0].void == 1 and not v.ok and v.rows[0].violations == 1

    def test_final_fill_changed_at_the_same_seq(self) -> None:
        w = World()
        f0 = final(w.fills, 1)[0]
        other: ShownFill = (f0[0], f0[1], f0[2], f0[3] + 1, True)
        seen = [FillSeen(t=3.0, node="n1", seq=0, fill=f0), FillSeen(t=4.0, node="n1", seq=0, fill=other)]
        v = check(w.history(seen=seen, nodes={n: {"fills": final(w.fills, 1)} for n in ("n1", "n2")}))
        assert v.rows[0].final_retracted == 2  # f0 gave way to another fill, which gave way to f0 again
        assert not v.ok

    def test_final_fill_gone_from_the_list(self) -> None:
        """n1 showed two final fills during the run; at the check it shows one."""
        w = World()
        shown = final(w.fills, 2)
        seen = [FillSeen(t=3.0, node="n1", seq=0, fill=shown[0]), FillSeen(t=3.0, node="n1", seq=1, fill=shown[1])]
        nodes = {n: {"fills": final(w.fills, 1)} for n in ("n1", "n2")}
        v = check(w.history(seen=seen, nodes=nodes))
        assert v.rows[0].final_retracted == 1
        assert "final #1" in v.rows[0].examples["final_retracted"][0]
        assert not v.ok

    def test_final_count_going_down(self) -> None:
        w = World()
        shown = final(w.fills, 2)
        seen = [FillSeen(t=3.0, node="n2", seq=i, fill=shown[i]) for i in range(2)]
        v = check(w.history(seen=seen, final_totals=[FinalTotal(t=4.0, node="n2", total=0)],
                            nodes={n: {"fills": shown} for n in ("n1", "n2")}))
        assert v.rows[0].final_retracted == 2

    def test_final_fills_that_stay_are_fine(self) -> None:
        w = World()
        shown = final(w.fills, 2)
        seen = [FillSeen(t=3.0, node="n1", seq=i, fill=shown[i]) for i in range(2)]
        v = check(w.history(seen=seen, nodes={n: {"fills": final(w.fills, 3)} for n in ("n1", "n2")}))
        assert v.ok and v.rows[0].final_fills == 3

    def test_over_fill(self) -> None:
        w = World()
        t, m, p, q, fin = w.fills[0]
        fills = ((t, m, p, q + 10, fin), *w.fills[1:])
        v = check(w.history(nodes={n: {"fills": fills} for n in ("n1", "n2")}))
        assert v.rows[0].overfills == 2  # the taker and the maker
        assert v.rows[0].replay_mismatches > 0
        assert not v.ok

    def test_replay_mismatch_when_a_node_skips_a_cancel(self) -> None:
        """A book that still holds the cancelled order is not what the replay makes."""
        w = World()
        bids = tuple(sorted(((90, 4, 1), *w.bids), reverse=True))
        v = check(w.history(nodes={n: {"bids": bids} for n in ("n1", "n2")}))
        assert v.rows[0].replay_mismatches == 1
        assert v.rows[0].converged

    def test_fills_in_another_order(self) -> None:
        w = World()
        fills = (w.fills[1], w.fills[0], *w.fills[2:])
        v = check(w.history(nodes={n: {"fills": fills} for n in ("n1", "n2")}))
        assert v.rows[0].replay_mismatches == 1

    def test_final_cancel_later_filled(self) -> None:
        w = World()
        acks = w.acks()
        acks[-1] = dataclasses.replace(acks[-1], final=True)
        fills = (*w.fills, (w.ioc.hash.hex(), w.rest.hash.hex(), 90, 1, False))
        v = check(w.history(acks=acks, nodes={n: {"fills": fills} for n in ("n1", "n2")}))
        assert v.rows[0].cancel_violations == 1 and v.rows[0].cancels_final == 1
        assert not v.ok

    def test_provisional_cancel_overtaken_is_allowed(self) -> None:
        w = World()
        fills = (*w.fills, (w.ioc.hash.hex(), w.rest.hash.hex(), 90, 1, False))
        row = check(w.history(nodes={n: {"fills": fills} for n in ("n1", "n2")})).rows[0]
        assert row.cancel_violations == 0 and row.cancels_overtaken == 1

    def test_replicas_that_differ(self) -> None:
        w = World()
        v = check(w.history(nodes={"n2": {"state_hash": "h2", "fills": w.fills[:2]}}))
        assert not v.rows[0].converged and v.rows[0].converge_s is None
        assert not v.ok

    def test_a_node_that_did_not_answer(self) -> None:
        w = World()
        v = check(w.history(nodes={"n2": {"error": "GET /v1/status: timeout"}}))
        assert not v.rows[0].converged

    def test_crash_and_tracebacks(self) -> None:
        w = World()
        events = [NodeEvent(t=5.0, node="n1", kind="exit", detail="status 1, unasked", expected=False),
                  NodeEvent(t=6.0, node="n2", kind="kill", detail="SIGKILL")]
        v = check(w.history(events=events, nodes={"n1": {"tracebacks": ("KeyError: 'x'",)}}))
        assert (v.rows[0].crashes, v.rows[0].tracebacks) == (1, 1)
        assert v.violations == 2

    def test_two_entries_for_one_seq(self) -> None:
        w = World()
        forged = make_entry(w.logs["n1"].key, seq=1, hlc=w.sell.hlc, prev=GENESIS,
                            body=Order(side=SELL, price=100, qty=6, tif=GTC))
        v = check(w.history(entries=[*w.entries, forged]))
        assert v.entry_conflicts == 1 and not v.ok


class TestRevokedFills:
    def test_a_provisional_fill_that_went_away(self) -> None:
        w = World()
        ghost: ShownFill = (w.buy.hash.hex(), w.sell2.hash.hex(), 101, 2, False)
        acks = w.acks()
        acks[2] = dataclasses.replace(acks[2], fills=(*w.fills[:1], ghost))
        v = check(w.history(acks=acks, gone=[FillGone(t=3.5, node="n2", fill=ghost[:4])]))
        row = v.rows[0]
        assert row.revoked == 1 and row.revoked_max_ms == 2000 and row.revoked_p50_ms == 2000
        assert v.ok  # provisional fills may change: information, not a violation


class TestUnsupported:
    def test_an_unsupported_nemesis_is_a_row_of_n_a(self) -> None:
        w = World()
        phases = [Phase(name="isolate", title="one node isolated", supported=True, t_fault=2.0, t_heal=8.0,
                        t_end=10.0),
                  Phase(name="skew", title="skewed clocks", supported=False, note="not supported by this node")]
        v = check(w.history(phases=phases))
        assert [r.supported for r in v.rows] == [True, False]
        assert v.rows[1].violations == 0
        text = table(v)
        assert "not supported by this node" in text and "| n/a |" in text
        assert "no violations" in markdown(v, {"seed": 1})


class TestLogs:
    def test_tracebacks_are_found_with_their_exception_line(self) -> None:
        text = ("2024-01-01 10:00:00,000 n1 ERROR p2pex.node: pull round failed\n"
                "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
                "ValueError: bad thing\n2024-01-01 10:00:01,000 n1 INFO p2pex.node: fine\n")
        assert tracebacks_in(text) == ["ValueError: bad thing"]
        assert tracebacks_in("all quiet\n") == []


class TestCommandLine:
    def test_check_a_recorded_history_with_a_lost_order_and_a_retracted_final_fill(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``python -m tests.chaos --check``: the saved history of a bad run exits 1."""
        w = World()
        ghost = Log(3).add(Order(side=SELL, price=120, qty=1, tif=GTC), 7)
        acks = [*w.acks(), Ack(t0=2.0, t1=2.1, node="n1", op="order", order_id=ghost.hash.hex(), side="sell",
                                qty=1, price=120, tif="GTC", status="open", filled=0, remaining=1)]
        shown = final(w.fills, 2)
        seen = [FillSeen(t=3.0, node="n2", seq=i, fill=shown[i]) for i in range(2)]
        history = w.history(acks=acks, seen=seen, nodes={n: {"fills": final(w.fills, 1)} for n in ("n1", "n2")})
        path = tmp_path / "chaos-history.json"
        path.write_text(history.dumps())
        assert main(["--check", str(path), "--out", str(tmp_path)]) == 1
        printed = capsys.readouterr().out
        row = next(line for line in printed.splitlines() if line.startswith("| isolate "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == "**1**" and cells[9] == "**1**", cells  # lost, final retracted
        assert "2 VIOLATION(S)" in printed
        report = json.loads((tmp_path / "chaos-report.json").read_text())
        assert report["ok"] is False and report["rows"][0]["lost"] == 1 and report["rows"][0]["final_retracted"] == 1
        assert "lost" in (tmp_path / "chaos-report.md").read_text()


class TestCheckerIsPure:
    def test_checker_replay_and_history_reach_for_no_io_clock_or_randomness(self) -> None:
        """The judgement is a function of the history alone (the report module writes files; these do not)."""
        for name in ("checker", "replay", "history"):
            path = Path(__file__).resolve().parent / f"{name}.py"
            bad = imported_roots(path) & (FORBIDDEN | {"__import__"})
            assert not bad, f"{name}.py imports {sorted(bad)}"
