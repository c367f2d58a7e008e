"""Small-order Ed25519 keys and signatures (crdt/keys.py).

Regression: the identity point as a public key, with the signature
(R = identity, S = 0), verified every message, so anyone could write entries
and peer records under that "key".  The list of refused encodings is checked
here against the curve itself: the 8-torsion points, every way of encoding
them, and nothing else.
"""

from __future__ import annotations

import time

import pytest

from crdt.entry import GENESIS, Heartbeat, entry_hash
from crdt.keys import SMALL_ORDER, SigningKey, is_weak_key, verify
from net.peers import PeerRecord
from tests.conftest import key_for

P = 2**255 - 19
D = (-121665 * pow(121666, P - 2, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENTITY = (1).to_bytes(32, "little")
FORGED_SIG = IDENTITY + bytes(32)  # R = identity, S = 0


def _x_of(y: int) -> int | None:
    """The even root x of the curve equation at y, or None off the curve."""
    xx = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * SQRT_M1 % P
    if (x * x - xx) % P:
        return None
    return P - x if x & 1 else x


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2
    return ((x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P)


def torsion_encodings() -> set[bytes]:
    """Every 32-byte encoding of every point of order dividing 8."""
    y8 = int.from_bytes(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little")
    x8 = _x_of(y8)
    assert x8 is not None
    gen = (x8, y8)
    points, pt = [], gen
    for _ in range(8):
        points.append(pt)
        pt = _add(pt, gen)
    assert pt == gen and len(set(points)) == 8 and (0, 1) in points  # a cyclic group of order 8
    out = set()
    for x, y in points:
        signs = {0, 1} if x == 0 else {x & 1}
        for yy in (y, y + P):
            if yy < 2**255:
                out.update((yy | s << 255).to_bytes(32, "little") for s in signs)
    return out


class TestSmallOrder:
    def test_list_is_every_encoding_of_the_8_torsion(self) -> None:
        assert torsion_encodings() == SMALL_ORDER
        assert len(SMALL_ORDER) == 14

    def test_identity_key_with_identity_signature_verifies_nothing(self) -> None:
        """The bug itself: before the fix this verified for any message."""
        for message in (b"", b"anything", entry_hash(IDENTITY, 1, 1 << 16, GENESIS, Heartbeat())):
            assert not verify(IDENTITY, FORGED_SIG, message)
        assert is_weak_key(IDENTITY)

    @pytest.mark.parametrize("weak", sorted(SMALL_ORDER), ids=lambda b: b.hex()[:8] + ".." + b.hex()[-2:])
    def test_every_small_order_key_and_r_is_refused(self, weak: bytes) -> None:
        key = key_for(1)
        good = key.sign(b"m")
        assert verify(key.public, good, b"m")
        assert not verify(weak, FORGED_SIG, b"m")
        assert not verify(weak, weak + bytes(32), b"m")
        assert not verify(key.public, weak + good[32:], b"m")  # a small-order R

    def test_real_keys_are_not_weak(self) -> None:
        for i in range(50):
            assert not is_weak_key(key_for(i).public)

    def test_peer_record_of_a_small_order_key_is_refused(self) -> None:
        now = int(time.time() * 1000)
        msg = PeerRecord.signing_bytes(IDENTITY, "http://127.0.0.1:9", now)
        assert not verify(IDENTITY, FORGED_SIG, msg)
        assert PeerRecord.from_wire([IDENTITY, "http://127.0.0.1:9", now, FORGED_SIG]) is None
        real = PeerRecord.create(SigningKey(bytes(range(32))), "http://127.0.0.1:9", now)
        assert PeerRecord.from_wire(real.to_wire()) == real
