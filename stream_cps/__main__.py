"""Allows ``python -m stream_cps``."""

from stream_cps.cli import main

raise SystemExit(main())
