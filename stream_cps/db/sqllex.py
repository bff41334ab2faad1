"""Check admin-written SQL fragments before they are embedded in generated statements (pure).

Rules, attribute fragments, custom queries, meta attributes and context queries are spliced
into statements of ours, so a fragment must not be able to change the statement around it:
no ``;``, no comments, balanced parentheses. The check tokenises as PostgreSQL's lexer does for
what matters here: ``'...'`` with doubled quotes, ``E'...'`` with backslash escapes (``E'\\''``
is one string), ``U&'...'``, ``B''``/``X''``, ``$tag$...$tag$``, ``"..."`` identifiers and
nested ``/* */`` comments. A string the regular lexer never closes is an error, never skipped.

It also refuses calls that read-only mode and the sandbox role cannot stop: ``set_config``
(``role`` and ``session_authorization`` are checked against the *session* user, so it would
leave the sandbox role, and it changes timeouts) and session-level advisory locks (they
survive the rollback of the savepoint). The database enforces everything else: one statement,
read-only, timeouts, and a role with no privileges but the fragment's own rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Function names a fragment may not call, compared after folding unquoted names to lower case.
FORBIDDEN_CALLS = frozenset(
    {
        "set_config",
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        "dblink",
        "dblink_exec",
        "dblink_connect",
        "dblink_send_query",
    }
)

_IDENT = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")


@dataclass(frozen=True)
class Token:
    kind: str  # "ident", "quoted", "string", "op", "other"
    text: str  # identifiers folded as PostgreSQL folds them; strings without quotes


class LexError(ValueError):
    """The fragment cannot be tokenised (an unterminated string, a comment, ...)."""


def tokens(text: str) -> list[Token]:
    """The tokens of ``text`` that matter for the checks (whitespace dropped)."""
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith("--", i) or text.startswith("/*", i):
            raise LexError("comments are not allowed")
        elif ch in "eE" and text.startswith("'", i + 1):
            end = _escaped_string_end(text, i + 2)
            out.append(Token("string", text[i + 2 : end - 1]))
            i = end
        elif ch in "bBxXnN" and text.startswith("'", i + 1):
            end = _string_end(text, i + 2)
            out.append(Token("string", text[i + 2 : end - 1]))
            i = end
        elif ch in "uU" and text.startswith("&'", i + 1):
            end = _string_end(text, i + 3)
            out.append(Token("string", text[i + 3 : end - 1]))
            i = end
        elif ch in "uU" and text.startswith('&"', i + 1):
            # its escapes could spell any name past the checks below
            raise LexError('Unicode-escaped identifiers (U&"...") are not allowed')
        elif ch == "'":
            end = _string_end(text, i + 1)
            out.append(Token("string", text[i + 1 : end - 1]))
            i = end
        elif ch == '"':
            end = _quoted_end(text, i + 1)
            out.append(Token("quoted", text[i + 1 : end - 1].replace('""', '"')))
            i = end
        elif ch == "$" and (tag := _DOLLAR_TAG.match(text, i)):
            close = text.find(tag.group(0), tag.end())
            if close == -1:
                raise LexError("unterminated dollar-quoted string")
            out.append(Token("string", text[tag.end() : close]))
            i = close + len(tag.group(0))
        elif ident := _IDENT.match(text, i):
            out.append(Token("ident", ident.group(0).lower()))
            i = ident.end()
        elif ch in "();,[].":
            out.append(Token("op", ch))
            i += 1
        else:
            out.append(Token("other", ch))
            i += 1
    return out


def _string_end(text: str, start: int) -> int:
    """Index after the closing quote of a standard string whose body starts at ``start``."""
    return _closing(text, start, "'", "unterminated quoted string")


def _escaped_string_end(text: str, start: int) -> int:
    """Like ``_string_end`` for ``E'...'``: a backslash escapes the next character."""
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
        elif ch == "'":
            if text.startswith("''", i):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise LexError("unterminated quoted string")


def _quoted_end(text: str, start: int) -> int:
    return _closing(text, start, '"', "unterminated quoted identifier")


def _closing(text: str, start: int, quote: str, unterminated: str) -> int:
    """Index after the ``quote`` that closes a body starting at ``start`` (doubled = literal)."""
    i = start
    while True:
        close = text.find(quote, i)
        if close == -1:
            raise LexError(unterminated)
        if text.startswith(quote * 2, close):
            i = close + 2
            continue
        return close + 1


def _calls(toks: list[Token], n: int) -> bool:
    """Whether token ``n`` is a name followed by ``(``: a function call."""
    return toks[n].kind in ("ident", "quoted") and n + 1 < len(toks) and toks[n + 1].text == "("


def problem(text: str) -> str | None:
    """Why ``text`` cannot be embedded in generated SQL, or None."""
    try:
        toks = tokens(text)
    except LexError as exc:
        return str(exc)
    depth = 0
    for n, tok in enumerate(toks):
        if tok.kind == "op":
            if tok.text == ";":
                return "only one statement is allowed (remove ';')"
            if tok.text == "(":
                depth += 1
            elif tok.text == ")":
                depth -= 1
                if depth < 0:
                    return "unbalanced parentheses"
        elif _calls(toks, n) and tok.text in FORBIDDEN_CALLS:
            return f"{tok.text}() is not allowed in admin-written SQL"
    if depth:
        return "unbalanced parentheses"
    return None
