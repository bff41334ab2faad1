-- Kafka and changefeed-webhook ingestion. Plain tables, no PostgreSQL-only features, so the same
-- DDL runs on CockroachDB.

-- Messages that could not be decoded or violate the schema, with where they came from. The id is
-- derived from the origin ("kafka:<topic>:<partition>:<offset>" or "webhook:<sha256>"), so a
-- redelivered message is recorded once.
CREATE TABLE IF NOT EXISTS {ps}.kafka_dead_letters (
    id text PRIMARY KEY,
    source text NOT NULL,
    topic text NULL,
    kafka_partition integer NULL,
    kafka_offset bigint NULL,
    message_key bytea NULL,
    message_value bytea NULL,
    message_time timestamptz NULL,
    reason text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);

-- `stream-cps replay` against a live consumer group: the group's members seek the partitions
-- they own to the requested offset and mark the request applied.
CREATE TABLE IF NOT EXISTS {ps}.kafka_replay_requests (
    id bigserial PRIMARY KEY,
    group_id text NOT NULL,
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    requested timestamptz NOT NULL DEFAULT now(),
    applied timestamptz NULL,
    applied_by text NULL
);
CREATE INDEX IF NOT EXISTS kafka_replay_requests_pending_idx
    ON {ps}.kafka_replay_requests (group_id) WHERE applied IS NULL;
