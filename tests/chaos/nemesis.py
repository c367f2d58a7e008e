"""The nemeses: what goes wrong during each phase of a run, and the healing after.

``Faults`` holds the fault primitives over the lab (links), the shaper
(delay) and the cluster (processes), keeps the whole fault state so faults
combine (the storm), and records every action.  ``heal_all`` undoes
everything: links healthy, shaper cleared, paused nodes continued, killed,
crashed and clock-skewed nodes (re)started with the true clock, and waits
until every node is ready.

A ``Nemesis`` is a name, a title, a default fault time, what it needs from
the machine or the node, and an async function that applies faults for the
given number of seconds (bounded loops only).  ``NEMESES`` lists them in the
order ``make chaos`` runs them; ``QUICK`` is the 60-second subset of
``make test``.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp

from tests.chaos.cluster import PAUSED, RUNNING, Cluster
from tests.chaos.history import FaultEvent, Recorder
from tests.chaos.netlab import LinkFault, NetLab
from tests.chaos.shaper import LinkShape, Shaper

SKEW_BEHIND_MS: Final = -3_000
SKEW_AHEAD_MS: Final = 4_000


class Faults:
    def __init__(self, *, lab: NetLab, cluster: Cluster, shaper: Shaper | None, session: aiohttp.ClientSession,
                 rec: Recorder, clock: Callable[[], float], rng: random.Random, evict_after: float,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.lab = lab
        self.cluster = cluster
        self.shaper = shaper
        self.session = session
        self.rec = rec
        self.clock = clock
        self.rng = rng
        self.evict_after = evict_after
        self.sleep = sleep
        self.links: dict[tuple[str, str], LinkFault] = {}
        self.shapes: dict[tuple[str, str], LinkShape] = {}
        self._shaped = {"delayed": 0, "reordered": 0}

    @property
    def names(self) -> list[str]:
        return list(self.cluster.nodes)

    def event(self, kind: str, detail: str) -> None:
        self.rec.fault_events.append(FaultEvent(t=round(self.clock(), 3), kind=kind, detail=detail))

    # ---- links ----------------------------------------------------------------------

    def _push(self) -> None:
        self.lab.set_faults(self.links)
        if self.shaper is not None:
            self.shaper.set_links(list(self.shapes.values()))

    def cut(self, src: str, dst: str) -> None:
        self.links[(src, dst)] = LinkFault(cut=True)
        self.shapes.pop((src, dst), None)

    def isolate(self, name: str) -> None:
        for other in self.names:
            if other != name:
                self.cut(name, other)
                self.cut(other, name)
        self._push()
        self.event("isolate", name)

    def partition(self, groups: list[list[str]]) -> None:
        side = {n: i for i, g in enumerate(groups) for n in g}
        for a in self.names:
            for b in self.names:
                if a != b and side.get(a) != side.get(b):
                    self.cut(a, b)
        self._push()
        self.event("partition", " | ".join(",".join(g) for g in groups))

    def one_way(self, src: str, dst: str) -> None:
        self.cut(src, dst)
        self._push()
        self.event("cut", f"{src} -> {dst}")

    def degrade(self, pairs: list[tuple[str, str]], *, loss: tuple[float, float] = (0.05, 0.20),
                delay_ms: tuple[float, float] = (50.0, 200.0), dup: float = 0.05, reorder: float = 0.1) -> None:
        """Each link: a base delay drawn from ``delay_ms`` with jitter of 20-50 % of it
        either way, a share ``reorder`` held back by one more base delay, loss drawn
        from ``loss``, and ``dup`` of its packets sent twice."""
        if self.shaper is None:
            raise RuntimeError("degraded links need the link shaper")
        for src, dst in pairs:
            base = self.rng.uniform(*delay_ms)
            jitter = base * self.rng.uniform(0.2, 0.5)
            p_loss = round(self.rng.uniform(*loss), 3)
            self.links[(src, dst)] = LinkFault(loss=p_loss, dup=dup, shaped=True)
            self.shapes[(src, dst)] = LinkShape(
                ns=self.lab.hosts[dst].ns, src=self.lab.hosts[src].ip, delay_lo_ms=round(base - jitter, 1),
                delay_hi_ms=round(base + jitter, 1), reorder=reorder, reorder_ms=round(base, 1))
            self.event("degrade", f"{src} -> {dst}: delay {base - jitter:.0f}-{base + jitter:.0f} ms, "
                                  f"loss {p_loss:.0%}, dup {dup:.0%}, reorder {reorder:.0%}")
        self._push()

    def heal_net(self) -> None:
        counts = {k: v for k, v in self.lab.take_counts().items() if v}
        if self.shaper is not None:
            stats = self.shaper.stats()
            for kind in ("delayed", "reordered"):
                now = int(stats.get(kind, self._shaped[kind]))
                if now > self._shaped[kind]:
                    counts[kind] = now - self._shaped[kind]
                self._shaped[kind] = now
        if counts:
            self.rec.fault_events.append(FaultEvent(t=round(self.clock(), 3), kind="packets",
                                                    detail="what the link faults did", counts=counts))
        self.links.clear()
        self.shapes.clear()
        self.lab.heal()
        if self.shaper is not None:
            self.shaper.clear()
        self.event("heal-net", "")

    # ---- processes ----------------------------------------------------------------------

    def impaired(self) -> list[str]:
        return [n.name for n in self.cluster.nodes.values() if n.state != RUNNING]

    def kill(self, name: str) -> None:
        self.cluster.kill9(name)
        self.event("kill", name)

    async def restart(self, name: str, *, clock_offset_ms: int = 0) -> None:
        node = self.cluster.nodes[name]
        if node.state == PAUSED:
            self.cluster.resume(name)
        if node.state == RUNNING:
            self.cluster.stop(name)
        self.cluster.start(name, clock_offset_ms=clock_offset_ms)
        self.event("restart", f"{name}" + (f" clock {clock_offset_ms:+d} ms" if clock_offset_ms else ""))
        try:
            await self.cluster.wait_ready(self.session, name)
        except RuntimeError as exc:  # the run goes on; the check shows what it cost
            self.cluster.poll()
            self.event("restart-failed", f"{name}: {exc}")

    def pause(self, name: str) -> None:
        self.cluster.pause(name)
        self.event("pause", name)

    def resume(self, name: str) -> None:
        self.cluster.resume(name)
        self.event("resume", name)

    async def heal_all(self) -> None:
        self.heal_net()
        self.cluster.poll()
        for node in self.cluster.nodes.values():
            if node.state == PAUSED:
                self.resume(node.name)
        for node in self.cluster.nodes.values():
            if node.state != RUNNING or node.clock_offset_ms:
                await self.restart(node.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Nemesis:
    name: str
    title: str
    seconds: float
    run: Callable[[Faults, float], Awaitable[None]]
    needs_shaper: bool = False  # cannot run without the link shaper
    wants_shaper: bool = False  # uses it when there is one
    needs_clock_offset: bool = False


async def calm(f: Faults, seconds: float) -> None:
    await f.sleep(seconds)


async def isolate_one(f: Faults, seconds: float) -> None:
    f.isolate(f.rng.choice(f.names))
    await f.sleep(seconds)


async def split_two_three(f: Faults, seconds: float) -> None:
    """Two members from the other three, each participant on a random side."""
    members = [n for n in f.names if f.cluster.nodes[n].member]
    f.rng.shuffle(members)
    small = members[:2] + [n for n in f.names if not f.cluster.nodes[n].member and f.rng.random() < 0.5]
    f.partition([sorted(small), sorted(n for n in f.names if n not in small)])
    await f.sleep(seconds)


async def kill_restart(f: Faults, seconds: float) -> None:
    end = f.clock() + seconds
    for _ in range(int(seconds) + 1):
        left = end - f.clock()
        if left < 1.0:
            break
        victim = f.rng.choice(f.names)
        f.kill(victim)
        await f.sleep(min(left, f.rng.uniform(2.0, 5.0)))
        await f.restart(victim)
        await f.sleep(min(max(0.0, end - f.clock()), f.rng.uniform(2.0, 4.0)))


async def kill_long(f: Faults, seconds: float) -> None:
    """Down for longer than --evict-after; restarted only when the phase heals."""
    f.kill(f.rng.choice(f.names))
    await f.sleep(max(seconds, f.evict_after + 6.0))


async def pause_resume(f: Faults, seconds: float) -> None:
    end = f.clock() + seconds
    for _ in range(int(seconds) + 1):
        left = end - f.clock()
        if left < 1.0:
            break
        victim = f.rng.choice(f.names)
        f.pause(victim)
        await f.sleep(min(left, f.rng.uniform(3.0, 6.0)))
        f.resume(victim)
        await f.sleep(min(max(0.0, end - f.clock()), f.rng.uniform(1.5, 3.0)))


async def bad_network(f: Faults, seconds: float) -> None:
    f.degrade([(a, b) for a in f.names for b in f.names if a != b])
    await f.sleep(seconds)


async def skewed_clocks(f: Faults, seconds: float) -> None:
    names = f.names
    behind, ahead = f.rng.sample(names, 2)
    await f.restart(behind, clock_offset_ms=SKEW_BEHIND_MS)
    await f.restart(ahead, clock_offset_ms=SKEW_AHEAD_MS)
    await f.sleep(seconds)


async def storm(f: Faults, seconds: float) -> None:
    """Every 3-6 s one random fault, on top of those still in force: isolation,
    a split, a one-way cut, degraded links, kill -9 (restarted 2-8 s later), a
    pause (continued 2-6 s later), or healed links.  At most two nodes are down
    or paused at once."""
    end = f.clock() + seconds
    undo: list[tuple[float, str, str]] = []  # (when, "restart" | "resume", node)
    for _ in range(int(seconds) + 1):
        now = f.clock()
        if now >= end:
            break
        for item in sorted(u for u in undo if u[0] <= now):
            undo.remove(item)
            if item[1] == "restart":
                await f.restart(item[2])
            else:
                f.resume(item[2])
        names = f.names
        action = f.rng.choice(["isolate", "split", "one-way", "degrade", "kill", "pause", "heal-net"])
        healthy = [n for n in names if n not in f.impaired()]
        if action in ("kill", "pause") and (len(f.impaired()) >= 2 or not healthy):
            action = "heal-net"
        if action == "isolate":
            f.isolate(f.rng.choice(names))
        elif action == "split":
            f.rng.shuffle(names)
            cut = f.rng.randint(1, len(names) - 1)
            f.partition([sorted(names[:cut]), sorted(names[cut:])])
        elif action == "one-way":
            src, dst = f.rng.sample(names, 2)
            f.one_way(src, dst)
        elif action == "degrade" and f.shaper is not None:
            pairs = [(a, b) for a in names for b in names if a != b]
            f.degrade(f.rng.sample(pairs, f.rng.randint(2, 8)))
        elif action == "kill":
            victim = f.rng.choice(healthy)
            f.kill(victim)
            undo.append((now + f.rng.uniform(2.0, 8.0), "restart", victim))
        elif action == "pause":
            victim = f.rng.choice(healthy)
            f.pause(victim)
            undo.append((now + f.rng.uniform(2.0, 6.0), "resume", victim))
        else:
            f.heal_net()
        await f.sleep(min(max(0.0, end - f.clock()), f.rng.uniform(3.0, 6.0)))
    # what is still undone (paused, killed) is undone by heal_all


NEMESES: Final = (
    Nemesis(name="calm", title="no fault (control)", seconds=10.0, run=calm),
    Nemesis(name="isolate", title="one node isolated", seconds=45.0, run=isolate_one),
    Nemesis(name="split", title="2|3 split of the members", seconds=45.0, run=split_two_three),
    Nemesis(name="kill-restart", title="kill -9 and restart, repeatedly", seconds=50.0, run=kill_restart),
    Nemesis(name="kill-long", title="kill -9, down past --evict-after", seconds=30.0, run=kill_long),
    Nemesis(name="pause", title="SIGSTOP / SIGCONT, repeatedly", seconds=50.0, run=pause_resume),
    Nemesis(name="network", title="delay 50-200 ms, jitter, 5-20 % loss, duplicates, reordering", seconds=60.0,
            run=bad_network, needs_shaper=True),
    Nemesis(name="skew", title="one clock 3 s behind, one 4 s ahead", seconds=40.0, run=skewed_clocks,
            needs_clock_offset=True),
    Nemesis(name="storm", title="random storm of all of the above", seconds=60.0, run=storm, wants_shaper=True),
)
BY_NAME: Final = {n.name: n for n in NEMESES}
#: The 60-second run inside ``make test``: (name, fault seconds).
QUICK: Final = (("isolate", 12.0), ("kill-restart", 12.0), ("pause", 12.0))
