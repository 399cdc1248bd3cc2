"""Presence: who is on a topic right now, across every server process.

Shapes are those of phoenix's Presence (https://hexdocs.pm/phoenix/Phoenix.Presence.html and the
client ``assets/js/phoenix/presence.js``): a state is ``{key: {"metas": [meta, ...]}}`` and a diff
is ``{"joins": state, "leaves": state}``. Every meta carries a ``phx_ref`` unique to one track (one
socket's join) and ``online_at`` (epoch seconds); a user with two tabs is one key with two metas.

Who is tracked, all under the same key (the user id) and meta shape: every Phoenix join
(``phoenix.py``), and every plain socket (``ws_plain.py``) and SSE stream (``sse.py``) of a
logged-in user (``ConnectionPresence``, meta ``via`` = "websocket" / "sse"). So each way of
asking (``presence_state``, the plain socket's ``presence`` frame, the HTTP endpoint) lists the
union of every protocol on every process. Tracking happens at connect and disconnect only.

Two backends behind one interface, chosen by ``settings.REDIS_URL``:

- ``MemoryPresence`` for the embedded mode (one process).
- ``RedisPresence`` (``presence_redis.py``): one hash per topic whose fields are tagged with the id
  of the process that tracked them; each process beats its id into a sorted set (score = time of the
  last beat) every ``PRESENCE_TTL_S / 3``. Entries of a process that has not beaten for
  ``PRESENCE_TTL_S`` are not listed, and the first live process to notice claims the dead one
  (``ZREM`` is atomic: exactly one sweeper wins), deletes its entries and broadcasts their leaves.

Diffs cross processes on the hub's ``presence`` channel (``hub.send`` / ``hub.listen``); each
process hands them to its local watchers (the Phoenix channels joined on that topic). Not through
``hub.broadcast_event``: plain sockets and SSE streams have no use for them, and with N sockets
joining a topic that would be N^2 frames.

Accepted races (written down, not fixed): a process whose event loop stalls longer than
``PRESENCE_TTL_S`` is swept as dead; on its next beat it notices it was removed and re-tracks its
entries (clients see a leave, then a join). After a Redis restart without persistence the same
re-track restores each live process's entries within one beat. Presence is advisory: when Redis is
unreachable ``track``/``list`` raise ``PresenceUnavailable`` and the caller goes on without it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from routing_app.metrics.instruments import presence_users, topic_namespace

log = logging.getLogger(__name__)

HUB_CHANNEL = "presence"  # the hub's generic pub/sub channel the diffs travel on

State = dict[str, dict]  # {key: {"metas": [meta, ...]}}
DiffCallback = Callable[[str, dict], None]  # (topic, {"joins": State, "leaves": State})


class PresenceUnavailable(Exception):
    """The presence store cannot be reached; presence is skipped, the socket keeps working."""


@dataclass(frozen=True)
class Tracked:
    """One tracked presence: what ``untrack`` needs."""

    topic: str
    key: str
    meta: dict  # includes phx_ref and online_at

    @property
    def ref(self) -> str:
        return self.meta["phx_ref"]


def new_ref() -> str:
    return secrets.token_urlsafe(9)


def one(key: str, meta: dict) -> State:
    return {key: {"metas": [meta]}}


def diff(joins: State | None = None, leaves: State | None = None) -> dict:
    return {"joins": joins or {}, "leaves": leaves or {}}


def users(state: State) -> list[dict]:
    """A summary per key for clients that do not speak phoenix's Presence (plain socket, HTTP):
    ``[{"key", "user_id", "username", "connections", "online_at"}]`` sorted by key."""
    out = []
    for key in sorted(state):
        metas = state[key]["metas"]
        first = min(metas, key=lambda m: m.get("online_at", 0))
        out.append(
            {
                "key": key,
                "user_id": first.get("user_id"),
                "username": first.get("username", ""),
                "connections": len(metas),
                "online_at": first.get("online_at"),
            }
        )
    return out


def presence_key(user_id: int | None, anonymous_ref: str) -> str:
    """The presence key of a principal: the user id, or one key per anonymous connection."""
    return str(user_id) if user_id is not None else f"anonymous:{anonymous_ref}"


class ConnectionPresence:
    """The presence of one plain-socket or SSE connection on its topic (``via`` names the
    protocol: "websocket" or "sse"), under the same key and meta shape as a Phoenix join (key =
    user id; meta ``{phx_ref, online_at, user_id, username, via}``), so ``presence_state`` /
    ``presence_diff``, the plain socket's ``presence`` answer and the HTTP endpoint list every
    protocol. Anonymous connections are not tracked (there is no one to show).

    Contract: ``await track()`` once the subscription is live (again is a no-op); ``await
    untrack()`` in the connection's ``finally``. The entry never outlives the connection, even
    when the connection's task is cancelled in the middle of either call: both run shielded, and
    ``untrack`` waits for a track still in flight. Presence is advisory: when the store is
    unreachable the connection goes on untracked (logged)."""

    __slots__ = ("topic", "user_id", "username", "via", "_pending", "_tracked")

    def __init__(self, topic: str, principal, via: str) -> None:
        self.topic = topic
        self.user_id: int | None = principal.user_id
        self.username: str = principal.username
        self.via = via
        self._pending: asyncio.Future | None = None  # a track in flight
        self._tracked: tuple[Presence, Tracked] | None = None

    async def track(self) -> None:
        if self.user_id is None or self._pending is not None or self._tracked is not None:
            return
        self._pending = asyncio.ensure_future(self._track())
        try:
            # Shielded: a cancelled caller leaves the track to finish, and untrack() undoes it.
            tracked = await asyncio.shield(self._pending)
        except asyncio.CancelledError:
            raise  # _pending stays for untrack()
        except BaseException:
            self._pending = None  # failed: nothing tracked, the error goes to the caller
            raise
        self._pending, self._tracked = None, tracked

    async def _track(self) -> tuple[Presence, Tracked] | None:
        backend = get_presence()
        meta = {"user_id": self.user_id, "username": self.username, "via": self.via}
        try:
            return backend, await backend.track(self.topic, presence_key(self.user_id, ""), meta)
        except PresenceUnavailable as exc:
            log.warning("presence: %s on %s not tracked: %s", self.via, self.topic, exc)
            return None

    async def untrack(self) -> None:
        pending, self._pending = self._pending, None
        tracked, self._tracked = self._tracked, None
        if pending is None and tracked is None:
            return
        await asyncio.shield(asyncio.ensure_future(_untrack_after(pending, tracked)))


async def _untrack_after(
    pending: asyncio.Future | None, tracked: tuple[Presence, Tracked] | None
) -> None:
    if pending is not None:
        await asyncio.wait((pending,))
        if pending.cancelled():
            return
        if pending.exception() is not None:  # its caller was cancelled: nobody else saw it
            log.error("presence: track failed", exc_info=pending.exception())
            return
        tracked = pending.result()
    if tracked is not None:
        backend, entry = tracked
        await backend.untrack(entry)


class Presence:
    """The interface and the part both backends share: local watchers and diff fan-in."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[DiffCallback]] = {}
        self._listening: asyncio.AbstractEventLoop | None = None

    # -- the store (per backend) ----------------------------------------------------------

    async def _put(self, tracked: Tracked) -> None:
        raise NotImplementedError

    async def _remove(self, tracked: Tracked) -> bool:
        """Remove the entry; True if it was there (only then is a leave broadcast)."""
        raise NotImplementedError

    async def list(self, topic: str) -> State:
        """The topic's current presences. Raises PresenceUnavailable."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop background work (tests; a server process simply exits)."""

    # -- the shared part ------------------------------------------------------------------

    async def track(self, topic: str, key: str, meta: dict) -> Tracked:
        """Add one presence under ``key`` and broadcast its join. ``meta`` gets ``phx_ref`` and
        ``online_at`` unless given. Raises PresenceUnavailable."""
        full = {"online_at": int(time.time()), **meta, "phx_ref": meta.get("phx_ref") or new_ref()}
        tracked = Tracked(topic, key, full)
        await self._put(tracked)
        presence_users(topic_namespace(topic)).inc()
        self._publish(topic, diff(joins=one(key, full)))
        return tracked

    async def untrack(self, tracked: Tracked) -> None:
        """Remove the presence and broadcast its leave; a presence already gone is no error.
        Never raises: an entry Redis could not remove is retried on this process's next beat
        (the dead-process sweep would never take it: the process is alive)."""
        presence_users(topic_namespace(tracked.topic)).dec()  # no connection holds it any more
        try:
            removed = await self._remove(tracked)
        except PresenceUnavailable as exc:
            log.warning("presence: could not untrack %s on %s: %s", tracked.key, tracked.topic, exc)
            return
        if removed:
            self._publish(tracked.topic, diff(leaves=one(tracked.key, tracked.meta)))

    async def watch(self, topic: str, callback: DiffCallback) -> None:
        """Call ``callback(topic, diff)`` in the loop for every diff of ``topic``, any process."""
        loop = asyncio.get_running_loop()
        if self._listening is not loop:
            # The hub starts afresh on a new loop (tests), forgetting listeners: listen again.
            from .hub import hub

            self._listening = loop
            self._watchers.clear()
            try:
                await hub.listen(HUB_CHANNEL, self._on_hub_message)
            except BaseException:
                self._listening = None
                raise
        self._watchers.setdefault(topic, set()).add(callback)

    def unwatch(self, topic: str, callback: DiffCallback) -> None:
        watchers = self._watchers.get(topic)
        if watchers is not None:
            watchers.discard(callback)
            if not watchers:
                del self._watchers[topic]

    def _publish(self, topic: str, change: dict) -> None:
        from .hub import hub

        hub.send(HUB_CHANNEL, {"topic": topic, **change})

    def _on_hub_message(self, payload: dict) -> None:
        topic = payload.get("topic")
        watchers = self._watchers.get(topic) if isinstance(topic, str) else None
        if not watchers:
            return
        change = diff(payload.get("joins"), payload.get("leaves"))
        for callback in list(watchers):
            callback(topic, change)


class MemoryPresence(Presence):
    """One process holds every presence (the embedded mode)."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, dict[str, Tracked]] = {}  # topic -> ref -> tracked

    async def _put(self, tracked: Tracked) -> None:
        self._entries.setdefault(tracked.topic, {})[tracked.ref] = tracked

    async def _remove(self, tracked: Tracked) -> bool:
        entries = self._entries.get(tracked.topic, {})
        removed = entries.pop(tracked.ref, None) is not None
        if not entries:
            self._entries.pop(tracked.topic, None)
        return removed

    async def list(self, topic: str) -> State:
        state: State = {}
        for tracked in self._entries.get(topic, {}).values():
            state.setdefault(tracked.key, {"metas": []})["metas"].append(tracked.meta)
        return state


_redis_backends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Presence] = (
    weakref.WeakKeyDictionary()
)
_memory_backend: MemoryPresence | None = None


def get_presence() -> Presence:
    """The process's presence backend, chosen by ``settings.REDIS_URL``. Call it in the loop."""
    global _memory_backend
    if not settings.REDIS_URL:
        if _memory_backend is None:
            _memory_backend = MemoryPresence()
        return _memory_backend
    loop = asyncio.get_running_loop()
    backend = _redis_backends.get(loop)
    if backend is None:
        from .presence_redis import RedisPresence  # the backend imports this module

        backend = RedisPresence(
            settings.REDIS_URL, settings.REDIS_PREFIX, float(settings.PRESENCE_TTL_S)
        )
        _redis_backends[loop] = backend
    return backend
