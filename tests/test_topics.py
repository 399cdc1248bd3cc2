"""Topic names and patterns (routing_app/topics.py), and the other validators anchored the same
way: a value with a trailing newline is not the value without it."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from routing_app.delivery.rendering import EVENT_FILE_NAME_RE
from routing_app.delivery.transports.email import ESP_NAME_RE
from routing_app.models import RATE_RE
from routing_app.topics import (
    is_valid_topic,
    match_topic,
    topic_matches,
    validate_topic_name,
    validate_topic_pattern,
)


@pytest.mark.parametrize("name", ["alerts.k8s", "reverse_flow:cluster-a", "user:42", "a"])
def test_well_formed_topic_names_are_valid(name):
    assert is_valid_topic(name)
    validate_topic_name(name)


@pytest.mark.parametrize(
    "name", ["alerts.k8s\n", "alerts.k8s\r\n", "\nalerts.k8s", "alerts.\nk8s", "Alerts", "a..b", ""]
)
def test_a_topic_name_with_a_newline_or_bad_segment_is_refused(name):
    assert not is_valid_topic(name)
    with pytest.raises(ValidationError):
        validate_topic_name(name)


@pytest.mark.parametrize("pattern", ["alerts.*\n", "k8s.#\n", "user:{user_id}\n"])
def test_a_topic_pattern_with_a_trailing_newline_is_refused(pattern):
    with pytest.raises(ValidationError):
        validate_topic_pattern(pattern)
    validate_topic_pattern(pattern.rstrip("\n"))


def test_a_pattern_does_not_match_a_topic_with_a_trailing_newline():
    assert topic_matches("alerts.*", "alerts.disk")
    assert not topic_matches("alerts.*", "alerts.disk\n")
    assert not topic_matches("alerts.disk", "alerts.disk\n")
    assert match_topic("user:{user_id}", "user:42\n") is None


@pytest.mark.parametrize(
    ("regex", "value"),
    [(EVENT_FILE_NAME_RE, "pod.crash"), (ESP_NAME_RE, "sendgrid"), (RATE_RE, "10/s")],
)
def test_other_validators_refuse_a_trailing_newline(regex, value):
    assert regex.match(value)
    assert not regex.match(value + "\n")


@pytest.mark.django_db
def test_ingest_refuses_a_topic_with_a_trailing_newline():
    from routing_app.ingest import IngestError, NotificationIn, ingest
    from routing_app.models import Topic

    with pytest.raises(IngestError, match="topic"):
        ingest([NotificationIn(topic="alerts.k8s\n", event="tick", data={})])
    assert not Topic.objects.filter(name="alerts.k8s\n").exists()
