"""Presence shared by every server process through Redis: the production backend of
``presence.py`` (its module docstring describes the scheme and the accepted races)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .presence import Presence, PresenceUnavailable, State, Tracked, diff, one

log = logging.getLogger(__name__)

REDIS_POOL_SIZE = 20  # connections per process; callers wait for one instead of failing
REDIS_POOL_WAIT_S = 5.0


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
