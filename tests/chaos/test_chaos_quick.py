"""The 60-second chaos run of ``make test``: 5 real nodes in network
namespaces under one node isolated, kill -9 with restart, and SIGSTOP /
SIGCONT (12 s each), judged by the checker; no violation may appear.  The
table is printed either way.  Skipped, with the reason, where the machine
allows no namespaces or has no iptables.  ``make chaos`` runs every nemesis.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.nemesis import QUICK
from tests.chaos.netlab import capabilities
from tests.chaos.report import markdown
from tests.chaos.runner import Options, run_suite, summary
from tests.nodes import report, tail


class TestQuickChaos:
    def test_isolation_kill_and_pause_break_nothing(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        reason = capabilities().reason
        if reason:
            pytest.skip(reason)
        out = tmp_path / "chaos"
        outcome = run_suite(Options(nemeses=QUICK, warm_s=2.0, converge_timeout_s=30.0, out=out,
                                    echo=lambda line: None))
        report(request, "\n" + summary(outcome))
        verdict = outcome.verdict
        logs = "\n".join(f"--- {p.name} ---\n{tail(p, 30)}" for p in sorted((out / "nodes").glob("*.log")))
        assert verdict.ok, markdown(verdict, {}) + "\n" + logs
        assert [r.name for r in verdict.rows] == [name for name, _ in QUICK]
        for row in verdict.rows:
            assert row.supported and row.converged, row
            assert row.orders_acked > 50, row
        assert outcome.seconds < 180, outcome.timings
