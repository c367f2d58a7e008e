"""The fault injection itself, on two namespaces and plain UDP: a cut link,
loss, duplication, and delay with reordering through the link shaper, then
healing and clean-up.  Skipped, with the reason, where the machine allows no
namespaces or has no iptables (and the shaper part where it has no netfilter
queues)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.netlab import Capabilities, LinkFault, NetLab, capabilities
from tests.chaos.shaper import LinkShape, Shaper

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_netlab")

PORT = 9555
# runs inside a namespace: receive (and echo) datagrams for a while, print what came
RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
got = []
try:
    while len(got) < 100000:
        data, peer = s.recvfrom(100)
        got.append(int(data.split()[0]))
        s.sendto(data, peer)
except socket.timeout:
    pass
print(" ".join(map(str, got)))
"""
# runs inside a namespace: send numbered datagrams, print the round trip of each echo (ms)
SENDER = """
import socket, sys, time
n, gap = int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.0)
sent, rtts = {}, []
for i in range(n):
    sent[i] = time.monotonic()
    s.sendto(f"{i} x".encode(), (sys.argv[1], int(sys.argv[2])))
    time.sleep(gap)
    try:
        while True:
            data = s.recv(100)
            rtts.append((time.monotonic() - sent[int(data.split()[0])]) * 1000)
    except BlockingIOError:
        pass
s.settimeout(0.6)
try:
    while True:
        data = s.recv(100)
        rtts.append((time.monotonic() - sent[int(data.split()[0])]) * 1000)
except socket.timeout:
    pass
print(" ".join(f"{r:.1f}" for r in rtts))
"""


@pytest.fixture(scope="module")
def caps() -> Capabilities:
    found = capabilities()
    if found.reason:
        pytest.skip(found.reason)
    return found


@pytest.fixture
def lab(caps: Capabilities) -> Iterator[NetLab]:
    lab = NetLab(["a", "b"], iptables=caps.iptables or "iptables")
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def send(lab: NetLab, n: int, gap: float = 0.002, listen: float = 0.8) -> tuple[list[int], list[float]]:
    """``n`` datagrams from a to b, each echoed back: (numbers b received in
    arrival order, round trips a measured in ms)."""
    b = lab.hosts["b"]
    rx = subprocess.Popen(lab.exec_argv("b", [sys.executable, "-c", RECEIVER, b.ip, str(PORT), str(listen)]),
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"  # bound before anything is sent
        tx = subprocess.run(lab.exec_argv("a", [sys.executable, "-c", SENDER, b.ip, str(PORT), str(n), str(gap)]),
                            capture_output=True, text=True, timeout=60, check=True)
        out, _ = rx.communicate(timeout=60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return [int(x) for x in out.split()], [float(x) for x in tx.stdout.split()]


class TestLinkFaults:
    def test_cut_is_one_way_and_heals(self, lab: NetLab) -> None:
        got, rtts = send(lab, 50)
        assert len(got) == 50 and len(rtts) == 50
        lab.set_faults({("b", "a"): LinkFault(cut=True)})  # the echoes die, the datagrams arrive
        got, rtts = send(lab, 50)
        assert len(got) == 50 and rtts == []
        assert "-j DROP" in lab.rules("a") and "DROP" not in lab.rules("b")
        assert lab.take_counts().get("cut") == 50
        lab.heal()
        got, rtts = send(lab, 50)
        assert len(rtts) == 50

    def test_loss_and_duplicates(self, lab: NetLab) -> None:
        lab.set_faults({("a", "b"): LinkFault(loss=0.3)})
        got, _ = send(lab, 400)
        assert 200 < len(got) < 340, len(got)
        lab.set_faults({("a", "b"): LinkFault(dup=0.5)})
        got, _ = send(lab, 400)
        assert len(set(got)) == 400 and len(got) > 520, len(got)
        counts = lab.take_counts()
        assert counts.get("duplicated", 0) > 120 and counts.get("lost", 0) > 60, counts


class TestShaper:
    def test_delay_jitter_reordering(self, lab: NetLab, caps: Capabilities, tmp_path: Path) -> None:
        if caps.nfqueue:
            pytest.skip(caps.nfqueue)
        a, b = lab.hosts["a"], lab.hosts["b"]
        shaper = Shaper([a.ns, b.ns], log_path=tmp_path / "shaper.log", seed=3)
        shaper.start()
        try:
            lab.set_faults({("a", "b"): LinkFault(shaped=True)})
            shaper.set_links([LinkShape(ns=b.ns, src=a.ip, delay_lo_ms=60, delay_hi_ms=140, reorder=0.2,
                                        reorder_ms=100)])
            got, rtts = send(lab, 100, gap=0.005)
            assert len(got) == 100 and len(rtts) == 100
            assert min(rtts) >= 55 and max(rtts) < 400, (min(rtts), max(rtts))
            inversions = sum(1 for x, y in itertools.pairwise(got) if y < x)
            assert inversions >= 10, got
            stats = shaper.stats()
            assert stats["delayed"] >= 100 and stats["reordered"] >= 5, stats
            shaper.clear()
            lab.heal()
            got, rtts = send(lab, 50)
            assert len(rtts) == 50 and max(rtts) < 50, max(rtts)
        finally:
            shaper.stop()
        assert shaper.proc is not None and shaper.proc.returncode == 0, (tmp_path / "shaper.log").read_text()


class TestCleanup:
    def test_close_removes_every_namespace_and_link(self, caps: Capabilities) -> None:
        lab = NetLab(["x", "y"], iptables=caps.iptables or "iptables")
        try:
            lab.build()
            lab.set_faults({("x", "y"): LinkFault(cut=True)})
        finally:
            lab.close()
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert lab.tag not in namespaces and lab.tag not in links
