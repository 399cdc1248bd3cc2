"""Every way in needs authentication or is on an explicit public list, and anonymous, forged,
expired and cross-user credentials are refused everywhere, against a real server.

Enumerated from the code, so that a new URL, API operation, ASGI route or socket event that is
on no list fails here: Django's URL resolver (admin, dashboard, the ninja API, django-anymail,
SSE), the OpenAPI schema's operations and their methods, the HTTP wrappers and WebSocket routes
of notify_project/asgi.py, and the events the plain and the Phoenix socket dispatch on.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import inspect
import json
import re
import textwrap
import time

import httpx
import pytest
from django.core import signing
from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.resolvers import RegexPattern
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from channels_app import phoenix, tokens, ws_plain
from channels_app.routing import websocket_urlpatterns
from channels_app.socket_auth import PHOENIX_TOKEN_PREFIX
from tests.chaos.abuse_support import live_server
from tests.chaos.report import record
from tests.servers import ROOT, run_script

pytestmark = pytest.mark.timeout(300)

WAIT_S = 10  # one awaited frame or close; passing runs take milliseconds

# --- the public lists: everything else must refuse an anonymous request ----------------------

PUBLIC_PAGES = {
    "api/v1/": "the API's root: answers 404, serves nothing",
    "": "the home page: links and how to log in, no data (staff are sent to the dashboard)",
    "admin/login/": "the login form",
    "admin/logout/": "logging out (a POST; nothing to protect for an anonymous client)",
    "api/v1/openapi.json": "the API's schema",
    "api/v1/docs": "the API's documentation page",
}
PUBLIC_OPERATIONS = {
    ("GET", "api/v1/csrf"): "a CSRF token for a browser app's session POSTs",
    ("POST", "api/v1/providers/<provider_id>/receipts"): (
        "an SMS gateway's delivery receipts: each is checked against the provider's own "
        "signature secret instead"
    ),
}
# Regex patterns have no converters to fill in: a concrete path for each.
REGEX_SAMPLES = {
    "admin/^(?P<app_label>auth|routing_app|channels_app)/$": "admin/auth/",
    "admin/(?P<url>.*)$": "admin/no-such-page/",
}
# The HTTP wrappers of notify_project/asgi.py, and which paths each serves before Django.
ASGI_HTTP_WRAPPERS = {
    "with_sse": "events/<str:topic>/ (in the resolver too: the same path, checked there)",
    "with_ingest_api": "the ingest operations of the API (checked as API operations)",
}
WEBSOCKET_ROUTES = {
    "ws/<str:topic>/": "needs a token or session that may read the topic: else 4401/4403",
    "socket/websocket": "public: an anonymous Phoenix socket connects; every join is checked",
}
PUBLIC_PLAIN_EVENTS: dict[str, str] = {}  # the plain socket refuses anonymous at connect: none
PUBLIC_PHOENIX_EVENTS = {
    "heartbeat": "keeps the socket alive; answers ok and nothing else",
    "phx_leave": "leaving a topic one has not joined answers ok and nothing else",
}

REFUSED_STATUSES = (401, 403)


# --- enumeration ------------------------------------------------------------------------------


def url_patterns() -> list[tuple[str, URLPattern]]:
    """Every (route, pattern) of the project's URL conf, includes expanded."""

    def walk(patterns, prefix: str):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
            else:
                yield prefix + str(pattern.pattern), pattern

    return list(walk(get_resolver().url_patterns, ""))


def is_api_operation(pattern: URLPattern) -> bool:
    return pattern.callback.__module__ == "ninja.operation"


def sample_path(route: str, pattern: URLPattern) -> str:
    """A concrete path the pattern matches: converters filled with samples."""
    if isinstance(pattern.pattern, RegexPattern) or "^" in route or "(?P" in route:
        assert route in REGEX_SAMPLES, f"add a concrete path for the regex route {route!r}"
        return "/" + REGEX_SAMPLES[route]

    def fill(match: re.Match) -> str:
        converter, name = match.group(1) or "str", match.group(2)
        if name == "topic":
            return "alerts.k8s"
        return "1" if converter in ("int", "path") or name.endswith("id") else "x"

    return "/" + re.sub(r"<(?:(\w+):)?(\w+)>", fill, route)


def api_operations() -> list[tuple[str, str, URLPattern, bool]]:
    """(method, route, pattern, takes credentials) of every ninja operation in the URL conf."""
    found = []
    for route, pattern in url_patterns():
        if is_api_operation(pattern):
            path_view = inspect.getclosurevars(pattern.callback).nonlocals["self"]
            for operation in path_view.operations:
                for method in operation.methods:
                    found.append((method, route, pattern, bool(operation.auth_callbacks)))
    return found


def compared_strings(function, variable: str) -> set[str]:
    """The string constants ``function`` compares ``variable`` with (``==``): the events an
    if-chain dispatches on."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and getattr(node.left, "id", None) == variable:
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, ast.Eq) and isinstance(right, ast.Constant):
                    found.add(right.value)
    return found


def plain_events() -> set[str]:
    return compared_strings(ws_plain._on_frame, "kind")


def phoenix_events() -> set[str]:
    return compared_strings(phoenix.PhoenixConnection.dispatch, "event")


def asgi_http_wrappers() -> set[str]:
    """The ``with_*`` wrappers notify_project/asgi.py puts around Django's HTTP app."""
    tree = ast.parse((ROOT / "notify_project" / "asgi.py").read_text())
    return {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id.startswith("with_")
    }


# --- credentials -----------------------------------------------------------------------------


def forged_token(user_id: int) -> str:
    """A token for ``user_id`` signed with a key the server does not have."""
    payload = {"u": user_id, "e": int(time.time()) + 3600}
    return signing.dumps(payload, key="not-the-server-key", salt=tokens.SALT, compress=False)


def expired_token(user_id: int) -> str:
    """A token for ``user_id`` properly signed (the server's key: same settings) but expired."""
    payload = {"u": user_id, "e": int(time.time()) - 60}
    return signing.dumps(payload, salt=tokens.SALT, compress=False)


def phoenix_auth_protocol(token: str) -> str:
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    return PHOENIX_TOKEN_PREFIX + encoded


SETUP_SCRIPT = """
from routing_app.models import ApiKey, Channel, Provider
key = ApiKey(name="alerts-only", scopes=["ingest"], allowed_topics="alerts.#")
raw = key.set_new_key()
key.save()
gateway = Provider.objects.create(
    channel=Channel.objects.create(name="sms", kind="sms"),
    name="twilio",
    url="https://api.twilio.test/2010-04-01/Accounts/AC1/Messages.json",
    credentials_env="TWILIO_TOKEN",
)
print("KEY " + raw)
print("SMS " + str(gateway.pk))
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    directory = tmp_path_factory.mktemp("authz")
    with live_server(directory, "authz", TWILIO_TOKEN="the-gateway-secret") as running:
        out = dict(
            line.split(" ", 1) for line in run_script(running.env, SETUP_SCRIPT).split("\n") if line
        )
        running.restricted_key, running.sms_provider = out["KEY"], int(out["SMS"])
        yield running


# --- sockets ---------------------------------------------------------------------------------


async def plain_outcome(url: str, frames: list[dict] = ()) -> tuple[int | None, list[dict]]:
    """Connect, send ``frames``, and collect what comes back until the close (its code; its
    reason is the last item) or a ``subscribed`` frame (code None: admitted)."""
    received: list[dict] = []
    try:
        async with connect(url, open_timeout=WAIT_S) as ws:
            for frame in frames:
                await ws.send(json.dumps(frame))
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                received.append(message)
                if message.get("type") == "subscribed" and not frames:
                    return None, received
    except ConnectionClosed as closed:
        if closed.rcvd is None:
            return 1006, received
        return closed.rcvd.code, [*received, {"close_reason": closed.rcvd.reason}]
    except InvalidStatus as refused:
        return refused.response.status_code, received


class PhoenixClient:
    """A bare Phoenix V2 client: send a frame, wait for the reply with its ref."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ref = 0

    async def call(self, topic: str, event: str, payload: dict, join_ref=None) -> dict:
        self.ref += 1
        ref = str(self.ref)
        await self.ws.send(json.dumps([join_ref, ref, topic, event, payload]))
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT_S))
            if frame[1] == ref and frame[3] == "phx_reply":
                return frame[4]


async def phoenix_handshake(live, *, token=None, subprotocol_token=None) -> int | None:
    """Open a Phoenix socket: None when accepted, else its close code (or HTTP status)."""
    url = f"ws://127.0.0.1:{live.port}/socket/websocket?vsn=2.0.0"
    if token is not None:
        url += f"&token={token}"
    protocols = ["phoenix"]
    if subprotocol_token is not None:
        protocols.append(phoenix_auth_protocol(subprotocol_token))
    try:
        async with connect(url, subprotocols=protocols, open_timeout=WAIT_S) as ws:
            client = PhoenixClient(ws)
            await client.call("phoenix", "heartbeat", {})
            return None
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else 1006
    except InvalidStatus as refused:
        return refused.response.status_code


async def phoenix_join(live, topic: str, token: str | None = None) -> str:
    """The status of a join of ``topic`` on a socket with ``token`` (or anonymous)."""
    url = f"ws://127.0.0.1:{live.port}/socket/websocket?vsn=2.0.0"
    if token:
        url += f"&token={token}"
    async with connect(url, open_timeout=WAIT_S) as ws:
        reply = await PhoenixClient(ws).call(topic, "phx_join", {}, join_ref="1")
        return reply["status"]


# --- the tests -------------------------------------------------------------------------------


def test_every_route_and_event_is_known_to_this_test():
    routes = {route for route, _ in url_patterns()}
    assert set(PUBLIC_PAGES) <= routes, "a public page listed here is gone: update the list"
    assert set(REGEX_SAMPLES) <= routes
    assert asgi_http_wrappers() == set(ASGI_HTTP_WRAPPERS), (
        "notify_project/asgi.py serves HTTP through a wrapper not listed in ASGI_HTTP_WRAPPERS: "
        "list it with what guards it, and check it below"
    )
    ws_routes = {str(pattern.pattern) for pattern in websocket_urlpatterns}
    assert ws_routes == set(WEBSOCKET_ROUTES), "a WebSocket route is not in WEBSOCKET_ROUTES"
    assert plain_events() == {"ping", "pong", "publish", "resume", "presence"}, (
        "the plain socket dispatches an event this test does not check: add it to "
        "test_every_socket_event_needs_authentication_or_is_public"
    )
    assert phoenix_events() == {"heartbeat", "phx_join", "phx_leave", "request_update"}, (
        "the Phoenix socket dispatches an event this test does not check: add it to "
        "test_every_socket_event_needs_authentication_or_is_public"
    )
    operations = api_operations()
    public = {(method, route) for method, route, _, secured in operations if not secured}
    assert public == set(PUBLIC_OPERATIONS), (
        "an API operation without auth is not in PUBLIC_OPERATIONS (or one listed now has auth)"
    )


def test_every_non_public_page_and_operation_refuses_anonymous_requests(live):
    wrong, tried = [], 0
    with httpx.Client(base_url=live.base, timeout=WAIT_S, follow_redirects=False) as client:
        for route, pattern in url_patterns():
            if route in PUBLIC_PAGES or is_api_operation(pattern):
                continue
            path = sample_path(route, pattern)
            answers = {method: client.request(method, path) for method in ("GET", "POST")}
            tried += len(answers)
            refusals = [a for a in answers.values() if refuses(a)]
            others = [a for a in answers.values() if not refuses(a) and a.status_code != 405]
            if not refusals or others:
                wrong.append(f"{route} ({path}): " + describe(answers))
        for method, route, pattern, _ in api_operations():
            if (method, route) in PUBLIC_OPERATIONS:
                continue
            answer = client.request(method, sample_path(route, pattern), json={})
            tried += 1
            if not refuses(answer):
                wrong.append(f"{method} {route}: " + describe({method: answer}))
    record("anonymous requests", cases_tried=tried, not_refused=len(wrong))
    assert wrong == []


def refuses(answer: httpx.Response) -> bool:
    """401/403, or a redirect to a login page."""
    if answer.status_code in REFUSED_STATUSES:
        return True
    location = answer.headers.get("location", "")
    return answer.status_code in (301, 302) and "/login/" in location


def describe(answers: dict[str, httpx.Response]) -> str:
    return ", ".join(f"{m} {a.status_code} {a.text[:80]!r}" for m, a in answers.items())


async def test_every_socket_event_needs_authentication_or_is_public(live):
    topic_url = f"ws://127.0.0.1:{live.port}/ws/alerts.k8s/"
    cases = 0
    # plain: anonymous is closed 4401 at connect, before any event is dispatched
    for event in sorted(plain_events() - set(PUBLIC_PLAIN_EVENTS)):
        code, received = await plain_outcome(topic_url, [{"type": event, "ref": "r"}])
        assert code == 4401 and [m for m in received if "close_reason" not in m] == [], event
        cases += 1
    # and on an admitted socket publish is checked again (only staff publish by default)
    async with connect(f"{topic_url}?token={live.tokens['sam']}", open_timeout=WAIT_S) as ws:
        await ws.send(json.dumps({"type": "publish", "event": "e", "data": {}, "ref": "p"}))
        while (reply := json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))).get("ref") != "p":
            pass
    assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
    # Phoenix: an anonymous socket connects; only the public events answer ok
    url = f"ws://127.0.0.1:{live.port}/socket/websocket?vsn=2.0.0"
    async with connect(url, open_timeout=WAIT_S) as ws:
        client = PhoenixClient(ws)
        answers = {
            "heartbeat": await client.call("phoenix", "heartbeat", {}),
            "phx_join": await client.call("alerts.k8s", "phx_join", {}, join_ref="1"),
            "request_update": await client.call("alerts.k8s", "request_update", {}, "1"),
            "phx_leave": await client.call("alerts.k8s", "phx_leave", {}, join_ref="1"),
        }
    assert set(answers) == phoenix_events()
    statuses = {event: reply["status"] for event, reply in answers.items()}
    assert statuses == {
        event: "ok" if event in PUBLIC_PHOENIX_EVENTS else "error" for event in answers
    }
    record("socket events", events=len(plain_events()) + len(answers), cases_tried=cases + 6)


async def test_forged_expired_and_cross_user_tokens_are_refused_on_every_edge(live):
    sam, olga = live.ids["sam"], live.ids["olga"]
    bad = {"forged": forged_token(sam), "expired": expired_token(sam), "garbage": "x.y.z"}
    own_topic, other_topic = f"user:{sam}", f"user:{olga}"
    outcomes: dict[str, object] = {}
    reasons = {}
    for name, token in bad.items():
        code, got = await plain_outcome(f"ws://127.0.0.1:{live.port}/ws/{own_topic}/?token={token}")
        outcomes[f"plain ?token= {name}"] = code
        reasons[name] = got[-1]["close_reason"]
        outcomes[f"phoenix params {name}"] = await phoenix_handshake(live, token=token)
        outcomes[f"phoenix authToken {name}"] = await phoenix_handshake(
            live, subprotocol_token=token
        )
        outcomes[f"sse ?token= {name}"] = sse_status(live, own_topic, token)
    good = live.tokens["sam"]
    code, _ = await plain_outcome(f"ws://127.0.0.1:{live.port}/ws/{other_topic}/?token={good}")
    outcomes["plain cross-user"] = code
    outcomes["phoenix cross-user"] = await phoenix_join(live, other_topic, good)
    outcomes["sse cross-user"] = sse_status(live, other_topic, good)
    outcomes["plain staff topic"] = (
        await plain_outcome(f"ws://127.0.0.1:{live.port}/ws/system.health/?token={good}")
    )[0]
    outcomes["phoenix staff topic"] = await phoenix_join(live, "system.health", good)
    expected = {}
    for name in bad:
        expected |= {
            f"plain ?token= {name}": 4401,
            # refused before the handshake completes: HTTP 403, the WebSocket equivalent
            f"phoenix params {name}": 403,
            f"phoenix authToken {name}": 403,
            f"sse ?token= {name}": 401,
        }
    expected |= {
        "plain cross-user": 4403,
        "phoenix cross-user": "error",
        "sse cross-user": 403,
        "plain staff topic": 4403,
        "phoenix staff topic": "error",
    }
    assert outcomes == expected
    # refused for what is wrong with each (so the expired one has the server's own signature)
    assert "signature" in reasons["forged"] and "expired" in reasons["expired"], reasons
    # the good token on its own topic passes everywhere (the refusals above are not blanket)
    assert (await plain_outcome(f"ws://127.0.0.1:{live.port}/ws/{own_topic}/?token={good}"))[
        0
    ] is None
    assert await phoenix_join(live, own_topic, good) == "ok"
    assert await phoenix_handshake(live, subprotocol_token=good) is None
    record("client tokens", bad_ones_tried=len(outcomes), refused=len(outcomes), good_ones_passed=3)


def sse_status(live, topic: str, token: str) -> int:
    """The status an SSE request for ``topic`` with ``token`` is answered with."""
    with httpx.Client(timeout=WAIT_S) as client:
        url = f"{live.base}/events/{topic}/"
        with client.stream("GET", url, params={"token": token}) as answer:
            return answer.status_code


def test_forged_and_out_of_scope_api_keys_are_refused_on_every_operation(live):
    forged = "nk_" + "A" * 40
    outcomes, tried = [], 0
    with httpx.Client(base_url=live.base, timeout=WAIT_S) as client:
        for method, route, pattern, secured in api_operations():
            if not secured:
                continue
            answer = client.request(
                method,
                sample_path(route, pattern),
                json={},
                headers={"Authorization": f"Bearer {forged}"},
            )
            tried += 1
            if answer.status_code != 401:
                outcomes.append(f"forged key: {method} {route}: {answer.status_code}")
        restricted = {"Authorization": f"Bearer {live.restricted_key}"}
        scoped_cases = {
            ("POST", "/api/v1/tokens", json.dumps({"user": "sam"})): 403,
            ("GET", "/api/v1/realtime/hub", None): 403,
            ("GET", "/api/v1/deliveries", None): 403,
            ("GET", f"/api/v1/topics/user:{live.ids['olga']}/notifications", None): 403,
            ("POST", "/api/v1/notifications", json.dumps(notification("system.x"))): 403,
            ("POST", "/api/v1/notifications", json.dumps(notification("alerts.k8s"))): 202,
        }
        for (method, path, body), status in scoped_cases.items():
            headers = {**restricted, "Content-Type": "application/json"}
            answer = client.request(method, path, content=body, headers=headers)
            tried += 1
            if answer.status_code != status:
                outcomes.append(f"restricted key: {method} {path}: {answer.status_code}")
    record("api keys", cases_tried=tried, wrong=len(outcomes))
    assert outcomes == []


def notification(topic: str) -> dict:
    return {"topic": topic, "event": "probe", "data": {}}


def test_email_tracking_webhooks_need_the_webhook_secret(db, client, settings):
    """In-process (the server's settings have no secret): no secret configured refuses everyone;
    with one, only its basic auth passes on to django-anymail."""
    path = "/anymail/postmark/tracking/"
    settings.ANYMAIL_WEBHOOK_SECRET = ""
    assert client.post(path, data="{}", content_type="application/json").status_code == 403
    settings.ANYMAIL_WEBHOOK_SECRET = "hook:s3cret"
    settings.ANYMAIL = {"WEBHOOK_SECRET": "hook:s3cret"}
    wrong = base64.b64encode(b"hook:guess").decode()
    right = base64.b64encode(b"hook:s3cret").decode()
    answers = {
        "none": client.post(path, data="{}", content_type="application/json"),
        "wrong": client.post(
            path, data="{}", content_type="application/json", HTTP_AUTHORIZATION=f"Basic {wrong}"
        ),
        "right": client.post(
            path,
            data=json.dumps({"RecordType": "Delivery", "MessageID": "m-1"}),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Basic {right}",
        ),
    }
    assert {name: answer.status_code for name, answer in answers.items()} == {
        "none": 401,
        "wrong": 401,
        "right": 200,
    }
    assert not any(r.name.endswith("_inbound_webhook") for _, r in url_patterns() if r.name)


def test_sms_receipts_are_refused_without_the_providers_signature(live):
    """The public receipts operation checks X-Twilio-Signature against the provider's secret."""
    url = f"{live.base}/api/v1/providers/{live.sms_provider}/receipts"
    form = {"MessageSid": "SM1", "MessageStatus": "delivered"}
    answers = {
        "unsigned": httpx.post(url, data=form, timeout=WAIT_S).status_code,
        "forged": httpx.post(
            url, data=form, headers={"X-Twilio-Signature": "Zm9yZ2Vk"}, timeout=WAIT_S
        ).status_code,
    }
    assert answers == {"unsigned": 403, "forged": 403}
    record("sms receipts", cases_tried=len(answers), refused=len(answers))
