"""Parsing and validating definitions (pure): bad ones are rejected naming the attribute."""

from __future__ import annotations

from typing import Any

import pytest

from stream_cps.attributes import definitions as d
from stream_cps.errors import DefinitionError


def test_full_definition() -> None:
    parsed = d.parse(
        "a",
        '{"type": "Most_Frequent", "value": "payload->>\'x\'", "outer_value": "lower(value)", '
        '"weight": 2, "outer_weight": "1", "filter": "type = \'a\'", "outer_filter": '
        '"value <> \'\'", "sources": ["web"], "types": "purchase", "versions": []}',
        "string",
    )
    assert parsed.type is d.CalcType.MOST_FREQUENT
    assert parsed.data_type is d.DataType.STRING
    assert parsed.weight == "2" and parsed.outer_value == "lower(value)"
    assert (parsed.sources, parsed.types, parsed.versions) == (("web",), ("purchase",), ())
    assert parsed.weighted


def test_defaults_and_json_string_holding_json() -> None:
    parsed = d.parse("a", '"{\\"type\\": \\"sum\\", \\"value\\": \\"1\\"}"', None)
    assert parsed.data_type is d.DataType.STRING
    assert parsed.filter is None and not parsed.weighted


def test_custom_query_cleanup() -> None:
    parsed = d.parse("c", {"type": "custom", "query": " select 1 as value ;; "}, "int")
    assert parsed.query == "select 1 as value"


@pytest.mark.parametrize(
    ("definition", "data_type", "reason"),
    [
        ("{not json", "string", "not valid JSON"),
        ([1, 2], "string", "must be a JSON object"),
        ({"value": "1"}, "string", "'type' is required"),
        ({"type": "median", "value": "1"}, "string", "unknown type 'median'"),
        ({"type": "sum"}, "int", "needs a 'value'"),
        ({"type": "custom"}, "int", "needs a 'query'"),
        ({"type": "sum", "value": "1"}, "money", "unknown data_type 'money'"),
        ({"type": "sum", "value": "1"}, "bool", "cannot hold it"),
        ({"type": "num_of_unique", "value": "1"}, "date", "cannot hold it"),
        ({"type": "sum", "value": "1", "filters": "x"}, "int", "unknown field 'filters'"),
        ({"type": "sum", "value": "1 -- note"}, "int", "comments are not allowed"),
        ({"type": "sum", "value": "1; DROP TABLE x"}, "int", "one statement"),
        ({"type": "sum", "value": "(1"}, "int", "unbalanced parentheses"),
        ({"type": "sum", "value": "1) OR (1"}, "int", "unbalanced parentheses"),
        ({"type": "sum", "value": {"a": 1}}, "int", "must be an SQL text"),
        ({"type": "sum", "value": "1", "sources": [{"a": 1}]}, "int", "list of strings"),
        ({"type": "sum", "value": "1", "query": "select 1"}, "int", "only to type custom"),
        ({"type": "custom", "query": "select 1 /* x */"}, "int", "comments"),
        ({"type": "custom", "query": "delete from x"}, "int", "must be a SELECT"),
        ({"type": "custom", "query": "select 1", "value": "x"}, "int", "does not apply"),
        ({"type": "sum", "value": "1", "versions": [], "version": []}, "int", "not both"),
    ],
)
def test_invalid(definition: Any, data_type: str, reason: str) -> None:
    with pytest.raises(DefinitionError) as info:
        d.parse("attr_x", definition, data_type)
    assert info.value.name == "attr_x"
    assert str(info.value).startswith("attr_x: ")
    assert reason in info.value.reason


def test_quoted_text_may_contain_comment_markers() -> None:
    parsed = d.parse("a", {"type": "list", "value": "payload->>'a--b' || $$/*$$ || \"x;\""}, None)
    assert parsed.value is not None


def test_parse_all_keeps_the_good_ones() -> None:
    good, bad = d.parse_all(
        [("ok", "int", {"type": "sum", "value": "1"}), ("bad", "int", {"type": "nope"})]
    )
    assert [g.attribute_id for g in good] == ["ok"]
    assert [b.name for b in bad] == ["bad"]


@pytest.mark.parametrize("meta_id", ["Products", "with space", "base", ""])
def test_invalid_meta_ids(meta_id: str) -> None:
    with pytest.raises(DefinitionError):
        d.parse_meta(meta_id, "select 1")
