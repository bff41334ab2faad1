"""Where the shipped Avro schemas (`schemas/` at the top of the repository) are found.

A checkout (editable install, tests, CI) reads them from the repository; an installed wheel
(Docker image) carries them as data files under ``<prefix>/share/stream-cps/schemas``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1] / "schemas"
_INSTALLED = Path(sys.prefix) / "share" / "stream-cps" / "schemas"


def schemas_dir() -> Path:
    """The directory holding ``customer_event.avsc``, ``opensearch_command.avsc``, ``ids.json``."""
    return _CHECKOUT if (_CHECKOUT / "ids.json").exists() else _INSTALLED
