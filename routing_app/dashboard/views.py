"""The dashboard's pages and actions. Thin: each reads models or calls one service function
(``transitions.control``, ``service.replay``, ``ingest``) and renders; every page and action
needs a staff session (else the admin's login page)."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.db.models import Count, Prefetch, Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from ..delivery import service, transitions
from ..delivery.breaker import BreakerConfig, BreakerUnavailable, breakers_from_settings
from ..ingest import IngestError, NotificationIn, ingest
from ..models import (
    Alert,
    Attempt,
    Channel,
    Delivery,
    Notification,
    Provider,
    Silence,
    Topic,
)
from ..topics import is_valid_topic
from . import charts, realtime, ticks
from .forms import ConsolePublishForm, SilenceForm

log = logging.getLogger(__name__)

TOPICS_SHOWN = 100  # the topics page lists the most recently active ones
RECENT_ATTEMPTS = 20
DELIVERIES_PER_PAGE = 50
RESOLVED_SHOWN = 50
CONSOLE_EVENT = "console.test"
CONSOLE_BACKLOG = 10  # the console starts with the topic's last few stored notifications


def home(request: HttpRequest) -> HttpResponse:
    """``/``: staff go to the dashboard; everyone else sees the home page."""
    user = request.user
    if user.is_authenticated and user.is_active and user.is_staff:
        return redirect("dashboard:overview")
    return render(request, "home.html")


def _live(topic: str) -> dict:
    return {"live_topic": topic, "live_url": reverse("events", args=[topic])}


# --- overview ----------------------------------------------------------------------------------


@staff_member_required
def overview(request: HttpRequest) -> HttpResponse:
    points = charts.history_points()
    return render(
        request,
        "dashboard/overview.html",
        {
            "nav": "overview",
            "points": points,
            "cards": charts.cards(points[-1] if points else None),
            "tick_event": ticks.EVENT,
            "step": settings.METRICS_SNAPSHOT_S,
            **_live(ticks.TOPIC),
        },
    )


# --- channels and providers --------------------------------------------------------------------


BREAKER_LABELS = {"half_open": "half-open", "forced_open": "forced open"}  # as channels.js


def _breaker(provider: Provider) -> tuple[dict, bool]:
    """The provider's breaker as the next call would find it, and True; or, when its store is
    unreachable, the mirrored row (or closed when none) and False."""
    try:
        snap = breakers_from_settings().snapshot(
            provider.pk, BreakerConfig.for_channel(provider.channel)
        )
        found, live = snap, True
    except BreakerUnavailable:
        found = getattr(provider, "breaker", None)  # select_related: None when no row
        live = False
    state = str(found.state) if found else "closed"
    return {
        "state": state,
        "label": BREAKER_LABELS.get(state, state),
        "failure_rate": found.failure_rate if found else 0.0,
        "slow_rate": found.slow_rate if found else 0.0,
        "calls": found.calls if found else 0,
    }, live


@staff_member_required
def channels(request: HttpRequest) -> HttpResponse:
    since = timezone.now() - timedelta(hours=1)
    providers = Provider.objects.select_related("breaker").annotate(
        attempts_hour=Count("attempt", filter=Q(attempt__started_at__gte=since)),
        sent_hour=Count(
            "attempt",
            filter=Q(attempt__started_at__gte=since, attempt__outcome=Attempt.Outcome.SENT),
        ),
    )
    rows = Channel.objects.prefetch_related(Prefetch("providers", queryset=providers))
    listed = []
    breaker_problem = False
    for channel in rows:
        entries = []
        for provider in channel.providers.all():
            provider.channel = channel  # BreakerConfig.for_channel reads it
            breaker, live = _breaker(provider)
            breaker_problem = breaker_problem or not live
            entries.append({"provider": provider, "breaker": breaker})
        listed.append({"channel": channel, "providers": entries})
    attempts = Attempt.objects.select_related("provider__channel", "delivery__channel").order_by(
        "-started_at"
    )[:RECENT_ATTEMPTS]
    return render(
        request,
        "dashboard/channels.html",
        {
            "nav": "channels",
            "channels": listed,
            "attempts": attempts,
            "breaker_problem": breaker_problem,
            **_live(transitions.TOPIC),
        },
    )


@staff_member_required
@require_POST
def breaker_action(request: HttpRequest, provider_id: int) -> HttpResponse:
    provider = get_object_or_404(Provider.objects.select_related("channel"), pk=provider_id)
    action = request.POST.get("action", "")
    if action not in ("reset", "open"):
        messages.error(request, f"unknown breaker action {action!r}: use reset or open")
        return redirect("dashboard:channels")
    try:
        snap = transitions.control(provider, action)
    except BreakerUnavailable as exc:
        messages.error(request, f"{provider}: the breaker store is unreachable ({exc})")
        return redirect("dashboard:channels")
    verb = "reset" if action == "reset" else "forced open"
    state = BREAKER_LABELS.get(str(snap.state), str(snap.state))
    messages.success(request, f"{provider}: breaker {verb}, now {state}.")
    return redirect("dashboard:channels")


# --- topics and the console ----------------------------------------------------------------------


@staff_member_required
def topics(request: HttpRequest) -> HttpResponse:
    minute_ago = timezone.now() - timedelta(minutes=1)
    rows = list(
        Topic.objects.annotate(
            last_minute=Count("notifications", filter=Q(notifications__created_at__gte=minute_ago))
        ).order_by("-last_minute", "-last_seq", "name")[:TOPICS_SHOWN]
    )
    live = realtime.topics_realtime([t.name for t in rows])
    for topic in rows:
        topic.subscribers = live.subscribers.get(topic.name, {})
        topic.present = live.present.get(topic.name, [])
    chosen = request.GET.get("topic", "").strip() or (rows[0].name if rows else "")
    if chosen and not is_valid_topic(chosen):
        messages.error(request, f"{chosen!r} is not a topic name")
        chosen = ""
    last_seq = Topic.objects.filter(name=chosen).values_list("last_seq", flat=True).first() or 0
    events = sorted(
        set(
            Notification.objects.filter(topic__name=chosen)
            .order_by("-seq")
            .values_list("event", flat=True)[:200]
        )
        | {CONSOLE_EVENT}
    )
    return render(
        request,
        "dashboard/topics.html",
        {
            "nav": "topics",
            "topics": rows,
            "realtime_problem": live.problem,
            "chosen": chosen,
            "console_events": events,
            "console_since": max(0, last_seq - CONSOLE_BACKLOG),
            **(_live(chosen) if chosen else {}),
            "form": ConsolePublishForm(initial={"topic": chosen, "event": CONSOLE_EVENT}),
        },
    )


@staff_member_required
@require_POST
def console_publish(request: HttpRequest) -> JsonResponse:
    """Store a test notification on a topic (source ``user``, ``data.by`` = the staff user):
    ``{"id", "topic", "seq"}``, or 400 with ``{"detail", "errors"}``."""
    form = ConsolePublishForm(request.POST)
    if not form.is_valid():
        return JsonResponse({"detail": "invalid", "errors": form.errors}, status=400)
    data = {**form.cleaned_data["data"], "by": request.user.get_username()}
    item = NotificationIn(
        topic=form.cleaned_data["topic"],
        event=form.cleaned_data["event"] or CONSOLE_EVENT,
        data=data,
        source="user",
        severity=form.cleaned_data["severity"] or "info",
    )
    try:
        [result] = ingest([item])
    except IngestError as exc:
        return JsonResponse({"detail": str(exc), "errors": exc.errors}, status=400)
    except DatabaseError:
        log.warning("dashboard console: could not store the test notification", exc_info=True)
        return JsonResponse({"detail": "the database is unreachable; try again"}, status=503)
    return JsonResponse({"id": result.id, "topic": result.topic, "seq": result.seq})


# --- deliveries --------------------------------------------------------------------------------


@staff_member_required
def deliveries(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "")
    channel = request.GET.get("channel", "")
    rows = Delivery.objects.select_related("channel", "provider", "notification__topic")
    if status in Delivery.Status.values:
        rows = rows.filter(status=status)
    if channel.isdigit():
        rows = rows.filter(channel_id=int(channel))
    page = Paginator(rows.order_by("-created_at"), DELIVERIES_PER_PAGE).get_page(
        request.GET.get("page")
    )
    query = {k: v for k, v in {"status": status, "channel": channel}.items() if v}
    return render(
        request,
        "dashboard/deliveries.html",
        {
            "nav": "deliveries",
            "page": page,
            "statuses": Delivery.Status.choices,
            "channels": Channel.objects.exclude(kind__in=Channel.REALTIME_KINDS),
            "status": status,
            "channel": channel,
            "query": "&".join(f"{k}={v}" for k, v in query.items()),
            "filtered": bool(query),
        },
    )


@staff_member_required
def delivery(request: HttpRequest, delivery_id: int) -> HttpResponse:
    row = get_object_or_404(
        Delivery.objects.select_related("channel", "provider", "notification__topic"),
        pk=delivery_id,
    )
    attempts = row.attempt_rows.select_related("provider").order_by("number")
    return render(
        request,
        "dashboard/delivery.html",
        {
            "nav": "deliveries",
            "delivery": row,
            "attempts": attempts,
            "envelope": json.dumps(row.notification.data, indent=2, sort_keys=True),
        },
    )


@staff_member_required
@require_POST
def delivery_replay(request: HttpRequest, delivery_id: int) -> HttpResponse:
    row = get_object_or_404(Delivery, pk=delivery_id)
    count = service.replay(Delivery.objects.filter(pk=row.pk))
    if count:
        messages.success(request, f"Delivery {row.pk} sent again.")
    else:
        messages.warning(request, f"Delivery {row.pk} is {row.status}, not dead: left as it is.")
    return redirect("dashboard:delivery", delivery_id=row.pk)


# --- alerts ------------------------------------------------------------------------------------


def _changes(alert: Alert) -> list[str]:
    """The alert's history as lines: ``2026-12-03 08:09:29 to: firing, value: 0.12``."""
    lines = []
    for entry in alert.history:
        if not isinstance(entry, dict):
            lines.append(str(entry))
            continue
        rest = ", ".join(f"{k}: {v}" for k, v in entry.items() if k != "at")
        at = str(entry.get("at", ""))[:19].replace("T", " ")
        lines.append(f"{at} {rest}".strip())
    return lines


def _with_changes(alerts) -> list[Alert]:
    rows = list(alerts)
    for alert in rows:
        alert.changes = _changes(alert)
    return rows


@staff_member_required
def alerts(request: HttpRequest) -> HttpResponse:
    form = SilenceForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        silence = form.save(commit=False)
        silence.created_by = request.user
        silence.save()
        messages.success(request, f"Added: {silence}.")
        return redirect("dashboard:alerts")
    now = timezone.now()
    base = Alert.objects.select_related("rule")
    return render(
        request,
        "dashboard/alerts.html",
        {
            "nav": "alerts",
            "firing": _with_changes(base.filter(state=Alert.State.FIRING).order_by("-fired_at")),
            "pending": _with_changes(
                base.filter(state=Alert.State.PENDING).order_by("-pending_since")
            ),
            "resolved": _with_changes(
                base.filter(state=Alert.State.RESOLVED).order_by("-resolved_at")[:RESOLVED_SHOWN]
            ),
            "silences": Silence.objects.select_related("rule", "created_by").filter(
                starts_at__lte=now, ends_at__gt=now
            ),
            "upcoming": Silence.objects.select_related("rule").filter(starts_at__gt=now),
            "form": form,
        },
        status=400 if form.is_bound else 200,
    )
