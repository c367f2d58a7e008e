"""The simulated network: messages in flight with delivery times.

Owns delay (a base plus jitter, so messages reorder), loss, duplication and
partitions (a set of node pairs that cannot talk).  Everything random comes
from the generator the simulation passes in.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, kw_only=True)
class LinkFaults:
    delay_ms: tuple[int, int] = (1, 8)  # uniform range
    loss: float = 0.0
    duplicate: float = 0.0


@dataclass(order=True, slots=True)
class _InFlight:
    at: int
    n: int
    src: int = field(compare=False)
    dst: int = field(compare=False)
    msg: Any = field(compare=False)


def across(groups: list[list[int]]) -> set[tuple[int, int]]:
    """Every directed pair of nodes in different groups."""
    return {(a, b) for g in groups for h in groups if g is not h for a in g for b in h}


class Network:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.faults = LinkFaults()
        self.cut: set[tuple[int, int]] = set()  # directed pairs that drop everything
        self._base: set[tuple[int, int]] = set()  # the partition's pairs
        self._extra: dict[int, set[tuple[int, int]]] = {}  # overlapping cuts, by tag
        self._queue: list[_InFlight] = []
        self._n = 0
        self.sent = 0
        self.dropped = 0

    def partition(self, groups: list[list[int]]) -> None:
        """Only nodes in the same group can talk."""
        self._base = across(groups)
        self._recut()

    def heal(self) -> None:
        self._base = set()
        self._recut()

    def add_cut(self, tag: int, pairs: set[tuple[int, int]]) -> None:
        """Drop every message from a to b for each (a, b), on top of any other
        cut, until ``drop_cut(tag)`` (one-way links, overlapping partitions)."""
        self._extra[tag] = set(pairs)
        self._recut()

    def drop_cut(self, tag: int) -> None:
        self._extra.pop(tag, None)
        self._recut()

    def _recut(self) -> None:
        self.cut = self._base.union(*self._extra.values())

    def send(self, now: int, src: int, dst: int, msg: Any) -> None:
        self.sent += 1
        if (src, dst) in self.cut or self.rng.random() < self.faults.loss:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            lo, hi = self.faults.delay_ms
            self._n += 1
            heapq.heappush(self._queue, _InFlight(now + self.rng.randint(lo, hi), self._n, src, dst, msg))

    def due(self, now: int) -> list[tuple[int, int, Any]]:
        """Messages whose delivery time has come, in delivery order; a message
        across a cut made while it was in flight is lost."""
        out = []
        q = self._queue
        while q and q[0].at <= now:
            m = heapq.heappop(q)
            if (m.src, m.dst) in self.cut:
                self.dropped += 1
                continue
            out.append((m.src, m.dst, m.msg))
        return out

    def in_flight(self) -> int:
        return len(self._queue)
