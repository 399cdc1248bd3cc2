"""The embedded mode's bus: payloads published in this process reach this process's hub only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .loop_tasks import call_in_loop


class MemoryBus:
    """Delivers in the hub's loop: at once when published from it, else handed over
    thread-safely. With no loop (nobody in this process listens) a publish is a no-op."""

    shared = False

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._handlers: dict[bytes, Callable[[bytes], None]] = {}

    def subscribe(
        self, channel: bytes, on_message: Callable[[bytes], None], on_reconnect: Callable[[], None]
    ) -> None:
        """Live at once; ``on_reconnect`` is never called (there is no connection to lose)."""
        self._handlers[channel] = on_message

    def unsubscribe(self, channel: bytes) -> None:
        self._handlers.pop(channel, None)

    def publish(self, payloads: list[tuple[bytes, bytes]]) -> None:
        """Thread-safe; in order per publishing thread."""
        call_in_loop(self._loop, self._deliver, payloads)

    def _deliver(self, payloads: list[tuple[bytes, bytes]]) -> None:
        handlers = self._handlers
        for channel, data in payloads:
            handler = handlers.get(channel)
            if handler is not None:
                handler(data)

    def stats(self) -> dict:
        return {"redis_channels": 0, "redis_connected": False, "reconnects": 0}

    async def aclose(self) -> None:
        self._handlers.clear()
