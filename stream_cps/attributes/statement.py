"""One statement for a batch: any set of compiled attributes, one JSON object per entity.

Row-form attributes share the ``event_rows`` scan and the ``grouped`` aggregation; every other
attribute is a CTE. Each part yields one object per entity and the parts are merged by joining on
the entity, so no key/value rows have to be regrouped.

A value larger than ``%(max_bytes)s`` (``attributes.max_value_bytes``) is left out of the object
and its key listed in the third column: one entity's 150,000-row custom query must become an
error of that attribute, not a document too big to store, index or send to OpenSearch. Sizes are
checked per part first (``pg_column_size`` of a datum in memory is cheap); only a part over the
limit is opened to find which of its keys are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

from stream_cps.attributes.compiler import EVENTS, IDS, MINE, CompiledAttribute, Compiler


def statement(
    attributes: Sequence[CompiledAttribute], max_bytes: int
) -> tuple[sql.Composed, dict[str, Any]]:
    """One statement computing ``attributes`` for the batch: rows (entity_id, attributes as
    JSON text, ids of attributes whose value was over ``max_bytes`` or NULL)."""
    params: dict[str, Any] = {"max_bytes": max_bytes}
    ctes: list[sql.Composable] = []
    parts: list[sql.Composable] = []
    row_form = [a for a in attributes if a.laterals is not None]
    if row_form:
        columns = sql.SQL(", ").join(
            sql.SQL("{o}.v AS {v}, {o}.w AS {w}").format(
                o=sql.Identifier(f"o{a.index}"),
                v=sql.Identifier(f"v{a.index}"),
                w=sql.Identifier(f"w{a.index}"),
            )
            for a in row_form
        )
        ctes.append(
            sql.SQL(
                "event_rows AS (SELECT e.entity_id, e.id, e.event_time, {columns} FROM {events} "
                "AS e {laterals} WHERE {mine})"
            ).format(
                columns=columns,
                events=EVENTS,
                laterals=sql.SQL(" ").join(a.laterals for a in row_form if a.laterals),
                mine=MINE,
            )
        )
    grouped = [a for a in row_form if a.aggregate is not None]
    if grouped:
        ctes.append(
            sql.SQL(
                "grouped AS (SELECT entity_id, jsonb_strip_nulls({}) AS o FROM event_rows "
                "GROUP BY entity_id)"
            ).format(_object(grouped))
        )
        parts.append(sql.SQL("grouped"))
    for compiled in attributes:
        key = f"k{compiled.index}"
        params.update(compiled.params)
        params[key] = compiled.attribute_id
        name = sql.Identifier(f"attr_{compiled.index}")
        if compiled.aggregate is not None:
            continue
        if compiled.frequency is not None:
            body: sql.Composable = _frequency(compiled)
        else:
            assert compiled.body is not None
            body = compiled.body
        ctes.append(
            sql.SQL(
                "{} AS (SELECT entity_id, jsonb_build_object({}::text, j) AS o FROM ({}) AS a "
                "WHERE j IS NOT NULL)"
            ).format(name, sql.Placeholder(key), body)
        )
        parts.append(name)
    # one object per entity and CTE, joined on the entity: no regrouping of key/value rows
    joins = sql.SQL(" ").join(
        sql.SQL("LEFT JOIN {} ON {}.entity_id = b.entity_id").format(p, p) for p in parts
    )
    over = sql.SQL(" || ").join(_over(p) for p in parts)
    merged = sql.SQL(" || ").join(
        sql.SQL("coalesce({p}.o - coalesce({over}, '{{}}'::text[]), '{{}}'::jsonb)").format(
            p=p, over=_over(p)
        )
        for p in parts
    )
    query = sql.SQL(
        "WITH {ctes} SELECT b.entity_id, ({merged})::text, {over} "
        "FROM unnest({ids}::text[]) AS b(entity_id) {joins}"
    ).format(ctes=sql.SQL(", ").join(ctes), merged=merged, over=over, ids=IDS, joins=joins)
    return query, params


def _over(part: sql.Composable) -> sql.Composed:
    """The keys of ``part``'s object whose value is larger than the limit (NULL: none)."""
    return sql.SQL(
        "(CASE WHEN pg_column_size({p}.o) > %(max_bytes)s THEN (SELECT array_agg(key) "
        "FROM jsonb_each({p}.o) WHERE pg_column_size(value) > %(max_bytes)s) END)"
    ).format(p=part)


def _object(attributes: Sequence[CompiledAttribute]) -> sql.Composable:
    """jsonb_build_object over the row-form attributes, in pieces (functions take 100 args)."""
    pieces: list[sql.Composable] = []
    for start in range(0, len(attributes), 40):
        pairs = sql.SQL(", ").join(
            sql.SQL("{}::text, {}").format(sql.Placeholder(f"k{a.index}"), a.aggregate)
            for a in attributes[start : start + 40]
        )
        pieces.append(sql.SQL("jsonb_build_object({})").format(pairs))
    return sql.SQL(" || ").join(pieces)


def _frequency(a: CompiledAttribute) -> sql.Composed:
    v, w = sql.Identifier(f"v{a.index}"), sql.Identifier(f"w{a.index}")
    pick = sql.SQL("(array_agg(v ORDER BY w {}, v))[1]").format(sql.SQL(a.frequency or "DESC"))
    return sql.SQL(
        "SELECT entity_id, {j} AS j FROM (SELECT entity_id, {v} AS v, sum({w}) AS w "
        "FROM event_rows WHERE {v} IS NOT NULL AND {w} IS NOT NULL GROUP BY entity_id, {v}) "
        "AS f GROUP BY entity_id"
    ).format(j=Compiler.to_json(pick, a.definition), v=v, w=w)
