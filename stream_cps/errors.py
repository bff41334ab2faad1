"""One error root for the whole service.

Callers decide what to do by class, not by message: ``Recoverable`` errors are retried with
backoff, ``InvalidInput`` goes to a dead-letter place with its reason, anything else stops the
process loudly.
"""


class StreamCpsError(Exception):
    """Root of every error stream-cps raises on purpose."""


class ConfigError(StreamCpsError):
    """Configuration is invalid; the message names the offending key."""


class SchemaError(StreamCpsError):
    """The database schema is missing, too old or newer than this build understands."""


class Recoverable(StreamCpsError):
    """A transient failure (lost connection, serialization conflict): retry with backoff."""


class InvalidInput(StreamCpsError):
    """One message or row cannot be processed; it is set aside with this reason."""


class DefinitionError(StreamCpsError):
    """A stitching rule or attribute definition is broken; the message names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.reason = message
