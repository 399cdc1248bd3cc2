"""Topic authorization: may this user read (join) or publish on this topic?

Rules are ``TopicRule`` rows (an ordered firewall, first match decides; see models.py). They are
cached per process for ``RULES_CACHE_S``: an admin's edit reaches every process within that time
(an accepted staleness; a socket already joined keeps its subscription until it leaves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.db.models.signals import post_delete, post_save

from routing_app.topics import match_topic

from .models import TopicRule

RULES_CACHE_S = 5.0
READ = "read"
PUBLISH = "publish"


@dataclass(frozen=True)
class Principal:
    """Who is asking: what the rules need of a user, loaded once per connection."""

    user_id: int | None
    username: str = ""
    is_staff: bool = False
    group_ids: frozenset[int] = frozenset()

    @property
    def is_authenticated(self) -> bool:
        return self.user_id is not None

    @classmethod
    def anonymous(cls) -> Principal:
        return cls(user_id=None)

    @classmethod
    def from_user(cls, user) -> Principal:
        if user is None or not user.is_authenticated or not user.is_active:
            return cls.anonymous()
        return cls(
            user_id=user.pk,
            username=user.get_username(),
            is_staff=user.is_staff or user.is_superuser,
            group_ids=frozenset(user.groups.values_list("pk", flat=True)),
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


_cache: tuple[float, list[TopicRule]] | None = None


def invalidate_rules(**_kwargs) -> None:
    global _cache
    _cache = None


post_save.connect(invalidate_rules, sender=TopicRule, dispatch_uid="topic-rules-save")
post_delete.connect(invalidate_rules, sender=TopicRule, dispatch_uid="topic-rules-delete")


def _rules() -> list[TopicRule]:
    global _cache
    now = time.monotonic()
    if _cache is None or now - _cache[0] > RULES_CACHE_S:
        _cache = (now, list(TopicRule.objects.all()))
    return _cache[1]


def _audience_includes(rule: TopicRule, who: Principal) -> bool:
    if rule.audience == TopicRule.Audience.ANYONE:
        return True
    if rule.audience == TopicRule.Audience.AUTHENTICATED:
        return who.is_authenticated
    if rule.audience == TopicRule.Audience.STAFF:
        return who.is_staff
    return rule.group_id in who.group_ids


def _parameters_match(params: dict[str, str], who: Principal) -> bool:
    for name, value in params.items():
        if name == "user_id" and (who.user_id is None or value != str(who.user_id)):
            return False
        if name == "username" and (not who.is_authenticated or value != who.username.lower()):
            return False
    return True


def decide(who: Principal, topic: str, right: str) -> Decision:
    """First rule matching topic and audience decides. ``right`` is READ or PUBLISH."""
    for rule in _rules():
        params = match_topic(rule.pattern, topic)
        if (
            params is None
            or not _parameters_match(params, who)
            or not _audience_includes(rule, who)
        ):
            continue
        if rule.effect == TopicRule.Effect.DENY:
            return Decision(False, f"topic {topic!r} is closed to you (rule {rule.position})")
        granted = rule.can_read if right == READ else rule.can_publish
        if granted:
            return Decision(True, f"allowed by rule {rule.position}")
        return Decision(False, f"you may not {right} on topic {topic!r} (rule {rule.position})")
    return Decision(False, f"no rule lets you {right} on topic {topic!r}")


async def adecide(who: Principal, topic: str, right: str) -> Decision:
    if _cache is not None and time.monotonic() - _cache[0] <= RULES_CACHE_S:
        return decide(who, topic, right)  # no database on the fast path
    return await sync_to_async(decide)(who, topic, right)


async def aprincipal(user) -> Principal:
    return await sync_to_async(Principal.from_user)(user)
