from django.urls import path

from . import views

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("channels/", views.channels, name="channels"),
    path("providers/<int:provider_id>/breaker/", views.breaker_action, name="breaker"),
    path("topics/", views.topics, name="topics"),
    path("console/publish/", views.console_publish, name="console-publish"),
    path("deliveries/", views.deliveries, name="deliveries"),
    path("deliveries/<int:delivery_id>/", views.delivery, name="delivery"),
    path("deliveries/<int:delivery_id>/replay/", views.delivery_replay, name="replay"),
    path("alerts/", views.alerts, name="alerts"),
]
