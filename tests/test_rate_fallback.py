"""Ingest's rate limit while its Redis is away (routing_app/rate_fallback.py): posts are still
accepted, each process counting its share of the key's rate (the rate divided by
INGEST_SERVER_PROCESSES), with one warning when the outage starts and one when it ends."""

from __future__ import annotations

import logging

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings

from routing_app import rate_fallback
from routing_app.rate_fallback import RateFallback
from tests.apiclient import bearer, create_key
from tests.servers import free_port

URL = "/api/v1/notifications"
ON = "the rate limiter's store does not answer"
OFF = "the rate limiter's store answers again"


@pytest.fixture
def redis_away(settings, monkeypatch):
    """The rate limiter's cache points at a port nothing listens on; every failed store is
    tried again at the next request (no probe interval)."""
    monkeypatch.setattr(rate_fallback, "PROBE_EVERY_S", 0.0)
    working = settings.CACHES
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
        }
    }
    yield lambda: setattr(settings, "CACHES", working)
    rate_fallback.fallback.store_answered()  # whatever the test did, the next one starts clean


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not django_settings.REDIS_URL, reason="the embedded mode's cache is in memory")
async def test_with_redis_away_posts_are_accepted_within_the_processes_share(
    api, settings, redis_away, caplog
):
    settings.INGEST_SERVER_PROCESSES = 2
    _, raw = await sync_to_async(create_key)("shared", rate="4/h")
    post = {"topic": "fallback.t", "event": "tick", "data": {}}

    with caplog.at_level(logging.WARNING, logger="routing_app.rate_fallback"):
        answers = [await api.post(URL, json=post, headers=bearer(raw)) for _ in range(3)]
        redis_away()  # Redis is back
        back = await api.post(URL, json=post, headers=bearer(raw))

    assert [a.status_code for a in answers] == [202, 202, 429]  # 4/h over 2 processes: 2
    assert int(answers[2].headers["Retry-After"]) > 0
    assert back.status_code == 202  # the shared counter knows nothing of the outage's posts
    messages = [r.getMessage() for r in caplog.records]
    assert sum(ON in m for m in messages) == 1, messages  # once per outage, not per request
    assert "1/2 of each API key's ingest rate" in next(m for m in messages if ON in m)
    assert sum(OFF in m for m in messages) == 1, messages


def test_a_share_is_the_rate_divided_by_the_processes_and_at_least_one(settings):
    settings.INGEST_SERVER_PROCESSES = 3
    fallback = RateFallback()
    assert [fallback.take("k1", "7/m", 1)[0] for _ in range(3)] == [1, 1, 0]  # 7 // 3 = 2
    assert fallback.take("k2", "1/m", 5)[0] == 1  # never less than one
    fits, retry_after_s = fallback.take("k2", "1/m", 1)
    assert fits == 0 and 1 <= retry_after_s <= 60
