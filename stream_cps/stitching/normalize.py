"""Identifier normalisation and the blocklist (pure; no I/O).

The vendor's own failure stories set the rules: values like ``None`` or ``0`` glued thousands of
people into one entity, and ``12345`` vs ``12345.0`` failed to stitch. So values are trimmed,
empty and blocked values never stitch, and integral decimals lose their zero fraction.

Real imports add their own junk: invisible characters (a BOM from a CSV file, zero-width spaces
pasted from a web form) are removed with the whitespace; the blocklist and the zeros rule look
at the value folded to Unicode compatibility form (NFKC: a full-width zero U+FF10 is a zero),
while the stored value keeps its characters; a JSON object or array (a rule that used ``->``
where it meant ``->>``) never stitches.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_BLOCKLIST = frozenset({"none", "null", "undefined", "nan", "anonymous", "-1"})
_ZEROS_AND_DASHES = re.compile(r"^[0-]+$")
_INTEGRAL_DECIMAL = re.compile(r"^([+-]?\d+)\.0+$")
SEPARATOR = ":"


def _visible(text: str) -> str:
    """``text`` without format characters (Unicode category Cf: BOM, zero-width spaces and
    joiners, soft hyphen, direction marks); ASCII has none, so it passes untouched."""
    if text.isascii():
        return text
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def _json_container(value: str) -> bool:
    if not (value[0] in "{[" and value[-1] in "}]"):
        return False
    try:
        return isinstance(json.loads(value), dict | list)
    except ValueError:
        return False


def folded(value: str) -> str:
    """What the blocklist compares: NFKC, lower case (ASCII values are only lowered)."""
    return (value if value.isascii() else unicodedata.normalize("NFKC", value)).lower()


def normalize(raw: str | None) -> str | None:
    """Canonical form of a raw value, or None when it is empty (or a JSON object/array)."""
    if raw is None:
        return None
    value = _visible(raw).strip()
    if not value or _json_container(value):
        return None
    match = _INTEGRAL_DECIMAL.match(value)
    if match:
        value = match.group(1)
    return value


@dataclass(frozen=True)
class Blocklist:
    """Values that never stitch: the built-in list plus the table's, global or per attribute."""

    extra_global: frozenset[str] = frozenset()
    per_attribute: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # (attribute id, raw value) -> identifier or None: the same cookie or email recurs across a
    # person's events, and a dict lookup is a fraction of normalising and checking again.
    _seen: dict[tuple[str, str | None], str | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str | None, str]]) -> Blocklist:
        glob: set[str] = set()
        per: dict[str, set[str]] = {}
        for attribute_id, value in rows:
            norm = folded(normalize(value) or "")
            if attribute_id is None:
                glob.add(norm)
            else:
                per.setdefault(attribute_id, set()).add(norm)
        return cls(frozenset(glob), {k: frozenset(v) for k, v in per.items()})

    def blocks(self, attribute_id: str, value: str) -> bool:
        lowered = folded(value)
        return (
            lowered in DEFAULT_BLOCKLIST
            or bool(_ZEROS_AND_DASHES.match(lowered))
            or lowered in self.extra_global
            or lowered in self.per_attribute.get(attribute_id, frozenset())
        )


def identifier(attribute_id: str, value: str) -> str:
    """The stored form of the pair (stitching attribute id, normalised value)."""
    return f"{attribute_id}{SEPARATOR}{value}"


_SEEN_LIMIT, _SEEN_MAX_VALUE = 200_000, 256


def identifiers_of(pairs: Iterable[tuple[str, str | None]], blocklist: Blocklist) -> list[str]:
    """Sorted, de-duplicated identifiers from raw (attribute id, value) pairs."""
    found = set()
    seen = blocklist._seen
    for pair in pairs:
        try:
            ident = seen[pair]
        except KeyError:
            attribute_id, raw = pair
            value = normalize(raw)
            ident = (
                None
                if value is None or blocklist.blocks(attribute_id, value)
                else identifier(attribute_id, value)
            )
            if raw is None or len(raw) <= _SEEN_MAX_VALUE:  # bounded memory: short values only
                if len(seen) >= _SEEN_LIMIT:
                    seen.clear()
                seen[pair] = ident
        if ident is not None:
            found.add(ident)
    return sorted(found)
