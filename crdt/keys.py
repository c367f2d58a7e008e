"""Ed25519 identities: signing keys, verification, node ids.

The core takes key bytes, never paths; the shell stores them.
Uses ``cryptography`` (PyCA): maintained, wheels everywhere, one C call per
signature check.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SEED_LEN = 32
PUBLIC_LEN = 32
SIGNATURE_LEN = 64


class SigningKey:
    """A private key built from a 32-byte seed the caller supplies."""

    __slots__ = ("_private", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_LEN:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public: bytes = self._private.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


#: Every encoding of a point of small order (the 8-torsion of Ed25519): the
#: canonical ones, the sign bit set on x = 0, and y + p where it fits in 255
#: bits.  A public key among them verifies forged signatures (the identity
#: point with the signature (identity, 0) verifies every message), and a
#: signature whose R is among them is refused too.  tests/test_keys.py derives
#: the list from the curve.
SMALL_ORDER: frozenset[bytes] = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # (sqrt(-1), 0): order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # (-sqrt(-1), 0): order 4
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity: order 1
    "0100000000000000000000000000000000000000000000000000000000000080",  # identity, sign bit set
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # (0, -1): order 2
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",  # (0, -1), sign bit set
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p (= 0): order 4
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",  # y = p, sign bit set
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p + 1 (= 1): identity
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",  # y = p + 1, sign bit set
))


def is_weak_key(public: bytes) -> bool:
    """True for a public key of small order: it can sign nothing that means anything."""
    return public in SMALL_ORDER


_verifier_cache: dict[bytes, Ed25519PublicKey] = {}
#: Recent answers, by (key, signature, message): one process that holds several
#: replicas (the simulator) or is shown one entry by many peers checks it once.
#: ``verify`` is a pure function, so an answer never goes stale; the memory is
#: let go when full.
_VERIFIED_KEPT = 32_768
_verified: dict[tuple[bytes, bytes, bytes], bool] = {}


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public``'s signature of ``message``.

    Small-order public keys and signatures whose R is of small order are
    refused before the library sees them."""
    if len(public) != PUBLIC_LEN or len(signature) != SIGNATURE_LEN:
        return False
    if public in SMALL_ORDER or signature[:32] in SMALL_ORDER:
        return False
    seen = (public, signature, message)
    ok = _verified.get(seen)
    if ok is None:
        if len(_verified) >= _VERIFIED_KEPT:
            _verified.clear()
        ok = _verified[seen] = _verify(public, signature, message)
    return ok


def _verify(public: bytes, signature: bytes, message: bytes) -> bool:
    key = _verifier_cache.get(public)
    if key is None:
        try:
            key = Ed25519PublicKey.from_public_bytes(public)
        except ValueError:
            return False
        if len(_verifier_cache) < 4096:
            _verifier_cache[public] = key
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def short_id(node_id: bytes) -> str:
    return node_id.hex()[:8]
