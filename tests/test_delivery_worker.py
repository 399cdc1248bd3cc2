"""Outbound delivery end to end with a real Celery worker process (not eager mode): notifications
posted to a notify server process are delivered by the worker to a real SMTP server (aiosmtpd),
an SMS gateway and a webhook receiver (local HTTP servers), and a worker killed mid-delivery
loses nothing. The broker outage is in test_delivery_faults.py."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from urllib.parse import parse_qs

import httpx
import pytest
from standardwebhooks import Webhook

from tests.peers import HTTPReceiver, Reply, SMTPServer
from tests.servers import (
    WAIT_S,
    CeleryWorker,
    NotifyServer,
    run_script,
    seed,
    server_environment,
    spawned,
)

pytestmark = pytest.mark.timeout(180)
HOOK_SECRET = "whsec_" + base64.b64encode(b"a webhook secret of the tests").decode()
SMS_TOKEN = "sms-auth-token"
SID = "AC0123456789abcdef0123456789abcdef"

CONFIGURE = """
import json, sys
from django.contrib.auth import get_user_model
from routing_app.models import Channel, Contact, Provider, Route
spec = json.loads(sys.argv[1])
sam = get_user_model().objects.get(username="sam")
Contact.objects.update_or_create(user=sam, defaults={"phone": "+4915112345678"})
for name, (kind, url, secret_env, options, route_topic) in spec.items():
    channel = Channel.objects.create(
        name=name, kind=kind, options=options, breaker_call_timeout_ms=5000,
        retry_backoff_s=1, retry_backoff_max_s=2,
    )
    Provider.objects.create(channel=channel, name=name + "-1", url=url, credentials_env=secret_env)
    route = Route.objects.create(name=name, topic_pattern=route_topic)
    route.channels.set([channel])
    route.users.set([sam])
"""


def wait_until(what: str, done, timeout_s: float = WAIT_S):
    """Poll ``done()`` (a database or an HTTP answer has no event to wait on) until it returns
    something true; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = done()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("delivery-worker")
    with (
        SMTPServer() as smtp,
        HTTPReceiver() as gateway,
        HTTPReceiver() as hooks,
        server_environment(
            directory,
            "delivery_worker",
            SWEEP_INTERVAL_S="1",
            SWEEP_PENDING_GRACE_S="2",
            SWEEP_MARGIN_S="2",
            HOOK_SECRET=HOOK_SECRET,
            SMS_TOKEN=SMS_TOKEN,
        ) as env,
    ):
        seeded = seed(env)
        spec = {
            "email": [
                "email",
                f"smtp://127.0.0.1:{smtp.port}",
                "",
                {"from_email": "n@t.test"},
                "ops.#",
            ],
            "sms": [
                "sms",
                f"{gateway.url}/2010-04-01/Accounts/{SID}/Messages.json",
                "SMS_TOKEN",
                {"from_number": "+15005550006"},
                "ops.#",
            ],
            "webhook": ["webhook", hooks.url + "/hook", "HOOK_SECRET", {}, "#"],
        }
        run_script(env, CONFIGURE, json.dumps(spec))
        with spawned(
            [
                NotifyServer(env, directory / "server.log"),
                CeleryWorker(env, directory / "worker.log", beat=True),
            ]
        ) as (server, worker):
            stack = {
                "env": env,
                "dir": directory,
                "server": server,
                "worker": worker,
                "key": seeded["api_key"],
                "smtp": smtp,
                "gateway": gateway,
                "hooks": hooks,
            }
            yield stack
            if stack["worker"] is not worker:  # a test replaced it: that one is ours to stop
                stack["worker"].stop()


def deliveries(stack, **query) -> list[dict]:
    answer = httpx.get(
        f"{stack['server'].base}/api/v1/deliveries",
        params={"limit": 500, **query},
        headers={"authorization": f"Bearer {stack['key']}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["deliveries"]


def test_email_sms_and_webhook_arrive_through_the_worker(stack):
    stack["server"].post(stack["key"], "ops.deploys", "deploy.done", {"app": "shop"})

    [mail] = stack["smtp"].wait_for(1)
    assert mail["To"] == "sam@example.com" and "deploy.done" in mail["Subject"]
    assert "shop" in mail.get_body(("plain",)).get_content()
    assert "shop" in mail.get_body(("html",)).get_content()

    [sms] = stack["gateway"].wait_for(1)
    form = {k: v[0] for k, v in parse_qs(sms.body.decode()).items()}
    assert form["To"] == "+4915112345678" and form["From"] == "+15005550006"
    assert "deploy.done" in form["Body"]
    scheme, _, credentials = sms.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(credentials).decode() == f"{SID}:{SMS_TOKEN}"

    [hook] = stack["hooks"].wait_for(1)
    payload = Webhook(HOOK_SECRET).verify(
        hook.body, {k.lower(): v for k, v in hook.headers.items()}
    )
    assert payload["notification"]["event"] == "deploy.done"

    [notification] = _notification_ids(stack, "ops.deploys")

    def three_sent() -> list[dict] | None:
        rows = deliveries(stack, notification=notification)
        return rows if len(rows) == 3 and all(d["status"] == "sent" for d in rows) else None

    rows = wait_until("three sent deliveries", three_sent)
    assert {d["channel"] for d in rows} == {"email", "sms", "webhook"}
    assert all(d["attempts"] == 1 and d["latency_ms"] is not None for d in rows)


def test_a_worker_killed_mid_delivery_loses_nothing(stack):
    """SIGKILL of the worker and its pool while webhook calls are in flight: after a new worker
    starts, every delivery ends ``sent`` (the sweeper puts back the rows left ``sending``), none
    stays ``sending``; the receiver may see a delivery twice (at least once), and the test says
    how often."""
    hooks, count, hung = stack["hooks"], 20, 3
    seen_before = len(hooks.requests.items)
    hooks.program(*[Reply(delay_s=4)] * hung)  # the first calls hang until the worker is dead
    for i in range(count):
        stack["server"].post(stack["key"], "hooks.kill", "step.done", {"i": i})
    hooks.wait_for(seen_before + 1)  # a call is in flight
    stack["worker"].kill()
    stack["worker"] = CeleryWorker(
        stack["env"], stack["dir"] / "worker2.log", name="worker2", beat=True
    )
    stack["worker"].start()

    def all_sent() -> list[dict] | None:
        ours = _notification_ids(stack, "hooks.kill")
        rows = [d for d in deliveries(stack, channel="webhook") if d["notification"] in ours]
        done = len(rows) == count and all(d["status"] == "sent" for d in rows)
        return rows if done else None

    rows = wait_until(f"{count} sent webhook deliveries", all_sent, timeout_s=90)
    ids = {d["id"] for d in rows}
    received = Counter(
        r.json()["delivery_id"]
        for r in hooks.requests.items[seen_before:]
        if r.json()["delivery_id"] in ids
    )
    assert set(received) == ids, "a delivery marked sent never reached the receiver"
    duplicates = sum(n - 1 for n in received.values())
    print(f"worker killed mid-delivery: {count} deliveries, {duplicates} received twice")
    assert duplicates <= hung  # only calls in flight at the kill can be repeated
    assert not deliveries(stack, status="sending")


def _notification_ids(stack, topic: str) -> set[str]:
    answer = httpx.get(
        f"{stack['server'].base}/api/v1/topics/{topic}/notifications",
        params={"limit": 1000},
        headers={"authorization": f"Bearer {stack['key']}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return {n["id"] for n in answer.json()["notifications"]}
