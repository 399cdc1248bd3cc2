"""The router: the one door between persisted notifications and channels.

Called by ingest inside the transaction that stored the notifications:

- ``Delivery`` rows (email/SMS/webhook) are written in that same transaction, so an accepted
  notification never loses its deliveries to a crash between commit and routing;
- realtime publishes (the topic stream to sockets and SSE, and the ``pubsub`` channel kind) happen
  in ``transaction.on_commit``: a client never sees a notification that was rolled back.

The topic stream is published through the after-commit publisher the realtime edge registers at
start-up (``register_after_commit_publisher``, from its ``AppConfig.ready``): dependencies run one
way, and routing_app alone (no realtime edge installed) stores and routes without publishing it.

Realtime fanout is per topic, not per route: every notification is published once on its topic's
stream, because a client's resume reads the same stream from the database (a live path filtered by
routes would disagree with the replayed one). Routes choose the outbound channels: ``pubsub``,
``email``, ``sms``, ``webhook``, ``push`` (one delivery per browser subscription of each user).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save

from .addresses import address_kind
from .delivery import dispatch
from .metrics.instruments import ingested
from .models import SEVERITY_RANK, Channel, Contact, Delivery, Notification, PushSubscription, Route
from .pubsub import publish_pubsub
from .topics import topic_matches

log = logging.getLogger(__name__)

ROUTES_CACHE_S = 5.0  # routes change rarely; other processes see an edit within this time
OUTBOUND_KINDS = Channel.OUTBOUND_KINDS
# The kinds a user is reached over: their contact's email and phone, their push subscriptions.
USER_KINDS = (Channel.Kind.EMAIL, Channel.Kind.SMS, Channel.Kind.PUSH)


@dataclass(frozen=True)
class CompiledRoute:
    name: str
    sources: frozenset[str]
    topic_pattern: str
    min_rank: int
    channels: tuple[tuple[int, str, str], ...]  # (channel id, kind, name)
    # kind -> addresses of the route's users and groups and literal addresses for that kind
    recipients: dict[str, tuple[tuple[str, int | None], ...]]

    def matches(self, n: Notification, topic: str) -> bool:
        return (
            (not self.sources or n.source in self.sources)
            and SEVERITY_RANK[n.severity] >= self.min_rank
            and topic_matches(self.topic_pattern, topic)
        )


_cache: tuple[float, list[CompiledRoute]] | None = None

# Publishes ``[(topic, envelope), ...]`` of committed notifications to realtime subscribers.
CommittedPublisher = Callable[[list[tuple[str, dict]]], None]
_after_commit_publisher: CommittedPublisher | None = None


def register_after_commit_publisher(publish: CommittedPublisher) -> None:
    """Make ``publish`` the realtime publish of every batch of routed notifications, called from
    ``transaction.on_commit`` (so only with committed rows), in any thread, in commit order per
    topic. It may raise: the router logs one warning per batch. One per process; registering
    again replaces it."""
    global _after_commit_publisher
    _after_commit_publisher = publish


def publish_ephemeral(topic: str, event: str, payload: dict) -> bool:
    """Hand the ephemeral event ``event`` of ``topic`` to the topic's realtime subscribers on
    every server process: not stored, no seq, never replayed on a resume (SSE: an event named
    ``event`` without an id; plain socket: an ``event`` frame). For figures that are stale a
    moment later (the dashboard's ticks), which the durable stream must not keep. There is no
    transaction to wait for. The registered publisher carries ``{"type": "event"}`` envelopes
    as it carries notifications (channels_app/hub/wire.py).

    Returns False when no realtime edge is installed; raises the publisher's errors (Redis
    unreachable)."""
    publish = _after_commit_publisher
    if publish is None:
        return False
    publish([(topic, {"type": "event", "topic": topic, "event": event, "payload": payload})])
    return True


def invalidate_routes(**_kwargs) -> None:
    global _cache
    _cache = None


for _model in (Route, Channel, Contact, PushSubscription):
    post_save.connect(invalidate_routes, sender=_model, dispatch_uid=f"routes-{_model.__name__}")
    post_delete.connect(
        invalidate_routes, sender=_model, dispatch_uid=f"routes-d-{_model.__name__}"
    )
for _through in (Route.channels.through, Route.users.through, Route.groups.through):
    m2m_changed.connect(invalidate_routes, sender=_through, dispatch_uid=f"routes-m2m-{_through}")


def user_addresses(user, kind: str) -> list[str]:
    """Where ``user`` is reached over a channel of ``kind``: their email or phone (at most one),
    the endpoints of their push subscriptions, newest first (any number); [] for other kinds."""
    if kind == Channel.Kind.PUSH:
        return [s.endpoint for s in user.push_subscriptions.all()]
    try:
        contact = user.contact
    except Contact.DoesNotExist:
        contact = None
    if kind == Channel.Kind.EMAIL:
        address = (contact.email if contact else "") or user.email
    elif kind == Channel.Kind.SMS:
        address = contact.phone if contact else ""
    else:
        address = ""
    return [address] if address else []


def user_address(user, kind: str) -> str | None:
    """The first of ``user_addresses``, or None: where one delivery reaches ``user`` (a test
    send, a failover: a push subscription's newest browser)."""
    addresses = user_addresses(user, kind)
    return addresses[0] if addresses else None


def _user_addresses(users) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {kind: [] for kind in USER_KINDS}
    for user in users:
        for kind, addresses in out.items():
            addresses.extend((address, user.pk) for address in user_addresses(user, kind))
    return out


def compiled_routes() -> list[CompiledRoute]:
    global _cache
    now = time.monotonic()
    if _cache and now - _cache[0] < ROUTES_CACHE_S:
        return _cache[1]
    User = get_user_model()
    routes = []
    query = Route.objects.filter(enabled=True).prefetch_related("channels", "users", "groups")
    for route in query:
        users = {
            u.pk: u
            for u in route.users.select_related("contact").prefetch_related("push_subscriptions")
        }
        group_ids = [g.pk for g in route.groups.all()]
        if group_ids:
            members = User.objects.filter(groups__in=group_ids, is_active=True)
            for user in members.select_related("contact").prefetch_related("push_subscriptions"):
                users[user.pk] = user
        by_kind = _user_addresses(users.values())
        by_kind["webhook"] = []
        for address in route.literal_addresses():
            kind = address_kind(address)
            if kind:
                by_kind[kind].append((address, None))
        routes.append(
            CompiledRoute(
                name=route.name,
                sources=frozenset(route.sources),
                topic_pattern=route.topic_pattern,
                min_rank=SEVERITY_RANK[route.min_severity],
                channels=tuple((c.pk, c.kind, c.name) for c in route.channels.all() if c.enabled),
                recipients={k: tuple(v) for k, v in by_kind.items()},
            )
        )
    _cache = (now, routes)
    return routes


def route(
    rows: list[Notification],
    topic_ids: dict[str, int],
    extra_recipients: dict[int, list[str]] | None = None,
    also_routes: dict[int, list[str]] | None = None,
) -> list[Delivery]:
    """Route freshly inserted notifications; must run inside their transaction.

    Writes Delivery rows now and schedules realtime publishes and their sending for after
    commit. Returns the deliveries created. ``extra_recipients`` maps ``id(row)`` to literal
    addresses given at ingest; ``also_routes`` maps ``id(row)`` to names of routes that deliver
    it whatever their sources, topic pattern and minimum severity (an alert rule's route); a
    disabled or unknown route delivers nothing.
    """
    names = {tid: name for name, tid in topic_ids.items()}
    routes = compiled_routes()
    deliveries: dict[tuple[int, int, str], Delivery] = {}
    pubsub: list[tuple[str, Notification]] = []
    for n in rows:
        topic = names[n.topic_id]
        extra = (extra_recipients or {}).get(id(n), [])
        named = (also_routes or {}).get(id(n), ())
        for r in routes:
            if r.name not in named and not r.matches(n, topic):
                continue
            for channel_id, kind, _ in r.channels:
                if kind == Channel.Kind.PUBSUB:
                    pubsub.append((topic, n))
                elif kind in OUTBOUND_KINDS:
                    for d in _deliveries_for(n, channel_id, kind, r, extra):
                        # Two routes may name the same recipient: one delivery.
                        deliveries.setdefault((id(n), channel_id, d.recipient), d)
    if deliveries:
        # The notifications are new in this transaction, so no row can conflict: bulk_create
        # returns every id, for the workers.
        created = Delivery.objects.bulk_create(deliveries.values())
        dispatch.schedule_on_commit([d.pk for d in created])
    messages = [(names[n.topic_id], n.envelope(names[n.topic_id])) for n in rows]
    transaction.on_commit(lambda: _publish(messages, pubsub))
    return list(deliveries.values())


def _deliveries_for(n, channel_id, kind, r: CompiledRoute, extra: list[str]) -> list[Delivery]:
    if kind == Channel.Kind.WEBHOOK and not r.recipients.get("webhook") and not extra:
        # A webhook channel's providers are its URLs: one delivery, the balancer picks the URL.
        targets = [("*", None)]
    else:
        targets = list(r.recipients.get(kind, ()))
        targets += [(a, None) for a in extra if address_kind(a) == kind]
    seen = set()
    out = []
    for address, user_id in targets:
        if address in seen:
            continue
        seen.add(address)
        out.append(
            Delivery(notification=n, channel_id=channel_id, recipient=address, user_id=user_id)
        )
    return out


def _publish(messages: list[tuple[str, dict]], pubsub: list[tuple[str, Notification]]) -> None:
    """After commit: the realtime stream, then the pubsub channel kind. Never raises: the
    notification is stored, and clients recover a missed live message from the stream."""
    for source, count in Counter(envelope["source"] for _, envelope in messages).items():
        ingested[source].inc(count)
    publish = _after_commit_publisher
    if publish is not None:
        try:
            publish(messages)
        except Exception:  # noqa: BLE001  (degrade: resume recovers it; log once per batch)
            log.warning(
                "realtime publish failed for %d notification(s)", len(messages), exc_info=True
            )
    if pubsub:
        try:
            publish_pubsub([(topic, n.envelope(topic)) for topic, n in pubsub])
        except Exception:  # noqa: BLE001
            log.warning("pubsub publish failed for %d notification(s)", len(pubsub), exc_info=True)
