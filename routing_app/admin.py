"""Admin for the router's data. Validation lives in the models' ``clean()``; the admin's
ModelForms reach it through ``full_clean``.

Notifications and deliveries are history: the admin shows them but never adds or edits them
(deletion stays possible, as retention trimming does it anyway). API keys show their raw key
exactly once, in the message after creation; the stored hash is never displayed.
"""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import Count, IntegerField, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.utils.html import format_html

from .alerts.admin import AlertAdmin, AlertRuleAdmin  # noqa: F401  (registers them)
from .delivery import service
from .delivery.admin import DeliveryAdmin, ProviderAdmin  # noqa: F401  (registers them)
from .models import (
    SOURCES,
    ApiKey,
    Channel,
    Contact,
    Notification,
    Provider,
    Route,
    Source,
    Topic,
)
from .push.admin import PushSubscriptionAdmin  # noqa: F401  (registers it)
from .stream_writes import trim_retention

# --- topics and their streams ---------------------------------------------------------------


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "last_seq",
        "retention_count",
        "retention_days",
        "notification_count",
        "created_at",
    )
    search_fields = ("name", "description")
    readonly_fields = ("last_seq", "created_at")
    fields = ("name", "description", "last_seq", "retention_count", "retention_days", "created_at")
    actions = ("trim_now",)

    def get_queryset(self, request: HttpRequest):
        # A correlated subquery, not a JOIN + GROUP BY: only the topics on the page are counted.
        count = (
            Notification.objects.filter(topic=OuterRef("pk"))
            .order_by()
            .values("topic")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(notification_count=Coalesce(Subquery(count, output_field=IntegerField()), 0))
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Topic | None = None):
        # Renaming a topic would cut it off from its subscribers and from resuming clients.
        return (*self.readonly_fields, "name") if obj else self.readonly_fields

    @admin.display(description="notifications stored", ordering="notification_count")
    def notification_count(self, obj: Topic) -> int:
        return obj.notification_count

    @admin.action(description="Trim retention of the selected topics now")
    def trim_now(self, request: HttpRequest, queryset) -> None:
        deleted = sum(trim_retention(topic) for topic in queryset)
        self.message_user(request, f"Deleted {deleted} notification(s) past retention.")


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ("topic", "seq", "event", "severity", "source", "created_at")
    list_filter = ("source", "severity", "topic")
    search_fields = ("event", "idempotency_key", "=topic__name")
    list_select_related = ("topic",)
    ordering = ("-created_at",)
    fields = (
        "id",
        "topic",
        "seq",
        "event",
        "severity",
        "source",
        "data_json",
        "idempotency_key",
        "created_at",
    )
    readonly_fields = fields

    @admin.display(description="data")
    def data_json(self, obj: Notification):
        return format_html("<pre>{}</pre>", json.dumps(obj.data, indent=2, ensure_ascii=False))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # notifications enter through ingest, which takes the seq

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # history is immutable; clients may already have seen it


# --- channels, providers, routes, deliveries ------------------------------------------------


class ProviderInline(admin.TabularInline):
    model = Provider
    extra = 0
    fields = ("name", "url", "weight", "enabled", "credentials_env", "rate_limit", "healthy")
    readonly_fields = ("healthy",)


@admin.register(Channel)
class ChannelAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "enabled", "backup", "rate_limit", "provider_count")
    list_editable = ("enabled",)
    list_filter = ("kind", "enabled")
    search_fields = ("name",)
    list_select_related = ("backup",)
    inlines = (ProviderInline,)
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled", "backup", "options")}),
        ("Limits", {"fields": ("rate_limit", "max_message_bytes")}),
        (
            "Retries",
            {
                "description": "A try calls each provider at most once (failover); a failed try "
                "is retried after an exponential backoff with full jitter; after the last try "
                "the delivery is dead and goes to the backup channel.",
                "fields": (("max_attempts", "retry_backoff_s", "retry_backoff_max_s"),),
            },
        ),
        (
            "Circuit breaker (per provider)",
            {
                "description": "Opens when the failure rate or the slow-call rate over the "
                "window reaches its limit (after the minimum number of calls); stays open for "
                "the open duration (doubling on each re-open up to the longest, if set), then "
                "lets the trial calls through and, once all have completed, closes when enough "
                "of them succeeded, else opens again.",
                "fields": (
                    ("breaker_failure_rate", "breaker_window_s", "breaker_minimum_calls"),
                    ("breaker_slow_call_ms", "breaker_slow_rate", "breaker_call_timeout_ms"),
                    ("breaker_open_s", "breaker_open_max_s"),
                    ("breaker_half_open_calls", "breaker_half_open_success"),
                ),
            },
        ),
    )

    actions = ("send_test",)

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).annotate(provider_count=Count("providers"))

    @admin.display(description="providers", ordering="provider_count")
    def provider_count(self, obj: Channel) -> int:
        return obj.provider_count

    @admin.action(description="Send a test notification to me")
    def send_test(self, request: HttpRequest, queryset) -> None:
        for channel in queryset:
            try:
                row = service.send_test(channel, request.user)
            except ValueError as exc:
                self.message_user(request, f"{channel.name}: {exc}", messages.WARNING)
            else:
                self.message_user(
                    request,
                    f"{channel.name}: test delivery {row.pk} to {row.recipient} queued; "
                    "see Deliveries for its attempts.",
                )


class SourcesField(forms.TypedMultipleChoiceField):
    """A JSON list of sources edited as checkboxes; an empty list means every source."""

    def __init__(self, **kwargs):
        kwargs.setdefault("help_text", "None checked = every source.")
        super().__init__(
            choices=Source.choices, required=False, widget=forms.CheckboxSelectMultiple, **kwargs
        )


class RouteForm(forms.ModelForm):
    sources = SourcesField()

    class Meta:
        model = Route
        fields = (
            "name",
            "enabled",
            "sources",
            "topic_pattern",
            "min_severity",
            "channels",
            "users",
            "groups",
            "addresses",
        )


@admin.register(Route)
class RouteAdmin(admin.ModelAdmin):
    form = RouteForm
    list_display = ("name", "enabled", "topic_pattern", "min_severity", "source_list", "targets")
    list_editable = ("enabled",)
    list_filter = ("enabled", "min_severity", "channels")
    search_fields = ("name", "topic_pattern", "addresses")
    filter_horizontal = ("channels", "users", "groups")
    fieldsets = (
        (None, {"fields": ("name", "enabled")}),
        ("Match", {"fields": ("sources", "topic_pattern", "min_severity")}),
        ("Deliver to", {"fields": ("channels", "users", "groups", "addresses")}),
    )

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).prefetch_related("channels")

    @admin.display(description="sources")
    def source_list(self, obj: Route) -> str:
        return ", ".join(obj.sources) or "all"

    @admin.display(description="channels")
    def targets(self, obj: Route) -> str:
        return ", ".join(c.name for c in obj.channels.all())


# --- people and keys ------------------------------------------------------------------------


@admin.register(Contact)
class ContactAdmin(admin.ModelAdmin):
    list_display = ("user", "email", "phone")
    search_fields = ("user__username", "user__email", "email", "phone")
    list_select_related = ("user",)
    autocomplete_fields = ("user",)


class ContactInline(admin.StackedInline):
    model = Contact
    can_delete = True
    extra = 0
    max_num = 1
    verbose_name = "contact (email and SMS)"


User = get_user_model()
if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class NotifyUserAdmin(UserAdmin):
    """Django's user admin with the contact profile inline."""

    inlines = (*UserAdmin.inlines, ContactInline)


class ApiKeyForm(forms.ModelForm):
    scopes = forms.TypedMultipleChoiceField(
        choices=[(s, s) for s in ApiKey.SCOPES],
        widget=forms.CheckboxSelectMultiple,
        help_text="ingest posts notifications; tokens mints client tokens; deliveries reads "
        "and replays deliveries.",
    )
    allowed_sources = forms.TypedMultipleChoiceField(
        choices=[(s, s) for s in SOURCES],
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None checked = every source.",
    )

    class Meta:
        model = ApiKey
        fields = ("name", "scopes", "allowed_sources", "allowed_topics", "rate", "revoked")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ("name", "prefix", "scopes", "allowed_sources", "last_used_at", "revoked")
    list_filter = ("revoked",)
    search_fields = ("name", "=prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    actions = ("revoke",)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None):
        fields = list(ApiKeyForm.Meta.fields)
        # hashed_key is never among them: a hash is of no use to a reader and helps an attacker.
        return fields + list(self.readonly_fields) if obj else fields

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        raw = None if change else obj.set_new_key()
        super().save_model(request, obj, form, change)
        if raw:
            messages.success(
                request,
                format_html(
                    "API key for “{}”: <code>{}</code> — copy it now: it is shown only this "
                    "once (only its hash is stored).",
                    obj.name,
                    raw,
                ),
            )

    @admin.action(description="Revoke the selected API keys")
    def revoke(self, request: HttpRequest, queryset) -> None:
        count = queryset.filter(revoked=False).update(revoked=True)
        self.message_user(request, f"Revoked {count} API key(s).")
