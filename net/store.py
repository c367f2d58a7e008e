"""Persistence in the data dir: identity key, API cookie, SQLite (WAL) for
entries, peer records, client order ids, the network the data dir serves,
and what finality made final.  Whoever opens these holds the data dir's
lock first (``net.datadir``).

An entry is committed here before the node acknowledges it.  What became
final (fills, the final state of the orders they touched, and the
checkpoint a restart starts from) is written in one transaction, which may
also carry entries: the node groups what it merged from peers and what
became final into one commit (``save``).  Nothing
read from disk is unpickled: entries are msgpack wire bytes decoded by
``crdt.entry``, the checkpoint a msgpack map.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack

from crdt.entry import Carry, Entry, decode_body, decode_entry_bytes, encode_entry
from crdt.errors import ValidationError
from crdt.keys import SEED_LEN, SigningKey
from matching.engine import FinalBatch, OrderStatus
from matching.exchange import Checkpoint, Exchange
from net.errors import StorageError

KEY_FILE = "node.key"
CID_ORDER = 0  # kinds of request a client id names
CID_CANCEL = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientId:
    """A client's id for one write request, and what that request wrote."""

    kind: int  # CID_ORDER or CID_CANCEL
    cid: str
    entry: bytes  # hash of the entry it wrote
    order_id: bytes  # the order placed or cancelled


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalFill:
    seq: int
    taker: bytes
    maker: bytes
    price: int
    qty: int
    taker_side: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredOrder:
    """An order's final state, as the last finalize that touched it left it."""

    oid: bytes
    owner: bytes
    key: bytes
    status: OrderStatus


COOKIE_FILE = ".cookie"
DB_FILE = "node.sqlite"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_key(data_dir: Path) -> SigningKey:
    path = data_dir / KEY_FILE
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != SEED_LEN:
            raise StorageError(f"{path} is not a {SEED_LEN}-byte Ed25519 seed")
        return SigningKey(seed)
    seed = secrets.token_bytes(SEED_LEN)
    _write_private(path, seed)
    return SigningKey(seed)


def new_token() -> str:
    """A fresh API token for one run of the node."""
    return secrets.token_hex(32)


def write_cookie(data_dir: Path, token: str) -> None:
    """The run's API token, readable only by the node's user (written once it listens)."""
    _write_private(data_dir / COOKIE_FILE, token.encode())


def read_cookie(data_dir: Path) -> str:
    return (data_dir / COOKIE_FILE).read_text().strip()


class Store:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        old = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone() is not None
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (origin BLOB, seq INTEGER, kind INTEGER NOT NULL,"
            " wire BLOB NOT NULL, PRIMARY KEY (origin, seq)) WITHOUT ROWID"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        if old and "kind" not in columns:
            self._db.close()
            raise StorageError(f"{self.path} was written by an older version (entries without "
                               "acknowledgements); start with a fresh --data-dir")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS final_fills (seq INTEGER PRIMARY KEY, taker BLOB NOT NULL,"
            " maker BLOB NOT NULL, price INTEGER NOT NULL, qty INTEGER NOT NULL, taker_side INTEGER)"
        )
        self._db.execute(
            # a rowid table: rows go in at the end, and only the indexes (on oid, and on the resting
            # ones) take random inserts (100,000 final orders and their entries written in pages of 4,000:
            # 1.25 s against 1.8 s for a table keyed by oid)
            "CREATE TABLE IF NOT EXISTS final_orders (oid BLOB PRIMARY KEY NOT NULL, owner BLOB NOT NULL,"
            " key BLOB NOT NULL, side INTEGER, price INTEGER, qty INTEGER, filled INTEGER,"
            " remaining INTEGER, state TEXT)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS resting ON final_orders (remaining) WHERE remaining > 0")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS peers (node_id BLOB PRIMARY KEY, record BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS evidence (origin BLOB PRIMARY KEY, first BLOB NOT NULL,"
            " second BLOB NOT NULL)"
        )
        # carried orders that final let go, while a repeat of their ticket could still come
        # (matching.exchange: ``FinalBatch.retired``); rows below the horizon are deleted
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS retired_tickets (key BLOB NOT NULL, oid BLOB NOT NULL,"
            " PRIMARY KEY (key, oid)) WITHOUT ROWID"
        )
        # final cancels that found no order of their id, while the order could still come (``FinalBatch.marked``)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS cancel_marks (key BLOB NOT NULL, oid BLOB NOT NULL, owner BLOB NOT NULL,"
            " PRIMARY KEY (key, oid)) WITHOUT ROWID"
        )
        # a participant's client id for a request -> the ticket it signed for it (a repeat sends the same)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS client_tickets (kind INTEGER, cid TEXT, ticket BLOB NOT NULL,"
            " PRIMARY KEY (kind, cid)) WITHOUT ROWID"
        )
        # a client's id for a request (``cid``) -> the entry it wrote and the order it concerns
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS client_ids (kind INTEGER, cid TEXT, entry BLOB NOT NULL,"
            " order_id BLOB NOT NULL, PRIMARY KEY (kind, cid)) WITHOUT ROWID"
        )

    def save_entries(self, entries: Iterable[Entry], *, client_id: ClientId | None = None) -> None:
        """Commit entries; with ``client_id``, the client's id of the request
        that wrote them in the same transaction (both or neither survive)."""
        self.save(list(entries), client_ids=[client_id] if client_id is not None else [])

    def save(self, entries: Sequence[Entry], *, client_ids: Sequence[ClientId] = (),
             finals: tuple[list[FinalBatch], Checkpoint] | None = None, network: bytes | None = None) -> None:
        """One transaction: entries (in the order given), the client's ids of the
        requests that wrote some of them, final fills with the final state of
        their orders and the new checkpoint, and the network this data dir
        serves (a genesis and the network it names). All or nothing."""
        rows = [(e.origin, e.seq, e.body.to_wire()[0], encode_entry(e)) for e in entries]
        if not rows and finals is None and network is None:
            return
        with self._db:
            self._db.execute("BEGIN")
            # a plain INSERT: a second entry at one (origin, seq) must fail loudly
            self._db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?)", rows)
            self._db.executemany("INSERT INTO client_ids VALUES (?, ?, ?, ?)",
                                 [(c.kind, c.cid, c.entry, c.order_id) for c in client_ids])
            if finals is not None:
                self._write_finals(*finals)
            if network is not None:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('network', ?)", (network,))

    def save_client_ticket(self, kind: int, cid: str, ticket: Carry) -> None:
        """A participant's ticket for a client id, before it goes to any member."""
        self._db.execute("INSERT OR REPLACE INTO client_tickets VALUES (?, ?, ?)",
                         (kind, cid, msgpack.packb(ticket.to_wire(), use_bin_type=True)))

    def find_client_ticket(self, kind: int, cid: str) -> Carry | None:
        row = self._db.execute("SELECT ticket FROM client_tickets WHERE kind = ? AND cid = ?", (kind, cid)).fetchone()
        if row is None:
            return None
        try:
            body = decode_body(msgpack.unpackb(bytes(row[0]), raw=False))
        except (ValidationError, ValueError) as exc:
            raise StorageError(f"a stored ticket does not decode: {exc}") from None
        return body if isinstance(body, Carry) else None

    def find_client_id(self, kind: int, cid: str) -> ClientId | None:
        row = self._db.execute("SELECT entry, order_id FROM client_ids WHERE kind = ? AND cid = ?",
                               (kind, cid)).fetchone()
        if row is None:
            return None
        return ClientId(kind=kind, cid=cid, entry=bytes(row[0]), order_id=bytes(row[1]))

    def load_entries(self, bases: dict[bytes, int] | None = None) -> list[Entry]:
        """Every stored entry, or with ``bases`` only those above each origin's
        base (the entries a checkpoint does not cover)."""
        if not bases:
            cur = self._db.execute("SELECT wire FROM entries ORDER BY origin, seq")
            return [decode_entry_bytes(bytes(row[0])) for row in cur]
        out: list[Entry] = []
        for (origin,) in self._db.execute("SELECT DISTINCT origin FROM entries").fetchall():
            origin = bytes(origin)
            cur = self._db.execute("SELECT wire FROM entries WHERE origin = ? AND seq > ? ORDER BY seq",
                                   (origin, bases.get(origin, 0)))
            out.extend(decode_entry_bytes(bytes(row[0])) for row in cur)
        return out

    def load_entry(self, origin: bytes, seq: int) -> Entry | None:
        row = self._db.execute("SELECT wire FROM entries WHERE origin = ? AND seq = ?", (origin, seq)).fetchone()
        return None if row is None else decode_entry_bytes(bytes(row[0]))

    def wire_range(self, origin: bytes, lo: int, hi: int) -> list[object]:
        """Entries ``lo..hi`` of ``origin`` as wire arrays (for a peer's delta; not re-verified)."""
        cur = self._db.execute("SELECT wire FROM entries WHERE origin = ? AND seq BETWEEN ? AND ? ORDER BY seq",
                               (origin, lo, hi))
        return [msgpack.unpackb(bytes(row[0]), raw=False) for row in cur]

    def count_records(self) -> int:
        """Entries that are not heartbeats: what changes when anything happens."""
        row = self._db.execute("SELECT COUNT(*) FROM entries WHERE kind != 3").fetchone()
        return int(row[0])

    def count_kinds(self, origin: bytes | None) -> dict[int, int]:
        """How many entries of each body kind ``origin``'s log holds (None: all logs)."""
        if origin is None:
            return {int(k): int(n) for k, n in self._db.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind")}
        return {int(k): int(n) for k, n in self._db.execute(
            "SELECT kind, COUNT(*) FROM entries WHERE origin = ? GROUP BY kind", (origin,))}

    def save_evidence(self, origin: bytes, first: bytes, second: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO evidence VALUES (?, ?, ?)", (origin, first, second))

    # ---- what is final --------------------------------------------------------

    def _write_finals(self, batches: list[FinalBatch], checkpoint: Checkpoint) -> None:
        """Final fills, the final state of the orders they touched, and the new
        checkpoint (inside ``save``'s transaction)."""
        fills = []
        orders = []
        for b in batches:
            sides = {fo.oid: fo.status.side for fo in b.orders}
            for i, (taker, maker, price, qty) in enumerate(b.fills):
                fills.append((b.first_seq + i, taker, maker, price, qty, sides.get(taker)))
            for fo in b.orders:
                st = fo.status
                orders.append((fo.oid, fo.owner, fo.key, st.side, st.price, st.qty, st.filled, st.remaining,
                               st.state))
        self._db.executemany("INSERT INTO final_fills VALUES (?, ?, ?, ?, ?, ?)", fills)
        self._db.executemany("INSERT OR REPLACE INTO final_orders VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", orders)
        retired = [(key, oid) for b in batches for oid, key in b.retired]
        if retired:
            self._db.executemany("INSERT OR REPLACE INTO retired_tickets VALUES (?, ?)", retired)
        marked = [(r[0], r[2], r[6]) for b in batches for r in b.marked]
        if marked:
            self._db.executemany("INSERT OR REPLACE INTO cancel_marks VALUES (?, ?, ?)", marked)
        if batches:
            # by stamp, as the exchange lets them go (``Exchange._forget_tickets``)
            horizon = Exchange.ticket_horizon(checkpoint.final).to_bytes(8, "big")
            self._db.execute("DELETE FROM retired_tickets WHERE key < ?", (horizon,))
            self._db.execute("DELETE FROM cancel_marks WHERE key < ?", (horizon,))
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('checkpoint', ?)", (encode_checkpoint(checkpoint),))

    def load_checkpoint(self) -> Checkpoint | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'checkpoint'").fetchone()
        return None if row is None else decode_checkpoint(bytes(row[0]))

    def save_network(self, network: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('network', ?)", (network,))

    def load_network(self) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'network'").fetchone()
        return None if row is None else bytes(row[0])

    def resting_orders(self) -> list[list[object]]:
        """The final book, as engine order lists."""
        cur = self._db.execute("SELECT oid, owner, key, side, price, qty, filled, remaining FROM final_orders"
                               " WHERE remaining > 0")
        # one object per owner and per price: each row brings its own copies (72 and 32 bytes an order)
        owners: dict[bytes, bytes] = {}
        prices: dict[int, int] = {}
        return [[remaining, bytes(oid), qty, qty - filled - remaining, side, prices.setdefault(price, price),
                 bytes(key), owners.setdefault(bytes(owner), bytes(owner))]
                for oid, owner, key, side, price, qty, filled, remaining in cur]

    def retired_tickets(self) -> list[tuple[bytes, bytes]]:
        """``(id, key)`` of the carried orders final let go that a repeat of
        their ticket could still reach (for ``Exchange.load``)."""
        return [(bytes(oid), bytes(key)) for key, oid in self._db.execute("SELECT key, oid FROM retired_tickets")]

    def cancel_marks(self) -> list[tuple[bytes, bytes, bytes]]:
        """``(key, id, owner)`` of the final cancels that found no order (for ``Exchange.load``)."""
        rows = self._db.execute("SELECT key, oid, owner FROM cancel_marks")
        return [(bytes(k), bytes(o), bytes(w)) for k, o, w in rows]

    def final_order(self, oid: bytes) -> StoredOrder | None:
        row = self._db.execute("SELECT owner, key, side, price, qty, filled, remaining, state FROM final_orders"
                               " WHERE oid = ?", (oid,)).fetchone()
        if row is None:
            return None
        owner, key, side, price, qty, filled, remaining, state = row
        return StoredOrder(oid=oid, owner=bytes(owner), key=bytes(key), status=OrderStatus(
            state=state, qty=qty, filled=filled, remaining=remaining, side=side, price=price))

    def final_fills(self, since: int, limit: int) -> list[FinalFill]:
        cur = self._db.execute("SELECT seq, taker, maker, price, qty, taker_side FROM final_fills"
                               " WHERE seq >= ? ORDER BY seq LIMIT ?", (since, limit))
        return [FinalFill(seq=seq, taker=bytes(t), maker=bytes(m), price=p, qty=q, taker_side=side)
                for seq, t, m, p, q, side in cur]

    def final_traded(self) -> int:
        """Lots traded in final fills (read once at start; the node counts on)."""
        row = self._db.execute("SELECT COALESCE(SUM(qty), 0) FROM final_fills").fetchone()
        return int(row[0])

    def load_evidence(self) -> list[tuple[Entry, Entry]]:
        rows = self._db.execute("SELECT first, second FROM evidence")
        return [(decode_entry_bytes(bytes(a)), decode_entry_bytes(bytes(b))) for a, b in rows]

    def save_peer(self, node_id: bytes, record: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?)", (node_id, record))

    def delete_peer(self, node_id: bytes) -> None:
        self._db.execute("DELETE FROM peers WHERE node_id = ?", (node_id,))

    def load_peers(self) -> list[bytes]:
        return [bytes(row[0]) for row in self._db.execute("SELECT record FROM peers")]

    def close(self) -> None:
        self._db.close()


def encode_checkpoint(cp: Checkpoint) -> bytes:
    packed: bytes = msgpack.packb({
        "network": cp.network, "final": cp.final, "stable": cp.stable, "fills_base": cp.fills_base,
        "final_digest": cp.final_digest,
        "bases": [[o, s, h, t] for o, (s, h, t) in cp.bases.items()],
        "membership": [[o, ivs] for o, ivs in cp.membership.items()],
        "forks": [[o, s, f] for o, (s, f) in cp.forks.items()],
        "pins": [[o, s, h, t] for (o, s), (h, t) in cp.pins.items()],
    }, use_bin_type=True)
    return packed


def decode_checkpoint(data: bytes) -> Checkpoint:
    try:
        raw = msgpack.unpackb(data, raw=False)
        return Checkpoint(
            network=raw["network"], final=raw["final"], stable=raw["stable"], fills_base=raw["fills_base"],
            final_digest=raw["final_digest"],
            bases={o: (s, h, t) for o, s, h, t in raw["bases"]},
            membership={o: ivs for o, ivs in raw["membership"]},
            forks={o: (s, f) for o, s, f in raw["forks"]},
            pins={(o, s): (h, t) for o, s, h, t in raw["pins"]},
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"the stored checkpoint does not decode: {exc}") from None
