"""Load the definitions from the database, compile them, and notice when they change.

Definitions are read every pass (two small queries) and recompiled only when their fingerprint
changes, so an edit applies without a restart. A change is also recorded in
``{attr}.attribute_definitions_state``: entities calculated before it are recalculated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.attributes import definitions
from stream_cps.attributes.compiler import CompiledAttribute, Compiler, referenced
from stream_cps.config import Schemas
from stream_cps.db import roles, sandbox
from stream_cps.errors import DefinitionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything a pass needs to know about the definitions."""

    fingerprint: str
    attributes: tuple[CompiledAttribute, ...]
    invalid: tuple[DefinitionError, ...]
    changed: datetime | None

    @property
    def invalid_ids(self) -> list[str]:
        return [e.name for e in self.invalid]


class PlanLoader:
    """Keeps the compiled plan for as long as the definitions stay the same."""

    def __init__(self, schemas: Schemas, timeout_ms: int = 10000) -> None:
        self._schemas = schemas
        self._timeout_ms = timeout_ms
        self._compiler = Compiler(schemas.attr)
        self._plan: Plan | None = None

    def load(self, conn: psycopg.Connection[Any]) -> Plan:
        cdp = self._schemas.cdp
        with conn.transaction():
            rows, meta_rows = self._read(conn, cdp)
        fingerprint = hashlib.sha256(
            json.dumps([rows, meta_rows], default=str).encode()
        ).hexdigest()
        if self._plan is not None and self._plan.fingerprint == fingerprint:
            return self._plan
        compiled, invalid = self._compile(conn, rows, meta_rows)
        changed = self._remember(conn, fingerprint, invalid)
        self._plan = Plan(fingerprint, tuple(compiled), tuple(invalid), changed)
        log.info(
            "loaded %d attribute definitions (%d invalid, %d meta attributes)",
            len(compiled),
            len(invalid),
            len(meta_rows),
        )
        return self._plan

    @staticmethod
    def _read(
        conn: psycopg.Connection[Any], cdp: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        rows = conn.execute(
            sql.SQL(
                "SELECT id, data_type, definition::text FROM {} WHERE definition IS NOT NULL "
                "ORDER BY id"
            ).format(sql.Identifier(cdp, "attributes"))
        ).fetchall()
        meta_rows = conn.execute(
            sql.SQL("SELECT id, definition FROM {} ORDER BY id").format(
                sql.Identifier(cdp, "meta_attributes")
            )
        ).fetchall()
        return rows, meta_rows

    def _compile(
        self,
        conn: psycopg.Connection[Any],
        rows: list[tuple[Any, ...]],
        meta_rows: list[tuple[Any, ...]],
    ) -> tuple[list[CompiledAttribute], list[DefinitionError]]:
        invalid: list[DefinitionError] = []
        metas: dict[str, definitions.MetaAttribute] = {}
        for meta_id, text in meta_rows:
            try:
                metas[meta_id] = definitions.parse_meta(meta_id, text)
            except DefinitionError as exc:
                invalid.append(exc)
        broken_metas = {e.name: e.reason for e in invalid}
        parsed, bad = definitions.parse_all(rows)
        invalid.extend(bad)
        compiled: list[CompiledAttribute] = []
        for index, definition in enumerate(parsed):
            broken = referenced(definition.query or "", broken_metas)
            if broken:
                invalid.append(
                    DefinitionError(
                        definition.attribute_id,
                        f"uses meta attribute {broken[0]}, which is invalid: "
                        f"{broken_metas[broken[0]]}",
                    )
                )
                continue
            try:
                row_form = self._row_form_ok(conn, definition)
                compiled.append(self._compiler.compile(index, definition, metas, row_form))
            except DefinitionError as exc:
                invalid.append(exc)
        for error in invalid:
            log.error("invalid attribute definition %s", error)
        return compiled, invalid

    def _row_form_ok(self, conn: psycopg.Connection[Any], d: definitions.Definition) -> bool:
        """Whether PostgreSQL accepts the value expressions inside CASE: then none returns a
        set and the attribute can share the batch's single scan. Any failure (including a
        broken expression) keeps the general form, which reports errors at calculation time."""
        if d.type is definitions.CalcType.CUSTOM:
            return False
        with conn.transaction(), sandbox.read_only(conn, self._timeout_ms, roles.ATTRIBUTES):
            for probe in self._compiler.probes(d):
                if isinstance(sandbox.fetch(conn, probe, {"never": False}), sandbox.SqlFailure):
                    return False
        return True

    def _remember(
        self, conn: psycopg.Connection[Any], fingerprint: str, invalid: list[DefinitionError]
    ) -> datetime | None:
        """Store the new fingerprint (and when it changed) and report invalid definitions."""
        attr = self._schemas.attr
        with conn.transaction():
            row = conn.execute(
                sql.SQL(
                    "INSERT INTO {} AS s (fingerprint) VALUES (%s) ON CONFLICT (singleton) DO "
                    "UPDATE SET fingerprint = excluded.fingerprint, changed = now() "
                    "WHERE s.fingerprint <> excluded.fingerprint "
                    "RETURNING changed, xmax = 0"
                ).format(sql.Identifier(attr, "attribute_definitions_state")),
                [fingerprint],
            ).fetchone()
            if row is None:  # unchanged since another run stored it
                found = conn.execute(
                    sql.SQL("SELECT changed FROM {}").format(
                        sql.Identifier(attr, "attribute_definitions_state")
                    )
                ).fetchone()
                return found[0] if found else None
            if invalid:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (attribute_id, message) "
                        "SELECT * FROM unnest(%s::text[], %s::text[])"
                    ).format(sql.Identifier(attr, "attribute_errors")),
                    [
                        [e.name for e in invalid],
                        [f"invalid definition: {e.reason}" for e in invalid],
                    ],
                )
            changed: datetime = row[0]
            return changed
