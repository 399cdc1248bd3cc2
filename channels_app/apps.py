from django.apps import AppConfig


class ChannelsAppConfig(AppConfig):
    name = "channels_app"
    verbose_name = "Realtime edge"

    def ready(self) -> None:
        from routing_app import router

        from . import (
            authz,  # noqa: F401  (connects the rule-cache invalidation signals)
            fanout,
        )

        router.register_after_commit_publisher(fanout.publish_committed)
