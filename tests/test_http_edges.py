"""The HTTP paths served outside Django's middleware (the ingest endpoints, the SSE streams) and
the static files of the embedded mode: what Django would refuse, they refuse the same way."""

from __future__ import annotations

import json

import pytest
from channels.testing import HttpCommunicator
from django.core.asgi import get_asgi_application

WAIT_S = 10  # upper bound for one answer; passing runs take milliseconds

pytestmark = pytest.mark.django_db(transaction=True)


def application():
    from notify_project.asgi import application as app

    return app


async def status_and_body(app, method: str, path: str, host: bytes, body: bytes = b""):
    headers = [(b"host", host), (b"content-type", b"application/json")]
    communicator = HttpCommunicator(app, method, path, body=body, headers=headers)
    start = await communicator.get_response(timeout=WAIT_S)  # whole answer (not a stream)
    return start["status"], start["body"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/v1/notifications"), ("POST", "/api/v1/topics/alerts.k8s/notifications")],
)
async def test_ingest_with_a_host_not_in_allowed_hosts_gets_400(
    method, path, _db_pool_closed_at_end
):
    body = json.dumps({"topic": "alerts.k8s", "event": "x", "data": {}}).encode()
    status, answer = await status_and_body(application(), method, path, b"evil.example", body)
    assert status == 400
    assert "ALLOWED_HOSTS" in json.loads(answer)["detail"]


async def test_sse_with_a_host_not_in_allowed_hosts_gets_400(_db_pool_closed_at_end):
    status, answer = await status_and_body(
        application(), "GET", "/events/alerts.k8s/", b"evil.example:8000"
    )
    assert status == 400
    assert "ALLOWED_HOSTS" in json.loads(answer)["detail"]


async def test_ingest_with_an_allowed_host_and_port_is_served(_db_pool_closed_at_end):
    status, _ = await status_and_body(
        application(), "POST", "/api/v1/notifications", b"127.0.0.1:8000", b"{}"
    )
    assert status == 401  # past the host check: no API key


async def test_a_static_path_that_leaves_the_static_directories_is_a_404(settings):
    from notify_project.asgi import StaticFiles

    app = StaticFiles(get_asgi_application())
    for path in ("/static/../notify_project/settings.py", "/static/../../etc/passwd"):
        status, _ = await status_and_body(app, "GET", path, b"testserver")
        assert status == 404, path
