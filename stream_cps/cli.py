"""Command line: ``stream-cps init | run | status | relay | reindex | replay | webhook |
quarantine | split | erase | explain | demo``.

This module only parses; ``stream_cps.service.process`` builds and runs what a command needs.
Errors that are the operator's to fix (``Fatal``: configuration, schema, credentials) print one
line and exit 2; other errors of ours print one line and exit 1; anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import psycopg

from stream_cps import config, logs, retry
from stream_cps.errors import ConfigError, Fatal, SchemaError, StreamCpsError
from stream_cps.service import process

log = logging.getLogger("stream_cps")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = config.load(args.config, flags=_flags(args))
        logs.configure(settings.log_level, settings.log_format)
        result: int = args.handler(settings, args)
        return result
    except Fatal as exc:  # configuration, schema, credentials: the operator's to fix
        print(f"stream-cps: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:  # a command that does not retry, e.g. init
        fatal = retry.fatal_connect_error(exc)
        print(
            f"stream-cps: {fatal or f'database unavailable: {exc}'.splitlines()[0]}",
            file=sys.stderr,
        )
        return 2 if fatal else 1
    except StreamCpsError as exc:
        print(f"stream-cps: {exc}", file=sys.stderr)
        return 1


EXAMPLES = """examples:
  stream-cps demo                                  embedded PostgreSQL with sample data
  stream-cps init --config config.json             tables, views, sandbox roles, slot
  stream-cps run --config config.json              stitch + calculate (+ relay) until SIGTERM
  stream-cps run --source kafka --config c.json    the same from a Kafka consumer group
  stream-cps status --json                         role, lag, waiting work (exit 0/1/2)
  stream-cps explain --why email:x@a cookie:c1     why are these one person?
  stream-cps replay --from-time 2026-11-30T00:00Z  reprocess a topic from a time
  stream-cps quarantine list                       hub identifiers that link nothing
  stream-cps split ID --cut-identifier cookie:pc --reason "shared PC" --dry-run
  stream-cps erase --identifier email:x@a --yes    GDPR: gone for good, replays included

every setting: docs/configuration.md (file, STREAM_CPS_* variables, flags)
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="the guide's JSON configuration file")
    common.add_argument("--dsn", help="PostgreSQL connection string (else STREAM_CPS_DSN)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--log-format", choices=["text", "json"])
    parser = argparse.ArgumentParser(
        prog="stream-cps",
        description="Always-on customer profile stitching.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stream-cps {version()}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create or upgrade the schema")
    init.add_argument(
        "--no-replication",
        action="store_true",
        help="no publication or slot (Kafka-only deployments: a slot nothing reads keeps WAL)",
    )
    init.add_argument(
        "--service-role",
        metavar="ROLE",
        help="grant a non-superuser ROLE what `run` needs (docs/security.md)",
    )
    init.set_defaults(handler=_cmd_init)

    relay = sub.add_parser(
        "relay", parents=[common], help="only deliver outbox commands to OpenSearch, until stopped"
    )
    relay.set_defaults(handler=_cmd_relay)

    reindex = sub.add_parser(
        "reindex", parents=[common], help="queue an OpenSearch upsert of every entity"
    )
    reindex.set_defaults(handler=_cmd_reindex)

    run = sub.add_parser("run", parents=[common], help="stitch and calculate until stopped")
    run.add_argument("--source", choices=["postgres", "kafka"], default="postgres")
    run.add_argument("--batch-size", type=int, dest="batch_size")
    run.set_defaults(handler=_cmd_run)

    status = sub.add_parser(
        "status",
        parents=[common],
        help="one screen: role, lag, waiting work, errors (exit 0 ok, 1 degraded, 2 unreachable)",
    )
    status.add_argument("--source", choices=["postgres", "kafka"], default="postgres")
    status.add_argument("--json", action="store_true", help="the same as one JSON object")
    status.set_defaults(handler=_cmd_status)

    replay = sub.add_parser(
        "replay", parents=[common], help="move the Kafka group's offsets back and reprocess"
    )
    start = replay.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-beginning", action="store_true", help="every retained message")
    start.add_argument(
        "--from-offset", action="append", metavar="P:O", help="partition P from offset O"
    )
    start.add_argument("--from-time", metavar="ISO8601", help="messages from this time on")
    replay.add_argument("--topic", help="one of kafka.topics (default: all of them)")
    replay.add_argument("--yes", action="store_true", help="also move a live group's offsets")
    replay.set_defaults(handler=_cmd_replay)

    webhook = sub.add_parser(
        "webhook", parents=[common], help="HTTPS endpoint for a changefeed webhook sink"
    )
    webhook.add_argument("--host", dest="webhook_host", help="listen address (127.0.0.1)")
    webhook.add_argument("--port", type=int, dest="webhook_port")
    webhook.add_argument("--cert", dest="webhook_cert", help="PEM certificate file")
    webhook.add_argument("--key", dest="webhook_key", help="PEM private key file")
    webhook.set_defaults(handler=_cmd_webhook)

    quarantine = sub.add_parser(
        "quarantine", help="list, release or block hub identifiers (docs/operations.md)"
    )
    actions = quarantine.add_subparsers(required=True, metavar="ACTION", dest="action")
    listing = actions.add_parser("list", parents=[common], help="the quarantined identifiers")
    listing.add_argument("--state", choices=["quarantined", "released", "blocked"])
    for action, text in (
        ("release", "let it stitch again (restitches the entities it touches)"),
        ("block", "keep it out of stitching for good"),
    ):
        decide = actions.add_parser(action, parents=[common], help=text)
        decide.add_argument("identifier", metavar="ID", help="as listed, e.g. cookie:junk-cookie")
        decide.add_argument("--reason", help="stored with the decision")
    quarantine.set_defaults(handler=_cmd_quarantine)

    splitting = sub.add_parser(
        "split",
        parents=[common],
        help="unmerge an entity: cut an identifier or detach an event (docs/operations.md)",
    )
    splitting.add_argument("entity_id", nargs="?", help="the entity to split (or an alias)")
    decision = splitting.add_mutually_exclusive_group(required=True)
    decision.add_argument(
        "--cut-identifier", metavar="ATTR:VALUE", help="this identifier links no one, anywhere"
    )
    decision.add_argument("--detach-event", metavar="EVENT_ID", help="this event links nothing")
    decision.add_argument("--undo", metavar="DECISION_ID", type=int, help="undo a decision")
    splitting.add_argument("--reason", help="why (required for a split; stored with it)")
    splitting.add_argument("--by", help="who decides (default: the database user)")
    splitting.add_argument(
        "--dry-run", action="store_true", help="print the parts it would leave; write nothing"
    )
    splitting.set_defaults(handler=_cmd_split)

    erase = sub.add_parser(
        "erase",
        parents=[common],
        help="GDPR: delete a person for good, replays included (docs/operations.md)",
    )
    subject = erase.add_mutually_exclusive_group(required=True)
    subject.add_argument("--entity", metavar="ID", help="a live entity id, or an old one (alias)")
    subject.add_argument("--identifier", metavar="ATTR:VALUE", help="the entity holding it")
    erase.add_argument(
        "--yes", action="store_true", help="erase (without it: print what would go, exit 1)"
    )
    erase.add_argument(
        "--suppress", action="store_true", help="also keep its identifiers from linking again"
    )
    erase.add_argument("--reason", help="stored in the audit row: put no personal data here")
    erase.set_defaults(handler=_cmd_erase)

    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="an entity's identifiers, events, merges and picture; --why A B: what links them",
    )
    target = explain.add_mutually_exclusive_group(required=True)
    target.add_argument("entity_id", nargs="?", help="a live entity id, or an old one (alias)")
    target.add_argument("--identifier", metavar="ATTR:VALUE", help="the entity holding it")
    target.add_argument(
        "--why",
        nargs=2,
        metavar=("A", "B"),
        help="the shortest chain of events linking two identifiers (ATTR:VALUE) or event ids",
    )
    explain.add_argument(
        "--format", choices=["text", "json", "dot", "svg", "png"], default="text", dest="fmt"
    )
    explain.add_argument("--output", metavar="FILE", help="write here (required for png)")
    explain.add_argument(
        "--limit", type=int, default=50, help="events, and identifiers per attribute, listed"
    )
    explain.set_defaults(handler=_cmd_explain)

    demo = sub.add_parser(
        "demo", parents=[common], help="run on an embedded PostgreSQL with sample data"
    )
    demo.add_argument("--workdir", default=".state/demo", help="where the embedded server lives")
    demo.add_argument("--persons", type=int, default=300, help="people in the sample data")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def version() -> str:
    """The installed distribution's version (pyproject.toml), else ``unknown`` (a bare
    checkout on ``PYTHONPATH`` that was never installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("stream-cps")
    except PackageNotFoundError:
        return "unknown"


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dsn": getattr(args, "dsn", None),
        "log_level": getattr(args, "log_level", None),
        "log_format": getattr(args, "log_format", None),
        "stitching.batch_size": getattr(args, "batch_size", None),
        "webhook.host": getattr(args, "webhook_host", None),
        "webhook.port": getattr(args, "webhook_port", None),
        "webhook.cert_file": getattr(args, "webhook_cert", None),
        "webhook.key_file": getattr(args, "webhook_key", None),
    }


def _cmd_init(settings: config.Settings, args: argparse.Namespace) -> int:
    from stream_cps.db import schema
    from stream_cps.db.connect import connect
    from stream_cps.sources.postgres.readers import reader

    with connect(settings.dsn, role="init", autocommit=True) as conn:
        applied = schema.migrate(conn, settings.schemas)
        version = schema.latest_version()
        print(f"schema at version {version}" + (f" (applied {applied})" if applied else ""))
        from stream_cps.db.server_settings import slow_settings

        for warning in slow_settings(conn, settings.schemas):
            log.warning("%s", warning)  # a log line: "stream-cps: ..." lines are errors
        if args.service_role:
            from stream_cps.db import roles

            with conn.transaction():
                granted = roles.grant_service(conn, settings.schemas, args.service_role)
            print(f"granted {args.service_role} what `run` needs ({len(granted)} statements)")
        if settings.opensearch.url:
            from stream_cps.sinks.relay import prepare_index

            prepare_index(settings, conn)
            print(f"OpenSearch index {settings.opensearch.index} ready")
        if args.no_replication:
            print("replication: skipped (--no-replication); use `run --source kafka`")
            return 0
        try:
            reader(settings).ensure(conn)
        except SchemaError as exc:
            print(
                f"stream-cps: replication not set up: {exc} "
                "(or pass --no-replication for a Kafka-only deployment)",
                file=sys.stderr,
            )
            return 2
        print(f"replication: slot {settings.stitching.slot_name} ready")
    return 0


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: finish the batch in flight, then exit."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s; finishing the batch in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _cmd_run(settings: config.Settings, args: argparse.Namespace) -> int:
    process.run(settings, args.source, stop_on_signals())
    return 0


def _cmd_relay(settings: config.Settings, _args: argparse.Namespace) -> int:
    process.relay(settings, stop_on_signals())
    return 0


def _cmd_reindex(settings: config.Settings, _args: argparse.Namespace) -> int:
    queued = process.reindex(settings)
    print(f"queued {queued} entities for OpenSearch; the relay delivers them")
    return 0


def _cmd_webhook(settings: config.Settings, _args: argparse.Namespace) -> int:
    process.webhook(settings, stop_on_signals())
    return 0


def _cmd_quarantine(settings: config.Settings, args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = process.quarantine_list(settings, args.state)
        for r in rows:
            decided = f" decided {r.decided:%Y-%m-%d %H:%M}" if r.decided else ""
            why = f" ({r.reason})" if r.reason else ""
            print(
                f"{r.identifier}\t{r.state}\t{r.cooccurring} {r.other_attribute_id} "
                f"> {r.limit_value}\tsince {r.created:%Y-%m-%d %H:%M}{decided}{why}"
            )
        print(f"{len(rows)} identifiers", file=sys.stderr)
        return 0
    state = {"release": "released", "block": "blocked"}[args.action]
    done = process.quarantine_decide(settings, args.identifier, state, args.reason)
    print(
        f"{done.identifier}: {done.before} -> {done.after}; {done.restitched} entities and "
        f"{done.reset} events set to be restitched by the running service"
    )
    return 0


def _cmd_split(settings: config.Settings, args: argparse.Namespace) -> int:
    if args.undo is not None:
        if args.entity_id or args.dry_run:
            raise ConfigError("split --undo DECISION_ID: takes no ENTITY_ID nor --dry-run")
        undone = process.split_undo(settings, args.undo, args.by)
        print(
            f"decision {undone.id} undone ({undone.kind} {undone.target}); "
            f"{undone.restitched} entities and {undone.reset} events set to be restitched "
            "by the running service"
        )
        return 0
    kind, target = (
        ("cut", args.cut_identifier) if args.cut_identifier else ("detach", args.detach_event)
    )
    if not args.entity_id:
        raise ConfigError("split: ENTITY_ID is required with --cut-identifier or --detach-event")
    if args.dry_run:
        entity, found = process.split_dry_run(settings, args.entity_id, kind, target)
        print(f"entity {entity} with {kind} {target} would become (nothing written):")
        for part in found.parts:
            keeps = "keeps the old id" if part.entity_id == entity else "new id"
            print(
                f"{part.entity_id}\t{keeps}\tfirst {part.first_event_id} "
                f"{part.first_event_time:%Y-%m-%d %H:%M:%S}\t{len(part.events)} events\t"
                f"{', '.join(part.identifiers)}"
            )
        if found.unlinked:
            print(f"linking nothing: {', '.join(found.unlinked)}")
        return 0
    if not args.reason:
        raise ConfigError("split: --reason is required (it is stored with the decision)")
    done = process.split_decide(settings, args.entity_id, kind, target, args.reason, args.by)
    print(
        f"decision {done.id}: {kind} {target} in entity {done.entity_id} (by {done.decided_by}); "
        "the entity is set to be restitched by the running service "
        f"(undo: stream-cps split --undo {done.id})"
    )
    return 0


def _cmd_erase(settings: config.Settings, args: argparse.Namespace) -> int:
    done = process.erase(
        settings, args.entity, args.identifier, args.reason, args.suppress, args.yes
    )
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in done.counts.items() if n)
    if done.unstitched:
        note = f"{done.unstitched}{'+' if done.unstitched >= 1000 else ''} events wait to be "
        print(
            note + "stitched: if some are this person's, erase again once they are", file=sys.stderr
        )
    if not args.yes:
        print(f"entity {done.entity_id}: would erase {counts}")
        print("nothing erased: pass --yes to erase", file=sys.stderr)
        return 1
    print(f"entity {done.entity_id}: erased {counts} (audit row {done.erasure_id})")
    return 0


def _cmd_explain(settings: config.Settings, args: argparse.Namespace) -> int:
    if args.fmt == "png" and not args.output:
        raise ConfigError("explain --format png: binary output needs --output FILE")
    why = (args.why[0], args.why[1]) if args.why else None
    data = process.explain(
        settings, args.entity_id, args.identifier, why, args.fmt, max(args.limit, 0)
    )
    if args.output:
        with open(args.output, "wb") as out:
            out.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def _cmd_status(settings: config.Settings, args: argparse.Namespace) -> int:
    from stream_cps.observe import status

    try:
        snap = process.status(settings, args.source)
    except (psycopg.OperationalError, StreamCpsError) as exc:
        if isinstance(exc, Fatal) and not isinstance(exc, SchemaError):
            raise  # a setting: the usual one line, exit 2
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if args.json:
            print(json.dumps({"health": "unreachable", "exit_code": 2, "error": reason}))
        print(f"stream-cps: status: {reason}", file=sys.stderr)
        return status.UNREACHABLE
    print(status.to_json(snap) if args.json else status.render(snap))
    return snap.exit_code


def _cmd_replay(settings: config.Settings, args: argparse.Namespace) -> int:
    from stream_cps.sources.kafka.replay import run_replay

    return run_replay(
        settings,
        topic=args.topic,
        beginning=args.from_beginning,
        offsets=args.from_offset,
        since=args.from_time,
        yes=args.yes,
        out=sys.stdout,
    )


def _cmd_demo(settings: config.Settings, args: argparse.Namespace) -> int:
    try:
        from stream_cps_dev.demo import run_demo
    except ImportError as exc:
        raise ConfigError(
            f"demo: needs the development extra (pip install 'stream-cps[demo]'): {exc}"
        ) from exc
    return run_demo(settings, args.workdir, args.persons)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
