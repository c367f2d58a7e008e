"""`python cli.py demo` end to end: real node processes on 127.0.0.1, real
traders, the summary's verdict, the logs, and no process left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("seed1", "seed2", "exchange1", "exchange2", "trader1", "trader2")


def _ctrl_c_as_in_a_terminal() -> None:
    """In the demo's process, before it starts: Ctrl-C (SIGINT) does what it
    does for a command typed in a terminal.  A process started in the
    background of a shell without job control inherits SIGINT ignored (POSIX),
    and so do its children: the suite run that way saw the demo ignore the
    test's Ctrl-C and time out."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo(logs: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PEX_")}
    return subprocess.Popen(
        [sys.executable, "cli.py", "demo", "--seconds", "4", "--rate", "8", "--logs", str(logs), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )


def procs_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line mentions ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def wait_gone(text: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    left = procs_mentioning(text)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = procs_mentioning(text)
    return left


def kill_demo(demo: subprocess.Popen[str], logs: Path) -> None:
    """A demo that did not finish: kill it and the nodes it started (their command
    lines name this test's own log directory), so that a failure leaves nothing
    running to load the tests after it."""
    if demo.poll() is None:
        demo.kill()
        demo.wait(timeout=10)
        for pid in procs_mentioning(str(logs)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class TestDemo:
    def test_two_demos_side_by_side_converge_with_fills(self, tmp_path: Path) -> None:
        logs = [tmp_path / "a" / "logs", tmp_path / "b" / "logs"]
        demos = [start_demo(d) for d in logs]
        outs = []
        try:
            for d in demos:
                out, _ = d.communicate(timeout=150)
                outs.append(out)
        finally:
            for d, log_dir in zip(demos, logs, strict=True):
                kill_demo(d, log_dir)
        for d, out, log_dir in zip(demos, outs, logs, strict=True):
            assert d.returncode == 0, out
            lines = out.strip().splitlines()
            assert lines[-1] == "converged", out
            assert any(line.startswith("[") and " orders " in line for line in lines), "no live progress"
            cluster = re.search(r"cluster: (\d+) orders, (\d+) cancels, (\d+) fills", out)
            assert cluster, out
            assert int(cluster.group(1)) > 0 and int(cluster.group(3)) > 0, out
            assert re.search(r"replication latency.*p50 \d+ ms, p99 \d+ ms", out), out
            for role in ROLES:  # seeds and exchanges are the members, traders participants
                kind = "participant" if role.startswith("trader") else "member"
                assert re.search(rf"^{role}\s+{kind}\s+[0-9a-f]{{8}}\s", out, re.M), f"no {kind} row for {role}"
                assert (log_dir / f"{role}.log").stat().st_size > 0
            assert not wait_gone(str(log_dir)), "node processes left running"

    def test_ctrl_c_stops_every_node(self, tmp_path: Path) -> None:
        logs = tmp_path / "logs"
        demo = start_demo(logs, "--seconds", "60")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(procs_mentioning(str(logs))) < len(ROLES):
                time.sleep(0.2)
            assert len(procs_mentioning(str(logs))) >= len(ROLES), "the demo did not start its nodes"
            time.sleep(2.0)
            demo.send_signal(signal.SIGINT)
            out, _ = demo.communicate(timeout=30)
        finally:
            kill_demo(demo, logs)
        assert demo.returncode != 0
        assert "stopping every node" in out, out
        assert not wait_gone(str(logs)), "node processes left running after Ctrl-C"

    def test_a_node_that_exits_is_named_with_the_last_lines_of_its_log(self, tmp_path: Path) -> None:
        """A node that exits during the demo ends it, and the error quotes the
        node's last log lines (a node once exited with status 1 in a CI run
        and the error said only "see trader2.log", a file the run threw away)."""
        logs = tmp_path / "logs"
        demo = start_demo(logs, "--seconds", "60")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pids = procs_mentioning(str(logs / "trader1.log"))
                if pids and (logs / "trader1.log").exists() and "serving" in (logs / "trader1.log").read_text():
                    break
                time.sleep(0.2)
            pids = procs_mentioning(str(logs / "trader1.log"))
            assert len(pids) == 1, "the demo did not start trader1"
            os.kill(pids[0], signal.SIGTERM)
            out, _ = demo.communicate(timeout=60)
        finally:
            kill_demo(demo, logs)
        assert demo.returncode == 1, out
        assert "error: trader1 exited with status 0" in out, out
        quoted = out.split("its last lines:", 1)[1].split("logs are in", 1)[0]
        assert "trader1: stopped in" in quoted, out  # the node's own last words, from its log
        assert not wait_gone(str(logs)), "node processes left running"
