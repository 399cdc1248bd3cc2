"""POST /api/v1/tokens: who may mint a client token for whom, and the CORS answers a browser app on
another origin (the Nuxt app) gets from the API."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
from django.conf import settings
from django.test import Client

from channels_app import tokens
from routing_app.models import ApiKey

URL = "/api/v1/tokens"
APP_ORIGIN = "http://localhost:3000"  # in NOTIFY_ALLOWED_ORIGINS by default
EVIL_ORIGIN = "https://evil.example"
# API keys and users are read on routing_app's database threads, which see only committed rows.
KEYED = pytest.mark.django_db(transaction=True)


def post(client: Client, body: dict, **headers):
    return client.post(URL, body, content_type="application/json", headers=headers)


def browser(user) -> tuple[Client, str]:
    """A logged-in browser that enforces CSRF like a real one, and its CSRF token."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    answer = client.get("/api/v1/csrf")
    assert answer.status_code == 200
    return client, answer.json()["csrf_token"]


def expires_in_s(answer) -> float:
    return datetime.fromisoformat(answer.json()["expires_at"]).timestamp() - time.time()


@pytest.mark.django_db
def test_session_user_gets_a_token_for_themself(subscriber):
    client, csrf = browser(subscriber)
    answer = post(client, {"user": "sam"}, **{"X-CSRFToken": csrf})
    assert answer.status_code == 200, answer.content
    assert set(answer.json()) == {"token", "expires_at"}
    assert tokens.verify(answer.json()["token"]) == subscriber.pk
    assert 0 < expires_in_s(answer) <= settings.TOKEN_TTL_S
    assert answer.json()["expires_at"].endswith(("Z", "+00:00"))  # ISO 8601 with its zone


@pytest.mark.django_db
def test_ttl_sets_the_expiry(subscriber):
    client, csrf = browser(subscriber)
    answer = post(client, {"user": "sam", "ttl": 60}, **{"X-CSRFToken": csrf})
    assert answer.status_code == 200
    assert 55 <= expires_in_s(answer) <= 60


@pytest.mark.django_db
def test_session_post_without_csrf_token_is_refused(subscriber):
    client, _ = browser(subscriber)
    answer = post(client, {"user": "sam"})
    assert answer.status_code == 403
    assert "CSRF" in answer.json()["detail"]


@pytest.mark.django_db
def test_session_user_may_not_ask_for_another_user(subscriber, outsider):
    client, csrf = browser(subscriber)
    answer = post(client, {"user": "olga"}, **{"X-CSRFToken": csrf})
    assert answer.status_code == 403
    assert "own user" in answer.json()["detail"]


@pytest.mark.django_db
def test_anonymous_request_is_unauthorized(subscriber):
    answer = post(Client(), {"user": "sam"})
    assert answer.status_code == 401
    assert "API key" in answer.json()["detail"]


@KEYED
def test_api_key_with_tokens_scope_mints_for_any_user_without_csrf(api_key, outsider):
    _, raw = api_key
    client = Client(enforce_csrf_checks=True)
    answer = post(client, {"user": "olga", "ttl": 120}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 200, answer.content
    assert tokens.verify(answer.json()["token"]) == outsider.pk


@KEYED
def test_api_key_without_tokens_scope_is_forbidden(subscriber):
    key = ApiKey(name="ingest-only", scopes=["ingest"])
    raw = key.set_new_key()
    key.save()
    answer = post(Client(), {"user": "sam"}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 403
    assert "tokens" in answer.json()["detail"]


@KEYED
def test_invalid_api_key_is_unauthorized(api_key, subscriber):
    answer = post(Client(), {"user": "sam"}, Authorization="Bearer nk_nope_forged")
    assert answer.status_code == 401


@KEYED
def test_unknown_or_inactive_user_is_not_found(api_key, outsider):
    _, raw = api_key
    answer = post(Client(), {"user": "nobody"}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 404
    assert "nobody" in answer.json()["detail"]
    outsider.is_active = False
    outsider.save()
    assert post(Client(), {"user": "olga"}, Authorization=f"Bearer {raw}").status_code == 404


@KEYED
@pytest.mark.parametrize("ttl", [0, -5, settings.TOKEN_MAX_TTL_S + 1])
def test_ttl_out_of_range_is_a_bad_request(api_key, subscriber, ttl):
    _, raw = api_key
    answer = post(Client(), {"user": "sam", "ttl": ttl}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 400
    assert "ttl" in answer.json()["detail"]


@KEYED
def test_missing_user_field_is_a_bad_request(api_key):
    _, raw = api_key
    answer = post(Client(), {"ttl": 60}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 400
    assert any(error["loc"][-1] == "user" for error in answer.json()["errors"])


@KEYED
@pytest.mark.parametrize(
    ("user", "reason"),
    [
        ("sam\x00", "NUL"),  # Postgres refuses NUL in text: was a DataError, 500
        ("sam\ud800", "unicode string"),  # UTF-8 cannot encode it: was a UnicodeEncodeError
        ("s" * 151, "at most 150 characters"),  # auth's username column
        ("", "at least 1 character"),
    ],
)
def test_user_name_the_database_cannot_hold_is_a_bad_request_saying_why(api_key, user, reason):
    _, raw = api_key
    answer = post(Client(), {"user": user}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 400, answer.content
    assert answer["Content-Type"].startswith("application/json")
    [error] = answer.json()["errors"]
    assert error["loc"] == ["user"] and reason in error["msg"]


@KEYED
@pytest.mark.parametrize("ttl", [False, True, "60", 1.5])
def test_ttl_that_is_not_a_whole_json_number_is_a_bad_request(api_key, subscriber, ttl):
    _, raw = api_key
    answer = post(Client(), {"user": "sam", "ttl": ttl}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 400, answer.content
    assert answer.json()["errors"][0]["loc"] == ["ttl"]


@KEYED
def test_a_50_mb_body_gets_413_in_json(api_key):
    _, raw = api_key
    body = json.dumps({"user": "x" * (50 * 1024 * 1024)})
    answer = Client().post(
        URL, body, content_type="application/json", headers={"Authorization": f"Bearer {raw}"}
    )
    assert answer.status_code == 413
    assert "limit" in answer.json()["detail"]


@KEYED
def test_a_body_not_declared_json_gets_415(api_key):
    _, raw = api_key
    answer = Client().post(
        URL, "user=sam", content_type="text/plain", headers={"Authorization": f"Bearer {raw}"}
    )
    assert answer.status_code == 415
    assert "application/json" in answer.json()["detail"]


@KEYED
def test_an_unexpected_failure_is_a_json_500_with_debug_off(api_key, subscriber, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("signing backend down")

    monkeypatch.setattr(tokens, "mint", broken)
    assert not settings.DEBUG
    _, raw = api_key
    answer = post(Client(), {"user": "sam"}, Authorization=f"Bearer {raw}")
    assert answer.status_code == 500
    assert answer["Content-Type"].startswith("application/json")
    assert "log" in answer.json()["detail"]
    assert "signing backend down" not in answer.content.decode(), "no internals in the answer"


# --- CORS: the Nuxt app on another origin -----------------------------------------------------


def preflight(origin: str, request_headers: str = "content-type, x-csrftoken"):
    return Client().options(
        URL,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": request_headers,
        },
    )


def test_preflight_from_allowed_origin_allows_credentials_and_csrf_header():
    answer = preflight(APP_ORIGIN)
    assert answer.status_code == 200
    assert answer["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert answer["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in answer["Access-Control-Allow-Methods"]
    allowed = {h.strip() for h in answer["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "x-csrftoken", "authorization"} <= allowed


def test_preflight_from_other_origin_gets_no_cors_grant():
    answer = preflight(EVIL_ORIGIN)
    assert "Access-Control-Allow-Origin" not in answer
    assert "Access-Control-Allow-Credentials" not in answer


@pytest.mark.django_db
def test_cross_origin_session_post_from_allowed_origin_works(subscriber):
    """The Nuxt app's flow: fetch the CSRF token (credentials: include), then POST with it; the
    Origin is checked against CSRF_TRUSTED_ORIGINS."""
    client, csrf = browser(subscriber)
    answer = post(client, {"user": "sam"}, **{"X-CSRFToken": csrf, "Origin": APP_ORIGIN})
    assert answer.status_code == 200, answer.content
    assert answer["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert answer["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.django_db
def test_cross_origin_session_post_from_other_origin_is_refused(subscriber):
    client, csrf = browser(subscriber)
    answer = post(client, {"user": "sam"}, **{"X-CSRFToken": csrf, "Origin": EVIL_ORIGIN})
    assert answer.status_code == 403
    assert "Access-Control-Allow-Origin" not in answer


@pytest.mark.django_db
def test_csrf_token_is_readable_only_by_allowed_origins(subscriber):
    ok = Client().get("/api/v1/csrf", headers={"Origin": APP_ORIGIN})
    assert ok["Access-Control-Allow-Origin"] == APP_ORIGIN
    evil = Client().get("/api/v1/csrf", headers={"Origin": EVIL_ORIGIN})
    assert "Access-Control-Allow-Origin" not in evil


@pytest.fixture(autouse=True, scope="module")
def _close_database_threads():
    """routing_app's DB threads keep connections open; close them so the test database can go."""
    yield
    from routing_app import db_threads

    db_threads.close_all()


@KEYED
def test_token_minting_is_rate_limited_per_requester(settings, api_key, subscriber):
    """django-ratelimit's fixed window at TOKEN_RATE: past it, 429 with Retry-After."""
    from django.core.cache import cache
    from django.test import Client

    cache.clear()
    settings.TOKEN_RATE = "3/m"
    client = Client()
    headers = {"Authorization": f"Bearer {api_key[1]}"}
    answers = [
        client.post(
            "/api/v1/tokens",
            {"user": subscriber.username},
            content_type="application/json",
            headers=headers,
        )
        for _ in range(4)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert int(answers[-1]["Retry-After"]) >= 1
    assert "rate" in answers[-1].json()["detail"]
