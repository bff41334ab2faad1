"""Against the real services: PostgreSQL, Kafka, OpenSearch."""
