"""Identifier normalisation and the blocklist (pure; no I/O).

The vendor's own failure stories set the rules: values like ``None`` or ``0`` glued thousands of
people into one entity, and ``12345`` vs ``12345.0`` failed to stitch. So values are trimmed,
empty and blocked values never stitch, and integral decimals lose their zero fraction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_BLOCKLIST = frozenset({"none", "null", "undefined", "nan", "anonymous", "-1"})
_ZEROS_AND_DASHES = re.compile(r"^[0-]+$")
_INTEGRAL_DECIMAL = re.compile(r"^([+-]?\d+)\.0+$")
SEPARATOR = ":"


def normalize(raw: str | None) -> str | None:
    """Canonical form of a raw value, or None when it is empty."""
    if raw is None:
        return None
    value = raw.strip()
    if not value:
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
            norm = (normalize(value) or "").lower()
            if attribute_id is None:
                glob.add(norm)
            else:
                per.setdefault(attribute_id, set()).add(norm)
        return cls(frozenset(glob), {k: frozenset(v) for k, v in per.items()})

    def blocks(self, attribute_id: str, value: str) -> bool:
        lowered = value.lower()
        return (
            lowered in DEFAULT_BLOCKLIST
            or bool(_ZEROS_AND_DASHES.match(value))
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
