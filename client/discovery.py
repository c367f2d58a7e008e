"""Where a node is and how to authenticate to it, from its data dir.

Owns the rules every client shares: a node writes its URL to ``endpoint`` and
its API token to ``.cookie`` in its data dir (the token is rewritten at every
start); ``--node HOST:PORT`` without a scheme means ``http://HOST:PORT``; with
nothing given the node is ``http://127.0.0.1:7001``.
"""

from __future__ import annotations

from pathlib import Path

from client.errors import NO_TOKEN, ClientError

DEFAULT_URL = "http://127.0.0.1:7001"
DEFAULT_DATA_DIR = "data/node"
ENDPOINT_FILE = "endpoint"
COOKIE_FILE = ".cookie"


def normalize_url(url: str) -> str:
    """``127.0.0.1:7001`` -> ``http://127.0.0.1:7001``; no trailing slash."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def resolve_url(node: str | None = None, data_dir: str | Path | None = None) -> str:
    """``node`` when given, else the URL in ``data_dir``'s ``endpoint`` file,
    else ``DEFAULT_URL``."""
    if node:
        return normalize_url(node)
    if data_dir is not None:
        endpoint = Path(data_dir) / ENDPOINT_FILE
        try:
            text = endpoint.read_text().strip().rstrip("/")
        except OSError:
            text = ""
        if text:
            return text
    return DEFAULT_URL


def read_token(data_dir: str | Path) -> str:
    """The API token in ``data_dir/.cookie``; ClientError ``no_token`` if unreadable."""
    cookie = Path(data_dir) / COOKIE_FILE
    try:
        return cookie.read_text().strip()
    except FileNotFoundError:
        raise ClientError(NO_TOKEN, f"{cookie} not found") from None
    except OSError as exc:
        raise ClientError(NO_TOKEN, f"{cookie} cannot be read ({exc.strerror or exc})") from None
