"""The Redis bus: one redis.asyncio pub/sub connection per process, one SUBSCRIBE per channel the
hub wants (``subscribe``), dropped with ``unsubscribe``; PUBLISHes pipelined on a second
connection from the loop, or synchronous on the process's publishing client from other threads.

After a lost connection (an error, or a connection that stays silent after a ping) it reconnects
by itself, resubscribes every wanted channel and tells each subscription once it is live again
(``on_reconnect``), so the hub can back-fill what was published while it was deaf. An outage that
outlasts ``settings.REALTIME_BUS_OUTAGE_S`` (Redis down, or this process cut off from it while the
others still reach it) is reported once through ``on_outage``: the hub then closes its clients
with 1013 so they resume on a process that hears the bus, instead of waiting deaf here.

Accepted race: a client connected during the outage whose SUBSCRIBE is confirmed just after the
report is not closed; it is back-filled like the clients of a short outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from routing_app.metrics.instruments import REALTIME_BUS_DISCONNECTED
from routing_app.pubsub import sync_redis

from .loop_tasks import cancel_all

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = (0.1, 5.0)  # first and longest wait between Redis reconnect attempts
READ_YIELD_EVERY = 64  # Redis messages read in a row before letting other tasks run
# A Redis host that vanishes without a TCP reset (partition, frozen VM) leaves a connection that
# just stays silent: it is pinged when nothing came for settings.REALTIME_BUS_PING_AFTER_S, and
# replaced if still nothing came settings.REALTIME_BUS_SILENT_MAX_S after the ping.


class _Subscription:
    """One channel's callbacks, and whether Redis has confirmed it (``live``)."""

    __slots__ = ("on_message", "on_reconnect", "live", "reconnected")

    def __init__(self, on_message, on_reconnect, live: asyncio.Future) -> None:
        self.on_message: Callable[[bytes], None] = on_message
        self.on_reconnect: Callable[[], None] = on_reconnect
        self.live = live
        self.reconnected = False  # resubscribed after a reconnect, not yet confirmed


class RedisBus:
    """See the module docstring; the interface is ``bus.Bus``."""

    shared = True

    def __init__(
        self,
        url: str,
        loop: asyncio.AbstractEventLoop | None,
        on_outage: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._loop = loop
        self._on_outage = on_outage
        self._outage_timer: asyncio.TimerHandle | None = None
        self._handlers: dict[bytes, Callable[[bytes], None]] = {}  # channel -> on_message
        self._subscriptions: dict[bytes, _Subscription] = {}
        self._tasks: set[asyncio.Task] = set()
        self._redis_task: asyncio.Task | None = None
        self._pubsub = None  # the live redis.asyncio PubSub, None while disconnected
        self._commands: deque[tuple[str, bytes, _Subscription | None]] = deque()
        self._command_task: asyncio.Task | None = None
        self._sub_waiters: dict[bytes, deque[_Subscription | None]] = {}
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._outbox_task: asyncio.Task | None = None
        self._publisher = None  # redis.asyncio client for publishes made in the loop
        self._reconnects = 0
        self._last_heard = 0.0  # loop time of the last reply on the pub/sub connection

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- the interface ---------------------------------------------------------------------

    def subscribe(
        self, channel: bytes, on_message: Callable[[bytes], None], on_reconnect: Callable[[], None]
    ) -> asyncio.Future:
        """Queue a SUBSCRIBE; the future resolves on Redis's "subscribe" reply."""
        subscription = _Subscription(on_message, on_reconnect, self._loop.create_future())
        self._handlers[channel] = on_message
        self._subscriptions[channel] = subscription
        self._command("SUBSCRIBE", channel, subscription)
        return subscription.live

    def unsubscribe(self, channel: bytes) -> None:
        if self._handlers.pop(channel, None) is None:
            return
        del self._subscriptions[channel]
        self._command("UNSUBSCRIBE", channel, None)

    def publish(self, payloads: list[tuple[bytes, bytes]]) -> None:
        """From the bus's loop: queued, and sent in order by one pipelined task, so the loop never
        blocks (a failure is logged: what crosses here from the loop is ephemeral). From any other
        thread: synchronous, one round trip; raises redis errors."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None or running is not loop:
            _publish_now(payloads)
            return
        self._outbox.extend(payloads)
        if self._outbox_task is None:
            self._outbox_task = self._spawn(self._flush_outbox())

    def stats(self) -> dict:
        return {
            "redis_channels": len(self._handlers),
            "redis_connected": self._pubsub is not None,
            "reconnects": self._reconnects,
        }

    async def aclose(self) -> None:
        self._cancel_outage_timer()
        await cancel_all(self._tasks)
        if self._publisher is not None:
            await self._publisher.aclose()
        self._handlers.clear()
        self._subscriptions.clear()

    # --- publishing ------------------------------------------------------------------------

    async def _flush_outbox(self) -> None:
        try:
            while self._outbox:
                if self._publisher is None:
                    self._publisher = aioredis.Redis.from_url(
                        self._url, socket_connect_timeout=2, socket_timeout=5
                    )
                batch = list(self._outbox)
                self._outbox.clear()
                try:
                    async with self._publisher.pipeline(transaction=False) as pipe:
                        for channel, data in batch:
                            pipe.publish(channel, data)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    log.warning("hub: %d ephemeral message(s) lost, Redis: %s", len(batch), exc)
        finally:
            self._outbox_task = None

    # --- subscribing -----------------------------------------------------------------------

    def _command(self, command: str, channel: bytes, sub: _Subscription | None) -> None:
        """Queue a SUBSCRIBE/UNSUBSCRIBE; sent in call order on the pub/sub connection."""
        self._commands.append((command, channel, sub))
        if self._redis_task is None:
            self._redis_task = self._spawn(self._run())
        elif self._pubsub is not None and self._command_task is None:
            self._command_task = self._spawn(self._send_commands())

    async def _send_commands(self) -> None:
        try:
            while self._commands and self._pubsub is not None:
                command, channel, sub = self._commands.popleft()
                if command == "SUBSCRIBE":
                    self._sub_waiters.setdefault(channel, deque()).append(sub)
                try:
                    await self._pubsub.execute_command(command, channel)
                except (RedisError, OSError) as exc:
                    # The reader sees the broken connection too; reconnecting resubscribes
                    # every wanted channel, so this command needs no retry of its own.
                    log.debug("hub: %s failed (%s); reconnect will resync", command, exc)
                    return
        finally:
            self._command_task = None

    def _on_subscribed(self, channel: bytes) -> None:
        waiters = self._sub_waiters.get(channel)
        sub = waiters.popleft() if waiters else None
        if waiters is not None and not waiters:
            del self._sub_waiters[channel]
        if sub is None:
            sub = self._subscriptions.get(channel)
        if sub is None:
            return
        if not sub.live.done():
            sub.live.set_result(None)
        if sub.reconnected:
            sub.reconnected = False
            sub.on_reconnect()

    # --- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Hold the pub/sub connection: connect, subscribe what is wanted, read until the
        connection breaks or falls silent, wait, and again (the wait doubles up to a bound)."""
        delay = RECONNECT_DELAY_S[0]
        connected_before = False
        while True:
            client = aioredis.Redis.from_url(
                self._url,
                socket_connect_timeout=2,
                socket_keepalive=True,
                # Errors must reach us (we resubscribe and back-fill); redis-py's own retries
                # would reconnect silently and skip the back-fill.
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub()
            try:
                await self._resubscribe(pubsub, connected_before)
                connected_before = True
                delay = RECONNECT_DELAY_S[0]
                await self._serve(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("hub: Redis connection lost (%s); reconnecting", exc)
            except Exception:  # a bug must not leave the process deaf: log it, reconnect
                log.exception("hub: Redis reader failed; reconnecting")
            finally:
                was_connected = self._pubsub is not None
                self._pubsub = None
                await _release(client, pubsub)
            self._lost(was_connected)  # not reached when cancelled (aclose)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_S[1])

    async def _resubscribe(self, pubsub, reconnecting: bool) -> None:
        """Connect ``pubsub`` and SUBSCRIBE every wanted channel on it at once."""
        await pubsub.connect()
        # What we want subscribed now; later changes go through _command as usual.
        self._commands.clear()
        self._sub_waiters.clear()
        wanted = list(self._handlers)
        for channel in wanted:
            self._sub_waiters[channel] = deque([self._subscriptions.get(channel)])
        self._pubsub = pubsub
        self._cancel_outage_timer()
        REALTIME_BUS_DISCONNECTED.set(0)
        if wanted:
            await pubsub.execute_command("SUBSCRIBE", *wanted)
        if reconnecting:
            self._reconnects += 1
            log.warning(
                "hub: Redis reconnected; resubscribed %d channel(s), back-filling", len(wanted)
            )
            for sub in self._subscriptions.values():
                sub.reconnected = True
        if self._commands and self._command_task is None:
            self._command_task = self._spawn(self._send_commands())

    async def _serve(self, pubsub) -> None:
        """Read ``pubsub`` until it breaks (raises its error) or its watchdog gives up on it."""
        # The reader and a watchdog race: the reader ends by an error, the watchdog by
        # declaring a silent connection dead; either way the connection is replaced.
        reader = self._spawn(self._read(pubsub))
        watchdog = self._spawn(self._watch())
        try:
            await asyncio.wait((reader, watchdog), return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises the reader's error
        finally:
            reader.cancel()
            watchdog.cancel()

    # --- outages ---------------------------------------------------------------------------

    def _lost(self, was_connected: bool) -> None:
        """No pub/sub connection (it broke, or could not be made): once one that was made is
        gone, report an outage unless it is back in time."""
        REALTIME_BUS_DISCONNECTED.set(1)
        if was_connected and self._on_outage is not None and self._outage_timer is None:
            self._outage_timer = self._loop.call_later(
                settings.REALTIME_BUS_OUTAGE_S, self._report_outage
            )

    def _report_outage(self) -> None:
        self._outage_timer = None
        log.warning(
            "hub: Redis unreachable for %.0f s; closing this process's realtime clients (1013) "
            "so they resume on a process that reaches it",
            settings.REALTIME_BUS_OUTAGE_S,
        )
        self._on_outage()

    def _cancel_outage_timer(self) -> None:
        if self._outage_timer is not None:
            self._outage_timer.cancel()
            self._outage_timer = None

    async def _watch(self) -> None:
        """Ping a connection that has been silent; return (it is then replaced) if it stays
        silent. Pings go through the command queue's connection, the pub/sub one."""
        loop = asyncio.get_running_loop()
        ping_after = settings.REALTIME_BUS_PING_AFTER_S
        silent_max = settings.REALTIME_BUS_SILENT_MAX_S
        self._last_heard = loop.time()
        while True:
            # Wake when the connection will have been silent for ping_after, not on a fixed
            # beat: a cut just after a message is then noticed within ping_after + silent_max.
            await asyncio.sleep(max(0.0, self._last_heard + ping_after - loop.time()))
            if loop.time() - self._last_heard < ping_after:
                continue  # messages are flowing: alive
            sent = loop.time()
            pubsub = self._pubsub
            if pubsub is None:
                return
            try:
                await asyncio.wait_for(pubsub.execute_command("PING"), silent_max)
            except TimeoutError:
                pass  # could not even write: as silent as can be
            await asyncio.sleep(max(0.0, sent + silent_max - loop.time()))
            if self._last_heard < sent:
                log.warning(
                    "hub: Redis silent for %.0f s after a ping; reconnecting", loop.time() - sent
                )
                return

    async def _read(self, pubsub) -> None:
        parse = pubsub.parse_response
        handlers = self._handlers
        clock = asyncio.get_running_loop().time
        in_a_row = 0
        while True:
            # Returns without suspending while Redis's data is already buffered: a burst is read
            # whole and flushed as batches once the reader has to wait (or at batch bounds).
            response = await parse(block=True)
            self._last_heard = clock()
            if response is None or isinstance(response, bytes):
                continue  # a pong outside subscribed mode
            kind = response[0]
            if kind == b"message":
                handler = handlers.get(response[1])
                if handler is not None:
                    handler(response[2])
                in_a_row += 1
                if in_a_row >= READ_YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)  # let sockets' own tasks run during a long burst
            elif kind == b"subscribe":
                self._on_subscribed(response[1])


def _publish_now(payloads: list[tuple[bytes, bytes]]) -> None:
    """Synchronous PUBLISHes on the process's publishing client: one, or one pipeline."""
    if len(payloads) == 1:
        channel, data = payloads[0]
        sync_redis().publish(channel, data)
        return
    with sync_redis().pipeline(transaction=False) as pipe:
        for channel, data in payloads:
            pipe.publish(channel, data)
        pipe.execute()


async def _release(client, pubsub) -> None:
    try:
        await pubsub.aclose()
        await client.aclose()
    except (RedisError, OSError):
        pass  # the connection is already broken; nothing left to release
