"""Many rows of one model changed in one ``UPDATE ... FROM (VALUES ...)`` statement.

Django's ``bulk_update`` builds a ``CASE WHEN id = ... THEN ...`` expression per field per row and
resolves each through the ORM: for a batch of 50 deliveries that was over half of the worker's CPU
per email or webhook in bench/delivery_cpu.py's profile, more than the call itself. Here each row
is one tuple of parameters, converted by its field as a save would (``get_db_prep_save``), and
fields with the same value in every row are set once.

On Postgres the rows come as one array per column (``UNNEST(%s::integer[], ...)``), each cast to
its field's type (so a column that is NULL in every row is not taken for text); on SQLite (3.33 or
later, for ``UPDATE ... FROM``) as a ``VALUES`` list, whose columns it names ``column1``, ...
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
    table = quote(meta.db_table)
    # Postgres: one array per column (UNNEST), a handful of parameters whatever the number of
    # rows, so psycopg keeps the statement's parsing in its cache (it does not above 50
    # parameters, and parsing 250 placeholders was most of this statement's cost).
    prefix = "c" if postgres else "column"
    names = [f"{prefix}{i}" for i in range(1, len(per_row) + 1)]
    assignments = [
        f"{quote(field.column)} = v.{name}"
        for field, name in zip(per_row[1:], names[1:], strict=True)
    ]
    params: list[object] = []
    for name, value in common.items():
        field = meta.get_field(name)
        assignments.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    columns = [
        [field.get_db_prep_save(getattr(row, field.attname), connection) for row in rows]
        for field in per_row
    ]
    if postgres:
        arrays = ", ".join(f"%s::{field.db_type(connection)}[]" for field in per_row)
        source = f"UNNEST({arrays}) AS v({', '.join(names)})"
        params.extend(columns)
    else:
        one = "(" + ", ".join(["%s"] * len(per_row)) + ")"
        source = f"(VALUES {', '.join([one] * len(rows))}) AS v"
        params.extend(value for row in zip(*columns, strict=True) for value in row)
    # Only quoted names from the model's meta are formatted in; every value is a parameter.
    sql = (
        f"UPDATE {table} SET {', '.join(assignments)} FROM {source} "  # noqa: S608
        f"WHERE {table}.{quote(pk.column)} = v.{names[0]}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
