-- Base schema. Placeholders {cdp} {ce} {ps} {attr} are the configured schema names, quoted as
-- identifiers by the migration runner. Tables the guide defines are created only when missing, so a
-- CDP that already has them keeps its data.

CREATE SCHEMA IF NOT EXISTS {cdp};
CREATE SCHEMA IF NOT EXISTS {ce};
CREATE SCHEMA IF NOT EXISTS {ps};
CREATE SCHEMA IF NOT EXISTS {attr};

-- The CDP tables that Meiro Business Explorer creates (contract: "Tables users read and write").
CREATE TABLE IF NOT EXISTS {cdp}.sources (
    id varchar(255) PRIMARY KEY,
    name text
);

CREATE TABLE IF NOT EXISTS {cdp}.events (
    id varchar(255) PRIMARY KEY,
    source_id varchar(255) REFERENCES {cdp}.sources(id),
    type varchar(255),
    version varchar(255),
    name text
);

CREATE TABLE IF NOT EXISTS {cdp}.attributes (
    id varchar(255) PRIMARY KEY,
    name text,
    data_type text NOT NULL DEFAULT 'string',
    definition jsonb NULL
);

CREATE TABLE IF NOT EXISTS {cdp}.meta_attributes (
    id varchar(255) PRIMARY KEY,
    definition text NOT NULL
);

CREATE TABLE IF NOT EXISTS {cdp}.context (
    key text PRIMARY KEY,
    value text,
    query text,
    modified timestamp without time zone
);

-- Exactly the guide's DDL, with its indexes (named as PostgreSQL names the guide's unnamed ones).
CREATE TABLE IF NOT EXISTS {ps}.stitching_attributes_config (
    attribute_id character varying(255) REFERENCES {cdp}.attributes(id),
    event_id character varying(255) REFERENCES {cdp}.events(id),
    value_expression text
);
CREATE INDEX IF NOT EXISTS stitching_attributes_config_attribute_id_idx
    ON {ps}.stitching_attributes_config (attribute_id);
CREATE INDEX IF NOT EXISTS stitching_attributes_config_event_id_idx
    ON {ps}.stitching_attributes_config (event_id);
CREATE UNIQUE INDEX IF NOT EXISTS stitching_attributes_config_event_id_attribute_id_idx
    ON {ps}.stitching_attributes_config (event_id, attribute_id);

-- The immutable event log. stream-cps fills stitched and identifiers.
CREATE TABLE IF NOT EXISTS {ce}.customer_events (
    id text PRIMARY KEY,
    source_id varchar(255),
    type varchar(255),
    version varchar(255),
    event_time timestamptz NOT NULL,
    payload jsonb NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    stitched timestamptz NULL,
    identifiers text[] NULL
);
-- Finds work the replication stream did not carry (stitched IS NULL is the source of truth).
CREATE INDEX IF NOT EXISTS customer_events_unstitched_idx
    ON {ce}.customer_events (id) WHERE stitched IS NULL;
-- Finds an entity's events by its identifiers (attribute calculation, the guide's scripts).
CREATE INDEX IF NOT EXISTS customer_events_identifiers_idx
    ON {ce}.customer_events USING gin (identifiers);

-- One row per live customer entity.
CREATE TABLE IF NOT EXISTS {cdp}.customer_attributes (
    customer_entity_id text PRIMARY KEY,
    identifiers text[] NOT NULL,
    attributes jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    modified timestamptz NULL,
    calculated timestamptz NULL,
    customer_events_count integer NULL,
    first_event_time timestamptz NOT NULL,
    first_event_id text NOT NULL,
    version bigint NOT NULL DEFAULT 0
);
-- The purge signal of the guide's restitch scripts.
CREATE INDEX IF NOT EXISTS customer_attributes_purge_idx
    ON {cdp}.customer_attributes (customer_entity_id) WHERE modified IS NULL;
-- Entities due for calculation.
CREATE INDEX IF NOT EXISTS customer_attributes_due_idx
    ON {cdp}.customer_attributes (modified)
    WHERE calculated IS NULL OR calculated < modified;

-- Stitching state: which entity holds each identifier ("attribute_id:value").
CREATE TABLE IF NOT EXISTS {ps}.identifier_entities (
    identifier text PRIMARY KEY,
    entity_id text NOT NULL
);
CREATE INDEX IF NOT EXISTS identifier_entities_entity_idx
    ON {ps}.identifier_entities (entity_id);

-- Old entity ids (merged away or re-keyed) and the id that holds their events now.
CREATE TABLE IF NOT EXISTS {ps}.entity_aliases (
    old_id text PRIMARY KEY,
    new_id text NOT NULL,
    reason text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS entity_aliases_new_idx ON {ps}.entity_aliases (new_id);

-- Values that never stitch, on top of the built-in list; attribute_id NULL = every attribute.
CREATE TABLE IF NOT EXISTS {ps}.identifier_blocklist (
    attribute_id varchar(255) NULL,
    value text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS identifier_blocklist_uniq
    ON {ps}.identifier_blocklist (coalesce(attribute_id, ''), lower(value));

-- Rule failures, by stitching attribute and event.
CREATE TABLE IF NOT EXISTS {ps}.stitching_errors (
    id bigserial PRIMARY KEY,
    attribute_id text,
    event_id text,
    message text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);

-- Versions for OpenSearch external versioning: grow with every change of any entity.
CREATE SEQUENCE IF NOT EXISTS {ps}.entity_version_seq;

-- UI caches (the guide's "How to force cache update").
CREATE TABLE IF NOT EXISTS {attr}.cached_attributes_counts_customers_per_attribute (
    attribute_id varchar(255) PRIMARY KEY,
    count bigint NOT NULL,
    modified timestamptz NULL
);
CREATE TABLE IF NOT EXISTS {attr}.cached_attribute_values_counts (
    attribute_id varchar(255) NOT NULL,
    value text NOT NULL,
    count bigint NOT NULL,
    modified timestamptz NULL,
    PRIMARY KEY (attribute_id, value)
);

-- Attribute definitions that failed, by attribute and entity, with the database's message.
CREATE TABLE IF NOT EXISTS {attr}.attribute_errors (
    id bigserial PRIMARY KEY,
    attribute_id text NOT NULL,
    customer_entity_id text NULL,
    message text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);

-- Transactional outbox of OpenSearch commands, written with the change that causes them.
CREATE TABLE IF NOT EXISTS {attr}.outbox (
    seq bigserial PRIMARY KEY,
    entity_id text NOT NULL,
    op text NOT NULL CHECK (op IN ('upsert', 'delete')),
    version bigint NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    delivered timestamptz NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_error text NULL,
    parked boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS outbox_pending_idx
    ON {attr}.outbox (seq) WHERE delivered IS NULL AND NOT parked;
