"""Topic authorization rules an admin edits. Evaluation lives in ``authz.py``."""

from __future__ import annotations

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models

from routing_app.topics import validate_topic_pattern


class TopicRule(models.Model):
    """One line of an ordered firewall: the first rule (by position) whose pattern matches the
    topic and whose audience includes the user decides. No rule matching = denied.

    Patterns may capture parameters, which must equal the user's attributes for the rule to
    apply: ``user:{user_id}`` applies only to the user whose id is in the topic;
    ``{username}`` compares with the username.
    """

    class Audience(models.TextChoices):
        ANYONE = "anyone", "Anyone, including anonymous clients"
        AUTHENTICATED = "authenticated", "Any logged-in user"
        STAFF = "staff", "Staff users"
        GROUP = "group", "Members of a group"

    class Effect(models.TextChoices):
        ALLOW = "allow"
        DENY = "deny"

    PARAMETERS = ("user_id", "username")

    position = models.PositiveIntegerField(
        default=100, help_text="Lower positions are tried first."
    )
    pattern = models.CharField(
        max_length=200,
        validators=[validate_topic_pattern],
        help_text="'*' one segment, '#' any segments, {user_id} / {username} the user's own.",
    )
    audience = models.CharField(max_length=20, choices=Audience.choices)
    group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.CASCADE)
    effect = models.CharField(max_length=5, choices=Effect.choices, default=Effect.ALLOW)
    can_read = models.BooleanField("join / read", default=True)
    can_publish = models.BooleanField("publish", default=False)
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        who = (
            self.group.name
            if self.audience == self.Audience.GROUP and self.group
            else self.audience
        )
        return f"{self.position}: {self.effect} {self.pattern} for {who}"

    def clean(self) -> None:
        if self.audience == self.Audience.GROUP and not self.group_id:
            raise ValidationError({"group": "choose the group this rule is for"})
        if self.audience != self.Audience.GROUP and self.group_id:
            raise ValidationError({"group": "a group is only used with the 'group' audience"})
        for part in self.pattern.replace(":", ".").split("."):
            if part.startswith("{") and part[1:-1] not in self.PARAMETERS:
                raise ValidationError(
                    {"pattern": f"unknown parameter {part}; use {{user_id}} or {{username}}"}
                )
