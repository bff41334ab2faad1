-- GDPR erase (docs/stitching.md "Erase"): `stream-cps erase` deletes a person and leaves only
-- salted hashes behind, so a replay, a redelivery or a re-inserted row of an erased event is
-- dropped instead of stitched again. No table here holds a value or an event id as text.
--
-- The salt: one per database, drawn here from the server's strong random source (two v4
-- UUIDs, 244 random bits). Without it the hash of a known e-mail could be recomputed from a
-- dump; only the service's role reads it (docs/security.md).
CREATE TABLE IF NOT EXISTS {ps}.erasure_salt (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    salt bytea NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {ps}.erasure_salt (salt)
SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
ON CONFLICT (singleton) DO NOTHING;

-- The audit: when, why, how many rows of each kind; the entity only as its hash.
CREATE TABLE IF NOT EXISTS {ps}.erasures (
    id bigserial PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now(),
    reason text NULL,
    suppressed boolean NOT NULL,
    counts jsonb NOT NULL,
    entity_hash bytea NOT NULL
);

-- Tombstones: sha256(salt || 'event:' || id) of every erased event.
CREATE TABLE IF NOT EXISTS {ps}.erased_events (
    hash bytea PRIMARY KEY,
    erasure_id bigint NOT NULL REFERENCES {ps}.erasures (id)
);

-- erase --suppress: sha256(salt || 'identifier:' || identifier); such an identifier links
-- nothing again (it is dropped like a blocklisted value).
CREATE TABLE IF NOT EXISTS {ps}.erased_identifiers (
    hash bytea PRIMARY KEY,
    erasure_id bigint NOT NULL REFERENCES {ps}.erasures (id)
);
