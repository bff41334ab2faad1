"""The one retry module: what is transient, and the named policies every loop retries with.

``is_transient`` is the only place that decides whether a failure passes. Every loop (the
replication and Kafka loops, calculation, the relay, the sinks' quick tries, the schema
registry) retries through a ``RetryPolicy`` defined here, so waits, limits, stop handling and
the log line are the same everywhere. Policies are plain values; tests drive them with an
injected ``sleep`` instead of waiting.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import tenacity
from confluent_kafka import KafkaException

from stream_cps.errors import Fatal, Stopped, StreamCpsError, Transient

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATE classes that pass: connection exception (08), transaction rollback (40: serialization
# failure, deadlock), insufficient resources (53), operator intervention (57: query cancelled,
# admin shutdown, cannot connect now), system error (58). Plus lock not available (55P03).
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_STATES = frozenset({"55P03"})
# Lost conflicts: serialization failure, deadlock, and a row lock the stitcher gave way on
# (its lock_timeout: stitching/store.py, give_way).
_CONFLICT_STATES = frozenset({"40001", "40P01", "55P03"})
# A connection that fails for one of these reasons fails the same way next time.
_PERMANENT_CONNECT = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # database or role
    "permission denied",
    "invalid sslmode",
    "invalid connection option",
    "invalid integer value",
    'missing "=" after',  # a DSN that is not key=value
    "invalid dsn",
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same work later can succeed."""
    if isinstance(exc, Transient):
        return True
    if isinstance(exc, StreamCpsError):
        return False
    if isinstance(exc, psycopg.Error):
        return _pg_transient(exc)
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return _kafka_transient(exc)


def is_conflict(exc: BaseException) -> bool:
    """A transaction that lost a conflict (40001 serialization failure, 40P01 deadlock, 55P03
    a row lock it stopped waiting for)."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate in _CONFLICT_STATES


def rows_held(exc: BaseException) -> bool:
    """A batch that gave way on a row lock (55P03, its ``lock_timeout``) more often than
    ``CONFLICT`` retries it: another transaction holds the rows for long, such as the guide's
    ``UPDATE customer_events`` of a restitch of everything (minutes at 10M events)."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == "55P03"


def lost_to_a_commit(exc: BaseException) -> bool:
    """A serialization failure (40001): a transaction that changed what this one read has
    committed, so trying again at once sees its change instead of colliding with it."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == "40001"


def fatal_connect_error(exc: psycopg.Error) -> Fatal | None:
    """A connection failure no retry fixes (bad password, missing database), as one line."""
    if isinstance(exc, psycopg.OperationalError) and not _pg_transient(exc):
        return Fatal(f"cannot connect to PostgreSQL: {_first_line(exc)}")
    return None


def delivery_error(what: str, errors: Sequence[Any], undelivered: int) -> Transient | Fatal:
    """A produce that was not acknowledged: transient when every error is retriable (timeouts,
    brokers away) or only messages were left in flight, fatal otherwise (e.g. a message over
    the topic's size limit, no authorisation), the same for every producer of the project."""
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        text = f"{what}: {errors[0]}{more}"
        if all(_kafka_error_transient(e) for e in errors):
            return Transient(text)
        return Fatal(text)
    return Transient(f"{what}: {undelivered} message(s) not acknowledged in time")


def _pg_transient(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is not None:
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
    if not isinstance(exc, psycopg.OperationalError):
        return False
    text = str(exc).lower()
    return not any(reason in text for reason in _PERMANENT_CONNECT)


def _kafka_transient(exc: BaseException) -> bool:
    """A librdkafka failure: its ``KafkaError`` (``args[0]``) says what it is."""
    if not isinstance(exc, KafkaException) or not exc.args:
        return False
    return _kafka_error_transient(exc.args[0])


# librdkafka errors no retry fixes (by name: the codes are the client library's).
_KAFKA_PERMANENT = frozenset(
    {
        "MSG_SIZE_TOO_LARGE",
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "SASL_AUTHENTICATION_FAILED",
        "_AUTHENTICATION",
        "_SSL",
        "_INVALID_ARG",
        "INVALID_CONFIG",
        "_UNKNOWN_TOPIC",
        "INVALID_RECORD",
        "UNSUPPORTED_VERSION",
    }
)


def kafka_error_is_permanent(error: Any) -> bool:
    """A librdkafka ``KafkaError`` no retry fixes (bad credentials, certificate, size ...)."""
    return not _kafka_error_transient(error)


def _kafka_error_transient(error: Any) -> bool:
    """A librdkafka ``KafkaError``: fatal ones and the permanent codes above are not."""
    fatal, name = getattr(error, "fatal", None), getattr(error, "name", None)
    if not callable(fatal) or not callable(name):
        return False
    return not fatal() and name() not in _KAFKA_PERMANENT


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``first`` s, doubling up to ``longest`` s.

    ``attempts=None`` retries until ``stop`` is set (always-on loops); otherwise the last
    failure surfaces after that many tries. Only failures ``retry_on`` accepts are retried.
    """

    name: str
    first: float
    longest: float
    attempts: int | None
    jitter: float = 0.0
    retry_on: Callable[[BaseException], bool] = is_transient
    quiet: bool = False  # no log line per retry (lost conflicts are routine)
    # failures whose first retry need not wait (what they lost to is over already)
    at_once: Callable[[BaseException], bool] | None = None

    def but(self, **changes: object) -> RetryPolicy:
        """The same policy with some fields changed (e.g. a configured ``longest``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def call(
        self,
        fn: Callable[[], T],
        *,
        stop: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> T:
        """``fn()``, retried by this policy. Raises ``Stopped`` when ``stop`` is set while
        waiting, and the last failure when it is not retryable or the attempts are used up."""
        stops: list[tenacity.stop.stop_base] = []
        if self.attempts is not None:
            stops.append(tenacity.stop_after_attempt(self.attempts))
        if stop is not None:
            stops.append(tenacity.stop_when_event_set(stop))
        waiting: Callable[[float], None] = sleep or tenacity.nap.sleep
        if sleep is None and stop is not None:
            event = stop

            def waiting(seconds: float) -> None:  # returns at once when stop is set
                event.wait(seconds)

        said: list[str] = []  # the reasons logged so far in this call
        backoff = tenacity.wait_exponential(
            multiplier=self.first, max=self.longest
        ) + tenacity.wait_random(0, self.jitter)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if state.attempt_number == 1 and exc and self.at_once and self.at_once(exc):
                return 0.0
            return float(backoff(state))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(self.retry_on),
            wait=wait,
            stop=tenacity.stop_any(*stops) if stops else tenacity.stop_never,
            sleep=waiting,
            before_sleep=None if self.quiet else (lambda state: self._log(state, said)),
            reraise=True,
        )
        try:
            result = retrying(fn)
        except Exception as exc:
            if stop is not None and stop.is_set() and self.retry_on(exc):
                raise Stopped(f"{self.name}: stopped while retrying") from exc
            raise
        if said:
            tries = retrying.statistics.get("attempt_number", 0)
            log.info("%s: recovered (try %d)", self.name, tries)
        return result

    def _log(self, state: tenacity.RetryCallState, said: list[str]) -> None:
        """One WARNING when the failure starts or its reason changes; the same reason again
        (a dependency down for minutes) is only a DEBUG line, so the log shows state changes."""
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        reason = _first_line(exc) if exc else "?"
        level = logging.DEBUG if said and said[-1] == reason else logging.WARNING
        said.append(reason)
        log.log(
            level,
            "%s: %s; retrying in %.1f s (try %d)",
            self.name,
            reason,
            wait,
            state.attempt_number,
        )


# Transactions that lost a conflict (40001/40P01): short, jittered, growing waits, then the
# error surfaces (stitching on every source; the Kafka path runs at REPEATABLE READ or above).
CONFLICT = RetryPolicy(
    "lost conflict",
    first=0.02,
    longest=2.0,
    attempts=10,
    jitter=0.05,
    retry_on=is_conflict,
    quiet=True,
    # A Kafka member's batch losing to attribute calculation's store into its entities
    # (docs/benchmarks.md): the store has committed; waiting was 4-9% of a member's time.
    at_once=lost_to_a_commit,
)
# A batch that keeps giving way to rows another transaction holds: the loops wait as long as
# that transaction runs (until stopped), in the session they have. As a "database unavailable"
# failure it restarted the whole session (and the replication stream) every few seconds.
HELD = RetryPolicy(
    "stitching waits for rows another transaction holds (an UPDATE of customer_events?)",
    first=0.2,
    longest=5.0,
    attempts=None,
    jitter=0.2,
    retry_on=rows_held,
)
# An always-on loop whose database went away: outlives restarts and failovers.
DATABASE = RetryPolicy("database unavailable", first=0.5, longest=30.0, attempts=None, jitter=0.5)
# One Kafka batch's transaction (a lost connection is reopened on the next try).
# Rows held for long are ``HELD``'s (the loop waits, however long the other transaction runs).
KAFKA_BATCH = RetryPolicy(
    "kafka batch",
    first=0.2,
    longest=5.0,
    attempts=8,
    retry_on=lambda exc: is_transient(exc) and not rows_held(exc),
)
# Producing to Kafka after the batch committed (dead letters, command copies).
KAFKA_PRODUCE = RetryPolicy("kafka produce", first=0.2, longest=5.0, attempts=5)
# A schema registry look-up.
REGISTRY = RetryPolicy("schema registry", first=0.2, longest=5.0, attempts=5)
# Quick tries for a blip of a remote call; the caller's own policy takes over after that.
BLIP = RetryPolicy("blip", first=0.1, longest=1.0, attempts=3, jitter=0.1, quiet=True)
# The outbox relay while OpenSearch or PostgreSQL is away (``longest`` from settings).
RELAY = RetryPolicy("outbox relay", first=0.2, longest=30.0, attempts=None, jitter=0.2)
