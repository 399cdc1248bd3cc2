"""The hub's message bus: one small interface, two backends chosen by ``settings.REDIS_URL`` (as
``presence.get_presence`` chooses): ``RedisBus`` (bus_redis.py) between every server process, and
``MemoryBus`` (bus_memory.py) inside the one process of the embedded mode. Both carry the same
payloads (``wire.py``), so the hub has one code path for both modes.

The hub calls the bus once per payload or per subscription change, never per subscriber.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from django.conf import settings

from .bus_memory import MemoryBus


class Bus(Protocol):
    shared: bool  # True when a payload reaches every server process, False for this one only

    def subscribe(
        self, channel: bytes, on_message: Callable[[bytes], None], on_reconnect: Callable[[], None]
    ) -> asyncio.Future | None:
        """Call ``on_message(payload)`` in the loop for every payload on ``channel``, and
        ``on_reconnect()`` when the subscription is live again after the bus lost its connection
        (payloads published meanwhile never arrive). Returns a future resolved once the
        subscription is live, or None when it is live at once. One subscription per channel."""

    def unsubscribe(self, channel: bytes) -> None:
        """Stop ``channel``'s callbacks (a channel not subscribed is no error)."""

    def publish(self, payloads: list[tuple[bytes, bytes]]) -> None:
        """Send each ``(channel, payload)``, in order. Thread-safe."""

    def stats(self) -> dict:
        """``redis_channels``, ``redis_connected``, ``reconnects`` (for ``hub.stats()``)."""

    async def aclose(self) -> None:
        """Stop background tasks and drop every subscription."""


def bus_from_settings(
    loop: asyncio.AbstractEventLoop | None, on_outage: Callable[[], None] | None = None
) -> Bus:
    """A new bus for a hub running on ``loop`` (None: no loop runs a hub in this process, as in
    a management command or a Celery worker; the bus then only publishes). ``on_outage()`` is
    called in the loop when the bus has been unable to reach the other processes for
    ``settings.REALTIME_BUS_OUTAGE_S`` (never by the in-process bus, which cannot lose them)."""
    if not settings.REDIS_URL:
        return MemoryBus(loop)
    from .bus_redis import RedisBus  # redis is only needed when configured

    return RedisBus(settings.REDIS_URL, loop, on_outage)
