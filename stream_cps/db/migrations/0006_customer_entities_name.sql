-- The guide's PostgreSQL-implementation runbook recalculates attributes with
-- `UPDATE cdp_attr.customer_entities SET calculated = NULL;`. Give that name to the live entity
-- rows: a simple view, so PostgreSQL lets the UPDATE through to customer_attributes.
DO $do$
BEGIN
    IF to_regclass('{attr}.customer_entities') IS NULL THEN
        EXECUTE 'CREATE VIEW {attr}.customer_entities AS SELECT * FROM {cdp}.customer_attributes';
    END IF;
END
$do$;
