"""OpenSearch node fixture (placeholder until the relay work lands)."""
