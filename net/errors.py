"""Errors of the network shell, each with the HTTP status it maps to."""

from __future__ import annotations

from typing import Any

from crdt.errors import ExchangeError


class ApiError(ExchangeError):
    """A request the node refuses; carries an HTTP status and a code."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after  # seconds, sent as a Retry-After header
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def fields(self) -> dict[str, Any]:
        """What the error body carries besides ``error`` and ``detail``."""
        return {}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class OtherNetwork(Conflict):
    """A peer call from a node of another network; the answer names this node's (``net``)."""

    code = "wrong_network"

    def __init__(self, detail: str, *, network: bytes) -> None:
        super().__init__(detail)
        self.network = network

    def fields(self) -> dict[str, Any]:
        return {"net": self.network}


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(ApiError):
    status = 422
    code = "unprocessable"


class CidReused(Conflict):
    """A client id that came before with another order or cancel."""

    code = "cid_reused"


class NoQuorum(ApiError):
    """An order or cancel that no majority of members certified in time: not
    acknowledged.  It stays in this node's log, so it may still count (its
    entries reach a majority before this node is voted out) or be voided;
    ``id`` names the order, to look it up or to retry with the same ``cid``."""

    status = 503
    code = "no_quorum"

    def __init__(self, detail: str, *, order_id: bytes, retry_after: float) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.order_id = order_id

    def fields(self) -> dict[str, Any]:
        return {"id": self.order_id.hex()}


class PeerError(ExchangeError):
    """A peer call failed: unreachable, timed out or answered badly."""

    code = "peer_error"


class PeerErrorReply(PeerError):
    """A peer answered a call with an error: its HTTP status (None when it
    said none), its error code and detail, and the network it serves when it
    said (``net``).  Built by ``net.wire.peer_error`` from the decoded body."""

    def __init__(self, *, status: int | None, code: str, detail: str, network: bytes | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {detail}" if status is not None else f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.network = network


class PeerRefused(PeerError):
    """The node will not dial that peer URL (its address policy refuses it)."""

    code = "peer_refused"


class BadReply(PeerError):
    """A peer's reply that does not decode."""

    code = "bad_reply"


class StorageError(ExchangeError):
    code = "storage_error"


class ListenError(ExchangeError):
    """The node cannot listen on its HTTP (TCP) or DHT (UDP) port."""

    code = "cannot_listen"
