"""Errors of the network shell, each with the HTTP status it maps to."""

from __future__ import annotations

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


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(ApiError):
    status = 422
    code = "unprocessable"


class PeerError(ExchangeError):
    """A peer call failed: unreachable, timed out or answered badly."""

    code = "peer_error"


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
