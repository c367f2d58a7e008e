"""The node processes of a chaos run, one per namespace.

Each node is ``python cli.py node`` started through ``ip netns exec`` (which
execs, so the pid is the node's own), in a session of its own so a Ctrl-C at
the terminal reaches only the runner, which then stops everything it
started.  Faults on processes are signals to that pid: SIGKILL, SIGSTOP and
SIGCONT; a restart runs the same command again on the same data dir.  Every
start, kill, pause and exit is recorded; an exit nobody asked for is
recorded as unexpected (a crash).  ``scan_logs`` reads what a node wrote to
its log and its stdout/stderr since the last scan and picks out tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.chaos.history import NodeEvent, Recorder
from tests.chaos.netlab import NetLab

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "cli.py"
PORT = 7001
STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 30.0

RUNNING, PAUSED, KILLED, STOPPED, CRASHED = "running", "paused", "killed", "stopped", "crashed"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFlags:
    """Optional node flags, and whether this node's ``cli.py node --help`` lists them."""

    evict_after: bool
    clock_offset: bool
    genesis: bool = False  # membership: one node founds the network


def node_flags() -> NodeFlags:
    out = subprocess.run([sys.executable, str(CLI), "node", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False).stdout
    return NodeFlags(evict_after="--evict-after" in out, clock_offset="--clock-offset-ms" in out,
                     genesis="--genesis" in out)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PEX_") and "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tracebacks_in(text: str) -> list[str]:
    """The exception line of each traceback in ``text`` (first 200 characters)."""
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last):" not in line:
            continue
        summary = "traceback (no exception line)"
        for later in lines[i + 1: i + 400]:
            if later and not later[0].isspace():
                summary = later.strip()
                break
        out.append(summary[:200])
    return out


ERROR_LINE = re.compile(r"^\S+ \S+ \S+ ERROR ")


class Node:
    def __init__(self, *, name: str, ns_argv: Callable[[list[str]], list[str]], ip: str, data_dir: Path,
                 log_dir: Path, bootstrap: str | None, extra: list[str], member: bool = True) -> None:
        self.name = name
        self.member = member  # started with --member (else a participant: docs/PARTICIPANTS.md)
        self.ns_argv = ns_argv
        self.ip = ip
        self.data_dir = data_dir
        self.log_file = log_dir / f"{name}.log"
        self.out_file = log_dir / f"{name}.out"
        self.bootstrap = bootstrap
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.state = STOPPED
        self.clock_offset_ms = 0
        self.starts = 0
        self._offsets = {self.log_file: 0, self.out_file: 0}

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{PORT}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def argv(self) -> list[str]:
        args = [sys.executable, str(CLI), "node", "--host", self.ip, "--port", str(PORT),
                "--data-dir", str(self.data_dir), "--name", self.name, "--log-file", str(self.log_file),
                *(["--member"] if self.member else [])]
        if self.bootstrap:
            args += ["--bootstrap", self.bootstrap]
        args += self.extra
        if self.clock_offset_ms:
            args += ["--clock-offset-ms", str(self.clock_offset_ms)]
        return self.ns_argv(args)

    def token(self) -> str:
        try:
            return (self.data_dir / ".cookie").read_text().strip()
        except OSError:
            return ""

    def live(self) -> bool:
        """Running and not paused: should answer requests."""
        return self.state == RUNNING


class Cluster:
    def __init__(self, lab: NetLab, *, data_root: Path, log_dir: Path, rec: Recorder, clock: Callable[[], float],
                 extra: list[str], genesis: bool = False, participants: frozenset[str] = frozenset()) -> None:
        self.lab = lab
        self.rec = rec
        self.clock = clock
        log_dir.mkdir(parents=True, exist_ok=True)
        names = list(lab.hosts)
        self.nodes: dict[str, Node] = {}
        for i, name in enumerate(names):
            boot = lab.hosts[names[1 if i == 0 else 0]].ip
            self.nodes[name] = Node(
                name=name, ns_argv=functools.partial(lab.exec_argv, name), ip=lab.hosts[name].ip,
                data_dir=data_root / name, log_dir=log_dir, bootstrap=f"{boot}:{PORT}",
                extra=[*extra, *(["--genesis"] if i == 0 and genesis else [])],  # the first node founds the network
                member=name not in participants)

    def _event(self, node: Node, kind: str, detail: str = "", *, expected: bool = True) -> None:
        self.rec.node_events.append(NodeEvent(t=round(self.clock(), 3), node=node.name, kind=kind, detail=detail,
                                              expected=expected))

    # ---- lifecycle ------------------------------------------------------------------

    def start(self, name: str, *, clock_offset_ms: int = 0) -> None:
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            raise RuntimeError(f"{name} is already running")
        node.clock_offset_ms = clock_offset_ms
        node.data_dir.mkdir(parents=True, exist_ok=True)
        argv = node.argv()
        with open(node.out_file, "ab") as out:
            out.write(f"--- start {node.starts + 1}: {' '.join(argv)}\n".encode())
            out.flush()
            node.proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        node.starts += 1
        node.state = RUNNING
        self._event(node, "start", f"pid {node.proc.pid}" + (f" clock {clock_offset_ms:+d} ms"
                                                              if clock_offset_ms else ""))

    def kill9(self, name: str) -> None:
        node = self.nodes[name]
        if node.proc is None or node.proc.poll() is not None:
            return
        node.state = KILLED
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(STOP_GRACE_S)
        self._event(node, "kill", "SIGKILL")

    def pause(self, name: str) -> None:
        node = self.nodes[name]
        if node.proc is None or node.proc.poll() is not None or node.state != RUNNING:
            return
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.state = PAUSED
        self._event(node, "pause", "SIGSTOP")

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.proc is None or node.proc.poll() is not None or node.state != PAUSED:
            return
        os.kill(node.proc.pid, signal.SIGCONT)
        node.state = RUNNING
        self._event(node, "resume", "SIGCONT")

    def stop(self, name: str) -> int | None:
        """SIGTERM (after SIGCONT: a stopped process cannot handle it), SIGKILL after a
        grace period; records the exit status (not 0 counts as a crash)."""
        node = self.nodes[name]
        proc = node.proc
        if proc is None:
            return None
        if proc.poll() is not None:
            return proc.returncode
        node.state = STOPPED
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGTERM)
        try:
            status = proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_GRACE_S)
            self._event(node, "exit", f"ignored SIGTERM for {STOP_GRACE_S:g} s; killed", expected=False)
            return proc.returncode
        self._event(node, "exit", f"status {status} after SIGTERM", expected=status == 0)
        return status

    def stop_all(self) -> None:
        for name in self.nodes:
            try:
                self.stop(name)
            except Exception as exc:  # keep stopping the others
                print(f"stopping {name}: {exc}", file=sys.stderr)

    def kill_all(self) -> None:
        """Safety net on the way out: nothing we started survives, whatever happened."""
        for node in self.nodes.values():
            proc = node.proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.wait(STOP_GRACE_S)

    def poll(self) -> list[str]:
        """Record nodes that exited on their own since the last poll; their names."""
        crashed = []
        for node in self.nodes.values():
            if node.proc is not None and node.state in (RUNNING, PAUSED) and node.proc.poll() is not None:
                node.state = CRASHED
                crashed.append(node.name)
                self._event(node, "exit", f"status {node.proc.returncode}, unasked", expected=False)
        return crashed

    def down(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.state in (KILLED, CRASHED, STOPPED)]

    def paused(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.state == PAUSED]

    async def wait_ready(self, session: aiohttp.ClientSession, name: str, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until the node's /readyz answers 200; raises on timeout or exit."""
        node = self.nodes[name]
        start = time.monotonic()
        for _ in range(int(timeout / 0.1) + 10):
            if node.proc is None or node.proc.poll() is not None:
                raise RuntimeError(f"{name} exited (status {node.proc and node.proc.returncode}) before ready")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(node.url + "/readyz", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                    if r.status == 200:
                        self._event(node, "ready", f"{time.monotonic() - start:.2f} s")
                        return time.monotonic() - start
            if time.monotonic() - start > timeout:
                break
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout:g} s")

    # ---- logs ----------------------------------------------------------------------------

    def scan_logs(self, name: str) -> tuple[list[str], int]:
        """New tracebacks (their exception lines) and new ERROR lines since the last scan."""
        node = self.nodes[name]
        tracebacks: list[str] = []
        errors = 0
        for path, offset in list(node._offsets.items()):
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            node._offsets[path] = offset + len(data)
            text = data.decode(errors="replace")
            tracebacks += tracebacks_in(text)
            errors += sum(1 for line in text.splitlines() if ERROR_LINE.match(line))
        return tracebacks, errors
