"""The node process's event loop, run to the end of its main coroutine, with
an exit that waits for nothing without bound.

``asyncio.run`` (and ``uvloop.run``, which is ``asyncio.Runner`` on Python
3.11) end by cancelling every task still pending and waiting for all of them,
then for the default executor's threads, with no bound on either: one task
that drops its cancellation, or one thread in a ``getaddrinfo`` that a name
server never answers, keeps the process alive after the node has stopped.
``run`` gives what is left EXIT_GRACE_S (cancelling it again meanwhile),
names in the log what did not end, and closes the loop.  The node's own
lookups run in daemon threads (``net.threads``), which nothing waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("p2pex.node")

EXIT_GRACE_S = 0.25
RECANCEL_S = 0.05


def run(main: Coroutine[Any, Any, None], *, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Run ``main`` on a new loop from ``loop_factory``, then wind down (at
    most about EXIT_GRACE_S) and close the loop."""
    loop = loop_factory()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(_wind_down(EXIT_GRACE_S))
        finally:
            asyncio.set_event_loop(None)
            loop.close()  # the default executor, if anything used it, is shut down without waiting


async def _wind_down(grace: float) -> None:
    """Cancel every other task and wait for them, re-cancelling, at most
    ``grace``; then close async generators within what is left of it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    me = asyncio.current_task()
    left = {t for t in asyncio.all_tasks() if t is not me}
    while left and loop.time() < deadline:
        for task in left:
            task.cancel()
        _, left = await asyncio.wait(left, timeout=max(0.0, min(RECANCEL_S, deadline - loop.time())))
    if left:
        log.warning("exiting with %d tasks that did not end when cancelled: %s", len(left),
                    ", ".join(sorted(t.get_name() for t in left)[:10]))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(deadline - loop.time(), 0.01)):
            await loop.shutdown_asyncgens()


__all__ = ["EXIT_GRACE_S", "run"]
