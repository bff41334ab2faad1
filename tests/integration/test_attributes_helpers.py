"""Building blocks for the attribute tests: entities made with plain SQL inserts, no stitching.

Each entity gets one identifier of its own; its events carry it, so ``ev.identifiers &&
ca.identifiers`` finds exactly them.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from stream_cps import config
from stream_cps.attributes.worker import CalculationWorker

T0 = datetime(2024, 1, 1, tzinfo=UTC)
_event_seq = itertools.count(1)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def ev(
    payload: Mapping[str, Any] | None = None,
    minutes: int = 0,
    *,
    id: str | None = None,
    source: str = "web",
    type: str = "page_view",
    version: str = "1-0-0",
) -> dict[str, Any]:
    """One event; ids default to a global sequence so that order by id is predictable."""
    return {
        "id": id or f"e{next(_event_seq):06d}",
        "source_id": source,
        "type": type,
        "version": version,
        "event_time": at(minutes),
        "payload": dict(payload or {}),
    }


class World:
    """A test CDP: definitions, entities and a worker against one fresh database."""

    def __init__(self, db: psycopg.Connection[Any], settings: config.Settings) -> None:
        self.db = db
        self.settings = settings
        self.worker = CalculationWorker(settings)

    def attribute(self, id: str, definition: Any, data_type: str = "string") -> None:
        raw = definition if isinstance(definition, str) or definition is None else Jsonb(definition)
        if isinstance(definition, str):
            self.db.execute(
                "INSERT INTO public.attributes (id, name, data_type, definition) "
                "VALUES (%s, %s, %s, %s::jsonb) ON CONFLICT (id) DO UPDATE SET "
                "data_type = excluded.data_type, definition = excluded.definition",
                [id, id, data_type, json.dumps(definition)],
            )
            return
        self.db.execute(
            "INSERT INTO public.attributes (id, name, data_type, definition) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
            "data_type = excluded.data_type, definition = excluded.definition",
            [id, id, data_type, raw],
        )

    def meta(self, id: str, definition: str) -> None:
        self.db.execute(
            "INSERT INTO public.meta_attributes (id, definition) VALUES (%s, %s) "
            "ON CONFLICT (id) DO UPDATE SET definition = excluded.definition",
            [id, definition],
        )

    def entity(self, events: Iterable[Mapping[str, Any]], entity_id: str | None = None) -> str:
        entity_id = entity_id or str(uuid.uuid4())
        identifier = f"email:{entity_id}"
        rows = list(events)
        for e in rows:
            self.db.execute(
                "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, "
                "payload, stitched, identifiers) VALUES (%s, %s, %s, %s, %s, %s, now(), %s)",
                [
                    e["id"],
                    e["source_id"],
                    e["type"],
                    e["version"],
                    e["event_time"],
                    Jsonb(e["payload"]),
                    [identifier],
                ],
            )
        first = min(rows, key=lambda e: (e["event_time"], e["id"])) if rows else None
        self.db.execute(
            "INSERT INTO public.customer_attributes (customer_entity_id, identifiers, modified, "
            "first_event_time, first_event_id) VALUES (%s, %s, now(), %s, %s)",
            [
                entity_id,
                [identifier],
                first["event_time"] if first else T0,
                first["id"] if first else "none",
            ],
        )
        return entity_id

    def add_events(self, entity_id: str, events: Iterable[Mapping[str, Any]]) -> None:
        """New events for an existing entity, as stitching would record them."""
        for e in events:
            self.db.execute(
                "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, "
                "payload, stitched, identifiers) VALUES (%s, %s, %s, %s, %s, %s, now(), %s)",
                [
                    e["id"],
                    e["source_id"],
                    e["type"],
                    e["version"],
                    e["event_time"],
                    Jsonb(e["payload"]),
                    [f"email:{entity_id}"],
                ],
            )
        self.touch(entity_id)

    def touch(self, entity_id: str) -> None:
        self.db.execute(
            "UPDATE public.customer_attributes SET modified = clock_timestamp() "
            "WHERE customer_entity_id = %s",
            [entity_id],
        )

    def run(self) -> int:
        return self.worker.run_pass(self.db)

    def attrs(self, entity_id: str) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT attributes FROM public.customer_attributes WHERE customer_entity_id = %s",
            [entity_id],
        ).fetchone()
        assert row is not None
        return dict(row[0])

    def errors(self) -> list[tuple[str, str | None, str]]:
        return [
            (r[0], r[1], r[2])
            for r in self.db.execute(
                "SELECT attribute_id, customer_entity_id, message FROM cdp_attr.attribute_errors "
                "ORDER BY id"
            ).fetchall()
        ]

    def calc(
        self, definition: Any, events: Iterable[Mapping[str, Any]], data_type: str = "string"
    ) -> Any:
        """The value of one attribute for one new entity (None when absent)."""
        self.attribute("x", definition, data_type)
        entity_id = self.entity(events)
        self.run()
        return self.attrs(entity_id).get("x")
