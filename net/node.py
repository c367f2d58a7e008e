"""The node process: wires the pure core to storage, HTTP and discovery.

Owns the lifecycle (the data dir's lock, held from construction to stop;
start from the last checkpoint; a clean stop, bounded in time whatever peers
and callers do), founding a network or asking a member to be admitted,
ingesting entries from clients and
peers (validate in the core, commit to SQLite, then acknowledge), the ticks
that write heartbeats and votes, persisting what becomes final, pushing new
entries to every peer at once, periodic pull anti-entropy with equivocation
evidence, measuring peers' clocks, peer exchange and DHT publishing.  Every
peer call runs under its own timeout; every task is kept in ``self._tasks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import random
import secrets
import socket
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import web

from crdt.entry import (
    TICKET_WINDOW_MS,
    BadWireEntry,
    Body,
    Cancel,
    Carry,
    Entry,
    Heartbeat,
    Order,
    claimed,
    decode_entries,
    decode_entry,
    encode_entry,
)
from crdt.errors import BadTicket, ExchangeError, ForeignCancel, ValidationError
from crdt.hlc import physical_ms
from crdt.keys import short_id
from crdt.replica import MergeResult
from matching.engine import Fill, FinalBatch
from matching.exchange import Exchange, NotCancellable, Params, Received, Submitted, UnknownOrder
from net import logs
from net.addresses import (
    AddressGuard,
    AddressPolicy,
    IPAddress,
    PeerResolver,
    literal,
    parse_peer_url,
    resolve,
)
from net.config import NodeConfig, split_host_port
from net.datadir import DataDirLock
from net.discovery import Discovery
from net.errors import (
    BadReply,
    BadRequest,
    CidReused,
    ListenError,
    NoQuorum,
    PeerError,
    PeerErrorReply,
    PeerRefused,
    TooLarge,
)
from net.metrics import NodeMetrics
from net.networks import NetworkConflict, is_fatal, short_network
from net.peers import (
    NONCE_LEN,
    Candidates,
    Peer,
    PeerRecord,
    PeerTable,
    check_proof,
    is_loopback_url,
)
from net.server import ConnectionLimits, Guard, GuardedSite, handler_args
from net.store import (
    CID_CANCEL,
    CID_ORDER,
    ClientId,
    FinalFill,
    Store,
    StoredOrder,
    load_or_create_key,
    new_token,
    write_cookie,
)
from net.threads import off_loop
from net.wire import CARRY_PATH, CARRY_WAIT_S, MSGPACK, PEER_BODY_CAP, pack, peer_error, read_capped, unpack

if TYPE_CHECKING:
    from net.grenache import Announcer

log = logging.getLogger("p2pex.node")

SYNC_PAGE = 4000  # entries per sync page: 4000 * 512 bytes stays under the peer body cap
MAX_PAGES_PER_PULL = 25
PUSH_QUEUE_CAP = 20_000
# at most one push to a peer every PUSH_EVERY_S (what queues meanwhile goes in one request: fewer
# requests, less work per entry) while this node writes BUSY_ENTRIES_PER_S entries or more; else
# every PUSH_EVERY_QUIET_S, for the latency of acknowledgements
PUSH_EVERY_S = 0.025
PUSH_EVERY_QUIET_S = 0.005
BUSY_ENTRIES_PER_S = 100
MAX_DOWN = 64  # peers a push names as unreachable
PUSH_PATH = "/peer/v1/push"
LINK_PATH = "/peer/v1/link"  # the WebSocket that carries pushes to a peer
LINK_CLOSE_S = 0.5  # how long closing a link waits for the peer's close frame
LINK_RETRY_S = 60.0  # a peer without the link route is offered a link again after this long
LINK_REOPEN_S = 30.0  # a link unused this long is replaced (the peer closes links idle for 60 s)
RELAY_EVERY_S = 0.05  # how often the relay looks for entries of other members that a peer may lack
RELAY_AFTER_S = 0.1  # ... and relays those a peer has not shown it holds this long after they were merged here
LATENCY_SAMPLES = 20_000
MAX_RECORDS_PER_CALL = 300  # peer records read from one request or reply
MAX_GREETINGS = 8  # proofs of new peers under way at once
PROVE_EVERY_S = 0.2  # how often waiting candidates are looked at (and at once when one is offered)
POLICY_EVERY_S = 2.0  # how often an address policy not settled yet is looked at again
PEER_LATENCY_KEPT = 1_000  # recent delays kept per peer
COOL_FAILED_PROOF_S = 60.0  # a record whose node did not prove its key is not tried again for this long
COOL_UNREACHABLE_S = 5.0
COOL_REFUSED_S = 300.0  # a URL the address policy refuses
EXCHANGE_MIN_S = 0.2  # peer-exchange period while membership changes
EXCHANGE_MAX_S = 5.0
ENDPOINT_FILE = "endpoint"  # the local URL of the node, for the CLI
MAX_FOREIGN = 1024  # peers of other networks remembered (not dialed again)
JOIN_EVERY_S = 0.5  # how often a node that is not a member asks a peer to admit it
CARRY_BUDGET_S = 3.0  # how long a participant tries members, one after another, for one ticket
CARRY_VISIBLE_S = 1.0  # how long a participant waits to hold the entry that carries its ticket
TICKETS_KEPT = 10_000  # tickets remembered by client id (participant) and entries by ticket (member)
EVIDENCE_PER_REPLY = 8  # equivocation proofs handed out in one sync reply
OFFSET_TTL_S = 30.0  # a peer's clock reading older than this is not used
OWN_COMMIT_S = 0.001  # client orders and cancels arriving this close together share one commit
GROUP_COMMIT_S = 0.005  # entries merged from peers and finals are committed together this soon
CERTIFY_COMMIT_S = 1.0  # how long a push's answer waits for the commit of what it certifies
STREAM_QUEUE = 10_000  # events buffered per stream subscriber before it is dropped
# once this many records (and at least as many as orders rest) became final since the book was last
# held anew, it is held anew at the next moment nothing is provisional (see _compact_book)
COMPACT_AFTER_RECORDS = 50_000
# a stop takes at most STOP_BUDGET_S (README: the process exits within 3 s of SIGTERM): stop taking requests
# (HTTP_SHUTDOWN_S of it for in-flight requests), say Leave to the peers (a member), cancel the node's tasks,
# close links to peers, the HTTP client and the DHT, then commit and close SQLite (no timer can interrupt that;
# committing what is queued takes ms)
STOP_HTTP_S = 1.25
STOP_LEAVE_S = 0.25  # a member's Leave pushed to every peer it reaches
HTTP_SHUTDOWN_S = 0.3  # aiohttp's wait for a request in flight, then again for it once cancelled
STOP_TASKS_S = 0.5
STOP_RECANCEL_S = 0.05
STOP_PEERS_S = 0.5
STOP_BUDGET_S = STOP_HTTP_S + STOP_LEAVE_S + STOP_TASKS_S + STOP_PEERS_S + 0.25


async def wait_for(done: Callable[[], bool], changed: Callable[[], asyncio.Event], timeout: float) -> bool:
    """Wait until ``done()``, looking again whenever the event ``changed()``
    gives is set (such events are replaced once set), at most ``timeout``
    seconds; ``done()`` at the end."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            async with asyncio.timeout(left):
                await changed().wait()
        except TimeoutError:
            return done()
    return True


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return cast("Callable[[int], int]", ctypes.CDLL(None).malloc_trim)
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def settle_memory() -> None:
    """After a large load: collect; freeze what is left (it lives long: out of
    the collector's sight, so that full collections scan only what came since;
    they stalled every node at once); and hand the C heap's free pages back to
    the system (glibc's ``malloc_trim``), which otherwise keeps, unused, the
    room the load's temporaries took: about 65 bytes per resting order after
    loading 100,000.  What an earlier call froze is thawed and collected with
    the rest first, so that cycles that died since are not kept for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Readiness:
    """Whether the node's state can be trusted for new orders, and why.

    Ready once it has synced with a live peer (``synced_with``, the peer's
    short id), or once it found none within the bound (``alone``)."""

    ready: bool
    synced_with: str | None = None
    alone: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Void:
    """This node's own entries that an eviction made void (reported to the operator)."""

    at_ms: int
    cut: int
    orders: tuple[str, ...]  # ids of the void orders
    entries: int
    detail: str = ""  # why, for the order's reader


class Subscriber:
    """One reader of the event stream: its queue, and whether it fell behind."""

    __slots__ = ("dropped", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=STREAM_QUEUE)
        self.dropped = False


class PeerLink:
    """The WebSocket a peer's pushes go on (opened on first use, and again
    after a failure), one push at a time.  ``refused_at`` (monotonic): when
    the peer last answered the upgrade with no link route; its pushes go as
    requests for LINK_RETRY_S after that."""

    __slots__ = ("lock", "refused_at", "url", "used_at", "ws")

    def __init__(self, *, url: str) -> None:
        self.url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.lock = asyncio.Lock()
        self.refused_at: float | None = None
        self.used_at = 0.0  # monotonic: when the last push on it was sent


@dataclass(frozen=True, slots=True, kw_only=True)
class Ingested:
    """What became of a batch from a peer: the core's merge result, plus the
    entries that were refused before it (so a reply can list every refusal)."""

    merge: MergeResult
    malformed: tuple[BadWireEntry, ...]


def _cid_kind(body: Body) -> int:
    return CID_CANCEL if isinstance(body, Cancel) else CID_ORDER


def _refusal(exc: PeerErrorReply) -> ExchangeError | None:
    """A member's refusal to carry a ticket that another member would refuse
    too (as the core's typed error), or None (try another member)."""
    kinds: dict[str, type[ExchangeError]] = {
        "unknown_order": UnknownOrder, "not_cancellable": NotCancellable, "foreign_order": ForeignCancel,
        "bad_ticket": BadTicket}
    kind = kinds.get(exc.code)
    return None if kind is None else kind(exc.detail)


def _retrieved(done: asyncio.Future[Submitted]) -> None:
    """A request that hung up leaves its outcome unread: read it (no warning)."""
    if not done.cancelled():
        done.exception()


class Node:
    def __init__(
        self,
        config: NodeConfig,
        *,
        clock_ms: Callable[[], int] = wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock_ms = clock_ms
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        data_dir = Path(config.data_dir)
        # first of all: nothing in the data dir is read or written without its lock
        self.lock = DataDirLock.acquire(data_dir)
        try:
            self.key = load_or_create_key(data_dir)
            self.store = Store(data_dir)
        except BaseException:
            self.lock.release()
            raise
        self.node_id = self.key.public
        self.short = short_id(self.node_id)
        evict_ms = int(config.evict_after * 1000)
        self.exchange = Exchange(self.key, params=Params(
            max_skew_ms=config.max_skew_ms, evict_after_ms=evict_ms, heartbeat_ms=config.heartbeat_ms,
            suspect_after_ms=int(config.suspect_after * 1000),
            liveness_ms=min(3_000, max(evict_ms // 3, 1)), max_clock_offset_ms=config.max_clock_offset_ms,
            max_foreign_origins=config.max_foreign_origins, max_members=config.max_members))
        self.token = new_token()  # in .cookie once the node listens
        self.http_guard = Guard(ConnectionLimits(
            max_connections=config.max_connections, header_timeout=config.header_timeout,
            body_timeout=config.body_timeout, keepalive_timeout=config.keepalive_timeout,
            max_receiving=config.max_receiving))
        self.peers = PeerTable(self.node_id, ttl_ms=config.peer_ttl_ms)  # proven peers only
        self.candidates = Candidates()  # records waiting for their proof
        self.guard = AddressGuard(AddressPolicy.listed(config.peer_networks or ("public",)))
        self.discovery = Discovery(
            public_key=self.node_id, host=config.host, port=config.udp_port,
            bootstrap=config.bootstrap,
            own_name=split_host_port(config.advertise, config.port)[0] if config.advertise else None,
        )
        self.url: str | None = None
        self.record: PeerRecord | None = None
        self.serving = False
        self.served = False  # it got as far as serving (a start that failed before leaves nothing to say)
        self.founded = False  # this data dir founded its network (its genesis is this node's first entry)
        self.conflict: NetworkConflict | None = None  # the latest peer met of another network
        self.failure: str | None = None  # why the node stopped by itself (its process exits non-zero)
        self._foreign: dict[bytes, bytes | None] = {}  # peers of another network -> that network
        self._met_own = False  # a peer of this node's network answered it since start
        self.readiness = Readiness(ready=False, detail="starting")
        self.started_ms = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._push_queues: dict[bytes, list[Entry]] = {}
        # merged from peers, or final, and not yet committed: the next commit (a group commit a few ms
        # later, or this node's next own entry, whichever comes first) writes them in one transaction
        self._unsaved: list[Entry] = []
        self._unsaved_finals: list[FinalBatch] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        # own entries waiting for their group commit, in order: the body, the client's id of the
        # request, and what the request waits on
        self._own_queue: list[tuple[Body, str | None, asyncio.Future[Submitted] | None]] = []
        # a participant's tickets by client id (a repeat sends the same ticket), and a
        # member's entries by the ticket they carry (a repeat is answered by the same entry)
        self._cid_tickets: OrderedDict[tuple[int, str], Carry] = OrderedDict()
        self._carried: OrderedDict[bytes, Entry] = OrderedDict()
        self._own_handle: asyncio.TimerHandle | None = None
        self._pushing: set[bytes] = set()
        self._pushed_at: dict[bytes, float] = {}  # peer -> when the last push to it started (monotonic)
        self._own_times: deque[float] = deque()  # when own entries were pushed, over the last second
        # peer -> (when the call it answered started, member -> how many of that member's entries it holds):
        # the peer's own word, from its latest reply
        self._peer_said: dict[bytes, tuple[float, dict[bytes, int]]] = {}
        # peer -> member -> (relayed up to seq, when): not relayed again until a later reply says it is missing
        self._relayed: dict[bytes, dict[bytes, tuple[int, float]]] = {}
        # member -> the peers it said it cannot reach now (in its pushes): its entries go on to them at once
        self._down_of: dict[bytes, frozenset[bytes]] = {}
        self._lengths: deque[tuple[float, dict[bytes, int]]] = deque()  # (monotonic, members' log lengths here)
        self._probing: set[bytes] = set()
        self._syncing: set[bytes] = set()  # peers a sync_with is under way with
        self._offered = asyncio.Event()  # a candidate was offered: the prove loop greets it at once
        self._links: dict[bytes, PeerLink] = {}  # peer -> the WebSocket its pushes go on
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.grenache: Announcer | None = None  # with --grape: announcing on the grapes
        self._stopping = asyncio.Event()
        self._policy_settled = False
        # acceptance-to-visibility delays (ms) of entries from other origins
        self.latencies: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        # acceptance-to-final delays (ms) of orders and cancels, here
        self.final_latencies: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        self.counters = {"pushed": 0, "pulled": 0, "push_failures": 0, "pull_failures": 0,
                         "rejected": 0, "revoked_fills": 0, "heartbeats": 0, "votes": 0, "admitted": 0,
                         "peer_bytes_sent": 0, "peer_bytes_received": 0,  # request and reply bodies of our calls
                         "duplicates": 0,  # relayed entries we held already, dropped before decoding
                         "relayed": 0,  # entries of other members relayed to a peer that lacked them
                         "no_quorum": 0,  # orders and cancels answered 503 no_quorum
                         "carried": 0,  # this participant's tickets a member carried and got certified
                         "carries": 0}  # participants' tickets this member carried and got certified
        self.metrics = NodeMetrics(self)
        self.records = 0  # entries held that are not heartbeats
        self.own_orders = 0  # orders this node placed: in its own log, or (a participant) carried by a member
        self.peer_latencies: dict[bytes, deque[int]] = {}  # peer -> recent acceptance-to-merge delays (ms)
        self.others_orders = 0  # orders in other origins' logs
        self.others_cancels = 0
        self.own_cancels = 0
        self.voided: list[Void] = []
        self.finality_changed = asyncio.Event()  # set (and replaced) whenever something becomes final
        self.certified_changed = asyncio.Event()  # set (and replaced) whenever a member certifies more of our log
        self.committed = asyncio.Event()  # set (and replaced) after every commit
        self._certified_upto = 0  # how far a majority certified this node's log, when last looked at
        self.subscribers: set[Subscriber] = set()
        self._final_seen = 0  # the final frontier when the last batch was reported
        self.final_traded = 0  # lots traded in final fills
        self._finalized_since_compact = 0  # records that became final since the book was last held anew
        self._compact_handle: asyncio.Handle | None = None
        self.book_compactions = 0

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        from net.api import build_app  # the API module imports Node for typing
        from net.grenache import Announcer, add_routes  # it builds on the API module

        now = self.clock_ms()
        self.started_ms = now
        loaded = self._load()
        stored = 0
        for raw in self.store.load_peers():  # known before, but each proves its key again
            rec = PeerRecord.decode(raw)
            if rec is not None and self.peers.fresh(rec, now) and self.candidates.offer(rec, self.monotonic()):
                stored += 1
        log.info("%s: loaded the final state and %d entries above it, %d peers to prove", self.config.name,
                 loaded, stored)
        if stored:
            self._offered.set()
        settle_memory()
        found = self._network_at_start(stored)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.peer_timeout),
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=4, resolver=PeerResolver(self.guard)),
        )
        app = build_app(self)
        if self.config.grapes:  # Grenache RPC (POST /) beside the web view
            add_routes(app, self.config.grenache_service)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_S,
                                     **handler_args(self.http_guard.limits))
        await self._runner.setup()
        await self._listen()
        self._spawn(self.http_guard.sweep_loop(), "http-sweep")
        self.url = await self._advertised_url()
        self._refresh_record()
        self._policy_settled = await self._set_address_policy()
        data_dir = Path(self.config.data_dir)
        write_cookie(data_dir, self.token)
        local_host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        (data_dir / ENDPOINT_FILE).write_text(f"http://{local_host}:{self.config.port}\n")
        # Live from here, in one step: a network is founded only by a node that listens, so a start
        # that failed before (a port in use) leaves a data dir that commits to no network.
        if found:
            self._found()
        self.serving = self.served = True
        log.info("%s: node %s serving %s (dht udp %d)", self.config.name, self.short, self.url,
                 self.config.udp_port)
        if not self.discovery.bootstrap_addrs and not stored:
            self._become_ready(Readiness(ready=True, alone=True,
                                         detail="no bootstrap node and no known peers: the first node of its network"))
        else:
            self.readiness = Readiness(ready=False, detail="catching up: no live peer synced yet")
            self._spawn(self._ready_deadline(), "ready-deadline")
        self._spawn(self.discovery.join(), "dht-join")
        self._spawn(self._discovery_loop(), "dht-publish")
        self._spawn(self._pull_loop(), "pull")
        self._spawn(self._exchange_loop(), "peer-exchange")
        self._spawn(self._prove_loop(), "prove")
        self._spawn(self._log_summary_loop(), "log-summaries")
        self._spawn(self._tick_loop(), "tick")
        self._spawn(self._relay_loop(), "relay")
        self._spawn(self.metrics.probe_loop(), "loop-lag")
        self._spawn(self._join_loop(), "join")
        if self.config.grapes:
            port = split_host_port(self.config.advertise, self.config.port)[1] if self.config.advertise \
                else self.config.port
            self.grenache = Announcer(self.config.grapes, self.config.grenache_service, port)
            self._spawn(self.grenache.run(), "grenache-announce")

    async def run_until_stopped(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def ready(self) -> bool:
        """Serving, caught up, and able to trade: a member, or a participant
        that knows its network."""
        return self.serving and self.readiness.ready and (self.exchange.is_member() or self.participant)

    @property
    def participant(self) -> bool:
        """This node trades through tickets that members carry: it is not a
        member and was not started to become one (``--member``)."""
        return (not self.config.member and self.exchange.network is not None
                and not self.exchange.is_member())

    def mono_ms(self) -> int:
        return int(self.monotonic() * 1000)

    def _load(self) -> int:
        """The final state at the last checkpoint, then the entries above it;
        how many entries were replayed."""
        cp = self.store.load_checkpoint()
        network = self.store.load_network() or (cp.network if cp else None)
        if network is not None:
            self.exchange.set_network(network)
        if cp is not None:
            entries = self.store.load_entries({o: b[0] for o, b in cp.bases.items()})
            resting = self.store.resting_orders()
        else:
            entries, resting = self.store.load_entries(), []
        result = self.exchange.load(cp, resting, entries, mono_ms=self.mono_ms(),
                                    closed=self.store.retired_tickets() if cp is not None else (),
                                    marked=self.store.cancel_marks() if cp is not None else ())
        for first, second in self.store.load_evidence():
            more = self.exchange.add_evidence(first, second, now_ms=self.clock_ms())
            if more is not None:
                self._after(more, peer_id=None)
        self._after(result, peer_id=None, stored=True)
        self.records = self.store.count_records()
        kinds = self.store.count_kinds(self.node_id)
        self.own_orders = kinds.get(1, 0)
        self.own_cancels = kinds.get(2, 0)
        every = self.store.count_kinds(None)
        self.others_orders = every.get(1, 0) - self.own_orders
        self.others_cancels = every.get(2, 0) - self.own_cancels
        self._final_seen = self.exchange.frontiers().final
        self.final_traded = self.store.final_traded()
        return len(entries)

    def _network_at_start(self, stored: int) -> bool:
        """Say which network the data dir serves (it is known before anything
        listens); whether this start founds one (no network yet, no entry of
        its own, and ``--genesis``, or neither ``--bootstrap`` nor known peers)."""
        network = self.exchange.network
        if network is not None:
            first = self.store.load_entry(self.node_id, 1)
            self.founded = first is not None and first.hash == network
            log.info("%s: this data dir %s network %s%s", self.config.name,
                     "founded" if self.founded else "joined", short_network(network),
                     " (--genesis founds only on a fresh data dir)" if self.config.genesis else "")
            return False
        if self.exchange.replica.length(self.node_id):
            return False
        return self.config.genesis or (not self.config.bootstrap and not stored)

    async def _listen(self) -> None:
        """Bind the HTTP (TCP) and DHT (UDP) ports; ListenError says which failed."""
        cfg = self.config
        assert self._runner is not None
        try:
            await GuardedSite(self._runner, cfg.host, cfg.port, self.http_guard).start()
        except OSError as exc:
            raise ListenError(f"cannot listen on {cfg.host}:{cfg.port} (HTTP, TCP): {exc}") from exc
        try:
            await self.discovery.listen()
        except OSError as exc:
            raise ListenError(f"cannot listen on {cfg.host}:{cfg.udp_port} (DHT, UDP): {exc}") from exc

    def _found(self) -> None:
        """The first node of a new network: its genesis entry admits itself,
        committed with the network it names in one transaction."""
        entry = self.exchange.found(now_ms=self.clock_ms())
        assert self.exchange.network is not None
        self.store.save([entry], network=self.exchange.network)
        self.founded = True
        self._after(self.exchange.apply_own(entry, now_ms=self.clock_ms(), mono_ms=self.mono_ms()).received,
                    peer_id=None, own=entry)
        log.info("%s: founded network %s", self.config.name, self.exchange.network.hex()[:16])

    def _become_ready(self, readiness: Readiness) -> None:
        if self.readiness.ready:
            return
        self.readiness = readiness
        log.info("%s: ready (%s)", self.config.name,
                 f"synced with {readiness.synced_with}" if readiness.synced_with else readiness.detail)

    async def _ready_deadline(self) -> None:
        await asyncio.sleep(self.config.ready_timeout)
        self._become_ready(Readiness(ready=True, alone=True,
                                     detail=f"no live peer synced within {self.config.ready_timeout:g} s"))

    async def stop(self) -> None:
        """Stop within STOP_BUDGET_S, whatever peers and callers do: stop
        taking requests (sessions, links and streams are told, in-flight
        requests finish or are cut), cancel every task, close the links to
        peers, the HTTP client and the DHT, then commit what is queued and
        close the database.  Each step that waits is bounded; the log says
        how long each took."""
        self.serving = False
        self._stopping.set()
        t0 = time.monotonic()
        await self._stop_http(STOP_HTTP_S)
        th = time.monotonic()
        await self._leave(STOP_LEAVE_S)
        t1 = time.monotonic()
        stuck = await self._stop_tasks(STOP_TASKS_S)
        t2 = time.monotonic()
        await self._stop_peers(STOP_PEERS_S)
        t3 = time.monotonic()
        try:
            self._commit_own()
            self.flush()
        finally:
            if self._compact_handle is not None:
                self._compact_handle.cancel()
                self._compact_handle = None
            self.store.close()
            self.lock.release()
        t4 = time.monotonic()
        if stuck:
            log.warning("%s: %d tasks did not end when cancelled: %s", self.config.name, len(stuck),
                        ", ".join(sorted(stuck)[:10]))
        logs.flush(force=True)
        log.info("%s: stopped in %.2f s (HTTP %.2f s, leave %.2f s, tasks %.2f s, peers %.2f s, SQLite %.2f s)",
                 self.config.name, t4 - t0, th - t0, t1 - th, t2 - t1, t3 - t2, t4 - t3)

    async def _stop_http(self, within: float) -> None:
        """Stop taking requests first (they may spawn pushes): aiohttp's
        shutdown tells sessions, links and streams (``net.api``), gives
        in-flight requests HTTP_SHUTDOWN_S and then cancels them.  Whatever
        is still open after ``within`` is cut."""
        if self._runner is None:
            return
        try:
            async with asyncio.timeout(within):
                await self._runner.cleanup()
        except TimeoutError:
            cut = self.http_guard.abort_all()
            log.warning("%s: the HTTP shutdown took over %.1f s; %d connections cut", self.config.name, within, cut)

    async def _leave(self, within: float) -> None:
        """A member of a network of several says it is shutting down: it writes
        ``Leave`` as its last entry and pushes its log's tail to every peer it
        reaches within ``within``, so that the other members vote it out at
        once instead of waiting --evict-after for its silence.  A peer it does
        not reach gets the Leave from the others.  Nothing it wrote is voided;
        after a restart its first entry says it is back."""
        if not self.served or self.exchange.network is None:
            return
        body = self.exchange.leave_body()
        if body is None:
            return
        try:
            self.submit(body)
        except ExchangeError as exc:
            log.info("%s: could not write its Leave: %s", self.config.name, exc)
            return
        me, replica = self.node_id, self.exchange.replica
        n = replica.length(me)

        async def push(peer: Peer) -> None:
            said = self._peer_said.get(peer.record.node_id)
            held = said[1].get(me, 0) if said is not None else 0
            tail = [e for seq in range(max(held, n - SYNC_PAGE) + 1, n + 1) if (e := replica.entry(me, seq))]
            with contextlib.suppress(PeerError):
                await self._call(peer, PUSH_PATH, {"from": me, "entries": [e.to_wire() for e in tail],
                                                   "down": self._down()})

        peers = self.peers.ready(self.monotonic())
        try:
            async with asyncio.timeout(within):
                await asyncio.gather(*(push(p) for p in peers))
        except TimeoutError:
            log.info("%s: its Leave reached not every peer within %.2f s", self.config.name, within)
        log.info("%s: left its network (Leave at seq %d, pushed to %d peers)", self.config.name, n, len(peers))

    async def _stop_tasks(self, within: float) -> list[str]:
        """Cancel every task of the node and wait for them, at most ``within``;
        the names of those still running then.  A task is cancelled again
        every STOP_RECANCEL_S: Python 3.11's ``wait_for`` drops a cancellation
        that comes in the step where what it waits for ends, and a loop
        around it would run on (a node that ignored SIGTERM); tasks spawned
        meanwhile (closing a link) are cancelled too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._tasks:
            left = deadline - loop.time()
            if left <= 0:
                break
            for task in list(self._tasks):
                task.cancel()
            await asyncio.wait(list(self._tasks), timeout=min(left, STOP_RECANCEL_S))
        return [task.get_name() for task in self._tasks]

    async def _stop_peers(self, within: float) -> None:
        """Close the links to peers, then the HTTP client, each in at most
        half of ``within`` (a peer that reads nothing is cut), and the DHT."""
        links = [link.ws for link in self._links.values() if link.ws is not None and not link.ws.closed]
        self._links.clear()
        session, self._session = self._session, None
        try:
            async with asyncio.timeout(within / 2):
                await asyncio.gather(*(ws.close() for ws in links), return_exceptions=True)
        except TimeoutError:
            log.info("%s: closing links to peers took over %.2f s; cut", self.config.name, within / 2)
        if session is not None:
            try:
                async with asyncio.timeout(within / 2):
                    await session.close()
            except TimeoutError:
                log.info("%s: closing the HTTP client took over %.2f s", self.config.name, within / 2)
        self.discovery.stop()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def _log_summary_loop(self) -> None:
        """Summaries of repeated warnings ("N more like this") once their window ends."""
        while True:
            await asyncio.sleep(5.0)
            logs.flush()

    async def _advertised_url(self) -> str:
        cfg = self.config
        if cfg.advertise:
            host, port = split_host_port(cfg.advertise, cfg.port)
        elif cfg.host not in ("0.0.0.0", "::", ""):
            host, port = cfg.host, cfg.port
        else:
            observed = await self.discovery.observed_host()
            host = observed or socket.gethostbyname(socket.gethostname())
            port = cfg.port
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    async def _set_address_policy(self) -> bool:
        """``--peer-networks auto``: public addresses plus the kinds of our own
        (from our URL; until that resolves, from the bind address).  False when
        our URL did not resolve yet (called again later)."""
        if self.config.peer_networks is not None:
            self.guard.policy = AddressPolicy.listed(self.config.peer_networks)
            return True
        assert self.url is not None
        own = parse_peer_url(self.url)
        ips: list[IPAddress] = []
        settled = True
        if own is not None:
            ip = literal(own.host)
            try:
                async with asyncio.timeout(self.config.peer_timeout):
                    ips = [ip] if ip is not None else await off_loop(resolve, own.host, own.port)
            except (OSError, TimeoutError) as exc:
                settled = False
                bound = literal(self.config.host)
                ips = [bound] if bound is not None else []
                log.info("our URL %s does not resolve yet (%s)", self.url, str(exc) or "no answer in time")
        policy = AddressPolicy.own_network(ips)
        if policy != self.guard.policy:
            self.guard.policy = policy
            log.info("dialing peers on %s addresses",
                     ", ".join(sorted(k.replace("_", "-") for k in policy.allowed)))
        return settled

    def _refresh_record(self) -> None:
        assert self.url is not None
        self.record = PeerRecord.create(self.key, self.url, self.clock_ms())

    # ---- the core, from clients and peers ------------------------------------

    def submit(self, body: Body, *, cid: str | None = None) -> Submitted:
        """Append to our own log, commit, then push; raises the core's typed errors.

        ``cid``, a client's id for the request, is committed with the entry in
        one transaction (see ``client_request``). Own entries waiting for a
        group commit (``submit_soon``) are written with this one, before it."""
        self._own_queue.append((body, cid, None))
        outcome = self._commit_own()[-1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def submit_soon(self, body: Body, *, cid: str | None = None) -> Submitted:
        """As ``submit``, but shared with the other own entries of the next
        OWN_COMMIT_S: they are prepared, committed in one SQLite transaction
        and applied together, in one step of the event loop. The result (or
        the core's typed error) comes once this entry is committed and applied."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Submitted] = loop.create_future()
        done.add_done_callback(_retrieved)
        self._own_queue.append((body, cid, done))
        if self._own_handle is None:
            self._own_handle = loop.call_later(OWN_COMMIT_S, self._commit_own_due)
        return await asyncio.shield(done)  # a client that hangs up does not take its entry back

    async def place(self, body: Order | Cancel, *, cid: str | None = None) -> Submitted:
        """One of this node's orders or cancels, from a client: a member writes
        it in its own log (``submit_soon``); a participant has a member carry
        it (``_carry``).  Raises the core's typed errors, and NoQuorum from a
        participant whose ticket no member got certified in time."""
        if not self.participant:
            return await self.submit_soon(body, cid=cid)
        return await self._carry(body, cid)

    async def _carry(self, body: Order | Cancel, cid: str | None) -> Submitted:
        """Sign ``body`` as a ticket and hand it to the members, one after
        another, until one answers that a majority certified the entry that
        carries it.  The same ticket goes to each (and again on a repeat of the
        client id), so however many carry it, it counts once."""
        ticket = self.client_ticket(body, cid)
        oid = ticket.ticket if isinstance(body, Order) else body.order_id
        members = self.exchange.membership.members()
        peers = [p for p in self.peers.peers.values() if p.record.node_id in members]
        self.rng.shuffle(peers)
        peers.sort(key=lambda p: p.failures > 0)  # the healthy ones first
        deadline = self.monotonic() + CARRY_BUDGET_S
        refusal: ExchangeError | None = None
        for peer in peers:
            left = deadline - self.monotonic()
            if left <= 0.05:
                break
            member = peer.record.node_id
            try:
                reply = await self._call(peer, CARRY_PATH, {
                    "from": self.node_id, "ticket": ticket.to_wire(),
                    "has": self.exchange.replica.length(member)}, timeout=min(left, CARRY_WAIT_S + 0.5))
            except PeerErrorReply as exc:
                refusal = _refusal(exc) or refusal
                continue
            except PeerError:
                continue
            seq = reply.get("seq") if isinstance(reply, dict) else None
            if type(seq) is not int:
                continue
            carried = reply.get("entries", [])
            self.ingest(carried, peer=peer.record.url, peer_id=member)
            entry = await self._until_held(peer, seq, oid, carried)
            if entry is None or not isinstance(entry.body, Carry) or entry.body.ticket != ticket.ticket:
                continue
            self.counters["carried"] += 1
            if isinstance(body, Order):
                self.own_orders += 1
            else:
                self.own_cancels += 1
            # its fills: those it took as the taker, whenever its entry reached this node (the
            # member's push may have brought it before the answer)
            return self.exchange.submitted(entry, 0)
        if refusal is not None:
            raise refusal
        self.counters["no_quorum"] += 1
        raise NoQuorum(
            f"no member got a majority to certify this {'order' if isinstance(body, Order) else 'cancel'} "
            f"within {CARRY_BUDGET_S:g} s ({len(peers)} members reached): it is not acknowledged. A member may "
            "still carry it, and then it counts once, however often it is sent again (GET "
            f"/v1/orders/{oid.hex()} tells). A retry with the same cid through this node sends the same ticket",
            order_id=oid, retry_after=CARRY_BUDGET_S)

    async def _until_held(self, peer: Peer, seq: int, oid: bytes, carried: Any) -> Entry | None:
        """The entry at ``seq`` of ``peer``'s log once this node holds it (the
        answer ``carried`` the entries up to it; a sync fetches what more it
        needs) and knows order ``oid`` (this node may learn the carrier's
        admission a moment after the entry), or None after CARRY_VISIBLE_S.
        An entry already final here and let go from memory is read from the
        answer."""
        member = peer.record.node_id
        deadline = self.monotonic() + CARRY_VISIBLE_S
        while (self.exchange.replica.length(member) < seq
               or (self.exchange.status(oid) is None and self.final_order(oid) is None)):
            if self.monotonic() >= deadline:
                return None
            if self.exchange.replica.length(member) < seq:
                self._spawn(self.sync_with(peer), f"sync-{peer.short}")
            await asyncio.sleep(0.02)
        held = self.exchange.replica.entry(member, seq)
        if held is None and isinstance(carried, list) and carried:
            with contextlib.suppress(ValidationError):
                last = decode_entry(carried[-1])
                if last.origin == member and last.seq == seq:
                    try:
                        same = self.exchange.replica.hash_at(member, seq) == last.hash
                    except KeyError:  # below the base, let go: final here
                        same = True
                    held = last if same else None
        return held

    def client_ticket(self, body: Order | Cancel, cid: str | None) -> Carry:
        """The ticket this participant sends for ``body``: with a client id
        that came before, the ticket signed then (a repeat must not place a
        second order), else a new one, kept with its client id in SQLite
        before any member sees it.  Raises ``CidReused`` when the id came
        with another order or cancel.  A kept ticket that no member can carry
        any more (twice the ticket window past its stamp) and that placed
        nothing is replaced by a new one."""
        if cid is None:
            return self.exchange.ticket(body, now_ms=self.clock_ms())
        key = (_cid_kind(body), cid)
        ticket = self._kept_ticket(key)
        if ticket is not None:
            if ticket.inner != body:
                what = "order" if isinstance(ticket.inner, Order) else "cancel"
                raise CidReused(f"cid {cid} already came with another {what}")
            oid = ticket.ticket if isinstance(body, Order) else body.order_id
            stale = physical_ms(ticket.stamp) + 2 * TICKET_WINDOW_MS < self.clock_ms()
            if not (stale and isinstance(body, Order) and self.exchange.status(oid) is None
                    and self.final_order(oid) is None):
                return ticket
        ticket = self.exchange.ticket(body, now_ms=self.clock_ms())
        self.store.save_client_ticket(*key, ticket)
        self._keep_ticket(key, ticket)
        return ticket

    def ticket_sent(self, body: Order | Cancel, cid: str) -> bool:
        """Did this participant send a ticket for this client id before?"""
        return self._kept_ticket((_cid_kind(body), cid)) is not None

    def _kept_ticket(self, key: tuple[int, str]) -> Carry | None:
        """The ticket kept for a client id: from memory, else from SQLite (then kept in memory)."""
        ticket = self._cid_tickets.get(key)
        if ticket is None:
            ticket = self.store.find_client_ticket(*key)
            if ticket is not None:
                self._keep_ticket(key, ticket)
        return ticket

    def _keep_ticket(self, key: tuple[int, str], ticket: Carry) -> None:
        self._cid_tickets[key] = ticket
        if len(self._cid_tickets) > TICKETS_KEPT:
            self._cid_tickets.popitem(last=False)

    async def carry(self, ticket: Carry) -> Entry:
        """A participant's ticket, for this member to carry: the entry that
        carries it (written now, or the one that carried it before and still
        counts).  Raises the core's typed errors (``BadTicket``, a cancel that
        is not the owner's or of no resting order, ``NotMember``)."""
        entry = self._carried.get(ticket.ticket)
        if entry is not None and self.exchange.counts(entry):
            return entry
        entry = (await self.submit_soon(ticket)).entry
        self._carried[ticket.ticket] = entry
        if len(self._carried) > TICKETS_KEPT:
            self._carried.popitem(last=False)
        return entry

    async def cid_settled(self, kind: int, cid: str) -> None:
        """Wait until a request with this client id that waits for its commit
        has it (so that a repeat finds what the first one wrote)."""
        for body, their_cid, done in list(self._own_queue):
            if done is not None and their_cid == cid and _cid_kind(body) == kind:
                await asyncio.wait([done])

    def _commit_own_due(self) -> None:
        try:
            self._commit_own()
        except Exception:  # the waiting requests have the error; say it once here
            log.exception("could not commit this node's entries")

    def _commit_own(self) -> list[Submitted | ExchangeError]:
        """Prepare every own entry waiting, in order, commit them in one
        transaction (with what else is queued) before any state or peer sees
        them, then apply them in order and push them. One outcome per entry:
        its result, or the typed error that kept it out. All in one step, so
        nothing a peer sends can come between the checks and the entries."""
        if self._own_handle is not None:
            self._own_handle.cancel()
            self._own_handle = None
        waiting, self._own_queue = self._own_queue, []
        outcomes: list[Submitted | ExchangeError | None] = [None] * len(waiting)
        prepared: list[tuple[int, Entry, ClientId | None]] = []
        cancelling: set[bytes] = set()
        after: Entry | None = None
        for i, (body, cid, done) in enumerate(waiting):
            try:
                if isinstance(body, Cancel) and body.order_id in cancelling:
                    raise NotCancellable(f"order {body.order_id.hex()} is being cancelled already")
                entry = self.exchange.prepare(body, now_ms=self.clock_ms(), after=after)
            except ExchangeError as exc:
                outcomes[i] = exc
                if done is not None and not done.done():
                    done.set_exception(exc)
                continue
            if isinstance(body, Cancel):
                cancelling.add(body.order_id)
            after = entry
            client_id = None
            if cid is not None:
                oid = body.order_id if isinstance(body, Cancel) else entry.hash
                client_id = ClientId(kind=_cid_kind(body), cid=cid, entry=entry.hash, order_id=oid)
            prepared.append((i, entry, client_id))
        if prepared:
            try:
                with self.metrics.commit("own"):  # orders, cancels, heartbeats, votes
                    self._commit(own=[e for _, e, _ in prepared],
                                 client_ids=[c for _, _, c in prepared if c is not None])
            except BaseException as exc:
                for i, _, _ in prepared:
                    done = waiting[i][2]
                    if done is not None and not done.done():
                        done.set_exception(exc)
                raise
        for i, entry, _ in prepared:
            done = waiting[i][2]
            try:
                result = self.exchange.apply_own(entry, now_ms=self.clock_ms(), mono_ms=self.mono_ms())
            except ExchangeError as exc:  # committed, in order, just prepared: the core has no reason to refuse it
                log.error("own entry #%d was committed but not applied: %s", entry.seq, exc)
                outcomes[i] = exc
                if done is not None and not done.done():
                    done.set_exception(exc)
                continue
            if isinstance(entry.body, Order):
                self.own_orders += 1
            elif isinstance(entry.body, Cancel):
                self.own_cancels += 1
            self._after(result.received, peer_id=None, own=entry)
            outcomes[i] = result
            if done is not None and not done.done():
                done.set_result(result)
        return [o for o in outcomes if o is not None]

    def _after(self, result: Received | None, *, peer_id: bytes | None, own: Entry | None = None,
               stored: bool = False) -> None:
        """Carry out what a core call returned: queue what it merged for the
        next commit (unless it came from storage), keep equivocation evidence,
        push, queue what became final, and tell the stream."""
        if result is None:
            return
        if result.decisions:
            self._wake_certified()  # who counts as a member, and so who certifies, changed
        accepted = [e for e in result.merge.accepted if e is not own]
        if accepted and not stored:
            self._unsaved.extend(accepted)
        if not stored:
            self.records += sum(1 for e in result.merge.accepted if not isinstance(e.body, Heartbeat))
            self.metrics.received(accepted, self.node_id)
            for e in accepted:
                if e.origin != self.node_id:
                    if isinstance(e.body, Order):
                        self.others_orders += 1
                    elif isinstance(e.body, Cancel):
                        self.others_cancels += 1
        for origin in result.merge.evidence:
            ev = self.exchange.replica.evidence()[origin]
            self.store.save_evidence(origin, encode_entry(ev.first), encode_entry(ev.second))
            log.warning("origin %s equivocated (two entries at seq %d): its log ends before that seq",
                        short_id(origin), ev.seq)
        if not stored:
            self._push_new([*([own] if own is not None else []), *accepted], exclude=peer_id)
        for d in result.decisions:
            log.warning("member %s voted out: its entries past seq %d are void", short_id(d.member), d.cut)
        if result.voided:
            self._report_void(result.voided, "this node was voted out of the network", "")
        if result.unadmitted:
            self._report_void(result.unadmitted, "this node's admission was undone",
                              "this node's admission was undone (the votes it rested on count no more); "
                              "its entries from then on count nowhere")
        if result.revoked:
            self.counters["revoked_fills"] += len(result.revoked)
            self.metrics.revoked.inc(len(result.revoked))
            self._publish([{"type": "revoked", "fill": self.fill_event(f)} for f in result.revoked])
        if result.added:
            for f in result.added:
                self.metrics.fills.labels("provisional", self._origin_label(result.taker_origins[f[0]])).inc()
            self._publish([{"type": "fill", "fill": self.fill_event(f)} for f in result.added])
        if result.finalized:
            self._unsaved_finals.extend(self.exchange.take_finalized())
        if self._unsaved or self._unsaved_finals:
            self._flush_soon()

    def _report_void(self, entries: Sequence[Entry], what: str, detail: str) -> None:
        """Own entries that count nowhere any more: kept for ``GET /v1/orders/{id}``
        and ``finality.voided``, and logged as an error."""
        orders = tuple(e.hash.hex() for e in entries if isinstance(e.body, Order))
        void = Void(at_ms=self.clock_ms(), cut=entries[0].seq - 1, orders=orders, entries=len(entries), detail=detail)
        self.voided.append(void)
        log.error("%s: its %d entries past seq %d are void, among them %d orders (%s); it asks to be admitted "
                  "again", what, void.entries, void.cut, len(orders),
                  ", ".join(o[:16] for o in orders[:10]) + (" ..." if len(orders) > 10 else ""))

    # ---- group commit ------------------------------------------------------------

    def _flush_soon(self) -> None:
        """Commit what is queued within GROUP_COMMIT_S (at once outside an event loop)."""
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_handle = loop.call_later(GROUP_COMMIT_S, self.flush)

    def flush(self) -> None:
        """Commit, in one transaction, the entries merged from peers and what
        became final since the last commit; then tell the stream what is final.
        Called by the group-commit timer and before anything reads SQLite for
        what may still be queued."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._unsaved or self._unsaved_finals:
            with self.metrics.commit("group"):
                self._commit()

    def _commit(self, *, own: Sequence[Entry] = (), client_ids: Sequence[ClientId] = ()) -> None:
        """One transaction: what is queued, then ``own`` (this node's next
        entries, so an entry of ours that acknowledges others' entries is never
        on disk without them). On failure the queue stays, for the next commit."""
        batches = self._unsaved_finals
        self.store.save([*self._unsaved, *own], client_ids=client_ids,
                        finals=(batches, self.exchange.checkpoint()) if batches else None)
        self._unsaved = []
        self._unsaved_finals = []
        self.committed.set()
        self.committed = asyncio.Event()
        if batches:
            self._finals_committed(batches)

    def _finals_committed(self, batches: list[FinalBatch]) -> None:
        self.final_traded += sum(f[3] for b in batches for f in b.fills)
        now = self.clock_ms()
        before = self._final_seen
        own_fills = other_fills = 0
        for b in batches:
            owners = {fo.oid: fo.owner for fo in b.orders}
            own = sum(1 for f in b.fills if owners.get(f[0]) == self.node_id)
            own_fills += own
            other_fills += len(b.fills) - own
            for fo in b.orders:
                hlc = int.from_bytes(fo.key[:8], "big")
                if hlc > before and fo.owner is not None:
                    self.final_latencies.append(now - physical_ms(hlc))
                    if fo.owner == self.node_id:
                        self.metrics.time_to_final.observe(max(now - physical_ms(hlc), 0) / 1000)
        for label, n in (("self", own_fills), ("others", other_fills)):
            if n:
                self.metrics.fills.labels("final", label).inc(n)
        self._final_seen = self.exchange.frontiers().final
        if self.subscribers:  # events are built only for someone to read them
            events: list[dict[str, Any]] = []
            for b in batches:
                fills = [self.fill_event(f, seq=b.first_seq + i, final=True) for i, f in enumerate(b.fills)]
                if fills:
                    events.append({"type": "final", "frontier": self._final_seen, "fills": fills})
            self._publish(events)
        self.finality_changed.set()
        self.finality_changed = asyncio.Event()
        self.certified_changed.set()  # a final entry counts as certified; a decision may change who certifies
        self.certified_changed = asyncio.Event()
        self._finalized_since_compact += sum(b.records for b in batches)
        if (self._compact_handle is None and self._finalized_since_compact >= COMPACT_AFTER_RECORDS
                and self.exchange.engine.quiet()
                and self._finalized_since_compact >= self.exchange.engine.resting_count()):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside an event loop (tools, tests): at once
                self._compact_book()
            else:  # once the commit that made it due is done
                self._compact_handle = loop.call_soon(self._compact_book)

    def _compact_book(self) -> None:
        """Hold the resting book anew (``Exchange.compact_book``): a long replay
        or catch-up leaves its orders scattered among the freed remains of the
        entries that made them, memory the process keeps (about 1,400 bytes per
        resting order after replaying 100,000 orders, against 370 once held
        anew).  Blocks the loop about 2.4 us per resting order (0.44 s at
        200,000, 2.4 s at 1,000,000, longer than a peer waits for an answer),
        at most once per as many final records, and only while nothing is
        provisional."""
        self._compact_handle = None
        if not self.exchange.engine.quiet():
            return  # at a later quiet commit
        t0 = self.monotonic()
        self._finalized_since_compact = 0
        try:
            resting = self.exchange.compact_book()
        except Exception:  # the old book is let go by then: take the final book from storage, as a restart would
            log.exception("%s: holding the resting book anew failed; reading it from storage", self.config.name)
            self.flush()
            try:
                self.exchange.engine.reload(self.store.resting_orders)
            except Exception:
                log.critical("%s: the resting book could not be read from storage; stopping", self.config.name,
                             exc_info=True)
                self.request_stop()
                return
            resting = self.exchange.engine.resting_count()
        self.book_compactions += 1
        settle_memory()
        log.info("%s: resting book held anew: %d orders in %.2f s", self.config.name, resting,
                 self.monotonic() - t0)

    def _origin_label(self, owner: bytes | None) -> str:
        return "self" if owner == self.node_id else "others"

    def fill_event(self, fill: Fill, *, seq: int | None = None, final: bool = False) -> dict[str, Any]:
        taker, maker, price, qty = fill
        return {"taker": taker.hex(), "maker": maker.hex(), "price": price, "qty": qty, "final": final,
                **({"seq": seq} if seq is not None else {})}

    def _publish(self, events: list[dict[str, Any]]) -> None:
        """Hand events to every stream subscriber; one that cannot keep up is dropped."""
        if not events or not self.subscribers:
            return
        for sub in list(self.subscribers):
            for ev in events:
                try:
                    sub.queue.put_nowait(ev)
                except asyncio.QueueFull:
                    sub.dropped = True
                    self.subscribers.discard(sub)
                    break

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self.subscribers.add(sub)
        return sub

    def write(self, body: Body) -> Submitted | None:
        """A heartbeat, vote or admission from this node; None when the core refuses it."""
        try:
            return self.submit(body)
        except ExchangeError as exc:
            log.debug("could not write %s: %s", type(body).__name__, exc)
            return None

    async def _tick_loop(self) -> None:
        """Time for the core: entries from the future fall due, heartbeats that
        move finality, votes against silent members."""
        interval = max(self.config.heartbeat_ms / 2000, 0.005)
        while True:
            await asyncio.sleep(interval)
            try:
                self._tick()
            except Exception:  # a loop that dies would stall finality without a word
                log.exception("tick failed")

    def _tick(self) -> None:
        self._update_clock_offset()
        received, body = self.exchange.tick(now_ms=self.clock_ms(), mono_ms=self.mono_ms())
        self._after(received, peer_id=None)
        if body is None:
            return
        if isinstance(body, Order | Cancel):
            return
        if self.write(body) is not None:
            self.counters["heartbeats" if isinstance(body, Heartbeat) else "votes"] += 1

    def _update_clock_offset(self) -> None:
        mono = self.monotonic()
        fresh = [p.offset_ms for p in self.peers.peers.values()
                 if p.offset_ms is not None and mono - p.offset_at < OFFSET_TTL_S]
        offset = int(statistics.median_low([0, *fresh]))
        if abs(offset) > self.config.max_clock_offset_ms and self.exchange.clock_healthy():
            log.warning("this node's clock is %d ms off its peers' median (limit %d ms): it refuses orders "
                        "until the clock is fixed", -offset, self.config.max_clock_offset_ms)
        elif abs(offset) <= self.config.max_clock_offset_ms and not self.exchange.clock_healthy():
            log.warning("this node's clock is back within %d ms of its peers'", self.config.max_clock_offset_ms)
        self.exchange.clock_offset_ms = offset

    async def _join_loop(self) -> None:
        """While this node (started with ``--member``) is not a member, ask every
        proven peer it reaches to admit it: admission takes the votes of a
        majority of the members.  A participant asks only which network its
        peers serve, until it knows."""
        while True:
            await asyncio.sleep(JOIN_EVERY_S * (0.75 + self.rng.random() / 2))
            if self.exchange.is_member() or (not self.config.member and self.exchange.network is not None):
                continue
            live = [p for p in self.peers.ready(self.monotonic()) if p.failures == 0]
            if live:
                await asyncio.gather(*(self._ask_to_join(p) for p in live))

    async def _ask_to_join(self, peer: Peer) -> None:
        """One join request; the first answer that names a network makes it ours."""
        try:
            reply = await self._call(peer, "/peer/v1/join", {
                "from": self.node_id, "after": self.exchange.replica.length(self.node_id),
                "net": self.exchange.network, "participant": not self.config.member})
        except PeerError:
            return
        except Exception:
            log.exception("join request failed")
            return
        network = reply.get("net") if isinstance(reply, dict) else None
        if self.exchange.network is None and type(network) is bytes and len(network) == 32:
            self.exchange.set_network(network)
            self.store.save_network(network)
            self._met_own = True
            if self.config.member:
                log.info("%s: joining network %s (named by %s); admission waits for a majority of its members",
                         self.config.name, network.hex()[:16], peer.short)
            else:
                log.info("%s: joined network %s (named by %s) as a participant: members carry its orders",
                         self.config.name, network.hex()[:16], peer.short)
            self._spawn(self._probe(peer), f"sync-{peer.short}")

    def admit(self, joiner: bytes, after: int) -> bool:
        """A proven peer asks to be admitted: vote for it with ``Admit`` if this
        node is a member and the joiner may join (see ``Exchange.admission_vote``);
        the admission takes effect once a majority of the members voted."""
        if joiner not in self.peers.peers:
            return False
        vote = self.exchange.admission_vote(joiner, after)
        if vote is None or self.write(vote) is None:
            return False
        self.counters["admitted"] += 1
        log.info("voted to admit %s to the network (its entries after seq %d count once a majority votes)",
                 short_id(joiner), vote.after)
        return True

    def final_order(self, oid: bytes) -> StoredOrder | None:
        """An order's final state from SQLite (after committing what is queued)."""
        self.flush()
        return self.store.final_order(oid)

    def final_fills(self, since: int, limit: int) -> list[FinalFill]:
        """Final fills from seq ``since`` on, from SQLite (after committing what is queued)."""
        self.flush()
        return self.store.final_fills(since, limit)

    # ---- certification -----------------------------------------------------------

    async def certifies(self, origin: bytes | None) -> dict[str, Any]:
        """What the answer to ``origin``'s push says of its log: how much of it
        this node vouches for (``certified``, 0: nothing) and the fingerprint
        of the memberships it counts (``view``).  Only what is durable: while
        entries merged are queued for commit, the answer waits for the next
        group commit (within GROUP_COMMIT_S; forcing a commit per push cost
        the event loop enough to double the time to visibility at 2,000
        orders/s), so a restart never holds less than was certified."""
        if origin is None:
            return {}
        n, view = self.exchange.certifies(origin)
        if n and self._unsaved:
            self._flush_soon()
            done = self.committed
            try:
                async with asyncio.timeout(CERTIFY_COMMIT_S):
                    await done.wait()
            except TimeoutError:
                return {"certified": 0, "view": view}  # the commit failed or stalls: vouch for nothing
        return {"certified": n, "view": view}

    def peer_certified(self, node_id: bytes, length: Any, view: Any) -> None:
        """A peer's push reply said how much of this node's log it certifies."""
        if type(length) is int and type(view) is bytes and self.exchange.note_certified(node_id, length, view):
            self._wake_certified()

    def _wake_certified(self) -> None:
        """Wake the answers waiting for certification when a majority certified
        more of this node's log (also after a decision or finalization, which
        change it without news from a peer)."""
        upto = self.exchange.certified_upto()
        if upto != self._certified_upto:
            self._certified_upto = upto
            self.certified_changed.set()
            self.certified_changed = asyncio.Event()

    async def until_certified(self, entry: Entry, timeout: float) -> bool:
        """Wait until a majority of members certified this node's ``entry``
        (``Exchange.certified``), at most ``timeout`` seconds."""
        return await wait_for(lambda: self.exchange.certified(entry), lambda: self.certified_changed, timeout)

    async def until_final(self, hlc: int, timeout: float) -> bool:
        """Wait until everything stamped at or below ``hlc`` is final here, at most ``timeout`` seconds."""
        return await wait_for(lambda: self.exchange.frontiers().final >= hlc, lambda: self.finality_changed, timeout)

    def own_entry(self, entry_hash: bytes) -> Entry | None:
        """This node's entry with that hash, while memory holds it (None: not
        found, or below the base, which is final)."""
        for e in reversed(self.exchange.replica.tail(self.node_id)):
            if e.hash == entry_hash:
                return e
        return None

    def client_request(self, kind: int, cid: str) -> ClientId | None:
        """What an earlier request with this client id wrote, if any (a
        participant's requests write nothing: see ``client_ticket``)."""
        return self.store.find_client_id(kind, cid)

    def ingest(self, raw_entries: Any, *, peer: str, peer_id: bytes | None = None) -> Ingested:
        if type(raw_entries) is list and len(raw_entries) <= SYNC_PAGE * 2:
            held = self.exchange.replica.holds_wire
            fresh = [item for item in raw_entries if not held(item)]  # relayed duplicates: not decoded again
            self.counters["duplicates"] += len(raw_entries) - len(fresh)
            raw_entries = fresh
        entries, malformed = decode_entries(raw_entries, max_entries=SYNC_PAGE * 2)
        self.counters["rejected"] += len(malformed)
        self.metrics.rejected([m.error.code for m in malformed])
        self._warn_refused("malformed", peer, peer_id,
                           [(m.origin, m.seq, m.error.code, str(m.error)) for m in malformed])
        now = self.clock_ms()
        result = self.exchange.receive(entries, now_ms=now, mono_ms=self.mono_ms(), source=peer)
        self.counters["rejected"] += len(result.merge.rejected)
        self.metrics.rejected([r.error.code for r in result.merge.rejected])
        self._warn_refused("rejected", peer, peer_id,
                           [(r.origin, r.seq, r.error.code, str(r.error)) for r in result.merge.rejected])
        for e in result.merge.accepted:
            if e.origin != self.node_id:
                self.latencies.append(now - physical_ms(e.hlc))
                if e.origin in self.peers.peers:  # per peer too (peers only: their number is capped)
                    self.peer_latencies.setdefault(e.origin, deque(maxlen=PEER_LATENCY_KEPT)).append(
                        now - physical_ms(e.hlc))
                self.metrics.observe_replication(now, e.hlc)
        self._after(result, peer_id=peer_id)
        return Ingested(merge=result.merge, malformed=tuple(malformed))

    def ingest_evidence(self, raw: Any, *, peer: str) -> int:
        """Equivocation proofs a peer handed over: pairs of wire entries."""
        if not isinstance(raw, list):
            return 0
        taken = 0
        for pair in raw[:EVIDENCE_PER_REPLY]:
            try:
                first, second = (decode_entry(x) for x in pair)
            except (ValidationError, TypeError, ValueError):
                log.warning("peer %s sent malformed equivocation evidence", peer,
                            extra={"repeat_key": ("bad evidence", peer)})
                continue
            result = self.exchange.add_evidence(first, second, now_ms=self.clock_ms())
            if result is not None:
                taken += 1
                self._after(result, peer_id=None)
        return taken

    def evidence_for(self, known: Any) -> list[list[Any]]:
        """Proofs to hand a peer that lists the origins it already has proof of."""
        have = {o for o in known if type(o) is bytes} if isinstance(known, list) else set()
        out = []
        for origin, ev in sorted(self.exchange.replica.evidence().items()):
            if origin not in have:
                out.append([ev.first.to_wire(), ev.second.to_wire()])
            if len(out) >= EVIDENCE_PER_REPLY:
                break
        return out

    def delta_wires(self, vv: dict[bytes, int], limit: int) -> tuple[list[Any], bool]:
        """What a peer with version vector ``vv`` lacks, as wire arrays: from
        memory, and from SQLite below what memory holds."""
        segments, more = self.exchange.replica.delta(vv, max_entries=limit,
                                                     first=self.exchange.membership.ever_members())
        out: list[Any] = []
        for seg in segments:
            if seg.entries is None:
                self.flush()  # memory may have let go of entries still queued for commit
                out.extend(self.store.wire_range(seg.origin, seg.lo, seg.hi))
            else:
                out.extend(e.to_wire() for e in seg.entries)
        return out, more

    @staticmethod
    def _warn_refused(what: str, peer: str, peer_id: bytes | None,
                      refused: list[tuple[bytes | None, int | None, str, str]]) -> None:
        """One warning per error code in a batch (not one per entry: 8,000 bad
        entries used to write as many log bytes as they carried), limited per
        (peer, code) by the log's repeat filter."""
        by_code: dict[str, list[tuple[bytes | None, int | None, str]]] = {}
        for origin, seq, code, error in refused:
            by_code.setdefault(code, []).append((origin, seq, error))
        sender = short_id(peer_id) if peer_id else "?"
        for code, group in by_code.items():
            origin, seq, error = group[0]
            more = f" (and {len(group) - 1} more like it in this batch)" if len(group) > 1 else ""
            log.warning("peer %s (%s) sent a %s entry %s#%s: %s: %s%s", sender, peer, what,
                        short_id(origin) if origin else "?", seq, code, error[:200], more,
                        extra={"repeat_key": (what, sender, peer, code)})

    # ---- replication -----------------------------------------------------------

    def _push_new(self, entries: Iterable[Entry], *, exclude: bytes | None) -> None:
        """Own entries go to every peer at once. Another member's entries go on
        at once only to the peers that member said it cannot reach; the rest
        reach it by the member's own push, and the relay loop hands on what a
        peer still lacks. Entries of non-members are relayed at once to every
        peer but the sender."""
        membership = self.exchange.membership
        now = self.monotonic()
        ready = [p for p in self.peers.ready(now) if p.record.node_id != exclude]
        everyone: list[Entry] = []
        bridged: dict[bytes, list[Entry]] = {}
        for e in entries:
            if e.origin == self.node_id:
                everyone.append(e)
                self._own_times.append(now)
            elif not membership.is_member(e.origin):
                everyone.append(e)
            else:
                for nid in self._down_of.get(e.origin, ()):
                    bridged.setdefault(nid, []).append(e)
        for peer in ready:
            nid = peer.record.node_id
            batch = everyone
            more = bridged.get(nid)
            if more:
                more = [e for e in more if e.origin != nid]
                relayed = self._relayed.setdefault(nid, {})
                for e in more:
                    relayed[e.origin] = (max(e.seq, relayed.get(e.origin, (0, 0.0))[0]), now)
                self.counters["relayed"] += len(more)
                batch = [*everyone, *more]
            if batch:
                self._queue_push(peer, batch)

    def note_down(self, origin: bytes, down: Any) -> None:
        """The peers a member says it cannot reach now (``down`` in its pushes)."""
        if not isinstance(down, list) or not self.exchange.membership.is_member(origin):
            return
        self._down_of[origin] = frozenset(d for d in down[:MAX_DOWN] if type(d) is bytes and d != self.node_id)

    def peer_pushed(self, node_id: bytes) -> None:
        """A peer pushed to this node: it is up.  One that failed before (it was
        down, or restarting) is called again at once rather than after its
        backoff: its certification of this node's entries comes in the replies
        to this node's pushes, and an order waits for it (of two members, it
        waited until the backoff ended and was answered 503 no_quorum)."""
        peer = self.peers.peers.get(node_id)
        if peer is not None and peer.failures and peer.next_try > self.monotonic():
            peer.next_try = 0.0

    def _down(self) -> list[bytes]:
        """Peers this node cannot reach now: others pass our entries on to them at once."""
        return [nid for nid, p in self.peers.peers.items() if p.failures > 0][:MAX_DOWN]

    def _own_rate(self) -> int:
        """Own entries pushed in the last second."""
        times, cutoff = self._own_times, self.monotonic() - 1.0
        while times and times[0] < cutoff:
            times.popleft()
        return len(times)

    def _queue_push(self, peer: Peer, batch: list[Entry]) -> None:
        if self._stopping.is_set():  # a stop commits what is queued: peers pull it after
            return
        nid = peer.record.node_id
        queue = self._push_queues.setdefault(nid, [])
        if len(queue) + len(batch) > PUSH_QUEUE_CAP:
            queue.clear()  # the peer will catch up by pull
            return
        queue.extend(batch)
        if nid not in self._pushing:
            self._pushing.add(nid)
            self._spawn(self._drain_push(peer), f"push-{peer.short}")

    def member_lengths(self) -> dict[bytes, int]:
        """How many entries of each member this node holds (peers relay by it)."""
        length = self.exchange.replica.length
        return {m: length(m) for m in self.exchange.membership.members()}

    def peer_holds(self, node_id: bytes, lengths: Any, *, asked_at: float) -> None:
        """What a peer said it holds (``member_lengths`` in its reply to a call
        that started at ``asked_at``, monotonic)."""
        if not isinstance(lengths, dict):
            return
        said = self._peer_said.get(node_id)
        if said is not None and said[0] > asked_at:
            return  # a later call has answered already
        members = self.exchange.membership.members()
        self._peer_said[node_id] = (asked_at, {m: n for m in members if type(n := lengths.get(m)) is int})

    async def _relay_loop(self) -> None:
        while True:
            await asyncio.sleep(RELAY_EVERY_S)
            try:
                self._relay()
            except Exception:  # a relay that dies would leave cut links to pull alone
                log.exception("relay failed")

    def _relay(self) -> None:
        """Hand each peer the entries of other members that it has not shown it
        holds RELAY_AFTER_S after this node merged them: what a cut link between
        two members keeps from one of them reaches it through its other peers,
        and with every link up no entry crosses the network more than once per
        peer of its origin. What was relayed is not sent again until a reply to
        a later call shows the peer still lacks it (a dropped push, a gap it
        holds back). A peer that has not said what it holds gets nothing: pull
        serves it."""
        now = self.monotonic()
        replica = self.exchange.replica
        self._lengths.append((now, self.member_lengths()))
        while len(self._lengths) > 1 and self._lengths[1][0] <= now - RELAY_AFTER_S:
            self._lengths.popleft()
        at, lengths = self._lengths[0]
        if at > now - RELAY_AFTER_S:
            return
        for peer in self.peers.ready(now):
            nid = peer.record.node_id
            said = self._peer_said.get(nid)
            if said is None:
                continue
            asked_at, holds = said
            relayed = self._relayed.setdefault(nid, {})
            batch: list[Entry] = []
            for m, n in lengths.items():
                if m == nid or m == self.node_id:
                    continue
                held = holds.get(m, 0)
                sent = relayed.get(m)
                if sent is not None and sent[1] >= asked_at:  # in flight: no reply since it was queued
                    held = max(held, sent[0])
                if n <= held:
                    continue
                upto = min(n, held + SYNC_PAGE - len(batch))
                for seq in range(held + 1, upto + 1):
                    e = replica.entry(m, seq)
                    if e is None:  # no longer in memory: pull serves it from SQLite
                        upto = n
                        break
                    batch.append(e)
                relayed[m] = (upto, now)
                if len(batch) >= SYNC_PAGE:
                    break
            if batch:
                self.counters["relayed"] += len(batch)
                self._queue_push(peer, batch)

    async def _drain_push(self, peer: Peer) -> None:
        nid = peer.record.node_id
        try:
            while True:
                queue = self._push_queues.get(nid)
                if not queue:
                    return
                every = PUSH_EVERY_S if self._own_rate() >= BUSY_ENTRIES_PER_S else PUSH_EVERY_QUIET_S
                wait = self._pushed_at.get(nid, -every) + every - self.monotonic()
                if wait > 0 and len(queue) < SYNC_PAGE:
                    await asyncio.sleep(wait)
                    continue
                started = self._pushed_at[nid] = self.monotonic()
                batch = queue[:SYNC_PAGE]
                del queue[:SYNC_PAGE]
                try:
                    reply = await self._call(peer, PUSH_PATH, {
                        "from": self.node_id, "entries": [e.to_wire() for e in batch], "down": self._down()})
                    self.counters["pushed"] += len(batch)
                    if isinstance(reply, dict):
                        self.peer_holds(nid, reply.get("has"), asked_at=started)
                        self.peer_certified(nid, reply.get("certified"), reply.get("view"))
                except PeerError:
                    # keep what was queued (one slow reply is not a lost peer): the next push
                    # to this peer sends it, and pull repairs whatever the cap drops
                    self.counters["push_failures"] += 1
                    left = self._push_queues.get(nid)
                    if left is not None and len(left) + len(batch) <= PUSH_QUEUE_CAP:
                        left[:0] = batch
                    return
        finally:
            self._pushing.discard(nid)

    async def _allowed(self, url: str) -> None:
        """Raise PeerRefused when the address policy forbids a peer URL (nothing
        is to be sent), PeerError when it does not resolve (within the peer timeout)."""
        try:
            async with asyncio.timeout(self.config.peer_timeout):
                refusal = await self.guard.refusal(url)
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"{url} does not resolve: {str(exc) or 'no answer in time'}") from None
        if refusal is not None:
            raise PeerRefused(f"{url}: {refusal}")

    async def _request(self, url: str, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        """One POST to a peer URL under the peer timeout (or ``timeout``
        seconds); its decoded reply.

        Raises PeerRefused when the address policy forbids the URL (nothing is
        sent), PeerError when the peer is unreachable or answers badly."""
        assert self._session is not None
        await self._allowed(url)
        out = pack(body)
        self.counters["peer_bytes_sent"] += len(out)
        async with self._session.post(
            url + path, data=out, headers={"Content-Type": MSGPACK, "Accept": MSGPACK},
            timeout=None if timeout is None else aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            try:
                data = await read_capped(resp.content, PEER_BODY_CAP, resp.content_length)
            except TooLarge as exc:
                raise PeerError(f"reply over the peer body cap: {exc}") from None
            self.counters["peer_bytes_received"] += len(data)
            if resp.status != 200:
                raise peer_error(resp.status, data)
            try:
                return unpack(data)
            except BadRequest as exc:
                raise BadReply(str(exc)) from None

    async def _push_on_link(self, peer: Peer, body: dict[str, Any]) -> Any:
        """One push on the peer's link (a WebSocket kept open between pushes:
        a message costs both sides far less than a request); the link is
        opened on first use and again after any failure.  A peer without the
        link route gets its pushes as requests."""
        nid = peer.record.node_id
        link = self._links.get(nid)
        if link is None or link.url != peer.record.url:
            if link is not None:
                self._close_link(link)
            link = self._links[nid] = PeerLink(url=peer.record.url)
        if not self._link_refused(link):
            async with link.lock:  # one push at a time on a link: answers come in order
                ws = await self._link_open(link, nid)
                if ws is not None:
                    link.used_at = self.monotonic()
                    return await self._push_message(link, ws, body)
        return await self._request(link.url, PUSH_PATH, body)

    def _link_refused(self, link: PeerLink) -> bool:
        """The peer refused a link less than LINK_RETRY_S ago: push by request."""
        return link.refused_at is not None and self.monotonic() - link.refused_at < LINK_RETRY_S

    async def _link_open(self, link: PeerLink, nid: bytes) -> aiohttp.ClientWebSocketResponse | None:
        """The link's open WebSocket (the caller holds its lock), opened if
        need be; None when the peer refuses links (it may have, while this
        push waited for the lock)."""
        if self._link_refused(link):
            return None
        ws = link.ws
        if ws is not None and self.monotonic() - link.used_at > LINK_REOPEN_S:
            self._close_link(link)  # the peer may have closed it as idle: do not find out by a failure
            ws = None
        if ws is None or ws.closed:
            ws = link.ws = await self._open_link(link.url)
            if self._links.get(nid) is not link:  # forgotten meanwhile
                self._close_link(link)
                raise PeerError(f"peer {short_id(nid)} was forgotten")
            if ws is None:
                link.refused_at = self.monotonic()
        return ws

    async def _push_message(self, link: PeerLink, ws: aiohttp.ClientWebSocketResponse, body: dict[str, Any]) -> Any:
        """One push on an open link (the caller holds its lock); the decoded answer."""
        out = pack(body)
        self.counters["peer_bytes_sent"] += len(out)
        try:
            async with asyncio.timeout(self.config.peer_timeout):
                await ws.send_bytes(out)
                msg = await ws.receive()
        except BaseException:
            self._close_link(link)  # a late answer would be taken for the next push's
            raise
        if msg.type is not aiohttp.WSMsgType.BINARY:
            self._close_link(link)
            raise PeerError(f"the link closed ({msg.type.name})")
        self.counters["peer_bytes_received"] += len(msg.data)
        try:
            reply = unpack(msg.data)
        except BadRequest as exc:
            raise BadReply(str(exc)) from None
        if isinstance(reply, dict) and "error" in reply and "accepted" not in reply:
            raise peer_error(None, reply)
        return reply

    async def _open_link(self, url: str) -> aiohttp.ClientWebSocketResponse | None:
        """A new link to a peer URL; None when the peer has no link route."""
        assert self._session is not None
        await self._allowed(url)
        try:
            async with asyncio.timeout(self.config.peer_timeout):
                return await self._session.ws_connect(
                    url + LINK_PATH, headers={"Content-Type": MSGPACK}, max_msg_size=PEER_BODY_CAP, compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=LINK_CLOSE_S))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 429:  # over the peer limit: a failed call like any
                raise PeerError(f"{url} refused a link: HTTP {exc.status}") from None
            return None  # no link route (an older node), or too many links there: push by request

    def _close_link(self, link: PeerLink) -> None:
        ws, link.ws = link.ws, None
        if ws is not None and not ws.closed:
            self._spawn(ws.close(), "link-close")

    async def _call(self, peer: Peer, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        """One request to a table peer (under the peer timeout, or ``timeout``
        seconds); updates the peer's health and the estimate of its clock (each
        side stamps its wall clock, ``t``)."""
        start = self.monotonic()
        sent = self.clock_ms()
        body = {**body, "t": sent, "net": self.exchange.network}
        try:
            if path == PUSH_PATH:
                result = await self._push_on_link(peer, body)
            else:
                result = await self._request(peer.record.url, path, body, timeout=timeout)
        except BadReply as exc:  # a reply we cannot decode
            self.peers.failed(peer, self.monotonic(), f"bad reply: {exc}")
            log.warning("peer %s (%s) sent a bad reply to %s: %s", peer.short, peer.record.url, path, exc)
            raise PeerError(str(exc)) from exc
        except PeerRefused:
            raise
        except PeerErrorReply as exc:
            if exc.code == "wrong_network":
                self._other_network(peer.record.node_id, peer.record.url, exc.network)
                raise
            self.peers.failed(peer, self.monotonic(), str(exc))
            if peer.failures == 1:
                log.info("peer %s (%s) refused %s: %s", peer.short, peer.record.url, path, exc)
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, PeerError) as exc:
            self.peers.failed(peer, self.monotonic(), f"{type(exc).__name__}: {exc}")
            if peer.failures == 1:
                log.info("peer %s (%s) unreachable: %s", peer.short, peer.record.url, exc)
            raise PeerError(str(exc)) from exc
        except Exception as exc:  # anything else about a reply we cannot use
            self.peers.failed(peer, self.monotonic(), f"bad reply: {exc}")
            log.warning("peer %s (%s) sent a bad reply to %s: %s", peer.short, peer.record.url, path, exc)
            raise PeerError(str(exc)) from exc
        if peer.failures:
            log.info("peer %s (%s) is back", peer.short, peer.record.url)
        self.peers.ok(peer, self.monotonic(), (self.monotonic() - start) * 1000)
        if isinstance(result, dict):
            their = result.get("t")
            if type(their) is int:
                peer.offset_ms = their - (sent + self.clock_ms()) // 2
                peer.offset_at = self.monotonic()
            if not self._same_network(peer.record.node_id, peer.record.url, result.get("net")):
                raise PeerError(f"peer {peer.short} serves another network")
        return result

    def _same_network(self, node_id: bytes, url: str, theirs: Any) -> bool:
        """Whether a peer's answer (its ``net``) leaves it a peer: True unless it
        names another network than this node's, which is then dealt with."""
        ours = self.exchange.network
        if type(theirs) is not bytes or ours is None:
            return True  # either side is not in a network yet
        if theirs == ours:
            self._met_own = True
            return True
        self._other_network(node_id, url, theirs)
        return False

    def _other_network(self, node_id: bytes, url: str, theirs: bytes | None) -> None:
        """A peer serves another network than this data dir: it is dropped and
        not dialed again, and one line names both networks.  The node stops
        (``failure``) when its --bootstrap leads only there (``is_fatal``)."""
        ours = self.exchange.network
        if ours is None:
            return
        fatal = is_fatal(bootstrap=bool(self.discovery.bootstrap_addrs), genesis=self.config.genesis,
                         met_own=self._met_own)
        conflict = NetworkConflict(ours=ours, theirs=theirs, peer=short_id(node_id), url=url,
                                   founded=self.founded, fatal=fatal)
        self.conflict = conflict
        if len(self._foreign) < MAX_FOREIGN:
            self._foreign[node_id] = theirs
        self._forget(node_id, conflict.detail, quiet=True)
        if not fatal:
            log.warning("%s: %s", self.config.name, conflict.detail,
                        extra={"repeat_key": ("other network", theirs)})
        elif self.failure is None:
            self.failure = conflict.detail
            log.error("%s: %s", self.config.name, conflict.detail)
            self.request_stop()

    async def sync_with(self, peer: Peer) -> None:
        """Pull what the peer has and we lack, in pages; push back what it lacks.
        The first sync that reaches the end of a peer's pages makes the node ready.
        One sync with a peer at a time: another call returns at once."""
        nid = peer.record.node_id
        if nid in self._syncing:
            return
        self._syncing.add(nid)
        try:
            theirs, complete = await self._pull_pages(peer)
        finally:
            self._syncing.discard(nid)
        if complete and not self.readiness.ready:
            self._become_ready(Readiness(ready=True, synced_with=peer.short, detail=f"synced with {peer.record.url}"))
        missing, _ = self.delta_wires(theirs, SYNC_PAGE)
        if missing:
            await self._call(peer, PUSH_PATH, {"from": self.node_id, "entries": missing})

    async def _pull_pages(self, peer: Peer) -> tuple[dict[bytes, int], bool]:
        """Up to MAX_PAGES_PER_PULL pages from the peer: what it holds (its
        version vector), and whether its last page was its last."""
        theirs: dict[bytes, int] = {}
        for _ in range(MAX_PAGES_PER_PULL):
            asked_at, asked = self.monotonic(), self.exchange.replica.digest_for_sync()
            reply = await self._call(peer, "/peer/v1/sync", {
                "from": self.node_id, "vv": asked, "max": SYNC_PAGE,
                "ev": sorted(self.exchange.replica.evidence())})
            if not isinstance(reply, dict):
                raise PeerError("sync reply is not a map")
            if reply.get("evidence"):
                self.ingest_evidence(reply.get("evidence"), peer=peer.record.url)
            raw_vv = reply.get("vv", {})
            theirs = {k: v for k, v in raw_vv.items() if type(k) is bytes and type(v) is int} \
                if isinstance(raw_vv, dict) else {}
            self.peer_holds(peer.record.node_id, theirs, asked_at=asked_at)
            ours = self.exchange.replica.version_vector()
            peer.behind = sum(max(n - theirs.get(o, 0), 0) for o, n in ours.items())
            entries = reply.get("entries", [])
            if entries:
                try:
                    result = self.ingest(entries, peer=peer.record.url, peer_id=peer.record.node_id)
                except ValidationError as exc:  # a batch that is not an array, or too long
                    self.peers.failed(peer, self.monotonic(), f"bad sync reply: {exc}")
                    log.warning("peer %s (%s) sent a bad sync reply: %s", peer.short, peer.record.url, exc)
                    raise PeerError(str(exc)) from exc
                self.counters["pulled"] += len(result.merge.accepted)
                if not result.merge.accepted and not self._came_meanwhile(entries, asked):
                    return theirs, not reply.get("more")
            if not reply.get("more"):
                return theirs, True
        return theirs, False

    def _came_meanwhile(self, wires: list[Any], asked: dict[bytes, int]) -> bool:
        """Whether a sync page that brought nothing new held entries this node
        lacked when it asked for the page (``asked``: the version vector sent)
        and holds now: a push brought them meanwhile (the peer's pull rounds
        push back what they see this node lack), so the pull goes on.  Else the
        page was old or refused entries, and the pull ends there."""
        now = self.exchange.replica.version_vector()
        lacked = [(origin, seq) for origin, seq in map(claimed, wires)
                  if origin is not None and seq is not None and seq > asked.get(origin, 0)]
        return bool(lacked) and all(seq <= now.get(origin, 0) for origin, seq in lacked)

    async def _pull_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.pull_interval * (0.75 + self.rng.random() / 2))
            try:
                await self._pull_round()
            except Exception:  # a loop that dies would leave the node silently stale
                log.exception("pull round failed")

    async def _pull_round(self) -> None:
        mono = self.monotonic()
        ready = self.peers.ready(mono)
        live = [p for p in ready if p.failures == 0 and p.record.node_id not in self._syncing]
        if live:
            peer = self.rng.choice(live)
            try:
                async with asyncio.timeout(self.config.peer_timeout * 3):
                    await self.sync_with(peer)
            except (PeerError, TimeoutError) as exc:
                self.counters["pull_failures"] += 1
                log.debug("pull from %s failed: %s", peer.short, exc)
        for peer in ready:
            if peer.failures and peer.record.node_id not in self._probing:
                self._probing.add(peer.record.node_id)
                self._spawn(self._probe(peer), f"probe-{peer.short}")

    async def _probe(self, peer: Peer) -> None:
        try:
            async with asyncio.timeout(self.config.peer_timeout * 3):
                await self.sync_with(peer)
        except (PeerError, TimeoutError):
            pass
        finally:
            self._probing.discard(peer.record.node_id)

    # ---- membership -------------------------------------------------------------

    def offer_records(self, raws: Any, *, source: str) -> int:
        """Records relayed by a peer or read from the DHT: refresh known peers,
        queue the others as candidates for a proof; how many were queued or refreshed."""
        if not isinstance(raws, list):
            return 0
        now = self.clock_ms()
        added = 0
        for raw in raws[:MAX_RECORDS_PER_CALL]:
            rec = PeerRecord.from_wire(raw)
            if rec is None:
                log.warning("peer %s sent an invalid peer record", source,
                            extra={"repeat_key": ("invalid record", source)})
                continue
            if self._offer(rec, now):
                added += 1
        return added

    def _offer(self, rec: PeerRecord, now: int) -> bool:
        """Take a verified record: a newer record of a proven peer at the URL it
        proved refreshes it; any other waits among the candidates until its node
        proves its key at that URL."""
        if rec.node_id == self.node_id or rec.node_id in self._foreign or not self.peers.fresh(rec, now):
            return False
        if self.peers.refresh(rec, now):
            self.store.save_peer(rec.node_id, rec.encode())
            return True
        known = self.peers.peers.get(rec.node_id)
        if known is not None and known.record.url == rec.url:
            return False  # not newer
        holder = self.peers.by_url(rec.url)
        if holder is not None and holder.failures == 0:
            return False  # a live peer proved this URL; it is re-proved at every peer exchange
        if self.guard.refusal_now(rec.url) is not None:
            return False
        if not self.candidates.offer(rec, self.monotonic()):
            return False
        self._offered.set()
        return True

    async def _prove_loop(self) -> None:
        """Greet waiting candidates every PROVE_EVERY_S, and at once when one is
        offered (a catching-up node's first sync waits on its first proof)."""
        policy_at = self.monotonic() + POLICY_EVERY_S
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROVE_EVERY_S):
                    await self._offered.wait()
            self._offered.clear()
            try:
                if not self._policy_settled and self.monotonic() >= policy_at:
                    policy_at = self.monotonic() + POLICY_EVERY_S
                    self._policy_settled = await self._set_address_policy()
                free = MAX_GREETINGS - len(self.candidates.trying)
                for rec in self.candidates.take(free) if free > 0 else []:
                    self._spawn(self._prove(rec), f"prove-{short_id(rec.node_id)}")
            except Exception:  # a loop that dies would admit no new peer
                log.exception("proof round failed")

    async def _prove(self, rec: PeerRecord) -> None:
        """Greet a candidate with a challenge: admit it once it signs our nonce
        with the key of its record, then take its records and sync with it."""
        mono = self.monotonic()
        nonce = secrets.token_bytes(NONCE_LEN)
        start = self.monotonic()
        try:
            reply = await self._request(rec.url, "/peer/v1/peers", {
                "from": self.node_id, "nonce": nonce,
                "records": self.records_for(is_loopback_url(rec.url))})
        except PeerRefused as exc:
            self.candidates.done(rec, mono, cool_s=COOL_REFUSED_S)
            log.warning("not dialing peer %s: %s", short_id(rec.node_id), exc)
            return
        except (aiohttp.ClientError, TimeoutError, OSError, PeerError) as exc:
            self.candidates.done(rec, mono, cool_s=COOL_UNREACHABLE_S)
            log.debug("candidate %s at %s unreachable: %s", short_id(rec.node_id), rec.url, exc)
            return
        proof = reply.get("proof") if isinstance(reply, dict) else None
        if not check_proof(rec.node_id, rec.url, nonce, proof):
            self.candidates.done(rec, mono, cool_s=COOL_FAILED_PROOF_S)
            log.warning("the node at %s did not prove key %s; record dropped", rec.url, short_id(rec.node_id))
            return
        self.candidates.done(rec, mono)
        assert isinstance(reply, dict)
        if not self._same_network(rec.node_id, rec.url, reply.get("net")):
            return
        admitted, displaced = self.peers.admit(rec, self.clock_ms())
        for nid in displaced:
            self._forget(nid, f"displaced at {rec.url} by {short_id(rec.node_id)}")
        if not admitted:
            return
        self.store.save_peer(rec.node_id, rec.encode())
        peer = self.peers.peers[rec.node_id]
        self.peers.ok(peer, self.monotonic(), (self.monotonic() - start) * 1000)
        log.info("peer %s proved its key at %s", peer.short, rec.url)
        self.offer_records(reply.get("records"), source=rec.url)
        try:
            async with asyncio.timeout(self.config.peer_timeout * 3):
                await self.sync_with(peer)
        except (PeerError, TimeoutError):
            pass

    def _forget(self, node_id: bytes, why: str, *, quiet: bool = False) -> None:
        if self.peers.remove(node_id) and not quiet:
            log.info("forgot peer %s: %s", short_id(node_id), why)
        self.store.delete_peer(node_id)
        self._push_queues.pop(node_id, None)
        self._peer_said.pop(node_id, None)
        self._relayed.pop(node_id, None)
        self._pushed_at.pop(node_id, None)
        self.peer_latencies.pop(node_id, None)
        link = self._links.pop(node_id, None)
        if link is not None:
            self._close_link(link)

    def records_for(self, caller_loopback: bool) -> list[list[Any]]:
        """Records to hand a caller: proven peers and our own, never a loopback
        URL to a non-loopback caller."""
        recs = self.peers.records()
        if self.record is not None:
            recs.append(self.record)
        return [r.to_wire() for r in recs if caller_loopback or not is_loopback_url(r.url)]

    async def _exchange_loop(self) -> None:
        interval = EXCHANGE_MIN_S
        known = 0
        while True:
            await asyncio.sleep(interval * (0.75 + self.rng.random() / 2))
            # gossip fast while membership changes, then settle at EXCHANGE_MAX_S
            changed = len(self.peers.peers) != known
            known = len(self.peers.peers)
            interval = EXCHANGE_MIN_S if changed else min(interval * 1.5, EXCHANGE_MAX_S)
            try:
                await self._exchange_round()
            except Exception:  # a loop that dies would leave membership frozen
                log.exception("peer-exchange round failed")

    async def _exchange_round(self) -> None:
        now = self.clock_ms()
        for nid in self.peers.expire(now):
            self.store.delete_peer(nid)
            log.info("forgot peer %s (not seen for %d s)", short_id(nid), self.config.peer_ttl_ms // 1000)
        ready = [p for p in self.peers.ready(self.monotonic()) if p.failures == 0]
        if not ready:
            return
        peer = self.rng.choice(ready)
        nonce = secrets.token_bytes(NONCE_LEN)
        try:
            reply = await self._call(peer, "/peer/v1/peers", {
                "from": self.node_id, "nonce": nonce,
                "records": self.records_for(is_loopback_url(peer.record.url))})
        except PeerRefused as exc:  # the URL resolves elsewhere now
            self._forget(peer.record.node_id, str(exc))
            return
        except PeerError:
            return
        if not isinstance(reply, dict) or not check_proof(peer.record.node_id, peer.record.url, nonce,
                                                           reply.get("proof")):
            log.warning("peer %s no longer proves its key at %s", peer.short, peer.record.url)
            self._forget(peer.record.node_id, "failed its proof")
            return
        self.offer_records(reply.get("records"), source=peer.record.url)

    async def _discovery_loop(self) -> None:
        await self.discovery.joined.wait()
        interval = 0.5
        while True:
            self._refresh_record()
            assert self.record is not None
            try:
                await self.discovery.publish(self.record.encode())
                seeds = await self.discovery.seeds()
            except Exception as exc:  # the DHT library raises assorted errors on bad packets
                log.debug("dht round failed: %s", exc)
                seeds = []
            now = self.clock_ms()
            for raw in seeds:
                rec = PeerRecord.decode(raw)
                if rec is None:
                    continue
                new = rec.node_id not in self.peers.peers and rec.node_id != self.node_id
                try:
                    if self._offer(rec, now) and new:
                        log.info("found peer %s at %s through the DHT", short_id(rec.node_id), rec.url)
                except Exception:  # storage trouble must not end discovery
                    log.exception("could not record peer %s", short_id(rec.node_id))
            await asyncio.sleep(interval * (0.75 + self.rng.random() / 2))
            interval = min(interval * 2, self.config.publish_interval * 15)

    # ---- views -------------------------------------------------------------------

    def _peer_latency(self, node_id: bytes) -> dict[str, float | None]:
        """Acceptance at the peer to merge here, for its recent entries (ms)."""
        lat = sorted(self.peer_latencies.get(node_id, ()))
        if not lat:
            return {"latency_p50_ms": None, "latency_p99_ms": None}
        return {"latency_p50_ms": lat[(len(lat) - 1) // 2],
                "latency_p99_ms": lat[min(len(lat) - 1, len(lat) * 99 // 100)]}

    def peer_views(self) -> list[dict[str, Any]]:
        for gone in [k for k in self.peer_latencies if k not in self.peers.peers]:
            del self.peer_latencies[gone]  # peers the table dropped (expired or displaced)
        mono = self.monotonic()
        out = []
        for p in sorted(self.peers.peers.values(), key=lambda p: p.record.node_id):
            out.append({
                "id": p.record.node_id.hex(), "short": p.short, "url": p.record.url, "state": p.state,
                "failures": p.failures, "last_error": p.last_error,
                "last_ok_s_ago": None if p.last_ok is None else round(mono - p.last_ok, 3),
                "rtt_ms": None if p.rtt_ms is None else round(p.rtt_ms, 2),
                "clock_offset_ms": p.offset_ms if p.offset_ms is not None and mono - p.offset_at < OFFSET_TTL_S
                else None,
                "record_age_s": round((self.clock_ms() - p.record.last_seen) / 1000, 1),
                "behind_entries": p.behind,
                **self._peer_latency(p.record.node_id),
            })
        return out
