"""API keys at the HTTP edge: authenticate ``Authorization: Bearer <key>``, authorize sources and
topics, rate-limit per key, and record use.

- Authenticate: the raw key ``nk_<prefix>_<secret>`` (see ``models.ApiKey``) is looked up by its
  prefix; the SHA-256 of the whole raw key is compared with ``hmac.compare_digest``.
- Cache: a key's row is kept in process memory for ``KEY_CACHE_S`` so a request costs no query.
  Saving or deleting an ``ApiKey`` clears this process's entry at once (signal); another process
  sees a revocation within ``KEY_CACHE_S`` seconds. That delay is the accepted staleness.
- ``last_used_at`` is written at most once per ``LAST_USED_EVERY_S`` per key and process, not on
  every request.
- Rate: a fixed window per key (django-ratelimit's scheme, see ``take``), ``ApiKey.rate`` or
  ``settings.INGEST_RATE``; every request counts once (a batch is one request, and holds at most
  1000 notifications). While the shared counter's Redis is away, each process counts its share
  of the rate (rate_fallback.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from dataclasses import dataclass

import redis
from django.conf import settings
from django.core.cache import caches
from django.db.models.signals import post_delete, post_save
from django.http import HttpRequest
from django.utils import timezone
from django_redis.cache import RedisCache
from ninja.errors import AuthenticationError, AuthorizationError, HttpError
from ninja.security import HttpBearer

from . import db_threads
from .ingest_deadline import (
    UNAVAILABLE_RETRY_AFTER_S,
    NotStored,
    deadline_of,
    missed,
    remaining_s,
)
from .models import RATE_RE, ApiKey
from .rate_fallback import fallback
from .topics import matches_any

KEY_CACHE_S = 5.0  # how long another process may still accept a revoked key
LAST_USED_EVERY_S = 60.0  # last_used_at precision; saves a write per request
RATE_GROUP = "notify-api-key"
RATE_KEY_FUDGE_S = 5  # a window's counter outlives the window a little, as django-ratelimit's
PERIOD_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs of an API key row (immutable, safe to share across threads)."""

    id: int
    name: str
    prefix: str
    hashed_key: str
    scopes: frozenset[str]
    sources: frozenset[str]  # empty = every source
    topic_patterns: tuple[str, ...]  # empty = every topic
    rate: str
    revoked: bool

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.pk,
            name=row.name,
            prefix=row.prefix,
            hashed_key=row.hashed_key,
            scopes=frozenset(row.scopes or ()),
            sources=frozenset(row.allowed_sources or ()),
            topic_patterns=tuple(row.topic_patterns()),
            rate=row.rate or settings.INGEST_RATE,
            revoked=row.revoked,
        )

    def allows_source(self, source: str) -> bool:
        return not self.sources or source in self.sources

    def allows_topic(self, topic: str) -> bool:
        return not self.topic_patterns or matches_any(list(self.topic_patterns), topic)


class RateLimited(HttpError):
    """429: the key is over its rate; ``retry_after_s`` is when its window ends."""

    def __init__(self, retry_after_s: int, rate: str):
        super().__init__(429, f"this API key is over its rate of {rate}; retry later")
        self.retry_after_s = retry_after_s


class LimiterUnavailable(HttpError):
    """503: the token limiter's store (Redis) does not answer and it fails closed (ingest's
    limiter counts its own share instead: ``take``)."""

    def __init__(self) -> None:
        super().__init__(503, "the rate limiter is unavailable; retry later")
        self.retry_after_s = UNAVAILABLE_RETRY_AFTER_S


_cache: dict[str, tuple[float, KeyInfo | None]] = {}
_last_touch: dict[int, float] = {}


def forget_cached_keys(**_kwargs) -> None:
    _cache.clear()


post_save.connect(forget_cached_keys, sender=ApiKey, dispatch_uid="apikeys-cache-save")
post_delete.connect(forget_cached_keys, sender=ApiKey, dispatch_uid="apikeys-cache-delete")


def parse_prefix(raw_key: str) -> str | None:
    """The lookup prefix of a raw key ``nk_<prefix>_<secret>``, or None if it has another shape."""
    parts = raw_key.split("_", 2)
    if len(parts) != 3 or parts[0] != "nk" or not parts[1] or not parts[2]:
        return None
    return parts[1]


def load_key(prefix: str) -> KeyInfo | None:
    """Read a key by prefix from the database (sync; call from a DB thread)."""
    row = ApiKey.objects.filter(prefix=prefix).first()
    return KeyInfo.from_row(row) if row else None


def _cached(prefix: str) -> tuple[bool, KeyInfo | None]:
    entry = _cache.get(prefix)
    if entry and time.monotonic() - entry[0] < KEY_CACHE_S:
        return True, entry[1]
    return False, None


def verify(raw_key: str, info: KeyInfo | None) -> KeyInfo:
    """Raise AuthenticationError (401) unless ``info`` is the live key ``raw_key`` names."""
    digest = hashlib.sha256(raw_key.encode()).hexdigest()
    if info is None or not hmac.compare_digest(digest, info.hashed_key):
        raise AuthenticationError(401, "this API key is not valid")
    if info.revoked:
        raise AuthenticationError(401, "this API key was revoked")
    return info


async def authenticate_raw(raw_key: str, deadline: float) -> KeyInfo:
    """Return the key ``raw_key`` names; raise AuthenticationError (401) if none, or revoked, and
    NotStored (503) if the database does not answer by ``deadline`` (``time.monotonic()``).

    Served from the process cache when fresh, else one query on a DB thread.
    """
    prefix = parse_prefix(raw_key)
    if prefix is None:
        raise AuthenticationError(401, "this API key is not valid")
    hit, info = _cached(prefix)
    if not hit:
        try:
            info = await asyncio.wait_for(db_threads.run(load_key, prefix), remaining_s(deadline))
        except TimeoutError:
            missed("not_stored")
            raise NotStored() from None
        if info is not None:  # unknown prefixes are not cached: a key created now works now
            _cache[prefix] = (time.monotonic(), info)
    return verify(raw_key, info)


class ApiKeyAuth(HttpBearer):
    """django-ninja auth: ``Authorization: Bearer <key>``; ``request.auth`` becomes a KeyInfo.

    ``scope=None`` accepts a key with any scope. 401 without a valid live key, 403 without the
    scope; each answer says why.
    """

    def __init__(self, scope: str | None = None):
        super().__init__()
        self.scope = scope

    async def __call__(self, request: HttpRequest) -> KeyInfo:  # type: ignore[override]
        header = request.headers.get(self.header, "")
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise AuthenticationError(401, "send an API key as 'Authorization: Bearer <key>'")
        return await self.authenticate(request, raw.strip())

    async def authenticate(self, request: HttpRequest, token: str) -> KeyInfo:
        return self.scoped(await authenticate_raw(token, deadline_of(request)))

    def scoped(self, info: KeyInfo) -> KeyInfo:
        """``info`` when the key has this auth's scope; else 403 saying which it lacks."""
        if self.scope and self.scope not in info.scopes:
            raise AuthorizationError(403, f"this API key lacks the '{self.scope}' scope")
        return info


def take(info: KeyInfo, requests: int = 1) -> tuple[int, int]:
    """Count ``requests`` against the key's rate; return (how many of them fit, the first ones;
    seconds until the window ends). Sync (cache calls): call it from a DB thread.

    A fixed window per key, as django-ratelimit keeps it (``cache.add`` then an atomic
    ``cache.incr`` on RATELIMIT_USE_CACHE), but counting several requests with one ``incr``:
    the group commit (group_commit.py) counts a whole group's requests per key in two round trips
    instead of two per request. When the cache store does not answer, everything fits with
    ``RATELIMIT_FAIL_OPEN``; else this process counts its own share of the rate until the store
    answers again (rate_fallback.py). Never raises for an unreachable store.
    """
    limit, period_s = parse_rate(info.rate)
    now = time.time()
    window = int(now // period_s)
    retry_after_s = max(1, math.ceil((window + 1) * period_s - now))
    if not fallback.should_probe():
        return _take_unshared(info, requests, retry_after_s)
    cache_key = f"rate:{RATE_GROUP}:{info.prefix}:{period_s}:{window}"
    try:
        total = _count(cache_key, requests, period_s + RATE_KEY_FUDGE_S)
    except redis.RedisError as exc:
        fallback.store_failed(exc)
        return _take_unshared(info, requests, retry_after_s)
    fallback.store_answered()
    return max(0, min(requests, limit - (total - requests))), retry_after_s


def _count(cache_key: str, requests: int, ttl_s: int) -> int:
    """Add ``requests`` to the window's counter (created with ``ttl_s``); return the new total.

    On django-redis, ``SET NX EX`` and ``INCRBY`` go in one pipeline: one round trip, where
    ``cache.add`` then ``cache.incr`` take two and django-redis's ``incr`` sends a Lua script
    each time (measured at light load: 0.82 ms per group before, the largest share of a single
    post's answer after the database). The counter is the same integer key ``cache.incr`` keeps.
    """
    cache = caches[settings.RATELIMIT_USE_CACHE]
    if isinstance(cache, RedisCache):
        key = cache.make_key(cache_key)
        with cache.client.get_client(write=True).pipeline(transaction=False) as pipe:
            pipe.set(key, 0, ex=ttl_s, nx=True)
            pipe.incrby(key, requests)
            return pipe.execute()[1]
    cache.add(cache_key, 0, timeout=ttl_s)
    try:
        return cache.incr(cache_key, requests)
    except ValueError:  # the key expired between add and incr
        cache.add(cache_key, requests, timeout=ttl_s)
        return requests


def _take_unshared(info: KeyInfo, requests: int, retry_after_s: int) -> tuple[int, int]:
    if settings.RATELIMIT_FAIL_OPEN:
        return requests, retry_after_s
    return fallback.take(info.prefix, info.rate, requests)


def check_rate(info: KeyInfo) -> None:
    """Count one request against the key's rate; raise RateLimited (429) when over it."""
    fits, retry_after_s = take(info)
    if not fits:
        raise RateLimited(retry_after_s, info.rate)


def parse_rate(rate: str) -> tuple[int, int]:
    """``"100/s"``, ``"600/m"``, ``"5/10s"`` -> (count, period in seconds)."""
    count, multiplier, unit = RATE_RE.match(rate).groups()
    return int(count), int(multiplier or 1) * PERIOD_S[unit]


def touch(info: KeyInfo) -> None:
    """Record use in ``last_used_at``, at most once per LAST_USED_EVERY_S (sync, DB thread)."""
    now = time.monotonic()
    last = _last_touch.get(info.id)
    if last is not None and now - last < LAST_USED_EVERY_S:
        return
    _last_touch[info.id] = now
    ApiKey.objects.filter(pk=info.id).update(last_used_at=timezone.now())
