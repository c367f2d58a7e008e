"""Persistence in the data dir: identity key, API cookie, SQLite (WAL) for
entries, peer records and client order ids.

An entry is committed here before the node acknowledges it.  Nothing read from
disk is unpickled: entries are msgpack wire bytes decoded by ``crdt.entry``.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from crdt.entry import Entry, decode_entry_bytes, encode_entry
from crdt.keys import SEED_LEN, SigningKey
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


def write_cookie(data_dir: Path) -> str:
    """A fresh API token for this run, readable only by the node's user."""
    token = secrets.token_hex(32)
    _write_private(data_dir / COOKIE_FILE, token.encode())
    return token


def read_cookie(data_dir: Path) -> str:
    return (data_dir / COOKIE_FILE).read_text().strip()


class Store:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (origin BLOB, seq INTEGER, wire BLOB NOT NULL,"
            " PRIMARY KEY (origin, seq)) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS peers (node_id BLOB PRIMARY KEY, record BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS evidence (origin BLOB PRIMARY KEY, first BLOB NOT NULL,"
            " second BLOB NOT NULL)"
        )
        # a client's id for a request (``cid``) -> the entry it wrote and the order it concerns
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS client_ids (kind INTEGER, cid TEXT, entry BLOB NOT NULL,"
            " order_id BLOB NOT NULL, PRIMARY KEY (kind, cid)) WITHOUT ROWID"
        )

    def save_entries(self, entries: Iterable[Entry], *, client_id: ClientId | None = None) -> None:
        """Commit entries; with ``client_id``, the client's id of the request
        that wrote them in the same transaction (both or neither survive)."""
        rows = [(e.origin, e.seq, encode_entry(e)) for e in entries]
        if not rows:
            return
        with self._db:
            self._db.execute("BEGIN")
            # a plain INSERT: a second entry at one (origin, seq) must fail loudly
            self._db.executemany("INSERT INTO entries VALUES (?, ?, ?)", rows)
            if client_id is not None:
                self._db.execute("INSERT INTO client_ids VALUES (?, ?, ?, ?)",
                                 (client_id.kind, client_id.cid, client_id.entry, client_id.order_id))

    def find_client_id(self, kind: int, cid: str) -> ClientId | None:
        row = self._db.execute("SELECT entry, order_id FROM client_ids WHERE kind = ? AND cid = ?",
                               (kind, cid)).fetchone()
        if row is None:
            return None
        return ClientId(kind=kind, cid=cid, entry=bytes(row[0]), order_id=bytes(row[1]))

    def load_entries(self) -> list[Entry]:
        cur = self._db.execute("SELECT wire FROM entries ORDER BY origin, seq")
        return [decode_entry_bytes(bytes(row[0])) for row in cur]

    def save_evidence(self, origin: bytes, first: bytes, second: bytes) -> None:
        self._db.execute("INSERT OR IGNORE INTO evidence VALUES (?, ?, ?)", (origin, first, second))

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
