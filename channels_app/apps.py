from django.apps import AppConfig


class ChannelsAppConfig(AppConfig):
    name = "channels_app"
    verbose_name = "Realtime edge"

    def ready(self) -> None:
        from routing_app.router import register_after_commit_publisher

        from . import authz  # noqa: F401  (connects the rule-cache invalidation signals)
        from .fanout import publish

        # The router publishes committed notifications through the realtime edge: routing_app
        # never imports it.
        register_after_commit_publisher(publish)
