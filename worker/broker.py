"""kombu's Redis transport, keeping one Redis client per channel (`install()`).

kombu's channel builds a new `redis.Redis` client for every command it sends (a publish, an
ack, an event), and redis-py builds its table of ~170 response callbacks in each: about
0.2 ms of CPU every time, several times per task (measured: ~0.25 ms of a publish's
0.6 ms). A client is only a handle on the channel's connection pool, safe to share, so this
channel makes one and keeps it. Everything else is kombu's: URL parsing (redis://,
rediss://), TLS, the connection pool, visibility timeouts, the async client the worker's
consumer uses (built as kombu builds it).
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._shared_client is None:
            self._shared_client = super()._create_client()
        return self._shared_client

    def _disconnect_pools(self) -> None:
        self._shared_client = None  # a handle on the pool that goes now
        super()._disconnect_pools()


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


def install() -> None:
    """Make this the transport of redis:// and rediss:// broker URLs in this process (kombu's
    alias table; called where worker/app.py builds the app, before any connection). The
    URL keeps its scheme, so everything that reads it back (Flower's broker page, Celery's
    banner) sees a Redis broker; memory:// and others are left as they are."""
    for scheme in ("redis", "rediss"):
        kombu.transport.TRANSPORT_ALIASES[scheme] = TRANSPORT
        kombu.transport._transport_cache.pop(scheme, None)
