"""The roles admin-written SQL runs as (``db/sandbox.py``), and the grants of a service role.

Three NOLOGIN roles, created by ``stream-cps init`` (``schema.migrate``), each able to read only
what its kind of SQL needs:

- ``stream_cps_sandbox``: attribute definitions, custom queries and meta attributes. It reads
  the batch's own events (the session's temporary table, granted when it is created), context
  values, and calls ``attr_text``; not ``customer_events``, other entities, catalogs with
  secrets, files or sequences.
- ``stream_cps_context``: context queries, which are over the whole customer base by design:
  the events, entities, sources and event types, nothing else.
- ``stream_cps_rules``: stitching ``value_expression``: the events table, nothing else.

The role that runs the service is made a member of each (``SET ROLE`` needs it); a role that
is a member of the service role is never created, so ``pg_terminate_backend`` of the service's
own sessions is refused to the SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.errors import SchemaError

log = logging.getLogger(__name__)

ATTRIBUTES = "stream_cps_sandbox"
CONTEXT = "stream_cps_context"
RULES = "stream_cps_rules"
ALL = (ATTRIBUTES, CONTEXT, RULES)


def ensure(conn: psycopg.Connection[Any], schemas: Schemas) -> None:
    """Create the roles if missing, grant what each reads, and let the current user use
    them; inside the caller's transaction."""
    for role in ALL:
        _create(conn, role)
    ident = sql.Identifier

    def grant(text: str, **names: sql.Composable) -> None:
        conn.execute(sql.SQL(text).format(**names))

    attr, cdp, ce = ident(schemas.attr), ident(schemas.cdp), ident(schemas.ce)
    sandbox, context, rules = ident(ATTRIBUTES), ident(CONTEXT), ident(RULES)
    grant("GRANT USAGE ON SCHEMA {s} TO {r}", s=attr, r=sandbox)
    for proc in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname = 'attr_text' "
        "AND p.pronamespace = %s::regnamespace",
        [schemas.attr],
    ).fetchall():
        grant(f"GRANT EXECUTE ON FUNCTION {proc[0]} TO {{r}}", r=sandbox)
    for view_schema in dict.fromkeys([schemas.cdp, "public", schemas.attr]):
        if _exists(conn, view_schema, "context"):
            grant("GRANT USAGE ON SCHEMA {s} TO {r}", s=ident(view_schema), r=sandbox)
            grant("GRANT SELECT ON {t} TO {r}", t=ident(view_schema, "context"), r=sandbox)
    grant("GRANT USAGE ON SCHEMA {ce}, {cdp}, public TO {r}", ce=ce, cdp=cdp, r=context)
    for schema, table in (
        (schemas.ce, "customer_events"),
        (schemas.cdp, "customer_attributes"),
        (schemas.cdp, "events"),
        (schemas.cdp, "sources"),
        (schemas.cdp, "context"),
        # the guide's unqualified names (views when the schemas are not public)
        ("public", "customer_events"),
        ("public", "customer_attributes"),
        ("public", "context"),
    ):
        if _exists(conn, schema, table):
            grant("GRANT SELECT ON {t} TO {r}", t=ident(schema, table), r=context)
    grant("GRANT USAGE ON SCHEMA {ce} TO {r}", ce=ce, r=rules)
    grant("GRANT SELECT ON {t} TO {r}", t=ident(schemas.ce, "customer_events"), r=rules)
    member_of_all(conn, ["current_user"])


def member_of_all(conn: psycopg.Connection[Any], users: Iterable[str]) -> None:
    """Let ``users`` (role names, or ``current_user``) ``SET ROLE`` to each sandbox role."""
    for user in users:
        target = sql.SQL("CURRENT_USER") if user == "current_user" else sql.Identifier(user)
        conn.execute(
            sql.SQL("GRANT {} TO {}").format(
                sql.SQL(", ").join(sql.Identifier(r) for r in ALL), target
            )
        )


def check(conn: psycopg.Connection[Any]) -> None:
    """Refuse to run without the sandbox roles: admin SQL would run with our privileges."""
    rows = conn.execute(
        "SELECT r.rolname, pg_has_role(current_user, r.oid, 'USAGE') "
        "OR pg_has_role(current_user, r.oid, 'MEMBER') FROM pg_roles r "
        "WHERE r.rolname = ANY(%s)",
        [list(ALL)],
    ).fetchall()
    found = dict(rows)
    missing = [r for r in ALL if r not in found]
    if missing:
        raise SchemaError(
            f"sandbox role {missing[0]} is missing: run `stream-cps init` (as the schema owner)"
        )
    denied = [r for r in ALL if not found[r]]
    if denied:
        raise SchemaError(
            f"the service role may not SET ROLE {denied[0]}: run `stream-cps init "
            "--service-role <this role>` as the schema owner"
        )


def _create(conn: psycopg.Connection[Any], role: str) -> None:
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
        return
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        log.info("created role %s (admin SQL runs as it)", role)
    except psycopg.errors.DuplicateObject:  # another database's init created it meanwhile
        pass
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SchemaError(
            f"cannot create role {role}: {exc.diag.message_primary}; `stream-cps init` needs "
            f"CREATEROLE, or a superuser runs: CREATE ROLE {role} NOLOGIN"
        ) from exc


def _exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", [sql.Identifier(schema, name).as_string(conn)]
    ).fetchone()
    return bool(row and row[0])


def grant_service(conn: psycopg.Connection[Any], schemas: Schemas, role: str) -> list[str]:
    """The grants a non-superuser ``role`` needs to ``stream-cps run`` (docs/security.md):
    read and write the service's tables, use its sequences and helper functions, and use the
    sandbox roles. The REPLICATION attribute is the DBA's (``ALTER ROLE ... REPLICATION``).
    Returns the statements run, for the operator's record."""
    target = sql.Identifier(role)
    statements: list[sql.Composed] = []
    for schema in dict.fromkeys([schemas.cdp, schemas.ce, schemas.ps, schemas.attr, "public"]):
        s = sql.Identifier(schema)
        statements += [
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, target),
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(
                s, target
            ),
            sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
                s, target
            ),
        ]
    statements.append(
        sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {} TO {}").format(
            sql.Identifier(schemas.attr), target
        )
    )
    for statement in statements:
        conn.execute(statement)
    member_of_all(conn, [role])
    return [s.as_string(conn) for s in statements]
