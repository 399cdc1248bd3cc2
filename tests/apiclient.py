"""Helpers for HTTP API tests (the fixtures ``api`` and ``ingest_key`` are in conftest.py).

API views do their database work on routing_app.db_threads' pool, whose connections only see
committed rows: tests that call the API need ``django_db(transaction=True)``.
"""

from __future__ import annotations

from routing_app.models import ApiKey


def create_key(name: str = "client", **fields) -> tuple[ApiKey, str]:
    """An API key row (default: scope ingest, every source and topic) and its raw key."""
    fields.setdefault("scopes", ["ingest"])
    key = ApiKey(name=name, **fields)
    raw = key.set_new_key()
    key.save()
    return key, raw


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}
