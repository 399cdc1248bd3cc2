"""Phase 4 of bench/delivery.py: failover and error detection. Probes are single notifications
posted one at a time, each once the previous one arrived, so that each crosses the path alone."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from delivery_load import notification, post_paced, spread, wait_received
from delivery_peers import Peer

TARGET_FAILOVER_MS = 150.0  # after a refused connection
HUNG_TIMEOUT_MS = 200


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "NOT MET"


def probe(base: str, key: str, peer: Peer, topic: str, count: int) -> tuple[list[float], list]:
    """Post ``count`` notifications one at a time, each once the previous one arrived; the
    post-to-arrival times (ms) and the notification ids."""
    times, ids = [], []
    with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=10) as client:
        for i in range(count):
            begin = peer.count()
            at = time.time()
            answer = client.post(f"{base}/api/v1/notifications", json=notification(topic, i))
            if answer.status_code != 202:
                raise SystemExit(f"ingest answered {answer.status_code}: {answer.text[:300]}")
            [(_, arrived)] = wait_received(peer, begin, 1, 20)[:1]
            times.append(1000 * (arrived - at))
            ids.append(answer.json()["id"])
            time.sleep(0.05)  # the row's last write lands before the next probe
    return times, ids


def first_attempts(ids: list[str]) -> tuple[list[int], int]:
    """Durations (ms) of the first provider's calls of these notifications' deliveries, and how
    many deliveries did not start with that provider (the balancer picked B first)."""
    from routing_app.delivery.models import Attempt

    rows = Attempt.objects.filter(delivery__notification_id__in=ids, number=1)
    durations = [a.duration_ms for a in rows if a.provider.name.endswith("-a")]
    return durations, rows.count() - len(durations)


def failover_phase(stack, key, peers, probes: int) -> list[str]:
    lines = []
    for kind in ("webhook", "email"):
        peer = peers["http" if kind == "webhook" else "smtp"]
        normal, _ = probe(stack.base, key, peer, f"fo.{kind}.normal", probes)
        refused, ids = probe(stack.base, key, peer, f"fo.{kind}.refused", probes)
        a_ms, b_first = first_attempts(ids)
        cost = statistics.median(refused) - statistics.median(normal)
        lines += [
            f"  {kind}, B alone: post-to-arrival {spread(normal)}",
            f"  {kind}, A refuses: {spread(refused)}; failover cost (median difference) "
            f"{cost:.0f} ms (target < {TARGET_FAILOVER_MS:.0f} ms: "
            f"{verdict(cost, TARGET_FAILOVER_MS, higher_is_better=False)}); A's call "
            f"{statistics.median(a_ms) if a_ms else float('nan'):.0f} ms median"
            + (f"; {b_first} probe(s) went to B first" if b_first else ""),
        ]
        hung, ids = probe(stack.base, key, peer, f"fo.{kind}.hung", probes)
        a_ms, b_first = first_attempts(ids)
        beyond = statistics.median(hung) - HUNG_TIMEOUT_MS
        lines.append(
            f"  {kind}, A never answers (call timeout {HUNG_TIMEOUT_MS} ms): {spread(hung)}; "
            f"minus the timeout {beyond:.0f} ms, minus the normal path too "
            f"{beyond - statistics.median(normal):.0f} ms; A's call "
            f"{statistics.median(a_ms) if a_ms else float('nan'):.0f} ms median"
        )
    return lines


def detection_phase(stack, key, rate: float) -> list[str]:
    """A refusing, minimum calls 20: how many calls and how long until its breaker opens."""
    from routing_app.delivery.models import Attempt, BreakerState
    from routing_app.models import Notification, Provider

    a = Provider.objects.get(name="detect-a")
    opened = None
    deadline = time.monotonic() + 30
    while opened is None and time.monotonic() < deadline:
        asyncio.run(post_paced(stack.base, key, "detect.x", rate, 1.0))
        opened = (
            Notification.objects.filter(
                topic__name="system.breakers", event="breaker.opened", data__provider=a.name
            )
            .order_by("created_at")
            .first()
        )
    if opened is None:
        return ["  error detection: the breaker did not open in 30 s"]
    calls = Attempt.objects.filter(provider=a).exclude(outcome=Attempt.Outcome.BREAKER_OPEN)
    first = calls.order_by("started_at").first()
    before = calls.filter(started_at__lte=opened.created_at).count()
    state = BreakerState.objects.filter(provider=a).values_list("state", flat=True).first()
    took = (opened.created_at - first.started_at).total_seconds() * 1000
    return [
        f"  error detection (A refuses, minimum calls 20, failure rate 5 %, {rate:.0f} posts/s): "
        f"breaker.opened after {before} calls to A, {took:.0f} ms after A's first failure; "
        f"{calls.count()} calls to A in all; BreakerState row says {state}"
    ]
