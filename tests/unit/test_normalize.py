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
