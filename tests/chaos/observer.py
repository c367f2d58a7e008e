"""The observer: samples every node's fills during the run, and takes the
snapshot of a check once the cluster has quiesced.

Sampling (``sample_forever``), about once a second per live node:

- the tail of ``GET /v1/fills`` (the last ``window`` fills, where
  revisions land): a fill shown for the first time, or shown final for the
  first time, is recorded as ``FillSeen``; a fill shown before at a position
  inside the window that is no longer there, as ``FillGone``;
- when the node reports finality, ``GET /v1/fills?final=true`` from a little
  before the last cursor: every final fill at its ``seq``, recorded when new
  or different from what that node showed there before, and ``FinalTotal``
  when the count of final fills goes down.

A fill is final only when it says ``"final": true``: a node without the
field has none.  The observer records what nodes show and judges nothing;
the checker does.

A check (``check``): wait until every live node shows the same state hash
(and, with finality, all its fills final); pull the log entries the nodes
hold over the peer API (``POST /peer/v1/sync``, msgpack, paged by version
vector) for the replay; then read from each live node its status, book,
whole fill list, and the state of a sample of acknowledged orders plus every
acknowledged order whose entry no node served; then pull again whatever was
written meanwhile.  Every request has a timeout and every loop a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack

from crdt.entry import Carry, Order, decode_entry
from crdt.errors import ValidationError
from tests.chaos.cluster import Cluster, Node
from tests.chaos.history import (
    Check,
    FillGone,
    FillKey,
    FillSeen,
    FinalTotal,
    NodeState,
    OrderFinal,
    Recorder,
    ShownFill,
)

SAMPLE_TIMEOUT_S = 2.0
SNAPSHOT_TIMEOUT_S = 10.0
FINAL_OVERLAP = 20  # final fills re-read before the cursor, to see changes there
MAX_SUSPECTS = 200  # acknowledged orders no node served, read back at a check
PENDING_PER_ROUND = 50  # cancelled orders read back per node and sample, until final
MAX_PAGES = 20
MAX_ROUNDS = 100_000  # sampling rounds in one run (a day at one a second)
SYNC_PAGE = 4000
MSGPACK = "application/msgpack"


class NodeGone(Exception):
    """A node did not answer a request."""


@dataclass(slots=True)
class _View:
    """What the observer last saw of one node."""

    total: int = 0
    present: dict[FillKey, tuple[int, bool]] = field(default_factory=dict)  # fill -> (seq, final)
    final_shown: dict[int, FillKey] = field(default_factory=dict)
    final_cursor: int = 0
    pending: dict[str, int] = field(default_factory=dict)  # cancelled order -> samples left to wait


def shown_fill(raw: dict[str, Any]) -> ShownFill:
    return (str(raw["taker"]), str(raw["maker"]), int(raw["price"]), int(raw["qty"]), raw.get("final") is True)


async def get_json(session: aiohttp.ClientSession, url: str, timeout: float) -> Any:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            data = await resp.json(content_type=None)
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise NodeGone(f"GET {url}: HTTP {resp.status} {data!r:.200}")
            return data
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise NodeGone(f"GET {url}: {type(exc).__name__} {exc}") from None


class Observer:
    def __init__(self, cluster: Cluster, rec: Recorder, clock: Callable[[], float], *, window: int = 400,
                 period: float = 1.0) -> None:
        self.cluster = cluster
        self.rec = rec
        self.clock = clock
        self.window = window
        self.period = period
        self.finality = False  # set once a node's status has a "finality" object
        self.views: dict[str, _View] = {name: _View() for name in cluster.nodes}
        self.store_vv: dict[bytes, int] = {}  # entries already pulled, per origin
        self.order_ids: set[str] = set()  # ids of the orders among them

    # ---- sampling --------------------------------------------------------------------

    async def sample_forever(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        for _ in range(MAX_ROUNDS):
            if stop.is_set():
                return
            started = self.clock()
            self.cluster.poll()
            live = [n for n in self.cluster.nodes.values() if n.live()]
            results = await asyncio.gather(*(self.sample(session, n) for n in live), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, NodeGone):
                    raise r
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.05, self.period - (self.clock() - started)))

    async def sample(self, session: aiohttp.ClientSession, node: Node) -> None:
        await self._sample_tail(session, node)
        if self.finality:
            await self._sample_final(session, node)
            await self._sample_cancels(session, node)

    def note_cancel(self, node: str, order_id: str, final: bool | None) -> None:
        """A cancel acknowledged not yet final: read the order back until it is."""
        if self.finality and final is not True:
            self.views[node].pending[order_id] = 120

    async def _sample_cancels(self, session: aiohttp.ClientSession, node: Node) -> None:
        view = self.views[node.name]
        for oid in list(view.pending)[:PENDING_PER_ROUND]:
            got = await get_json(session, f"{node.url}/v1/orders/{oid}", SAMPLE_TIMEOUT_S)
            view.pending[oid] -= 1
            if isinstance(got, dict) and got.get("final") is True:
                self.rec.order_finals.append(OrderFinal(t=round(self.clock(), 3), node=node.name, order_id=oid,
                                                        status=str(got.get("status")),
                                                        filled=int(got.get("filled", 0))))
            if not isinstance(got, dict) or got.get("final") is True or view.pending[oid] <= 0:
                del view.pending[oid]

    def _observe(self, node: str, view: _View, t: float, seq: int, f: ShownFill) -> None:
        key = (f[0], f[1], f[2], f[3])
        if f[4]:
            if view.final_shown.get(seq) != key:
                self.rec.seen.append(FillSeen(t=t, node=node, seq=seq, fill=f))
                view.final_shown[seq] = key
        else:
            old = view.present.get(key)
            if old is None or old[1]:
                self.rec.seen.append(FillSeen(t=t, node=node, seq=seq, fill=f))
        view.present[key] = (seq, f[4])

    def note_ack(self, node: str, fills: list[tuple[int, ShownFill]]) -> None:
        """Fills a client was shown in an order's acknowledgement (the ack is the
        record): the next sample of that node will say whether they are still there."""
        view = self.views[node]
        for seq, f in fills:
            view.present.setdefault((f[0], f[1], f[2], f[3]), (seq, f[4]))

    async def _sample_tail(self, session: aiohttp.ClientSession, node: Node) -> None:
        view = self.views[node.name]
        since = max(0, view.total - self.window)
        got: list[tuple[int, ShownFill]] = []
        total = view.total
        cursor = since
        for _ in range(MAX_PAGES):
            page = await get_json(session, f"{node.url}/v1/fills?since={cursor}&limit={self.window + 600}",
                                  SAMPLE_TIMEOUT_S)
            if not isinstance(page, dict):
                return
            got += [(int(raw["seq"]), shown_fill(raw)) for raw in page.get("fills", [])]
            total = int(page.get("total", 0))
            cursor = int(page.get("next", total))
            if cursor >= total or not page.get("fills"):
                break
        t = round(self.clock(), 3)
        fetched: set[FillKey] = set()
        for seq, f in got:
            fetched.add((f[0], f[1], f[2], f[3]))
            self._observe(node.name, view, t, seq, f)
        for key, (seq, _final) in list(view.present.items()):
            if seq >= since and key not in fetched:
                self.rec.gone.append(FillGone(t=t, node=node.name, fill=key))
                del view.present[key]
        view.total = total

    async def _sample_final(self, session: aiohttp.ClientSession, node: Node) -> None:
        view = self.views[node.name]
        cursor = max(0, view.final_cursor - FINAL_OVERLAP)
        for _ in range(MAX_PAGES):
            page = await get_json(session, f"{node.url}/v1/fills?final=true&since={cursor}&limit=1000",
                                  SAMPLE_TIMEOUT_S)
            if not isinstance(page, dict):
                return
            t = round(self.clock(), 3)
            total = int(page.get("total", 0))
            if total < view.final_cursor:
                self.rec.final_totals.append(FinalTotal(t=t, node=node.name, total=total))
                view.final_cursor = total
            for raw in page.get("fills", []):
                f = shown_fill(raw)
                if f[4]:
                    self._observe(node.name, view, t, int(raw["seq"]), f)
            cursor = int(page.get("next", total))
            view.final_cursor = max(view.final_cursor, cursor)
            if cursor >= total or not page.get("fills"):
                break

    # ---- checks ------------------------------------------------------------------------

    async def status(self, session: aiohttp.ClientSession, node: Node) -> dict[str, Any]:
        st = await get_json(session, f"{node.url}/v1/status", SAMPLE_TIMEOUT_S)
        if not isinstance(st, dict):
            raise NodeGone(f"{node.name}: no status")
        if isinstance(st.get("finality"), dict):
            self.finality = True
        return st

    async def wait_converged(self, session: aiohttp.ClientSession, timeout: float) -> float | None:
        """The time at which every live node first showed the same state hash (with
        finality: and all its fills final), or None after ``timeout`` seconds."""
        deadline = self.clock() + timeout
        for _ in range(int(timeout / 0.25) + 10):
            self.cluster.poll()
            live = [n for n in self.cluster.nodes.values() if n.live()]
            try:
                sts = await asyncio.gather(*(self.status(session, n) for n in live))
            except NodeGone:
                sts = []
            if sts and len({s["state_hash"] for s in sts}) == 1 and all(_all_final(s) for s in sts):
                return self.clock()
            if self.clock() > deadline:
                return None
            await asyncio.sleep(0.25)
        return None

    async def check(self, session: aiohttp.ClientSession, *, phase: str, t_heal: float, timeout: float,
                    sample: Sequence[str], acked: Sequence[str] = ()) -> Check:
        """Wait for convergence, then snapshot every node.  Orders read back from
        every node: ``sample``, and every acknowledged order (``acked``) whose
        entry no node has served so far (to see whether a node calls it void)."""
        t_conv = await self.wait_converged(session, timeout)
        entries = await self._pull_all(session)
        suspects = [oid for oid in acked if oid not in self.order_ids][:MAX_SUSPECTS]
        orders = list(dict.fromkeys([*sample, *suspects]))
        nodes: list[NodeState] = []
        # a snapshot taken while something still moved is taken again, until the
        # converge timeout: after convergence, work the heal set off (a voted-out
        # node admitted again, a peer link still in backoff) can move the nodes
        # apart for a while, and the check is of the state they come to rest in
        deadline = t_heal + timeout
        for attempt in range(int(timeout / 0.5) + 3):
            nodes = list(await asyncio.gather(*(self._snapshot(session, n, orders)
                                                for n in self.cluster.nodes.values())))
            alive = [n for n in nodes if n.alive]
            if t_conv is None or len({(n.state_hash, n.bids, n.asks, n.fills) for n in alive}) <= 1:
                break
            if attempt >= 2 and self.clock() > deadline:
                break
            await asyncio.sleep(0.5)
        entries += await self._pull_all(session)  # anything written while the snapshot was taken
        final_nodes = []
        for state in nodes:
            tracebacks, errors = self.cluster.scan_logs(state.node)
            final_nodes.append(dataclasses.replace(state, tracebacks=tuple(tracebacks), error_lines=errors))
        check = Check(phase=phase, t=round(self.clock(), 3), t_heal=round(t_heal, 3),
                      t_converged=None if t_conv is None else round(t_conv, 3), nodes=tuple(final_nodes),
                      entries=tuple(entries))
        self.rec.checks.append(check)
        return check

    async def _pull_all(self, session: aiohttp.ClientSession) -> list[str]:
        entries: list[str] = []
        for n in self.cluster.nodes.values():
            if n.live():
                with contextlib.suppress(NodeGone):
                    entries += await self._pull_entries(session, n)
        return entries

    async def _snapshot(self, session: aiohttp.ClientSession, node: Node, orders: Sequence[str]) -> NodeState:
        if not node.live():
            return NodeState(node=node.name, alive=False)
        try:
            st = await self.status(session, node)
            book = await get_json(session, f"{node.url}/v1/book?depth=1000", SNAPSHOT_TIMEOUT_S)
            fills: list[ShownFill] = []
            since = 0
            for _ in range(MAX_PAGES * 10):
                page = await get_json(session, f"{node.url}/v1/fills?since={since}&limit=1000", SNAPSHOT_TIMEOUT_S)
                fills += [shown_fill(raw) for raw in page.get("fills", [])]
                since = int(page.get("next", 0))
                if since >= int(page.get("total", 0)) or not page.get("fills"):
                    break
            views: dict[str, dict[str, Any] | None] = {}
            for oid in orders:
                try:
                    view = await get_json(session, f"{node.url}/v1/orders/{oid}", SAMPLE_TIMEOUT_S)
                except NodeGone:
                    continue
                views[oid] = None if view is None else {
                    k: view[k] for k in ("status", "filled", "remaining", "final", "void") if k in view}
        except NodeGone as exc:
            return NodeState(node=node.name, alive=True, error=str(exc))
        levels = {side: tuple((int(lv["price"]), int(lv["qty"]), int(lv["orders"])) for lv in book.get(side, []))
                  for side in ("bids", "asks")}
        finality = st.get("finality")
        return NodeState(
            node=node.name, alive=True, state_hash=str(st["state_hash"]),
            version_vector={str(k): int(v) for k, v in st.get("version_vector", {}).items()},
            bids=levels["bids"], asks=levels["asks"], fills=self.rec.fill_list(tuple(fills)),
            finality=finality if isinstance(finality, dict) else None, orders=views)

    async def _pull_entries(self, session: aiohttp.ClientSession, node: Node) -> list[str]:
        """Entries the node holds that no earlier pull brought, as hex wire bytes."""
        out: list[str] = []
        for _ in range(MAX_PAGES * 5):
            body = msgpack.packb({"vv": self.store_vv, "max": SYNC_PAGE}, use_bin_type=True)
            try:
                async with session.post(f"{node.url}/peer/v1/sync", data=body,
                                        headers={"Content-Type": MSGPACK, "Accept": MSGPACK},
                                        timeout=aiohttp.ClientTimeout(total=SNAPSHOT_TIMEOUT_S)) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise NodeGone(f"sync at {node.name}: HTTP {resp.status} {raw[:200]!r}")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise NodeGone(f"sync at {node.name}: {exc}") from None
            reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            entries = reply.get("entries", []) if isinstance(reply, dict) else []
            for e in entries:
                origin, seq = e[0], e[1]
                if seq != self.store_vv.get(origin, 0) + 1:
                    continue  # not the next one of its origin; a later page brings it in order
                self.store_vv[origin] = seq
                out.append(msgpack.packb(e, use_bin_type=True).hex())
                with contextlib.suppress(ValidationError):
                    entry = decode_entry(e)
                    if isinstance(entry.body, Order):
                        self.order_ids.add(entry.hash.hex())
                    elif isinstance(entry.body, Carry) and isinstance(entry.body.inner, Order):
                        self.order_ids.add(entry.body.ticket.hex())  # a participant's order, carried by a member
            if not reply.get("more") or not entries:
                break
        return out


def _all_final(status: dict[str, Any]) -> bool:
    fin = status.get("finality")
    total = status.get("counts", {}).get("fills")
    if not isinstance(fin, dict) or not isinstance(fin.get("final_fills"), int) or not isinstance(total, int):
        return True  # no finality on this node (or no count to compare): nothing to wait for
    return bool(fin["final_fills"] >= total)
