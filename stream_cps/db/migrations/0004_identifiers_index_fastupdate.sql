-- The GIN index on customer_events.identifiers answers "events of this entity" (attribute
-- calculation, the guide's `<@` scripts). With fastupdate on, new entries wait in a pending list
-- that every lookup scans until VACUUM merges it: right after a burst one entity's lookup took
-- ~2 ms instead of ~0.01 ms. Off costs stitching about 2% (measured with bench/stitch.py).
ALTER INDEX {ce}.customer_events_identifiers_idx SET (fastupdate = off);
