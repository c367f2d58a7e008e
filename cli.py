"""Command line: run a node, trade and inspect it.  Parses arguments and wires
things together; the logic lives in net/, client/ (the client commands) and the
pure core."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client import ClientError, OrderView, SyncClient

DEFAULT_DATA_DIR = "data/node"  # as client.DEFAULT_DATA_DIR, without importing the client here


class CliError(Exception):
    """One clear line for the user; exit status 1."""


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"P2PEX_{name}", default)


def port_number(text: str) -> int:
    """argparse type (applied to string defaults from the environment too)."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def rate_limit(text: str) -> Any:
    from net.ratelimit import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def peer_networks(text: str) -> tuple[str, ...] | None:
    from net.addresses import parse_networks

    try:
        return parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---- node ---------------------------------------------------------------------


def add_node_parser(sub: Any) -> None:
    p = sub.add_parser("node", help="run a node (HTTP API + DHT + replication)")
    p.add_argument("--host", default=env("HOST", "127.0.0.1"), help="bind address [P2PEX_HOST]")
    p.add_argument("--port", type=port_number, default=env("PORT", "7001"), help="HTTP port [P2PEX_PORT]")
    p.add_argument("--dht-port", type=port_number, default=env("DHT_PORT"),
                   help="UDP port of the DHT (default: the HTTP port number) [P2PEX_DHT_PORT]")
    p.add_argument("--data-dir", default=env("DATA_DIR", DEFAULT_DATA_DIR), help="[P2PEX_DATA_DIR]")
    p.add_argument("--bootstrap", action="append",
                   default=[b for b in re.split(r"[,\s]+", env("BOOTSTRAP", "") or "") if b],
                   help="DHT address HOST:PORT of any node; repeatable [P2PEX_BOOTSTRAP, comma-separated]")
    p.add_argument("--advertise", default=env("ADVERTISE"),
                   help="HOST[:PORT] peers should dial (host names allowed) [P2PEX_ADVERTISE]")
    p.add_argument("--name", default=env("NAME", "node"), help="name used in logs [P2PEX_NAME]")
    p.add_argument("--seed", action="store_true", default=env("SEED", "") in ("1", "true", "yes"),
                   help="seed node: DHT rendezvous and relay, takes no orders [P2PEX_SEED=1]")
    p.add_argument("--log-file", default=env("LOG_FILE"), help="[P2PEX_LOG_FILE]")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="[P2PEX_LOG_LEVEL]")
    p.add_argument("--pull-interval", type=positive_float, default=env("PULL_INTERVAL", "0.5"),
                   help="seconds between anti-entropy pulls [P2PEX_PULL_INTERVAL]")
    p.add_argument("--max-connections", type=positive_int, default=env("MAX_CONNECTIONS", "1000"),
                   help="HTTP connections at once; at the cap a new one displaces the oldest idle one "
                        "[P2PEX_MAX_CONNECTIONS]")
    p.add_argument("--header-timeout", type=positive_float, default=env("HEADER_TIMEOUT", "10"),
                   help="seconds for a request head to arrive, from its first byte [P2PEX_HEADER_TIMEOUT]")
    p.add_argument("--body-timeout", type=positive_float, default=env("BODY_TIMEOUT", "30"),
                   help="seconds for a request body to arrive [P2PEX_BODY_TIMEOUT]")
    p.add_argument("--keepalive-timeout", type=positive_float, default=env("KEEPALIVE_TIMEOUT", "30"),
                   help="seconds an idle connection is kept open [P2PEX_KEEPALIVE_TIMEOUT]")
    p.add_argument("--max-receiving-mb", type=positive_float, default=env("MAX_RECEIVING_MB", "64"),
                   help="MiB of request bodies being received at once, across requests [P2PEX_MAX_RECEIVING_MB]")
    p.add_argument("--write-limit", type=rate_limit, default=env("WRITE_LIMIT", "5000/10000"),
                   help="orders and cancels per second per client token, RATE[/BURST]; 0: none [P2PEX_WRITE_LIMIT]")
    p.add_argument("--read-limit", type=rate_limit, default=env("READ_LIMIT", "5000/10000"),
                   help="client reads per second per address (a page of N rows costs 1 + N/100), "
                        "RATE[/BURST]; 0: none [P2PEX_READ_LIMIT]")
    p.add_argument("--peer-limit", type=rate_limit, default=env("PEER_LIMIT", "5000/10000"),
                   help="peer calls per second per address, RATE[/BURST]; 0: none [P2PEX_PEER_LIMIT]")
    p.add_argument("--ready-timeout", type=positive_float, default=env("READY_TIMEOUT", "3"),
                   help="seconds to find a live peer to sync with before /readyz says ready alone "
                        "[P2PEX_READY_TIMEOUT]")
    p.add_argument("--genesis", action="store_true", default=env("GENESIS", "") in ("1", "true", "yes"),
                   help="found a new network even with --bootstrap (a node without --bootstrap and without "
                        "known peers founds one anyway); only on a fresh data dir [P2PEX_GENESIS=1]")
    p.add_argument("--member", action="store_true", default=env("MEMBER", "") in ("1", "true", "yes"),
                   help="ask the members to admit this node to the committee that certifies orders and moves "
                        "finality (without it, a node that joins is a participant: it trades, and members "
                        "carry its orders) [P2PEX_MEMBER=1]")
    p.add_argument("--max-members", type=positive_int, default=env("MAX_MEMBERS", "7"),
                   help="a member votes to admit no one while the committee has this many members "
                        "[P2PEX_MAX_MEMBERS]")
    p.add_argument("--evict-after", type=positive_float, default=env("EVICT_AFTER", "10"),
                   help="seconds of silence after which the members vote a member out [P2PEX_EVICT_AFTER]")
    p.add_argument("--suspect-after", type=positive_float, default=env("SUSPECT_AFTER", "1"),
                   help="seconds a member may hold orders back from finality without writing before the "
                        "members vote it out (at most --evict-after) [P2PEX_SUSPECT_AFTER]")
    p.add_argument("--heartbeat-ms", type=positive_int, default=env("HEARTBEAT_MS", "50"),
                   help="spacing of the entries that move finality while something is not final "
                        "[P2PEX_HEARTBEAT_MS]")
    p.add_argument("--max-clock-offset-ms", type=positive_int, default=env("MAX_CLOCK_OFFSET_MS", "1000"),
                   help="a node whose clock is further than this from its peers' median refuses orders "
                        "[P2PEX_MAX_CLOCK_OFFSET_MS]")
    p.add_argument("--max-loop-lag-ms", type=positive_int, default=env("MAX_LOOP_LAG_MS", "500"),
                   help="while the event loop wakes later than this three probes in a row, new orders and "
                        "cancels get 503 busy with Retry-After instead of queueing [P2PEX_MAX_LOOP_LAG_MS]")
    p.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default=env("EVENT_LOOP", "auto"),
                   help="auto: uvloop where it is installed, else asyncio's own loop [P2PEX_EVENT_LOOP]")
    p.add_argument("--clock-offset-ms", type=int, default=env("CLOCK_OFFSET_MS", "0"),
                   help="add this to the wall clock (for tests of skewed clocks) [P2PEX_CLOCK_OFFSET_MS]")
    p.add_argument("--max-foreign-origins", type=positive_int, default=env("MAX_FOREIGN_ORIGINS", "1000"),
                   help="origins held that are not members; entries of more are refused "
                        "[P2PEX_MAX_FOREIGN_ORIGINS]")
    p.add_argument("--grape", action="append",
                   default=[g for g in re.split(r"[,\s]+", env("GRAPES", "") or "") if g],
                   help="Grenache grape URL (http://HOST:API_PORT) to announce on and answer Grenache RPC "
                        "(POST /); repeatable; off without it [P2PEX_GRAPES, comma-separated]")
    p.add_argument("--grenache-service", default=env("GRENACHE_SERVICE", "exchange_service"),
                   help="the Grenache service name announced and answered [P2PEX_GRENACHE_SERVICE]")
    p.add_argument("--peer-networks", type=peer_networks, default=env("PEER_NETWORKS", "auto"),
                   help="kinds of address this node dials peers on: auto (public, plus the kind of its own "
                        "address) or a comma-separated list of public, private, loopback, link-local "
                        "[P2PEX_PEER_NETWORKS]")


def run_node(args: argparse.Namespace) -> int:
    from net.config import NodeConfig, split_host_port
    from net.errors import ListenError, StorageError
    from net.logs import setup_logging
    from net.node import Node

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log_file:
        Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(args.log_file)]
    setup_logging(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                  fmt=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s", handlers=handlers)
    try:
        bootstrap = tuple(split_host_port(b) for b in args.bootstrap)
        if args.advertise and split_host_port(args.advertise, args.port)[0] in ("0.0.0.0", "::", "[::]"):
            raise ValueError("--advertise must be an address or name peers can dial, not a wildcard")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    config = NodeConfig(
        host=args.host, port=args.port, dht_port=args.dht_port, data_dir=Path(args.data_dir),
        bootstrap=bootstrap, advertise=args.advertise, name=args.name, trading=not args.seed,
        pull_interval=args.pull_interval, peer_networks=args.peer_networks, ready_timeout=args.ready_timeout,
        max_connections=args.max_connections, header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout, max_receiving=int(args.max_receiving_mb * 1024 * 1024),
        write_limit=args.write_limit, read_limit=args.read_limit, peer_limit=args.peer_limit,
        genesis=args.genesis, member=args.member, max_members=args.max_members,
        evict_after=args.evict_after, suspect_after=args.suspect_after, heartbeat_ms=args.heartbeat_ms,
        clock_offset_ms=args.clock_offset_ms, max_clock_offset_ms=args.max_clock_offset_ms,
        max_loop_lag_ms=args.max_loop_lag_ms,
        max_foreign_origins=args.max_foreign_origins,
        grapes=tuple(args.grape), grenache_service=args.grenache_service,
    )
    offset = args.clock_offset_ms
    failures: list[str] = []  # why the node stopped by itself

    def refused(line: str) -> CliError:
        """A start that failed: its one line on stderr, and in the log file too when there is one."""
        if args.log_file:
            logging.getLogger("p2pex.node").error("%s: %s", args.name, line)
        return CliError(line)

    async def main() -> None:
        try:  # takes the data dir's lock first: a second node on it stops here, having changed nothing
            node = Node(config, clock_ms=lambda: time.time_ns() // 1_000_000 + offset)
        except StorageError as exc:
            raise refused(str(exc)) from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_stop)
        try:  # a start that fails before the node serves commits to no network (net/node.py, start)
            await node.start()
        except (ListenError, StorageError) as exc:
            await node.stop()
            raise refused(str(exc)) from None
        except OSError as exc:
            await node.stop()
            raise refused(f"cannot start the node: {exc}") from None
        print(f"node {node.short} ({config.name}) serving {node.url}; data in {config.data_dir}",
              file=sys.stderr, flush=True)
        try:
            await node.run_until_stopped()
        finally:
            await node.stop()
        if node.failure is not None:
            failures.append(node.failure)

    run_loop(main(), args.event_loop)
    if failures and args.log_file:  # else the node's ERROR line on stderr said it already
        raise CliError(failures[0])
    return 1 if failures else 0


def run_loop(main: Coroutine[Any, Any, None], choice: str) -> None:
    """Run ``main`` on uvloop (``auto``: where it is installed) or on asyncio's
    loop, with an exit bounded in time (``net.runloop``)."""
    from net import runloop

    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise CliError("--event-loop uvloop: uvloop is not installed") from None
        else:
            factory = uvloop.new_event_loop
    runloop.run(main, loop_factory=factory)


# ---- client commands -------------------------------------------------------------
# The client library (client/) is imported inside the commands, so that `--version`
# and the one-line message of an interpreter without aiohttp need none of it.


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", default=env("NODE"), help="node URL (default: the node of --data-dir) [P2PEX_NODE]")
    p.add_argument("--data-dir", default=env("DATA_DIR", DEFAULT_DATA_DIR),
                   help="where the node's .cookie and endpoint are [P2PEX_DATA_DIR]")
    p.add_argument("--token", default=env("TOKEN"), help="API token instead of the cookie [P2PEX_TOKEN]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0)


def node_url(args: argparse.Namespace) -> str:
    """--node (``HOST:PORT`` means http), else the data dir's ``endpoint`` file, else the default."""
    from client import resolve_url

    return resolve_url(args.node, args.data_dir)


#: Attempts of a write that carries a client id (``cid``): a retry cannot place it twice.
WRITE_ATTEMPTS = 4
RETRY_PAUSE_S = 0.25  # doubling: 0.25, 0.5, 1 s
RETRY_AFTER_MAX_S = 2.0


def new_cid() -> str:
    """A fresh client id: 16 characters of [A-Za-z0-9_-]."""
    return secrets.token_urlsafe(12)


def error_line(exc: ClientError, url: str) -> str:
    """What the user reads for a failed call."""
    if exc.code == "bad_url":
        return f"bad node URL {url!r}: {exc.detail}"
    if exc.code == "no_token":
        return f"no API token: {exc.detail} (pass --token or --data-dir of the node)"
    if exc.network:
        return f"cannot reach a node at {url} ({exc.detail}); start one with `python cli.py node`"
    if exc.status is None or exc.code in ("bad_reply", "http_error"):
        return exc.detail
    return str(exc)  # "code: detail (HTTP status)"


def client_command(args: argparse.Namespace) -> Any:
    """Run a client command with a client of the node the options name; its
    failures become one line.  Reads are retried; order and cancel send a
    cid and are retried up to WRITE_ATTEMPTS times (see client/aio.py)."""
    from client import ClientError, SyncClient

    url = node_url(args)
    if not args.timeout > 0:
        raise CliError("--timeout must be positive")
    try:
        with SyncClient(url, args.token or (lambda: token(args)), timeout=args.timeout,
                        write_attempts=WRITE_ATTEMPTS, retry_pause=RETRY_PAUSE_S,
                        retry_after_max=RETRY_AFTER_MAX_S) as c:
            return args.func(args, c)
    except ClientError as exc:
        raise CliError(error_line(exc, url)) from None


def token(args: argparse.Namespace) -> str:
    """--token, else the data dir's ``.cookie`` (ClientError no_token)."""
    from client import read_token

    return str(args.token) if args.token else read_token(args.data_dir)


def parse_qty_price(text: str, market: bool) -> tuple[int, int | None]:
    m = re.fullmatch(r"(\d+)(?:@(\d+))?", text)
    if not m:
        raise CliError(f"expected QTY@PRICE (integers, e.g. 10@100) or QTY with --market, got {text!r}")
    qty = int(m.group(1))
    price = int(m.group(2)) if m.group(2) else None
    if market and price is not None:
        raise CliError("a market order has no price: use QTY with --market")
    if not market and price is None:
        raise CliError("a limit order needs a price: QTY@PRICE (or add --market)")
    return qty, price


def fmt_order(o: OrderView) -> str:
    if o.void:
        return f"order {o.id[:16]}: void ({o.detail or ''})"
    price = "market" if o.market else str(o.price)
    return (f"order {o.id[:16]} {o.side} {o.qty}@{price}: {o.status}, "
            f"filled {o.filled}, remaining {o.remaining}, {'final' if o.final else 'provisional'}")


def cmd_order(args: argparse.Namespace, c: SyncClient) -> Any:
    qty, price = parse_qty_price(args.amount, args.market)
    out = c.place(args.side, qty, price, tif="IOC" if args.ioc else "GTC", market=args.market,
                  cid=args.cid or new_cid(), wait_final=args.wait_timeout if args.wait_final else None)
    if not args.json:
        print(fmt_order(out))
        print(f"id {out.id}")
        for f in out.fills:
            print(f"  fill {f.qty}@{f.price} against {f.maker[:16]} ({'final' if f.final else 'provisional'})")
        if out.detail:
            print(out.detail)
    if args.wait_final and not out.final:
        raise CliError(f"order {out.id} accepted, but not final within {args.wait_timeout:g} s")
    return out.raw


def cmd_cancel(args: argparse.Namespace, c: SyncClient) -> Any:
    out = c.cancel(args.id, cid=args.cid or new_cid())
    if not args.json:
        print(fmt_order(out))
    return out.raw


def cmd_show(args: argparse.Namespace, c: SyncClient) -> Any:
    out = c.order(args.id)
    if not args.json:
        print(fmt_order(out))
    return out.raw


def cmd_book(args: argparse.Namespace, c: SyncClient) -> Any:
    from client.tables import book_table, show

    out = c.book(args.depth)
    if not args.json:
        if out.bids or out.asks:
            show(book_table(out))
        else:
            print("(book is empty)")
    return out.raw


def cmd_fills(args: argparse.Namespace, c: SyncClient) -> Any:
    from client.tables import fills_table, show

    out = c.fills_page(since=args.since, limit=args.limit, final=args.final)
    if not args.json:
        if out.fills:
            show(fills_table(out.fills))
        print(f"{len(out.fills)} of {out.total} {'final ' if args.final else ''}fills")
    return out.raw


def cmd_watch(args: argparse.Namespace, c: SyncClient) -> Any:
    """Print the node's event stream (WebSocket /v1/stream), one line per event."""
    from client import ClientError

    url = c.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/stream"
    count = 0
    try:
        for ev in c.stream():
            print(json.dumps(ev.raw) if args.json else fmt_event(ev.raw), flush=True)
            count += 1
            if args.count and count >= args.count:
                break
    except ClientError as exc:
        raise CliError(f"cannot stream from {url}: {exc.detail}") from None
    return None


def fmt_event(ev: Mapping[str, Any]) -> str:
    kind = ev.get("type")
    if kind in ("fill", "revoked"):
        f = ev["fill"]
        return f"{kind:8} {f['qty']}@{f['price']} taker {f['taker'][:12]} maker {f['maker'][:12]}"
    if kind == "final":
        return f"final    {len(ev['fills'])} fills, frontier {ev['frontier']}: " + ", ".join(
            f"#{f['seq']} {f['qty']}@{f['price']}" for f in ev["fills"][:8]) + (" ..." if len(ev["fills"]) > 8 else "")
    if kind == "book":
        bid = ev["bids"][0] if ev["bids"] else None
        ask = ev["asks"][0] if ev["asks"] else None
        return (f"book     bid {bid[1]}@{bid[0]}" if bid else "book     bid -") + (
            f"  ask {ask[1]}@{ask[0]}" if ask else "  ask -")
    return json.dumps(ev)


def cmd_status(args: argparse.Namespace, c: SyncClient) -> Any:
    from client.tables import show, status_table

    out = c.status()
    if not args.json:
        show(status_table(out))
    return out.raw


def cmd_peers(args: argparse.Namespace, c: SyncClient) -> Any:
    from client.tables import peers_table, show

    out = c.status()
    if not args.json:
        if out.peers:
            show(peers_table(out.peers))
        else:
            print("(no peers yet)")
    return out.raw["peers"]


# ---- trade ----------------------------------------------------------------------


def add_trade_parser(sub: Any) -> None:
    p = sub.add_parser("trade", help="trade random orders through a node's client API until SIGTERM")
    add_client_options(p)
    p.add_argument("--rate", type=float, default=5.0, help="orders per second (default 5)")
    p.add_argument("--seconds", type=float, default=None, help="stop trading after this long (default: until SIGTERM)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the order flow (default: random)")
    p.add_argument("--mid", type=int, default=10_000, help="mid price in ticks (default 10000)")
    p.add_argument("--wait-ready", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the node's /readyz (default 60)")
    p.add_argument("--with-node", action="store_true",
                   help="also run this data dir's node (`cli.py node`, configured by the same P2PEX_* settings) "
                        "as a child process; it keeps serving after --seconds until SIGTERM, which stops both")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="[P2PEX_LOG_LEVEL]")


def run_trade(args: argparse.Namespace) -> int:
    from client import ClientError
    from net.trader import TraderError, TradeStats, run_trader

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s {env('NAME') or 'trader'} %(levelname)s %(name)s: %(message)s")
    if args.rate <= 0 or (args.seconds is not None and args.seconds <= 0) or args.mid < 1:
        raise CliError("--rate, --seconds and --mid must be positive")
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    if args.with_node:
        from net.datadir import DataDirInUse, ensure_free

        try:  # the child node would be refused; say so before trading against whichever node answers
            ensure_free(Path(args.data_dir))
        except DataDirInUse as exc:
            raise CliError(str(exc)) from None
    node_argv = [sys.executable, str(Path(__file__).resolve()), "node", "--data-dir", str(args.data_dir)]
    # the child node listens on P2PEX_PORT; its endpoint file may not be written yet
    url = f"http://127.0.0.1:{env('PORT', '7001')}" if args.with_node and not args.node else node_url(args)

    def report(stats: TradeStats) -> None:
        out = {"seed": seed, **stats.as_dict()}
        print(json.dumps(out) if args.json else " ".join(f"{k}={v}" for k, v in out.items()), flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_trader(
            url, lambda: token(args), stop=stop, wait_ready_s=args.wait_ready,
            node_argv=node_argv if args.with_node else None, on_done=report,
            rate=args.rate, seconds=args.seconds, seed=seed, mid=args.mid, timeout=args.timeout,
        )

    try:
        asyncio.run(main())
    except TraderError as exc:
        raise CliError(str(exc)) from None
    except ClientError as exc:  # no token
        raise CliError(error_line(exc, url)) from None
    return 0


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a local network of nodes and traders, then print a summary")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the traders trade (default 30)")
    p.add_argument("--traders", type=int, default=2, help="trader nodes (default 2)")
    p.add_argument("--exchanges", type=int, default=2, help="exchange nodes (default 2)")
    p.add_argument("--seeds", type=int, default=2, help="seed nodes (default 2)")
    p.add_argument("--rate", type=float, default=10.0, help="orders per second per trader (default 10)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the traders (default 42)")
    p.add_argument("--logs", default="logs", help="log directory (default ./logs)")
    p.add_argument("--keep-data", action="store_true", help="keep the nodes' data dirs")


def run_demo(args: argparse.Namespace) -> int:
    from net.demo import DemoOptions
    from net.demo import run_demo as run

    return run(DemoOptions(
        seconds=args.seconds, traders=args.traders, exchanges=args.exchanges, seeds=args.seeds,
        rate=args.rate, seed=args.seed, logs=Path(args.logs), keep_data=args.keep_data,
    ))


def add_grenache_parser(sub: Any) -> None:
    p = sub.add_parser("grenache", help="call Grenache services through grapes: lookup NAME | call NAME JSON")
    gsub = p.add_subparsers(dest="grenache_command", required=True)
    for name, text in (("lookup", "the addresses a grape knows for a service"),
                       ("call", "send a JSON payload to a service (one address, or every one with --map)")):
        q = gsub.add_parser(name, help=text)
        q.add_argument("service", help="service name, e.g. exchange_service")
        if name == "call":
            q.add_argument("payload", help='JSON payload, e.g. \'{"action": "getOrderbook"}\'')
            q.add_argument("--map", action="store_true", help="call every address (default: one, at random)")
            q.add_argument("--gzip", action="store_true", help="gzip both bodies (grc-compress: gzip)")
            q.add_argument("--timeout", type=positive_float, default=10.0, help="seconds per call (default 10)")
        q.add_argument("--grape", action="append", required=True,
                       help="grape URL (http://HOST:API_PORT); repeatable, the first that answers is used")


def run_grenache(args: argparse.Namespace) -> int:
    import asyncio

    from net.grenache import GrenacheError, call, lookup_addresses

    try:
        if args.grenache_command == "lookup":
            print(json.dumps(asyncio.run(lookup_addresses(args.grape, args.service))))
            return 0
        try:
            payload = json.loads(args.payload)
        except ValueError as exc:
            raise CliError(f"the payload is not JSON: {exc}") from None
        rows = asyncio.run(call(args.grape, args.service, payload, every=args.map, gz=args.gzip,
                                timeout=args.timeout))
    except GrenacheError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(rows if args.map else rows[-1], indent=2))
    return 0 if any("result" in r for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description="p2pex: a peer-to-peer order-book exchange")
    parser.add_argument("--version", action="version", version=f"p2pex {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_node_parser(sub)
    add_trade_parser(sub)
    add_demo_parser(sub)
    add_grenache_parser(sub)
    p = sub.add_parser("order", help="submit an order: order buy 10@100 | order sell 5 --market")
    p.add_argument("side", choices=["buy", "sell"])
    p.add_argument("amount", help="QTY@PRICE in integer lots and ticks, or QTY with --market")
    p.add_argument("--ioc", action="store_true", help="immediate or cancel (default GTC)")
    p.add_argument("--market", action="store_true", help="market order (IOC, no price limit)")
    p.add_argument("--cid", help="client id of the order (default: a fresh one); a repeat places nothing")
    p.add_argument("--wait-final", action="store_true", help="return once the order's outcome is final")
    p.add_argument("--wait-timeout", type=positive_float, default=10.0,
                   help="seconds to wait with --wait-final (default 10)")
    add_client_options(p)
    p.set_defaults(func=cmd_order)
    p = sub.add_parser("cancel", help="cancel one of this node's resting orders")
    p.add_argument("id")
    p.add_argument("--cid", help="client id of the cancel (default: a fresh one)")
    add_client_options(p)
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("show", help="status of one order")
    p.add_argument("id")
    add_client_options(p)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("book", help="order book depth")
    p.add_argument("--depth", type=int, default=10)
    add_client_options(p)
    p.set_defaults(func=cmd_book)
    p = sub.add_parser("fills", help="trades")
    p.add_argument("--since", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--final", action="store_true", help="final fills only (their seq never changes)")
    add_client_options(p)
    p.set_defaults(func=cmd_fills)
    p = sub.add_parser("watch", help="print the node's live events: fills, revocations, finality, book")
    p.add_argument("--count", type=int, default=0, help="stop after this many events (default: never)")
    add_client_options(p)
    p.set_defaults(func=cmd_watch)
    for name, func, text in (("status", cmd_status, "node status"), ("peers", cmd_peers, "known peers")):
        p = sub.add_parser(name, help=text)
        add_client_options(p)
        p.set_defaults(func=func)
    return parser


def version() -> str:
    """The installed package's version, else the one in pyproject.toml."""
    from importlib import metadata

    try:
        return metadata.version("p2pex")
    except metadata.PackageNotFoundError:
        import tomllib

        with open(Path(__file__).resolve().parent / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("client", "crdt", "matching", "net", "sim", "tests"):
            raise
        print(f"error: this Python ({sys.executable}) lacks the project's dependencies (no module "
              f"{exc.name!r}): run `make install && . .venv/bin/activate`, or use .venv/bin/python",
              file=sys.stderr)
        return 1


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "node":
            return run_node(args)
        if args.command == "trade":
            return run_trade(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "grenache":
            return run_grenache(args)
        out = client_command(args)
        if args.json and out is not None:
            print(json.dumps(out, indent=2))
        return 0
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
