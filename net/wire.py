"""Request and response bodies: JSON for clients (msgpack on request),
msgpack for peers; one error shape ``{"error": code, "detail": text}``."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

import msgpack
from aiohttp import StreamReader, web

from net.errors import ApiError, BadRequest, TooLarge
from net.server import GUARD

MSGPACK = "application/msgpack"
CLIENT_BODY_CAP = 64 * 1024
PEER_BODY_CAP = 4 * 1024 * 1024


def wants_msgpack(request: web.Request) -> bool:
    return MSGPACK in request.headers.get("Accept", "")


def reply(request: web.Request, data: Any, *, status: int = 200) -> web.Response:
    if wants_msgpack(request):
        return web.Response(body=pack(data), status=status, content_type=MSGPACK)
    return web.json_response(data, status=status)


def error_reply(request: web.Request, exc: ApiError) -> web.Response:
    body = {"error": exc.code, "detail": exc.detail}
    if request.path.startswith("/peer/"):
        resp = web.Response(body=pack(body), status=exc.status, content_type=MSGPACK)
    else:
        resp = reply(request, body, status=exc.status)
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return resp


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
