"""Replicated state: the gap-free prefix of every origin's log.

Owns validation before merge, the buffer of early entries (ahead of a gap, or
stamped ahead of the clock), equivocation evidence, the version-vector digest,
deltas, pruning of entries that no longer need to be in memory, and
``state_hash``.  Merge keeps the longer valid prefix per origin, so it is
commutative, associative and idempotent.  Nothing here raises on bad input:
errors come back as values.

Memory: entries at or below a floor (the stable frontier, see
``crdt.finality``) can be pruned; the replica then keeps, per origin, only the
seq, hash and stamp of the newest pruned entry (its *base*) and the entries
after it.  A delta that reaches below a base names the seq range the caller
reads from its archive (the node's SQLite file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from hashlib import blake2b

import msgpack

from crdt.entry import GENESIS, Entry, check_body
from crdt.errors import (
    BadSignature,
    BrokenChain,
    ClockSkew,
    Equivocation,
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
#: Early entries one sender may have waiting, over all origins.
MAX_BUFFER_PER_SOURCE = 20_000
#: An early entry that waited this long is dropped (the gap will be pulled again).
MAX_BUFFER_AGE_MS = 120_000
#: Entries stamped further ahead than the skew bound wait; this far ahead they are refused.
MAX_FUTURE_MS = 60_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """One entry that was refused, and why; ``source`` names who sent it, when
    it was not the sender of the batch that triggered the refusal."""

    origin: bytes
    seq: int
    error: ValidationError
    source: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeResult:
    accepted: tuple[Entry, ...]
    rejected: tuple[Rejection, ...]
    gaps: tuple[SequenceGap, ...]
    buffered: int
    duplicates: int
    evidence: tuple[bytes, ...] = ()  # origins proven to equivocate by this batch


@dataclass(frozen=True, slots=True, kw_only=True)
class EquivocationEvidence:
    """Two validly signed entries of one origin with one seq and two hashes."""

    first: Entry
    second: Entry

    @property
    def seq(self) -> int:
        return self.first.seq


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """Part of a delta: entries ``lo..hi`` of ``origin``; ``entries`` is None
    when they were pruned from memory and must be read from the archive."""

    origin: bytes
    lo: int
    hi: int
    entries: tuple[Entry, ...] | None


class _Held:
    """An early entry waiting in the buffer."""

    __slots__ = ("arrived", "entry", "source", "verified")

    def __init__(self, entry: Entry, arrived: int, source: str | None, verified: bool) -> None:
        self.entry = entry
        self.arrived = arrived
        self.source = source
        self.verified = verified


def _verify(entry: Entry) -> bool:
    return verify(entry.origin, entry.sig, entry.hash)


_NO_BASE = (0, GENESIS, 0)


class Replica:
    """One node's copy of every origin's log."""

    def __init__(
        self,
        *,
        max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
        max_buffer_per_origin: int = MAX_BUFFER_PER_ORIGIN,
        max_buffer_total: int = MAX_BUFFER_TOTAL,
        max_buffer_per_source: int = MAX_BUFFER_PER_SOURCE,
        max_buffer_age_ms: int = MAX_BUFFER_AGE_MS,
        max_future_ms: int = MAX_FUTURE_MS,
    ) -> None:
        self.max_skew_ms = max_skew_ms
        self.max_buffer_per_origin = max_buffer_per_origin
        self.max_buffer_total = max_buffer_total
        self.max_buffer_per_source = max_buffer_per_source
        self.max_buffer_age_ms = max_buffer_age_ms
        self.max_future_ms = max_future_ms
        #: how far the network's clock is ahead of ours (median over peers), set by the owner
        self.clock_offset_ms = 0
        self._logs: dict[bytes, list[Entry]] = {}
        self._base: dict[bytes, tuple[int, bytes, int]] = {}
        self._buffer: dict[bytes, dict[int, _Held]] = {}
        self._buffered_total = 0
        self._per_source: dict[str | None, int] = {}
        self._waiting: set[bytes] = set()  # origins whose next entry is stamped ahead of the clock
        self._evidence: dict[bytes, EquivocationEvidence] = {}
        self._pins: dict[tuple[bytes, int], tuple[bytes, int]] = {}  # (origin, seq) -> (hash, hlc)
        self._want_pins: set[tuple[bytes, int]] = set()
        # origin -> seq whose entry a peer holds differently (its successor did not
        # chain to ours): the next pull asks for that seq again, to get the evidence
        self._doubt: dict[bytes, int] = {}

    # ---- queries -------------------------------------------------------

    def length(self, origin: bytes) -> int:
        log = self._logs.get(origin)
        base = self._base.get(origin)
        return (base[0] if base else 0) + (len(log) if log else 0)

    def version_vector(self) -> dict[bytes, int]:
        return {origin: self.length(origin) for origin in self._known()}

    def _known(self) -> set[bytes]:
        return set(self._logs) | set(self._base)

    def base(self, origin: bytes) -> tuple[int, bytes, int]:
        """(seq, hash, hlc) of the newest entry pruned from memory, or (0, GENESIS, 0)."""
        return self._base.get(origin, _NO_BASE)

    def head(self, origin: bytes) -> Entry | None:
        """The newest entry of ``origin`` still in memory."""
        log = self._logs.get(origin)
        return log[-1] if log else None

    def head_info(self, origin: bytes) -> tuple[int, bytes, int]:
        """(seq, hash, hlc) of the newest entry of ``origin``, pruned or not."""
        log = self._logs.get(origin)
        if log:
            e = log[-1]
            return e.seq, e.hash, e.hlc
        return self._base.get(origin, _NO_BASE)

    def entry(self, origin: bytes, seq: int) -> Entry | None:
        """Entry ``seq`` of ``origin`` if it is still in memory."""
        log = self._logs.get(origin)
        if not log:
            return None
        i = seq - log[0].seq
        return log[i] if 0 <= i < len(log) else None

    def holds_wire(self, item: object) -> bool:
        """Is this undecoded wire entry one we hold already?  The same origin and
        seq in memory with the same signature: Ed25519 signatures are
        deterministic, so the same signature means the same signed hash.  Lets
        the shell drop relayed duplicates before decoding and hashing them; a
        different entry at a held seq is not dropped (it is evidence)."""
        if type(item) is not list or len(item) != 7 or type(item[0]) is not bytes or type(item[1]) is not int:
            return False
        held = self.entry(item[0], item[1])
        return held is not None and held.sig == item[6]

    def log(self, origin: bytes) -> list[Entry]:
        """The entries of ``origin`` still in memory, oldest first."""
        return list(self._logs.get(origin, ()))

    def tail(self, origin: bytes) -> list[Entry]:
        """The in-memory entries of ``origin`` (the list itself: do not change it)."""
        return self._logs.get(origin, [])

    def origins(self) -> list[bytes]:
        return sorted(self._known())

    def entries(self) -> list[Entry]:
        """Every entry in memory, origin by origin, in sequence order."""
        return [e for origin in sorted(self._logs) for e in self._logs[origin]]

    def entry_count(self) -> int:
        return sum(self.length(o) for o in self._known())

    def memory_entries(self) -> int:
        return sum(len(log) for log in self._logs.values())

    def evidence(self) -> dict[bytes, EquivocationEvidence]:
        return dict(self._evidence)

    def buffered(self) -> int:
        return self._buffered_total

    def waiting(self, origin: bytes) -> int:
        """Entries of ``origin`` held in the buffer."""
        return len(self._buffer.get(origin, ()))

    def state_hash(self, ends: Mapping[bytes, int] | None = None) -> bytes:
        """Digest of the version vector and head hashes: equal digests, equal
        entries.  ``ends`` cuts an origin's log short (its effective end, for an
        origin proven to equivocate)."""
        heads = []
        for o in sorted(self._known()):
            n = self.length(o)
            if ends is not None and o in ends and ends[o] < n:
                n = ends[o]
            heads.append([o, n, self.hash_at(o, n)])
        return blake2b(msgpack.packb(heads, use_bin_type=True), digest_size=32).digest()

    def hash_at(self, origin: bytes, seq: int) -> bytes:
        """Hash of entry ``seq`` of ``origin`` (GENESIS for 0): in memory, the base or pinned."""
        return self.point(origin, seq)[0]

    def point(self, origin: bytes, seq: int) -> tuple[bytes, int]:
        """(hash, hlc) of entry ``seq`` of ``origin`` ((GENESIS, 0) for 0)."""
        if seq == 0:
            return GENESIS, 0
        e = self.entry(origin, seq)
        if e is not None:
            return e.hash, e.hlc
        base = self._base.get(origin)
        if base is not None and base[0] == seq:
            return base[1], base[2]
        pinned = self._pins.get((origin, seq))
        if pinned is not None:
            return pinned
        raise KeyError(f"entry {short_id(origin)}#{seq} is neither the base, pinned nor in memory")

    def pin(self, origin: bytes, seq: int) -> None:
        """Keep the hash and stamp of entry ``seq`` after it is pruned (the end of a
        closed log); an entry not held yet is pinned when it arrives."""
        if seq and (origin, seq) not in self._pins:
            if seq > self.length(origin):
                self._want_pins.add((origin, seq))
            else:
                self._pins[(origin, seq)] = self.point(origin, seq)

    def _pin_arrivals(self) -> None:
        for origin, seq in [p for p in self._want_pins if p[1] <= self.length(p[0])]:
            self._want_pins.discard((origin, seq))
            self._pins[(origin, seq)] = self.point(origin, seq)

    def pin_limits(self) -> dict[bytes, int]:
        """Entries that must not be pruned before they are pinned."""
        out: dict[bytes, int] = {}
        for origin, seq in self._want_pins:
            out[origin] = min(out.get(origin, seq), seq)
        return out

    def pins(self) -> dict[tuple[bytes, int], tuple[bytes, int]]:
        return dict(self._pins)

    def restore_pin(self, origin: bytes, seq: int, hash_: bytes, hlc: int) -> None:
        self._pins[(origin, seq)] = (hash_, hlc)

    def digest_for_sync(self) -> dict[bytes, int]:
        """The version vector to send a peer: one entry short where a peer's
        next entry did not chain to ours, so that the peer sends its version of
        our head (equivocation evidence, when it is one)."""
        vv = self.version_vector()
        for origin, seq in self._doubt.items():
            if origin not in self._evidence and vv.get(origin, 0) >= seq:
                vv[origin] = seq - 1
        return vv

    def restore_evidence(self, first: Entry, second: Entry) -> bool:
        """Record evidence from storage or a peer; False if it does not prove
        equivocation (same origin and seq, different hashes, both validly signed)."""
        if not (first.origin == second.origin and first.seq == second.seq and first.hash != second.hash
                and _verify(first) and _verify(second)):
            return False
        self._record_evidence(first, second)
        return True

    def _record_evidence(self, first: Entry, second: Entry) -> bool:
        """Keep the evidence with the lowest seq for an origin; True when it is new or lower."""
        old = self._evidence.get(first.origin)
        if old is not None and old.seq <= first.seq:
            return False
        self._evidence[first.origin] = EquivocationEvidence(first=first, second=second)
        self._doubt.pop(first.origin, None)
        return True

    def delta(self, vv: Mapping[bytes, int], *, max_entries: int | None = None,
              first: Iterable[bytes] = ()) -> tuple[list[Segment], bool]:
        """What a peer with version vector ``vv`` lacks, origin by origin in seq
        order, as segments; ``more`` when cut at ``max_entries``.  The origins in
        ``first`` come before the others (members: a joiner learns that it was
        admitted before it pages through strangers' entries)."""
        out: list[Segment] = []
        budget = max_entries if max_entries is not None else 1 << 62
        known = self._known()
        ahead = sorted(known.intersection(first))
        for origin in [*ahead, *sorted(known.difference(ahead))]:
            have = max(vv.get(origin, 0), 0)
            n = self.length(origin)
            if have >= n:
                continue
            if budget <= 0:
                return out, True
            base_seq = self._base.get(origin, _NO_BASE)[0]
            if have < base_seq:
                hi = min(base_seq, have + budget)
                out.append(Segment(origin=origin, lo=have + 1, hi=hi, entries=None))
                budget -= hi - have
                have = hi
            if have < n and budget > 0:
                start = have - base_seq
                take = self._logs[origin][start:start + budget]
                out.append(Segment(origin=origin, lo=have + 1, hi=have + len(take), entries=tuple(take)))
                budget -= len(take)
                have += len(take)
            if have < n:
                return out, True
        return out, False

    def delta_entries(self, vv: Mapping[bytes, int], *, max_entries: int | None = None) -> tuple[list[Entry], bool]:
        """``delta`` for a replica that never pruned (tests, simulations)."""
        segments, more = self.delta(vv, max_entries=max_entries)
        out: list[Entry] = []
        for s in segments:
            if s.entries is None:
                raise KeyError("delta reaches below pruned entries; read them from the archive")
            out.extend(s.entries)
        return out, more

    # ---- memory --------------------------------------------------------

    def prune(self, floor_hlc: int, limits: Mapping[bytes, int] | None = None) -> int:
        """Forget in-memory entries stamped at or below ``floor_hlc`` (keep the
        newest of them as the base), but for an origin in ``limits`` none past
        that seq; returns how many were dropped."""
        dropped = 0
        for origin, log in self._logs.items():
            if not log or log[0].hlc > floor_hlc:
                continue
            lo, hi = 0, len(log)
            while lo < hi:
                mid = (lo + hi) // 2
                if log[mid].hlc <= floor_hlc:
                    lo = mid + 1
                else:
                    hi = mid
            if limits is not None and origin in limits:
                lo = min(lo, max(limits[origin] - log[0].seq + 1, 0))
                if lo == 0:
                    continue
            last = log[lo - 1]
            self._base[origin] = (last.seq, last.hash, last.hlc)
            del log[:lo]
            dropped += lo
        return dropped

    def restore_base(self, origin: bytes, seq: int, hash_: bytes, hlc: int) -> None:
        """Start ``origin``'s log after a pruned prefix (restart from a checkpoint)."""
        if self._logs.get(origin):
            raise ValueError("a base is restored before any entry of its origin")
        self._base[origin] = (seq, hash_, hlc)

    # ---- merge ---------------------------------------------------------

    def receive(
        self, entries: Iterable[Entry], *, now_ms: int, trusted: bool = False, source: str | None = None
    ) -> MergeResult:
        """Validate and merge a batch.  ``trusted`` skips signature checks
        (only for entries this node has just signed itself, or read back from
        its own storage); ``source`` names the sender for the buffer's quotas
        and for refusals of its entries triggered later by someone else."""
        groups: dict[bytes, list[Entry]] = {}
        for e in entries:
            groups.setdefault(e.origin, []).append(e)
        acc = _Acc()
        for origin in sorted(groups):
            batch = sorted(groups[origin], key=lambda e: e.seq)
            self._receive_origin(origin, batch, now_ms, trusted, source, acc)
        return acc.result()

    def drain_due(self, now_ms: int) -> MergeResult:
        """Merge waiting entries whose stamps the clock has now reached."""
        acc = _Acc()
        for origin in sorted(self._waiting):
            self._waiting.discard(origin)
            self._receive_origin(origin, [], now_ms, False, None, acc)
        return acc.result()

    def expire(self, now_ms: int) -> int:
        """Drop early entries that waited longer than the age bound."""
        dropped = 0
        for origin in list(self._buffer):
            buf = self._buffer[origin]
            for seq in [s for s, h in buf.items() if now_ms - h.arrived > self.max_buffer_age_ms]:
                self._unbuffer(buf, seq)
                dropped += 1
            if not buf:
                del self._buffer[origin]
                self._waiting.discard(origin)
        return dropped

    def merge(self, other: Replica, *, now_ms: int) -> MergeResult:
        return self.receive(other.entries(), now_ms=now_ms)

    def _unbuffer(self, buf: dict[int, _Held], seq: int) -> _Held:
        held = buf.pop(seq)
        self._buffered_total -= 1
        left = self._per_source.get(held.source, 1) - 1
        if left:
            self._per_source[held.source] = left
        else:
            self._per_source.pop(held.source, None)
        return held

    def _hold(self, buf: dict[int, _Held], e: Entry, now_ms: int, source: str | None, verified: bool) -> None:
        buf[e.seq] = _Held(e, now_ms, source, verified)
        self._buffered_total += 1
        self._per_source[source] = self._per_source.get(source, 0) + 1

    def _receive_origin(
        self, origin: bytes, batch: list[Entry], now_ms: int, trusted: bool, source: str | None, acc: _Acc,
    ) -> None:
        base_seq = self._base.get(origin, _NO_BASE)[0]
        log = self._logs.get(origin, [])
        head = base_seq + len(log)
        buf = self._buffer.setdefault(origin, {})
        # Entries that extend the log without a gap are always taken, caps or not:
        # they drain below, and a full buffer must never lock out the entry that fills the gap.
        nxt = head + 1
        while nxt in buf:
            nxt += 1
        old_checked = False
        for e in batch:
            if e.seq <= head:
                if e.seq <= base_seq:
                    # final history, pruned: nothing can change it. One entry per batch is checked, so
                    # that a forgery is still called one; the rest are dropped unchecked (one check per
                    # entry cost a catch-up that overlapped pushes 65% of its time, and a flood of old
                    # seqs as many checks as it had entries)
                    if (e.seq == base_seq and e.hash == self._base[origin][1]) or trusted or old_checked:
                        acc.duplicates += 1
                    elif not _verify(e):
                        acc.rejected.append(Rejection(origin=origin, seq=e.seq, error=BadSignature(
                            f"{short_id(origin)}#{e.seq}: signature does not verify")))
                    else:
                        acc.duplicates += 1
                    old_checked = True
                    continue
                stored = log[e.seq - base_seq - 1]
                if stored.hash == e.hash:
                    acc.duplicates += 1
                elif not _verify(e):
                    acc.rejected.append(Rejection(origin=origin, seq=e.seq, error=BadSignature(
                        f"conflicting entry {short_id(origin)}#{e.seq} has a bad signature")))
                elif trusted or _verify(stored):
                    if self._record_evidence(stored, e):
                        acc.evidence.append(origin)
                    acc.rejected.append(Rejection(origin=origin, seq=e.seq, error=Equivocation(
                        f"origin {short_id(origin)} signed two entries at seq {e.seq}")))
                continue
            held = buf.get(e.seq)
            if held is not None:
                if held.entry.hash == e.hash:
                    acc.duplicates += 1
                    continue
                # one of the two is a forgery (or the origin equivocates): let a
                # genuine entry displace an unverified one, at most two checks
                old_ok = held.verified or _verify(held.entry)
                held.verified = old_ok
                new_ok = trusted or _verify(e)
                if old_ok and new_ok:
                    if self._record_evidence(held.entry, e):
                        acc.evidence.append(origin)
                elif new_ok:
                    self._unbuffer(buf, e.seq)
                    self._hold(buf, e, now_ms, source, True)
                    acc.rejected.append(Rejection(origin=origin, seq=e.seq, source=held.source, error=BadSignature(
                        f"{short_id(origin)}#{e.seq}: a forged entry waiting in the buffer was replaced")))
                continue
            if e.seq == nxt or (
                len(buf) < self.max_buffer_per_origin and self._buffered_total < self.max_buffer_total
                and self._per_source.get(source, 0) < self.max_buffer_per_source
            ):
                self._hold(buf, e, now_ms, source, trusted)
            while nxt in buf:
                nxt += 1
        run = self._drain(origin, log, head, buf, now_ms, acc, trusted)
        if run and not trusted:
            run = self._authenticate(origin, run, buf, acc)
        if run:
            for e in run:
                self._unbuffer(buf, e.seq)
            log.extend(run)
            self._logs[origin] = log
            acc.accepted.extend(run)
            if self._want_pins:
                self._pin_arrivals()
        if buf:
            first = min(buf)
            if first > self.length(origin) + 1:
                acc.gaps.append(SequenceGap(
                    f"{short_id(origin)}: have seq {self.length(origin)}, holding {len(buf)} from seq {first}"))
            acc.buffered += len(buf)
        else:
            del self._buffer[origin]

    def _drain(
        self, origin: bytes, log: list[Entry], head: int, buf: dict[int, _Held], now_ms: int, acc: _Acc,
        trusted: bool = False,
    ) -> list[Entry]:
        """The longest run from the buffer that extends the log validly (the
        node's own entries are never held back for their stamps: its clock made them)."""
        if log:
            prev_hash, prev_hlc = log[-1].hash, log[-1].hlc
        else:
            _, prev_hash, prev_hlc = self._base.get(origin, _NO_BASE)
        seq = head + 1
        run: list[Entry] = []
        bound = (1 << 62) if trusted else now_ms + max(self.clock_offset_ms, 0) + self.max_skew_ms
        while seq in buf:
            held = buf[seq]
            e = held.entry
            if physical_ms(e.hlc) > bound:
                if physical_ms(e.hlc) <= bound + self.max_future_ms:
                    self._waiting.add(origin)  # from the future: it waits, it is not dropped
                    break
                error: ValidationError | None = ClockSkew(
                    f"{short_id(e.origin)}#{e.seq}: stamped {physical_ms(e.hlc) - now_ms} ms ahead, "
                    f"limit {self.max_skew_ms + max(self.clock_offset_ms, 0) + self.max_future_ms} ms")
            else:
                error = self._check_link(e, prev_hash, prev_hlc)
            if error is not None:
                self._unbuffer(buf, seq)
                acc.rejected.append(Rejection(origin=origin, seq=seq, error=error, source=held.source))
                if isinstance(error, BrokenChain) and seq > 1 and not run and _verify(e):
                    self._doubt[origin] = seq - 1
                break
            run.append(e)
            prev_hash, prev_hlc, seq = e.hash, e.hlc, seq + 1
        return run

    @staticmethod
    def _check_link(e: Entry, prev_hash: bytes, prev_hlc: int) -> ValidationError | None:
        if e.prev != prev_hash:
            return BrokenChain(f"{short_id(e.origin)}#{e.seq}: prev does not match seq {e.seq - 1}")
        if e.hlc <= prev_hlc:
            return NonIncreasingHlc(f"{short_id(e.origin)}#{e.seq}: hlc {e.hlc} <= {prev_hlc}")
        try:
            check_body(e.body)
        except OutOfRange as exc:
            return exc
        return None

    def _authenticate(self, origin: bytes, run: list[Entry], buf: dict[int, _Held], acc: _Acc) -> list[Entry]:
        """Keep ``run`` when its newest entry is validly signed: the hash chain
        makes that one signature vouch for the whole run.  Otherwise drop the
        run: a run must not cost more than one verification."""
        tip = buf[run[-1].seq]
        if tip.verified or _verify(run[-1]):
            return run
        acc.rejected.append(Rejection(origin=origin, seq=run[-1].seq, source=tip.source, error=BadSignature(
            f"{short_id(origin)}#{run[-1].seq}: signature does not verify")))
        for e in run:
            self._unbuffer(buf, e.seq)
        return []


class _Acc:
    """What one merge call collects."""

    __slots__ = ("accepted", "buffered", "duplicates", "evidence", "gaps", "rejected")

    def __init__(self) -> None:
        self.accepted: list[Entry] = []
        self.rejected: list[Rejection] = []
        self.gaps: list[SequenceGap] = []
        self.evidence: list[bytes] = []
        self.buffered = 0
        self.duplicates = 0

    def result(self) -> MergeResult:
        return MergeResult(
            accepted=tuple(self.accepted), rejected=tuple(self.rejected), gaps=tuple(self.gaps),
            buffered=self.buffered, duplicates=self.duplicates, evidence=tuple(self.evidence),
        )


def merged(a: Replica, b: Replica, *, now_ms: int) -> Replica:
    """A new replica holding the join of ``a`` and ``b`` (neither is changed)."""
    out = Replica(max_skew_ms=a.max_skew_ms)
    out.receive(a.entries(), now_ms=now_ms)
    out.receive(b.entries(), now_ms=now_ms)
    for ev in (*a._evidence.values(), *b._evidence.values()):
        out._record_evidence(ev.first, ev.second)
    return out
