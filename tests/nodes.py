"""The pytest side of the real-process harness: the harness itself is
``net.localnet`` (processes, ports, HTTP, bounded waits), which the
benchmarks use too; this module re-exports it for the tests and adds what
needs pytest (figures written past output capture, node logs after a failed
test)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import pytest

from net.localnet import (
    CLI,
    CONVERGE_TIMEOUT,
    HOST,
    HTTP_TIMEOUT,
    POLL,
    ROOT,
    NodeProc,
    Outcome,
    Reply,
    all_final,
    all_logs,
    cancel_leftovers,
    cli_json,
    cluster,
    finality,
    free_port,
    get_json,
    http,
    make_nodes,
    order_at,
    restart_stopped,
    run_cli,
    start_network,
    stop_all,
    tail,
    wait_converged,
    wait_full_mesh,
    wait_order_everywhere,
    wait_until,
    write_history,
)

__all__ = [
    "CLI", "CONVERGE_TIMEOUT", "HOST", "HTTP_TIMEOUT", "POLL", "ROOT", "NodeProc", "Outcome", "Reply", "all_final",
    "all_logs", "cancel_leftovers", "cli_json", "cluster", "finality", "free_port", "get_json", "http",
    "logs_on_failure", "make_nodes", "order_at", "report", "restart_stopped", "run_cli", "start_network",
    "stop_all", "tail", "wait_converged", "wait_full_mesh", "wait_order_everywhere", "wait_until", "write_history",
]


# ---- pytest glue ------------------------------------------------------------------------


def report(request: pytest.FixtureRequest, text: str) -> None:
    """Write past output capture (measured figures, logs of a failed test)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        print(text, flush=True)


@contextlib.contextmanager
def logs_on_failure(request: pytest.FixtureRequest, nodes: Iterable[NodeProc]) -> Iterator[None]:
    """Around a test: if it failed, print the tail of the node logs."""
    before = request.session.testsfailed
    yield
    if request.session.testsfailed > before:
        report(request, f"\n===== node logs after {request.node.nodeid} =====\n" + all_logs(nodes))
