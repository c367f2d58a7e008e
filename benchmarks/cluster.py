"""Cluster load benchmark: how much order flow a 5-node cluster on 127.0.0.1
takes before replication falls behind.

What it measures
----------------
Five ``python cli.py node`` processes on free 127.0.0.1 ports (``net/localnet.py``;
the first founds the network, the other four join; the run starts once all
five are members).  An open-loop generator offers stepped rates (default 250,
500, 1000 and 2000 orders/s, ``--seconds`` each) spread evenly over the five
nodes through the client API (``POST /v1/orders``, ``DELETE /v1/orders/{id}``
with the node's bearer token; with ``--client ws`` the same requests as
messages on one trading session per node, ``GET /v1/trade``, each answer
timed from its message's due time like a reply): 70% GTC limit orders 1-20 ticks off the mid
that rest, 20% priced to cross (0-5 ticks through the mid), 10% cancels of
orders the same node accepted as resting (when it has none yet, a resting
order instead).  One line per rate:

- **offered/s, accepted/s**: requests sent and requests the node carried out
  (``201`` order, ``200`` cancel, or ``409 not_cancellable``: the order was
  filled before its cancel arrived, a correct answer and not a refusal,
  shown as ``late cancels``), both divided by the send window (the step's
  ``--seconds``, or longer if the generator fell behind);
- **errors by kind**: ``STATUS code`` of a refusal (``503 busy``, ``429
  rate_limited``, ...) or the exception's class (``TimeoutError``: no reply
  within the 10 s request timeout);
- **ack p50/p99**: client side, from the moment the request was *due*
  (t0 + i/rate, so a late generator does not hide queueing: no coordinated
  omission) to the reply, for the requests carried out; ``gen lag p99`` is how
  late the generator itself sent, to tell a slow client from a slow cluster;
- **visible-at-all p50/p99**: see below;
- **CPU per accepted order**: utime+stime of the five node processes
  (``/proc/PID/stat``, ``SC_CLK_TCK``) from just before the step until it has
  converged, in ms of CPU per accepted request (orders and cancels), so it
  includes replication, matching, finality and heartbeats caused by the step;
  ``client`` is this process's CPU over the step (it shares the machine);
- **converged**: seconds from the last reply of the step until every node
  shows the same state hash with nothing pending
  (``status()["finality"]["pending"]`` false), polled every 50 ms, at most
  60 s (``-`` if it did not happen).

Visible-at-all, and why it is an estimate with a proven upper bound
-------------------------------------------------------------------
The figure wanted is, per accepted order, the time until it is visible on all
five nodes: the max over the four other nodes of the delay to its merge there.
Polling ``GET /v1/orders/{id}`` on every node would be exact only to the
poll's round trip (which grows with load) and would add reads to the load it
measures, so no order is polled.  Instead every node keeps, for every entry of
another origin it merges, the delay from acceptance at the origin (the
entry's HLC, same wall clock on one machine) to the merge (``GET /v1/latency``
``samples``, a deque of the last 20,000; ``p2pex_replication_latency_seconds_count``
in ``/metrics`` counts every append, so the samples added during the step are
known exactly: the tail of the deque of that length).  They are read every few
seconds during the step (so the deque never wraps) and after convergence.
The four samples of one entry cannot be paired, so:

- ``p50``/``p99`` printed first are the percentiles of all nodes' samples of
  the step, the estimate (a per-node delay, so at most the true figure's);
- ``p99<=B`` is an upper bound that needs no pairing: an order visible at all
  nodes later than x has at least one sample above x, so if at most 1% of the
  N accepted orders and cancels have a sample above B (B = the
  (floor(N/100)+1)-th largest sample), at least 99% of them were visible at
  all five within B.  ``max_rate_p99_100ms`` uses this bound.

Caveats: the samples run from acceptance (before the SQLite commit and the
reply), not from the ack, so they overstate the wanted delay by the commit and
reply time; they also cover the cluster's own entries (heartbeats every 50 ms
while something is not final, acknowledgements), which make the estimate a
mix but only loosen the bound; a mid-step read of the count and of the
samples are two requests, so a few samples around each mid-step read can be
counted twice or skipped (the final read happens on a quiet cluster and
checks the count did not move).  The generator runs in this process on the
same 2 cores as the five nodes (and whatever else runs there), so at high
rates it competes with them: watch ``gen lag`` and ``client`` CPU.  The mix of
requests is seeded (``--seed``), but which resting order a cancel hits, and
whether it is still resting, depends on the replies.  Steps run back to back
on one cluster, so the book grows from step to step.

The last line is ``max_rate_p99_100ms=N``: the highest stepped rate whose
visible-at-all p99 bound is <= 100 ms and whose accepted/s is at least 95% of
the stepped rate (0 if none).

    .venv/bin/python benchmarks/cluster.py                      # 250, 500, 1000, 2000 orders/s, 15 s each
    .venv/bin/python benchmarks/cluster.py --quick              # 3 s at 250 and 500
    .venv/bin/python benchmarks/cluster.py --rates 100,300 --seconds 5 --seed 2
    .venv/bin/python benchmarks/cluster.py --rates 1000,2000 --seconds 8 --client ws
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from net.localnet import NodeProc, make_nodes, start_network, stop_all
from net.node import LATENCY_SAMPLES

NAMES = ("a", "b", "c", "d", "e")
MID = 1000
REQUEST_TIMEOUT = 10.0  # seconds, every request of the generator
READ_TIMEOUT = 10.0  # seconds, status and latency reads
CONVERGE_TIMEOUT = 60.0  # seconds after a step for the state hashes to agree
CONVERGE_POLL = 0.05
MAX_INFLIGHT = 20_000  # requests in flight at once; past it a request is skipped (and counted)
VISIBLE_LIMIT_MS = 100.0
MIN_ACCEPTED = 0.95
COUNT_METRIC = "p2pex_replication_latency_seconds_count"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (as in benchmarks/finality.py); NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def visible_bound(samples: list[float], orders: int, q: float) -> float:
    """The smallest B with at most ``(1 - q/100) * orders`` samples above it:
    then at least q% of ``orders`` entries (4 samples each, one per other
    node) were merged everywhere within B.  NaN without orders or samples."""
    if orders <= 0 or not samples:
        return float("nan")
    allowed = int((1 - q / 100) * orders)  # samples that may lie above B
    s = sorted(samples, reverse=True)
    return s[min(allowed, len(s) - 1)]


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on
    return int(fields[11]) + int(fields[12])  # the 14th and 15th


@dataclass
class Step:
    """What one rate step came to."""

    rate: float
    seconds: float
    sent: int = 0
    unsent: int = 0  # not sent: the generator fell too far behind
    orders: int = 0  # 201
    cancels: int = 0  # 200
    late_cancels: int = 0  # 409 not_cancellable: filled before the cancel arrived
    errors: Counter[str] = field(default_factory=Counter)
    ack_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    window_s: float = 0.0
    visible_ms: list[float] = field(default_factory=list)
    lost_samples: int = 0  # latency samples that left a node's deque before they were read
    cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    converged_s: float | None = None

    @property
    def accepted(self) -> int:
        return self.orders + self.cancels + self.late_cancels

    @property
    def offered_per_s(self) -> float:
        return self.sent / self.window_s if self.window_s else 0.0

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.window_s if self.window_s else 0.0

    @property
    def visible_p99_bound(self) -> float:
        return visible_bound(self.visible_ms, self.orders + self.cancels, 99)

    def passes(self) -> bool:
        bound = self.visible_p99_bound
        return bound == bound and bound <= VISIBLE_LIMIT_MS and self.accepted_per_s >= MIN_ACCEPTED * self.rate

    def line(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.most_common()) or "none"
        if self.unsent:
            errors += f"; {self.unsent} not sent (generator behind)"
        cpu_ms = self.cpu_s * 1000 / self.accepted if self.accepted else float("nan")
        lost = f", {self.lost_samples} lost" if self.lost_samples else ""
        conv = f"{self.converged_s:.2f} s" if self.converged_s is not None else f"- (not within {CONVERGE_TIMEOUT:g} s)"
        return (f"rate {self.rate:>6g}/s: offered {self.offered_per_s:7.1f}/s, accepted {self.accepted_per_s:7.1f}/s "
                f"({self.late_cancels} late cancels); errors: {errors} | ack p50 {percentile(self.ack_ms, 50):.1f} ms "
                f"p99 {percentile(self.ack_ms, 99):.1f} ms (gen lag p99 {percentile(self.lag_ms, 99):.1f} ms) | "
                f"visible-at-all p50 {percentile(self.visible_ms, 50):.0f} ms p99 "
                f"{percentile(self.visible_ms, 99):.0f} ms, p99<={self.visible_p99_bound:.0f} ms "
                f"({len(self.visible_ms)} samples{lost}) | CPU {cpu_ms:.2f} ms/accepted order "
                f"(client {self.client_cpu_s:.1f} s) | converged {conv}")


# ---- reads of the nodes -----------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, node: NodeProc, path: str) -> Any:
    async with session.get(node.url + path, headers={"Accept": "application/json"}) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path} at {node.name}: {r.status} {body[:200]!r}")
        return json.loads(body)


async def sample_count(session: aiohttp.ClientSession, node: NodeProc) -> int:
    """How many latency samples the node has appended since it started."""
    async with session.get(node.url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(COUNT_METRIC + " "):
            return int(float(line.split()[1]))
    raise RuntimeError(f"{COUNT_METRIC} missing from {node.name}'s /metrics")


class LatencyTail:
    """The latency samples a node appended since ``start``: its ``/v1/latency``
    deque is bounded, the count in ``/metrics`` is not, so each read keeps the
    tail of the deque that is new since the previous one."""

    def __init__(self, node: NodeProc) -> None:
        self.node = node
        self.seen = 0
        self.samples: list[float] = []
        self.lost = 0

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.seen = await sample_count(session, self.node)
        self.samples, self.lost = [], 0

    async def read(self, session: aiohttp.ClientSession, *, quiet: bool) -> None:
        """Take the new samples.  ``quiet``: the cluster is idle, so retry
        (bounded) until the count is the same before and after the samples."""
        count, lat = 0, []
        for _ in range(5 if quiet else 1):
            count = await sample_count(session, self.node)
            lat = (await get_json(session, self.node, "/v1/latency"))["samples"]
            if not quiet or await sample_count(session, self.node) == count:
                break
        new = max(count - self.seen, 0)
        if new:
            self.samples += [float(x) for x in lat[-new:]]
        self.lost += max(new - len(lat), 0)
        self.seen = count


async def collect(session: aiohttp.ClientSession, tails: list[LatencyTail], every: float,
                  stop: asyncio.Event) -> None:
    """Read every node's new samples every ``every`` seconds until ``stop``."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except TimeoutError:
            pass
        if stop.is_set():
            return
        for t in tails:
            try:
                await t.read(session, quiet=False)
            except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
                print(f"  (latency read at {t.node.name} failed: {exc!r}; next read catches up)", file=sys.stderr)


async def converge(session: aiohttp.ClientSession, nodes: list[NodeProc]) -> float | None:
    """Seconds until every node has the same state hash and nothing pending;
    None if not within CONVERGE_TIMEOUT."""
    t0 = time.monotonic()
    for _ in range(int(CONVERGE_TIMEOUT / CONVERGE_POLL) + 10):
        try:
            sts = await asyncio.gather(*(get_json(session, n, "/v1/status") for n in nodes))
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError):
            sts = []
        if sts and len({s["state_hash"] for s in sts}) == 1 and not any(s["finality"]["pending"] for s in sts):
            return time.monotonic() - t0
        if time.monotonic() - t0 > CONVERGE_TIMEOUT:
            return None
        await asyncio.sleep(CONVERGE_POLL)
    return None


# ---- the generator ------------------------------------------------------------------------


class Generator:
    """Open loop over the nodes, round robin; remembers each node's resting
    orders (its own, as the acks said) for cancels.  One seeded RNG for the
    whole run; every request draws the same numbers whatever it becomes."""

    def __init__(self, nodes: list[NodeProc], seed: int, *, client: str = "http") -> None:
        self.nodes = nodes
        self.client = client
        self.sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self.readers: set[asyncio.Task[None]] = set()
        self.waiting: dict[tuple[str, int], tuple[str, float, Step]] = {}
        self.next_ref = 0
        self.headers = {n.name: {**n.auth(), "Accept": "application/json"} for n in nodes}
        self.resting: dict[str, list[str]] = {n.name: [] for n in nodes}
        self.rng = random.Random(seed)

    def next_request(self, node: NodeProc) -> tuple[str, dict[str, Any] | None, str | None]:
        rng = self.rng
        x, side = rng.random(), rng.choice(("buy", "sell"))
        cross, rest, qty, pick = rng.randint(0, 5), rng.randint(1, 20), rng.randint(1, 10), rng.random()
        sign = 1 if side == "buy" else -1
        mine = self.resting[node.name]
        if x < 0.1 and mine:
            j = int(pick * len(mine))
            oid = mine[j]
            mine[j] = mine[-1]
            mine.pop()
            return "cancel", None, oid
        price = MID + sign * cross if 0.1 <= x < 0.3 else MID - sign * rest
        return "order", {"side": side, "qty": qty, "price": price, "tif": "GTC"}, None

    async def send(self, session: aiohttp.ClientSession, node: NodeProc, kind: str, body: dict[str, Any] | None,
                   oid: str | None, due: float, step: Step) -> None:
        """One request over HTTP, its reply recorded."""
        headers = self.headers[node.name]
        try:
            if kind == "cancel":
                req = session.delete(f"{node.url}/v1/orders/{oid}", headers=headers)
            else:
                req = session.post(f"{node.url}/v1/orders", json=body, headers=headers)
            async with req as r:
                raw = await r.read()
                status = r.status
            done = time.monotonic()
            data = json.loads(raw) if raw else {}
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            step.errors[type(exc).__name__] += 1
            return
        self.record(step, node, kind, status, data, due, done)

    def record(self, step: Step, node: NodeProc, kind: str, status: int, data: Any, due: float, done: float) -> None:
        if kind == "order" and status == 201:
            step.orders += 1
            if data.get("status") in ("open", "partially_filled"):
                self.resting[node.name].append(data["id"])
        elif kind == "cancel" and status == 200:
            step.cancels += 1
        elif kind == "cancel" and status == 409 and data.get("error") == "not_cancellable":
            step.late_cancels += 1
        else:
            step.errors[f"{status} {data.get('error', '?') if isinstance(data, dict) else '?'}"] += 1
            return
        step.ack_ms.append((done - due) * 1000)

    # ---- over trading sessions (GET /v1/trade) ----

    async def open_sessions(self, session: aiohttp.ClientSession) -> None:
        """One trading session per node, each with a task reading its answers."""
        for n in self.nodes:
            ws = await session.ws_connect(f"{n.url}/v1/trade", headers=self.headers[n.name], heartbeat=20.0,
                                          timeout=aiohttp.ClientWSTimeout(ws_close=REQUEST_TIMEOUT))
            self.sockets[n.name] = ws
            self.readers.add(asyncio.create_task(self.read_answers(n, ws)))

    async def close_sessions(self) -> None:
        for ws in self.sockets.values():
            await ws.close()
        await asyncio.gather(*self.readers, return_exceptions=True)

    async def read_answers(self, node: NodeProc, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            waiting = self.waiting.pop((node.name, data.get("ref")), None)
            if waiting is None:
                print(f"  (an answer from {node.name} with an unknown ref: {msg.data[:200]})", file=sys.stderr)
                continue
            kind, due, step = waiting
            body = data.get("order") if "order" in data else data
            self.record(step, node, kind, data["status"], body, due, time.monotonic())
        for ref, (_, _, step) in [*self.waiting.items()]:
            if ref[0] == node.name:
                del self.waiting[ref]
                step.errors["session closed"] += 1

    async def send_ws(self, node: NodeProc, kind: str, body: dict[str, Any] | None, oid: str | None,
                      due: float, step: Step) -> None:
        """One message over the node's trading session; its answer is recorded by the reader."""
        self.next_ref += 1
        ref = self.next_ref
        msg: dict[str, Any] = {"op": "cancel", "ref": ref, "id": oid}
        if kind == "order":
            msg = {"op": "place", "ref": ref, **(body or {})}
        self.waiting[(node.name, ref)] = (kind, due, step)
        try:
            await self.sockets[node.name].send_str(json.dumps(msg))
        except (aiohttp.ClientError, ConnectionResetError, RuntimeError) as exc:
            self.waiting.pop((node.name, ref), None)
            step.errors[type(exc).__name__] += 1

    async def offer(self, session: aiohttp.ClientSession, step: Step) -> None:
        """Request i at t0 + i/rate whatever the replies do; bounded in count
        (rate * seconds, MAX_INFLIGHT at once) and in time (no new request
        past 1.25 * seconds + 2 s, every reply awaited at most the request
        timeout + 5 s)."""
        rate, total = step.rate, max(1, round(step.rate * step.seconds))
        tasks: set[asyncio.Task[None]] = set()
        t0 = time.monotonic()
        give_up = t0 + 1.25 * step.seconds + 2.0
        last = t0
        for i in range(total):
            due = t0 + i / rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            else:
                await asyncio.sleep(0)  # behind: still let the replies in
            if now > give_up:
                step.unsent = total - i
                break
            node = self.nodes[i % len(self.nodes)]
            kind, body, oid = self.next_request(node)
            if len(tasks) + len(self.waiting) >= MAX_INFLIGHT:
                step.errors["skipped (in-flight cap)"] += 1
                continue
            if self.client == "ws":
                await self.send_ws(node, kind, body, oid, due, step)
            else:
                t = asyncio.create_task(self.send(session, node, kind, body, oid, due, step))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            step.sent += 1
            step.lag_ms.append((now - due) * 1000)
            last = now
        step.window_s = max(step.seconds, last - t0 + 1 / rate)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT + 5.0)
            for t in pending:
                t.cancel()
                step.errors["no reply (abandoned)"] += 1
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        deadline = time.monotonic() + REQUEST_TIMEOUT + 5.0
        while self.waiting and time.monotonic() < deadline:  # answers still due over the sessions
            await asyncio.sleep(0.01)
        for key in [k for k, w in self.waiting.items() if w[2] is step]:
            del self.waiting[key]
            step.errors["no reply (abandoned)"] += 1


# ---- the run --------------------------------------------------------------------------------


async def run_steps(nodes: list[NodeProc], rates: list[float], seconds: float, seed: int,
                    client: str = "http") -> list[Step]:
    gen = Generator(nodes, seed, client=client)
    load_timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    read_timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    async with (aiohttp.ClientSession(timeout=load_timeout, connector=aiohttp.TCPConnector(limit=500)) as load,
                aiohttp.ClientSession(timeout=read_timeout, connector=aiohttp.TCPConnector(limit=20)) as reads):
        if client == "ws":
            await gen.open_sessions(load)
        try:
            return await _steps(gen, load, reads, rates, seconds)
        finally:
            await gen.close_sessions()


async def _steps(gen: Generator, load: aiohttp.ClientSession, reads: aiohttp.ClientSession, rates: list[float],
                 seconds: float) -> list[Step]:
    nodes = gen.nodes
    steps: list[Step] = []
    for rate in rates:
        step = Step(rate=rate, seconds=seconds)
        tails = [LatencyTail(n) for n in nodes]
        for t in tails:
            await t.start(reads)
        # read often enough that no node's deque wraps between reads (4/5 of the orders plus heartbeats)
        every = max(1.0, min(5.0, 0.5 * LATENCY_SAMPLES / (0.8 * rate + 100)))
        stop = asyncio.Event()
        collector = asyncio.create_task(collect(reads, tails, every, stop))
        ticks0 = sum(cpu_ticks(n.pid) for n in nodes)
        client0 = time.process_time()
        try:
            await gen.offer(load, step)
        finally:
            stop.set()
            await collector
        step.client_cpu_s = time.process_time() - client0
        step.converged_s = await converge(reads, nodes)
        step.cpu_s = (sum(cpu_ticks(n.pid) for n in nodes) - ticks0) / CLK_TCK
        for t in tails:
            await t.read(reads, quiet=True)
            step.visible_ms += t.samples
            step.lost_samples += t.lost
        print(step.line(), flush=True)
        steps.append(step)
    return steps


def start_cluster(base: Path) -> list[NodeProc]:
    """Five nodes: the first founds the network, the others join it; returns
    once every node counts five members and all are peers of each other."""
    nodes = make_nodes(base, NAMES)
    try:
        start_network(nodes, timeout=60)
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates: positive numbers separated by commas")
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rates", type=parse_rates, default=[250.0, 500.0, 1000.0, 2000.0],
                   help="orders/s over the cluster, one step each, comma separated (default 250,500,1000,2000)")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per step (default 15)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--client", choices=("http", "ws"), default="http",
                   help="http: one request per order or cancel (default); ws: one trading session "
                        "(GET /v1/trade) per node, a message per order or cancel")
    p.add_argument("--quick", action="store_true", help="3 s steps at 250 and 500 orders/s")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.seconds = [250.0, 500.0], 3.0
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    with tempfile.TemporaryDirectory(prefix="p2pex-cluster-") as tmp:
        t0 = time.monotonic()
        nodes = start_cluster(Path(tmp))
        try:
            print(f"cluster    5 nodes on 127.0.0.1 ({', '.join(str(n.port) for n in nodes)}), all members after "
                  f"{time.monotonic() - t0:.1f} s; steps of {args.seconds:g} s at "
                  f"{', '.join(f'{r:g}' for r in args.rates)} orders/s, seed {args.seed}, "
                  f"client {args.client}", flush=True)
            steps = asyncio.run(run_steps(nodes, args.rates, args.seconds, args.seed, args.client))
        finally:
            stop_all(nodes)
    best = max((s.rate for s in steps if s.passes()), default=0.0)
    print(f"max_rate_p99_100ms={best:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
