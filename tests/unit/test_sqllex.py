"""The admin SQL fragment check tokenises like PostgreSQL where it matters."""

from __future__ import annotations

import pytest

from stream_cps.db.sqllex import problem


@pytest.mark.parametrize(
    "text",
    [
        "payload->>'email'",
        "payload #>> '{page,path}' LIKE '/p%'",
        "'a--b' || 'c;d' || '/*x*/'",
        "E'it\\'s' || $$;--$$ || $tag$ ) $tag$",
        "\"odd;name\" || lower(payload->>'x')",
        "(SELECT count(*) FROM base WHERE x IN (1, 2))",
        "E'\\\\' || 'x'",  # E'\\' is one backslash, then a normal string
        "config_set(1)",  # only the listed names are refused
    ],
)
def test_accepted(text: str) -> None:
    assert problem(text) is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        # the issue's escape: E'\'' is ONE string; the old checker saw it end at the second '
        ("SELECT E'\\'' AS value) q; COMMIT; CREATE TABLE x (y int); --'", "comments"),
        ("1; DROP TABLE x", "only one statement"),
        ("1 -- rest", "comments"),
        ("1 /* rest */", "comments"),
        ("'unterminated", "unterminated"),
        ("E'ends with an escaped quote\\'", "unterminated"),
        ("$x$ never closed", "unterminated dollar"),
        ("(1", "unbalanced"),
        ("1)", "unbalanced"),
        ("set_config('role', 'postgres', true)", "set_config() is not allowed"),
        ("pg_catalog.SET_CONFIG ('statement_timeout', '0', true)", "set_config() is not allowed"),
        ("\"set_config\"('role', 'x', true)", "set_config() is not allowed"),
        ("pg_advisory_lock(42)", "pg_advisory_lock() is not allowed"),
        ('U&"set\\005fconfig"(1)', "Unicode-escaped identifiers"),
    ],
)
def test_refused(text: str, why: str) -> None:
    found = problem(text)
    assert found is not None and why in found, found


def test_the_issue_escape_is_refused_without_its_comment() -> None:
    assert problem("SELECT E'\\'' AS value) q; COMMIT; SELECT (1") == "unbalanced parentheses"
