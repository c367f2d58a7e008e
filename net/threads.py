"""Blocking calls off the event loop (``getaddrinfo``), each in a daemon
thread of its own, so that nothing ever waits for them at exit.

The loop's default executor would run them too, but its threads are joined
when the process ends: ``asyncio.run`` waits for them (``shutdown_default_executor``,
without a bound on Python 3.11), and so does the interpreter at exit.  One
lookup stuck on a name server that does not answer kept a stopped node's
process alive for as long as the resolver's timeouts and retries last.  A
daemon thread is never waited for; a result that comes after its caller gave
up (a stop cancels it) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_THREADS = 32  # calls under way at once, in the whole process; past it a call fails with OSError

_lock = threading.Lock()
_running = 0


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a daemon thread; its result, or what it raised.
    Raises OSError at once when MAX_THREADS calls are under way (every
    caller here is a lookup, which fails with OSError anyway)."""
    global _running
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    with _lock:
        if _running >= MAX_THREADS:
            raise OSError(f"{MAX_THREADS} lookups under way already")
        _running += 1

    def work() -> None:
        global _running
        try:
            value = fn(*args)
        except BaseException as exc:  # handed to the caller, whatever it is
            finish = functools.partial(_fail, done, exc)
        else:
            finish = functools.partial(_succeed, done, value)
        finally:
            with _lock:
                _running -= 1
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(finish)

    threading.Thread(target=work, name=f"off-loop {getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await done


def _succeed(done: asyncio.Future[T], value: T) -> None:
    if not done.done():  # else the caller gave up
        done.set_result(value)


def _fail(done: asyncio.Future[Any], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)


__all__ = ["MAX_THREADS", "off_loop"]
