from django.contrib import admin
from django.urls import include, path

from routing_app.dashboard import views as dashboard
from routing_app.metrics.exposition import metrics_view

from .api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),  # Prometheus; METRICS_TOKEN or staff
    path("api/v1/", api.urls),  # notify_project/api.py: the ninja API, its OpenAPI schema and docs
    # django-anymail's tracking webhooks (email receipts), behind ANYMAIL_WEBHOOK_SECRET
    path("anymail/", include("routing_app.email_webhooks")),
    path("", include("channels_app.urls")),
    path("dashboard/", include("routing_app.dashboard.urls")),  # operators' pages: staff only
    path("", dashboard.home, name="home"),
]
