-- Where a quarantined identifier occurred (docs/stitching.md). It is dropped from the event's
-- customer_events.identifiers like a blocked value, so the guide's test
-- `customer_events.identifiers <@ customer_attributes.identifiers` still finds every event of an
-- entity; a release finds the events to restitch here.
CREATE TABLE IF NOT EXISTS {ps}.quarantined_events (
    identifier text NOT NULL,
    event_id text NOT NULL,
    PRIMARY KEY (identifier, event_id)
);
