from django.apps import AppConfig


class RoutingAppConfig(AppConfig):
    name = "routing_app"
    verbose_name = "Routing"

    def ready(self) -> None:
        from . import router  # noqa: F401  (connects the route-cache invalidation signals)
        from .delivery import receipts  # noqa: F401  (connects django-anymail's tracking signal)
