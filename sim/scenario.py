"""One simulated run from one seed: a network founded, nodes admitted, traders
trading, a schedule of faults, then healing, quiescence and the final checks.

Besides its members a run has 0 to 6 participants (``PARTICIPANTS``): nodes
that never join, hold a full replica and trade through tickets that members
carry (``sim.node``).  They crash and restart with their key, stop for good,
pause, run skewed clocks, lose their links to some members or go deaf or
mute (``participant_faults``), at any time: they never hold finality back.
How many and their faults come from a generator of their own, so a seed
drawn without participants runs exactly as it did before they existed.

Everything is driven by ``random.Random(seed)``: the same seed replays the
same run, step for step.  Time is in simulated milliseconds; finality's
timeouts are scaled down (eviction after 800 ms) so a run is short.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import blake2b

from crdt.entry import GENESIS, Heartbeat, Order, make_entry
from crdt.errors import ExchangeError
from crdt.keys import SigningKey
from crdt.membership import Decision
from matching.exchange import Params
from sim.checker import Checker, Violation
from sim.network import Network, across
from sim.node import SimNode

TICK_MS = 5
PULL_MS = 40
JOIN_MS = 60
PARAMS = Params(evict_after_ms=800, suspect_after_ms=300, heartbeat_ms=20, liveness_ms=200, max_skew_ms=5_000,
                max_clock_offset_ms=1_000)
FAULTS = ("delay", "partition", "crash", "crash_long", "pause", "pause_long", "skew", "step_back",
          "equivocate", "past_stamp")


@dataclass(slots=True, kw_only=True)
class Fault:
    kind: str
    start: int
    end: int
    node: int
    other: int = 0
    groups: list[list[int]] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class Result:
    seed: int
    nodes: int  # members at the start (participants apart)
    steps: int
    finals: int
    revoked: int
    evictions: int
    restarts: int
    acked: int  # orders and cancels answered as placed (certified by a majority)
    violation: str | None
    trace: list[str]
    # the longest time node 0 held records that were not final while its final
    # frontier did not move, before healing (ms of simulated time)
    max_final_gap_ms: int = 0
    participants: int = 0
    tickets: int = 0  # participants' orders and cancels answered as carried and certified
    carried_twice: int = 0  # tickets carried more than once among the final entries


@dataclass(slots=True, kw_only=True)
class Schedule:
    """A pinned run instead of a planned one: how many nodes, for how long, and
    exactly which faults (the seed still drives delays and trading)."""

    nodes: int
    duration: int
    faults: list[Fault]
    participants: int | None = 0  # None: as many as the seed draws (0-6), with their faults


def split_brain(*, fresh: bool = False) -> Schedule:
    """Two sides of a partition that each grow a membership of their own.

    Four nodes.  n3 and then n2 crash and are voted out, which leaves n0 and n1
    as the members.  The network splits {n0, n2} | {n1, n3}, and n2 and n3
    restart and ask to join, each on its own side.  With admission by a single
    member, each side admitted its joiner, held a "majority" of its own
    three-member view, voted the other side's old member out, and finalized
    its own fills.  ``fresh``: the same with a two-member network and two
    fresh joiners (n2 and n3 are down from the start, so never members)."""
    duration = 6_500
    if fresh:
        faults = [Fault(kind="crash", start=0, end=1_500, node=2), Fault(kind="crash", start=0, end=1_500, node=3),
                  Fault(kind="partition", start=1_000, end=duration, node=0, groups=[[0, 2], [1, 3]])]
    else:
        faults = [Fault(kind="crash", start=400, end=3_400, node=3),
                  Fault(kind="crash", start=1_800, end=3_400, node=2),
                  Fault(kind="partition", start=3_000, end=duration, node=0, groups=[[0, 2], [1, 3]])]
    return Schedule(nodes=4, duration=duration, faults=faults)


def admission_split(nodes: int = 5) -> Schedule:
    """An admission completed during a split by a member being voted out.

    Five nodes.  n1 is cut off from 400 ms and voted out; at 1,800 ms it
    comes back and asks to be admitted again, and 30 ms later the network
    splits {n0, n1} | {n2, n3, n4}.  When n1 got the votes of two members of
    the majority side before the split, n0's vote during the split completes
    a majority of the four members in n0's and n1's view only.  The majority
    side votes n0 out with a cut before that vote, which voids it.  n0 and
    n1 count it until they have decided n0's eviction, through acks computed
    without n0; those used to commit to n1's admission, so they never
    matched and finality stalled for good (seeds 0, 1, 3 and 5-8 of 0-9).
    Digests without a member now commit to the memberships its eviction
    leaves, and the majority that decides it is counted among those
    memberships (docs/FINALITY.md).  ``nodes`` (4 to 6) sizes the network:
    the majority side is n2..n(nodes-1); with an odd number of members left
    after n1's eviction, n0's and n1's view needs a larger majority than the
    others' unless the votes are counted that way.  ``tests/test_sim.py``
    runs seeds 0-9 with 5 nodes and 0-11 with 4 and 6."""
    rest = [i for i in range(nodes) if i != 1]
    return Schedule(nodes=nodes, duration=5_000, faults=[
        Fault(kind="partition", start=400, end=1_800, node=0, groups=[[1], rest]),
        Fault(kind="partition", start=1_830, end=3_800, node=0, groups=[[0, 1], list(range(2, nodes))]),
    ])


WIDE_KINDS = ("split", "deaf", "mute", "crash", "stop", "pause", "skew", "delay")


def wide(seed: int) -> Schedule:
    """Faults the one-at-a-time plan never makes, overlapping: partitions into
    two or three groups, one-way links (a ``deaf`` node sends but hears
    nothing, a ``mute`` one hears but nothing it sends arrives), crashes,
    clean stops (a member's ``Leave``, then the process ends), pauses,
    clocks off by more than the limit, delay and loss.  Every fault ends by
    the end of the run, so finality must come back after healing:
    the checker holds these runs to every guarantee, liveness included.
    ``python -m sim --wide``."""
    rng = random.Random(f"wide {seed}")
    n = rng.randint(3, 5)
    duration = rng.randint(3_000, 5_000)
    faults: list[Fault] = []
    t = 300
    while t < duration - 400:
        kind = rng.choice(WIDE_KINDS)
        f = Fault(kind=kind, start=t, end=min(t + rng.randint(200, 1_500), duration), node=rng.randrange(n))
        if kind == "split":
            members = list(range(n))
            rng.shuffle(members)
            bounds = sorted(rng.sample(range(1, n), rng.choice((1, 2))))
            f.groups = [sorted(members[a:b]) for a, b in zip([0, *bounds], [*bounds, n], strict=True)]
        if kind == "skew":
            f.other = rng.choice((-3_000, -2_000, 2_500, 4_000))
        faults.append(f)
        t += rng.randint(100, 600)
    return Schedule(nodes=n, duration=duration, faults=faults, participants=None)


def clean_stop(*, crash: bool = False) -> Schedule:
    """Five members; n4 shuts down cleanly at 1 s and stays down, n3 at 2.5 s
    and comes back at 3.5 s.  Finality must go on without waiting
    ``evict_after_ms`` for either.  ``crash``: the same processes killed
    instead (the reference: there finality waits for the eviction)."""
    kind = "crash_long" if crash else "stop"
    return Schedule(nodes=5, duration=4_500, faults=[
        Fault(kind=kind, start=1_000, end=1 << 60, node=4),
        Fault(kind=kind, start=2_500, end=3_500, node=3)])


def stop_skew(gap: int = 100, ahead: int = -3_000, behind: int = 4_000) -> Schedule:
    """Two members shut down cleanly for a moment and come back with clocks
    past the limit: n4 at 1 s (then ``behind`` ms off), n0 ``gap`` ms later
    (then ``ahead`` ms off), both again at 3.6 s and 3.7 s.  Each is voted out
    at once and admitted again.  n4's vote against n0's first membership,
    stamped 4 s ahead, lay past n0's next admission in canonical order and
    counted against it: n0 stayed contested and finality stalled for good
    (7 of 45 runs of seeds 0-2 over gaps 50-800 ms).  A vote now names the
    admission it is against (``Evict.since``)."""
    return Schedule(nodes=5, duration=5_000, faults=[
        Fault(kind="stop", start=1_000, end=1_040, node=4),
        Fault(kind="skew", start=1_040, end=3_500, node=4, other=behind),
        Fault(kind="stop", start=1_000 + gap, end=1_060 + gap, node=0),
        Fault(kind="skew", start=1_060 + gap, end=3_500, node=0, other=ahead),
        Fault(kind="stop", start=3_600, end=3_650, node=4),
        Fault(kind="stop", start=3_700, end=3_750, node=0),
    ])


def stale_admission() -> Schedule:
    """An admission vote that never decides: three members; n2 crashes at 400 ms
    and is voted out; back at 2 s, it asks to be admitted again while split
    from n1 ({n0, n2} | {n1}), gets n0's vote only, and is gone for good at
    2.2 s.  n0's vote stays pending for good.  When a pending admission vote
    of a member stopped it certifying, n1's orders were never certified
    again: every one of them answered 503 no_quorum on a real node."""
    return Schedule(nodes=3, duration=5_000, faults=[
        Fault(kind="crash", start=400, end=2_000, node=2),
        Fault(kind="partition", start=1_950, end=2_400, node=0, groups=[[0, 2], [1]]),
        Fault(kind="crash_long", start=2_200, end=1 << 60, node=2),
    ])


PARTICIPANT_KINDS = ("crash", "crash", "crash_long", "stop", "pause", "skew", "split", "split", "deaf", "mute")


def participant_faults(rng: random.Random, n: int, p: int, duration: int) -> list[Fault]:
    """Faults of the participants (nodes n..n+p-1), any number at once and on
    top of the members' faults (a participant never holds finality back):
    crashes and restarts with the same key, a crash or a clean stop for good
    (``crash_long`` lasts to the end, unless a later crash of the same
    participant ends it: back after a long outage), pauses, clocks past the limit, links
    to some of the members cut both ways (``split`` with groups
    ``[[participant], members]``), and one-way links (``deaf``, ``mute``)."""
    faults: list[Fault] = []
    if not p:
        return faults
    t = rng.randint(200, 600)
    while t < duration - 300:
        kind = rng.choice(PARTICIPANT_KINDS)
        node = n + rng.randrange(p)
        f = Fault(kind=kind, start=t, end=min(t + rng.randint(100, 1_200), duration), node=node)
        if kind == "crash_long" or (kind == "stop" and rng.random() < 0.5):
            f.end = 1 << 60
        if kind == "split":
            f.groups = [[node], sorted(rng.sample(range(n), rng.randint(1, n)))]
        if kind == "skew":
            f.other = rng.choice((-3_000, -800, 600, 4_000))
        faults.append(f)
        t += rng.randint(150, 700)
    return faults


def key_for(seed: int, i: int) -> SigningKey:
    return SigningKey(blake2b(f"sim {seed} node {i}".encode(), digest_size=32).digest())


DISRUPTIVE = ("partition", "crash", "crash_long", "pause", "pause_long", "equivocate")


def plan(rng: random.Random, n: int, duration: int, *, storm: bool = False, stops: bool = False) -> list[Fault]:
    """The faults of one run.  By default one failure at a time: faults that
    cut a node off (crash, pause, partition, equivocation) do not overlap, and
    at most one of them lasts for good (a node down for good, or one that
    equivocates, which is then out for good); delay, loss, clock skew and
    strangers' entries come on top at any time.  Finality must then come back
    after healing.  A ``storm`` overlaps anything, and only safety is checked.
    ``stops``: every crash is a clean shutdown instead (a member's Leave
    first); every other fault of the seed stays as it was."""
    faults: list[Fault] = []
    t = 400
    busy_until = 0
    permanent = False
    while t < duration - 300:
        kind = rng.choice(FAULTS)
        node = rng.randrange(n)
        length = rng.randint(200, 1_500)
        if kind in DISRUPTIVE and not storm and (t < busy_until or permanent or n < 3):
            kind = rng.choice(("delay", "skew", "step_back", "past_stamp"))
        if kind == "equivocate":
            permanent = True
        if kind in ("crash_long", "pause_long"):
            length = rng.randint(1_200, 2_000)
            if kind == "crash_long" and not permanent and rng.random() < 0.5:
                permanent = True
                length = 1 << 60
        f = Fault(kind=kind, start=t, end=min(t + length, duration) if length < 1 << 59 else length, node=node)
        if kind in DISRUPTIVE:
            busy_until = f.end + 2 * PARAMS.evict_after_ms  # recovered: evicted or back, re-admitted
        if kind == "partition":
            members = list(range(n))
            rng.shuffle(members)
            cut = rng.randint(1, n - 1)
            f.groups = [sorted(members[:cut]), sorted(members[cut:])]
        if kind == "skew":
            f.other = rng.choice((-3_000, -2_000, 2_500, 4_000))
        if kind == "step_back":
            f.other = -rng.randint(500, 2_500)
        if stops and kind in ("crash", "crash_long"):
            f.kind = "stop"
        faults.append(f)
        t += rng.randint(150, 900)
    return faults


PARTICIPANTS = (0, 0, 1, 1, 2, 3, 4, 6)  # drawn per seed


def run(seed: int, *, trace: bool = False, storm: bool = False, stops: bool = False,
        rule: Callable[[SimNode], None] | None = None, schedule: Schedule | None = None,
        participants: int | None = None) -> Result:
    """One run; ``storm`` overlaps every kind of fault and checks safety only;
    ``stops`` makes every crash a clean shutdown (see ``plan``);
    ``rule`` may alter each node's core (a test of the checker itself);
    ``schedule`` pins the nodes, the duration and the faults;
    ``participants``: this many participants (and faults of theirs) instead
    of what the seed draws (a pinned schedule has none unless it says)."""
    return _run(seed, trace=trace, storm=storm, stops=stops, rule=rule, schedule=schedule,
                participants=participants)


def _run(seed: int, *, trace: bool, storm: bool, stops: bool, rule: Callable[[SimNode], None] | None,
         schedule: Schedule | None, participants: int | None) -> Result:
    rng = random.Random(seed)
    prng = random.Random(f"participants {seed}")  # theirs alone: a seed without any runs as it always did
    if schedule is None:
        n = rng.randint(3, 5)
        duration = rng.randint(2_500, 4_500)
    else:
        n, duration = schedule.nodes, schedule.duration
    if participants is None:
        participants = schedule.participants if schedule is not None else None
    p = prng.choice(PARTICIPANTS) if participants is None else participants
    net = Network(rng)
    nodes = [SimNode(i, key_for(seed, i), PARAMS, net, rng, participant=i >= n) for i in range(n + p)]
    directory = {nd.node_id: nd.index for nd in nodes}
    for nd in nodes:
        nd.peers = [j for j in range(n + p) if j != nd.index]
        nd.directory = directory
        if rule is not None:
            rule(nd)
    faults = plan(rng, n, duration, storm=storm, stops=stops) if schedule is None else list(schedule.faults)
    faults += participant_faults(prng, n, p, duration)
    checker = Checker.new(frozenset(f.node for f in faults if f.kind == "equivocate") if storm else frozenset())
    log: list[str] = []
    rate = rng.choice((20, 60, 150))  # orders per simulated second, over all nodes
    nodes[0].found(0)
    for nd in nodes[n:]:  # a participant is told which network it trades on
        assert nd.ex is not None and nodes[0].ex is not None and nodes[0].ex.network is not None
        nd.ex.set_network(nodes[0].ex.network)
        nd.disk.network = nodes[0].ex.network
    log.append(f"seed {seed}: {n} nodes" + (f" and {p} participants (n{n}-n{n + p - 1})" if p else "")
               + f", {duration} ms, {rate} orders/s, faults: "
               + "; ".join(f"{f.kind}@{f.start}-{f.end if f.end < 1 << 59 else 'end'} n{f.node}" for f in faults))
    now = 0
    steps = 0
    active: list[Fault] = []
    pending = sorted(faults, key=lambda f: f.start)
    backlog: dict[int, list[tuple[int, int, tuple[object, ...]]]] = {i: [] for i in range(n + p)}
    quiet_until = duration + 6_000
    healed = False
    converged_at = None
    progress_at, last_final, max_gap = 0, 0, 0  # node 0's final frontier, for max_final_gap_ms
    try:
        while now <= quiet_until:
            now += TICK_MS
            steps += 1
            while pending and pending[0].start <= now and not healed:
                f = pending.pop(0)
                _begin(f, nodes, net, now, rng, log)
                active.append(f)
            for f in [f for f in active if f.end <= now]:
                active.remove(f)
                _end(f, nodes, net, now, log)
            if now >= duration and not healed:
                healed = True
                for f in active:
                    _end(f, nodes, net, now, log)
                active.clear()
                pending.clear()
                for nd in nodes:
                    nd.skew_ms = 0
                log.append(f"{now}: healed; quiescing")
            for src, dst, (sent_wall, msg) in net.due(now):
                nd = nodes[dst]
                if nd.ex is None:
                    continue
                if nd.paused:
                    backlog[dst].append((src, sent_wall, msg))
                    continue
                nd.on_message(now, src, sent_wall, msg)
            for nd in nodes:
                if nd.ex is None or nd.paused:
                    continue
                if backlog[nd.index]:
                    for src, sent_wall, msg in backlog[nd.index]:
                        nd.on_message(now, src, sent_wall, msg)
                    backlog[nd.index] = []
                nd.step(now, PULL_MS, JOIN_MS)
            if not healed and rng.random() < rate * TICK_MS / 1000:
                traders = [nd for nd in nodes if nd.ex is not None and not nd.paused]
                if traders:
                    rng.choice(traders).trade(now, rng)
            checker.step(nodes)
            checker.acknowledged(nodes)
            first = nodes[0].ex
            if first is not None and not healed:
                if first.finality.final != last_final or not first.pending():
                    progress_at, last_final = now, first.finality.final
                max_gap = max(max_gap, now - progress_at)
            if steps % 40 == 0:
                checker.invariants(nodes)
            if healed and now >= duration + 300 and steps % 10 == 0:
                why = checker.converged(nodes)
                if why is None:
                    converged_at = now
                    break
        if converged_at is None and not storm:
            raise Violation(f"no convergence {quiet_until - duration} ms after healing: "
                            f"{checker.converged(nodes)}")
        checker.invariants(nodes)
        _agreed_decisions(nodes)
        if not storm:
            _own_orders_accounted(nodes, {f.node for f in faults if f.kind == "equivocate"})
        for nd in nodes:
            if nd.ex is not None:
                checker.replay(nd, _decisions_of(nd))
        violation = None
    except Violation as exc:
        violation = str(exc)
        log.append(f"{now}: VIOLATION {exc}")
    except Exception as exc:  # the core raised: a bug, reported with its seed like a violation
        violation = f"the core raised {exc!r}"
        log.append(f"{now}: VIOLATION {violation}")
        log.extend(traceback.format_exc().rstrip().splitlines())
    for nd in nodes:
        log.append(f"{'participant' if nd.participant else 'node'} {nd.index}: {'up' if nd.ex else 'down'}, "
                   f"final fills {len(nd.disk.final_fills)}, "
                   f"restarts {nd.restarts}, "
                   f"revoked {nd.revoked}, voided own {len(nd.voided)}"
                   + (f", member {nd.ex.is_member()}, F {nd.ex.finality.final >> 16}" if nd.ex else ""))
    return Result(
        seed=seed, nodes=n, steps=steps, finals=len(checker.canon),
        revoked=sum(nd.revoked for nd in nodes),
        evictions=len({(d.member, d.at) for nd in nodes for d in _decisions_of(nd)}),
        restarts=sum(nd.restarts for nd in nodes), violation=violation,
        acked=sum(len(nd.acked) for nd in nodes),
        trace=log if (trace or violation) else [], max_final_gap_ms=max_gap,
        participants=p, tickets=sum(len(nd.tickets_acked) for nd in nodes), carried_twice=checker.carried_twice,
    )


def _decisions_of(nd: SimNode) -> list[Decision]:
    """Every eviction this node has applied, across its restarts."""
    seen = {(d.member, d.at, d.cut) for d in nd.decisions}
    if nd.ex is not None:
        seen |= {(d.member, d.at, d.cut) for d in nd.ex.membership.decisions()}
    return [Decision(member=m, at=at, cut=cut) for m, at, cut in sorted(seen)]


def _agreed_decisions(nodes: list[SimNode]) -> None:
    """No two nodes decided one eviction with different cuts.  (A node may know
    a decision another has not reached yet; what is final is compared through
    the fills.)"""
    seen: dict[tuple[bytes, bytes], int] = {}
    for nd in nodes:
        for d in _decisions_of(nd):
            if seen.setdefault((d.member, d.at), d.cut) != d.cut:
                raise Violation(f"two nodes decided one eviction with different cuts (node {nd.index})")
    # and no two nodes closed one membership (an origin's interval, by its start) at
    # different votes: the deciding vote is part of the decision, not only the cut
    closed: dict[tuple[bytes, bytes], tuple[bytes, int | None]] = {}
    for nd in nodes:
        if nd.ex is None:
            continue
        for o in nd.ex.membership.ever_members():
            for iv in nd.ex.membership.intervals(o):
                if iv.closed_at is not None and \
                        closed.setdefault((o, iv.start), (iv.closed_at, iv.end_seq)) != (iv.closed_at, iv.end_seq):
                    raise Violation(f"two nodes closed one membership of {o.hex()[:8]} at different votes or cuts "
                                    f"(node {nd.index})")


def _own_orders_accounted(nodes: list[SimNode], equivocators: set[int]) -> None:
    """Every order a live node wrote (and so acknowledged) is, once everything
    is final, in its book or its final orders, or reported void on it: none
    counts nowhere unsaid.  (An equivocator's entries past its fork are cut
    without a report: it signed two histories.)"""
    for nd in nodes:
        if nd.ex is None or nd.index in equivocators:
            continue
        voided = {e.hash for e in nd.voided}
        for e in nd.disk.entries.get(nd.node_id, ()):
            if isinstance(e.body, Order) and e.hash not in voided and nd.ex.status(e.hash) is None \
                    and e.hash not in nd.disk.final_orders:
                raise Violation(f"node {nd.index}'s own order {e.hash.hex()[:16]} (seq {e.seq}) counts nowhere "
                                "and was not reported void")


def _begin(f: Fault, nodes: list[SimNode], net: Network, now: int, rng: random.Random, log: list[str]) -> None:
    nd = nodes[f.node]
    log.append(f"{now}: begin {f.kind} on node {f.node}" + (f" {f.groups}" if f.groups else "")
               + (f" {f.other:+d} ms" if f.other else ""))
    if f.kind == "delay":
        net.faults.delay_ms = (20, rng.randint(60, 200))
        net.faults.loss = rng.choice((0.05, 0.1, 0.2))
        net.faults.duplicate = rng.choice((0.0, 0.05, 0.2))
    elif f.kind == "partition":
        net.partition(f.groups)
    elif f.kind == "split":  # may overlap other cuts
        net.add_cut(id(f), across(f.groups))
    elif f.kind == "deaf":  # sends, hears nothing
        net.add_cut(id(f), {(o.index, f.node) for o in nodes if o.index != f.node})
    elif f.kind == "mute":  # hears, sends nothing that arrives
        net.add_cut(id(f), {(f.node, o.index) for o in nodes if o.index != f.node})
    elif f.kind in ("crash", "crash_long"):
        if nd.ex is not None:
            nd.crash()
    elif f.kind == "stop":
        if nd.ex is not None:
            nd.stop(now)
    elif f.kind in ("pause", "pause_long"):
        nd.paused = True
    elif f.kind in ("skew", "step_back"):
        nd.skew_ms += f.other
    elif f.kind == "equivocate":
        _equivocate(nd, nodes, net, now, rng, log)
    elif f.kind == "past_stamp":
        _past_stamp(nd, nodes, net, now, log)


def _end(f: Fault, nodes: list[SimNode], net: Network, now: int, log: list[str]) -> None:
    nd = nodes[f.node]
    if f.kind == "delay":
        net.faults.delay_ms = (1, 8)
        net.faults.loss = 0.0
        net.faults.duplicate = 0.0
    elif f.kind == "partition":
        net.heal()
    elif f.kind in ("split", "deaf", "mute"):
        net.drop_cut(id(f))
    elif f.kind in ("crash", "crash_long", "stop"):
        if nd.ex is None and f.end < 1 << 59:
            nd.restart(now)
    elif f.kind in ("pause", "pause_long"):
        nd.paused = False
    elif f.kind == "skew":
        nd.skew_ms -= f.other
    log.append(f"{now}: end {f.kind} on node {f.node}")


def _equivocate(nd: SimNode, nodes: list[SimNode], net: Network, now: int, rng: random.Random,
                log: list[str]) -> None:
    """A member signs two different entries at its next seq and shows each to
    half of its peers (it keeps the first itself)."""
    ex = nd.ex
    if ex is None or not ex.is_member() or nd.paused:
        return
    seq, prev, _ = ex.replica.head_info(nd.node_id)
    wall = nd.wall(now)
    try:
        a = ex.prepare(Order(side=0, price=103, qty=2), now_ms=wall)
    except ExchangeError:
        return
    b = make_entry(nd.key, seq=seq + 1, hlc=a.hlc + 1, prev=prev, body=Order(side=1, price=97, qty=2), ack=a.ack)
    nd.disk.commit([a])
    sub = ex.apply_own(a, now_ms=wall, mono_ms=now)
    assert sub.received is not None
    nd._absorb(sub.received, committed=a)
    peers = list(nd.peers)
    rng.shuffle(peers)
    half = len(peers) // 2
    for i, p in enumerate(peers):
        net.send(now, nd.index, p, (wall, ("push", [a if i < half else b])))
    log.append(f"{now}: node {nd.index} equivocates at seq {seq + 1}")


def _past_stamp(nd: SimNode, nodes: list[SimNode], net: Network, now: int, log: list[str]) -> None:
    """A fresh key, never admitted, sends an order stamped in 1970 and a heartbeat."""
    stranger = SigningKey(blake2b(f"stranger {now}".encode(), digest_size=32).digest())
    e1 = make_entry(stranger, seq=1, hlc=(1_000 << 16), prev=GENESIS, body=Order(side=1, price=90, qty=50))
    e2 = make_entry(stranger, seq=2, hlc=(2_000 << 16), prev=e1.hash, body=Heartbeat())
    for p in range(len(nodes)):
        net.send(now, nd.index, p, (nd.wall(now), ("push", [e1, e2])))
    log.append(f"{now}: a stranger pushes a 1970-stamped sell through node {nd.index}")

