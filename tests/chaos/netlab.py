"""Network namespaces on a bridge, and the packet faults that live inside them.

One namespace per host (``p2pex-chaos-<tag>-<name>``), each with its loopback
up and an ``eth0`` veth into one bridge in the root namespace, on a private
/24 that nothing here uses (10.232.X.0/24).  The root namespace holds the
bridge address ``.1``: the clients and the observer talk to the nodes from
there, and no fault ever touches that traffic.

Faults between hosts are iptables rules in the *receiving* host's namespace,
so the sender never sees an error (an OUTPUT rule that drops makes ``send``
fail with EPERM, which no real network does):

- a cut link drops every packet from the sender (filter ``INPUT``), in either
  direction or both: partitions, isolation, one-way cuts;
- loss drops a random share of them (``-m statistic --mode random``);
- delay, jitter and reordering hand them to a netfilter queue that the link
  shaper process (``shaper.py``) releases late and out of order;
- duplication clones a random share at the sender (mangle ``OUTPUT``,
  ``TEE --gateway <receiver>``), and the clone is shaped on arrival like any
  packet, so a duplicate comes late or early on its own schedule.

The rules of one namespace live in two chains of its own (``CHAOS_IN``,
``CHAOS_DUP``), rewritten as a whole with ``iptables-restore --noflush`` on
every change; they vanish with the namespace.  ``close`` removes everything
this lab created (veths, bridge, namespaces) and never raises.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SUBNET_BASE = "10.232"
QUEUE_NUM = 7  # the netfilter queue of the link shaper, in every namespace
CMD_TIMEOUT_S = 15.0


class LabError(RuntimeError):
    """A command that builds or changes the lab failed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    name: str
    index: int
    ns: str
    ip: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkFault:
    """What happens to packets from one host to another (a directed link)."""

    cut: bool = False  # drop everything
    loss: float = 0.0  # share of packets dropped, 0..1
    dup: float = 0.0  # share of packets sent twice, 0..1
    shaped: bool = False  # through the shaper's queue (delay, jitter, reordering)

    @property
    def healthy(self) -> bool:
        return not (self.cut or self.loss or self.dup or self.shaped)


def run(*argv: str, stdin: str | None = None, timeout: float = CMD_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def quiet(*argv: str) -> None:
    """A teardown step: best effort, never raises."""
    with contextlib.suppress(Exception):
        subprocess.run(argv, capture_output=True, timeout=CMD_TIMEOUT_S, check=False)


def _probe_iptables(ns: str) -> str | None:
    """The iptables flavour that works in a namespace here (nft first), or None."""
    for binary in ("iptables", "iptables-legacy"):
        if shutil.which(binary) is None:
            continue
        try:
            run("ip", "netns", "exec", ns, binary, "-w", "-N", "CHAOS_PROBE")
            run("ip", "netns", "exec", ns, binary, "-w", "-A", "CHAOS_PROBE", "-s", "10.0.0.1",
                "-m", "statistic", "--mode", "random", "--probability", "0.5", "-j", "DROP")
            return binary
        except LabError:
            continue
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What this machine allows: ``reason`` is None when the suite can run at all."""

    reason: str | None
    iptables: str | None = None
    nfqueue: str | None = None  # why the shaper cannot run here, or None when it can


def capabilities() -> Capabilities:
    """Probe namespaces, iptables and netfilter queues in a throwaway namespace."""
    if not sys.platform.startswith("linux"):
        return Capabilities(reason="network namespaces are Linux only")
    if os.geteuid() != 0:
        return Capabilities(reason="creating network namespaces needs root")
    if shutil.which("ip") is None:
        return Capabilities(reason="iproute2 (`ip`) is not installed")
    probe = f"p2pex-chaos-probe-{secrets.token_hex(3)}"
    link = f"p2q{secrets.token_hex(3)}"
    try:
        run("ip", "netns", "add", probe)
    except LabError as exc:
        return Capabilities(reason=f"`ip netns add` is not permitted here: {exc}")
    try:
        try:
            run("ip", "netns", "exec", probe, "true")
            run("ip", "link", "add", link, "type", "bridge")
        except LabError as exc:
            return Capabilities(reason=f"network namespaces are not usable here: {exc}")
        iptables = _probe_iptables(probe)
        if iptables is None:
            why = ("iptables is not installed (apt-get install iptables)"
                   if shutil.which("iptables") is None and shutil.which("iptables-legacy") is None
                   else "iptables does not work in a network namespace here")
            return Capabilities(reason=why)
        nfqueue: str | None = None
        try:
            from tests.chaos.nfqueue import open_queue

            open_queue(probe, QUEUE_NUM).close()
        except OSError as exc:
            nfqueue = f"netfilter queues (nfnetlink_queue) are not usable here: {exc}"
        return Capabilities(reason=None, iptables=iptables, nfqueue=nfqueue)
    finally:
        quiet("ip", "link", "del", link)
        quiet("ip", "netns", "del", probe)


def free_prefix() -> str:
    """A 10.232.X prefix no interface or route here uses."""
    used = run("ip", "-4", "-o", "addr") + run("ip", "-4", "route")
    for _ in range(50):
        prefix = f"{SUBNET_BASE}.{secrets.randbelow(254) + 1}"
        if prefix + "." not in used:
            return prefix
    raise LabError(f"no free {SUBNET_BASE}.X.0/24 subnet")


class NetLab:
    """Hosts in namespaces on one bridge, and the link faults between them."""

    def __init__(self, names: Iterable[str], *, iptables: str = "iptables") -> None:
        self.tag = secrets.token_hex(3)
        self.iptables = iptables
        self.names = list(names)
        self.bridge = f"p2x{self.tag}"
        self.prefix = ""
        self.hosts: dict[str, Host] = {}
        self._links: list[str] = []  # created links, deleted in this order
        self._namespaces: list[str] = []
        self._faults: dict[tuple[str, str], LinkFault] = {}
        self._counts: dict[str, int] = {}  # packets the rules matched, before their chains were rewritten

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (where clients connect from)."""
        return f"{self.prefix}.1"

    def build(self) -> None:
        self.prefix = free_prefix()
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for index, name in enumerate(self.names):
            host = Host(name=name, index=index, ns=f"p2pex-chaos-{self.tag}-{name}", ip=f"{self.prefix}.{10 + index}")
            run("ip", "netns", "add", host.ns)
            self._namespaces.append(host.ns)
            self.hosts[name] = host
            outer, inner = f"p2y{self.tag}{index}", f"p2z{self.tag}{index}"
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            self._links.insert(0, outer)  # host ends first, then the bridge
            run("ip", "link", "set", inner, "netns", host.ns)
            run("ip", "link", "set", outer, "master", self.bridge)
            run("ip", "link", "set", outer, "up")
            run("ip", "-n", host.ns, "link", "set", "lo", "up")
            run("ip", "-n", host.ns, "link", "set", inner, "name", "eth0")
            run("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            run("ip", "-n", host.ns, "link", "set", "eth0", "up")
            self._restore(host, "*filter\n:CHAOS_IN - [0:0]\n-A INPUT -j CHAOS_IN\nCOMMIT\n"
                                "*mangle\n:CHAOS_DUP - [0:0]\n-A OUTPUT -j CHAOS_DUP\nCOMMIT\n")

    def close(self) -> None:
        for link in self._links:
            quiet("ip", "link", "del", link)
        for ns in self._namespaces:
            quiet("ip", "netns", "del", ns)
        self._links.clear()
        self._namespaces.clear()

    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` to run inside host ``name``'s namespace (``ip netns exec`` execs: same pid)."""
        return ["ip", "netns", "exec", self.hosts[name].ns, *argv]

    # ---- faults ---------------------------------------------------------------------

    @property
    def faults(self) -> dict[tuple[str, str], LinkFault]:
        return dict(self._faults)

    def set_faults(self, faults: Mapping[tuple[str, str], LinkFault]) -> None:
        """Make ``faults`` (keyed by (sender, receiver) names) the whole fault state:
        links not named are healthy.  Rewrites only the namespaces that change."""
        new = {k: v for k, v in faults.items() if not v.healthy}
        for key in new:
            if key[0] not in self.hosts or key[1] not in self.hosts or key[0] == key[1]:
                raise ValueError(f"no link {key}")
        changed = set(new.items()) ^ set(self._faults.items())
        touched = {key[1] for key, _ in changed} | {key[0] for key, f in changed if f.dup}
        for name in sorted(touched):
            self._count(self.hosts[name])
            self._apply(self.hosts[name], new)
        self._faults = new

    def heal(self) -> None:
        self.set_faults({})

    def _apply(self, host: Host, faults: Mapping[tuple[str, str], LinkFault]) -> None:
        inbound = ["*filter", ":CHAOS_IN - [0:0]"]
        for (src, dst), f in sorted(faults.items()):
            if dst != host.name:
                continue
            sip = self.hosts[src].ip
            if f.cut:
                inbound.append(f"-A CHAOS_IN -s {sip} -j DROP")
                continue
            if f.loss:
                inbound.append(f"-A CHAOS_IN -s {sip} -m statistic --mode random --probability {f.loss:.4f} -j DROP")
            if f.shaped:
                inbound.append(f"-A CHAOS_IN -s {sip} -j NFQUEUE --queue-num {QUEUE_NUM} --queue-bypass")
        outbound = ["*mangle", ":CHAOS_DUP - [0:0]"]
        for (src, dst), f in sorted(faults.items()):
            if src == host.name and f.dup and not f.cut:
                dip = self.hosts[dst].ip
                outbound.append(f"-A CHAOS_DUP -d {dip} -m statistic --mode random --probability {f.dup:.4f} "
                                f"-j TEE --gateway {dip}")
        self._restore(host, "\n".join([*inbound, "COMMIT", *outbound, "COMMIT", ""]))

    def _count(self, host: Host) -> None:
        """Add what the chaos chains of ``host`` matched since the last count, and zero them."""
        for table, chain in (("filter", "CHAOS_IN"), ("mangle", "CHAOS_DUP")):
            out = run("ip", "netns", "exec", host.ns, self.iptables, "-w", "-t", table, "-L", chain, "-v", "-x", "-n",
                      "-Z")
            for line in out.splitlines()[2:]:
                fields = line.split()
                if len(fields) < 3 or not fields[0].isdigit():
                    continue
                target = fields[2]
                kind = {"NFQUEUE": "queued", "TEE": "duplicated"}.get(
                    target, "lost" if "statistic" in line else "cut")
                self._counts[kind] = self._counts.get(kind, 0) + int(fields[0])

    def take_counts(self) -> dict[str, int]:
        """Packets cut, lost, queued and duplicated since the last call."""
        for name in sorted({k[1] for k in self._faults} | {k[0] for k, f in self._faults.items() if f.dup}):
            self._count(self.hosts[name])
        counts, self._counts = self._counts, {}
        return counts

    def _restore(self, host: Host, rules: str) -> None:
        run("ip", "netns", "exec", host.ns, f"{self.iptables}-restore", "-w", "--noflush", stdin=rules)

    def rules(self, name: str) -> str:
        """The chaos chains of one namespace, as ``iptables -S`` prints them (for logs)."""
        host = self.hosts[name]
        out = run("ip", "netns", "exec", host.ns, self.iptables, "-w", "-S", "CHAOS_IN")
        return out + run("ip", "netns", "exec", host.ns, self.iptables, "-w", "-t", "mangle", "-S", "CHAOS_DUP")
