"""One error root for the whole service, with four kinds that decide what a loop does.

- ``Transient``: it passes (lost connection, lost conflict, broker or index briefly away):
  retried with backoff by the named policies in ``stream_cps.retry``.
- ``InvalidInput``: one message or row cannot be processed; it is set aside with its reason
  (dead-letter table, errors table) and the rest carries on.
- ``DefinitionError``: an admin-written rule or definition is broken; reported by name and
  skipped.
- ``Fatal``: an operator must fix something (configuration, schema, credentials); the process
  prints one line and exits non-zero.

Driver and client-library errors (psycopg, librdkafka, opensearch-py) are translated into this
tree once, at the edge: ``stream_cps.retry.is_transient`` decides for the database and Kafka,
the OpenSearch adapter for its transport.
"""


class StreamCpsError(Exception):
    """Root of every error stream-cps raises on purpose."""


class Transient(StreamCpsError):
    """A failure that passes (lost connection, serialization conflict): retry with backoff."""


class InvalidInput(StreamCpsError):
    """One message or row cannot be processed; it is set aside with this reason."""


class DefinitionError(StreamCpsError):
    """A stitching rule or attribute definition is broken; the message names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.reason = message


class Fatal(StreamCpsError):
    """Something an operator must fix; the process stops with one line and a non-zero exit."""


class ConfigError(Fatal):
    """Configuration is invalid; the message names the offending key."""


class SchemaError(Fatal):
    """The database schema is missing, too old or newer than this build understands."""


class Stopped(StreamCpsError):
    """A stop was requested while a loop waited to retry; the caller winds down quietly."""
