"""A fresh install's topic rules (first match decides):

10 staff may join and publish on every topic;
20 system.* is closed to everyone else;
30 user:{user_id} is readable by that user only;
40 every other user:* topic is closed;
50 other topics are readable by any logged-in user.
"""

from django.db import migrations

DEFAULTS = [
    (10, "#", "staff", "allow", True, True, "staff may join and publish everywhere"),
    (20, "system.#", "anyone", "deny", False, False, "system topics are staff only"),
    (30, "user:{user_id}", "authenticated", "allow", True, False, "a user's own topic"),
    (40, "user:*", "anyone", "deny", False, False, "other users' topics"),
    (50, "#", "authenticated", "allow", True, False, "logged-in users read other topics"),
]


def create_defaults(apps, schema_editor):
    TopicRule = apps.get_model("channels_app", "TopicRule")
    for position, pattern, audience, effect, read, publish, description in DEFAULTS:
        TopicRule.objects.get_or_create(
            position=position,
            pattern=pattern,
            defaults=dict(
                audience=audience,
                effect=effect,
                can_read=read,
                can_publish=publish,
                description=description,
            ),
        )


def remove_defaults(apps, schema_editor):
    TopicRule = apps.get_model("channels_app", "TopicRule")
    for position, pattern, *_ in DEFAULTS:
        TopicRule.objects.filter(position=position, pattern=pattern).delete()


class Migration(migrations.Migration):
    dependencies = [("channels_app", "0001_topic_rules")]
    operations = [migrations.RunPython(create_defaults, remove_defaults)]
