"""``/api/v1/``: the ninja API (routing_app.api), its OpenAPI schema and docs page."""

from django.urls import path

from .api import api

urlpatterns = [path("", api.urls)]
