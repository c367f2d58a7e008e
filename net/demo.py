"""`make demo`: a local exchange network in separate OS processes.

Owns starting 2 seed nodes and N exchange nodes (the members, which certify
orders and move finality) and N trader nodes (participants) on free
127.0.0.1 ports, driving the traders, live progress, the activity summary
(every figure read from the nodes' own HTTP APIs through ``client.Client``;
the per-node rows as a rich table) and stopping every process it started, by
pid, also on Ctrl-C or when a process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import Client, ClientError
from client.tables import row, show, table
from net.logs import last_lines
from net.ports import free_port, percentile
from net.trader import TradeStats, trade

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
MESH_TIMEOUT_S = 20.0
QUIESCE_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 3.0
LAST_LINES = 5  # of a node's log, quoted when it exits during the demo


class DemoError(Exception):
    """The demo could not run; the message says why."""


@dataclass(slots=True, kw_only=True)
class Proc:
    name: str
    role: str  # seed, exchange or trader
    port: int
    data_dir: Path
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    status: dict[str, Any] = field(default_factory=dict)  # the last /v1/status reply, {} if none
    client: Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    seconds: float = 30.0
    traders: int = 2
    exchanges: int = 2
    seeds: int = 2
    rate: float = 10.0
    seed: int = 42
    logs: Path = Path("logs")
    keep_data: bool = False


def run_demo(opts: DemoOptions) -> int:
    """Run the demo; the exit status: 0 converged, 1 diverged or failed, 2 bad options."""
    if opts.seconds <= 0 or opts.rate <= 0:
        print("error: --seconds and --rate must be positive", file=sys.stderr)
        return 2
    if opts.traders < 1 or opts.exchanges < 1 or opts.seeds < 1:
        print("error: need at least one seed, one exchange and one trader", file=sys.stderr)
        return 2
    demo = Demo(opts)
    try:
        return asyncio.run(demo.run())
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every node", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"logs are in {demo.log_dir}/", file=sys.stderr)
        return 1
    finally:
        demo.stop_all()


class Demo:
    def __init__(self, opts: DemoOptions) -> None:
        self.args = opts
        self.log_dir = opts.logs.resolve()
        self.data_root = Path(tempfile.mkdtemp(prefix="p2pex-demo-"))
        self.procs: list[Proc] = []

    # ---- processes ------------------------------------------------------------

    def plan(self) -> None:
        taken: set[int] = set()
        for role, count in (("seed", self.args.seeds), ("exchange", self.args.exchanges),
                            ("trader", self.args.traders)):
            for i in range(1, count + 1):
                name = f"{role}{i}"
                self.procs.append(Proc(
                    name=name, role=role, port=self._free_port(taken), data_dir=self.data_root / name,
                    log_path=self.log_dir / f"{name}.log"))

    @staticmethod
    def _free_port(taken: set[int]) -> int:
        try:
            return free_port(taken)
        except OSError as exc:
            raise DemoError(str(exc)) from None

    def start(self, proc: Proc, bootstrap: list[Proc]) -> None:
        cmd = [sys.executable, str(ROOT / "cli.py"), "node", "--host", "127.0.0.1",
               "--port", str(proc.port), "--data-dir", str(proc.data_dir), "--name", proc.name,
               "--log-file", str(proc.log_path)]
        for b in bootstrap:
            cmd += ["--bootstrap", f"127.0.0.1:{b.port}"]
        if proc.role == "seed":
            cmd.append("--seed")
        if proc.role in ("seed", "exchange"):  # the committee (however large asked for); traders are participants
            cmd += ["--member", "--max-members", str(max(7, self.args.seeds + self.args.exchanges))]
        proc.log_path.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PEX_")}
        # stderr goes to the log as well: a traceback that escapes the node's
        # logging (a crash on the way out) would otherwise be lost
        with open(proc.log_path, "ab") as stderr:
            proc.popen = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is not None:
                last = last_lines(p.log_path, LAST_LINES)
                said = "".join(f"\n  {line}" for line in last)
                raise DemoError(f"{p.name} exited with status {p.popen.returncode}; see {p.log_path}"
                                + (f"; its last lines:{said}" if said else ""))

    def stop_all(self) -> None:
        """SIGTERM every node we started (by pid), then SIGKILL what is left."""
        running = [p.popen for p in self.procs if p.popen is not None and p.popen.poll() is None]
        for pop in running:
            with contextlib.suppress(ProcessLookupError):
                pop.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for pop in running:
            try:
                pop.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    pop.kill()
                pop.wait(timeout=5.0)
        if not self.args.keep_data:
            shutil.rmtree(self.data_root, ignore_errors=True)

    # ---- HTTP -------------------------------------------------------------------

    @staticmethod
    def client(proc: Proc) -> Client:
        if proc.client is None:
            proc.client = Client(proc.url, timeout=HTTP_TIMEOUT_S, read_attempts=1)
        return proc.client

    async def close_clients(self) -> None:
        for p in self.procs:
            if p.client is not None:
                await p.client.close()

    async def poll_status(self) -> None:
        async def one(p: Proc) -> None:
            try:
                p.status = dict((await self.client(p).status()).raw)
            except ClientError:
                p.status = {}
        await asyncio.gather(*(one(p) for p in self.procs))

    async def wait_until(self, what: str, timeout: float, check: Any) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self.check_alive()
            await self.poll_status()
            if check():
                return time.monotonic() - start
            await asyncio.sleep(0.1)
        raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")

    # ---- the run ----------------------------------------------------------------

    async def run(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.plan()
        seeds = [p for p in self.procs if p.role == "seed"]
        others = [p for p in self.procs if p.role != "seed"]
        traders = [p for p in self.procs if p.role == "trader"]
        print(f"starting {len(seeds)} seeds, {self.args.exchanges} exchanges, {len(traders)} traders "
              f"on 127.0.0.1; logs in {self.log_dir}/", flush=True)
        self.start(seeds[0], [])
        for s in seeds[1:]:
            self.start(s, [seeds[0]])
        for p in others:
            self.start(p, seeds)
        try:
            n = len(self.procs)
            t_ready = await self.wait_until("every node to be ready (/v1/status)", READY_TIMEOUT_S,
                                            lambda: all(p.status.get("ready") for p in self.procs))
            t_mesh = await self.wait_until(
                "every node to know every other", MESH_TIMEOUT_S,
                lambda: all(sum(1 for q in p.status["peers"] if q["state"] == "up") >= n - 1
                            for p in self.procs))
            print(f"{n} nodes ready in {t_ready:.1f} s, full mesh after {t_mesh:.1f} s more", flush=True)
            stats = await self.trade(traders)
            t_last = time.monotonic()
            print("traders stopped; waiting for every node to hold the same state", flush=True)
            converged = True
            try:
                t_conv = await self.wait_until("convergence", QUIESCE_TIMEOUT_S, self.converged)
            except DemoError:
                converged, t_conv = False, time.monotonic() - t_last
            books = {p.name: str((await self.client(p).status(verify=True)).book_hash) for p in self.procs}
            same_books = len(set(books.values())) == 1
            latencies: list[int] = []
            finals: list[int] = []
            for p in self.procs:
                with contextlib.suppress(ClientError):
                    got = await self.client(p).latency()
                    latencies += got.samples
                    finals += got.final_samples
            self.summary(stats, converged and same_books, t_conv, latencies, finals, books)
        except ClientError as exc:
            raise DemoError(f"a node did not answer: {exc}") from None
        finally:
            await self.close_clients()
        return 0 if converged and same_books else 1

    def converged(self) -> bool:
        """Every node holds the same entries, and has made all of them final
        (so the same fills are final everywhere)."""
        sts = [p.status for p in self.procs]
        hashes = {s.get("state_hash") for s in sts}
        return (len(hashes) == 1 and None not in hashes
                and not any(s["finality"]["pending"] for s in sts)
                and len({s["counts"]["final_fills"] for s in sts}) == 1)

    async def trade(self, traders: list[Proc]) -> list[TradeStats]:
        tokens = [(p.data_dir / ".cookie").read_text().strip() for p in traders]
        tasks = [
            asyncio.create_task(trade(p.url, tok, rate=self.args.rate, seconds=self.args.seconds,
                                      seed=self.args.seed + i, mid=10_000))
            for i, (p, tok) in enumerate(zip(traders, tokens, strict=True))
        ]
        start = time.monotonic()
        try:
            while not all(t.done() for t in tasks):
                await asyncio.sleep(1.0)
                self.check_alive()
                await self.poll_status()
                self.progress(time.monotonic() - start)
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def progress(self, elapsed: float) -> None:
        sts = [p.status for p in self.procs if p.status]
        if not sts:
            return
        entries = [s["counts"]["entries"] for s in sts]
        orders = sum(s["counts"]["own_orders"] for s in sts)
        fills = max(s["counts"]["fills"] for s in sts)
        final = min(s["counts"]["final_fills"] for s in sts)
        lag = max(s["finality"]["lag_ms"] for s in sts)
        print(f"[{elapsed:5.1f} s] orders {orders:6d}  fills {fills:6d}  final {final:6d}  "
              f"entries {max(entries):6d}  lag {max(entries) - min(entries):4d} entries, "
              f"finality {lag / 1000:.1f} s behind", flush=True)

    def summary(
        self, stats: list[TradeStats], converged: bool, t_conv: float, latencies: list[int],
        finals: list[int], books: dict[str, str],
    ) -> None:
        secs = self.args.seconds
        print()
        print("activity summary (from each node's /v1/status)", flush=True)
        rows = table("node", "role", "id", ("entries", "right"), ("orders", "right"), ("cancels", "right"),
                     ("fills", "right"), ("final", "right"), ("revoked", "right"), ("resting", "right"),
                     ("peers", "right"), "state hash")
        for p in self.procs:
            s = p.status
            if not s:
                row(rows, p.name, "", "(no answer)", *[""] * 9)
                continue
            c = s["counts"]
            up = sum(1 for q in s["peers"] if q["state"] == "up")
            row(rows, p.name, s["finality"]["role"], s["short_id"], c["own_entries"], c["own_orders"],
                c["own_cancels"], c["fills"], c["final_fills"], s["replication"]["revoked_fills"], c["resting"],
                f"{up}/{len(s['peers'])}", s["state_hash"][:16])
        show(rows)
        sts = [p.status for p in self.procs if p.status]
        ref = max(sts, key=lambda s: s["counts"]["entries"])["counts"]
        orders = sum(s["counts"]["own_orders"] for s in sts)
        cancels = sum(s["counts"]["own_cancels"] for s in sts)
        print()
        print(f"cluster: {orders} orders, {cancels} cancels, {ref['fills']} fills, {ref['traded_qty']} lots "
              f"traded, {ref['resting']} resting, {ref['entries']} entries")
        sent = sum(st.submitted for st in stats)
        errors = sum(st.errors for st in stats)
        print(f"traders: {sent} orders submitted, {sum(st.cancels for st in stats)} cancels, "
              f"{errors} errors; throughput {sent / secs:.1f} orders/s, {ref['fills'] / secs:.1f} fills/s")
        if latencies:
            lat = sorted(latencies)
            p50, p99 = percentile(lat, 50), percentile(lat, 99)
            print(f"replication latency, acceptance to visibility at every other node: p50 {p50} ms, "
                  f"p99 {p99} ms ({len(lat)} samples)")
        if finals:
            fin = sorted(finals)
            print(f"time to final, acceptance to final at every node: p50 {percentile(fin, 50)} ms, "
                  f"p99 {percentile(fin, 99)} ms ({len(fin)} samples)")
        revoked = sum(s["replication"]["revoked_fills"] for s in sts)
        print(f"finality: {ref['final_fills']} of {ref['fills']} fills final; {revoked} provisional fills "
              f"revised before they became final (summed over nodes); no final fill ever changes")
        if converged:
            print(f"all {len(self.procs)} state hashes equal {sts[0]['state_hash'][:16]} "
                  f"{t_conv:.2f} s after the last order, every fill is final, and the final fills and "
                  f"books are equal too ({next(iter(books.values()))[:16]})")
            print(f"logs: {self.log_dir}/")
            print("converged")
        else:
            distinct = len({s.get("state_hash") for s in sts})
            print(f"{distinct} different state hashes and {len(set(books.values()))} different "
                  f"fill-and-book digests {t_conv:.1f} s after the last order")
            print(f"logs: {self.log_dir}/")
            print("DIVERGED")
