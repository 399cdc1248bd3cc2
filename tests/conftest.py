"""Shared fixtures: named personas, an API key, and the check that CI has its real services."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest
from django.conf import settings


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def pytest_sessionstart(session) -> None:
    """In CI a missing service is a failure, never a skip."""
    if os.environ.get("CI", "").lower() != "true":
        return
    missing = []
    if not settings.USING_POSTGRES:
        missing.append("DATABASE_URL is not a Postgres URL")
    elif not _reachable(os.environ["DATABASE_URL"], 5432):
        missing.append("Postgres at DATABASE_URL does not answer")
    if not settings.REDIS_URL:
        missing.append("REDIS_URL is not set")
    elif not _reachable(settings.REDIS_URL, 6379):
        missing.append("Redis at REDIS_URL does not answer")
    if missing:
        pytest.exit("CI needs its real services: " + "; ".join(missing), returncode=3)


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing():
    """PBKDF2 takes ~0.8 s per hash on this 2-core machine and every persona fixture hashes a
    password: tests hash with MD5 (real passwords keep the default hashers)."""
    from django.contrib.auth.hashers import get_hashers, get_hashers_by_algorithm

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_hashers.cache_clear()
    get_hashers_by_algorithm.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Per-process caches of routes, topic rules and socket principals must not outlive a test's
    rolled-back rows (SQLite reuses user ids)."""
    from channels_app import authz, socket_auth
    from routing_app import router

    router.invalidate_routes()
    authz.invalidate_rules()
    socket_auth.forget_principals()
    yield
    router.invalidate_routes()
    authz.invalidate_rules()
    socket_auth.forget_principals()


@pytest.fixture(autouse=True)
def _default_topic_rules(request, django_db_setup, django_db_blocker):
    """Transactional tests end with a flush, which also deletes the fresh-install topic rules and
    alert rules that data migrations created: put them back, so every test starts from a fresh
    install."""
    import importlib

    from django.apps import apps

    from channels_app.models import TopicRule
    from routing_app.models import AlertRule

    # Only for tests with database access: for the others the connection may still point at the
    # real database (an error where it does not exist, or rules written into it where it does).
    uses_db = request.node.get_closest_marker("django_db") is not None or bool(
        {"db", "transactional_db"} & set(request.fixturenames)
    )
    if uses_db:
        migration = importlib.import_module("channels_app.migrations.0002_default_topic_rules")
        alert_rules = importlib.import_module("routing_app.migrations.0004_seed_alert_rules")
        with django_db_blocker.unblock():
            if not TopicRule.objects.exists():
                migration.create_defaults(apps, None)
            if not AlertRule.objects.exists():
                alert_rules.seed(apps, None)
    yield


@pytest.fixture
def admin_user(django_user_model):
    """Alice, a superuser who runs the system."""
    return django_user_model.objects.create_superuser("alice", "alice@example.com", "pw-alice")


@pytest.fixture
def operator(django_user_model):
    """Oscar, staff: watches dashboards, may join every topic."""
    return django_user_model.objects.create_user(
        "oscar", "oscar@example.com", "pw-oscar", is_staff=True
    )


@pytest.fixture
def subscriber(django_user_model):
    """Sam, a logged-in user who reads topics."""
    return django_user_model.objects.create_user("sam", "sam@example.com", "pw-sam")


@pytest.fixture
def outsider(django_user_model):
    """Olga, a user with no rights beyond the defaults."""
    return django_user_model.objects.create_user("olga", "olga@example.com", "pw-olga")


@pytest.fixture
def api_key(db):
    """An API key with every scope; returns (row, raw key)."""
    from routing_app.models import ApiKey

    key = ApiKey(name="test-client", scopes=list(ApiKey.SCOPES))
    raw = key.set_new_key()
    key.save()
    return key, raw


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's, plus: before the test database is dropped, close the connections held by
    threads other than the tests' own (routing_app.db_threads' pool, asgiref's one thread for
    sync_to_async, i.e. Django's async ORM), which would otherwise keep it "in use"."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    from routing_app import db_threads

    with django_db_blocker.unblock():
        db_threads.close_all()
        SyncToAsync.single_thread_executor.submit(connections.close_all).result()
    _end_other_sessions(connections["default"].settings_dict)


def _end_other_sessions(database: dict) -> None:
    """End the sessions still open on the test database (a connection some other thread opened
    and kept): Postgres refuses to drop a database in use, after waiting 5 s for it."""
    if database["ENGINE"] != "django.db.backends.postgresql":
        return
    import psycopg

    server = {"host": database["HOST"], "port": database["PORT"], "user": database["USER"]}
    server = {k: v for k, v in server.items() if v} | {"password": database["PASSWORD"] or None}
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [database["NAME"]],
        )


@pytest.fixture(scope="session")
def _db_pool_closed_at_end(django_db_setup):
    """Kept for the tests that name it: django_db_setup (above) now does the closing."""


@pytest.fixture
async def api(_db_pool_closed_at_end):
    """An httpx.AsyncClient calling the real ASGI application (notify_project.asgi) in-process.

    API views work on routing_app.db_threads' pool, whose connections see committed rows only:
    tests using it need ``@pytest.mark.django_db(transaction=True)``.
    """
    import httpx

    from notify_project.asgi import application

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def ingest_key(transactional_db) -> str:
    """The raw key of a client allowed to ingest on every source and topic."""
    from tests.apiclient import create_key

    return create_key("ingest-client")[1]


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """One seeded notify server (tests/servers.py) logging at INFO, for the modules that need
    nothing of their own (no other environment, no restart), instead of one each: (the
    NotifyServer, what ``seed`` made). Its log holds what every one of them did."""
    from tests.servers import NotifyServer, seed, server_environment

    directory = tmp_path_factory.mktemp("shared-server")
    with server_environment(directory, "shared") as env:
        seeded = seed(env)
        with NotifyServer(env, directory / "uvicorn.log", log_level="info") as server:
            yield server, seeded


@pytest.fixture
def smtp_server():
    """A running SMTP server that keeps what it receives (tests/peers.py)."""
    from tests.peers import SMTPServer

    with SMTPServer() as server:
        yield server


@pytest.fixture
def receiver():
    """A running HTTP receiver (an SMS gateway, a webhook endpoint; tests/peers.py)."""
    from tests.peers import HTTPReceiver

    with HTTPReceiver() as server:
        yield server
