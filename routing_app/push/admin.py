"""Admin of the Web Push subscriptions: who, which push service, when it last worked. Read-only
but for deleting: browsers make subscriptions (POST /api/v1/push/subscriptions), with keys no one
types. Imported by routing_app/admin.py."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.contrib import admin

from .models import PushSubscription


@admin.register(PushSubscription)
class PushSubscriptionAdmin(admin.ModelAdmin):
    list_display = ("user", "push_service", "user_agent", "created_at", "last_success_at", "ok")
    list_filter = ("created_at", "last_success_at")
    search_fields = ("user__username", "user__email", "endpoint", "user_agent")
    list_select_related = ("user",)
    readonly_fields = ("created_at", "last_success_at", "last_error")
    raw_id_fields = ("user",)
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="push service", ordering="endpoint")
    def push_service(self, row: PushSubscription) -> str:
        return urlsplit(row.endpoint).netloc

    @admin.display(description="last send ok", boolean=True)
    def ok(self, row: PushSubscription) -> bool | None:
        if row.last_error:
            return False
        return True if row.last_success_at else None
