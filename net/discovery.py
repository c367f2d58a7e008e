"""Kademlia DHT used only as a rendezvous.

Every node writes its signed peer record under a couple of well-known slot
keys and reads all slots for seeds; HTTP peer exchange spreads the rest.
Bootstrap host names are resolved with getaddrinfo (the library wants IPs)
and retried with exponential backoff until a seed answers.  The DHT node id
is derived from the node's public key, so it is stable across restarts.

Every wait here is cancellable at once, so a stop never waits for the DHT:
time limits are ``asyncio.timeout`` blocks (Python 3.11's ``wait_for``
returns the result, and drops the cancellation, when what it waits for ends
in the same step), nothing catches a cancellation, lookups run in daemon
threads (``net.threads``), and ``stop`` settles the library's calls still
waiting for an answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from hashlib import blake2b

from kademlia.network import Server
from kademlia.protocol import KademliaProtocol

from net.config import resolve_udp
from net.threads import off_loop

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
JOIN_FIRST_WAIT_S = 0.2  # between join attempts: doubling from this, plus up to JOIN_JITTER_S, at most JOIN_MAX_WAIT_S
JOIN_JITTER_S = 1.0
JOIN_MAX_WAIT_S = 5.0


def join_wait(failures: int, rng: random.Random) -> float:
    """Seconds before the next join attempt, after ``failures`` failed ones."""
    return min(JOIN_FIRST_WAIT_S * 2.0 ** min(failures, 16) + rng.uniform(0, JOIN_JITTER_S), JOIN_MAX_WAIT_S)


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

    def _timeout(self, msg_id: bytes) -> None:
        """The library's, for a call that its caller gave up on meanwhile (a
        time limit or a stop cancels the waiting future; setting its result
        when the timer fired raised InvalidStateError, a traceback in the log)."""
        waiting = self._outstanding.pop(msg_id, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result((False, None))

    def _accept_response(self, msg_id: bytes, data: object, address: tuple[str, int]) -> None:
        """The library's, for an answer that comes after its caller gave up."""
        waiting = self._outstanding.pop(msg_id, None)
        if waiting is None:
            return
        future, timer = waiting
        timer.cancel()
        if not future.done():
            future.set_result((True, data))

    def settle_all(self) -> None:
        """Every call still waiting for an answer is given up, its timer cancelled."""
        for future, timer in list(self._outstanding.values()):
            timer.cancel()
            if not future.done():
                future.cancel()
        self._outstanding.clear()

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
        """Retry the bootstrap addresses until one answers (runs until it
        does, or until cancelled).  A plain loop: tenacity's ``with attempt:``
        block took a stop's CancelledError for a failed attempt, and the join
        went on retrying a bootstrap node that was gone while the stop waited
        for it (a node that ignored SIGTERM)."""
        if not self.bootstrap_addrs:
            return
        rng = random.Random()
        for failures in itertools.count():
            if await self._join_once():
                break
            await asyncio.sleep(join_wait(failures, rng))
        self.joined.set()
        log.info("joined the DHT")

    async def _join_once(self) -> bool:
        """One attempt: whether a bootstrap address answered."""
        addrs: list[tuple[str, int]] = []
        for host, port in self.bootstrap_addrs:
            try:
                addrs += await off_loop(resolve_udp, host, port)
            except OSError as exc:
                log.info("bootstrap %s:%d does not resolve yet: %s", host, port, exc)
        if not addrs:
            return False
        try:
            async with asyncio.timeout(_DHT_TIMEOUT):
                found = await self.server.bootstrap(addrs)
        except TimeoutError:
            found = []
        if not found:
            log.info("bootstrap %s not answering yet; retrying", addrs)
        return bool(found)

    async def observed_host(self) -> str | None:
        """Our IP as a bootstrap node sees it (STUN over the DHT protocol)."""
        for host, port in self.bootstrap_addrs:
            try:
                addrs = await off_loop(resolve_udp, host, port)
                for addr in addrs:
                    async with asyncio.timeout(_DHT_TIMEOUT):
                        result = await self.server.protocol.stun(addr)
                    if result and result[0]:
                        return str(result[1][0])
            except (OSError, TimeoutError):
                continue
        return None

    async def publish(self, record: bytes) -> None:
        for key in self._slots:
            try:
                async with asyncio.timeout(_DHT_TIMEOUT):
                    await self.server.set(key, record)
            except TimeoutError:
                log.debug("publishing under %s timed out", key)

    async def seeds(self) -> list[bytes]:
        out: list[bytes] = []
        for key in SLOT_KEYS:
            try:
                async with asyncio.timeout(_DHT_TIMEOUT):
                    value = await self.server.get(key)
            except TimeoutError:
                continue
            if isinstance(value, bytes):
                out.append(value)
        return out

    def stop(self) -> None:
        """Close the socket, stop the library's timers, give up the calls under way."""
        self.server.stop()
        protocol = self.server.protocol
        if protocol is not None:
            protocol.settle_all()
