"""Asyncio shell: aiohttp server and client, DHT discovery, peer exchange,
replication loops, persistence and the node process."""
