"""Compile definitions into set-based SQL over a batch of entities.

Every attribute becomes one CTE producing ``(entity_id, j jsonb)`` for all entities of the batch,
reading the batch's events from a temporary table (see ``calculate``). Several CTEs can share one
statement (the fast path) or run alone (to isolate a failing definition). Admin-written fragments
are embedded as SQL with ``%`` doubled, since the statements carry parameters; list filters and
attribute ids are parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from stream_cps.attributes.definitions import (
    COUNT_RESULT,
    NUMERIC_RESULT,
    CalcType,
    DataType,
    Definition,
    MetaAttribute,
)
from stream_cps.errors import DefinitionError

EVENTS_TABLE = "stream_cps_attr_events"
EVENTS = sql.SQL("pg_temp.{}").format(sql.Identifier(EVENTS_TABLE))
# The batch's entity ids: an array parameter every statement takes.
IDS = sql.Placeholder("ids")


@dataclass(frozen=True)
class CompiledAttribute:
    """One attribute as a CTE body yielding (entity_id, j); ``params`` are its own."""

    definition: Definition
    body: sql.Composed
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attribute_id(self) -> str:
        return self.definition.attribute_id


def frag(text: str) -> sql.SQL:
    """An admin-written fragment, on its own lines so a stray construct cannot swallow ours."""
    return sql.SQL("(\n" + text.replace("%", "%%") + "\n)")


class Compiler:
    """Builds attribute SQL; ``attr_schema`` holds the ``attr_text`` helper (migration 0002)."""

    def __init__(self, attr_schema: str) -> None:
        self._text_fn = sql.Identifier(attr_schema, "attr_text")

    def compile(
        self, index: int, definition: Definition, metas: Mapping[str, MetaAttribute]
    ) -> CompiledAttribute:
        """Raises DefinitionError for problems found only now (unknown or cyclic meta)."""
        prefix = f"a{index}_"
        params: dict[str, Any] = {}
        where = self._event_filter(definition, prefix, params)
        if definition.type is CalcType.CUSTOM:
            body = self._custom(definition, where, metas)
        else:
            body = self._predefined(definition, where)
        return CompiledAttribute(definition, body, params)

    # -- shared pieces -------------------------------------------------------------------------

    def _event_filter(
        self, d: Definition, prefix: str, params: dict[str, Any]
    ) -> list[sql.Composable]:
        where: list[sql.Composable] = []
        lists = (("source_id", d.sources), ("type", d.types), ("version", d.versions))
        for column, values in lists:
            if values:
                name = prefix + column
                params[name] = list(values)
                where.append(
                    sql.SQL("{} = ANY({}::text[])").format(
                        sql.Identifier(column), sql.Placeholder(name)
                    )
                )
        if d.filter:
            where.append(frag(d.filter))
        return where

    def text(self, expr: sql.Composable) -> sql.Composed:
        return sql.SQL("{}({})").format(self._text_fn, expr)

    def typed(self, expr: sql.Composable, data_type: DataType) -> sql.Composed:
        """The value in the domain of its data type: comparisons and DISTINCT happen there."""
        if data_type is DataType.STRING:
            return self.text(expr)
        trimmed = sql.SQL("nullif(btrim({}), '')").format(self.text(expr))
        cast = {
            DataType.INT: "round({}::numeric)",
            DataType.FLOAT: "{}::numeric",
            DataType.BOOL: "{}::boolean",
            DataType.DATE: "{}::date",
            DataType.DATETIME: "{}::timestamptz",
        }[data_type]
        return sql.SQL(cast).format(trimmed)

    def number(self, expr: sql.Composable) -> sql.Composed:
        return sql.SQL("nullif(btrim({}), '')::numeric").format(self.text(expr))

    @staticmethod
    def to_json(expr: sql.Composable, d: Definition) -> sql.Composed:
        """Aggregate result -> JSON of the attribute's data type."""
        if d.type in NUMERIC_RESULT or d.type in COUNT_RESULT:
            template = {
                DataType.STRING: "to_jsonb(({})::text)",
                DataType.INT: "to_jsonb(round(({})::numeric))",
            }.get(d.data_type, "to_jsonb({})")
            return sql.SQL(template).format(expr)
        return sql.SQL("to_jsonb({})").format(expr)

    # -- predefined types ----------------------------------------------------------------------

    def _predefined(self, d: Definition, where: list[sql.Composable]) -> sql.Composed:
        assert d.value is not None
        mine = sql.SQL("entity_id = ANY({}::text[])").format(IDS)
        conditions = sql.SQL(" AND ").join([mine, *where])
        weight = sql.SQL(", {} AS weight").format(frag(d.weight)) if d.weight else sql.SQL("")
        inner = sql.SQL(
            "SELECT entity_id, id, event_time, {value} AS value{weight} FROM {events} WHERE {where}"
        ).format(value=frag(d.value), weight=weight, events=EVENTS, where=conditions)
        outer_value = frag(d.outer_value) if d.outer_value else sql.SQL("t.value")
        if d.type in NUMERIC_RESULT:
            v = self.number(outer_value)
        elif d.type in COUNT_RESULT:  # data_type describes the count, not the values
            v = self.text(outer_value)
        else:
            v = self.typed(outer_value, d.data_type)
        w = self._weight(d)
        outer_where = frag(d.outer_filter) if d.outer_filter else sql.SQL("true")
        values = sql.SQL(
            "SELECT entity_id, id, event_time, {v} AS v, {w} AS w FROM ({inner}) AS t "
            "WHERE {outer_where}"
        ).format(v=v, w=w, inner=inner, outer_where=outer_where)
        clean = sql.SQL("SELECT * FROM ({}) AS vw WHERE v IS NOT NULL AND w IS NOT NULL").format(
            values
        )
        if d.type in (CalcType.MOST_FREQUENT, CalcType.LEAST_FREQUENT):
            direction = sql.SQL("DESC" if d.type is CalcType.MOST_FREQUENT else "ASC")
            return sql.SQL(
                "SELECT entity_id, {j} AS j FROM (SELECT entity_id, v, sum(w) AS w FROM ({clean}) "
                "AS c GROUP BY entity_id, v) AS f GROUP BY entity_id"
            ).format(
                j=self.to_json(
                    sql.SQL("(array_agg(v ORDER BY w {}, v))[1]").format(direction), d
                ),
                clean=clean,
            )
        if d.type is CalcType.LIST:
            item = self.to_json(sql.SQL("v"), d)
            agg: sql.Composable = sql.SQL("jsonb_agg(DISTINCT {} ORDER BY {})").format(item, item)
        else:
            agg = self.to_json(self._aggregate(d), d)
        return sql.SQL(
            "SELECT entity_id, {agg} AS j FROM ({clean}) AS c GROUP BY entity_id"
        ).format(agg=agg, clean=clean)

    def _weight(self, d: Definition) -> sql.Composable:
        parts: list[sql.Composable] = []
        if d.weight:
            parts.append(sql.SQL("(t.weight)::numeric"))
        if d.outer_weight:
            parts.append(sql.SQL("{}::numeric").format(frag(d.outer_weight)))
        return sql.SQL(" * ").join(parts) if parts else sql.SQL("1")

    @staticmethod
    def _aggregate(d: Definition) -> sql.Composable:
        weighted = d.weighted
        is_bool = d.data_type is DataType.BOOL
        templates = {
            CalcType.AVG: "sum(v * w) / nullif(sum(w), 0)" if weighted else "avg(v)",
            CalcType.SUM: "sum(v * w)" if weighted else "sum(v)",
            CalcType.MIN: "bool_and(v)" if is_bool else "min(v)",
            CalcType.MAX: "bool_or(v)" if is_bool else "max(v)",
            CalcType.FIRST: "(array_agg(v ORDER BY event_time, id, v))[1]",
            CalcType.LAST: "(array_agg(v ORDER BY event_time DESC, id DESC, v DESC))[1]",
            CalcType.VALUE: "(array_agg(v))[1]",
            CalcType.NUM_OF_UNIQUE: "count(DISTINCT v)",
        }
        return sql.SQL(templates[d.type])

    # -- custom queries ------------------------------------------------------------------------

    def _custom(
        self,
        d: Definition,
        where: list[sql.Composable],
        metas: Mapping[str, MetaAttribute],
    ) -> sql.Composed:
        assert d.query is not None
        conditions = sql.SQL(" AND ").join([sql.SQL("e.entity_id = b.entity_id"), *where])
        ctes: list[sql.Composable] = [
            sql.SQL(
                "base AS (SELECT id, source_id, type, version, event_time, payload "
                "FROM {} AS e WHERE {})"
            ).format(EVENTS, conditions)
        ]
        for meta in meta_order(d, metas):
            ctes.append(sql.SQL("{} AS {}").format(sql.Identifier(meta.id), frag(meta.query)))
        value = self.typed(sql.SQL("q.value"), d.data_type)
        rows = sql.SQL(
            "SELECT b.entity_id, r.j, r.n FROM unnest({ids}::text[]) AS b(entity_id) "
            "CROSS JOIN LATERAL (SELECT to_jsonb({value}) AS j, row_number() OVER () AS n FROM "
            "(WITH {ctes} SELECT q0.value FROM {query} AS q0) AS q) AS r WHERE r.j IS NOT NULL"
        ).format(ids=IDS, value=value, ctes=sql.SQL(", ").join(ctes), query=frag(d.query))
        return sql.SQL(
            "SELECT entity_id, CASE WHEN count(*) = 1 THEN (array_agg(j))[1] "
            "ELSE jsonb_agg(j ORDER BY n) END AS j FROM ({}) AS cr GROUP BY entity_id"
        ).format(rows)


def meta_order(d: Definition, metas: Mapping[str, MetaAttribute]) -> list[MetaAttribute]:
    """The meta attributes a query reads, each after those it reads itself."""
    ordered: list[MetaAttribute] = []
    state: dict[str, str] = {}

    def visit(meta: MetaAttribute, path: tuple[str, ...]) -> None:
        if state.get(meta.id) == "done":
            return
        if state.get(meta.id) == "visiting":
            raise DefinitionError(
                d.attribute_id, "meta attributes refer to each other: " + " -> ".join(path)
            )
        state[meta.id] = "visiting"
        for used in referenced(meta.query, metas, exclude=meta.id):
            visit(metas[used], (*path, used))
        state[meta.id] = "done"
        ordered.append(meta)

    for name in referenced(d.query or "", metas):
        visit(metas[name], (name,))
    return ordered


def referenced(query: str, names: Iterable[str], exclude: str = "") -> list[str]:
    """Which of ``names`` appear as words in ``query`` (a table it may read)."""
    words = set(re.findall(r"[a-z_][a-z0-9_]*", query.lower()))
    return sorted(name for name in names if name in words and name != exclude)


def statement(attributes: Sequence[CompiledAttribute]) -> tuple[sql.Composed, dict[str, Any]]:
    """One statement computing ``attributes`` for the batch: rows (entity_id, attributes)."""
    params: dict[str, Any] = {}
    ctes: list[sql.Composable] = []
    parts: list[sql.Composable] = []
    for i, compiled in enumerate(attributes):
        name = sql.Identifier(f"attr_{i}")
        key = f"k{i}"
        params.update(compiled.params)
        params[key] = compiled.attribute_id
        ctes.append(sql.SQL("{} AS ({})").format(name, compiled.body))
        parts.append(
            sql.SQL("SELECT entity_id, {}::text AS k, j FROM {}").format(sql.Placeholder(key), name)
        )
    query = sql.SQL(
        "WITH {ctes} SELECT entity_id, jsonb_object_agg(k, j) FROM ({parts}) AS x "
        "WHERE j IS NOT NULL GROUP BY entity_id"
    ).format(ctes=sql.SQL(", ").join(ctes), parts=sql.SQL(" UNION ALL ").join(parts))
    return query, params
