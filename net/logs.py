"""Logging for the node: repeated warnings counted and summarised, and no
tracebacks for what strangers send.

``RepeatFilter`` lets the first few records of a kind through per window
(per minute by default) and counts the rest; when the window ends (or the
node stops) it logs one line, ``N more like this in the last S s: ...``.
A record's kind is ``extra={"repeat_key": ...}`` when the caller names one
(the node uses (what, peer id, peer address, code)), else its logger, level
and message template; records below WARNING are limited only when they name
a key.  ``BadRequestFilter`` turns aiohttp's traceback for a malformed HTTP
request (730 bytes each) into one short line with a key.  ``last_lines``
reads the end of a log file (the demo quotes a node that exited; the test
harness shows a failed node's log).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPEATS_SHOWN = 5
REPEAT_WINDOW_S = 60.0
MAX_KINDS = 10_000  # kinds tracked at once; past it the oldest windows are closed early

_filters: list[RepeatFilter] = []


@dataclass(slots=True)
class _Window:
    start: float
    seen: int
    suppressed: int
    name: str
    level: int
    sample: str


class RepeatFilter(logging.Filter):
    def __init__(self, *, shown: int = REPEATS_SHOWN, window_s: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.shown = shown
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        key = getattr(record, "repeat_key", None)
        if key is None:
            if record.levelno < logging.WARNING:
                return True
            key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:120])
        now = self.clock()
        win = self._windows.get(key)
        if win is not None and now - win.start >= self.window_s:
            self._close(key, win, now)
            win = None
        if win is None:
            if len(self._windows) >= MAX_KINDS:
                self.flush(force=True)
            win = self._windows[key] = _Window(start=now, seen=0, suppressed=0, name=record.name,
                                               level=record.levelno, sample="")
        win.seen += 1
        if win.seen <= self.shown:
            return True
        if not win.suppressed:
            try:
                win.sample = record.getMessage()[:300]
            except Exception:  # a record whose arguments do not format
                win.sample = str(record.msg)[:300]
        win.suppressed += 1
        self.suppressed_total += 1
        return False

    def _close(self, key: Hashable, win: _Window, now: float) -> None:
        del self._windows[key]
        if win.suppressed:
            logging.getLogger(win.name).log(
                win.level, "%d more like this in the last %.0f s, e.g.: %s", win.suppressed,
                max(now - win.start, 0.0), win.sample, extra={"repeat_summary": True})

    def flush(self, *, force: bool = False) -> None:
        """Close the windows that ended (every window with ``force``), logging their summaries."""
        now = self.clock()
        for key, win in list(self._windows.items()):
            if force or now - win.start >= self.window_s:
                self._close(key, win, now)


class BadRequestFilter(logging.Filter):
    """For ``aiohttp.server``: a malformed request from a client is one line at
    INFO, limited per client address, not an ERROR with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__module__ != "aiohttp.http_exceptions":
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        first_line = " ".join(str(exc).split())[:160]
        record.msg = "bad HTTP request from %s: %s"
        record.args = (remote, first_line)
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.INFO
        record.levelname = "INFO"
        record.repeat_key = ("bad http request", remote)
        return True


def setup_logging(*, level: int, fmt: str, handlers: Sequence[logging.Handler]) -> RepeatFilter:
    """Configure the root logger with repeat limits on every handler."""
    logging.basicConfig(level=level, format=fmt, handlers=list(handlers))
    repeats = RepeatFilter()
    for h in handlers:
        h.addFilter(repeats)
    logging.getLogger("aiohttp.server").addFilter(BadRequestFilter())
    _filters.append(repeats)
    return repeats


def flush(*, force: bool = False) -> None:
    """Log the summaries of the windows that ended, in every installed filter."""
    for f in _filters:
        f.flush(force=force)


def last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` non-empty lines of a log file, read from its end
    (a long run's log is large); none if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 512 * count))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-count:]
