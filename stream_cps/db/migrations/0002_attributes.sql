-- Attribute calculation (issue 4). Placeholders as in 0001.

-- The text of any value, JSON scalars without their quotes. Attribute values are typed from this
-- text, so `payload->'n'` and `payload->>'n'` give the same attribute. Plain SQL functions, so
-- the planner inlines them.
CREATE OR REPLACE FUNCTION {attr}.attr_text(text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT $1 $$;
CREATE OR REPLACE FUNCTION {attr}.attr_text(jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT $1 #>> '{{}}' $$;
CREATE OR REPLACE FUNCTION {attr}.attr_text(json) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT $1 #>> '{{}}' $$;
CREATE OR REPLACE FUNCTION {attr}.attr_text(anyelement) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT $1::text $$;

-- Which definitions the calculated attributes reflect. When the definitions change, entities
-- calculated before `changed` are recalculated (after the due ones, walking the primary key, so
-- no index on `calculated` has to slow down every store).
CREATE TABLE IF NOT EXISTS {attr}.attribute_definitions_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    fingerprint text NOT NULL,
    changed timestamptz NOT NULL DEFAULT now()
);

-- The worker looks for the guide's "force cache update" (modified = NULL) every pass; the value
-- counts can be large.
CREATE INDEX IF NOT EXISTS cached_attribute_values_counts_forced_idx
    ON {attr}.cached_attribute_values_counts (attribute_id) WHERE modified IS NULL;

-- Custom queries read context values as `public.context` (the guide's examples); when the CDP
-- schema is not public, give them that name too.
DO $do$
BEGIN
    IF to_regclass('public.context') IS NULL THEN
        EXECUTE 'CREATE VIEW public.context AS SELECT * FROM {cdp}.context';
    END IF;
END
$do$;
