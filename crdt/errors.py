"""Exception tree of the whole project.

Owns the root type ``ExchangeError`` and the typed validation errors the
replicated state returns.  Validation errors are values first: ``Replica``
returns them in a ``MergeResult``; the shell may raise them.
"""

from __future__ import annotations


class ExchangeError(Exception):
    """Root of every error this project raises or returns."""

    code = "error"


class ValidationError(ExchangeError):
    """An entry or request that must not touch state."""

    code = "invalid"


class MalformedEntry(ValidationError):
    """Wrong types, wrong field count, wrong lengths."""

    code = "malformed_entry"


class UnknownBodyType(ValidationError):
    code = "unknown_body_type"


class OversizeEntry(ValidationError):
    code = "oversize_entry"


class OutOfRange(ValidationError):
    """A price, quantity, sequence or clock value outside its documented range."""

    code = "out_of_range"


class BadSignature(ValidationError):
    code = "bad_signature"


class BrokenChain(ValidationError):
    """``prev`` does not match the hash of the origin's previous entry."""

    code = "broken_chain"


class NonIncreasingHlc(ValidationError):
    code = "non_increasing_hlc"


class ClockSkew(ValidationError):
    """Entry stamped too far ahead of the receiver's clock."""

    code = "clock_skew"


class ForeignCancel(ValidationError):
    """A cancel of an order that is not in the canceller's own log."""

    code = "foreign_cancel"


class Equivocation(ValidationError):
    """Two validly signed entries with one ``(origin, seq)``; origin is frozen."""

    code = "equivocation"


class SequenceGap(ValidationError):
    """Entries arrived ahead of a gap; they are buffered, not dropped."""

    code = "sequence_gap"


class NotMember(ExchangeError):
    """This node is not (or no longer) a member of its network: it may not write."""

    code = "not_member"


class ClockUnhealthy(ExchangeError):
    """This node's clock is too far from its peers' median to stamp orders."""

    code = "clock_unhealthy"


class WrongNetwork(ExchangeError):
    """A peer or an entry belongs to another network (another genesis)."""

    code = "wrong_network"


class TooManyOrigins(ValidationError):
    """Entries of a new origin that is not a member, past the cap on such origins."""

    code = "too_many_origins"


class BadTicket(ValidationError):
    """A participant's ticket a member will not carry: its signature does not
    verify, or its stamp is too far from the member's clock."""

    code = "bad_ticket"
