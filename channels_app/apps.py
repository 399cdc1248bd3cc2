from django.apps import AppConfig


class ChannelsAppConfig(AppConfig):
    name = "channels_app"
    verbose_name = "Realtime edge"

    def ready(self) -> None:
        from routing_app.router import register_after_commit_publisher

        from . import authz  # noqa: F401  (connects the rule-cache invalidation signals)
        from .hub import hub

        # The router publishes committed notifications through the hub: routing_app never
        # imports the realtime edge.
        register_after_commit_publisher(hub.publish_committed)
        # `notify tail` in a process of its own wakes on the channel the hub publishes on.
        from routing_app.stream_follow import register_wakeup_channel

        register_wakeup_channel(hub.topic_channel)
        # The dashboard's topics page shows this process's subscribers and who is present.
        from routing_app.dashboard.realtime import register_realtime_view

        from .topic_figures import topics_realtime

        register_realtime_view(topics_realtime)
