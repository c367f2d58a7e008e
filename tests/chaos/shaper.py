"""The link shaper: delay, jitter and reordering of packets held in netfilter queues.

``python -m tests.chaos.shaper NS ...`` binds queue ``netlab.QUEUE_NUM`` in
each named network namespace and gives every queued packet its verdict late:
``delay_ms`` (a uniform draw between the link's low and high bound, so the
spread is the jitter) after it arrived, plus ``reorder_ms`` more for a
``reorder`` share of packets, which the others then overtake.  A packet from
a sender with no settings is released at once.  iptables decides which
packets come here (``NetLab``: the receiver's ``NFQUEUE --queue-bypass`` rule,
so traffic flows unshaped if this process is gone); loss and duplication are
iptables rules too, not this process's work.

It reads commands on stdin, one JSON object a line, and answers each on
stdout: ``{"op": "set", "links": [{"ns", "src", "delay_ms": [lo, hi],
"reorder", "reorder_ms"}]}`` replaces the settings; ``{"op": "clear"}`` drops
them and releases every held packet now; ``{"op": "stats"}`` reports counts.
End of input or SIGTERM releases everything and exits.

``Shaper`` is the parent's handle on this process.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.chaos.netlab import QUEUE_NUM
from tests.chaos.nfqueue import NF_ACCEPT, Packet, Queue, open_queue

ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 10.0
MAX_HELD = 50_000  # beyond this, packets pass at once rather than pile up


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkShape:
    ns: str  # the receiving namespace
    src: str  # the sender's address
    delay_lo_ms: float
    delay_hi_ms: float
    reorder: float = 0.0
    reorder_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"ns": self.ns, "src": self.src, "delay_ms": [self.delay_lo_ms, self.delay_hi_ms],
                "reorder": self.reorder, "reorder_ms": self.reorder_ms}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> LinkShape:
        lo, hi = raw["delay_ms"]
        return LinkShape(ns=str(raw["ns"]), src=str(raw["src"]), delay_lo_ms=float(lo), delay_hi_ms=float(hi),
                         reorder=float(raw.get("reorder", 0.0)), reorder_ms=float(raw.get("reorder_ms", 0.0)))


class _Loop:
    """The shaper process's state: queues, settings, held packets."""

    def __init__(self, namespaces: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.queues: dict[str, Queue] = {}
        for ns in namespaces:
            self.queues[ns] = open_queue(ns, QUEUE_NUM)
        self.shapes: dict[tuple[str, str], LinkShape] = {}
        self.held: list[tuple[float, int, str, Packet]] = []
        self.order = itertools.count()
        self.stats = {"packets": 0, "delayed": 0, "reordered": 0, "passed": 0, "max_held": 0}
        self.stopping = False

    def on_packets(self, ns: str) -> None:
        queue = self.queues[ns]
        now = time.monotonic()
        for _ in range(64):  # bounded per wake-up; the selector calls again while data waits
            packets = queue.read()
            if not packets:
                return
            for p in packets:
                self.stats["packets"] += 1
                shape = self.shapes.get((ns, p.src or ""))
                if shape is None or len(self.held) >= MAX_HELD:
                    queue.verdict(p, NF_ACCEPT)
                    self.stats["passed"] += 1
                    continue
                delay = self.rng.uniform(shape.delay_lo_ms, shape.delay_hi_ms)
                if shape.reorder and self.rng.random() < shape.reorder:
                    delay += shape.reorder_ms
                    self.stats["reordered"] += 1
                heapq.heappush(self.held, (now + delay / 1000.0, next(self.order), ns, p))
                self.stats["delayed"] += 1
            self.stats["max_held"] = max(self.stats["max_held"], len(self.held))

    def release_due(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        while self.held and (everything or self.held[0][0] <= now):
            _, _, ns, p = heapq.heappop(self.held)
            self.queues[ns].verdict(p, NF_ACCEPT)

    def command(self, line: str) -> dict[str, Any]:
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "set":
                shapes = [LinkShape.from_json(raw) for raw in cmd.get("links", [])]
                unknown = sorted({s.ns for s in shapes} - set(self.queues))
                if unknown:
                    return {"ok": False, "error": f"no queue in {unknown}"}
                self.shapes = {(s.ns, s.src): s for s in shapes}
                return {"ok": True, "links": len(self.shapes)}
            if op == "clear":
                self.shapes = {}
                self.release_due(everything=True)
                return {"ok": True}
            if op == "stats":
                return {"ok": True, **self.stats, "held": len(self.held)}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return {"ok": False, "error": f"bad command: {exc}"}

    def close(self) -> None:
        self.release_due(everything=True)
        for q in self.queues.values():
            q.close()


def main(argv: list[str]) -> int:
    seed = int(os.environ.get("CHAOS_SHAPER_SEED", "1"))
    try:
        loop = _Loop(argv, seed)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return 1

    def stop(_sig: int, _frame: object) -> None:
        loop.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    sel = selectors.DefaultSelector()
    os.set_blocking(sys.stdin.fileno(), False)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    for ns, q in loop.queues.items():
        sel.register(q.fileno(), selectors.EVENT_READ, ns)
    print(json.dumps({"ok": True, "namespaces": len(loop.queues)}), flush=True)
    pending = b""
    try:
        while not loop.stopping:
            timeout = max(0.0, loop.held[0][0] - time.monotonic()) if loop.held else 0.5
            for key, _ in sel.select(min(timeout, 0.5)):
                if key.data != "stdin":
                    loop.on_packets(str(key.data))
                    continue
                chunk = os.read(sys.stdin.fileno(), 65536)
                if not chunk:
                    loop.stopping = True
                    break
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        print(json.dumps(loop.command(line.decode())), flush=True)
            loop.release_due()
    finally:
        loop.close()
    return 0


class Shaper:
    """The parent's handle: start the process, send commands, stop it by its pid."""

    def __init__(self, namespaces: list[str], *, log_path: Path, seed: int) -> None:
        self.namespaces = namespaces
        self.log_path = log_path
        self.seed = seed
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.shaper", *self.namespaces], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True,
            env={**os.environ, "CHAOS_SHAPER_SEED": str(self.seed), "PYTHONUNBUFFERED": "1"})
        hello = self._answer()
        if not hello.get("ok"):
            self.stop()
            raise OSError(f"the link shaper did not start: {hello.get('error')}")

    def _answer(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(COMMAND_TIMEOUT_S):
                return {"ok": False, "error": f"no answer in {COMMAND_TIMEOUT_S} s"}
        finally:
            sel.close()
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "error": f"exited with status {self.proc.wait(5)}"}
        answer: dict[str, Any] = json.loads(line)
        return answer

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None or self.proc.stdin is None:
            return {"ok": False, "error": "the link shaper is not running"}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def set_links(self, shapes: list[LinkShape]) -> None:
        answer = self.command({"op": "set", "links": [s.to_json() for s in shapes]})
        if not answer.get("ok"):
            raise OSError(f"link shaper: {answer.get('error')}")

    def clear(self) -> None:
        self.command({"op": "clear"})

    def stats(self) -> dict[str, Any]:
        return self.command({"op": "stats"})

    def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
