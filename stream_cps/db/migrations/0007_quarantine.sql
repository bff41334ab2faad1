-- Hub quarantine (docs/stitching.md): an identifier that co-occurs with more than a limit of
-- distinct identifiers of one other stitching attribute links nothing.
--
-- Distinct co-occurring pairs of identifiers of different attributes, each once (a < b): a
-- person's cookie and e-mail recur on every visit and must count once, and a restitch must not
-- count them again. Only the stitcher writes it.
CREATE TABLE IF NOT EXISTS {ps}.identifier_pairs (
    a text NOT NULL,
    b text NOT NULL,
    PRIMARY KEY (a, b)
);

-- How many distinct identifiers of other_attribute_id each identifier co-occurs with: grows by
-- the pairs a batch adds, so a batch reads no history.
CREATE TABLE IF NOT EXISTS {ps}.identifier_cooccurrence (
    identifier text NOT NULL,
    other_attribute_id text NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (identifier, other_attribute_id)
);

-- Identifiers over their limit, and the admin's decision. quarantined and blocked link
-- nothing; released stitches again and is never quarantined again.
CREATE TABLE IF NOT EXISTS {ps}.quarantined_identifiers (
    identifier text PRIMARY KEY,
    attribute_id text NOT NULL,
    value text NOT NULL,
    other_attribute_id text NOT NULL,
    cooccurring integer NOT NULL,
    limit_value integer NOT NULL,
    state text NOT NULL DEFAULT 'quarantined'
        CHECK (state IN ('quarantined', 'released', 'blocked')),
    created timestamptz NOT NULL DEFAULT now(),
    decided timestamptz NULL,
    reason text NULL
);
