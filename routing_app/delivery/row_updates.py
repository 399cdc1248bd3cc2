"""Many rows of one model changed in one ``UPDATE ... FROM (VALUES ...)`` statement.

Django's ``bulk_update`` builds a ``CASE WHEN id = ... THEN ...`` expression per field per row and
resolves each through the ORM: for a batch of 50 deliveries that was over half of the worker's CPU
per email or webhook in bench/delivery_cpu.py's profile, more than the call itself. Here each row
is one tuple of parameters, converted by its field as a save would (``get_db_prep_save``), and
fields with the same value in every row are set once.

Postgres and SQLite (3.33 or later, for ``UPDATE ... FROM``) both name the columns of a ``VALUES``
list ``column1``, ``column2``, ...; on Postgres each is cast to its field's type, so a column that
is NULL in every row is not taken for text.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.db import connections, router
from django.db.models import Model


def update_each(
    model: type[Model],
    rows: Sequence[Model],
    fields: Sequence[str],
    common: dict[str, object] | None = None,
) -> int:
    """Write ``fields`` of each of ``rows`` (their current attribute values) and the ``common``
    field values to every one, in one statement; return the number of rows updated. Rows must be
    saved (have a primary key). ``fields`` and ``common`` name concrete fields (a foreign key by
    its field name: the row's ``<name>_id`` is written)."""
    if not rows:
        return 0
    common = common or {}
    db = router.db_for_write(model)
    connection = connections[db]
    meta = model._meta
    quote = connection.ops.quote_name
    pk = meta.pk
    per_row = [pk, *(meta.get_field(name) for name in fields)]
    postgres = connection.vendor == "postgresql"

    def column(i: int, field) -> str:
        ref = f"v.column{i}"
        return f"CAST({ref} AS {field.db_type(connection)})" if postgres else ref

    assignments = [
        f"{quote(field.column)} = {column(i, field)}"
        for i, field in enumerate(per_row[1:], start=2)
    ]
    params: list[object] = []
    for name, value in common.items():
        field = meta.get_field(name)
        assignments.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    tuple_sql = "(" + ", ".join(["%s"] * len(per_row)) + ")"
    values = []
    for row in rows:
        values.append(tuple_sql)
        params.extend(
            field.get_db_prep_save(getattr(row, field.attname), connection) for field in per_row
        )
    table = quote(meta.db_table)
    # Only quoted names from the model's meta are formatted in; every value is a parameter.
    sql = (
        f"UPDATE {table} SET {', '.join(assignments)} "  # noqa: S608
        f"FROM (VALUES {', '.join(values)}) AS v "
        f"WHERE {table}.{quote(pk.column)} = {column(1, pk)}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
