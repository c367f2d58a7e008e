"""Replicated state: the gap-free prefix of every origin's log.

Owns validation before merge, the buffer of early entries, equivocation
evidence, the version-vector digest, deltas and ``state_hash``.  Merge keeps
the longer valid prefix per origin, so it is commutative, associative and
idempotent.  Nothing here raises on bad input: errors come back as values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from hashlib import blake2b

import msgpack

from crdt.entry import GENESIS, MAX_SEQ, Cancel, Entry, Order, check_body
from crdt.errors import (
    BadSignature,
    BrokenChain,
    ClockSkew,
    Equivocation,
    ForeignCancel,
    NonIncreasingHlc,
    OutOfRange,
    SequenceGap,
    ValidationError,
)
from crdt.hlc import DEFAULT_MAX_SKEW_MS, physical_ms
from crdt.keys import short_id, verify

#: Early entries held per origin, and in all, while waiting for a gap to fill.
MAX_BUFFER_PER_ORIGIN = 10_000
MAX_BUFFER_TOTAL = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """One entry that was refused, and why."""

    origin: bytes
    seq: int
    error: ValidationError


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeResult:
    accepted: tuple[Entry, ...]
    rejected: tuple[Rejection, ...]
    gaps: tuple[SequenceGap, ...]
    buffered: int
    duplicates: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EquivocationEvidence:
    """Two validly signed entries of one origin with one seq and two hashes."""

    first: Entry
    second: Entry


def _verify(entry: Entry) -> bool:
    return verify(entry.origin, entry.sig, entry.hash)


class Replica:
    """One node's copy of every origin's log."""

    def __init__(
        self,
        *,
        max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
        max_buffer_per_origin: int = MAX_BUFFER_PER_ORIGIN,
        max_buffer_total: int = MAX_BUFFER_TOTAL,
    ) -> None:
        self.max_skew_ms = max_skew_ms
        self.max_buffer_per_origin = max_buffer_per_origin
        self.max_buffer_total = max_buffer_total
        self._logs: dict[bytes, list[Entry]] = {}
        self._order_origin: dict[bytes, bytes] = {}
        self._buffer: dict[bytes, dict[int, Entry]] = {}
        self._buffered_total = 0
        self._evidence: dict[bytes, EquivocationEvidence] = {}

    # ---- queries -------------------------------------------------------

    def version_vector(self) -> dict[bytes, int]:
        return {origin: len(log) for origin, log in self._logs.items()}

    def head(self, origin: bytes) -> Entry | None:
        log = self._logs.get(origin)
        return log[-1] if log else None

    def log(self, origin: bytes) -> list[Entry]:
        return list(self._logs.get(origin, ()))

    def origins(self) -> list[bytes]:
        return sorted(self._logs)

    def entries(self) -> list[Entry]:
        """Every accepted entry, origin by origin, in sequence order."""
        return [e for origin in sorted(self._logs) for e in self._logs[origin]]

    def entry_count(self) -> int:
        return sum(len(log) for log in self._logs.values())

    def order_origin(self, order_id: bytes) -> bytes | None:
        return self._order_origin.get(order_id)

    def evidence(self) -> dict[bytes, EquivocationEvidence]:
        return dict(self._evidence)

    def buffered(self) -> int:
        return self._buffered_total

    def state_hash(self) -> bytes:
        """Digest of the version vector and head hashes: equal digests, equal entries."""
        heads = [[o, len(log), log[-1].hash] for o, log in sorted(self._logs.items())]
        return blake2b(msgpack.packb(heads, use_bin_type=True), digest_size=32).digest()

    def digest_for_sync(self) -> dict[bytes, int]:
        """The version vector to send a peer: a frozen origin is marked as
        complete so that no peer sends entries we would refuse anyway."""
        vv = self.version_vector()
        for origin in self._evidence:
            vv[origin] = MAX_SEQ
        return vv

    def restore_evidence(self, first: Entry, second: Entry) -> bool:
        """Re-freeze an origin from stored evidence; False if it does not prove
        equivocation (same origin and seq, different hashes, both validly signed)."""
        if not (first.origin == second.origin and first.seq == second.seq and first.hash != second.hash
                and _verify(first) and _verify(second)):
            return False
        self._freeze(first.origin, first, second)
        return True

    def delta(self, vv: Mapping[bytes, int], *, max_entries: int | None = None) -> tuple[list[Entry], bool]:
        """Entries above ``vv``, origin by origin in seq order; ``more`` if cut."""
        out: list[Entry] = []
        for origin in sorted(self._logs):
            log = self._logs[origin]
            have = vv.get(origin, 0)
            if have >= len(log):
                continue
            take = log[max(have, 0):]
            if max_entries is not None and len(out) + len(take) > max_entries:
                out.extend(take[: max_entries - len(out)])
                return out, True
            out.extend(take)
        return out, False

    # ---- merge ---------------------------------------------------------

    def receive(
        self, entries: Iterable[Entry], *, now_ms: int, trusted: bool = False
    ) -> MergeResult:
        """Validate and merge a batch.  ``trusted`` skips signature checks
        (only for entries this node has just signed itself)."""
        groups: dict[bytes, list[Entry]] = {}
        for e in entries:
            groups.setdefault(e.origin, []).append(e)
        accepted: list[Entry] = []
        rejected: list[Rejection] = []
        gaps: list[SequenceGap] = []
        counts = [0, 0]  # buffered, duplicates
        for origin in sorted(groups):
            batch = sorted(groups[origin], key=lambda e: e.seq)
            self._receive_origin(origin, batch, now_ms, trusted, accepted, rejected, gaps, counts)
        return MergeResult(
            accepted=tuple(accepted), rejected=tuple(rejected), gaps=tuple(gaps),
            buffered=counts[0], duplicates=counts[1],
        )

    def merge(self, other: Replica, *, now_ms: int) -> MergeResult:
        return self.receive(other.entries(), now_ms=now_ms)

    def _receive_origin(
        self,
        origin: bytes,
        batch: list[Entry],
        now_ms: int,
        trusted: bool,
        accepted: list[Entry],
        rejected: list[Rejection],
        gaps: list[SequenceGap],
        counts: list[int],
    ) -> None:
        if origin in self._evidence:
            for e in batch:
                rejected.append(Rejection(origin=origin, seq=e.seq, error=Equivocation(
                    f"origin {short_id(origin)} equivocated; its entries are no longer merged")))
            return
        log = self._logs.get(origin, [])
        head = len(log)
        buf = self._buffer.setdefault(origin, {})
        # Entries that extend the log without a gap are always taken, caps or not:
        # they drain below, and a full buffer must never lock out the entry that fills the gap.
        nxt = head + 1
        for e in batch:
            if e.seq <= head:
                stored = log[e.seq - 1]
                if stored.hash == e.hash:
                    counts[1] += 1
                elif not _verify(e):
                    rejected.append(Rejection(origin=origin, seq=e.seq, error=BadSignature(
                        f"conflicting entry {short_id(origin)}#{e.seq} has a bad signature")))
                elif _verify(stored):
                    self._freeze(origin, stored, e)
                    rejected.append(Rejection(origin=origin, seq=e.seq, error=Equivocation(
                        f"origin {short_id(origin)} signed two entries at seq {e.seq}")))
                    return
            elif e.seq in buf:
                if buf[e.seq].hash == e.hash:
                    counts[1] += 1
            elif e.seq == nxt or (
                len(buf) < self.max_buffer_per_origin and self._buffered_total < self.max_buffer_total
            ):
                buf[e.seq] = e
                self._buffered_total += 1
            while nxt in buf:
                nxt += 1
        run = self._drain(origin, log, buf, now_ms, rejected)
        if run and not trusted:
            run = self._authenticate(origin, run, buf, rejected)
        if run:
            for e in run:
                del buf[e.seq]
                if isinstance(e.body, Order):
                    self._order_origin[e.hash] = origin
            self._buffered_total -= len(run)
            log.extend(run)
            self._logs[origin] = log
            accepted.extend(run)
        if buf:
            first = min(buf)
            gaps.append(SequenceGap(
                f"{short_id(origin)}: have seq {len(log)}, holding {len(buf)} from seq {first}"))
            counts[0] += len(buf)
        else:
            del self._buffer[origin]

    def _drain(
        self, origin: bytes, log: list[Entry], buf: dict[int, Entry], now_ms: int,
        rejected: list[Rejection],
    ) -> list[Entry]:
        """The longest run from the buffer that extends ``log`` validly."""
        prev_hash = log[-1].hash if log else GENESIS
        prev_hlc = log[-1].hlc if log else 0
        seq = len(log) + 1
        run: list[Entry] = []
        own_orders: set[bytes] = set()
        while seq in buf:
            e = buf[seq]
            error = self._check_link(e, prev_hash, prev_hlc, now_ms, own_orders)
            if error is not None:
                del buf[seq]
                self._buffered_total -= 1
                rejected.append(Rejection(origin=origin, seq=seq, error=error))
                break
            if isinstance(e.body, Order):
                own_orders.add(e.hash)
            run.append(e)
            prev_hash, prev_hlc, seq = e.hash, e.hlc, seq + 1
        return run

    def _check_link(
        self, e: Entry, prev_hash: bytes, prev_hlc: int, now_ms: int, own_orders: set[bytes]
    ) -> ValidationError | None:
        if e.prev != prev_hash:
            return BrokenChain(f"{short_id(e.origin)}#{e.seq}: prev does not match seq {e.seq - 1}")
        if e.hlc <= prev_hlc:
            return NonIncreasingHlc(f"{short_id(e.origin)}#{e.seq}: hlc {e.hlc} <= {prev_hlc}")
        if physical_ms(e.hlc) > now_ms + self.max_skew_ms:
            return ClockSkew(
                f"{short_id(e.origin)}#{e.seq}: stamped {physical_ms(e.hlc) - now_ms} ms ahead, "
                f"limit {self.max_skew_ms} ms")
        try:
            check_body(e.body)
        except OutOfRange as exc:
            return exc
        if isinstance(e.body, Cancel):
            target = e.body.order_id
            if target not in own_orders and self._order_origin.get(target) != e.origin:
                return ForeignCancel(
                    f"{short_id(e.origin)}#{e.seq}: cancels {target.hex()[:16]}, "
                    "which is not an earlier order in its own log")
        return None

    def _authenticate(
        self, origin: bytes, run: list[Entry], buf: dict[int, Entry], rejected: list[Rejection]
    ) -> list[Entry]:
        """Keep ``run`` when its newest entry is validly signed: the hash chain
        makes that one signature vouch for the whole run.  Otherwise drop the
        run: a run must not cost more than one verification."""
        if _verify(run[-1]):
            return run
        rejected.append(Rejection(origin=origin, seq=run[-1].seq, error=BadSignature(
            f"{short_id(origin)}#{run[-1].seq}: signature does not verify")))
        for e in run:
            del buf[e.seq]
        self._buffered_total -= len(run)
        return []

    def _freeze(self, origin: bytes, first: Entry, second: Entry) -> None:
        self._evidence[origin] = EquivocationEvidence(first=first, second=second)
        dropped = self._buffer.pop(origin, {})
        self._buffered_total -= len(dropped)


def merged(a: Replica, b: Replica, *, now_ms: int) -> Replica:
    """A new replica holding the join of ``a`` and ``b`` (neither is changed)."""
    out = Replica(max_skew_ms=a.max_skew_ms)
    out.receive(a.entries(), now_ms=now_ms)
    out.receive(b.entries(), now_ms=now_ms)
    for origin, ev in (*a._evidence.items(), *b._evidence.items()):
        if origin not in out._evidence:
            out._freeze(origin, ev.first, ev.second)
    return out
