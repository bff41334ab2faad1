"""A realistic identity graph, reproducible from a seed.

People browse on one to three devices (cookies, sometimes carried across domains), some log in
(user id + email), some buy (email, phone written in varying ways) and some are in the CRM. A
share of events carries the junk values that glue strangers together in naive stitching (``None``,
``0``, ``undefined``, ``-1``), so the sample exercises the blocklist and normalisation too.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg import sql

from stream_cps.config import Schemas

JUNK = ["None", "0", "undefined", "-1", "null", "", "  ", "000-000"]
PRODUCTS = ["shoes", "shirt", "hat", "socks", "jacket", "bag"]
VERSION = "1-0-0"
COLUMNS = ("id", "source_id", "type", "version", "event_time", "payload")


@dataclass(frozen=True)
class Person:
    cookies: list[str]
    email: str | None
    phone: str | None
    user_id: str | None
    crm_id: str | None


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def people(rng: random.Random, count: int, first: int = 0) -> list[Person]:
    """``count`` people numbered from ``first``: distinct numbers never share an identifier
    (cookies are random), so a burst of new customers takes a range of its own."""
    found = []
    for n in range(first, first + count):
        cookies = [_uid(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        email = f"person{n}@example.com" if rng.random() < 0.7 else None
        phone = f"+420{600000000 + n}" if rng.random() < 0.4 else None
        user_id = f"u{n}" if rng.random() < 0.5 else None
        crm_id = f"{100000 + n}" if rng.random() < 0.3 else None
        found.append(Person(cookies, email, phone, user_id, crm_id))
    return found


def events(
    seed: int = 7,
    persons: int = 300,
    per_person: int = 8,
    start: datetime | None = None,
    first: int = 0,
) -> Iterator[tuple[str, str, str, str, datetime, str]]:
    """Rows (id, source_id, type, version, event_time, payload JSON) in a shuffled order, of
    people numbered from ``first``."""
    rng = random.Random(seed)
    origin = start or datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for person in people(rng, persons, first):
        for _ in range(rng.randint(1, per_person * 2 - 1)):
            rows.append(_event(rng, person, origin + timedelta(minutes=rng.randint(0, 500_000))))
    rng.shuffle(rows)
    yield from rows


def _noisy(rng: random.Random, value: str | None) -> str | None:
    if value is None or rng.random() < 0.05:
        return rng.choice(JUNK)
    return f" {value} " if rng.random() < 0.1 else value


def _event(
    rng: random.Random, p: Person, when: datetime
) -> tuple[str, str, str, str, datetime, str]:
    kind = rng.choices(["page_view", "login", "purchase", "crm"], weights=[70, 10, 12, 8])[0]
    cookie = rng.choice(p.cookies)
    payload: dict[str, object]
    if kind == "page_view":
        payload = {"cookie_id": cookie, "url": f"/p/{rng.randint(1, 50)}"}
        if len(p.cookies) > 1 and rng.random() < 0.3:
            payload["inbound_user_ids"] = [rng.choice(p.cookies)]
        return (_uid(rng), "web", "page_view", VERSION, when, json.dumps(payload))
    if kind == "login" and p.user_id:
        payload = {"cookie_id": cookie, "user_id": p.user_id, "email": _noisy(rng, p.email)}
        return (_uid(rng), "web", "login", VERSION, when, json.dumps(payload))
    if kind == "crm" and p.crm_id:
        crm_id = p.crm_id + ".0" if rng.random() < 0.2 else p.crm_id
        payload = {"crm_id": crm_id, "email": _noisy(rng, p.email), "phone": _noisy(rng, p.phone)}
        return (_uid(rng), "crm", "contact_update", VERSION, when, json.dumps(payload))
    payload = {
        "email": _noisy(rng, p.email),
        "phone": _noisy(rng, p.phone),
        "total": round(rng.uniform(5, 300), 2),
        "product": rng.choice(PRODUCTS),
    }
    return (_uid(rng), "shop", "purchase", VERSION, when, json.dumps(payload))


def config_sql(schemas: Schemas) -> sql.Composed:
    """The sample configuration, for the given schema names."""
    from importlib import resources

    from stream_cps.db.schema import render

    sql_file = resources.files("stream_cps_dev.sample").joinpath("config.sql")
    text = sql_file.read_text(encoding="utf-8")
    return render(text, schemas)


def copy_events(cursor: object, table: sql.Composable, rows: Sequence[tuple[object, ...]]) -> None:
    """COPY rows into a customer_events-shaped table (the fastest way in)."""
    from psycopg import Cursor

    assert isinstance(cursor, Cursor)
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        table, sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    )
    with cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
