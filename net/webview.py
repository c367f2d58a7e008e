"""The web view: ``GET /`` serves a single page (``net/web/``) that shows the
book, the trade tape, this node's peers and its state hash, updated live from
``GET /v1/stream`` and ``GET /v1/status``, and places and cancels orders with
the API token.  No build step: the files are served as they are, from a fixed
list (nothing else under ``/web/`` is reachable).

Every reply carries ``Cache-Control: no-cache`` (the browser revalidates with
the ETag, so a node that was upgraded never runs yesterday's script), a
content type with its charset, ``nosniff``, and, for the page, a Content
Security Policy that allows only this origin's scripts, styles and
connections (the WebSocket included), no inline script, no framing and no
form submission."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from net.errors import NotFound

WEB_DIR = Path(__file__).resolve().parent / "web"
LWC = "vendor/lightweight-charts/lightweight-charts.standalone.production.js"
JS = "text/javascript; charset=utf-8"

#: URL path -> (file under ``WEB_DIR``, content type).
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", JS),
    "/web/app.css": ("app.css", "text/css; charset=utf-8"),
    f"/web/{LWC}": (LWC, JS),
    "/web/vendor/lightweight-charts/LICENSE": ("vendor/lightweight-charts/LICENSE", "text/plain; charset=utf-8"),
    "/web/vendor/lightweight-charts/NOTICE": ("vendor/lightweight-charts/NOTICE", "text/plain; charset=utf-8"),
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

COMMON_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = {**COMMON_HEADERS, "Content-Security-Policy": CSP, "X-Frame-Options": "DENY"}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _asset_handler(name: str, content_type: str) -> Handler:
    path = WEB_DIR / name
    headers = {**(PAGE_HEADERS if content_type.startswith("text/html") else COMMON_HEADERS),
               "Content-Type": content_type}

    async def handler(request: web.Request) -> web.StreamResponse:
        if not path.is_file():  # an install that lost its package data
            raise NotFound(f"the web view's file {name} is missing from this install", code="web_file_missing")
        return web.FileResponse(path, headers=headers)

    return handler


def add_web_routes(app: web.Application) -> None:
    """``GET /`` and the page's files (HEAD too)."""
    for url, (name, content_type) in ASSETS.items():
        app.router.add_get(url, _asset_handler(name, content_type))


__all__ = ["ASSETS", "WEB_DIR", "add_web_routes"]
