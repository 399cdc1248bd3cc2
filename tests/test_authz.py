"""Topic authorization: the fresh-install rules and the first-match firewall."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import Group

from channels_app import tokens
from channels_app.authz import PUBLISH, READ, Principal, decide
from channels_app.models import TopicRule


def who(user) -> Principal:
    return Principal.from_user(user)


@pytest.mark.django_db
def test_staff_may_join_and_publish_every_topic(operator):
    for topic in ("system.health", "user:999", "alerts.k8s"):
        assert decide(who(operator), topic, READ).allowed
        assert decide(who(operator), topic, PUBLISH).allowed


@pytest.mark.django_db
def test_system_topics_are_staff_only(subscriber):
    decision = decide(who(subscriber), "system.health", READ)
    assert not decision.allowed and "closed" in decision.reason


@pytest.mark.django_db
def test_user_topic_is_readable_by_that_user_only(subscriber, outsider):
    own = f"user:{subscriber.pk}"
    assert decide(who(subscriber), own, READ).allowed
    assert not decide(who(outsider), own, READ).allowed
    assert not decide(who(subscriber), own, PUBLISH).allowed


@pytest.mark.django_db
def test_logged_in_users_read_other_topics_but_anonymous_do_not(subscriber):
    assert decide(who(subscriber), "alerts.k8s", READ).allowed
    assert not decide(who(subscriber), "alerts.k8s", PUBLISH).allowed
    assert not decide(Principal.anonymous(), "alerts.k8s", READ).allowed


@pytest.mark.django_db
def test_group_rule_grants_publish_to_members(subscriber, outsider):
    team = Group.objects.create(name="flow-team")
    subscriber.groups.add(team)
    TopicRule.objects.create(
        position=45, pattern="reverse_flow:*", audience="group", group=team, can_publish=True
    )
    assert decide(who(subscriber), "reverse_flow:cluster-a", PUBLISH).allowed
    assert not decide(who(outsider), "reverse_flow:cluster-a", PUBLISH).allowed


@pytest.mark.django_db
def test_no_matching_rule_denies():
    TopicRule.objects.all().delete()
    decision = decide(Principal(user_id=1), "alerts.k8s", READ)
    assert not decision.allowed and "no rule" in decision.reason


def test_token_round_trip_and_refusals(settings):
    token = tokens.mint(42, ttl_s=60)
    assert tokens.verify(token.token) == 42
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify(token.token[:-2] + "xx")
    forged = tokens.signing.dumps({"u": 1, "e": time.time() + 60}, salt="another-salt")
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify(forged)
    expired = tokens.signing.dumps({"u": 42, "e": time.time() - 1}, salt=tokens.SALT)
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(expired)
    with pytest.raises(ValueError):
        tokens.mint(42, ttl_s=settings.TOKEN_MAX_TTL_S + 1)
