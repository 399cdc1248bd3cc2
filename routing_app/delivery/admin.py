"""Admin of outbound delivery: deliveries with their attempts and replay, providers with their
health and breaker (actions reset, force open), and the breakers themselves. Imported by
routing_app/admin.py, which Django's admin discovers."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from ..models import Delivery, Provider
from . import service, transitions
from .models import Attempt, BreakerState


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = ("number", "provider", "started_at", "duration_ms", "outcome", "http_status", "error")
    readonly_fields = fields
    ordering = ("number",)

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "pk",
        "notification",
        "channel",
        "recipient",
        "status",
        "attempts",
        "provider",
        "short_error",
        "updated_at",
    )
    list_filter = ("status", "channel__kind", "channel")
    search_fields = ("recipient", "last_error", "=notification__id")
    list_select_related = ("notification", "channel", "provider__channel")
    date_hierarchy = "created_at"
    inlines = (AttemptInline,)
    actions = ("retry_now",)

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the router writes deliveries; the delivery worker updates them

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    @admin.display(description="last error")
    def short_error(self, obj: Delivery) -> str:
        return obj.last_error[:80] + ("…" if len(obj.last_error) > 80 else "")

    @admin.action(description="Retry now (dead deliveries)")
    def retry_now(self, request: HttpRequest, queryset) -> None:
        count = service.replay(queryset)
        skipped = queryset.count() - count
        self.message_user(
            request,
            f"{count} dead delivery(s) sent again."
            + (f" {skipped} not dead, left as they are." if skipped else ""),
            messages.SUCCESS if count else messages.WARNING,
        )


def _breaker_action(action: str, verb: str):
    def run(modeladmin, request: HttpRequest, queryset) -> None:
        for provider in queryset.select_related("channel"):
            snapshot = transitions.control(provider, action)
            modeladmin.message_user(request, f"{provider}: breaker {verb}, now {snapshot.state}.")

    run.__name__ = f"breaker_{action}"
    return admin.action(description=f"Breaker: {verb}")(run)


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "channel",
        "url",
        "weight",
        "enabled",
        "health",
        "breaker_state",
        "credentials_env",
    )
    list_filter = ("channel__kind", "enabled", "healthy")
    search_fields = ("name", "url", "channel__name")
    list_select_related = ("channel", "breaker")
    readonly_fields = ("healthy", "health_checked_at", "health_error")
    actions = (
        _breaker_action("reset", "reset"),
        _breaker_action("open", "forced open"),
        _breaker_action("disable", "disabled"),
    )

    @admin.display(description="health", ordering="healthy")
    def health(self, obj: Provider):
        if obj.health_checked_at is None:
            return "not checked yet"
        if obj.healthy:
            return format_html('<span title="checked {}">healthy</span>', obj.health_checked_at)
        return format_html(
            '<b title="checked {}">unhealthy</b>: {}', obj.health_checked_at, obj.health_error
        )

    @admin.display(description="breaker")
    def breaker_state(self, obj: Provider) -> str:
        try:
            return obj.breaker.get_state_display()
        except BreakerState.DoesNotExist:
            return "closed"


@admin.register(BreakerState)
class BreakerStateAdmin(admin.ModelAdmin):
    list_display = (
        "provider",
        "state",
        "failure_rate",
        "slow_rate",
        "calls",
        "opened_at",
        "updated_at",
    )
    list_filter = ("state",)
    list_select_related = ("provider__channel",)
    readonly_fields = (
        "provider",
        "state",
        "failure_rate",
        "slow_rate",
        "calls",
        "failures",
        "slow_calls",
        "opened_at",
        "updated_at",
        "transition_log",
    )
    exclude = ("transitions",)
    actions = ("reset", "force_open")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # one row per provider, written by the breaker

    @admin.display(description="latest transitions")
    def transition_log(self, obj: BreakerState):
        if not obj.transitions:
            return "none yet"
        items = format_html_join(
            "",
            "<li>{} {} → {}: {}</li>",
            ((t["at"], t["from"], t["to"], t["reason"]) for t in obj.transitions),
        )
        return format_html("<ul>{}</ul>", items)

    @admin.action(description="Reset (closed, window cleared)")
    def reset(self, request: HttpRequest, queryset) -> None:
        for row in queryset.select_related("provider__channel"):
            transitions.control(row.provider, "reset")
        self.message_user(request, f"{queryset.count()} breaker(s) reset.")

    @admin.action(description="Force open (refuse calls until reset)")
    def force_open(self, request: HttpRequest, queryset) -> None:
        for row in queryset.select_related("provider__channel"):
            transitions.control(row.provider, "open")
        self.message_user(request, f"{queryset.count()} breaker(s) forced open.")
