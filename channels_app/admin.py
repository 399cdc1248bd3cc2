"""Admin for the topic rules: an ordered firewall, edited as a list (first match decides)."""

from __future__ import annotations

from django.contrib import admin

from .models import TopicRule


@admin.register(TopicRule)
class TopicRuleAdmin(admin.ModelAdmin):
    list_display = (
        "position",
        "pattern",
        "audience",
        "group",
        "effect",
        "can_read",
        "can_publish",
        "description",
    )
    list_display_links = ("pattern",)
    list_editable = ("position", "effect")
    list_filter = ("effect", "audience")
    search_fields = ("pattern", "description")
    list_select_related = ("group",)
    ordering = ("position", "id")
    fields = (
        ("position", "effect"),
        "pattern",
        ("audience", "group"),
        ("can_read", "can_publish"),
        "description",
    )
