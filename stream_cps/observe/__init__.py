"""Read-only views of a running pipeline: the status snapshot, the HTTP health and metrics."""
