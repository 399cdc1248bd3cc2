"""The browser side of Web Push: static/notify/notify-sw.js in headless Chromium shows the message
the push transport builds as a notification, and static/notify/push.js's unit tests (node).

One page load (tests/js/push_driver.js): a tiny static server in this process serves the test
page (tests/js/page/push.html) and the service worker at the root, as docs/js-client.md tells an
app to; the page registers it, DevTools' ``ServiceWorker.deliverPushMessage`` gives it a push
event as a push service would, and the page reads ``registration.getNotifications()``.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from routing_app.delivery.transports.push import payload
from routing_app.models import Channel, Delivery, Notification, Topic
from tests.test_js_client import CHROMIUM, JS_DIR, ROOT, tools  # noqa: F401  (the fixture)

DRIVER_TIMEOUT_S = 60  # one page load and one push; passing runs take about 2 s


class _Files(SimpleHTTPRequestHandler):
    FILES = {
        "/": JS_DIR / "page" / "push.html",
        "/notify-sw.js": ROOT / "static" / "notify" / "notify-sw.js",
    }

    def translate_path(self, path: str) -> str:
        target = self.FILES.get(path.split("?", 1)[0])
        return str(target) if target else str(JS_DIR / "page" / "__missing__")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def page_url(tools) -> Iterator[str]:  # noqa: F811  (the fixture imported above)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def push_in_browser(page_url: str, message: str) -> list[dict]:
    done = subprocess.run(
        ["node", str(JS_DIR / "push_driver.js"), page_url, message],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
        env={"CHROMIUM": str(CHROMIUM), "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the driver printed nothing:\n{done.stdout}\n{done.stderr}"
    answer = json.loads(lines[-1])
    assert "error" not in answer, f"{answer['error']}\n{done.stderr}"
    return answer["notifications"]


@pytest.mark.django_db
def test_the_service_worker_shows_the_pushed_message_as_a_notification(page_url):
    topic = Topic.objects.create(name="alerts.disk")
    notification = Notification.objects.create(
        topic=topic,
        seq=3,
        event="disk.full",
        severity="critical",
        data={"host": "db-1", "url": "/hosts/db-1"},
    )
    channel = Channel.objects.create(name="browsers", kind="push")
    delivery = Delivery(notification=notification, channel=channel, recipient="https://p.test/1")
    message = payload(delivery).decode()

    [shown] = push_in_browser(page_url, message)

    assert shown["title"] == "[CRITICAL] disk.full on alerts.disk"
    assert sorted(shown["body"].split(", ")) == ["host: db-1", "url: /hosts/db-1"]
    assert shown["tag"] == "notify:alerts.disk"
    assert shown["data"] == {
        "url": "/hosts/db-1",
        "topic": "alerts.disk",
        "seq": 3,
        "id": str(notification.id),
        "event": "disk.full",
    }


def test_push_js_unit_tests_pass(tools):  # noqa: F811
    done = subprocess.run(
        ["node", "--test", str(JS_DIR / "push.test.js")],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
