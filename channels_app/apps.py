from django.apps import AppConfig


class ChannelsAppConfig(AppConfig):
    name = "channels_app"
    verbose_name = "Realtime edge"

    def ready(self) -> None:
        from . import authz  # noqa: F401  (connects the rule-cache invalidation signals)
