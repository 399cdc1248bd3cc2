"""Every install starts with the seed report's five alert rules (edited in admin afterwards)."""

from django.db import migrations

RULES = [
    {
        "name": "delivery-latency-p95",
        "description": "p95 delivery latency above 100 ms",
        "metric": "latency_p95_s",
        "comparator": ">",
        "threshold": 0.1,
        "severity": "warning",
    },
    {
        "name": "delivery-error-rate",
        "description": "more than 5 % of provider calls fail",
        "metric": "error_rate",
        "scope": "channel",
        "comparator": ">",
        "threshold": 0.05,
        "severity": "error",
    },
    {
        "name": "connection-drops",
        "description": "more than 10 % of connections dropped (not closed by their clients)",
        "metric": "connection_drop_rate",
        "comparator": ">",
        "threshold": 0.1,
        "severity": "warning",
    },
    {
        "name": "process-memory",
        "description": "a role's processes hold more than 512 MB",
        "metric": "memory_bytes",
        "scope": "role",
        "comparator": ">",
        "threshold": 512 * 1024 * 1024,
        "severity": "warning",
    },
    {
        "name": "queue-depth",
        "description": "more than 1000 messages wait in the Celery queue",
        "metric": "queue_depth",
        "comparator": ">",
        "threshold": 1000,
        "severity": "error",
    },
]


def seed(apps, schema_editor):
    AlertRule = apps.get_model("routing_app", "AlertRule")
    for rule in RULES:
        AlertRule.objects.get_or_create(name=rule["name"], defaults=rule)


def unseed(apps, schema_editor):
    AlertRule = apps.get_model("routing_app", "AlertRule")
    AlertRule.objects.filter(name__in=[r["name"] for r in RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("routing_app", "0003_alert_rules")]
    operations = [migrations.RunPython(seed, unseed)]
