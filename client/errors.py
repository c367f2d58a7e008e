"""The client library's one exception, ``ClientError``.

Owns the mapping of every failure a client call can meet to one shape: the
node's own refusals (``{"error": code, "detail": text}`` with their HTTP
status), failures of the network (no status) and replies the library cannot
read.  It also says which failures a request may be sent again after.
"""

from __future__ import annotations

#: Codes of failures without an HTTP status (``status`` is None).
UNREACHABLE = "unreachable"  # the connection was refused or could not be made
TIMEOUT = "timeout"  # no (complete) answer within the call's timeout
DISCONNECTED = "disconnected"  # the connection broke during the call
BAD_URL = "bad_url"  # the node URL does not parse
NO_TOKEN = "no_token"  # a write without a token, or the .cookie file is missing
#: Codes of replies that came with a status but not in the node's error shape.
BAD_REPLY = "bad_reply"  # not JSON, or JSON of an unexpected shape
HTTP_ERROR = "http_error"  # an HTTP error status without the node's error body

NETWORK_CODES = frozenset({UNREACHABLE, TIMEOUT, DISCONNECTED})
#: Statuses after which the same request may be sent again (honouring Retry-After).
RETRY_STATUSES = frozenset({429, 503})


class ClientError(Exception):
    """A call failed.  ``code`` is the node's error code (``unknown_order``,
    ``bad_qty``, ``unauthorized``, ...) or one of this module's codes;
    ``detail`` says what happened; ``status`` is the HTTP status, None for a
    network failure, a timeout or a failure before anything was sent;
    ``retry_after`` the seconds of a ``Retry-After`` header."""

    def __init__(self, code: str, detail: str, status: int | None = None, *,
                 retry_after: float | None = None) -> None:
        super().__init__(code, detail, status)
        self.code = code
        self.detail = detail
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" + (f" (HTTP {self.status})" if self.status is not None else "")

    @property
    def network(self) -> bool:
        """The request may not have reached the node, or its answer was lost."""
        return self.status is None and self.code in NETWORK_CODES

    @property
    def retryable(self) -> bool:
        """Sending the same request again may succeed: a network failure, a
        timeout, or 429/503 (rate limited, busy, not ready yet)."""
        return self.network or self.status in RETRY_STATUSES

    @classmethod
    def from_reply(cls, status: int, body: object, *, url: str, retry_after: float | None = None) -> ClientError:
        """The error a node answered with: its ``{"error", "detail"}`` when the
        body has that shape, else ``http_error``."""
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return cls(body["error"], str(body.get("detail", "")), status, retry_after=retry_after)
        return cls(HTTP_ERROR, f"HTTP {status} from {url}", status, retry_after=retry_after)
