"""Token buckets: how fast one client may call a node.

Three limits, each ``RATE[/BURST]`` per second (``0`` turns one off):

- writes (``POST /v1/orders``, ``DELETE /v1/orders/{id}``) per client token;
- reads of the client API per client address, weighted by what a reply
  costs (a page of 1,000 fills costs 10, a status call 1);
- peer routes per peer address.

A request over its limit gets ``429 rate_limited`` with ``Retry-After`` and
changes nothing.  ``/healthz`` and ``/readyz`` are never limited.  The
defaults (5,000/s, bursts of 10,000) leave room for 2,000 orders/s through
one node while one abusive client is throttled.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    per_s: float
    burst: float


def parse_rate(text: str) -> Rate | None:
    """``RATE`` or ``RATE/BURST`` (burst defaults to twice the rate); ``0`` or ``off``: no limit."""
    value = text.strip().lower()
    if value in ("0", "off", "none", ""):
        return None
    rate_text, _, burst_text = value.partition("/")
    try:
        per_s = float(rate_text)
        burst = float(burst_text) if burst_text else 2 * per_s
    except ValueError:
        raise ValueError(f"expected RATE[/BURST] (per second), got {text!r}") from None
    if not per_s > 0 or not burst >= 1:
        raise ValueError(f"rate must be positive and burst at least 1, got {text!r}")
    return Rate(per_s=per_s, burst=burst)


class Buckets:
    """One token bucket per key; the least recently used keys are forgotten
    past ``max_keys`` (a forgotten key starts again with a full bucket)."""

    def __init__(self, rate: Rate, *, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self.limited = 0

    def take(self, key: Hashable, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens: 0.0 when allowed, else the seconds until it would be."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + (now - at) * self.rate.per_s)
        cost = min(cost, self.rate.burst)  # a request dearer than the burst still passes once full
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / self.rate.per_s
            self.limited += 1
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
