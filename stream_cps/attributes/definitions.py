"""Attribute definitions: parse and validate ``attributes.definition`` (pure, no I/O).

A broken definition must be rejected once, at load time, with a message naming the attribute,
instead of failing for every entity; the other definitions still load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from stream_cps.db import sqllex
from stream_cps.errors import DefinitionError


class DataType(StrEnum):
    """``attributes.data_type``: decides the JSON type stored."""

    STRING = "string"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    DATE = "date"
    DATETIME = "datetime"


class CalcType(StrEnum):
    """``definition.type``."""

    AVG = "avg"
    FIRST = "first"
    LAST = "last"
    LEAST_FREQUENT = "least_frequent"
    LIST = "list"
    MAX = "max"
    MIN = "min"
    MOST_FREQUENT = "most_frequent"
    NUM_OF_UNIQUE = "num_of_unique"
    SUM = "sum"
    VALUE = "value"
    CUSTOM = "custom"


# Types whose result is a number computed from the values, not one of the values.
NUMERIC_RESULT = frozenset({CalcType.AVG, CalcType.SUM})
COUNT_RESULT = frozenset({CalcType.NUM_OF_UNIQUE})
_NUMBER_LIKE = frozenset({DataType.INT, DataType.FLOAT, DataType.STRING})

_SQL_FIELDS = ("value", "outer_value", "weight", "outer_weight", "filter", "outer_filter", "query")
_LIST_FIELDS = ("sources", "types", "versions")
_KNOWN = frozenset({*_SQL_FIELDS, *_LIST_FIELDS, "type", "version"})
_NOT_FOR_CUSTOM = ("value", "outer_value", "weight", "outer_weight", "outer_filter")
_META_ID = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Definition:
    """One validated attribute definition; SQL fragments are kept verbatim."""

    attribute_id: str
    data_type: DataType
    type: CalcType
    value: str | None = None
    outer_value: str | None = None
    weight: str | None = None
    outer_weight: str | None = None
    filter: str | None = None
    outer_filter: str | None = None
    query: str | None = None
    sources: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    versions: tuple[str, ...] = ()

    @property
    def weighted(self) -> bool:
        return self.weight is not None or self.outer_weight is not None


@dataclass(frozen=True)
class MetaAttribute:
    """A named query over ``base`` that custom queries can read as a table."""

    id: str
    query: str


def parse(attribute_id: str, definition: Any, data_type: str | None) -> Definition:
    """Validate one ``attributes`` row; raises DefinitionError naming the attribute."""
    raw = _as_object(attribute_id, definition)
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise DefinitionError(attribute_id, f"unknown field {unknown[0]!r}")
    if "version" in raw and "versions" in raw:
        raise DefinitionError(attribute_id, "give 'versions' or 'version', not both")
    dtype = _data_type(attribute_id, data_type)
    kind = _calc_type(attribute_id, raw.get("type"))
    fields: dict[str, Any] = {}
    for name in _SQL_FIELDS:
        fields[name] = _sql_fragment(attribute_id, name, raw.get(name))
    for name in _LIST_FIELDS:
        source = raw.get(name, raw.get("version")) if name == "versions" else raw.get(name)
        fields[name] = _string_list(attribute_id, name, source)
    if kind is CalcType.CUSTOM:
        if fields["query"] is None:
            raise DefinitionError(attribute_id, "type custom needs a 'query'")
        fields["query"] = check_query(attribute_id, fields["query"])
        for name in _NOT_FOR_CUSTOM:
            if fields[name] is not None:
                raise DefinitionError(attribute_id, f"'{name}' does not apply to type custom")
    else:
        if fields["value"] is None:
            raise DefinitionError(attribute_id, f"type {kind} needs a 'value'")
        if fields["query"] is not None:
            raise DefinitionError(attribute_id, "'query' applies only to type custom")
        needs_number = kind in NUMERIC_RESULT or kind in COUNT_RESULT
        if needs_number and dtype not in _NUMBER_LIKE:
            raise DefinitionError(
                attribute_id, f"type {kind} gives a number; data_type {dtype} cannot hold it"
            )
    return Definition(attribute_id=attribute_id, data_type=dtype, type=kind, **fields)


def parse_meta(meta_id: str, definition: Any) -> MetaAttribute:
    """Validate one ``meta_attributes`` row; its id becomes a table name in custom queries."""
    if not _META_ID.match(meta_id or ""):
        raise DefinitionError(
            meta_id, "meta attribute id must be lower case letters, digits and _ (a table name)"
        )
    if meta_id == "base":
        raise DefinitionError(meta_id, "'base' is reserved for the entity's events")
    if not isinstance(definition, str) or not definition.strip():
        raise DefinitionError(meta_id, "meta attribute definition must be a non-empty query")
    return MetaAttribute(meta_id, check_query(meta_id, definition))


def parse_all(
    rows: Iterable[tuple[str, str | None, Any]],
) -> tuple[list[Definition], list[DefinitionError]]:
    """Parse (id, data_type, definition) rows; bad ones are returned as errors, not raised."""
    good: list[Definition] = []
    bad: list[DefinitionError] = []
    for attribute_id, data_type, definition in rows:
        try:
            good.append(parse(attribute_id, definition, data_type))
        except DefinitionError as exc:
            bad.append(exc)
    return good, bad


def check_query(name: str, query: str) -> str:
    """A single SELECT (or WITH ... SELECT), without comments or trailing semicolons."""
    text = query.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    problem = sqllex.problem(text)
    if problem:
        raise DefinitionError(name, f"query: {problem}")
    if not re.match(r"^\(*\s*(select|with|values)\b", text, re.IGNORECASE):
        raise DefinitionError(name, "query must be a SELECT")
    return text


def _as_object(attribute_id: str, definition: Any) -> Mapping[str, Any]:
    value = definition
    for _ in range(2):  # a JSON document, or a JSON string holding one
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise DefinitionError(attribute_id, f"definition is not valid JSON: {exc}") from exc
    if not isinstance(value, Mapping):
        raise DefinitionError(attribute_id, "definition must be a JSON object")
    return value


def _data_type(attribute_id: str, data_type: str | None) -> DataType:
    text = (data_type or "string").strip().lower()
    try:
        return DataType(text)
    except ValueError:
        allowed = ", ".join(t.value for t in DataType)
        raise DefinitionError(
            attribute_id, f"unknown data_type {data_type!r} (use one of {allowed})"
        ) from None


def _calc_type(attribute_id: str, value: Any) -> CalcType:
    if value is None or value == "":
        raise DefinitionError(attribute_id, "'type' is required")
    try:
        return CalcType(str(value).strip().lower())
    except ValueError:
        allowed = ", ".join(t.value for t in CalcType)
        raise DefinitionError(
            attribute_id, f"unknown type {value!r} (use one of {allowed})"
        ) from None


def _sql_fragment(attribute_id: str, name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DefinitionError(attribute_id, f"'{name}' must be an SQL text")
    text = str(value).strip()
    if not text:
        return None
    if name != "query":
        problem = sqllex.problem(text)
        if problem:
            raise DefinitionError(attribute_id, f"{name}: {problem}")
    return text


def _string_list(attribute_id: str, name: str, value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return tuple(str(v) for v in value)
    raise DefinitionError(attribute_id, f"'{name}' must be a list of strings")
