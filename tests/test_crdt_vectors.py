"""Golden vectors: canonical bytes, hashes, signatures and wire bytes of a few
entries built from fixed seeds, compared with the committed
``tests/vectors/entries.json`` so the wire format cannot drift silently.

To regenerate after a *deliberate* format change (then review the diff)::

    .venv/bin/python -m tests.test_crdt_vectors
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from crdt.entry import (
    BUY,
    GENESIS,
    IOC,
    NO_ACK,
    SELL,
    Ack,
    Admit,
    Body,
    Cancel,
    Entry,
    Evict,
    Heartbeat,
    Leave,
    Order,
    Retract,
    canonical_bytes,
    decode_entry_bytes,
    encode_entry,
    entry_hash,
    make_entry,
)
from crdt.hlc import pack
from crdt.keys import SigningKey, verify
from crdt.replica import Replica

VECTORS = Path(__file__).resolve().parent / "vectors" / "entries.json"

SEED = bytes(range(32))  # the origin's Ed25519 seed
T0 = 1_700_000_000_000  # fixed wall clock, milliseconds


def build_vectors() -> list[tuple[str, Entry]]:
    """The vector entries, one origin's log of five entries, from fixed values only."""
    key = SigningKey(SEED)
    out: list[tuple[str, Entry]] = []
    prev = GENESIS
    other = SigningKey(bytes(range(1, 33))).public
    digest = bytes(range(32))
    acked: Ack = (pack(T0, 0), pack(T0 - 5, 0), digest)
    bodies: list[tuple[str, Body, int, Ack]] = [
        ("genesis_admit", Admit(member=SigningKey(SEED).public, after=1), pack(T0 - 10, 0), NO_ACK),
        ("order_gtc", Order(side=BUY, price=100, qty=10), pack(T0, 0), NO_ACK),
        ("order_ioc", Order(side=SELL, price=99, qty=3, tif=IOC), pack(T0, 1), acked),
        ("market_order", Order(side=BUY, price=0, qty=(1 << 40) - 1, tif=IOC, market=True), pack(T0 + 7, 0), acked),
        ("cancel", Cancel(order_id=b""), pack(T0 + 8, 0), acked),  # order_id filled in below
        ("heartbeat", Heartbeat(), pack(T0 + 1_000, 65_535), acked),
        ("admit", Admit(member=other, after=0), pack(T0 + 1_001, 0), acked),
        ("evict", Evict(member=other, cut=7), pack(T0 + 1_002, 0),
         (*acked, other, pack(T0 + 1, 0), pack(T0 - 2, 0), digest[::-1])),
        ("retract", Retract(member=other), pack(T0 + 1_003, 0), acked),
        ("evict_since", Evict(member=other, cut=9, since=pack(T0 + 1_001, 0)), pack(T0 + 1_004, 0), acked),
        ("leave", Leave(), pack(T0 + 1_005, 0), acked),
    ]
    for seq, (name, body, hlc, ack) in enumerate(bodies, start=1):
        if isinstance(body, Cancel):
            body = Cancel(order_id=out[1][1].hash)
        entry = make_entry(key, seq=seq, hlc=hlc, prev=prev, body=body, ack=ack)
        out.append((name, entry))
        prev = entry.hash
    return out


def vector_record(name: str, e: Entry) -> dict[str, Any]:
    return {
        "name": name,
        "origin": e.origin.hex(),
        "seq": e.seq,
        "hlc": e.hlc,
        "prev": e.prev.hex(),
        "ack": [x.hex() if isinstance(x, bytes) else x for x in e.ack],
        "body": [x.hex() if isinstance(x, bytes) else x for x in e.body.to_wire()],
        "canonical": canonical_bytes(e.origin, e.seq, e.hlc, e.prev, e.body, e.ack).hex(),
        "hash": e.hash.hex(),
        "sig": e.sig.hex(),
        "wire": encode_entry(e).hex(),
    }


def generate() -> dict[str, Any]:
    return {
        "about": "p2pex entry vectors: Ed25519 seed 00..1f, msgpack arrays, BLAKE2b-256; "
                 "regenerate with `python -m tests.test_crdt_vectors` only on a deliberate format change",
        "seed": SEED.hex(),
        "entries": [vector_record(name, e) for name, e in build_vectors()],
    }


def write_vectors(path: Path = VECTORS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(generate(), indent=2) + "\n")


def committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


NAMES = ["genesis_admit", "order_gtc", "order_ioc", "market_order", "cancel", "heartbeat", "admit", "evict",
         "retract", "evict_since", "leave"]


class TestVectors:
    def test_file_lists_every_body_kind(self) -> None:
        assert [v["name"] for v in committed()["entries"]] == NAMES

    @pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
    def test_rebuilt_entry_matches_the_committed_vector(self, index: int) -> None:
        want = committed()["entries"][index]
        name, entry = build_vectors()[index]
        got = vector_record(name, entry)
        for field in ("origin", "seq", "hlc", "prev", "ack", "body", "canonical", "hash", "sig", "wire"):
            assert got[field] == want[field], f"{name}: {field} drifted"

    @pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
    def test_committed_wire_bytes_decode_and_verify(self, index: int) -> None:
        want = committed()["entries"][index]
        entry = decode_entry_bytes(bytes.fromhex(want["wire"]))
        assert entry.hash.hex() == want["hash"]
        assert entry_hash(entry.origin, entry.seq, entry.hlc, entry.prev, entry.body, entry.ack).hex() == want["hash"]
        assert verify(entry.origin, entry.sig, entry.hash)
        assert encode_entry(entry).hex() == want["wire"]
        assert canonical_bytes(entry.origin, entry.seq, entry.hlc, entry.prev, entry.body, entry.ack).hex() == (
            want["canonical"]
        )

    def test_vectors_form_one_valid_log(self) -> None:
        entries = [decode_entry_bytes(bytes.fromhex(v["wire"])) for v in committed()["entries"]]
        result = Replica().receive(entries, now_ms=T0 + 1_000)
        assert len(result.accepted) == len(NAMES) and not result.rejected

    def test_origin_is_the_public_key_of_the_seed(self) -> None:
        data = committed()
        assert data["seed"] == SEED.hex()
        assert all(v["origin"] == SigningKey(SEED).public.hex() for v in data["entries"])

    def test_canonical_encoding_is_an_array_not_a_map(self) -> None:
        first = bytes.fromhex(committed()["entries"][0]["canonical"])
        assert first[0] == 0x96  # fixarray of 6: origin, seq, hlc, prev, ack, body
        wire = bytes.fromhex(committed()["entries"][0]["wire"])
        assert wire[0] == 0x97  # the same 6 fields plus the signature


if __name__ == "__main__":
    write_vectors()
    print(f"wrote {VECTORS}")
