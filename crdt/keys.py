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


_verifier_cache: dict[bytes, Ed25519PublicKey] = {}


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public``'s signature of ``message``."""
    if len(public) != PUBLIC_LEN or len(signature) != SIGNATURE_LEN:
        return False
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
