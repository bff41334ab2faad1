"""Normalisation and blocklist rules from the contract."""

from __future__ import annotations

import pytest

from stream_cps.stitching.normalize import Blocklist, identifiers_of, normalize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  a@b.com ", "a@b.com"),
        ("12345.0", "12345"),
        ("12345.000", "12345"),
        ("12345.50", "12345.50"),
        ("-7.00", "-7"),
        ("", None),
        ("   ", None),
        (None, None),
        ("1e5", "1e5"),
    ],
)
def test_normalize(raw: str | None, expected: str | None) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "value", ["None", "NULL", "undefined", "NaN", "Anonymous", "-1", "0", "000", "0-0-0", "---"]
)
def test_default_blocklist_is_case_insensitive(value: str) -> None:
    assert Blocklist().blocks("email", value)


def test_values_normalised_before_blocklist() -> None:
    assert identifiers_of([("crm", "0.0"), ("crm", " -1 "), ("crm", "12.0")], Blocklist()) == [
        "crm:12"
    ]


def test_table_blocklist_global_and_per_attribute() -> None:
    blocklist = Blocklist.from_rows([(None, "Guest"), ("email", "test@test.com")])
    assert blocklist.blocks("phone", "guest")
    assert blocklist.blocks("email", "TEST@test.com")
    assert not blocklist.blocks("phone", "test@test.com")
    assert not blocklist.blocks("email", "real@example.com")


def test_identifiers_sorted_and_unique() -> None:
    pairs = [("b", "2"), ("a", "1"), ("b", " 2 "), ("a", None)]
    assert identifiers_of(pairs, Blocklist()) == ["a:1", "b:2"]


def test_identifiers_of_caches_per_blocklist_and_answers_alike() -> None:
    from stream_cps.stitching.normalize import Blocklist, identifiers_of

    pairs = [("email", " A@x "), ("cookie", "None"), ("id", "12.00"), ("id", "x" * 300)]
    plain = Blocklist()
    first = identifiers_of(pairs, plain)
    assert first == identifiers_of(pairs, plain)  # second answer from the cache
    assert first == ["email:A@x", "id:12", "id:" + "x" * 300]
    stricter = Blocklist.from_rows([("email", "a@x")])
    assert identifiers_of(pairs, stricter) == ["id:12", "id:" + "x" * 300]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("None\u200b", None),  # zero-width space after a blocked value
        ("\ufeffNone", None),  # a byte-order mark from a CSV import
        ("\u200b", None),  # nothing but an invisible character
        ("a@b.com\u200d", "a@b.com"),
        ("\u00a0a@b.com\u3000", "a@b.com"),  # no-break and ideographic spaces
        ("\uff10", None),  # full-width zero: only zeros once folded
        ("\uff2e\uff55\uff4c\uff4c", None),  # full-width "Null"
        ("{}", None),
        ("[]", None),
        ('{"id": 1}', None),  # a JSON object selected with -> instead of ->>
        ("[1, 2]", None),
        ("{not json}", "{not json}"),
        ("\uff11\uff12\uff13", "\uff11\uff12\uff13"),  # folded only to decide, stored as sent
    ],
)
def test_invisible_characters_compatibility_forms_and_json_never_stitch_as_junk(
    raw: str, expected: str | None
) -> None:
    found = identifiers_of([("crm", raw)], Blocklist())
    assert found == ([] if expected is None else [f"crm:{expected}"])


def test_the_table_blocklist_sees_folded_values_too() -> None:
    blocklist = Blocklist.from_rows([(None, "N/A")])
    assert identifiers_of([("crm", "\uff2e/\uff21"), ("crm", "n/a\u200b")], blocklist) == []
