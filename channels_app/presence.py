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

Two backends behind one interface (CONVENTIONS 7), chosen by ``settings.REDIS_URL``:

- ``MemoryPresence`` for the embedded mode (one process).
- ``RedisPresence``: one hash per topic whose fields are tagged with the id of the process that
  tracked them; each process beats its id into a sorted set (score = time of the last beat) every
  ``PRESENCE_TTL_S / 3``. Entries of a process that has not beaten for ``PRESENCE_TTL_S`` are not
  listed, and the first live process to notice claims the dead one (``ZREM`` is atomic: exactly one
  sweeper wins), deletes its entries and broadcasts their leaves.

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
import json
import logging
import os
import secrets
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings

log = logging.getLogger(__name__)

HUB_CHANNEL = "presence"  # the hub's generic pub/sub channel the diffs travel on
REDIS_POOL_SIZE = 20  # connections per process; callers wait for one instead of failing
REDIS_POOL_WAIT_S = 5.0

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
        self._publish(topic, diff(joins=one(key, full)))
        return tracked

    async def untrack(self, tracked: Tracked) -> None:
        """Remove the presence and broadcast its leave; a presence already gone is no error.
        Never raises: an entry Redis could not remove is retried on this process's next beat
        (the dead-process sweep would never take it: the process is alive)."""
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


@dataclass
class _RedisKeys:
    prefix: str

    @property
    def processes(self) -> str:
        return f"{self.prefix}:presence:processes"

    def topic(self, topic: str) -> str:
        return f"{self.prefix}:presence:topic:{topic}"

    def process_topics(self, process_id: str) -> str:
        return f"{self.prefix}:presence:process-topics:{process_id}"


def default_process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class _Local:
    tracked: dict[str, Tracked] = field(default_factory=dict)  # ref -> tracked
    per_topic: dict[str, int] = field(default_factory=dict)  # topic -> how many refs
    # Entries Redis may still hold though no connection has them (an untrack, or a track whose
    # reply was lost, failed to reach it): removed on the next beat.
    orphans: dict[str, Tracked] = field(default_factory=dict)  # ref -> tracked


class RedisPresence(Presence):
    """Presence shared by every process through Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        ttl_s: float,
        process_id: str | None = None,
        clock: Callable[[], float] = time.time,
        beat: bool = True,
    ) -> None:
        super().__init__()
        import redis.asyncio as aioredis

        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_POOL_SIZE, timeout=REDIS_POOL_WAIT_S
        )
        self.redis = aioredis.Redis(connection_pool=pool, decode_responses=False)
        self.keys = _RedisKeys(prefix)
        self.ttl_s = ttl_s
        self.process_id = process_id or default_process_id()
        self.clock = clock
        self._beat_enabled = beat
        self._beat_task: asyncio.Task | None = None
        self._local = _Local()

    def _field(self, ref: str) -> str:
        return f"{self.process_id}|{ref}"

    async def _redis(self, call):
        import redis

        try:
            return await call
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise PresenceUnavailable(f"redis: {exc}") from exc

    async def _ensure_beating(self) -> None:
        if self._beat_task is None or self._beat_task.done():
            await self.beat()
            if self._beat_enabled:
                self._beat_task = asyncio.get_running_loop().create_task(
                    self._beat_forever(), name="presence-beat"
                )

    async def _put(self, tracked: Tracked) -> None:
        await self._ensure_beating()
        self._remember(tracked)
        value = json.dumps({"k": tracked.key, "m": tracked.meta}, separators=(",", ":"))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.topic(tracked.topic), self._field(tracked.ref), value)
        pipe.sadd(self.keys.process_topics(self.process_id), tracked.topic)
        try:
            await self._redis(pipe.execute())
        except PresenceUnavailable:
            self._forget(tracked)
            self._local.orphans[tracked.ref] = tracked  # the write may have landed
            raise

    async def _remove(self, tracked: Tracked) -> bool:
        self._forget(tracked)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.keys.topic(tracked.topic), self._field(tracked.ref))
        if tracked.topic not in self._local.per_topic:
            pipe.srem(self.keys.process_topics(self.process_id), tracked.topic)
        try:
            results = await self._redis(pipe.execute())
        except PresenceUnavailable:
            self._local.orphans[tracked.ref] = tracked
            raise
        return bool(results[0])

    def _remember(self, tracked: Tracked) -> None:
        self._local.tracked[tracked.ref] = tracked
        counts = self._local.per_topic
        counts[tracked.topic] = counts.get(tracked.topic, 0) + 1

    def _forget(self, tracked: Tracked) -> None:
        if self._local.tracked.pop(tracked.ref, None) is None:
            return
        counts = self._local.per_topic
        counts[tracked.topic] -= 1
        if not counts[tracked.topic]:
            del counts[tracked.topic]

    async def list(self, topic: str) -> State:
        raw = await self._redis(self.redis.hgetall(self.keys.topic(topic)))
        if not raw:
            return {}
        entries = [(f.decode().split("|", 1)[0], v) for f, v in raw.items()]
        others = sorted({pid for pid, _ in entries if pid != self.process_id})
        alive = {self.process_id}
        if others:
            scores = await self._redis(self.redis.zmscore(self.keys.processes, others))
            oldest = self.clock() - self.ttl_s
            alive |= {pid for pid, s in zip(others, scores, strict=True) if s and s >= oldest}
        state: State = {}
        for pid, value in entries:
            if pid in alive:
                entry = json.loads(value)
                state.setdefault(entry["k"], {"metas": []})["metas"].append(entry["m"])
        for presence in state.values():
            presence["metas"].sort(key=lambda m: (m.get("online_at", 0), m["phx_ref"]))
        return state

    async def beat(self) -> None:
        """Renew this process's heartbeat, then sweep dead processes. If the heartbeat had
        vanished (swept while stalled, or Redis restarted), put every local entry back."""
        added = await self._redis(
            self.redis.zadd(self.keys.processes, {self.process_id: self.clock()})
        )
        if added and self._local.tracked:
            await self._retrack_all()
        if self._local.orphans:
            await self._remove_orphans()
        await self.sweep()

    async def _remove_orphans(self) -> None:
        orphans = list(self._local.orphans.values())
        pipe = self.redis.pipeline(transaction=False)
        for tracked in orphans:
            pipe.hdel(self.keys.topic(tracked.topic), self._field(tracked.ref))
        results = await self._redis(pipe.execute())
        for tracked, removed in zip(orphans, results, strict=True):
            self._local.orphans.pop(tracked.ref, None)
            if removed:
                self._publish(tracked.topic, diff(leaves=one(tracked.key, tracked.meta)))
        # process-topics may keep these topics: harmless (a sweep finds no field there)

    async def _retrack_all(self) -> None:
        log.warning("presence: heartbeat of %s had vanished; re-tracking", self.process_id)
        pipe = self.redis.pipeline(transaction=False)
        for tracked in self._local.tracked.values():
            value = json.dumps({"k": tracked.key, "m": tracked.meta}, separators=(",", ":"))
            pipe.hset(self.keys.topic(tracked.topic), self._field(tracked.ref), value)
            pipe.sadd(self.keys.process_topics(self.process_id), tracked.topic)
        await self._redis(pipe.execute())
        for tracked in self._local.tracked.values():
            self._publish(tracked.topic, diff(joins=one(tracked.key, tracked.meta)))

    async def sweep(self) -> int:
        """Remove the entries of every process whose heartbeat is older than the TTL, broadcasting
        their leaves. Returns how many entries went. Safe to run in every process at once."""
        oldest = self.clock() - self.ttl_s
        dead = await self._redis(
            self.redis.zrangebyscore(self.keys.processes, "-inf", f"({oldest}")
        )
        removed = 0
        for raw_pid in dead:
            pid = raw_pid.decode()
            if pid == self.process_id:
                continue
            # The claim: only the sweeper whose ZREM removed the member cleans up after it.
            if await self._redis(self.redis.zrem(self.keys.processes, pid)):
                removed += await self._clean_process(pid)
        return removed

    async def _clean_process(self, pid: str) -> int:
        topics_key = self.keys.process_topics(pid)
        topics = await self._redis(self.redis.smembers(topics_key))
        removed = 0
        for raw_topic in topics:
            topic = raw_topic.decode()
            key = self.keys.topic(topic)
            raw = await self._redis(self.redis.hgetall(key))
            fields = [f for f in raw if f.decode().startswith(f"{pid}|")]
            if not fields:
                continue
            await self._redis(self.redis.hdel(key, *fields))
            leaves: State = {}
            for f in fields:
                entry = json.loads(raw[f])
                leaves.setdefault(entry["k"], {"metas": []})["metas"].append(entry["m"])
            removed += len(fields)
            self._publish(topic, diff(leaves=leaves))
        await self._redis(self.redis.delete(topics_key))
        if removed:
            log.info("presence: removed %d entries of dead process %s", removed, pid)
        return removed

    async def _beat_forever(self) -> None:
        interval = self.ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.beat()
            except PresenceUnavailable as exc:
                log.warning("presence: heartbeat failed, retrying in %.0f s: %s", interval, exc)

    async def close(self) -> None:
        if self._beat_task is not None:
            self._beat_task.cancel()
            try:
                await self._beat_task
            except asyncio.CancelledError:
                pass
            self._beat_task = None
        await self.redis.aclose(close_connection_pool=True)  # the pool is ours alone


# Redis: one backend per event loop, since redis.asyncio connections belong to the loop that opened
# them (a server process has one loop; tests have one per test). Memory: one per process, since the
# state is the process's (Django runs a sync test client's async views in a fresh loop per request).
_redis_backends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RedisPresence] = (
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
        backend = RedisPresence(
            settings.REDIS_URL, settings.REDIS_PREFIX, float(settings.PRESENCE_TTL_S)
        )
        _redis_backends[loop] = backend
    return backend
