"""Kafka: the consumer-group adapter, Avro framing and schemas, dead letters, replay."""
