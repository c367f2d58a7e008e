"""Hybrid logical clock: 48-bit physical milliseconds, 16-bit counter.

Owns stamping and advancing; the physical clock is passed in by the caller.
"""

from __future__ import annotations

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
MAX_HLC = (1 << 64) - 1
DEFAULT_MAX_SKEW_MS = 5_000


def pack(physical_ms: int, counter: int) -> int:
    return (physical_ms << COUNTER_BITS) | counter


def physical_ms(hlc: int) -> int:
    return hlc >> COUNTER_BITS


class Hlc:
    """A node's clock. ``now`` stamps a local event, ``observe`` a received one.

    Both return a value strictly greater than any value returned or observed
    before, so a node's own log has strictly increasing stamps.
    """

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def now(self, wall_ms: int) -> int:
        candidate = pack(wall_ms, 0)
        self.last = candidate if candidate > self.last else self.last + 1
        return self.last

    def observe(self, remote: int) -> None:
        """Advance past a received stamp (already checked for skew)."""
        if remote > self.last:
            self.last = remote
