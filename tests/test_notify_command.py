"""``notify()`` / ``anotify()`` from Python, ``manage.py notify send`` and ``manage.py apikey``."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction

from routing_app.ingest import IngestError
from routing_app.models import ApiKey, Notification
from tests.apiclient import bearer


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


# --- Python API ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_notify_from_python_stores_a_user_notification_with_its_seq():
    from routing_app import notify

    first = notify("user:42", "invoice.paid", {"invoice": 1017})
    second = notify("user:42", "invoice.sent", severity="debug")

    assert (first.topic, first.seq, second.seq) == ("user:42", 1, 2)
    stored = Notification.objects.get(pk=first.id)
    assert (stored.source, stored.event, stored.data) == ("user", "invoice.paid", {"invoice": 1017})


@pytest.mark.django_db
def test_notify_refuses_bad_input_naming_the_field():
    from routing_app import notify

    with pytest.raises(IngestError) as exc:
        notify("user:42", "x", severity="loud")
    assert exc.value.errors[0]["loc"] == ["severity"]


@pytest.mark.django_db
def test_notify_inside_a_rolled_back_transaction_leaves_nothing():
    from routing_app import notify

    with pytest.raises(RuntimeError), transaction.atomic():
        notify("user:42", "invoice.paid")
        raise RuntimeError("the caller's work failed")

    assert Notification.objects.count() == 0


@pytest.mark.django_db(transaction=True)
async def test_anotify_from_async_code_stores_once_per_idempotency_key(_db_pool_closed_at_end):
    from routing_app import anotify

    first = await anotify("user:7", "login", {"ip": "10.0.0.1"}, idempotency_key="login-1")
    again = await anotify("user:7", "login", {"ip": "10.0.0.1"}, idempotency_key="login-1")

    assert (again.id, again.seq, again.created) == (first.id, 1, False)
    assert await Notification.objects.acount() == 1


def test_importing_routing_app_does_not_load_the_ingest_machinery():
    import subprocess
    import sys

    code = "import sys, routing_app; print('routing_app.ingest' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


# --- manage.py notify ---------------------------------------------------------------------


@pytest.mark.django_db
def test_notify_send_command_stores_the_notification():
    out, _ = run(
        "notify",
        "send",
        "--topic",
        "alerts.disk",
        "--event",
        "disk.full",
        "--data",
        '{"pct": 97}',
        "--severity",
        "critical",
    )

    assert "seq 1" in out
    stored = Notification.objects.get()
    assert (stored.topic.name, stored.severity, stored.data, stored.source) == (
        "alerts.disk",
        "critical",
        {"pct": 97},
        "system",
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topic", "Bad Topic", "--event", "x"], "topic"),
        (["--topic", "a.b", "--event", "x", "--data", "{nope"], "not valid JSON"),
        (["--topic", "a.b", "--event", "x", "--data", "[1]"], "JSON object"),
    ],
)
def test_notify_send_with_bad_input_fails_with_a_message(args, message):
    with pytest.raises(CommandError, match=message):
        run("notify", "send", *args)
    assert Notification.objects.count() == 0


# --- manage.py apikey ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_created_key_is_printed_once_and_works_on_the_api(api):
    from asgiref.sync import sync_to_async

    out, err = await sync_to_async(run)(
        "apikey", "create", "ci", "--scopes", "ingest", "--topics", "alerts.*", "--sources", "api"
    )
    raw = out.strip()
    assert raw.startswith("nk_") and "not shown again" in err

    ok = await api.post(
        "/api/v1/notifications",
        json={"topic": "alerts.disk", "event": "disk.full"},
        headers=bearer(raw),
    )
    refused = await api.post(
        "/api/v1/notifications",
        json={"topic": "k8s.prod.pod", "event": "pod.crash"},
        headers=bearer(raw),
    )

    assert (ok.status_code, refused.status_code) == (202, 403)
    listing, _ = await sync_to_async(run)("apikey", "list")
    assert "ci" in listing and raw not in listing


@pytest.mark.django_db
def test_revoked_key_is_marked_revoked_and_listed_so():
    raw, _ = run("apikey", "create", "old-client")

    out, _ = run("apikey", "revoke", "old-client")

    assert "revoked" in out
    key = ApiKey.objects.get(name="old-client")
    assert key.revoked and key.hashed_key == ApiKey.hash(raw.strip())
    assert "revoked" in run("apikey", "list")[0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "x", "--scopes", "admin"], "scopes"),
        (["create", "x", "--sources", "fax"], "allowed_sources"),
        (["create", "x", "--topics", "Bad Pattern"], "allowed_topics"),
        (["create", "x", "--rate", "fast"], "rate"),
        (["revoke", "nobody"], "no API key named"),
    ],
)
def test_apikey_command_refuses_bad_input_with_a_message(args, message):
    with pytest.raises(CommandError, match=message):
        run("apikey", *args)
    assert not ApiKey.objects.filter(name="x").exists()


@pytest.mark.django_db
def test_apikey_create_refuses_a_taken_name():
    run("apikey", "create", "dup")
    with pytest.raises(CommandError, match="exists"):
        run("apikey", "create", "dup")
