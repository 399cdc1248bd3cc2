"""What crosses the bus without being stored: ephemeral topic events (``broadcast_event``, to a
topic's subscribers) and generic named channels (``listen`` / ``send``, e.g. presence diffs)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from . import wire
from .bus import Bus
from .subscribers import wait_live

log = logging.getLogger(__name__)


class _Done:
    """An already-finished awaitable: lets ``unlisten`` be called with or without ``await``."""

    def __await__(self):
        return iter(())


def _nothing_to_recover() -> None:
    """A listen channel's reconnect: its payloads are ephemeral, nothing is read back."""


class Broadcasts:
    """The hub's ephemeral half (``Hub`` derives from it); uses the hub's bus and loop."""

    # The hub's, declared here for what this half uses.
    _bus: Bus
    _loop: asyncio.AbstractEventLoop | None
    _prefix: str
    _listeners: dict[str, list[Callable[[dict], Any]]]
    _bind: Callable[[], asyncio.AbstractEventLoop]
    _spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task]

    def broadcast_event(self, topic: str, event: str, payload: dict) -> None:
        """Deliver an ephemeral event to the topic's subscribers in every process (no seq, not
        stored). Thread-safe."""
        body = {"type": "event", "topic": topic, "event": event, "payload": payload}
        self._bus.publish([(wire.topic_channel(self._prefix, topic), wire.encode_body(body))])

    async def listen(self, name: str, callback: Callable[[dict], Any]) -> None:
        """Call ``callback(payload)`` (in the loop; may return an awaitable) for every
        ``send(name, payload)`` in any process. Returns once the subscription is live.
        Raises HubUnavailable when the bus does not confirm it in time."""
        self._bind()
        callbacks = self._listeners.setdefault(name, [])
        callbacks.append(callback)
        if len(callbacks) > 1:
            return
        live = self._bus.subscribe(
            wire.listen_channel(self._prefix, name),
            lambda data, n=name: self._on_listen_payload(n, data),
            _nothing_to_recover,
        )
        if live is not None:
            await wait_live(live)

    def unlisten(self, name: str, callback: Callable[[dict], Any]) -> _Done:
        """Stop calling ``callback``; may be awaited or not."""
        if self._loop is None:
            return _Done()
        callbacks = self._listeners.get(name, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            self._listeners.pop(name, None)
            self._bus.unsubscribe(wire.listen_channel(self._prefix, name))
        return _Done()

    def send(self, name: str, payload: dict) -> None:
        """Publish ``payload`` to every ``listen(name, ...)`` callback in every process.
        Thread-safe; in order per sending process."""
        self._bus.publish([(wire.listen_channel(self._prefix, name), wire.encode_body(payload))])

    def _on_listen_payload(self, name: str, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            log.warning("channel %s: ignored a malformed bus message (%s)", name, exc)
            return
        self._call_listeners(name, payload)

    def _call_listeners(self, name: str, payload: dict) -> None:
        for callback in list(self._listeners.get(name, ())):
            try:
                result = callback(payload)
                if asyncio.iscoroutine(result):
                    self._spawn(result)
            except Exception:
                log.exception("listener on %s failed", name)
