"""Request and response bodies: JSON for clients (msgpack on request),
msgpack for peers; one error shape ``{"error": code, "detail": text}`` (a
``wrong_network`` refusal adds the refusing node's network, ``net``), and
the one reading of a peer's error answer (``peer_error``)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
from aiohttp import StreamReader, web

from net.errors import ApiError, BadRequest, PeerErrorReply, TooLarge
from net.server import GUARD

MSGPACK = "application/msgpack"
CLIENT_BODY_CAP = 64 * 1024
PEER_BODY_CAP = 4 * 1024 * 1024
# a participant's ticket, for a member to carry (docs/PARTICIPANTS.md): the route, how long the member
# waits for a majority to certify the carrying entry, and how many entries of its log the answer carries
CARRY_PATH = "/peer/v1/carry"
CARRY_WAIT_S = 1.5
CARRY_PAGE = 256


def wants_msgpack(request: web.Request) -> bool:
    return MSGPACK in request.headers.get("Accept", "")


def reply(request: web.Request, data: Any, *, status: int = 200) -> web.Response:
    if wants_msgpack(request):
        return web.Response(body=pack(data), status=status, content_type=MSGPACK)
    return web.json_response(data, status=status)


def error_reply(request: web.Request, exc: ApiError) -> web.Response:
    body = {"error": exc.code, "detail": exc.detail, **exc.fields()}
    if request.path.startswith("/peer/"):
        resp = web.Response(body=pack(body), status=exc.status, content_type=MSGPACK)
    else:
        resp = reply(request, body, status=exc.status)
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return resp


PEER_CODE_CHARS = 50
PEER_DETAIL_CHARS = 200
NETWORK_ID_LEN = 32


def peer_error(status: int | None, body: bytes | Mapping[Any, Any]) -> PeerErrorReply:
    """What a peer's error answer says: from the body of an HTTP reply (msgpack,
    or JSON) or a peer link's decoded answer, its code, detail and network
    (``net``), and its status (a link answer carries ``status``).  Text only
    and bounded: a body in neither shape is ``http_error`` with a printable
    excerpt, never raw bytes in a log line."""
    fields = body if isinstance(body, Mapping) else _error_fields(body)
    code = fields.get("error") if fields is not None else None
    if fields is None or not isinstance(code, str):
        return PeerErrorReply(status=status, code="http_error", detail=_not_an_error_body(body))
    said = fields.get("status")
    if status is None and type(said) is int:
        status = said
    detail = fields.get("detail")
    net = fields.get("net")
    return PeerErrorReply(
        status=status, code=printable(code, PEER_CODE_CHARS),
        detail=printable(detail if isinstance(detail, str) else "", PEER_DETAIL_CHARS),
        network=net if type(net) is bytes and len(net) == NETWORK_ID_LEN else None)


def _error_fields(data: bytes) -> Mapping[Any, Any] | None:
    """An error body as a map: msgpack (what peers send), else JSON; None if neither."""
    for decode in (unpack, json.loads):
        try:
            obj = decode(data)
        except (BadRequest, ValueError, RecursionError):
            continue
        return obj if isinstance(obj, Mapping) else None
    return None


def _not_an_error_body(body: bytes | Mapping[Any, Any]) -> str:
    if not isinstance(body, bytes):
        return "an answer without an error code"
    if not body:
        return "an empty answer"
    excerpt = printable(body.decode("utf-8", "replace"), 80)
    return f"a {len(body)}-byte answer that is not an error body: {excerpt}"


def printable(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters (ending ``...`` when cut), each one
    not printable replaced by ``?``."""
    cut = text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."
    return "".join(c if c.isprintable() else "?" for c in cut)


def pack(data: Any) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, max_array_len=100_000, max_map_len=100_000,
        )
    except Exception as exc:
        raise BadRequest(f"body is not valid msgpack: {exc}", code="bad_msgpack") from None


async def read_capped(stream: StreamReader, cap: int, declared: int | None,
                      take: Callable[[int], None] | None = None) -> bytes:
    """The whole body of a request or a reply, refused once it passes ``cap``.

    ``StreamReader.read(n)`` returns what is buffered so far, not ``n`` bytes,
    so a body is read chunk by chunk until the end of the stream.  ``take``
    is told the size of each chunk (and may refuse it by raising)."""
    if declared is not None and declared > cap:
        raise TooLarge(f"body of {declared} bytes exceeds the cap of {cap}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_chunked(65536):
        size += len(chunk)
        if size > cap:
            raise TooLarge(f"body exceeds the cap of {cap} bytes")
        if take is not None:
            take(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: web.Request, cap: int) -> bytes:
    """A request body: refused past ``cap`` (413), and, behind a connection
    guard, past its body timeout (408) or its receive budget (503 busy)."""
    guard = request.app.get(GUARD)
    if guard is None:
        return await read_capped(request.content, cap, request.content_length)
    try:
        async with asyncio.timeout(guard.limits.body_timeout):
            return await read_capped(request.content, cap, request.content_length, take=guard.taker(request))
    except TimeoutError:
        raise ApiError(f"the body did not arrive within {guard.limits.body_timeout:g} s", code="body_timeout",
                       status=408) from None


async def read_client_body(request: web.Request) -> Any:
    """A JSON object (or msgpack map when the content type says so)."""
    data = await read_body(request, CLIENT_BODY_CAP)
    if request.content_type == MSGPACK:
        obj = unpack(data)
    else:
        try:
            obj = json.loads(data or b"{}")
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}", code="bad_json") from None
    if not isinstance(obj, dict):
        raise BadRequest("body must be an object", code="bad_body")
    return obj


async def read_peer_body(request: web.Request) -> Any:
    obj = unpack(await read_body(request, PEER_BODY_CAP))
    if not isinstance(obj, dict):
        raise BadRequest("peer body must be a map", code="bad_body")
    return obj
