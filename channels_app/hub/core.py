"""The hub itself: the process's registry of topics with local subscribers, subscribe / detach,
the publish entries, stats, and the binding to the event loop.

Everything here runs on one event loop (the server's); ``publish_committed``, ``publish_local``,
``broadcast_event`` and ``send`` are the thread-safe entries. The hub binds lazily to the running
loop and starts afresh if the loop changes (tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from django.conf import settings

from . import messages, replay, wire
from .broadcasts import Broadcasts
from .bus import bus_from_settings
from .loop_tasks import call_in_loop, cancel_all
from .messages import Message
from .sequencer import Topic
from .subscribers import Subscriber, SubscribeResult

log = logging.getLogger(__name__)


class Hub(Broadcasts):
    """One per process: ``from channels_app.hub import hub``. See the package docstring."""

    def __init__(self) -> None:
        self._init_state(None)

    # --- binding, state -------------------------------------------------------------------

    def _init_state(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._topics: dict[str, Topic] = {}
        self._listeners: dict[str, list[Callable[[dict], Any]]] = {}
        self._prefix = settings.REDIS_PREFIX
        self._bus = bus_from_settings(loop, self._on_bus_outage)
        self._tasks: set[asyncio.Task] = set()

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                log.debug("hub rebinding to a new event loop; previous state dropped")
            self._init_state(loop)
        return loop

    @property
    def redis_mode(self) -> bool:
        """True when the bus reaches every server process (Redis)."""
        return self._bus.shared

    def topic_channel(self, topic: str) -> bytes:
        return wire.topic_channel(self._prefix, topic)

    def listen_channel(self, name: str) -> bytes:
        return wire.listen_channel(self._prefix, name)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def register_encoder(self, encoding: str, fn: Callable[[Message], str | bytes]) -> None:
        """Register how ``encoding`` frames a Message ("plain" is built in)."""
        messages.register_encoder(encoding, fn)

    def stats(self) -> dict:
        """Counts for tests and the debug endpoint (no topic names)."""
        bus = self._bus.stats()
        return {
            "topics": len(self._topics),
            "subscribers": sum(t.count() for t in self._topics.values()),
            "listeners": sum(len(v) for v in self._listeners.values()),
            "redis_channels": bus["redis_channels"],
            "redis_connected": bus["redis_connected"],
            "reconnects": bus["reconnects"],
            "pending": sum(len(t.pending) for t in self._topics.values()),
        }

    # --- subscribe / unsubscribe ----------------------------------------------------------

    async def subscribe(
        self, topic: str, subscriber: Subscriber, since: int | None = None
    ) -> SubscribeResult:
        """Register ``subscriber`` for live messages of ``topic``, then replay stored ones after
        ``since`` (None: live only), with no gap and no duplicate at the seam.

        Calling it again for a subscriber already registered re-runs the replay (a resume).
        Raises HubUnavailable when Redis does not confirm the subscription in time, and the
        database's errors when replay cannot read; the subscriber is then not registered.
        """
        self._bind()
        state = self._topics.get(topic)
        if state is None:
            state = self._open(topic)
        else:
            state.remove_member(subscriber)  # a resume: back to joining
        join = replay.Join()
        state.joining[subscriber] = join
        try:
            return await replay.join(state, subscriber, join, since)
        except BaseException:
            if state.joining.get(subscriber) is join:
                del state.joining[subscriber]
                self._maybe_close(state)
            raise

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Stop delivering ``topic`` to ``subscriber`` (idempotent; always call in a finally).
        The last local subscriber of a topic drops the process's Redis subscription for it."""
        self.detach(topic, subscriber)

    def detach(self, topic: str, subscriber: Subscriber) -> None:
        """``unsubscribe`` without awaiting: safe to call from ``deliver``/``overflow``."""
        state = self._topics.get(topic)
        if state is None:
            return
        state.remove_member(subscriber)
        state.joining.pop(subscriber, None)
        self._maybe_close(state)

    def _open(self, topic: str) -> Topic:
        state = Topic(topic, self.topic_channel(topic), self._loop, self._spawn)
        self._topics[topic] = state
        state.subscribed = self._bus.subscribe(state.channel, state.on_payload, state.on_reconnect)
        state.open_task = self._spawn(state.start())
        return state

    def _maybe_close(self, state: Topic) -> None:
        if state.closed or not state.is_empty():
            return
        state.close()
        if self._topics.get(state.name) is state:
            del self._topics[state.name]
            self._bus.unsubscribe(state.channel)

    def _on_bus_outage(self) -> None:
        """The bus lost Redis for longer than a blip: this process hears no live message, so
        every local subscriber that can resume elsewhere is told to (``unavailable``: 1013, or
        the end of an SSE stream). Subscribers without it stay and are back-filled later."""
        for state in list(self._topics.values()):
            subscribers = [s for subs in state.members.values() for s in subs]
            subscribers += list(state.joining)
            for subscriber in subscribers:
                unavailable = getattr(subscriber, "unavailable", None)
                if unavailable is not None:
                    unavailable()

    # --- publishing ------------------------------------------------------------------------

    def publish_committed(self, messages: list[tuple[str, dict]]) -> None:
        """Send each committed ``(topic, envelope)`` to the topic's live subscribers in every
        process, in order per topic (one payload per topic, see ``wire.topic_payloads``).

        The router's after-commit publisher (registered in ``ChannelsAppConfig.ready``): only
        ever called for notifications already committed. Any thread. Raises the bus's errors
        (redis errors when Redis is unreachable: the router logs them, and clients recover the
        message from the stream by seq).
        """
        if not messages:
            return
        prefix = self._prefix
        self._bus.publish(
            [(wire.topic_channel(prefix, t), data) for t, data in wire.topic_payloads(messages)]
        )

    def publish_local(self, messages: list[tuple[str, dict]]) -> None:
        """Deliver ``(topic, envelope)`` pairs to this process's subscribers only, bypassing
        the bus. Thread-safe; a no-op when no loop runs the hub (nobody here is listening)."""
        call_in_loop(self._loop, self._accept_local, messages)

    def _accept_local(self, messages: list[tuple[str, dict]]) -> None:
        for topic, envelope in messages:
            state = self._topics.get(topic)
            if state is None:
                continue
            if envelope.get("type") == "event":
                state.deliver_event(envelope["event"], envelope["payload"])
            else:
                state.on_live(Message(topic, envelope["seq"], envelope))

    # --- shutdown --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop background tasks and drop every subscription (tests, shutdown)."""
        if self._loop is not asyncio.get_running_loop():
            return
        await cancel_all(self._tasks)
        await self._bus.aclose()
        self._init_state(None)


hub = Hub()


def get_hub() -> Hub:
    return hub
