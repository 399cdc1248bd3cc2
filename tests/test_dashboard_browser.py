"""The dashboard in headless Chromium against a real server process: log in through the admin's
form, open every page, watch a number and a chart grow live after notifications are posted, use
the live console, press the action buttons, and keep a screenshot of each page at 1280 px and
390 px (the folder is printed; ``SCREENSHOTS``).

The server is tests/servers.py's ``NotifyServer`` (Redis mode when REDIS_URL is set) with the
seed's personas (oscar is staff) and a few rows of each kind the pages show; snapshots every
second, so the live tick comes quickly. Chromium is driven by tests/js/dashboard_driver.js
through test_js_client's ``Browser``; every wait is on what the page shows, bounded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import NotifyServer, run_script, seed, server_environment
from tests.test_js_client import WAIT_TIMEOUT_MS, Browser, tools  # noqa: F401  (a fixture)

SCREENSHOTS = Path("/tmp/notify-dashboard-screenshots")
WIDTHS = {"wide": (1280, 900), "phone": (390, 844)}
TICK_TIMEOUT_MS = 30_000  # a few snapshot intervals of 1 s on a busy machine, and a cold start

# Rows for the pages beside the seed's personas: a channel with a provider, a dead delivery with
# its attempts, a sent one, and an alert of each state. Prints the dead delivery's id.
ROWS_SCRIPT = """
from django.utils import timezone
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import Alert, AlertRule, Attempt, Channel, Delivery, Notification, Provider
mail = Channel.objects.create(name="mail", kind="email")
sms = Channel.objects.create(name="sms", kind="sms", backup=mail)
relay = Provider.objects.create(channel=mail, name="relay", url="console://", weight=2)
Provider.objects.create(channel=sms, name="gateway", url="console://")
[r] = ingest([NotificationIn(topic="alerts.k8s", event="pod.crash", severity="error",
                             data={"pod": "api-7d9f", "namespace": "prod"})])
n = Notification.objects.get(pk=r.id)
dead = Delivery.objects.create(notification=n, channel=mail, recipient="ops@example.com",
                               status="dead", attempts=2, provider=relay,
                               last_error="550 5.1.1 mailbox unavailable")
Attempt.objects.create(delivery=dead, number=1, provider=relay, outcome="transient",
                       duration_ms=31, error="421 try again later")
Attempt.objects.create(delivery=dead, number=2, provider=relay, outcome="permanent",
                       duration_ms=18, error="550 5.1.1 mailbox unavailable")
Delivery.objects.create(notification=n, channel=mail, recipient="boss@example.com",
                        status="sent", attempts=1, provider=relay, latency_ms=42)
rule = AlertRule.objects.get(name="high-error-rate") if AlertRule.objects.filter(
    name="high-error-rate").exists() else AlertRule.objects.first()
now = timezone.now()
Alert.objects.create(rule=rule, scope_value="mail", state="firing", value=0.12, fired_at=now,
                     history=[{"at": now.isoformat(), "to": "pending"},
                              {"at": now.isoformat(), "to": "firing"}])
Alert.objects.create(rule=rule, scope_value="sms", state="pending", value=0.06)
Alert.objects.create(rule=rule, state="resolved", value=0.01, resolved_at=now)
print("DEAD", dead.pk)
"""


@pytest.fixture(scope="module")
def site(tools, tmp_path_factory) -> Iterator[dict]:  # noqa: F811  (the imported fixture)
    """A running server with the seed and the rows above: ``{"server", "api_key", "dead"}``."""
    directory = tmp_path_factory.mktemp("dashboard")
    with server_environment(directory, "dashboard", METRICS_SNAPSHOT_S="1") as env:
        api_key = seed(env)["api_key"]
        out = run_script(env, ROWS_SCRIPT)
        dead = int(next(x for x in out.splitlines() if x.startswith("DEAD ")).split()[1])
        server = NotifyServer(env, directory / "server.log")
        server.start()
        try:
            yield {"server": server, "api_key": api_key, "dead": dead}
        finally:
            server.kill()


class Dashboard(Browser):
    """The dashboard's pages in one Chromium tab (tests/js/dashboard_driver.js)."""

    def __init__(self, base: str, log: Path) -> None:
        super().__init__("", base, "", log, driver="dashboard_driver.js")
        self.base = base

    def goto(self, path: str) -> str:
        return self._call("goto", self.base + path)

    def fill(self, selector: str, value: str) -> None:
        self._call("fill", selector, value=value)

    def click(self, selector: str, *, navigates: bool = False) -> None:
        self._call("click", selector, navigates=navigates)

    def wait(self, expr: str, timeout_ms: int = WAIT_TIMEOUT_MS):
        return self._call("wait", expr, timeout_ms)

    def text(self, selector: str) -> str:
        return self.eval(f"document.querySelector({json.dumps(selector)})?.textContent ?? null")

    def shoot(self, name: str) -> None:
        """The current page at each width, into SCREENSHOTS; fails on sideways overflow."""
        for label, (width, height) in WIDTHS.items():
            self._call("viewport", "", width=width, height=height)
            # Wait for the layout (and the charts' ResizeObserver) to settle at this width.
            self.wait(
                f"document.documentElement.clientWidth === {width} && [...document"
                f".querySelectorAll('.chart canvas')].every(c => c.getBoundingClientRect()"
                f".right <= {width})"
            )
            overflow = self.eval("document.documentElement.scrollWidth - innerWidth")
            assert overflow <= 0, f"{name} at {width} px scrolls sideways by {overflow} px"
            self._call("screenshot", str(SCREENSHOTS / f"{name}-{label}-{width}.png"))
        self._call("viewport", "", width=1280, height=900)


@pytest.fixture(scope="module")
def dashboard(site, tmp_path_factory, request) -> Iterator[Dashboard]:
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    log = tmp_path_factory.mktemp("dashboard-browser") / "driver.log"
    browser = Dashboard(site["server"].base, log)
    try:
        browser.goto("/admin/login/?next=/dashboard/")
        browser.fill("#id_username", "oscar")
        browser.fill("#id_password", "pw-oscar")
        browser.click("input[type=submit]", navigates=True)
        browser.wait("document.querySelector('[data-card=\"throughput\"]') !== null")
        yield browser
    finally:
        browser.close()
        # Past pytest's capture, so a plain run shows where to look.
        with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            print(f"\ndashboard screenshots: {SCREENSHOTS}")


def test_overview_grows_live_when_notifications_arrive(dashboard, site):
    dashboard.goto("/dashboard/")
    dashboard.wait("document.querySelector('#live')?.dataset.state === 'live'", TICK_TIMEOUT_MS)
    # The first tick may bring the first points; from then on each tick adds one.
    dashboard.wait("(window.dashboardOverview?.ticks ?? 0) >= 1", TICK_TIMEOUT_MS)
    points = int(dashboard.eval("document.querySelector('[data-chart=throughput]').dataset.points"))
    # Record every text the "in" number shows from now on (it is replaced on each tick).
    dashboard.eval(
        """(() => {
          const card = document.querySelector('[data-card="throughput"] .values')
          window.seenIn = []
          new MutationObserver(() => {
            const dd = card.querySelector('dd[data-series="in"]')
            if (dd) window.seenIn.push(dd.textContent)
          }).observe(card, { childList: true, subtree: true, characterData: true })
        })()"""
    )
    for n in range(20):
        site["server"].post(site["api_key"], "dash.live", "load.step", {"n": n})
    dashboard.wait("window.seenIn.some(text => text !== '0.0/s' && text !== '–')", TICK_TIMEOUT_MS)
    dashboard.wait(
        f"Number(document.querySelector('[data-chart=throughput]').dataset.points) > {points}",
        TICK_TIMEOUT_MS,
    )
    assert dashboard.eval("document.querySelectorAll('[data-chart] canvas').length") == 7
    assert dashboard.eval("document.getElementById('empty-overview')") is None
    dashboard.shoot("overview")


def test_channels_page_forces_a_breaker_open_and_resets_it(dashboard):
    dashboard.goto("/dashboard/channels/")
    row = "[data-provider] [data-breaker-state]"
    assert dashboard.text(row) == "closed"
    dashboard.click("tr[data-provider] button.danger", navigates=True)
    dashboard.wait("document.querySelector('.msg')?.textContent.includes('now forced open')")
    assert dashboard.text(row) == "forced open"
    dashboard.shoot("channels")
    dashboard.click("tr[data-provider] form:first-child button", navigates=True)
    dashboard.wait("document.querySelector('.msg')?.textContent.includes('now closed')")
    assert dashboard.text(row) == "closed"


def test_live_console_shows_a_published_test_notification(dashboard, site):
    site["server"].post(site["api_key"], "dash.console", "deploy.started", {"app": "api"})
    dashboard.goto("/dashboard/topics/?topic=dash.console")
    dashboard.wait("document.getElementById('console-state')?.textContent === 'live'")
    # The stored one arrives first (the console resumes from the topic's last few).
    dashboard.wait("document.querySelector('#console-log li[data-seq=\"1\"]') !== null")
    dashboard.fill("#console-publish input[name=data]", '{"note": "from the console"}')
    dashboard.click("#console-publish button[type=submit]")
    dashboard.wait("document.getElementById('console-result').textContent === 'stored as seq 2'")
    dashboard.wait("document.querySelector('#console-log li[data-seq=\"2\"]') !== null")
    line = dashboard.text('#console-log li[data-seq="2"]')
    assert "console.test" in line and "from the console" in line and '"by":"oscar"' in line
    # Posted from elsewhere, it appears too, once.
    site["server"].post(site["api_key"], "dash.console", "console.test", {"from": "api"})
    dashboard.wait("document.querySelector('#console-log li[data-seq=\"3\"]') !== null")
    assert dashboard.eval("document.querySelectorAll('#console-log li[data-seq]').length") == 3
    # The page as rendered while this stream is open: our SSE stream, and we are present.
    row = dashboard.eval(
        """fetch('/dashboard/topics/?topic=dash.console').then(r => r.text()).then(html =>
          new DOMParser().parseFromString(html, 'text/html')
            .querySelector("tr[data-topic='dash.console']").textContent)"""
    )
    assert "sse 1" in row and "oscar" in row, row
    dashboard.shoot("topics")


def test_deliveries_list_detail_and_replay(dashboard, site):
    dashboard.goto("/dashboard/deliveries/?status=dead")
    assert dashboard.eval("document.querySelectorAll('tbody tr').length") == 1
    dashboard.shoot("deliveries")
    dashboard.goto(f"/dashboard/deliveries/{site['dead']}/")
    assert dashboard.eval("document.querySelectorAll('.badge.permanent').length") == 1
    dashboard.shoot("delivery")
    dashboard.click("button.primary", navigates=True)
    dashboard.wait("document.querySelector('.msg')?.textContent.includes('sent again')")


def test_alerts_page_adds_a_silence(dashboard):
    dashboard.goto("/dashboard/alerts/")
    assert "mail" in dashboard.text("section.panel")  # the firing alert's scope
    dashboard.fill("#id_scope_value", "mail")
    dashboard.fill("#id_ends_at", "2031-01-01T00:00")
    dashboard.fill("#id_comment", "relay upgrade tonight")
    dashboard.click("#add-silence button[type=submit]", navigates=True)
    dashboard.wait("document.querySelector('.msg')?.textContent.startsWith('Added')")
    assert "relay upgrade tonight" in dashboard.eval("document.body.textContent")
    dashboard.shoot("alerts")


def test_home_sends_the_logged_in_operator_to_the_dashboard(dashboard, site):
    assert dashboard.goto("/").endswith("/dashboard/")
