"""Kademlia DHT used only as a rendezvous.

Every node writes its signed peer record under a couple of well-known slot
keys and reads all slots for seeds; HTTP peer exchange spreads the rest.
Bootstrap host names are resolved with getaddrinfo (the library wants IPs)
and retried with exponential backoff until a seed answers.  The DHT node id
is derived from the node's public key, so it is stable across restarts.
"""

from __future__ import annotations

import asyncio
import logging
from hashlib import blake2b

from kademlia.network import Server
from kademlia.protocol import KademliaProtocol
from tenacity import AsyncRetrying, retry_if_result, wait_exponential_jitter

from net.config import resolve_udp

log = logging.getLogger("p2pex.dht")
SLOTS = 4
SLOT_KEYS = [f"p2pex/seeds/{i}" for i in range(SLOTS)]
_DHT_TIMEOUT = 8.0

# The library warns on every lookup while the table is empty, which is normal
# for the first node of a network, and rpcudp logs an ERROR for every
# unanswered packet, which is what a seed that is not up yet looks like; the
# join loop below reports that itself.
logging.getLogger("kademlia").setLevel(logging.ERROR)
logging.getLogger("rpcudp").setLevel(logging.CRITICAL)


_RPC_TIMEOUT = 2  # seconds; the library's 5 s default slows every join attempt


class _Protocol(KademliaProtocol):  # type: ignore[misc]
    """The library's protocol, minus its tracebacks: a datagram that does not
    decode, or a request the library chokes on, raised out of a task and was
    logged with a traceback by asyncio (about 190 bytes of log per junk
    datagram).  Now it is counted and noted at DEBUG, limited per sender."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self._wait_timeout = _RPC_TIMEOUT
        self.junk = 0  # datagrams and requests dropped as malformed

    async def _solve_datagram(self, datagram: bytes, address: tuple[str, int]) -> None:
        try:
            await super()._solve_datagram(datagram, address)
        except Exception as exc:
            self._dropped(address, exc)

    async def _accept_request(self, msg_id: bytes, data: object, address: tuple[str, int]) -> None:
        try:
            await super()._accept_request(msg_id, data, address)
        except Exception as exc:
            self._dropped(address, exc)

    def _dropped(self, address: tuple[str, int], exc: Exception) -> None:
        self.junk += 1
        host = address[0] if isinstance(address, tuple) and address else "?"
        log.debug("dropped a malformed DHT datagram from %s: %s: %s", host, type(exc).__name__,
                  str(exc)[:120], extra={"repeat_key": ("dht junk", host)})


class _Server(Server):  # type: ignore[misc]
    protocol_class = _Protocol


class Discovery:
    def __init__(
        self, *, public_key: bytes, host: str, port: int, bootstrap: tuple[tuple[str, int], ...],
        own_name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        # A seed may list itself (one bootstrap list for every service): skip that entry.
        self.bootstrap_addrs = tuple(b for b in bootstrap if b != (own_name, port))
        self.server = _Server(node_id=blake2b(public_key, digest_size=20).digest())
        self.joined = asyncio.Event()
        self._slots = [SLOT_KEYS[public_key[0] % SLOTS], SLOT_KEYS[(public_key[0] + 1) % SLOTS]]

    async def listen(self) -> None:
        await self.server.listen(self.port, interface=self.host)
        if not self.bootstrap_addrs:
            self.joined.set()  # the first node of its network

    async def join(self) -> None:
        """Retry the bootstrap addresses until one answers (runs until it does)."""
        if not self.bootstrap_addrs:
            return
        loop = asyncio.get_running_loop()

        async def attempt() -> bool:
            addrs: list[tuple[str, int]] = []
            for host, port in self.bootstrap_addrs:
                try:
                    addrs += await loop.run_in_executor(None, resolve_udp, host, port)
                except OSError as exc:
                    log.info("bootstrap %s:%d does not resolve yet: %s", host, port, exc)
            if not addrs:
                return False
            found = await asyncio.wait_for(self.server.bootstrap(addrs), _DHT_TIMEOUT)
            if not found:
                log.info("bootstrap %s not answering yet; retrying", addrs)
            return bool(found)

        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            retry=retry_if_result(lambda ok: not ok),
            reraise=True,
        )
        async for attempt_ctx in retrying:
            with attempt_ctx:
                try:
                    ok = await attempt()
                except TimeoutError:
                    ok = False
            attempt_ctx.retry_state.set_result(ok)
        self.joined.set()
        log.info("joined the DHT")

    async def observed_host(self) -> str | None:
        """Our IP as a bootstrap node sees it (STUN over the DHT protocol)."""
        for host, port in self.bootstrap_addrs:
            try:
                addrs = await asyncio.get_running_loop().run_in_executor(None, resolve_udp, host, port)
                for addr in addrs:
                    result = await asyncio.wait_for(self.server.protocol.stun(addr), _DHT_TIMEOUT)
                    if result and result[0]:
                        return str(result[1][0])
            except (OSError, TimeoutError):
                continue
        return None

    async def publish(self, record: bytes) -> None:
        for key in self._slots:
            try:
                await asyncio.wait_for(self.server.set(key, record), _DHT_TIMEOUT)
            except TimeoutError:
                log.debug("publishing under %s timed out", key)

    async def seeds(self) -> list[bytes]:
        out: list[bytes] = []
        for key in SLOT_KEYS:
            try:
                value = await asyncio.wait_for(self.server.get(key), _DHT_TIMEOUT)
            except TimeoutError:
                continue
            if isinstance(value, bytes):
                out.append(value)
        return out

    def stop(self) -> None:
        self.server.stop()
