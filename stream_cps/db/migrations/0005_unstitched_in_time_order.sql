-- The sweep takes a backlog (a restitch of everything, rows older than the slot) in
-- (event_time, id) order. An entity's id comes from its earliest event, so in that order an
-- entity is founded by its first event and never re-keyed; in id order about one event in five
-- re-keyed its entity (absorb, alias, OpenSearch delete) on the sample data.
DROP INDEX IF EXISTS {ce}.customer_events_unstitched_idx;
CREATE INDEX IF NOT EXISTS customer_events_unstitched_time_idx
    ON {ce}.customer_events (event_time, id) WHERE stitched IS NULL;
