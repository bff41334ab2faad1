"""Compile definitions into set-based SQL over a batch of entities.

Every attribute computes ``j jsonb`` per entity for all entities of the batch at once, reading
the batch's events from a temporary table (see ``calculate``): attributes without set-returning
expressions share one scan and one GROUP BY (the row form), the others are a CTE each; ``statement``
puts any set of them into one statement (the fast path), or one alone (to isolate a failing
definition). Admin-written fragments are embedded as SQL with ``%`` doubled, since the
statements carry parameters; list filters and attribute ids are parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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
# The columns of an event as fragments see them, typed as in customer_events, with no rows.
EVENT_SHAPE = sql.SQL(
    "(VALUES (NULL::text, NULL::varchar, NULL::varchar, NULL::varchar, NULL::timestamptz, "
    "NULL::jsonb)) AS e(id, source_id, type, version, event_time, payload)"
)
# Rows of the entities asked for. The events table holds only the batch, so the usual call
# (``whole`` true) needs no test at all; one `= ANY(array)` per event would be a linear search
# of the array in a prepared (generic) plan. Only the isolation path asks for a subset.
MINE = sql.SQL("(%(whole)s::boolean OR entity_id = ANY(%(ids)s::text[]))")


@dataclass(frozen=True)
class CompiledAttribute:
    """One attribute, in one of two forms; ``params`` are its own.

    ``body``: a CTE yielding (entity_id, j), for custom queries and set-returning values.
    Otherwise the row form: ``laterals`` add columns v<n>, w<n> to a shared scan of the events,
    and ``aggregate`` (or, for most/least_frequent, ``frequency``) folds them per entity, so
    that all such attributes of a batch cost one scan and one GROUP BY.
    """

    definition: Definition
    index: int
    params: Mapping[str, Any] = field(default_factory=dict)
    body: sql.Composed | None = None
    laterals: sql.Composed | None = None
    aggregate: sql.Composable | None = None
    frequency: str | None = None

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
        self,
        index: int,
        definition: Definition,
        metas: Mapping[str, MetaAttribute],
        row_form: bool = False,
    ) -> CompiledAttribute:
        """``row_form``: the value expressions are known not to return sets (see ``plan``).

        Raises DefinitionError for problems found only now (unknown or cyclic meta).
        """
        prefix = f"a{index}_"
        params: dict[str, Any] = {}
        where = self._event_filter(definition, prefix, params)
        if definition.type is CalcType.CUSTOM:
            body = self._custom(definition, where, metas)
            return CompiledAttribute(definition, index, params, body=body)
        if not row_form:
            body = self._predefined(definition, where)
            return CompiledAttribute(definition, index, params, body=body)
        return self._row_form(index, definition, where, params)

    def probes(self, d: Definition) -> list[sql.Composed]:
        """Statements that fail (at parse time) when a value expression returns a set; over a
        typed row of no data shaped like an event (the sandbox role reads no events table).
        ``%(never)s`` is False: a parameter, so the probe goes by the extended protocol."""
        assert d.value is not None
        weight = frag(d.weight) if d.weight else sql.SQL("1")
        probes = [
            sql.SQL(
                "SELECT CASE WHEN true THEN {} END, CASE WHEN true THEN {} END FROM {} "
                "WHERE %(never)s"
            ).format(frag(d.value), weight, EVENT_SHAPE)
        ]
        outer = [frag(x) for x in (d.outer_value, d.outer_weight, d.outer_filter) if x]
        for expr in outer:
            probes.append(
                sql.SQL(
                    "SELECT CASE WHEN true THEN {} END FROM (SELECT {} AS value "
                    "FROM {} WHERE %(never)s) AS t"
                ).format(expr, frag(d.value), EVENT_SHAPE)
            )
        return probes

    def _row_form(
        self, index: int, d: Definition, where: list[sql.Composable], params: dict[str, Any]
    ) -> CompiledAttribute:
        assert d.value is not None
        inner = sql.Identifier(f"i{index}")
        outer = sql.Identifier(f"o{index}")
        # The laterals are flattened into the scan, so every CASE below is evaluated per event:
        # filters are only repeated where an outer expression could turn a filtered-out
        # (NULL) value into a value again.
        ef = sql.SQL(" AND ").join(where) if where else None

        def when(condition: sql.Composable | None, expr: sql.Composable) -> sql.Composable:
            if condition is None:
                return expr
            return sql.SQL("CASE WHEN {} THEN {} END").format(condition, expr)

        weight = when(ef, frag(d.weight)) if d.weight else sql.SQL("NULL::int")
        outer_filter = frag(d.outer_filter) if d.outer_filter else None
        keep: sql.Composable | None = None
        if outer_filter is not None:
            keep = sql.SQL("t.ef AND {}").format(outer_filter) if ef else outer_filter
        elif ef is not None and (d.outer_value or d.outer_weight):
            keep = sql.SQL("t.ef")
        outer_value = frag(d.outer_value) if d.outer_value else sql.SQL("t.value")
        w = self._weight(d)
        laterals = sql.SQL(
            "CROSS JOIN LATERAL (SELECT {value} AS value, {weight} AS weight, {ef} AS ef) "
            "AS {inner} CROSS JOIN LATERAL (SELECT {v} AS v, {w} AS w "
            "FROM (SELECT {inner}.value, {inner}.weight, {inner}.ef) AS t) AS {outer}"
        ).format(
            value=when(ef, frag(d.value)),
            weight=weight,
            ef=ef if ef is not None else sql.SQL("true"),
            inner=inner,
            v=when(keep, self._value_column(d, outer_value)),
            w=when(keep, w) if d.weighted else w,
            outer=outer,
        )
        v, w = sql.Identifier(f"v{index}"), sql.Identifier(f"w{index}")
        if d.type in (CalcType.MOST_FREQUENT, CalcType.LEAST_FREQUENT):
            direction = "DESC" if d.type is CalcType.MOST_FREQUENT else "ASC"
            return CompiledAttribute(d, index, params, laterals=laterals, frequency=direction)
        if d.weighted:
            f = sql.SQL("FILTER (WHERE {} IS NOT NULL AND {} IS NOT NULL)").format(v, w)
        else:
            f = sql.SQL("FILTER (WHERE {} IS NOT NULL)").format(v)
        if d.type is CalcType.LIST:
            agg: sql.Composable = sql.SQL("to_jsonb(array_agg(DISTINCT {} ORDER BY {}) {})").format(
                v, v, f
            )
        else:
            agg = self.to_json(sql.SQL(_row_aggregate(d, row_form=True)).format(v=v, w=w, f=f), d)
        return CompiledAttribute(d, index, params, laterals=laterals, aggregate=agg)

    def _value_column(self, d: Definition, outer_value: sql.Composable) -> sql.Composed:
        if d.type in NUMERIC_RESULT:
            return self.number(outer_value)
        if d.type in COUNT_RESULT:  # data_type describes the count, not the values
            return self.text(outer_value)
        return self.typed(outer_value, d.data_type)

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
        trimmed = sql.SQL("nullif({}, '')").format(self.text(expr))
        cast = {
            DataType.INT: "round({}::numeric)",
            DataType.FLOAT: "{}::numeric",
            DataType.BOOL: "{}::boolean",
            DataType.DATE: "{}::date",
            DataType.DATETIME: "{}::timestamptz",
        }[data_type]
        return sql.SQL(cast).format(trimmed)

    def number(self, expr: sql.Composable) -> sql.Composed:
        return sql.SQL("nullif({}, '')::numeric").format(self.text(expr))

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
        conditions = sql.SQL(" AND ").join([MINE, *where])
        weight = sql.SQL(", {} AS weight").format(frag(d.weight)) if d.weight else sql.SQL("")
        inner = sql.SQL(
            "SELECT entity_id, id, event_time, {value} AS value{weight} FROM {events} WHERE {where}"
        ).format(value=frag(d.value), weight=weight, events=EVENTS, where=conditions)
        outer_value = frag(d.outer_value) if d.outer_value else sql.SQL("t.value")
        v = self._value_column(d, outer_value)
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
                j=self.to_json(sql.SQL("(array_agg(v ORDER BY w {}, v))[1]").format(direction), d),
                clean=clean,
            )
        if d.type in (CalcType.LIST, CalcType.NUM_OF_UNIQUE):
            # a set-returning value repeats values a lot: drop duplicates by hashing first
            clean = sql.SQL("SELECT entity_id, v FROM ({}) AS d GROUP BY entity_id, v").format(
                clean
            )
        if d.type is CalcType.LIST:
            agg: sql.Composable = sql.SQL("to_jsonb(array_agg(v ORDER BY v))")
        else:
            template = sql.SQL(_row_aggregate(d))
            agg = self.to_json(template.format(v=sql.SQL("v"), w=sql.SQL("w"), f=sql.SQL("")), d)
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


def _row_aggregate(d: Definition, row_form: bool = False) -> str:
    """The aggregate over columns {v}, {w}; {f} keeps rows whose value (and weight) is set.

    In the row form every event has exactly one value, so (event_time, id) orders them
    completely and all first/last/value aggregates share one sort, which PostgreSQL then does
    once for the whole input; aggregates that skip NULLs anyway get no FILTER.
    """
    weighted = d.weighted
    is_bool = d.data_type is DataType.BOOL
    if row_form:
        ordered = "array_agg({v} ORDER BY event_time, id) {f}"
        first, last = f"({ordered})[1]", f"({ordered})[cardinality({ordered})]"
    else:
        first = "(array_agg({v} ORDER BY event_time, id, {v}) {f})[1]"
        last = "(array_agg({v} ORDER BY event_time DESC, id DESC, {v} DESC) {f})[1]"
    templates = {
        CalcType.AVG: "sum({v} * {w}) / nullif(sum({w}) {f}, 0)" if weighted else "avg({v})",
        CalcType.SUM: "sum({v} * {w})" if weighted else "sum({v})",
        CalcType.MIN: "bool_and({v})" if is_bool else "min({v})",
        CalcType.MAX: "bool_or({v})" if is_bool else "max({v})",
        CalcType.FIRST: first,
        CalcType.LAST: last,
        CalcType.VALUE: first,
        # no value at all: absent, like every other type (not 0)
        CalcType.NUM_OF_UNIQUE: "nullif(count(DISTINCT {v}), 0)",
    }
    return templates[d.type]
