"""A slow TCP link for tests: a proxy on 127.0.0.1 that forwards each
direction in small chunks with a pause between them.

It runs its own event loop in a thread, so a test (or a node process) can dial
it like any address.  ``chunk`` bytes every ``pause`` seconds bounds the
throughput; every connection is closed on ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class SlowLink:
    def __init__(self, *, listen_port: int, target_port: int, chunk: int = 16 * 1024,
                 pause: float = 0.004, host: str = "127.0.0.1") -> None:
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.chunk = chunk
        self.pause = pause
        self.bytes_forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="slow-link", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> SlowLink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5.0)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.listen_port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_w))
        try:
            await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer))
        finally:
            for w in (writer, up_w):
                self._writers.discard(w)
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await src.read(self.chunk)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
                self.bytes_forwarded += len(data)
                await asyncio.sleep(self.pause)
        with contextlib.suppress(OSError):
            dst.write_eof()


@contextlib.contextmanager
def slow_link(**kwargs: object) -> Iterator[SlowLink]:
    link = SlowLink(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield link
    finally:
        link.stop()
