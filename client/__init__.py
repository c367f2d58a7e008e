"""The one client library of a p2pex node's client API.

Owns talking to a node for every program that does: ``cli.py``'s client
commands, the trader (``net/trader.py``), the demo (``net/demo.py``) and
scripts.  ``Client`` is the asyncio client (aiohttp), ``SyncClient`` runs it
on a private event loop for scripts; both return the typed results of
``client.models`` and raise one ``ClientError``; ``Client.trading()`` opens
a ``TradingSession`` (orders and cancels over one WebSocket).  ``client.discovery`` finds
a node's URL and token from its data dir; ``client.tables`` renders results
as rich tables (import it separately).

    from client import SyncClient

    with SyncClient.from_data_dir("data/node") as node:
        order = node.place("buy", 10, 100, cid="my-order-1")
        print(order.status, order.filled, [f.qty for f in order.fills])
"""

from client.aio import MAX_PAGE, Client
from client.discovery import DEFAULT_DATA_DIR, DEFAULT_URL, normalize_url, read_token, resolve_url
from client.errors import ClientError
from client.models import Book, Event, Fill, FillsPage, Latency, Level, OrderView, Peer, Status
from client.sync import SyncClient
from client.trading import TradingSession

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_URL",
    "MAX_PAGE",
    "Book",
    "Client",
    "ClientError",
    "Event",
    "Fill",
    "FillsPage",
    "Latency",
    "Level",
    "OrderView",
    "Peer",
    "Status",
    "SyncClient",
    "TradingSession",
    "normalize_url",
    "read_token",
    "resolve_url",
]
