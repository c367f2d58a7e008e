"""One chaos run, from an empty machine state back to an empty machine state.

``run_suite`` builds the lab (5 namespaces on a bridge), starts the link
shaper when a nemesis needs it, starts the 5 members and 2 participants
(docs/PARTICIPANTS.md; faults hit both) and waits for a full mesh,
then for each nemesis: clients trade for a warm-up, the nemesis runs its
faults, everything heals, the clients stop, and the observer waits for the
cluster to converge and takes the check.  At the end the nodes get SIGTERM,
the history is written, judged by the checker, and the report written.

Clean-up runs in ``finally``, also on Ctrl-C and SIGTERM: every process this
run started is killed by its pid, the shaper stopped, the namespaces, veths
and bridge deleted (their iptables rules go with them) and the data dirs
removed.
"""

from __future__ import annotations

import asyncio
import json
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from tests.chaos.checker import Verdict, check
from tests.chaos.client import CALL_TIMEOUT_S, CID_RETRIES, CidSupport, Client, ClientOptions
from tests.chaos.cluster import Cluster, NodeFlags, node_flags
from tests.chaos.history import Phase, Recorder
from tests.chaos.nemesis import BY_NAME, NEMESES, Faults, Nemesis
from tests.chaos.netlab import NetLab, capabilities
from tests.chaos.observer import NodeGone, Observer
from tests.chaos.report import table, write
from tests.chaos.shaper import Shaper

MEMBERS = ("n1", "n2", "n3", "n4", "n5")
PARTICIPANTS = ("p1", "p2")  # trade through tickets the members carry; faults hit them too
NAMES = (*MEMBERS, *PARTICIPANTS)
EVICT_AFTER_S = 8.0  # passed to nodes that take --evict-after
DEFAULT_EVICT_AFTER_S = 10.0  # what a node without the flag will have
MESH_TIMEOUT_S = 40.0
ORDER_SAMPLE = 20  # acknowledged orders read back from every node at a check


class Unavailable(RuntimeError):
    """This machine cannot run the suite (the reason is the message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    nemeses: tuple[tuple[str, float], ...]  # (name, fault seconds), in order
    seed: int = 1
    out: Path = Path("logs/chaos")
    rate: float = 4.0
    warm_s: float = 3.0
    converge_timeout_s: float = 60.0
    keep_data: bool = False
    echo: Callable[[str], None] = print


def full_options(**kw: Any) -> Options:
    seconds = kw.pop("seconds", None)
    names = kw.pop("only", None) or [n.name for n in NEMESES]
    return Options(nemeses=tuple((n, seconds or BY_NAME[n].seconds) for n in names), **kw)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    verdict: Verdict
    report_md: Path
    report_json: Path
    history: Path
    seconds: float
    timings: dict[str, float]


def _unsupported(nemesis: Nemesis, flags: NodeFlags, shaper_reason: str | None) -> str | None:
    if nemesis.needs_clock_offset and not flags.clock_offset:
        return "not supported by this node: `cli.py node --help` lists no --clock-offset-ms"
    if nemesis.needs_shaper and shaper_reason:
        return f"cannot run here: {shaper_reason}"
    return None


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_suite(opt: Options) -> Outcome:
    caps = capabilities()
    if caps.reason:
        raise Unavailable(caps.reason)
    for name, _ in opt.nemeses:
        if name not in BY_NAME:
            raise ValueError(f"no nemesis {name!r}; there are {', '.join(BY_NAME)}")
    flags = node_flags()
    origin = time.monotonic()

    def clock() -> float:
        return time.monotonic() - origin

    rec = Recorder({"seed": opt.seed, "nodes": list(NAMES), "participants": list(PARTICIPANTS), "rate": opt.rate,
                    "python": sys.version.split()[0],
                    "machine": platform.platform(), "iptables": caps.iptables,
                    "nemeses": [list(n) for n in opt.nemeses]})
    needs_shaper = any(BY_NAME[n].needs_shaper or BY_NAME[n].wants_shaper for n, _ in opt.nemeses)
    lab = NetLab(NAMES, iptables=caps.iptables or "iptables")
    data_root = Path(tempfile.mkdtemp(prefix="p2pex-chaos-"))
    log_dir = opt.out / "nodes"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    shaper: Shaper | None = None
    cluster: Cluster | None = None
    timings: dict[str, float] = {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        t0 = time.monotonic()
        lab.build()
        shaper_reason = caps.nfqueue
        if needs_shaper and shaper_reason is None:
            opt.out.mkdir(parents=True, exist_ok=True)
            shaper = Shaper([h.ns for h in lab.hosts.values()], log_path=opt.out / "shaper.log", seed=opt.seed)
            try:
                shaper.start()
            except OSError as exc:
                shaper, shaper_reason = None, str(exc)
        extra = ["--evict-after", f"{EVICT_AFTER_S:g}"] if flags.evict_after else []
        cluster = Cluster(lab, data_root=data_root, log_dir=log_dir, rec=rec, clock=clock, extra=extra,
                          genesis=flags.genesis, participants=frozenset(PARTICIPANTS))
        timings["lab"] = round(time.monotonic() - t0, 1)
        play = _Play(opt, lab=lab, cluster=cluster, shaper=shaper, shaper_reason=shaper_reason, flags=flags, rec=rec,
                     clock=clock, timings=timings)
        asyncio.run(play.run())
        cluster.stop_all()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if cluster is not None:
            cluster.kill_all()
        if shaper is not None:
            shaper.stop()
        lab.close()
        if not opt.keep_data:
            shutil.rmtree(data_root, ignore_errors=True)
    seconds = round(clock(), 1)
    rec.meta["seconds"] = seconds
    rec.meta["timings"] = timings
    history = rec.freeze()
    opt.out.mkdir(parents=True, exist_ok=True)
    history_path = opt.out / "chaos-history.json"
    history_path.write_text(history.dumps())
    t0 = time.monotonic()
    verdict = check(history)
    timings["checker"] = round(time.monotonic() - t0, 1)
    md, js = write(verdict, history.meta, opt.out)
    return Outcome(verdict=verdict, report_md=md, report_json=js, history=history_path, seconds=seconds,
                   timings=timings)


class _Play:
    """The asynchronous part of a run: cluster up, then one phase per nemesis."""

    def __init__(self, opt: Options, *, lab: NetLab, cluster: Cluster, shaper: Shaper | None,
                 shaper_reason: str | None, flags: NodeFlags, rec: Recorder, clock: Callable[[], float],
                 timings: dict[str, float]) -> None:
        self.opt = opt
        self.lab = lab
        self.cluster = cluster
        self.shaper = shaper
        self.shaper_reason = shaper_reason
        self.flags = flags
        self.rec = rec
        self.clock = clock
        self.timings = timings
        self.rng = random.Random(opt.seed)
        self.cid = CidSupport()
        self.evict_after = EVICT_AFTER_S if flags.evict_after else DEFAULT_EVICT_AFTER_S

    async def run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
            t0 = time.monotonic()
            for name in self.cluster.nodes:
                self.cluster.start(name)
            await asyncio.gather(*(self.cluster.wait_ready(session, name) for name in self.cluster.nodes))
            observer = Observer(self.cluster, self.rec, self.clock)
            await _wait_mesh(session, self.cluster, observer)
            self.timings["start"] = round(time.monotonic() - t0, 1)
            flags = self.flags
            features = {"finality": observer.finality, "cid": None, "evict_after": flags.evict_after,
                        "clock_offset": flags.clock_offset}
            self.rec.meta["features"] = features
            self.opt.echo(f"{len(MEMBERS)} members and {len(PARTICIPANTS)} participants up in "
                          f"{self.timings['start']:.1f} s; finality "
                          f"{'yes' if observer.finality else 'no'}, --evict-after "
                          f"{'yes' if flags.evict_after else 'no'}, --clock-offset-ms "
                          f"{'yes' if flags.clock_offset else 'no'}")
            stop_sampling = asyncio.Event()
            sampler = asyncio.create_task(observer.sample_forever(session, stop_sampling), name="sampler")
            faults = Faults(lab=self.lab, cluster=self.cluster, shaper=self.shaper, session=session, rec=self.rec,
                            clock=self.clock, rng=self.rng, evict_after=self.evict_after, sleep=asyncio.sleep)
            try:
                runs: dict[str, int] = {}
                for kind, seconds in self.opt.nemeses:
                    runs[kind] = runs.get(kind, 0) + 1
                    name = kind if runs[kind] == 1 else f"{kind}-{runs[kind]}"  # a phase's name is its key
                    await self.nemesis(name, BY_NAME[kind], seconds, session, observer, faults)
                    features["cid"] = self.cid.value
            finally:
                stop_sampling.set()
                await asyncio.gather(sampler, return_exceptions=True)
            if sampler.done() and not sampler.cancelled() and sampler.exception() is not None:
                raise RuntimeError("the sampler failed") from sampler.exception()

    async def nemesis(self, name: str, nemesis: Nemesis, seconds: float, session: aiohttp.ClientSession,
                      observer: Observer, faults: Faults) -> None:
        reason = _unsupported(nemesis, self.flags, self.shaper_reason)
        if reason:
            now = round(self.clock(), 3)
            self.rec.phases.append(Phase(name=name, title=nemesis.title, supported=False, note=reason,
                                         t_start=now, t_fault=now, t_heal=now, t_end=now))
            self.opt.echo(f"{name:<13} skipped: {reason}")
            return
        note = ""
        if nemesis.name == "kill-long":
            seconds = max(seconds, self.evict_after + 6.0)
            note = (f"down {seconds:.0f} s; --evict-after {EVICT_AFTER_S:g}" if self.flags.evict_after else
                    f"down {seconds:.0f} s; this node has no --evict-after (default will be "
                    f"{DEFAULT_EVICT_AFTER_S:g} s)")
        t0 = time.monotonic()
        phase = await self.phase(name, nemesis, seconds, note, session, observer, faults)
        self.timings[name] = round(time.monotonic() - t0, 1)
        c = self.rec.checks[-1]
        conv = f"converged {c.t_converged - c.t_heal:.1f} s after heal" if c.t_converged is not None \
            else "NOT converged"
        acked = sum(1 for a in self.rec.acks if a.ok and phase.t_start <= a.t1 <= phase.t_end)
        self.opt.echo(f"{name:<13} fault {phase.t_heal - phase.t_fault:4.0f} s, {acked:5d} calls acknowledged, "
                      f"{conv}; phase {self.timings[name]:.0f} s")

    async def phase(self, name: str, nemesis: Nemesis, seconds: float, note: str, session: aiohttp.ClientSession,
                    observer: Observer, faults: Faults) -> Phase:
        """Warm-up, fault, heal, clients stop, check."""
        rec, clock = self.rec, self.clock
        t_start = clock()
        stop_clients = asyncio.Event()
        clients = [Client(node=n.name, url=n.url, token=n.token, rec=rec, clock=clock,
                          seed=self.rng.randrange(1 << 30), options=ClientOptions(rate=self.opt.rate), cid=self.cid,
                          phase=name,
                          on_fills=observer.note_ack, on_cancel=observer.note_cancel)
                   for n in self.cluster.nodes.values()]
        tasks = [asyncio.create_task(c.run(session, stop_clients), name=f"client-{c.node}") for c in clients]
        try:
            await asyncio.sleep(self.opt.warm_s)
            t_fault = clock()
            faults.event("nemesis", name)
            await nemesis.run(faults, seconds)
            t_heal = clock()
            await faults.heal_all()
        finally:
            stop_clients.set()
            done, pending = await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S * (2 + CID_RETRIES) + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"{task.get_name()} failed") from task.exception()
        orders = [a for a in rec.acks if a.ok and a.op == "order" and a.order_id]
        acked = [str(a.order_id) for a in orders]
        recent = [str(a.order_id) for a in orders if a.t1 >= t_start]
        sample = self.rng.sample(recent, min(ORDER_SAMPLE, len(recent)))
        await observer.check(session, phase=name, t_heal=t_heal, timeout=self.opt.converge_timeout_s, sample=sample,
                             acked=acked)
        phase = Phase(name=name, title=nemesis.title, supported=True, note=note, t_start=round(t_start, 3),
                      t_fault=round(t_fault, 3), t_heal=round(t_heal, 3), t_end=round(clock(), 3))
        rec.phases.append(phase)
        return phase


async def _wait_mesh(session: aiohttp.ClientSession, cluster: Cluster, observer: Observer) -> None:
    """Every node sees every other as a peer that answers."""
    deadline = time.monotonic() + MESH_TIMEOUT_S
    want = len(cluster.nodes) - 1
    for _ in range(int(MESH_TIMEOUT_S / 0.2) + 10):
        try:
            sts = await asyncio.gather(*(observer.status(session, n) for n in cluster.nodes.values()))
            if all(sum(1 for p in st.get("peers", []) if p.get("state") == "up") >= want for st in sts):
                return
        except NodeGone:
            pass
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    raise RuntimeError(f"no full mesh of peers after {MESH_TIMEOUT_S:g} s")


def summary(outcome: Outcome) -> str:
    v = outcome.verdict
    lines = [table(v), "", f"report: {outcome.report_md} and {outcome.report_json}; history: {outcome.history}",
             f"took {outcome.seconds:.0f} s ({json.dumps(outcome.timings)})",
             "no violations" if v.ok else f"{v.violations} VIOLATION(S)"]
    return "\n".join(lines)
