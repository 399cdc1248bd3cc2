"""The embedded mode's bus: payloads published in this process reach this process's hub only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


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
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(payloads)
            return
        try:
            loop.call_soon_threadsafe(self._deliver, payloads)
        except RuntimeError:  # the loop closed meanwhile: nobody to deliver to
            return

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
