"""The one retry module: what counts as transient, and how a policy waits, stops and gives up.

Policies take an injected ``sleep``, so these tests drive the waits instead of sleeping.
"""

from __future__ import annotations

import threading
import urllib.error
from email.message import Message

import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_cps import retry
from stream_cps.errors import (
    ConfigError,
    DefinitionError,
    Fatal,
    InvalidInput,
    SchemaError,
    Stopped,
    StreamCpsError,
    Transient,
)
from stream_cps.sinks.opensearch import OpenSearchRejected, OpenSearchUnavailable
from stream_cps.sources.postgres.pgoutput import DecodeError


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (psycopg.errors.SerializationFailure("40001"), True),
        (psycopg.errors.DeadlockDetected("40P01"), True),
        (psycopg.errors.AdminShutdown("57P01"), True),
        (psycopg.errors.QueryCanceled("57014"), True),
        (psycopg.errors.LockNotAvailable("55P03"), True),
        (psycopg.errors.TooManyConnections("53300"), True),
        (psycopg.OperationalError("connection to server at 127.0.0.1 failed: refused"), True),
        (psycopg.OperationalError('password authentication failed for user "x"'), False),
        (psycopg.OperationalError('database "nope" does not exist'), False),
        (psycopg.errors.InsufficientPrivilege("42501"), False),
        (psycopg.errors.UndefinedTable("42P01"), False),
        (psycopg.errors.ProgramLimitExceeded("54000"), False),
        (psycopg.DataError("bad"), False),
        (Transient("x"), True),
        (OpenSearchUnavailable("down"), True),
        (OpenSearchRejected("401"), False),
        (InvalidInput("x"), False),
        (ConfigError("x"), False),
        (KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT)), True),
        (KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)), False),
        (urllib.error.HTTPError("u", 503, "busy", Message(), None), True),
        (urllib.error.HTTPError("u", 404, "nope", Message(), None), False),
        (ConnectionResetError(), True),
        (ValueError("a bug"), False),
    ],
)
def test_is_transient_is_the_one_classification(exc: BaseException, transient: bool) -> None:
    assert retry.is_transient(exc) is transient


def test_every_error_of_ours_derives_from_the_root_with_one_kind() -> None:
    kinds = (Transient, InvalidInput, DefinitionError, Fatal, Stopped)
    for cls in (ConfigError, SchemaError, DecodeError, OpenSearchUnavailable, OpenSearchRejected):
        assert issubclass(cls, StreamCpsError)
        assert sum(issubclass(cls, kind) for kind in kinds) == 1, cls


def test_a_permanent_connection_failure_becomes_one_fatal_line() -> None:
    exc = psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "cps"\nmore'
    )
    fatal = retry.fatal_connect_error(exc)
    assert isinstance(fatal, Fatal) and "\n" not in str(fatal)
    assert retry.fatal_connect_error(psycopg.OperationalError("server closed")) is None


def test_policy_retries_transient_failures_with_growing_bounded_waits() -> None:
    waits: list[float] = []
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise Transient("not yet")
        return "done"

    policy = retry.RetryPolicy("test", first=0.5, longest=2.0, attempts=None)
    assert policy.call(flaky, sleep=waits.append) == "done"
    assert waits == [0.5, 1.0, 2.0, 2.0]


def test_policy_gives_up_after_its_attempts_and_never_retries_what_is_not_transient() -> None:
    waits: list[float] = []
    calls = 0

    def always(exc: Exception) -> None:
        nonlocal calls
        calls += 1
        raise exc

    policy = retry.RetryPolicy("test", first=0.1, longest=1.0, attempts=3)
    with pytest.raises(Transient):
        policy.call(lambda: always(Transient("down")), sleep=waits.append)
    assert calls == 3 and len(waits) == 2
    calls = 0
    with pytest.raises(ConfigError):
        policy.call(lambda: always(ConfigError("bad")), sleep=waits.append)
    assert calls == 1


def test_policy_raises_stopped_when_stop_is_set_while_waiting() -> None:
    stop = threading.Event()

    def sleep(_seconds: float) -> None:
        stop.set()  # SIGTERM arrives during the wait

    def down() -> None:
        raise Transient("database away")

    with pytest.raises(Stopped):
        retry.DATABASE.call(down, stop=stop, sleep=sleep)


def test_conflict_policy_retries_only_lost_conflicts() -> None:
    assert retry.is_conflict(psycopg.errors.SerializationFailure("x"))
    assert retry.is_conflict(psycopg.errors.DeadlockDetected("x"))
    assert retry.is_conflict(psycopg.errors.LockNotAvailable("x"))  # the stitcher gave way
    assert not retry.is_conflict(psycopg.errors.AdminShutdown("x"))
    assert not retry.is_conflict(Transient("x"))


def test_rows_held_for_long_are_waited_for_not_counted_against_a_kafka_batch() -> None:
    """A batch giving way to the guide's restitch script (55P03, minutes at 10M) past
    ``CONFLICT``'s tries: ``HELD`` waits without an attempt limit, until stopped, and a Kafka
    batch does not spend its eight tries on it (before, the member gave up after about a
    minute and the replication session restarted as if the database were away)."""
    held = psycopg.errors.LockNotAvailable("x")
    assert retry.rows_held(held) and not retry.rows_held(psycopg.errors.DeadlockDetected("x"))
    assert not retry.KAFKA_BATCH.retry_on(held)
    assert retry.KAFKA_BATCH.retry_on(psycopg.errors.AdminShutdown("x"))
    assert retry.HELD.attempts is None and not retry.HELD.retry_on(Transient("x"))
    stop = threading.Event()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 50:
            stop.set()  # the script still runs; SIGTERM arrives

    def still_held() -> None:  # CONFLICT's ten quick tries, then the failure surfaces
        retry.CONFLICT.call(lambda: _raise(held), sleep=lambda _s: None)

    with pytest.raises(Stopped):
        retry.HELD.call(still_held, stop=stop, sleep=sleep)
    assert len(slept) == 50 and max(slept) <= retry.HELD.longest + retry.HELD.jitter


def _raise(exc: Exception) -> None:
    raise exc


def test_a_failed_produce_is_classified_the_same_for_every_producer() -> None:
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    too_large = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    assert isinstance(retry.delivery_error("t", [timed_out], 0), Transient)
    assert isinstance(retry.delivery_error("t", [], 3), Transient)
    assert isinstance(retry.delivery_error("t", [timed_out, too_large], 0), Fatal)


@pytest.mark.parametrize(
    ("failures", "waits"),
    [
        ([psycopg.errors.SerializationFailure("x")], 0),
        ([psycopg.errors.SerializationFailure("x")] * 2, 1),
        ([psycopg.errors.DeadlockDetected("x")], 1),
        ([psycopg.errors.LockNotAvailable("x")], 1),
    ],
)
def test_a_serialization_failure_is_retried_at_once_the_first_time(
    failures: list[psycopg.Error], waits: int
) -> None:
    """The transaction that won has committed: the first retry does not wait. A deadlock or
    a lock given way on (the other side still holds it) waits as before, and so does a
    second serialization failure in a row."""
    slept: list[float] = []
    left = list(failures)

    def work() -> str:
        if left:
            raise left.pop(0)
        return "done"

    assert retry.CONFLICT.call(work, sleep=slept.append) == "done"
    assert len(slept) == len(failures)
    assert len([s for s in slept if s > 0]) == waits
    assert all(s >= retry.CONFLICT.first for s in slept if s > 0)
