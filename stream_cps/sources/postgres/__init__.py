"""PostgreSQL logical replication: pgoutput decoding, slot readers, the lease."""
