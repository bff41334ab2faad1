"""The CockroachDB changefeed webhook endpoint (HTTPS)."""
