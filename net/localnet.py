"""Real node processes on 127.0.0.1, for the tests and the benchmarks.

Starts ``python cli.py node`` as subprocesses on free 127.0.0.1 ports, waits
for ``/readyz`` and stops every process by pid (SIGTERM, then SIGKILL after a
timeout).  The client API is used through the client library
(``NodeProc.client()``, a ``client.SyncClient``), like every other program
does; raw HTTP with urllib (``http``, ``NodeProc.request``, ``NodeProc.get``)
is for tests that mean the bytes on the wire: malformed bodies, content
types, headers, the msgpack peer routes, exact statuses and error bodies.
Every wait loop is bounded in time and in iterations; a failed wait reports
the tail of the node logs.  Nothing here mocks the network: the nodes
replicate over real sockets.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from client import ClientError, OrderView, SyncClient
from net import ports
from net.logs import last_lines

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"
HOST = "127.0.0.1"

START_TIMEOUT = 20.0  # seconds for a node to answer /readyz
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
CONVERGE_TIMEOUT = 30.0  # seconds for replicas to agree
HTTP_TIMEOUT = 5.0
POLL = 0.05

T = TypeVar("T")

_handed_out: set[int] = set()
_live: dict[int, subprocess.Popen[bytes]] = {}  # pid -> process, for the atexit safety net


# ---- ports ------------------------------------------------------------------------


def free_port() -> int:
    """A port number free for TCP (HTTP) and UDP (the DHT) on 127.0.0.1, never
    the same twice in one test run."""
    return ports.free_port(_handed_out)


# ---- HTTP -------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


def http(method: str, url: str, body: bytes | None = None, *, headers: dict[str, str] | None = None,
         timeout: float = HTTP_TIMEOUT) -> Reply:
    """One HTTP request; HTTP errors come back as a Reply, network errors raise."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.read(), resp.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.read(), exc.headers.get("Content-Type", ""))


def get_json(url: str, *, timeout: float = HTTP_TIMEOUT) -> Any:
    r = http("GET", url, timeout=timeout)
    assert r.status == 200, f"GET {url}: {r!r}"
    return r.json()


# ---- the client library -------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a write through the client came to, for tests that expect a
    refusal as often as a success: ``status`` 200 with the node's reply in
    ``json()`` and ``view``, or the HTTP status of the ``ClientError`` with
    ``json()`` ``{"error": code, "detail": detail}``.  A failure without a
    status (network, timeout) raises.  A test of the exact reply on the wire
    (content type, every key of the body) sends its request with
    ``NodeProc.request``."""

    status: int
    body: dict[str, Any]
    view: OrderView | None = None
    error: ClientError | None = None

    def json(self) -> dict[str, Any]:
        return self.body


def _blocking(fn: Callable[[], T]) -> T:
    """``fn()``; in a thread of its own when called from a coroutine (an async
    test), since a SyncClient runs an event loop of its own, which cannot run
    inside another one.  The caller waits, as it did for urllib."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nodes-client") as pool:
        return pool.submit(fn).result()


# ---- processes ----------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python cli.py ARGS`` in a subprocess; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, str(CLI), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def cli_json(*args: str) -> Any:
    done = run_cli(*args, "--json")
    assert done.returncode == 0, f"cli.py {' '.join(args)} failed: {done.stderr.strip()}"
    return json.loads(done.stdout)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(last_lines(path, lines))


@dataclass
class NodeProc:
    """One node process: ports, data dir, log file and the Popen handle."""

    name: str
    port: int
    data_dir: Path
    bootstrap: list[int] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    #: started with ``--member`` (asks to join the committee); False: a participant
    member: bool = True
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: ids of the orders a test placed here (``order``, or ``placed.append``), for ``cancel_leftovers``
    placed: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    @property
    def out_file(self) -> Path:
        return self.data_dir.parent / f"{self.name}.out"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # lifecycle

    def start(self, *, wait: bool = True) -> NodeProc:
        assert not self.running(), f"{self.name} already running"
        args = [sys.executable, str(CLI), "node", "--host", HOST, "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--name", self.name,
                "--log-file", str(self.log_file), *(["--member"] if self.member else []), *self.extra_args]
        for p in self.bootstrap:
            args += ["--bootstrap", f"{HOST}:{p}"]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_file, "ab") as out:
            out.write(f"--- start {self.starts + 1}: {' '.join(args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _live[self.proc.pid] = self.proc
        self.starts += 1
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"{self.name} exited with {self.proc and self.proc.returncode}\n"
                                     + self.logs())
            try:
                return self.call(lambda c: c.ready(timeout=1.0), timeout=1.0)
            except ClientError:  # not listening yet, or not answering in time
                return False

        wait_until(ready, timeout=timeout, what=f"{self.name} ready", nodes=[self])

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout)
            return proc.returncode
        finally:
            _live.pop(proc.pid, None)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)
        _live.pop(self.proc.pid, None)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGCONT)

    # raw HTTP (urllib): for requests a test means byte for byte

    @property
    def token(self) -> str:
        return (self.data_dir / ".cookie").read_text().strip()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, *, timeout: float = HTTP_TIMEOUT) -> Any:
        return get_json(self.url + path, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = "cookie",
                raw: bytes | None = None, content_type: str = "application/json",
                headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT) -> Reply:
        headers = {"Accept": "application/json", **(headers or {})}
        if token == "cookie":
            headers.update(self.auth())
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            headers["Content-Type"] = content_type
        return http(method, self.url + path, data, headers=headers, timeout=timeout)

    # the client API, through the client library

    def client(self, **options: Any) -> SyncClient:
        """A new client of this node; close it (``with node.client() as c:``).
        The token is read from ``.cookie`` when a write needs it, so it is
        the current one after a restart.  Like the urllib helpers before it,
        it sends every request once (no retries, which could hide a refusal
        or a lost request) and gives up after ``HTTP_TIMEOUT``; ``options``
        (``Client``'s) override that."""
        settings: dict[str, Any] = {"timeout": HTTP_TIMEOUT, "read_attempts": 1, "write_attempts": 1, **options}
        return SyncClient(self.url, lambda: self.token, **settings)

    def call(self, fn: Callable[[SyncClient], T], **options: Any) -> T:
        """``fn(client)`` on a client of its own, closed after, so no loop,
        session or connection outlives the call (nor meets a restarted
        node).  Works from a coroutine too.  A ClientError says which node."""
        def run() -> T:
            try:
                with self.client(**options) as c:
                    return fn(c)
            except ClientError as exc:
                exc.add_note(f"at node {self.name} ({self.url})")
                raise

        return _blocking(run)

    def order(self, side: str, qty: int, price: int | None = None, **extra: Any) -> dict[str, Any]:
        """Place an order (``extra``: ``tif``, ``market``, ``cid``, ``wait_final``
        as for ``Client.place``); the node's reply."""
        view = self.call(lambda c: c.place(side, qty, price, **extra))
        self.placed.append(view.id)
        return dict(view.raw)

    def cancel(self, oid: str) -> Outcome:
        """Cancel ``oid``: ``status`` 200 and the order after, or the refusal."""
        try:
            view = self.call(lambda c: c.cancel(oid))
        except ClientError as exc:
            if exc.status is None:
                raise
            return Outcome(exc.status, {"error": exc.code, "detail": exc.detail}, error=exc)
        return Outcome(200, dict(view.raw), view=view)

    def status(self) -> dict[str, Any]:
        return dict(self.call(lambda c: c.status()).raw)

    def state_hash(self) -> str:
        return self.call(lambda c: c.status()).state_hash

    def snapshot(self) -> dict[str, Any]:
        """What must be equal on converged replicas: the entries that are not
        heartbeats, the book, the fills.  (Members write a heartbeat every few
        seconds, so the state hash and version vector move on their own; which
        fills are final yet may differ for a moment.)"""
        def read(c: SyncClient) -> dict[str, Any]:
            st = c.status()
            book = dict(c.book(depth=1000).raw)
            book.pop("state_hash", None)
            fills = _all_fills(c, 1000)
            fills["fills"] = [{k: v for k, v in f.items() if k != "final"} for f in fills["fills"]]
            return {"records": st.raw["counts"]["records"], "book": book, "fills": fills}

        return self.call(read)

    def all_fills(self, max_pages: int = 1000) -> dict[str, Any]:
        """Every fill, page by page (a page holds at most 1,000)."""
        return self.call(lambda c: _all_fills(c, max_pages))

    def peer_ids(self) -> set[str]:
        return {p.id for p in self.call(lambda c: c.status()).peers}

    def node_id(self) -> str:
        return self.call(lambda c: c.status()).node_id

    def logs(self, lines: int = 40) -> str:
        return (f"----- {self.name} log ({self.log_file}) -----\n{tail(self.log_file, lines)}\n"
                f"----- {self.name} stdout/stderr -----\n{tail(self.out_file, 10)}")


def _all_fills(c: SyncClient, max_pages: int) -> dict[str, Any]:
    """Every fill the node holds, as it sent them, at most ``max_pages`` pages."""
    fills: list[Any] = []
    total = 0
    for _ in range(max_pages):
        page = c.fills_page(since=len(fills), limit=1000)
        fills += page.raw["fills"]
        total = page.total
        if not page.fills or len(fills) >= total:
            break
    return {"fills": fills, "next": len(fills), "total": total}


def cancel_leftovers(nodes: list[NodeProc], timeout: float = CONVERGE_TIMEOUT) -> None:
    """Cancel every order the last test placed (``NodeProc.placed``) that still
    rests, each at the node that placed it, and wait until every running node
    knows: a module's tests that share nodes then each start from a book
    without the previous test's orders, whether it passed or failed."""
    up = [n for n in nodes if n.running()]
    cancelled: list[str] = []
    for n in up:
        for oid in n.placed:
            try:
                view = n.call(lambda c: c.order(oid))  # noqa: B023 (called at once)
            except ClientError:
                continue  # unknown there (refused, or void): nothing rests
            if view.remaining and view.status in ("open", "partially_filled"):
                outcome = n.cancel(oid)
                assert outcome.status == 200, f"cancelling {oid[:16]} left by the test at {n.name}: {outcome}"
                cancelled.append(oid)
    for n in nodes:
        n.placed.clear()

    def settled() -> bool:
        for n in up:
            for oid in cancelled:
                try:
                    if n.call(lambda c: c.order(oid)).status in ("open", "partially_filled"):  # noqa: B023
                        return False
                except ClientError:
                    return False  # not there yet
        return True

    wait_until(settled, timeout=timeout, what=f"{len(cancelled)} leftover orders cancelled everywhere",
               nodes=nodes, interval=0.05)


def stop_all(nodes: Iterable[NodeProc]) -> None:
    for n in nodes:
        try:
            n.stop()
        except Exception as exc:  # keep stopping the others
            print(f"stopping {n.name}: {exc}", file=sys.stderr)


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: no node outlives the test process, whatever happened."""
    for pid, proc in list(_live.items()):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(STOP_TIMEOUT)
        _live.pop(pid, None)


def order_at(node: NodeProc, oid: str) -> dict[str, Any] | None:
    """The order as ``node`` knows it, or None (404)."""
    r = node.request("GET", f"/v1/orders/{oid}", token=None)
    if r.status == 404:
        return None
    assert r.status == 200, r
    out: dict[str, Any] = r.json()
    return out


def finality(node: NodeProc) -> dict[str, Any]:
    """The ``finality`` part of the node's status."""
    fin: dict[str, Any] = node.status()["finality"]
    return fin


def restart_stopped(nodes: Iterable[NodeProc]) -> None:
    """Start again those of ``nodes`` that a test stopped or killed (each waits until ready)."""
    for n in nodes:
        if not n.running():
            n.start()


def make_nodes(base: Path, names: Iterable[str], *, participants: int = 0) -> list[NodeProc]:
    """Node descriptions on fresh ports; the first is every other node's bootstrap.
    The last ``participants`` of them start without ``--member``."""
    nodes = [NodeProc(name=n, port=free_port(), data_dir=base / n) for n in names]
    for n in nodes[1:]:
        n.bootstrap = [nodes[0].port]
    for n in nodes[len(nodes) - participants:]:
        n.member = False
    return nodes


def start_network(nodes: list[NodeProc], *, members: bool = True, timeout: float = CONVERGE_TIMEOUT) -> None:
    """Start the first node (no bootstrap: it founds the network), then the
    others (they join it); wait until all are ready and peers of each other,
    and (``members``) until every node counts all of those started with
    ``--member`` (and the first) as members."""
    nodes[0].start()
    for n in nodes[1:]:
        n.start(wait=False)
    for n in nodes[1:]:
        n.wait_ready()
    wait_full_mesh(nodes, timeout)
    if members:
        committee = [nodes[0], *(n for n in nodes[1:] if n.member)]

        def all_members() -> bool:
            fins = [n.status()["finality"] for n in nodes]
            return all((f["member"] or n not in committee) and len(f["members"]) == len(committee)
                       for n, f in zip(nodes, fins, strict=True))

        wait_until(all_members, timeout=timeout, what=f"{len(committee)} members", nodes=nodes, interval=0.1)


@contextlib.contextmanager
def cluster(base: Path, names: Iterable[str] = ("a", "b", "c")) -> Iterator[list[NodeProc]]:
    """Start a network of nodes (``start_network``); stop them all on exit."""
    nodes = make_nodes(base, names)
    try:
        start_network(nodes)
        yield nodes
    finally:
        stop_all(nodes)


# ---- bounded waits --------------------------------------------------------------------


def wait_until(pred: Callable[[], Any], *, timeout: float, what: str, nodes: Iterable[NodeProc] = (),
               interval: float = POLL, ignore: tuple[type[Exception], ...] = ()) -> Any:
    """Poll ``pred`` until it returns a truthy value; bounded in time and in count.
    An exception of a kind in ``ignore`` counts as not yet (a node still starting)."""
    deadline = time.monotonic() + timeout
    max_polls = int(timeout / interval) + 10
    error: Exception | None = None
    for _ in range(max_polls):
        try:
            last = pred()
        except ignore as exc:
            error, last = exc, None
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f" (last error: {error!r})" if error is not None else "") + "\n" + all_logs(nodes))


def all_logs(nodes: Iterable[NodeProc]) -> str:
    return "\n".join(n.logs() for n in nodes)


def wait_full_mesh(nodes: list[NodeProc], timeout: float = CONVERGE_TIMEOUT) -> None:
    """Every node knows every other node as a peer that answers."""
    ids = {n.name: n.node_id() for n in nodes}

    def meshed() -> bool:
        for n in nodes:
            up = {p.id for p in n.call(lambda c: c.status()).peers if p.state == "up"}
            if not {ids[m.name] for m in nodes if m is not n} <= up:
                return False
        return True

    wait_until(meshed, timeout=timeout, what="full mesh of peers", nodes=nodes, interval=0.1)


def wait_converged(nodes: list[NodeProc], timeout: float = CONVERGE_TIMEOUT,
                   min_entries: int = 0, *, final: bool = True) -> dict[str, Any]:
    """Wait until every node has the same state hash (and at least ``min_entries``)
    with nothing left to make final (``final=False``: final or not, for nodes
    that cannot finalize while a member is down); then check records, book and
    fills are equal too.  Returns the snapshot."""

    def same() -> bool:
        sts = [n.call(lambda c: c.status()) for n in nodes]
        return (len({s.state_hash for s in sts}) == 1
                and all(s.entries >= min_entries for s in sts)
                and (not final or not any(s.raw["finality"]["pending"] for s in sts))
                and len({s.final_fills for s in sts}) == 1)

    try:
        wait_until(same, timeout=timeout, what="equal state hashes", nodes=nodes, interval=0.1)
    except AssertionError:
        detail = "\n".join(f"{n.name}: {n.status()['version_vector']}" for n in nodes if n.running())
        raise AssertionError(f"replicas did not converge:\n{detail}") from None
    snaps = [n.snapshot() for n in nodes]
    for n, s in zip(nodes[1:], snaps[1:], strict=True):
        assert s == snaps[0], f"{n.name} differs from {nodes[0].name} at equal state hash"
    return snaps[0]


def all_final(nodes: list[NodeProc]) -> bool:
    """Nothing pending anywhere and the same final fills on every node."""
    sts = [n.status() for n in nodes]
    if any(s["finality"]["pending"] for s in sts):
        return False
    counts = {s["counts"]["final_fills"] for s in sts}
    return len(counts) == 1 and all(s["counts"]["provisional_fills"] == 0 for s in sts)


def wait_order_everywhere(nodes: list[NodeProc], oid: str, timeout: float = CONVERGE_TIMEOUT) -> float:
    """Seconds until every node knows order ``oid`` (GET /v1/orders/{oid} answers)."""
    start = time.monotonic()
    pending = list(nodes)

    def known(n: NodeProc) -> bool:
        try:
            n.call(lambda c: c.order(oid))
        except ClientError as exc:
            if exc.status is None:  # the node did not answer: fail, as before
                raise
            return False  # 404 unknown_order (or a refusal): not yet
        return True

    def seen() -> bool:
        for n in list(pending):
            if known(n):
                pending.remove(n)
        return not pending

    wait_until(seen, timeout=timeout, what=f"order {oid[:16]} on every node", nodes=nodes, interval=0.01)
    return time.monotonic() - start


def write_history(data_dir: Path, bodies: Iterable[Any], *, start_ms: int) -> None:
    """Give a node that has not started yet a past: the data dir of the founder
    of a one-node network whose log holds ``bodies`` (orders, cancels), one
    millisecond apart from ``start_ms``, each committed as the node would have.
    Holds the data dir's lock meanwhile, as a node does (``DataDirInUse``
    while a node runs on it)."""
    from matching.exchange import Exchange
    from net.datadir import DataDirLock
    from net.store import Store, load_or_create_key

    with DataDirLock.acquire(data_dir):
        ex = Exchange(load_or_create_key(data_dir))
        store = Store(data_dir)
        try:
            genesis = ex.found(now_ms=start_ms)
            ex.apply_own(genesis, now_ms=start_ms)
            assert ex.network is not None
            store.save_network(ex.network)
            entries = [genesis]
            for i, body in enumerate(bodies):
                e = ex.prepare(body, now_ms=start_ms + 1 + i)
                ex.apply_own(e, now_ms=start_ms + 1 + i)
                ex.take_finalized()  # the node recomputes what is final when it loads these entries
                entries.append(e)
            store.save_entries(entries)
        finally:
            store.close()
