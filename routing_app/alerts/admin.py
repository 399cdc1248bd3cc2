"""Admin of the alert rules: rules (enable from the list), their alerts (history, read-only) and
silences (the creator is the user who adds one). Imported by routing_app/admin.py."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, Q
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from .models import Alert, AlertRule, Silence


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "metric",
        "scope",
        "comparator",
        "threshold",
        "window_s",
        "for_s",
        "enabled",
        "firing_count",
    )
    list_editable = ("enabled",)
    list_filter = ("enabled", "metric", "scope", "severity")
    search_fields = ("name", "description", "metric_name")
    list_select_related = ("route",)
    fieldsets = (
        (None, {"fields": ("name", "description", "enabled", "severity")}),
        (
            "Condition",
            {
                "description": "The figure over the window, per scope, compared with the "
                "threshold (first and last snapshot of the window).",
                "fields": (
                    ("metric", "metric_name"),
                    ("scope", "scope_value"),
                    ("comparator", "threshold"),
                    "window_s",
                ),
            },
        ),
        (
            "Timing",
            {
                "description": "Held for 'for' it fires; it resolves once it has not held for "
                "'keep firing for'; a firing alert is notified again every repeat interval.",
                "fields": (("for_s", "keep_firing_for_s", "repeat_interval_s"),),
            },
        ),
        ("Notify", {"fields": ("route",)}),
    )

    def get_queryset(self, request: HttpRequest):
        firing = Count("alerts", filter=Q(alerts__state=Alert.State.FIRING))
        return super().get_queryset(request).annotate(firing_count=firing)

    @admin.display(description="firing", ordering="firing_count")
    def firing_count(self, obj: AlertRule) -> int:
        return obj.firing_count


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = (
        "rule",
        "scope_value",
        "state",
        "value",
        "pending_since",
        "fired_at",
        "resolved_at",
        "silenced",
    )
    list_filter = ("state", "rule", "silenced")
    search_fields = ("rule__name", "scope_value")
    list_select_related = ("rule",)
    date_hierarchy = "pending_since"
    fields = (
        "rule",
        "scope_value",
        "state",
        "value",
        "pending_since",
        "fired_at",
        "last_held_at",
        "resolved_at",
        "last_notified_at",
        "silenced",
        "history_table",
    )
    readonly_fields = fields

    @admin.display(description="history")
    def history_table(self, obj: Alert):
        if not obj.history:
            return "none yet"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    entry.get("at", ""),
                    entry.get("from") or "—",
                    entry.get("to", ""),
                    "—" if entry.get("value") is None else f"{entry['value']:.6g}",
                    entry.get("note", ""),
                )
                for entry in obj.history
            ),
        )
        return format_html(
            "<table><tr><th>at</th><th>from</th><th>to</th><th>value</th><th>note</th></tr>"
            "{}</table>",
            rows,
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the evaluator raises alerts

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class ActiveFilter(admin.SimpleListFilter):
    title = "in force"
    parameter_name = "active"

    def lookups(self, request, model_admin):
        return (("yes", "in force now"), ("future", "not started"), ("ended", "ended"))

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "yes":
            return queryset.filter(starts_at__lte=now, ends_at__gt=now)
        if self.value() == "future":
            return queryset.filter(starts_at__gt=now)
        if self.value() == "ended":
            return queryset.filter(ends_at__lte=now)
        return queryset


@admin.register(Silence)
class SilenceAdmin(admin.ModelAdmin):
    list_display = ("__str__", "rule", "scope_value", "starts_at", "ends_at", "created_by")
    list_filter = (ActiveFilter, "rule")
    search_fields = ("comment", "scope_value", "rule__name")
    list_select_related = ("rule", "created_by")
    fields = ("rule", "scope_value", "starts_at", "ends_at", "comment", "created_by", "created_at")
    readonly_fields = ("created_by", "created_at")

    def save_model(self, request: HttpRequest, obj: Silence, form, change: bool) -> None:
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)
